"""folder:PATH — an ImageFolder-style directory of images, or a tar archive of one, via Pillow.

Accepted layouts (class = sub-directory name, classes sorted by name; the rules are in
:mod:`globalpool.lab.data.folder_layout`):

- ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (``val/`` is accepted for ``test/``);
- ``PATH/<class>/*``: split per class, deterministically, 80/20 into train and test.

``PATH`` may also be a tar archive (``.tar``, ``.tar.gz``/``.tgz``, ``.tar.xz``, ``.tar.bz2``;
the compression is read from the file's first bytes). It is streamed, never extracted
(:mod:`globalpool.lab.data.folder_archive`), and holds the same layouts, at its top or inside one
top-level directory (``cifar10/train/<class>/*``; a lone ``train/``, ``test/`` or ``val/`` is
not taken for such a wrapper). Links inside an archive are skipped.

Images (png, jpg, jpeg, bmp, gif, webp, tif, tiff; hidden files skipped) are converted to 8-bit
RGB (16-bit ones keep their high byte, ``value >> 8``; 32-bit integer or float pixels, whose range
is unknown, are refused naming the file), resized to ``image_size`` x ``image_size``
(bilinear), scaled to [0, 1] and standardised per channel with the training set's mean and std.

The decoded uint8 pixels are cached (:mod:`globalpool.lab.data.folder_cache`) in ``cache_dir``
(default ``default_cache_dir() / "folder"``), one ``.npz`` per source and image size. An archive
is keyed by the sha256 of its bytes, a directory by its path and the relative name, size, mtime
and ctime of every image it uses (a rewritten file always gets a new ctime, even when its size
and mtime are kept), both also by the image size and the cache format version. Any change to
the archive's bytes or to the images is a new key, so a stale entry is never used; the new one
replaces it. The training set's mean and std are cached with the pixels. An unwritable cache
only warns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .dataset import Dataset, check_seed, default_cache_dir, subsample_indices
from .errors import DatasetError
from .folder_archive import list_archive, read_members
from .folder_cache import TEST, Decoded, cache_file, read_cache, write_cache
from .folder_layout import IMAGE_EXTENSIONS, ArchiveTree, DirTree, Entry, plan_layout

__all__ = ["IMAGE_EXTENSIONS", "load_folder"]


#: Pillow modes of 16-bit unsigned single-channel pixels (grayscale PNG, TIFF).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _bits_per_sample(img: Image.Image) -> int | None:
    """Bits per sample of a mode ``"I"`` image where the file says so: a PNG in mode ``"I"`` is
    16-bit grayscale (older Pillows open those as ``"I"``), a TIFF has ``BitsPerSample``."""
    if img.format == "PNG":
        return 16
    bits = getattr(img, "tag_v2", {}).get(258)  # TIFF BitsPerSample
    if isinstance(bits, tuple) and len(bits) == 1:
        bits = bits[0]
    return bits if isinstance(bits, int) else None


def _to_rgb(img: Image.Image, where: str) -> Image.Image:
    """8-bit RGB. 16-bit grayscale keeps its high byte (``value >> 8``), as Pillow itself
    reduces 16-bit RGB; ``convert("RGB")`` would clip it to 255. Pixels whose scale cannot be
    told (32-bit integers, floats) are refused."""
    if img.mode in SIXTEEN_BIT_MODES or (img.mode == "I" and _bits_per_sample(img) == 16):
        values = np.asarray(img)
        if values.size and (int(values.min()) < 0 or int(values.max()) > 0xFFFF):
            raise DatasetError(
                f"folder: image {where} is 16-bit (mode {img.mode}) but holds values from "
                f"{int(values.min())} to {int(values.max())}, outside 0..65535"
            )
        return Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8)).convert("RGB")
    if img.mode in ("I", "F") or img.mode.startswith(("I;", "F;")):
        kind = "floating-point" if img.mode.startswith("F") else "32-bit integer"
        raise DatasetError(
            f"folder: image {where} has {kind} pixels (Pillow mode {img.mode}), whose range "
            "is unknown; expected 8-bit or 16-bit images (save it as 8- or 16-bit PNG)"
        )
    return img.convert("RGB")


def _decode(source: Path | IO[bytes], size: int, where: str) -> np.ndarray:
    try:
        with Image.open(source) as img:
            rgb = _to_rgb(img, where).resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)  # (3, size, size)
    except (OSError, ValueError, EOFError, Image.DecompressionBombError) as err:
        if isinstance(err, DatasetError):
            raise
        reason = f"{type(err).__name__}: {err}"
        raise DatasetError(f"folder: cannot read image {where} ({reason})") from err


def _decode_dir(tree: DirTree, entries: list[Entry], size: int) -> np.ndarray:
    images = np.empty((len(entries), 3, size, size), dtype=np.uint8)
    for i, (parts, _, _) in enumerate(entries):
        path = tree.root.joinpath(*parts)
        images[i] = _decode(path, size, str(path))
    return images


def _decode_archive(tree: ArchiveTree, entries: list[Entry], size: int) -> np.ndarray:
    images = np.empty((len(entries), 3, size, size), dtype=np.uint8)
    index = {tree.member(parts): i for i, (parts, _, _) in enumerate(entries)}
    for member, data in read_members(tree.listing, index):
        where = f"{'/'.join(member)} in {tree.path}"
        images[index[member]] = _decode(io.BytesIO(data), size, where)
    return images


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as err:
        raise DatasetError(f"folder: cannot read {path} ({type(err).__name__}: {err})") from err
    return digest.hexdigest()


def _dir_key(root: Path, entries: list[Entry]) -> str:
    """Hash of the directory and the name, size, mtime and ctime of each image used."""
    digest = hashlib.sha256(f"{root.resolve()}\0".encode())
    base = str(root)
    for parts, _, _ in entries:
        st = os.stat(os.path.join(base, *parts))
        digest.update(
            f"{'/'.join(parts)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode()
        )
    return digest.hexdigest()


def _decoded(names: list[str], entries: list[Entry], layout: str, images: np.ndarray) -> Decoded:
    labels = np.array([label for _, label, _ in entries], dtype=np.int64)
    splits = np.array([split for _, _, split in entries], dtype=np.int8)
    return Decoded(images, labels, splits, tuple(names), layout)


def _split(entry: Decoded, test_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and test images (a ``PATH/<class>/*`` folder is split here)."""
    if entry.layout == "split":
        n = len(entry.labels)
        n_test = min(max(1, round(n * test_fraction)), n - 1)
        is_test = np.zeros(n, dtype=bool)
        is_test[subsample_indices(entry.labels, n_test, split_seed)] = True
    else:
        is_test = entry.splits == TEST
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _to_float(images: np.ndarray, index: np.ndarray) -> torch.Tensor:
    """``images[index]`` on the [0, 1] scale; a run of consecutive indices is read as a view."""
    run = len(index) > 0 and index[-1] - index[0] == len(index) - 1
    chosen = images[index[0] : index[-1] + 1] if run else images[index]
    return torch.from_numpy(chosen).to(torch.float32).div_(255.0)


def _train_stats(entry: Decoded, split_name: str, x_train: torch.Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std ``(1, 3, 1, 1)`` of ``x_train``; cached ones if for this split."""
    if entry.stats is not None and entry.stats_for == split_name:
        mean, std = (torch.from_numpy(row.copy()).view(1, 3, 1, 1) for row in entry.stats)
        return mean, std
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    if len(x_train) < 2:
        return mean, torch.ones_like(mean)
    return mean, x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)


def load_folder(
    path: str | os.PathLike[str],
    *,
    image_size: int = 32,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> Dataset:
    """Load an image folder or tar archive: x ``(N, 3, image_size, image_size)`` float32.

    ``cache_dir``: where decoded images are cached (default ``default_cache_dir() /
    "folder"``); ``cache=False`` neither reads nor writes it.

    >>> ds = load_folder("path/to/images")  # doctest: +SKIP
    >>> ds.class_names  # doctest: +SKIP
    ('cat', 'dog')
    >>> load_folder("path/to/cifar10-jpeg.tar.gz").x_train.shape  # doctest: +SKIP
    torch.Size([50000, 3, 32, 32])
    """
    root = Path(path).expanduser()
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"folder: image_size must be a positive int, got {image_size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"folder: test_fraction must be in (0, 1), got {test_fraction}")
    split_seed = check_seed(split_seed)
    cache_root = default_cache_dir() / "folder" if cache_dir is None else Path(cache_dir)

    if root.is_dir():
        source = "directory"
        dir_tree = DirTree(root)
        try:
            names, entries, layout = plan_layout(dir_tree, test_fraction)
            key = _dir_key(root, entries)
        except OSError as err:
            reason = f"{type(err).__name__}: {err}"
            raise DatasetError(f"folder: cannot list the images in {root} ({reason})") from err
        ident = hashlib.sha256(str(root.resolve()).encode()).hexdigest()
    elif root.is_file():
        source = "archive"
        key = ident = _sha256_file(root)
    else:
        raise DatasetError(f"folder: {root} is not a directory or a tar archive file")
    kind = "tar" if source == "archive" else "dir"
    where = cache_file(cache_root.expanduser(), kind, ident, image_size) if cache else None
    entry = read_cache(where, key=key, image_size=image_size) if where else None
    hit = entry is not None
    if entry is None:
        if source == "archive":
            tree = ArchiveTree(list_archive(root))
            names, entries, layout = plan_layout(tree, test_fraction)
            images = _decode_archive(tree, entries, image_size)
        else:
            images = _decode_dir(dir_tree, entries, image_size)
        entry = _decoded(names, entries, layout, images)

    train, test = _split(entry, test_fraction, split_seed)
    x_train = _to_float(entry.images, train)
    x_test = _to_float(entry.images, test)
    split_name = entry.layout if entry.layout == "train/test" else f"{test_fraction!r} {split_seed}"
    mean, std = _train_stats(entry, split_name, x_train)
    if not hit and where is not None:
        stats = torch.cat([mean, std]).view(2, 3).numpy()
        write_cache(where, dataclasses.replace(entry, stats=stats, stats_for=split_name), key=key)
    info = {
        "root": str(root),
        "source": source,
        "layout": entry.layout,
        "image_size": image_size,
        "mean": mean.flatten().tolist(),
        "std": std.flatten().tolist(),
        "cache_file": None if where is None else str(where),
        "from_cache": hit,
    }
    if source == "archive":
        info["sha256"] = key
    return Dataset(
        name=f"folder:{root}",
        x_train=x_train.sub_(mean).div_(std),
        y_train=torch.from_numpy(entry.labels[train]),
        x_test=x_test.sub_(mean).div_(std),
        y_test=torch.from_numpy(entry.labels[test]),
        num_classes=len(entry.class_names),
        spatial_rank=2,
        class_names=entry.class_names,
        info=info,
    )
