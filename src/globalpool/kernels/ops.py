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
instead of x, only the rows whose maximum is tied: the scatter needs x nowhere else); gem and lse
-> x, mask and, on the CPU, aux (gem's float32 output; lse's row maxima and log-means), on CUDA
the output; attention -> x, mask, weights (its gradients never read
the output); and ``p``, ``eps``, ``r`` where they are tensors, so that each receives its gradient.

Every autograd mode of eager PyTorch works: the kernels give the first-order gradients of x, p
and the weights; a tensor ``eps`` or ``r`` that requires grad gets its gradient from the torch
composition (:mod:`globalpool.compose`) run again inside the backward; and a backward that is
itself recorded (``create_graph=True``: double backward, gradient penalties) is taken entirely
through that composition (or, where x was not kept, through the same formulas in torch ops), so
that it is differentiable again. Forward-mode AD and ``torch.func`` transforms are routed to the
composition by ``globalpool.pool`` (see :func:`unsupported_mode`), and so are ``torch.export``,
ONNX export and ``torch.jit.trace``, so that no deployed graph holds these ops
(``globalpool.functional.deploying``); ``torch.compile`` keeps them.

>>> import torch
>>> from globalpool.kernels import ops
>>> x = torch.arange(6.0).reshape(1, 2, 3)
>>> t = torch.tensor
>>> out, aux = torch.ops.globalpool.pool_forward(x, False, "max", None, t(3.0), t(1e-6), t(1.0),
...                                              None)
>>> out, aux[..., 0]
(tensor([[2., 5.]]), tensor([[2, 2]], dtype=torch.int32))
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from globalpool import registry

__all__ = [
    "MAX_KINDS",
    "eager_pool",
    "needs_grad",
    "pool_backward",
    "pool_forward",
    "unsupported_mode",
]

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
    eps: Tensor,
    r: Tensor,
    weights: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Fused global pooling of a contiguous 3-D ``x`` ((N, C, L), or (N, L, C) if channels_last).

    Returns ``(out, aux)``: out ``(N, C)`` (``(N, 2C)`` for catavgmax) in x's dtype; aux what
    the backward needs besides x (see the backends' ``forward``): int32 ``(N, C, 2)`` (first
    arg-max, tie count) for the max kinds; lse's row maxima and log-means (``(2, N, C)`` on the
    CPU, ``(N, C, 2)`` on CUDA); on the CPU gem's output in float32/float64; else an empty
    float32 tensor.
    """
    return _forward_impl(x, channels_last, kind, mask, p, eps, r, weights)


def _forward_impl(x, channels_last, kind, mask, p, eps, r, weights) -> tuple[Tensor, Tensor]:
    return backend_for(x).forward(
        x, channels_last, kind, mask, float(p), float(eps), float(r), weights
    )


@pool_forward.register_fake
def _pool_forward_fake(x, channels_last, kind, mask, p, eps, r, weights):
    n, c, _ = _dims(x, channels_last)
    width = 2 * c if kind == "catavgmax" else c
    out = x.new_empty((n, width))
    acc = _grad_p_dtype(x)
    if kind in MAX_KINDS:
        aux = x.new_empty((n, c, 2), dtype=torch.int32)
    elif x.device.type == "cpu" and kind == "gem":
        aux = x.new_empty((n, c), dtype=acc)
    elif kind == "lse":  # (max, log-mean) per row: planes on the CPU, pairs on CUDA
        aux = x.new_empty((2, n, c) if x.device.type == "cpu" else (n, c, 2), dtype=acc)
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
    eps: Tensor,
    r: Tensor,
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
    """``tied``: the max kinds' saved tied rows standing in for x (eager CPU calls only).
    ``p``, ``eps``, ``r``: Python floats or 0-dim tensors."""
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

_P, _EPS, _R, _W = 4, 5, 6, 7  # positions of p, eps, r and weights among the op's inputs


def _setup_context(ctx, inputs, output, *, eager: bool = False) -> None:
    x, channels_last, kind, mask, p, eps, r, weights = inputs
    out, aux = output
    ctx.channels_last, ctx.kind = channels_last, kind
    ctx.x_meta = (tuple(x.shape), x.dtype)
    # Python numbers are kept as they are (a float64 GeM exponent stays exact); tensors are saved
    ctx.values = tuple(None if isinstance(v, Tensor) else float(v) for v in (p, eps, r))
    keep_x = kind not in ("avg", "sum")
    rows = x_rows = None
    if eager and kind in MAX_KINDS and x.is_cpu:
        # the max scatter reads x only at tied maxima: keep just those rows (usually none)
        keep_x = False
        rows, x_rows = backend_for(x).tied_rows(x, aux, channels_last)
    ctx.save_for_backward(
        x if keep_x else None,
        out if kind in ("gem", "lse") and not aux.numel() else None,  # the CPU's aux replaces it
        aux if aux.numel() else None,
        mask,
        *(v if isinstance(v, Tensor) else None for v in (p, eps, r)),
        weights if kind == "attention" else None,
        rows,
        x_rows,
    )


def _saved(ctx) -> tuple:
    """(x, out, aux, mask, p, eps, r, weights, rows, x_rows): p, eps and r as saved tensors or
    the Python numbers they were given as."""
    x, out, aux, mask, p, eps, r, weights, rows, x_rows = ctx.saved_tensors
    p, eps, r = (t if v is None else v for t, v in zip((p, eps, r), ctx.values, strict=True))
    return x, out, aux, mask, p, eps, r, weights, rows, x_rows


def _backward_args(ctx, grad_out: Tensor) -> tuple:
    """The backward kernel's arguments, recovered from what :func:`_setup_context` saved."""
    x, out, aux, mask, p, eps, r, weights = _saved(ctx)[:8]
    kind = ctx.kind
    if x is None:  # avg, untied max: x's data is never read, a zero-stride stand-in has its shape
        shape, dtype = ctx.x_meta
        x = grad_out.new_zeros((), dtype=dtype).expand(shape)
    if out is None:
        out = grad_out
    if aux is None:
        aux = grad_out.new_empty((0,), dtype=torch.float32)
    need_p = kind == "gem" and ctx.needs_input_grad[_P]
    need_w = kind == "attention" and ctx.needs_input_grad[_W]
    return (grad_out.contiguous(), x, out, aux, ctx.channels_last, kind, mask, p, eps, r,
            weights, need_p, need_w)


def _input_grads(args: tuple, gx: Tensor, gp: Tensor, gw: Tensor) -> list:
    p, need_p, need_w = args[7], args[11], args[12]
    grad_p = gp.to(p.dtype) if need_p else None
    return [gx, None, None, None, grad_p, None, None, (gw if need_w else None)]


def _backward(ctx, grad_out: Tensor, grad_aux: Tensor):
    args = _backward_args(ctx, grad_out)
    return tuple(_input_grads(args, *torch.ops.globalpool.pool_backward(*args)))


torch.library.register_autograd("globalpool::pool_forward", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# gradients through the torch composition: tensor eps / r, and recorded (double) backward


def _compose3(x, channels_last, kind, mask, p, eps, r, weights) -> Tensor:
    """The torch composition of ``kind`` on the kernels' 3-D ``x``: ``(N, width)``, in the
    accumulation dtype (float32 for half inputs)."""
    acc = x.to(_grad_p_dtype(x)) if x.dtype in (torch.float16, torch.bfloat16) else x
    view = acc.transpose(1, 2) if channels_last else acc
    w = None if weights is None else weights.reshape(x.shape[0], -1)
    given = {"p": p, "eps": eps, "r": r, "weights": w}
    params = {name: given[name] for name in registry.spec(kind).defaults}
    return registry.run_composition(kind, view, mask, params)


def _composed_grads(ctx, grad_out: Tensor, wanted: tuple[int, ...], create_graph: bool) -> list:
    """Gradients of the inputs at positions ``wanted`` through the composition, run again on
    the saved x (``create_graph``: differentiable again)."""
    x, _, _, mask, p, eps, r, weights = _saved(ctx)[:8]
    inputs = [x, None, None, mask, p, eps, r, weights]
    if not create_graph:  # only the parameters' gradients: no graph through x or the rest
        inputs = [v.detach() if isinstance(v, Tensor) else v for v in inputs]
        for i in wanted:
            inputs[i].requires_grad_(True)
    with torch.enable_grad():
        y = _compose3(inputs[0], ctx.channels_last, ctx.kind, *inputs[3:])
        got = torch.autograd.grad(
            y, [inputs[i] for i in wanted], grad_out.to(y.dtype), create_graph=create_graph,
            allow_unused=True,
        )
    grads = [None] * 8
    for i, g in zip(wanted, got, strict=True):
        grads[i] = g if g is not None else torch.zeros_like(inputs[i])
    return grads


def _linear_grad(ctx, g: Tensor) -> Tensor:
    """grad x of avg and the max kinds in torch ops from what the CPU kept (aux, the tied rows),
    not x: linear in ``g``, so a recorded backward differentiates it further (w.r.t. x it is 0
    almost everywhere, as for ``torch.amax``)."""
    _, _, aux, mask, *_, rows, x_rows = _saved(ctx)
    (shape, dtype), kind, cl = ctx.x_meta, ctx.kind, ctx.channels_last
    n, c, length = _dims(torch.empty(shape, device="meta"), cl)
    g = g.reshape(n, -1).to(_grad_p_dtype(g))
    real = torch.ones(n, length, dtype=torch.bool, device=g.device) if mask is None else mask
    count = real.sum(1, keepdim=True).to(g.dtype)
    inv = torch.where(count > 0, 1.0 / count.clamp(min=1), 0.0) if kind != "sum" else 1.0
    grad = torch.zeros(n, c, length, dtype=g.dtype, device=g.device)
    if kind in ("avg", "sum", "avgmax", "catavgmax"):
        scale = 0.5 if kind == "avgmax" else 1.0
        coef = g[:, :c] * inv * scale
        grad = grad + torch.where(real.unsqueeze(1), coef.unsqueeze(2), 0.0)
    if kind in MAX_KINDS:
        g_max = g[:, c:] if kind == "catavgmax" else g * (0.5 if kind == "avgmax" else 1.0)
        idx = aux[..., 0].long()
        g_max = torch.where(idx >= 0, g_max, 0.0)
        scattered = torch.zeros_like(grad).scatter(2, idx.clamp(min=0).unsqueeze(2),
                                                   g_max.unsqueeze(2))
        if rows is not None and len(rows):
            rreal = real[rows // c]
            top = torch.where(rreal, x_rows, -torch.inf).amax(1, keepdim=True)
            hit = rreal & (x_rows == top)
            share = g_max.reshape(-1)[rows] / hit.sum(1)
            tied = torch.where(hit, share.unsqueeze(1), 0.0)
            scattered = scattered.reshape(n * c, length).index_put((rows,), tied)
            scattered = scattered.reshape(n, c, length)
        grad = grad + scattered
    if cl:
        grad = grad.transpose(1, 2)
    return grad.to(dtype)


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
    def backward(ctx, grad_out, grad_aux):
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # the backward is recorded: differentiable all the way
            wanted = tuple(i for i in (0, _P, _EPS, _R, _W) if needs[i])
            if ctx.saved_tensors[0] is None:  # avg, CPU max kinds: no x, and no parameters
                return _linear_grad(ctx, grad_out), *([None] * 7)
            return tuple(_composed_grads(ctx, grad_out, wanted, create_graph=True))
        args = _backward_args(ctx, grad_out)
        rows, x_rows = ctx.saved_tensors[8:]
        tied = None if rows is None else (rows, x_rows)
        grads = _input_grads(args, *_backward_impl(*args, tied=tied))
        extra = tuple(i for i in (_EPS, _R) if needs[i])
        if extra:  # the kernels give no gradient for eps or r
            for i, g in enumerate(_composed_grads(ctx, grad_out, extra, create_graph=False)):
                grads[i] = g if i in extra else grads[i]
        return tuple(grads)


def needs_grad(x: Tensor, *params: float | Tensor | None) -> bool:
    """Whether a pooling call must record a graph (grad mode on and an input requires grad)."""
    return torch.is_grad_enabled() and (
        x.requires_grad or any(isinstance(v, Tensor) and v.requires_grad for v in params)
    )


def unsupported_mode(*tensors: Tensor | float | None) -> str | None:
    """The autograd mode or tracer the fused kernels cannot serve, or None.

    The kernels read memory through NumPy, which functorch's wrapped tensors (``torch.func.grad``,
    ``vmap``, ``jvp``) and forward-mode dual tensors do not have, and a ``torch.jit.trace`` would
    record their result as a constant. ``globalpool.pool(backend="auto")`` takes the torch
    composition there (under a trace whatever the backend: see
    ``globalpool.functional.deploying``); ``backend="fused"`` refuses the other modes.

    >>> import torch
    >>> unsupported_mode(torch.ones(2)) is None
    True
    """
    if torch.jit.is_tracing():
        return "torch.jit.trace"
    for t in tensors:
        if isinstance(t, Tensor):
            if torch._C._functorch.is_functorch_wrapped_tensor(t):
                return "a torch.func transform (grad, vmap, jvp, ...)"
            if _forward_ad._current_level >= 0 and _forward_ad.unpack_dual(t).tangent is not None:
                return "forward-mode AD (a dual tensor)"
    return None


def eager_pool(
    x: Tensor,
    channels_last: bool,
    kind: str,
    mask: Tensor | None,
    p: float | Tensor,
    eps: float | Tensor,
    r: float | Tensor,
    weights: Tensor | None,
) -> Tensor:
    """The pooled output of :func:`pool_forward` without the dispatcher (not for tracing).

    ``p``, ``eps``, ``r`` may be floats or 0-dim tensors (a tensor that requires grad gets its
    gradient).

    >>> import torch
    >>> x = torch.tensor([[[1.0, 3.0]]], requires_grad=True)
    >>> y = eager_pool(x, False, "max", None, 3.0, 1e-6, 1.0, None)
    >>> y.backward(torch.ones(1, 1)); x.grad
    tensor([[[0., 1.]]])
    """
    if needs_grad(x, p, eps, r, weights):
        return _EagerPool.apply(x, channels_last, kind, mask, p, eps, r, weights)[0]
    if x.is_cpu:  # no backward will follow: skip the max kinds' arg-max table
        backend = backend_for(x)
        return backend.forward(
            x, channels_last, kind, mask, float(p), float(eps), float(r), weights, False
        )[0]
    return _forward_impl(x, channels_last, kind, mask, p, eps, r, weights)[0]
