"""digits-shifted: scikit-learn's real 8x8 handwritten digits placed on a larger, empty canvas.

Training digits sit only in the left region of the canvas; the evaluation sets move them:

- ``test``: held-out digits, same distribution as training (left region);
- ``extra_tests["everywhere"]``: held-out digits at uniformly random positions on the canvas;
- ``extra_tests["right"]``: held-out digits only in the right region (never seen in training);
- ``extra_tests["larger-canvas"]``: held-out digits anywhere on a larger canvas.

A position-invariant head (global pooling) should keep its accuracy on the moved sets; a
flatten-FC head, which ties weights to positions, should not, and cannot run on the larger
canvas at all. Rows are always drawn over the full canvas height.
"""

from __future__ import annotations

import numpy as np
import torch

from .dataset import Dataset, check_seed, subsample_indices
from .errors import DatasetError

DIGIT_SIZE = 8


def place(images: np.ndarray, canvas: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Paste ``(n, 8, 8)`` images into zero ``(n, 1, canvas, canvas)`` at top-left ``(rows, cols)``.

    >>> out = place(np.ones((1, 8, 8)), 10, np.array([2]), np.array([1]))
    >>> out.shape, bool(out[0, 0, 2:10, 1:9].all()), float(out.sum())
    ((1, 1, 10, 10), True, 64.0)
    """
    n = len(images)
    out = np.zeros((n, 1, canvas, canvas), dtype=np.float32)
    ii = np.arange(DIGIT_SIZE)
    r = rows[:, None, None] + ii[None, :, None]
    c = cols[:, None, None] + ii[None, None, :]
    out[np.arange(n)[:, None, None], 0, r, c] = images
    return out


def split_indices(
    labels: np.ndarray, test_fraction: float, split_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint, stratified ``(train_idx, test_idx)`` covering every index, both sorted.

    >>> train, test = split_indices(np.arange(8) % 2, 0.25, 0)
    >>> len(train), len(test), sorted(set(train) | set(test)) == list(range(8))
    (6, 2, True)
    """
    n_test = round(len(labels) * test_fraction)
    test_idx = subsample_indices(labels, n_test, split_seed)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def load_digits_shifted(
    *,
    seed: int = 0,
    canvas: int = 24,
    region_width: int = 12,
    large_canvas: int = 32,
    test_fraction: float = 0.25,
    split_seed: int = 0,
) -> Dataset:
    """Build digits-shifted: x ``(N, 1, canvas, canvas)`` float32 in [0, 1], 10 classes.

    ``seed`` draws every placement; ``split_seed`` fixes the stratified, disjoint train/test split
    of the 1797 real digits (so the held-out digits do not change with the run's seed).
    Training columns are drawn from ``[0, region_width - 8]``.

    >>> ds = load_digits_shifted(seed=0)
    >>> ds.x_train.shape[1:], ds.extra_tests["larger-canvas"][0].shape[1:]
    (torch.Size([1, 24, 24]), torch.Size([1, 32, 32]))
    >>> bool(ds.x_train[..., 12:].eq(0).all())
    True
    """
    seed = check_seed(seed)
    split_seed = check_seed(split_seed)
    if canvas < DIGIT_SIZE:
        raise DatasetError(f"digits-shifted: canvas must be >= {DIGIT_SIZE}, got {canvas}")
    if not DIGIT_SIZE <= region_width <= canvas:
        raise DatasetError(
            f"digits-shifted: region_width must be in [{DIGIT_SIZE}, canvas={canvas}], "
            f"got {region_width}"
        )
    if large_canvas < canvas:
        raise DatasetError(
            f"digits-shifted: large_canvas must be >= canvas={canvas}, got {large_canvas}"
        )
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"digits-shifted: test_fraction must be in (0, 1), got {test_fraction}")

    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    digits = load_digits()
    images = (np.asarray(digits.images, dtype=np.float32) / 16.0).clip(0.0, 1.0)
    labels = np.asarray(digits.target, dtype=np.int64)

    train_idx, test_idx = split_indices(labels, test_fraction, split_seed)

    rng = np.random.default_rng(seed)
    span = canvas - DIGIT_SIZE + 1  # number of valid top-left positions along one axis
    left = region_width - DIGIT_SIZE + 1
    right_start = canvas - region_width

    def make(idx: np.ndarray, col_lo: int, col_hi: int, size: int) -> tuple:
        rows = rng.integers(0, size - DIGIT_SIZE + 1, len(idx))
        cols = rng.integers(col_lo, col_hi, len(idx))
        x = torch.from_numpy(place(images[idx], size, rows, cols))
        return x, torch.from_numpy(labels[idx])

    x_train, y_train = make(train_idx, 0, left, canvas)
    x_test, y_test = make(test_idx, 0, left, canvas)
    extra = {
        "everywhere": make(test_idx, 0, span, canvas),
        "right": make(test_idx, right_start, span, canvas),
        "larger-canvas": make(test_idx, 0, large_canvas - DIGIT_SIZE + 1, large_canvas),
    }
    return Dataset(
        name="digits-shifted",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=10,
        spatial_rank=2,
        extra_tests=extra,
        info={
            "canvas": canvas,
            "region_width": region_width,
            "large_canvas": large_canvas,
            "seed": seed,
            "split_seed": split_seed,
            "n_real_train": len(train_idx),
            "n_real_test": len(test_idx),
        },
    )
