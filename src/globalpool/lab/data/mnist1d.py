"""MNIST-1D, generated locally by the ``mnist1d`` package with its published default arguments.

Nothing is downloaded: the package's ``make_dataset`` builds the signals from its templates. The
arrays are cached as ``.npz`` (keyed by the generation arguments) so later calls are instant.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dataset import Dataset, default_cache_dir
from .errors import DatasetError

_NOT_GENERATION_ARGS = ("url",)  # where the authors host a pickle; irrelevant to generation


def mnist1d_default_args() -> dict[str, Any]:
    """The package's published default generation arguments (5000 samples, 80/20 split, seed 42).

    >>> mnist1d_default_args()["final_seq_length"]
    40
    """
    try:
        from mnist1d.data import get_dataset_args
    except ImportError as err:  # pragma: no cover - dependency is declared
        raise DatasetError(f"mnist1d: the mnist1d package is not importable ({err})") from err
    return dict(get_dataset_args(as_dict=True))


def _generate(args: Mapping[str, Any]) -> dict[str, np.ndarray]:
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    # make_dataset reseeds NumPy's and Python's global generators; restore the caller's state.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def _valid(arrays: Mapping[str, np.ndarray], length: int) -> bool:
    x, y, xt, yt = (arrays.get(k) for k in ("x", "y", "x_test", "y_test"))
    if any(a is None for a in (x, y, xt, yt)):
        return False
    return (
        x.ndim == 2
        and x.shape[1] == length
        and xt.ndim == 2
        and xt.shape[1] == length
        and y.shape == (x.shape[0],)
        and yt.shape == (xt.shape[0],)
        and len(x) > 0
        and len(xt) > 0
    )


def _read_cache(path: Path, length: int) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError):
        return None
    return arrays if _valid(arrays, length) else None


def _write_cache(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    # Write to a unique temporary file, then rename: concurrent ranks never see a partial file.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"mnist1d: could not cache arrays at {path} ({err})", stacklevel=3)


def load_mnist1d(
    *, cache_dir: str | os.PathLike[str] | None = None, args: Mapping[str, Any] | None = None
) -> Dataset:
    """Load MNIST-1D: x ``(N, 1, 40)`` float32, 10 classes; 4000 train / 1000 test by default.

    ``args`` overrides entries of the published defaults (e.g. ``{"num_samples": 500}`` for a
    quick test); the cache file name carries a hash of the effective arguments.
    ``cache_dir`` defaults to ``default_cache_dir() / "mnist1d"``.

    >>> ds = load_mnist1d()  # doctest: +SKIP
    >>> ds.x_train.shape, ds.num_classes  # doctest: +SKIP
    (torch.Size([4000, 1, 40]), 10)
    """
    effective = mnist1d_default_args()
    unknown = sorted(set(args or {}) - set(effective))
    if unknown:
        raise DatasetError(
            f"mnist1d: unknown generation arguments {unknown}; known: {sorted(effective)}"
        )
    effective.update(args or {})
    key_args = {k: v for k, v in effective.items() if k not in _NOT_GENERATION_ARGS}
    digest = hashlib.sha256(json.dumps(key_args, sort_keys=True).encode()).hexdigest()[:16]
    root = default_cache_dir() / "mnist1d" if cache_dir is None else Path(cache_dir).expanduser()
    path = root / f"mnist1d-{digest}.npz"
    length = int(effective["final_seq_length"])

    arrays = _read_cache(path, length)
    if arrays is None:
        try:
            arrays = _generate(effective)
        except Exception as err:  # the package's own failure, reported on one line
            raise DatasetError(f"mnist1d: generation failed ({type(err).__name__}: {err})") from err
        _write_cache(path, arrays)

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(1),
            torch.from_numpy(np.asarray(y, dtype=np.int64)),
        )

    x_train, y_train = tensors(arrays["x"], arrays["y"])
    x_test, y_test = tensors(arrays["x_test"], arrays["y_test"])
    return Dataset(
        name="mnist1d",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=10,
        spatial_rank=1,
        info={"generation_args": key_args, "cache_file": str(path)},
    )
