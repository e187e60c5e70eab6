"""Fused single-pass global-pooling kernels: numba on CPU, Triton on CUDA.

:func:`supports` tells whether a fused kernel exists for a tensor's device and dtype;
:func:`fused_pool` runs it (differentiable; while tracing, through the ``globalpool::pool_forward``
custom op, which ``torch.compile`` and ``torch.export`` keep as one node).
Both expect arguments already checked by :mod:`globalpool.contract`; ``globalpool.pool(...,
backend="auto"|"fused")`` is the public way in.

The input is handed to the kernel in its *physical* layout: a channels-first tensor stored in
``torch.channels_last`` memory format is pooled as ``(N, L, C)`` without a copy (and a declared
channels-last tensor stored channels-first as ``(N, C, L)``); any other strides are made
contiguous first.

>>> import torch
>>> from globalpool import kernels
>>> x = torch.arange(8.0).reshape(1, 2, 2, 2)
>>> kernels.supports(x, "gem")
True
>>> kernels.fused_pool(x, "avg", "channels_first")
tensor([[1.5000, 5.5000]])
>>> kernels.fused_pool(x, "max", "channels_first", keepdim=True).shape
torch.Size([1, 2, 1, 1])
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import torch

from globalpool.kernels import ops

__all__ = ["fused_pool", "supports"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KINDS = ("avg", "max", "avgmax", "catavgmax", "gem", "lse", "attention")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# looked up once at import (find_spec does not import the package); plain constants keep
# supports() traceable by torch.compile
_HAS_NUMBA = _has("numba")
_HAS_TRITON = _has("triton")


def supports(x: torch.Tensor, kind: str, mask: torch.Tensor | None = None, **params: Any) -> bool:
    """True when a fused kernel exists for ``x``'s device and dtype and for ``kind``.

    CPU needs numba; CUDA needs triton. float16, bfloat16, float32 and float64 are supported.

    >>> import torch
    >>> supports(torch.ones(2, 3, 4), "lse"), supports(torch.ones(2, 3, 4).int(), "avg")
    (True, False)
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES or kind not in _KINDS:
        return False
    if x.ndim not in (3, 4, 5):
        return False
    if x.is_cpu:  # not x.device: building a device object costs ~20 us with cold caches
        return _HAS_NUMBA
    if x.is_cuda:
        return _HAS_TRITON
    return False


def _packed(sizes: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether ``strides`` lay ``sizes`` out densely in this order (size-1 dims: any stride)."""
    expected = 1
    for size, stride in zip(reversed(sizes), reversed(strides), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _physical(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, bool]:
    """x as a contiguous 3-D tensor in its memory order: ((N, C, L), False) or ((N, L, C), True).

    Decided from x's strides (no ``is_contiguous`` probes of permuted views) and taken as a view
    when x is densely stored in either order (the layout's own first); otherwise copied into the
    layout's own order. Never ``as_strided``: its backward materialises a zero tensor of x's whole
    storage and scatters into it (measured: the fused backward fell to 0.2-0.6 of ``fill_``).
    """
    shape, stride = x.shape, x.stride()
    cdim = 1 if layout == "channels_first" else x.ndim - 1
    sdims = range(2, x.ndim) if cdim == 1 else range(1, x.ndim - 1)
    n, c = shape[0], shape[cdim]
    spatial = tuple(shape[d] for d in sdims)
    spatial_strides = tuple(stride[d] for d in sdims)
    length = math.prod(spatial)
    first = _packed((n, c, *spatial), (stride[0], stride[cdim], *spatial_strides))
    last = _packed((n, *spatial, c), (stride[0], *spatial_strides, stride[cdim]))
    own = first if cdim == 1 else last
    if own:  # a view (x.reshape): its gradient is a view too, unlike as_strided's
        return x.reshape((n, c, length) if cdim == 1 else (n, length, c)), cdim != 1
    if last if cdim == 1 else first:  # stored in the other order: a permuted view
        if cdim == 1:
            return x.movedim(1, -1).reshape(n, length, c), True
        return x.movedim(-1, 1).reshape(n, c, length), False
    if layout == "channels_last":
        return x.movedim(cdim, -1).contiguous().reshape(n, length, c), True
    return x.movedim(cdim, 1).contiguous().reshape(n, c, length), False


def _float(v: Any, default: float) -> float:
    if v is None:
        return default
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def fused_pool(
    x: torch.Tensor,
    kind: str,
    layout: str = "channels_first",
    mask: torch.Tensor | None = None,
    keepdim: bool = False,
    **params: Any,
) -> torch.Tensor:
    """Global pooling of ``x`` with the fused kernel; same meaning as ``globalpool.pool``.

    ``params``: ``p`` (float or 0-dim tensor; a tensor that requires grad gets a gradient) and
    ``eps`` for gem, ``r`` for lse, ``weights`` ``(N, *S)`` for attention.

    >>> import torch
    >>> x = torch.tensor([[[1.0, 2.0, 4.0]]])
    >>> fused_pool(x, "gem", p=1.0), fused_pool(x, "catavgmax", "channels_first")
    (tensor([[2.3333]]), tensor([[2.3333, 4.0000]]))
    """
    n = x.shape[0]
    spatial_rank = x.ndim - 2
    x3, channels_last = _physical(x, layout)
    length = x3.shape[2] if not channels_last else x3.shape[1]
    m = None if mask is None else mask.reshape(n, length).contiguous()
    p = params.get("p", 3.0)
    eps = _float(params.get("eps"), 1e-6)
    r = _float(params.get("r"), 1.0)
    w = params.get("weights") if kind == "attention" else None
    if w is not None:  # each skipped no-op call saves a dispatcher round trip (~20 us cold)
        w = (w if w.dtype == x.dtype else w.to(x.dtype)).reshape(n, length)
        w = w if w.is_contiguous() else w.contiguous()
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        if not isinstance(p, torch.Tensor):
            p = torch.tensor(float(p), dtype=torch.float32)
        out, _ = ops.pool_forward(x3, channels_last, kind, m, p, eps, r, w)
    else:
        out = ops.eager_pool(x3, channels_last, kind, m, p, eps, r, w)
    if not keepdim:
        return out
    width = out.shape[1]
    if layout == "channels_first":
        return out.reshape(n, width, *([1] * spatial_rank))
    return out.reshape(n, *([1] * spatial_rank), width)
