"""The decoded images of a ``folder:`` dataset, cached as one ``.npz`` so later loads skip Pillow.

A cache file holds the uint8 pixels ``(N, 3, S, S)`` of every image the layout uses, their
labels, which split each belongs to (train, test, or "split later" for a ``PATH/<class>/*``
folder, whose 80/20 split is drawn after loading), the class names, the layout, the key it
was made for, and the training set's per-channel mean and std with the split they belong to
(a std over 150 million floats takes longer than reading the whole file). The file name names
the source (an archive's sha256, a directory's path) and the image size; the whole key is
checked on reading, and a file that does not fit (other key, shape or version, unreadable) is
a miss: decoded again and replaced, so one source keeps one file. Files are written to a
temporary name and renamed, so a reader never sees a partial file; a cache that cannot be
written is a warning, never a failure.

>>> import tempfile
>>> images = np.zeros((2, 3, 4, 4), np.uint8)
>>> entry = Decoded(images, np.array([0, 1]), np.array([TRAIN, TEST], np.int8),
...                 ("cat", "dog"), "train/test")
>>> path = cache_file(Path(tempfile.mkdtemp()), "tar", "ab" * 32, 4)  # ident: hex digest
>>> path.name
'tar-abababababababab-4px-v2.npz'
>>> write_cache(path, entry, key="ab" * 32)
True
>>> read_cache(path, key="ab" * 32, image_size=4).class_names
('cat', 'dog')
>>> read_cache(path, key="cd" * 32, image_size=4) is None
True
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

# Bump when what is decoded or how it is stored changes: older files then no longer match.
# 2: 16-bit images keep their high byte (version 1 clipped them to 255).
FORMAT_VERSION = 2
TRAIN, TEST, UNSPLIT = 0, 1, 2
LAYOUTS = ("train/test", "split")


@dataclasses.dataclass(frozen=True, eq=False)
class Decoded:
    """Decoded images (uint8 ``(N, 3, S, S)``), their labels, splits and the class names.

    ``stats``: float32 ``(2, 3)``, the per-channel mean and std of the training images on the
    [0, 1] scale, for the split named ``stats_for`` (``""``: none).
    """

    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    class_names: tuple[str, ...]
    layout: str
    stats: np.ndarray | None = None
    stats_for: str = ""


def cache_file(cache_dir: Path, kind: str, ident: str, image_size: int) -> Path:
    """Where the entry of source ``ident`` (a hex digest) at ``image_size`` lives in ``cache_dir``.

    One file per source and size: a new entry for the same source replaces the old one.
    """
    return cache_dir / f"{kind}-{ident[:16]}-{image_size}px-v{FORMAT_VERSION}.npz"


def read_cache(path: Path, *, key: str, image_size: int) -> Decoded | None:
    """The entry at ``path`` if it exists, is readable and was made for ``key``; else ``None``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            # The key first: a stale entry is rejected without reading its pixels.
            if (str(f["key"]), int(f["version"])) != (key, FORMAT_VERSION):
                return None
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile):
        return None
    try:
        entry = Decoded(
            images=arrays["images"],
            labels=arrays["labels"].astype(np.int64, copy=False),
            splits=arrays["splits"],
            class_names=tuple(str(n) for n in arrays["class_names"].tolist()),
            layout=str(arrays["layout"]),
            stats=arrays["stats"],
            stats_for=str(arrays["stats_for"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
    n = len(entry.images)
    fits = (
        entry.images.dtype == np.uint8
        and entry.images.shape == (n, 3, image_size, image_size)
        and entry.labels.shape == (n,)
        and entry.splits.shape == (n,)
        and n > 0
        and entry.layout in LAYOUTS
        and int(entry.labels.min()) >= 0
        and int(entry.labels.max()) < len(entry.class_names)
        and set(np.unique(entry.splits).tolist()) <= {TRAIN, TEST, UNSPLIT}
        and entry.stats is not None
        and entry.stats.dtype == np.float32
        and entry.stats.shape == (2, 3)
    )
    return entry if fits else None


def write_cache(path: Path, entry: Decoded, *, key: str) -> bool:
    """Write ``entry``, made for ``key``, to ``path`` atomically; on failure warn, return False."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                images=entry.images,
                labels=entry.labels.astype(np.int64),
                splits=entry.splits.astype(np.int8),
                class_names=np.array(entry.class_names, dtype=str),
                layout=np.array(entry.layout),
                stats=np.zeros((2, 3), np.float32) if entry.stats is None else entry.stats,
                stats_for=np.array(entry.stats_for if entry.stats is not None else ""),
                key=np.array(key),
                version=np.array(FORMAT_VERSION),
            )
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        warnings.warn(
            f"folder: could not cache the decoded images at {path} ({type(err).__name__}: "
            f"{err}); the next load decodes them again",
            stacklevel=3,
        )
        return False
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return True
