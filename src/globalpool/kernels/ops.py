"""``torch.library`` custom ops around the fused kernels: ``globalpool::pool_forward`` and
``globalpool::pool_backward``, with fake (meta) implementations and registered autograd, so
``torch.compile(fullgraph=True)`` and ``torch.export`` see one opaque op per call.

Eager calls skip the custom-op dispatcher: :func:`eager_pool` calls the kernel directly (through
an ``autograd.Function`` when a gradient is needed). The dispatcher's Python layers cost more
than a kernel on a cache-sized tensor, and after a kernel has streamed a large tensor through the
caches each Python step runs cold, so that layer cost a quarter of the forward time on a
(32, 2048, 14, 14) input. Both paths share the context set-up and the backward below.

The op implementations dispatch on the device: CPU tensors run the numba kernels
(:mod:`globalpool.kernels.cpu_numba`), CUDA tensors the Triton kernels
(:mod:`globalpool.kernels.cuda_triton`, imported on first use only).

Saved for backward (nothing else): avg -> mask; max kinds -> x, aux, mask (eager CPU calls keep,
instead of x, only the rows whose maximum is tied: the scatter needs x nowhere else); gem -> x,
out, p, mask; lse -> x, out, mask; attention -> x, mask, weights (its gradients never read the
output). ``p`` is a 0-dim tensor so
that a learnable GeM exponent receives its gradient.

>>> import torch
>>> from globalpool.kernels import ops
>>> x = torch.arange(6.0).reshape(1, 2, 3)
>>> out, aux = torch.ops.globalpool.pool_forward(x, False, "max", None, torch.tensor(3.0),
...                                              1e-6, 1.0, None)
>>> out, aux[..., 0]
(tensor([[2., 5.]]), tensor([[2, 2]], dtype=torch.int32))
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["MAX_KINDS", "eager_pool", "needs_grad", "pool_backward", "pool_forward"]

MAX_KINDS = frozenset({"max", "avgmax", "catavgmax"})


def backend_for(x: Tensor) -> ModuleType:
    """The kernel module for x's device (imported lazily)."""
    if x.is_cpu:  # is_cpu / is_cuda: no device object on the eager hot path
        from globalpool.kernels import cpu_numba

        return cpu_numba
    if x.is_cuda:
        from globalpool.kernels import cuda_triton

        return cuda_triton
    raise ValueError(f"x must be on a cpu or cuda device for the fused kernels, got {x.device}")


def _grad_p_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dims(x: Tensor, channels_last: bool) -> tuple[int, int, int]:
    n, a, b = x.shape
    return (n, b, a) if channels_last else (n, a, b)


# --------------------------------------------------------------------------------------------
# forward


@torch.library.custom_op("globalpool::pool_forward", mutates_args=())
def pool_forward(
    x: Tensor,
    channels_last: bool,
    kind: str,
    mask: Tensor | None,
    p: Tensor,
    eps: float,
    r: float,
    weights: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Fused global pooling of a contiguous 3-D ``x`` ((N, C, L), or (N, L, C) if channels_last).

    Returns ``(out, aux)``: out ``(N, C)`` (``(N, 2C)`` for catavgmax) in x's dtype; aux int32
    ``(N, C, 2)`` (first arg-max, tie count) for the max kinds, else an empty float32 tensor.
    """
    return _forward_impl(x, channels_last, kind, mask, p, eps, r, weights)


def _forward_impl(x, channels_last, kind, mask, p, eps, r, weights) -> tuple[Tensor, Tensor]:
    return backend_for(x).forward(x, channels_last, kind, mask, float(p), eps, r, weights)


@pool_forward.register_fake
def _pool_forward_fake(x, channels_last, kind, mask, p, eps, r, weights):
    n, c, _ = _dims(x, channels_last)
    width = 2 * c if kind == "catavgmax" else c
    out = x.new_empty((n, width))
    if kind in MAX_KINDS:
        aux = x.new_empty((n, c, 2), dtype=torch.int32)
    else:
        aux = x.new_empty((0,), dtype=torch.float32)
    return out, aux


# --------------------------------------------------------------------------------------------
# backward


@torch.library.custom_op("globalpool::pool_backward", mutates_args=())
def pool_backward(
    grad_out: Tensor,
    x: Tensor,
    out: Tensor,
    aux: Tensor,
    channels_last: bool,
    kind: str,
    mask: Tensor | None,
    p: Tensor,
    eps: float,
    r: float,
    weights: Tensor | None,
    need_p: bool,
    need_weights: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the fused pooling: ``(grad_x, grad_p, grad_weights)``.

    grad_p is a 0-dim tensor, float64 for float64 x and float32 otherwise (0 unless kind is
    gem and need_p); grad_weights has the
    weights' shape and dtype when kind is attention and need_weights, else it is empty. For avg,
    ``x`` may be a placeholder (an expanded scalar): its data is never read.
    """
    return _backward_impl(
        grad_out, x, out, aux, channels_last, kind, mask, p, eps, r, weights, need_p, need_weights
    )


def _backward_impl(
    grad_out, x, out, aux, channels_last, kind, mask, p, eps, r, weights, need_p, need_weights,
    tied=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``tied``: the max kinds' saved tied rows standing in for x (eager CPU calls only)."""
    backend = backend_for(x)
    if x.is_cuda and not x.is_contiguous():  # avg placeholder: never read
        x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    kwargs = {}
    if x.is_cpu:
        kwargs = dict(need_p=need_p, need_weights=need_weights, tied=tied)
    gx, gp, gw = backend.backward(
        grad_out,
        x,
        out,
        aux,
        channels_last,
        kind,
        mask,
        float(p),
        float(eps),
        float(r),
        weights,
        **kwargs,
    )
    if gp is None or not need_p:
        gp = torch.zeros((), dtype=_grad_p_dtype(x), device=x.device)
    if gw is None or not need_weights:
        gw = x.new_empty((0,))
    return gx, gp.to(_grad_p_dtype(x)), gw


@pool_backward.register_fake
def _pool_backward_fake(
    grad_out, x, out, aux, channels_last, kind, mask, p, eps, r, weights, need_p, need_weights
):
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    gp = x.new_empty((), dtype=_grad_p_dtype(x))
    if kind == "attention" and need_weights and weights is not None:
        gw = weights.new_empty(weights.shape)
    else:
        gw = x.new_empty((0,))
    return gx, gp, gw


# --------------------------------------------------------------------------------------------
# autograd


def _setup_context(ctx, inputs, output, *, eager: bool = False) -> None:
    x, channels_last, kind, mask, p, eps, r, weights = inputs
    out, aux = output
    ctx.channels_last, ctx.kind, ctx.eps, ctx.r = channels_last, kind, eps, r
    ctx.x_meta = (tuple(x.shape), x.dtype)
    p_is_tensor = isinstance(p, Tensor)
    ctx.p_value = None if p_is_tensor else float(p)
    keep_x = kind != "avg"
    rows = x_rows = None
    if eager and kind in MAX_KINDS and x.is_cpu:
        # the max scatter reads x only at tied maxima: keep just those rows (usually none)
        keep_x = False
        rows, x_rows = backend_for(x).tied_rows(x, aux, channels_last)
    ctx.save_for_backward(
        x if keep_x else None,
        out if kind in ("gem", "lse") else None,
        aux if kind in MAX_KINDS else None,
        mask,
        p if kind == "gem" and p_is_tensor else None,
        weights if kind == "attention" else None,
        rows,
        x_rows,
    )


def _backward_args(ctx, grad_out: Tensor) -> tuple:
    """The backward kernel's arguments, recovered from what :func:`_setup_context` saved."""
    x, out, aux, mask, p, weights = ctx.saved_tensors[:6]
    kind = ctx.kind
    if x is None:  # avg, untied max: x's data is never read, a zero-stride stand-in has its shape
        shape, dtype = ctx.x_meta
        x = grad_out.new_zeros((), dtype=dtype).expand(shape)
    if out is None:
        out = grad_out
    if aux is None:
        aux = grad_out.new_empty((0,), dtype=torch.float32)
    if p is None:
        p = grad_out.new_tensor(3.0 if ctx.p_value is None else ctx.p_value, dtype=torch.float32)
    need_p = kind == "gem" and ctx.needs_input_grad[4]
    need_w = kind == "attention" and ctx.needs_input_grad[7]
    return (grad_out.contiguous(), x, out, aux, ctx.channels_last, kind, mask, p, ctx.eps, ctx.r,
            weights, need_p, need_w)


def _input_grads(args: tuple, gx: Tensor, gp: Tensor, gw: Tensor) -> tuple:
    p, need_p, need_w = args[7], args[11], args[12]
    grad_p = gp.to(p.dtype) if need_p else None
    return gx, None, None, None, grad_p, None, None, (gw if need_w else None)


def _backward(ctx, grad_out: Tensor, grad_aux: Tensor):
    args = _backward_args(ctx, grad_out)
    return _input_grads(args, *torch.ops.globalpool.pool_backward(*args))


torch.library.register_autograd("globalpool::pool_forward", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# eager path (no dispatcher)


class _EagerPool(torch.autograd.Function):
    """The fused pooling for eager autograd: same forward, context and backward as the op."""

    @staticmethod
    def forward(x, channels_last, kind, mask, p, eps, r, weights):
        return _forward_impl(x, channels_last, kind, mask, p, eps, r, weights)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output, eager=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_aux):
        args = _backward_args(ctx, grad_out)
        rows, x_rows = ctx.saved_tensors[6:]
        tied = None if rows is None else (rows, x_rows)
        return _input_grads(args, *_backward_impl(*args, tied=tied))


def needs_grad(x: Tensor, p: float | Tensor, weights: Tensor | None) -> bool:
    """Whether a pooling call must record a graph (grad mode on and an input requires grad)."""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or (isinstance(p, Tensor) and p.requires_grad)
        or (weights is not None and weights.requires_grad)
    )


def eager_pool(
    x: Tensor,
    channels_last: bool,
    kind: str,
    mask: Tensor | None,
    p: float | Tensor,
    eps: float,
    r: float,
    weights: Tensor | None,
) -> Tensor:
    """The pooled output of :func:`pool_forward` without the dispatcher (not for tracing).

    ``p`` may be a float or a 0-dim tensor (a learnable GeM exponent gets its gradient).

    >>> import torch
    >>> x = torch.tensor([[[1.0, 3.0]]], requires_grad=True)
    >>> y = eager_pool(x, False, "max", None, 3.0, 1e-6, 1.0, None)
    >>> y.backward(torch.ones(1, 1)); x.grad
    tensor([[[0., 1.]]])
    """
    if needs_grad(x, p, weights):
        return _EagerPool.apply(x, channels_last, kind, mask, p, eps, r, weights)[0]
    if x.is_cpu:  # no backward will follow: skip the max kinds' arg-max table
        backend = backend_for(x)
        return backend.forward(x, channels_last, kind, mask, float(p), eps, r, weights, False)[0]
    return _forward_impl(x, channels_last, kind, mask, p, eps, r, weights)[0]
