"""The common result type of every loader, deterministic subsampling and the cache location."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import DatasetError


def default_cache_dir() -> Path:
    """Directory for generated or downloaded data.

    ``$GLOBALPOOL_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/globalpool``, else
    ``~/.cache/globalpool``. Nothing is created here until a loader needs it.

    >>> isinstance(default_cache_dir(), Path)
    True
    """
    explicit = os.environ.get("GLOBALPOOL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "globalpool"


def check_seed(seed: Any) -> int:
    """Return ``seed`` if it is a non-negative int, else raise :class:`DatasetError`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def subsample_indices(labels: np.ndarray | Tensor, n: int, seed: int = 0) -> np.ndarray:
    """Pick ``n`` indices, stratified by label, deterministic in ``seed``; returned sorted.

    Each class keeps close to its share of the whole, and the subsets are nested: for one seed
    the indices chosen for a smaller ``n`` are contained in those for a larger ``n``, so a
    training-set-size sweep adds data rather than swapping it.

    >>> y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    >>> idx = subsample_indices(y, 4, seed=0)
    >>> len(idx), sorted(np.bincount(y[idx]).tolist())
    (4, [2, 2])
    >>> set(subsample_indices(y, 2, seed=0)) <= set(idx)
    True
    """
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).astype(np.int64)
    total = len(y)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= total:
        raise DatasetError(f"train_size must be an int in [1, {total}], got {n!r}")
    seed = check_seed(seed)
    perm = np.random.default_rng(seed).permutation(total)
    y_perm = y[perm]
    # Rank of each sample within its class, in permuted order.
    order = np.argsort(y_perm, kind="stable")
    sorted_labels = y_perm[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(total, dtype=np.int64)
    rank[order] = np.arange(total) - starts
    counts = np.bincount(y_perm)
    # A sample's key is how far into its own class it sits; the n smallest keys are taken.
    key = (rank + 0.5) / counts[y_perm]
    chosen = perm[np.lexsort((np.arange(total), key))[:n]]
    return np.sort(chosen)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Tensors of one classification dataset, channels-first.

    ``x_*`` are float32 ``(N, C, *S)`` with ``len(S) == spatial_rank``; ``y_*`` are int64 ``(N,)``
    in ``[0, num_classes)``. ``extra_tests`` maps a name to further ``(x, y)`` evaluation sets
    (their spatial size may differ from the training set's, e.g. a larger canvas).
    ``info`` holds loader-specific facts (generation arguments, normalisation, source path).

    >>> x = torch.zeros(4, 1, 8); y = torch.tensor([0, 1, 0, 1])
    >>> ds = Dataset("toy", x, y, x, y, num_classes=2, spatial_rank=1)
    >>> ds.input_shape, ds.in_channels, list(ds.test_sets())
    ((1, 8), 1, ['test'])
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    spatial_rank: int
    extra_tests: Mapping[str, tuple[Tensor, Tensor]] = dataclasses.field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.class_names:
            object.__setattr__(self, "class_names", tuple(str(i) for i in range(self.num_classes)))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "extra_tests", dict(self.extra_tests))
        object.__setattr__(self, "info", dict(self.info))
        if len(self.class_names) != self.num_classes:
            raise DatasetError(
                f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes"
            )
        channels = self.x_train.shape[1] if self.x_train.dim() >= 2 else None
        sets = {"train": (self.x_train, self.y_train), "test": (self.x_test, self.y_test)}
        sets.update(self.extra_tests)
        for split, (x, y) in sets.items():
            self._check_split(split, x, y, channels)

    def _check_split(self, split: str, x: Tensor, y: Tensor, channels: int | None) -> None:
        where = f"{self.name} {split} set"
        if x.dtype != torch.float32 or x.dim() != 2 + self.spatial_rank:
            raise DatasetError(
                f"{where}: x must be float32 (N, C, *S) with {self.spatial_rank} spatial dims, "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        if y.dtype != torch.int64 or y.shape != (x.shape[0],):
            raise DatasetError(
                f"{where}: y must be int64 of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}"
            )
        if x.shape[1] != channels:
            raise DatasetError(f"{where}: {x.shape[1]} channels, training set has {channels}")
        if x.shape[0] == 0:
            raise DatasetError(f"{where} is empty")
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise DatasetError(f"{where}: labels outside [0, {self.num_classes})")

    @property
    def in_channels(self) -> int:
        """Number of input channels C."""
        return int(self.x_train.shape[1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one training sample, ``(C, *S)``."""
        return tuple(int(s) for s in self.x_train.shape[1:])

    @property
    def train_size(self) -> int:
        """Number of training samples."""
        return int(self.x_train.shape[0])

    def test_sets(self) -> dict[str, tuple[Tensor, Tensor]]:
        """All evaluation sets: ``{"test": (x_test, y_test), **extra_tests}``."""
        return {"test": (self.x_test, self.y_test), **self.extra_tests}

    def subsample_train(self, train_size: int, seed: int = 0) -> Dataset:
        """A copy whose training set is a stratified, nested subset (see `subsample_indices`)."""
        idx = torch.from_numpy(subsample_indices(self.y_train, train_size, seed))
        info = {**self.info, "train_size": int(train_size), "subsample_seed": int(seed)}
        return dataclasses.replace(
            self, x_train=self.x_train[idx], y_train=self.y_train[idx], info=info
        )
