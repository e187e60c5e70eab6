"""``pool`` and ``adaptive_pool``: the contract, then the fused kernel or the torch composition."""

from __future__ import annotations

import math
from typing import Any

import torch

from globalpool import dispatch, registry
from globalpool import kernels as _kernels
from globalpool.adaptive import adaptive_compose, torch_adaptive, torch_adaptive_applies
from globalpool.contract import (
    adaptive_spec,
    check_keepdim,
    check_kinds,
    kinds_of,
    pool_spec,
)
from globalpool.dispatch import BACKENDS  # noqa: F401  (layers' backend check)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def output_width(kind: str | tuple[str, ...], channels: int) -> int:
    """Number of output features of ``kind`` (or a tuple of kinds) on ``channels`` channels.

    >>> output_width("catavgmax", 512), output_width(("avg", "max", "last"), 512)
    (1024, 1536)
    """
    return sum(registry.spec(k).width for k in kinds_of(check_kinds(kind))) * channels


def pool(
    x: torch.Tensor,
    kind: str = "avg",
    *,
    layout: str = "channels_first",
    keepdim: bool = False,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    **params: Any,
) -> torch.Tensor:
    """Global pooling of ``x`` over all its spatial dims with one of :data:`globalpool.KINDS`.

    Args:
        x: ``(N, C, *S)`` for ``layout="channels_first"`` or ``(N, *S, C)`` for
            ``"channels_last"``, with 1 to 3 spatial dims and a floating dtype; or a jagged
            nested tensor ``(N, j, C)`` of token sequences with ``layout="channels_last"`` and
            no mask (see :func:`globalpool.pool_packed`, which it calls).
        kind: ``avg``, ``max``, ``avgmax``, ``catavgmax``, ``gem`` (``p``, ``eps``),
            ``lse`` (``r``), ``attention`` (``weights`` of shape ``(N, *S)``, non-negative),
            ``sum``, ``first`` or ``last`` (the value at the first / last real position in
            row-major order over the spatial dims: a CLS or last token, right for left and
            right padding alike), ``mean_sqrt_len`` (the sum over real positions / the square
            root of their number) or ``weightedmean`` (the j-th real position in row-major
            order weighs j); or a tuple of distinct kinds, whose outputs are concatenated
            along channels in that order (each takes the parameters it uses; on the fused path
            ``avg``, ``sum``, ``max``, ``avgmax`` and ``catavgmax`` share one read of x).
        layout: declared layout; never guessed from shape or memory format.
        keepdim: keep singleton spatial dims in the layout's own positions.
        mask: bool ``(N, *S)``, True at real positions. Padded positions never reach the output
            or the gradient; a sample with no real position pools to 0.
        backend: ``auto``: on the CPU the fused kernel where one exists and the input has
            >= 64K elements, the torch composition otherwise and for an unmasked ``avg`` or
            ``sum`` that needs no gradient and whose spatial dims are innermost in memory
            (``x.mean`` is as fast there); on a GPU the torch composition, as the GPU kernels
            have not yet been checked on GPU hardware. ``fused``: the kernel, or a ValueError
            saying why none can serve the call; on a GPU it runs the unchecked kernels, with a
            warning the first time. ``torch``: the composition. Whatever the backend,
            ``torch.export``, ONNX export and ``torch.jit.trace`` record the torch composition
            (standard ops only), and ``first`` and ``last`` are one gather (they have no
            kernel); ``sum`` has a kernel on the CPU only. The choice is made once per call
            (``globalpool.dispatch.plan``).

    Returns:
        ``(N, C)`` (``(N, 2C)`` for ``catavgmax``; :func:`output_width` for a tuple), or with
        singleton spatial dims if ``keepdim``; in ``x``'s dtype (half inputs accumulate in
        float32).

    >>> import torch, globalpool as gp
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> gp.pool(x, "avg"), gp.pool(x, "max")
    (tensor([[7.5000]]), tensor([[15.]]))
    >>> gp.pool(x, "catavgmax", keepdim=True).shape
    torch.Size([1, 2, 1, 1])
    >>> tokens = torch.tensor([[[0.0], [1.0], [3.0], [5.0]]])  # (N, L, C), left-padded
    >>> real = torch.tensor([[False, True, True, True]])
    >>> gp.pool(tokens, ("avg", "first", "last"), layout="channels_last", mask=real)
    tensor([[3., 1., 5.]])
    """
    if isinstance(x, torch.Tensor) and x.is_nested:
        return _pool_nested(x, kind, layout, keepdim, mask, backend, params)
    spec = pool_spec(x, kind, layout, mask, params)
    check_keepdim(keepdim)
    if isinstance(spec.kind, tuple):
        return _with_keepdim(_pool_many(x, spec, mask, backend), spec, keepdim)
    return _pool_one(x, spec, mask, keepdim, backend)


def _pool_nested(
    x: torch.Tensor, kind: Any, layout: Any, keepdim: Any, mask: Any, backend: str, params: dict
) -> torch.Tensor:
    """A jagged nested tensor ``(N, j, C)``: its ragged dim is pooled (its lengths are the mask)."""
    from globalpool.packed import pool_nested

    check_keepdim(keepdim)
    if layout != "channels_last":
        raise ValueError(
            f"layout must be 'channels_last' for a nested tensor (N, j, C) of token sequences, "
            f"got {layout!r}"
        )
    if mask is not None:
        raise ValueError(
            "mask must be None for a nested tensor: each sequence's length says which tokens are "
            "real (leave padded tokens out of it)"
        )
    y = pool_nested(x, kind, backend=backend, **params)
    return y.unsqueeze(1) if keepdim else y


def _pool_one(
    x: torch.Tensor, spec: Any, mask: torch.Tensor | None, keepdim: bool, backend: str
) -> torch.Tensor:
    plan = dispatch.plan(backend, x, spec.kind, mask, spec.params, spec.layout)
    if plan.path == "compose":
        return _compose(x, spec, mask, keepdim)
    return _kernels.fused_pool(x, spec.kind, spec.layout, mask, keepdim, plan=plan, **spec.params)


_NO_PARAMS: dict[str, Any] = {}


def _pool_many(
    x: torch.Tensor, spec: Any, mask: torch.Tensor | None, backend: str
) -> torch.Tensor:
    """Several kinds side by side, ``(N, sum of widths)``. Where a kernel serves the shared
    catavgmax pass, the kinds it gives (``kernels.shared_pass``: avg, max, avgmax, catavgmax,
    sum) share one read of x; the others take their own call."""
    done: dict[str, torch.Tensor] = {}
    if len(_kernels.shared_pass(spec.kind)) > 1:
        plan = dispatch.plan(backend, x, "catavgmax", mask, _NO_PARAMS, spec.layout)
        if plan.path != "compose":
            shared = _kernels.shared_pass(spec.kind, plan.path)
            if len(shared) > 1:
                done = _from_avg_max(x, spec, mask, shared, plan)
    parts = []
    for k in spec.kind:
        if k not in done:
            own = {name: spec.params[name] for name in registry.spec(k).defaults}
            # in a tuple, backend="fused" asks for the kernels of the kinds that have one; a
            # kind without (first / last: one gather) runs its composition
            grid = registry.kernels_of(k) - {"packed"}
            b = "torch" if backend == "fused" and not grid else backend
            done[k] = _pool_one(x, spec._replace(kind=k, params=own), mask, False, b)
        parts.append(done[k])
    return torch.cat(parts, dim=1)



def _from_avg_max(
    x: torch.Tensor, spec: Any, mask: torch.Tensor | None, kinds: tuple[str, ...], plan: Any
) -> dict[str, torch.Tensor]:
    """avg, max, avgmax, catavgmax and sum from one fused catavgmax pass (differentiable: the
    kernel's backward gets the gradients of both halves). The pass's output stays in the
    accumulation dtype (float32 for half inputs) until each kind is rounded once: the sum is
    the float32 mean times the count, never a rounded mean times the count."""
    both = _kernels.fused_pool(x, "catavgmax", spec.layout, mask, False, plan=plan, acc=True)
    c = both.shape[1] // 2
    avg, top = both[:, :c], both[:, c:]
    dtype = x.dtype
    out = {"avg": avg.to(dtype), "max": top.to(dtype), "catavgmax": both.to(dtype)}
    if "avgmax" in kinds:
        out["avgmax"] = ((avg + top) / 2).to(dtype)
    if "sum" in kinds:
        if mask is None:  # the number of positions, from the shape (N or C may be 0)
            shape = x.shape[2:] if spec.channel_dim == 1 else x.shape[1:-1]
            count: float | torch.Tensor = float(math.prod(shape))
        else:
            count = mask.flatten(1).sum(1, keepdim=True, dtype=both.dtype)
        out["sum"] = (avg * count).to(dtype)
    return out


def _with_keepdim(y: torch.Tensor, spec: Any, keepdim: bool) -> torch.Tensor:
    """``(N, W)`` with the spatial dims kept as singletons in the layout's positions."""
    if not keepdim:
        return y
    ones = [1] * spec.spatial_rank
    if spec.channel_dim == 1:
        return y.reshape(y.shape[0], y.shape[1], *ones)
    return y.reshape(y.shape[0], *ones, y.shape[1])


def _compose(x: torch.Tensor, spec: Any, mask: torch.Tensor | None, keepdim: bool) -> torch.Tensor:
    """The kind's composition on the canonical view ``(N, C, L)`` (a view of x for dense
    layouts: channels-last is moved, not copied), in the accumulation dtype."""
    acc = x.to(_accumulation_dtype(x.dtype))
    if spec.channel_dim != 1:
        acc = acc.movedim(spec.channel_dim, 1)
    view = acc.flatten(2) if acc.ndim > 3 else acc
    flat_mask = None if mask is None or mask.ndim == 2 else mask.flatten(1)
    y = registry.run_composition(spec.kind, view, mask if flat_mask is None else flat_mask,
                                 spec.params)
    return _with_keepdim(y.to(x.dtype), spec, keepdim)


def adaptive_pool(
    x: torch.Tensor,
    output_size: int | None | tuple[int | None, ...],
    kind: str = "avg",
    *,
    layout: str = "channels_first",
    mask: torch.Tensor | None = None,
    **params: Any,
) -> torch.Tensor:
    """Adaptive pooling to ``output_size`` bins per spatial dim, with any of :data:`KINDS`.

    Bin ``i`` of a dim of size ``In`` covers ``[floor(i*In/Out), ceil((i+1)*In/Out))``, exactly
    PyTorch's bins, so bins may overlap and ``Out`` may exceed ``In``; ``None`` keeps a dim.
    Each bin is pooled as :func:`pool` pools a whole input: ``mask`` (``(N, *S)`` at the input's
    resolution, True = real) and the kind's parameters (``p``, ``eps``, ``r``, ``weights`` of
    shape ``(N, *S)``) mean the same, an empty bin gives 0 with zero gradient, padding never
    reaches the output. Tied maxima share a bin's gradient, as in :func:`pool`. One graph
    serves every input size, so it exports with dynamic shapes (ONNX, ``torch.export``).

    Returns ``(N, C', *output_size)`` or ``(N, *output_size, C')`` for ``channels_last``, where
    ``C'`` is :func:`output_width` (``2C`` for ``catavgmax``); in ``x``'s dtype.

    >>> import torch, globalpool as gp
    >>> x = torch.arange(5.0).reshape(1, 1, 5)
    >>> gp.adaptive_pool(x, 2, "avg")
    tensor([[[1., 3.]]])
    >>> gp.adaptive_pool(x, 2, "avg", mask=torch.tensor([[True, False, False, True, True]]))
    tensor([[[0.0000, 3.5000]]])
    >>> gp.adaptive_pool(torch.rand(2, 7, 5, 8), (3, None), "gem", layout="channels_last").shape
    torch.Size([2, 3, 5, 8])
    """
    sizes, full = adaptive_spec(x, output_size, kind, layout, mask, params)
    kind = check_kinds(kind)
    if isinstance(kind, tuple):  # side by side along channels
        parts = [
            adaptive_pool(x, output_size, k, layout=layout, mask=mask,
                          **{name: full[name] for name in registry.spec(k).defaults})
            for k in kind
        ]
        return torch.cat(parts, dim=1 if layout == "channels_first" else -1)
    if all(s == 1 for s in sizes):  # one bin: global pooling, with its fused kernels
        return pool(x, kind, layout=layout, keepdim=True, mask=mask, **full)
    if mask is None and torch_adaptive_applies(x, kind):
        return torch_adaptive(x, sizes, kind, layout)
    y = adaptive_compose(x.to(_accumulation_dtype(x.dtype)), sizes, kind, layout, mask, full)
    return y.to(x.dtype)
