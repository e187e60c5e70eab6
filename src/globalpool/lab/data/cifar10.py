"""CIFAR-10 from the standard python-format files, md5-checked, downloaded when missing.

Layout read: ``DATA_DIR/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (or the
files directly in ``DATA_DIR``). Each batch is a pickle of a dict with ``b"data"`` (uint8
``(N, 3072)``, channel planes R, G, B of 32x32) and ``b"labels"`` (N ints in [0, 10)).

Checks, in order: every file present; each file's md5 against ``MD5SUMS`` in the batches
directory when there is one (the fixture writer makes one), else against the official per-file
table; then each pickle is read with an unpickler that admits only NumPy arrays, and its
shape and type are validated. A download is checked against the official tarball md5.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dataset import Dataset, default_cache_dir
from .errors import DatasetError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_TARBALL_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIRNAME = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
REQUIRED_FILES = (*TRAIN_FILES, TEST_FILE, META_FILE)
CHECKSUM_FILE = "MD5SUMS"
# md5 of the files inside the official tarball.
CIFAR10_FILE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# Per-channel statistics of the 50,000 training images, on the [0, 1] scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch holds (dicts, lists, bytes, NumPy arrays): no code runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file's bytes."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except Exception as err:  # truncated or garbled bytes raise many different types
        raise DatasetError(
            f"cifar10: {path} is truncated or corrupt ({type(err).__name__}: {err}); "
            "delete it to re-download"
        ) from err
    if not isinstance(obj, dict):
        raise DatasetError(f"cifar10: {path} holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if "data" not in batch or "labels" not in batch:
        raise DatasetError(f"cifar10: {path} lacks the b'data' and b'labels' entries")
    data, labels = batch["data"], batch["labels"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
    ):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"cifar10: {path}: data must be uint8 (N, 3072), got {got}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise DatasetError(f"cifar10: {path}: labels are not integers ({err})") from err
    if y.shape != (data.shape[0],):
        raise DatasetError(
            f"cifar10: {path}: {y.shape[0] if y.ndim else 0} labels for {data.shape[0]} images"
        )
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DatasetError(f"cifar10: {path}: labels outside [0, 10)")
    return data.reshape(-1, 3, 32, 32), y


def _read_class_names(path: Path) -> tuple[str, ...]:
    names = _unpickle(path).get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != 10:
        raise DatasetError(f"cifar10: {path} must hold 10 b'label_names'")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _read_checksums(batches: Path) -> dict[str, str]:
    table = batches / CHECKSUM_FILE
    if not table.is_file():
        return dict(CIFAR10_FILE_MD5)
    sums: dict[str, str] = {}
    for line in table.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def verify_checksums(batches: Path) -> None:
    """Raise :class:`DatasetError` naming the first required file whose md5 is wrong."""
    expected = _read_checksums(batches)
    for name in REQUIRED_FILES:
        want = expected.get(name)
        if want is None:
            continue
        got = md5_file(batches / name)
        if got != want:
            raise DatasetError(
                f"cifar10: checksum mismatch for {batches / name}: md5 {got}, expected {want} "
                "(corrupt or not the official file; delete it to re-download)"
            )


def _missing(directory: Path) -> list[str]:
    return [name for name in REQUIRED_FILES if not (directory / name).is_file()]


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def extract_cifar10(tarball: Path, root: Path, *, md5: str | None = CIFAR10_TARBALL_MD5) -> Path:
    """Check ``tarball``'s md5 and extract the required files into ``root/cifar-10-batches-py``.

    Only the seven expected members (and an ``MD5SUMS`` table, if the archive has one) are read
    by name, so the archive cannot write anywhere else.
    """
    if md5 is not None:
        got = md5_file(tarball)
        if got != md5:
            raise DatasetError(
                f"cifar10: checksum mismatch for {tarball}: md5 {got}, expected {md5}; delete it"
            )
    batches = root / CIFAR10_DIRNAME
    try:
        batches.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball, "r:gz") as archive:
            # A checked archive may carry its own checksum table (the test fixture does).
            for name in (*REQUIRED_FILES, CHECKSUM_FILE):
                try:
                    member = archive.getmember(f"{CIFAR10_DIRNAME}/{name}")
                except KeyError:
                    if name == CHECKSUM_FILE:
                        continue
                    raise DatasetError(
                        f"cifar10: {tarball} has no member {CIFAR10_DIRNAME}/{name}"
                    ) from None
                stream = archive.extractfile(member) if member.isfile() else None
                if stream is None:
                    raise DatasetError(f"cifar10: {tarball}: {member.name} is not a regular file")
                _atomic_write(batches / name, stream.read())
    except (tarfile.TarError, EOFError, OSError) as err:
        reason = f"{type(err).__name__}: {err}"
        raise DatasetError(f"cifar10: cannot extract {tarball} ({reason})") from err
    return batches


def download_cifar10(
    root: Path, *, url: str = CIFAR10_URL, md5: str = CIFAR10_TARBALL_MD5, timeout: float = 60.0
) -> Path:
    """Download the tarball into ``root``, check its md5, extract; return the batches directory.

    The tarball is written under a temporary name and renamed only once its md5 is right.
    """
    root.mkdir(parents=True, exist_ok=True)
    target = root / CIFAR10_TARBALL
    fd, tmp_name = tempfile.mkstemp(prefix=CIFAR10_TARBALL, suffix=".part", dir=root)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while block := resp.read(1 << 20):
                out.write(block)
        got = md5_file(tmp)
        if got != md5:
            raise DatasetError(
                f"cifar10: checksum mismatch for the download from {url}: md5 {got}, expected {md5}"
            )
        os.replace(tmp, target)
    except DatasetError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise DatasetError(f"cifar10: download from {url} failed ({reason})") from err
    finally:
        tmp.unlink(missing_ok=True)
    return extract_cifar10(target, root, md5=md5)


# How to allow the download, from the command line (``compare --download``) and from Python.
_DOWNLOAD_HINT = "or pass --download to fetch them (download=True in Python)"


def _locate(root: Path, download: bool) -> Path:
    candidates = [root / CIFAR10_DIRNAME, root]
    for candidate in candidates:
        if not _missing(candidate):
            return candidate
    if (root / CIFAR10_TARBALL).is_file():  # fetched by hand: check it and use it
        return extract_cifar10(root / CIFAR10_TARBALL, root, md5=CIFAR10_TARBALL_MD5)
    # Report the candidate that holds the most files: that is where the user put them.
    best = max(candidates, key=lambda c: len(REQUIRED_FILES) - len(_missing(c)))
    where = (
        f"missing {', '.join(_missing(best))} in {best} (also looked in "
        + ", ".join(str(c) for c in candidates if c != best)
        + ")"
    )
    if not download:
        raise DatasetError(
            f"cifar10: {where}; put the python-format CIFAR-10 files there (or point --data-dir "
            f"at them), {_DOWNLOAD_HINT}"
        )
    try:
        return download_cifar10(root, url=CIFAR10_URL, md5=CIFAR10_TARBALL_MD5)
    except DatasetError as err:
        raise DatasetError(f"{err}; {where}") from err


def load_cifar10(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    verify: bool = True,
    mean: tuple[float, float, float] = CIFAR10_MEAN,
    std: tuple[float, float, float] = CIFAR10_STD,
) -> Dataset:
    """Load CIFAR-10: x ``(N, 3, 32, 32)`` float32 normalised per channel, 10 classes.

    ``data_dir`` defaults to ``default_cache_dir()``. Missing files are downloaded when
    ``download`` is true (md5-checked tarball); ``verify=False`` skips the per-file md5 check
    but never the structural checks of each pickle.

    >>> root = write_cifar10_fixture(tempfile.mkdtemp(), n_train_per_batch=2, n_test=4).parent
    >>> load_cifar10(root, download=False).x_train.shape
    torch.Size([10, 3, 32, 32])
    """
    root = Path(data_dir).expanduser() if data_dir is not None else default_cache_dir()
    if root.exists() and not root.is_dir():
        raise DatasetError(f"cifar10: data dir {root} is not a directory")
    if not root.exists() and not download:
        raise DatasetError(
            f"cifar10: data dir {root} does not exist; point --data-dir at the python-format "
            f"CIFAR-10 files, {_DOWNLOAD_HINT}"
        )
    batches = _locate(root, download)
    if verify:
        verify_checksums(batches)
    train = [_read_batch(batches / name) for name in TRAIN_FILES]
    x_test, y_test = _read_batch(batches / TEST_FILE)
    class_names = _read_class_names(batches / META_FILE)

    def normalise(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x).to(torch.float32).div_(255.0)
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        return t.sub_(m).div_(s)

    return Dataset(
        name="cifar10",
        x_train=normalise(np.concatenate([x for x, _ in train])),
        y_train=torch.from_numpy(np.concatenate([y for _, y in train])),
        x_test=normalise(x_test),
        y_test=torch.from_numpy(y_test),
        num_classes=10,
        spatial_rank=2,
        class_names=class_names,
        info={"data_dir": str(batches), "mean": tuple(mean), "std": tuple(std)},
    )


def _pickle_bytes(obj: Mapping[bytes, Any]) -> bytes:
    buf = io.BytesIO()
    pickle.dump(dict(obj), buf, protocol=2)
    return buf.getvalue()


def write_cifar10_fixture(
    directory: str | os.PathLike[str],
    *,
    n_train_per_batch: int = 10,
    n_test: int = 20,
    seed: int = 0,
) -> Path:
    """Write a tiny CIFAR-10 in exactly the standard python format; return the batches directory.

    Files go to ``directory/cifar-10-batches-py/`` with an ``MD5SUMS`` table of their own md5s
    (so the checksum path is exercised). Labels cycle through the 10 classes; pixels are random.

    >>> batches = write_cifar10_fixture(tempfile.mkdtemp(), n_train_per_batch=2, n_test=4)
    >>> sorted(p.name for p in batches.iterdir())[:2]
    ['MD5SUMS', 'batches.meta']
    """
    rng = np.random.default_rng(seed)
    batches = Path(directory) / CIFAR10_DIRNAME
    batches.mkdir(parents=True, exist_ok=True)

    def batch(label: str, n: int, offset: int) -> bytes:
        labels = [(offset + i) % 10 for i in range(n)]
        return _pickle_bytes(
            {
                b"batch_label": label.encode(),
                b"labels": labels,
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"filenames": [f"fixture_{offset + i:05d}.png".encode() for i in range(n)],
            }
        )

    contents = {
        name: batch(f"training batch {i + 1} of 5", n_train_per_batch, i * n_train_per_batch)
        for i, name in enumerate(TRAIN_FILES)
    }
    contents[TEST_FILE] = batch("testing batch 1 of 1", n_test, 0)
    contents[META_FILE] = _pickle_bytes(
        {
            b"num_cases_per_batch": n_train_per_batch,
            b"label_names": [n.encode() for n in CIFAR10_CLASSES],
            b"num_vis": 3072,
        }
    )
    for name, data in contents.items():
        (batches / name).write_bytes(data)
    sums = "".join(f"{hashlib.md5(d).hexdigest()}  {n}\n" for n, d in contents.items())
    (batches / CHECKSUM_FILE).write_text(sums)
    return batches
