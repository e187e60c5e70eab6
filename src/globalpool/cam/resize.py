"""Resize maps to the input's resolution and scale them for display.

>>> import torch
>>> maps = torch.tensor([[0.0, 2.0]])
>>> upsample_maps(maps, 4)
tensor([[0.0000, 0.5000, 1.5000, 2.0000]])
>>> normalize_maps(torch.tensor([[1.0, 3.0, 2.0]]))
tensor([[0.0000, 1.0000, 0.5000]])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def check_size(size: Any, rank: int) -> tuple[int, ...]:
    """``size`` as a tuple of ``rank`` positive ints (an int stands for every dim)."""
    sizes = (size,) * rank if isinstance(size, int) and not isinstance(size, bool) else size
    ok = isinstance(sizes, (tuple, list)) and len(sizes) == rank
    if ok:
        ok = all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)
    if not ok:
        raise ValueError(
            f"upsample must be a positive int or {rank} positive ints (the input's spatial size), "
            f"got {size!r}"
        )
    return tuple(sizes)


def upsample_maps(maps: torch.Tensor, size: int | tuple[int, ...]) -> torch.Tensor:
    """Resize maps ``(N, *S)`` to ``(N, *size)`` with (bi/tri)linear interpolation
    (``F.interpolate``, ``align_corners=False``).

    >>> upsample_maps(torch.ones(2, 3, 3), (6, 5)).shape
    torch.Size([2, 6, 5])
    """
    if not isinstance(maps, torch.Tensor) or not 2 <= maps.ndim <= 4:
        got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a (N, *S) tensor with 1 to 3 spatial dims, got {got}")
    rank = maps.ndim - 1
    sizes = check_size(size, rank)
    out = F.interpolate(maps.unsqueeze(1), size=sizes, mode=_MODES[rank], align_corners=False)
    return out.squeeze(1)


def normalize_maps(maps: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scale each map to [0, 1] over its real positions (min -> 0, max -> 1); a constant map
    becomes 0, padded positions are 0 and do not take part in the min or max.

    >>> m = torch.tensor([[5.0, 1.0, 9.0]]); real = torch.tensor([[True, True, False]])
    >>> normalize_maps(m, real)
    tensor([[1., 0., 0.]])
    """
    dims = tuple(range(1, maps.ndim))
    real = torch.ones_like(maps, dtype=torch.bool) if mask is None else mask
    if real.shape != maps.shape:
        raise ValueError(f"mask must have the maps' shape {tuple(maps.shape)}, got {real.shape}")
    low = torch.where(real, maps, torch.inf).amin(dims, keepdim=True)
    high = torch.where(real, maps, -torch.inf).amax(dims, keepdim=True)
    span = high - low
    ok = torch.isfinite(span) & (span > 0)
    scaled = (maps - torch.where(ok, low, 0.0)) / torch.where(ok, span, 1.0)
    return torch.where(real & ok, scaled, 0.0)
