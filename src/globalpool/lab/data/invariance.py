"""Extra evaluation sets for image datasets: how a model copes with moved and larger inputs,
and how well it fits its own training data.

- ``shifted``: every test image moved by a random offset of up to ``shift`` pixels in each
  direction (uniform, independently per image and axis), the uncovered border filled with 0
  (the training set's mean colour, since images are standardised; the crop-flip augmentation
  pads with the same 0);
- ``canvas``: every test image placed at a random position on a canvas ``2 * shift`` pixels
  larger in each direction, filled with 0 (a flatten-FC head cannot take it);
- ``train-subset``: up to ``train_subset`` training images (a stratified subset), unaugmented,
  so that train - test accuracy (the generalisation gap) is measured the same way as test
  accuracy.

The offsets come from a generator seeded with ``seed`` (not a run's seed): every run of every
head sees the same moved images.

>>> import torch
>>> from globalpool.lab.data import Dataset
>>> x = torch.ones(6, 3, 8, 8); y = torch.arange(6) % 2
>>> ds = with_invariance_tests(Dataset("toy", x, y, x, y, num_classes=2, spatial_rank=2))
>>> {k: tuple(v[0].shape) for k, v in ds.extra_tests.items()}
{'shifted': (6, 3, 8, 8), 'canvas': (6, 3, 16, 16), 'train-subset': (6, 3, 8, 8)}
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .dataset import Dataset, subsample_indices

#: test-set name -> (label, what the set is), as reports show them
INVARIANCE_LABELS: dict[str, tuple[str, str]] = {
    "shifted": (
        "shifted ±4 px",
        "the test images moved by up to 4 pixels in each direction (zero fill)",
    ),
    "canvas": (
        "canvas +8 px",
        "the test images placed at a random position on a canvas 8 pixels larger in each "
        "direction (40x40 for 32x32 images; zero fill)",
    ),
    "train-subset": (
        "train (no aug)",
        "a fixed stratified subset of the training images, unaugmented, in eval mode",
    ),
}


def shift_images(x: Tensor, offsets: Tensor) -> Tensor:
    """``x (N, C, H, W)`` moved by ``offsets (N, 2)`` = (dy, dx) pixels, zero fill.

    >>> shift_images(torch.arange(1.0, 5.0).view(1, 1, 2, 2), torch.tensor([[1, 0]]))[0, 0]
    tensor([[0., 0.],
            [1., 2.]])
    """
    n, _, h, w = x.shape
    pad = int(offsets.abs().max()) if len(offsets) else 0
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = pad - offsets[:, :1] + torch.arange(h)  # (N, H)
    cols = pad - offsets[:, 1:] + torch.arange(w)  # (N, W)
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


def place_on_canvas(x: Tensor, margin: int, generator: torch.Generator) -> Tensor:
    """``x (N, C, H, W)`` at a random position on a zero ``(H + margin, W + margin)`` canvas."""
    n, c, h, w = x.shape
    canvas = x.new_zeros(n, c, h + margin, w + margin)
    at = torch.randint(0, margin + 1, (n, 2), generator=generator)
    for i in range(n):
        top, left = int(at[i, 0]), int(at[i, 1])
        canvas[i, :, top : top + h, left : left + w] = x[i]
    return canvas


def with_invariance_tests(
    data: Dataset, *, shift: int = 4, train_subset: int = 10_000, seed: int = 0
) -> Dataset:
    """``data`` with the ``shifted``, ``canvas`` and ``train-subset`` sets added (2d images)."""
    if data.spatial_rank != 2:
        raise ValueError(f"invariance tests need 2d images, got {data.spatial_rank}d data")
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(-shift, shift + 1, (len(data.x_test), 2), generator=gen)
    n_train = min(train_subset, len(data.x_train))
    index = torch.from_numpy(subsample_indices(data.y_train, n_train, seed))
    extra = {
        **data.extra_tests,
        "shifted": (shift_images(data.x_test, offsets), data.y_test),
        "canvas": (place_on_canvas(data.x_test, 2 * shift, gen), data.y_test),
        "train-subset": (data.x_train[index], data.y_train[index]),
    }
    return dataclasses.replace(data, extra_tests=extra)
