"""The autograd of the fused kernels: one ``torch.autograd.Function`` (:class:`FusedPool`) for
every kernel, grid (numba on the CPU, Triton on CUDA) and packed alike, and the ``torch.library``
custom ops ``globalpool::pool_forward`` / ``globalpool::pool_backward`` (fake implementations,
registered autograd) that ``torch.compile(fullgraph=True)`` and ``torch.export`` see as one
opaque node per call.

Eager calls skip the custom-op dispatcher: :func:`grid_pool` applies :class:`FusedPool` and
:func:`forward_only` calls the kernel's forward alone when no gradient will be taken. The
dispatcher's Python layers cost more than a kernel on a cache-sized tensor, and after a kernel has
streamed a large tensor through the caches each Python step runs cold, so that layer cost a
quarter of the forward time on a (32, 2048, 14, 14) input. Which of the three ways runs is the
plan's ``mode`` (:mod:`globalpool.dispatch`); nothing here decides it again.

The op implementations dispatch on the device: CPU tensors run the numba kernels
(:mod:`globalpool.kernels.cpu_numba`), CUDA tensors the Triton kernels
(:mod:`globalpool.kernels.cuda_triton`, imported on first use only).

Saved for backward (nothing else): avg, sum -> mask; max kinds -> x (CUDA), aux, mask (CPU calls
keep, instead of x, only the rows whose maximum is tied: the scatter needs x nowhere else), and
the rows whose maximum is NaN where there are any; gem and lse -> x, mask and, on the CPU, aux
(gem's float32 output; lse's row maxima and log-means), on CUDA the output; attention -> x, mask,
weights (its gradients never read the output); and ``p``, ``eps``, ``r`` where they are tensors,
so that each receives its gradient. :class:`FusedPool` unpacks them once per backward, so
activation checkpointing (``torch.utils.checkpoint(..., use_reentrant=False)``) recomputes them.

Every autograd mode of eager PyTorch works: the kernels give the first-order gradients of x, p
and the weights; a tensor ``eps`` or ``r`` that requires grad gets its gradient from the torch
composition (:mod:`globalpool.compose`) run again inside the backward; a backward that is itself
recorded (``create_graph=True``: double backward, gradient penalties) and a batch of
``grad_outputs`` (``torch.autograd.grad(..., is_grads_batched=True)``, vectorized jacobians) are
taken entirely through torch ops: that composition (or, where x was not kept, the same formulas
from what was kept), so that they are differentiable again and batch. Forward-mode AD and
``torch.func`` transforms are routed to the composition by the plan, and so are ``torch.export``,
ONNX export and ``torch.jit.trace``, so that no deployed graph holds these ops; ``torch.compile``
keeps them.

A row (sample, channel) whose maximum is NaN (a NaN at a real position) gets NaN gradient at
every real position of the row from the max kinds, whatever the incoming gradient, as
``torch.amax``'s gradient gives in the torch composition and as ``globalpool.reference`` defines;
padded positions keep 0.

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
from typing import NamedTuple

import torch
from torch import Tensor

from globalpool import registry
from globalpool.kernels.plan import warn_unverified

__all__ = [
    "MAX_KINDS",
    "FusedPool",
    "GridKernel",
    "compose3",
    "forward_only",
    "grid_pool",
    "pool_backward",
    "pool_forward",
]

MAX_KINDS = frozenset({"max", "avgmax", "catavgmax"})


def backend_for(x: Tensor) -> ModuleType:
    """The kernel module for x's device (imported lazily)."""
    if x.is_cpu:  # is_cpu / is_cuda: no device object on the eager hot path
        from globalpool.kernels import cpu_numba

        return cpu_numba
    if x.is_cuda:
        from globalpool.kernels import cuda_triton

        warn_unverified()  # once per process, until the kernels have run on a GPU
        return cuda_triton
    raise ValueError(f"x must be on a cpu or cuda device for the fused kernels, got {x.device}")


def _grad_p_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dims(shape: tuple[int, ...], channels_last: bool) -> tuple[int, int, int]:
    n, a, b = shape
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
    acc: bool = False,
) -> tuple[Tensor, Tensor]:
    """Fused global pooling of a contiguous 3-D ``x`` ((N, C, L), or (N, L, C) if channels_last).

    Returns ``(out, aux)``: out ``(N, C)`` (``(N, 2C)`` for catavgmax) in x's dtype (``acc``: in
    the accumulation dtype, float32 for half inputs); aux what the backward needs besides x (see
    the backends' ``forward``): int32 ``(N, C, 2)`` (first arg-max, tie count) for the max kinds;
    lse's row maxima and log-means (``(2, N, C)`` on the CPU, ``(N, C, 2)`` on CUDA); on the CPU
    gem's output in float32/float64; else an empty float32 tensor.
    """
    return _forward_impl(x, channels_last, kind, mask, p, eps, r, weights, acc)


def _forward_impl(x, channels_last, kind, mask, p, eps, r, weights, acc=False):
    return backend_for(x).forward(
        x, channels_last, kind, mask, float(p), float(eps), float(r), weights, acc_out=acc
    )


@pool_forward.register_fake
def _pool_forward_fake(x, channels_last, kind, mask, p, eps, r, weights, acc=False):
    n, c, _ = _dims(x.shape, channels_last)
    width = 2 * c if kind == "catavgmax" else c
    out = x.new_empty((n, width), dtype=_grad_p_dtype(x) if acc else x.dtype)
    accd = _grad_p_dtype(x)
    if kind in MAX_KINDS:
        aux = x.new_empty((n, c, 2), dtype=torch.int32)
    elif x.device.type == "cpu" and kind == "gem":
        aux = x.new_empty((n, c), dtype=accd)
    elif kind == "lse":  # (max, log-mean) per row: planes on the CPU, pairs on CUDA
        aux = x.new_empty((2, n, c) if x.device.type == "cpu" else (n, c, 2), dtype=accd)
    else:
        aux = x.new_empty((0,), dtype=torch.float32)
    return out, aux


def forward_only(
    x: Tensor,
    channels_last: bool,
    kind: str,
    mask: Tensor | None,
    p: float | Tensor,
    eps: float | Tensor,
    r: float | Tensor,
    weights: Tensor | None,
    acc: bool = False,
    *,
    view: tuple | None = None,
) -> Tensor:
    """The pooled output when no gradient will be taken (the max kinds skip their arg-max table
    on the CPU). ``view``: CPU only, x given in its N-D shape with its 3-D form's
    ``(perm, shape3)`` (see ``cpu_numba.forward``)."""
    if x.is_cpu:
        from globalpool.kernels import cpu_numba

        return cpu_numba.forward(
            x, channels_last, kind, mask, float(p), float(eps), float(r), weights, False,
            view=view, acc_out=acc,
        )[0]
    return _forward_impl(x, channels_last, kind, mask, p, eps, r, weights, acc)[0]


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
    ``x`` may be a placeholder (an expanded scalar): its data is never read. For the max kinds
    ``out`` is the forward's output: rows whose maximum is NaN get NaN gradient (see the module
    docstring).
    """
    gx, gp, gw = _backward_impl(
        grad_out, x, out, aux, channels_last, kind, mask, p, eps, r, weights, need_p, need_weights
    )
    if kind in MAX_KINDS and out.shape[0] == x.shape[0] and out.numel():
        nan = _nan_rows(x, out, mask, channels_last, kind)
        if nan is not None:
            gx = _fill_nan(gx, nan, mask, channels_last)
    return gx, gp, gw


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
# rows whose maximum is NaN


def _nan_rows(x: Tensor, out: Tensor, mask: Tensor | None, channels_last: bool,
              kind: str) -> Tensor | None:
    """``(N, C)`` bool: the rows of a max kind whose maximum is NaN (a NaN at a real position),
    or None when there are none (the usual case: one ``isnan`` of the output)."""
    c = x.shape[2] if channels_last else x.shape[1]
    top = out[:, c:] if kind == "catavgmax" else out
    rows = torch.isnan(top)
    if not bool(rows.any()):
        return None
    if kind == "avgmax":  # inf - inf in the average is NaN too: only a NaN in x counts
        real = torch.isnan(x)
        if mask is not None:
            real = real & (mask.unsqueeze(2) if channels_last else mask.unsqueeze(1))
        rows = rows & real.any(1 if channels_last else 2)
        if not bool(rows.any()):
            return None
    return rows


def _fill_nan(grad: Tensor, rows: Tensor, mask: Tensor | None, channels_last: bool) -> Tensor:
    """``grad`` (x's 3-D form) with NaN at every real position of ``rows`` (out of place)."""
    at = rows.unsqueeze(2)  # (N, C, 1)
    if mask is not None:
        at = at & mask.unsqueeze(1)
    if channels_last:
        at = at.transpose(1, 2)
    return torch.where(at, torch.nan, grad)


# --------------------------------------------------------------------------------------------
# the torch composition on the kernels' 3-D form


def compose3(x, channels_last, kind, mask, p, eps, r, weights) -> Tensor:
    """The torch composition of ``kind`` on a 3-D ``x`` ((N, C, L), or (N, L, C) if
    channels_last) with mask and weights ``(N, L)``: ``(N, width)``, in the accumulation dtype
    (float32 for half inputs). ``p`` / ``r`` may be per channel."""
    acc = x.to(_grad_p_dtype(x)) if x.dtype in (torch.float16, torch.bfloat16) else x
    view = acc.transpose(1, 2) if channels_last else acc
    w = None if weights is None else weights.reshape(x.shape[0], -1)
    given = {"p": p, "eps": eps, "r": r, "weights": w}
    params = {name: given[name] for name in registry.spec(kind).defaults}
    return registry.run_composition(kind, view, mask, params)


# --------------------------------------------------------------------------------------------
# one autograd Function for every kernel

# positions of FusedPool's inputs: (run, x, index, p, eps, r, weights)
_X, _INDEX, _P, _EPS, _R, _W = 1, 2, 3, 4, 5, 6


def _batched(g: Tensor) -> bool:
    """A batch of gradients (``is_grads_batched``; vectorized jacobians): a batched tensor that
    has no memory of its own for the kernels to read."""
    f = torch._C._functorch
    return f.is_legacy_batchedtensor(g) or f.is_functorch_wrapped_tensor(g)


class FusedPool(torch.autograd.Function):
    """Every fused kernel's eager autograd, grid and packed alike.

    ``FusedPool.apply(run, x, index, p, eps, r, weights)``: ``run`` is the kernel's executor
    (:class:`GridKernel`, or ``globalpool.packed.PackedKernel``), ``index`` the mask ``(N, L)``
    (grid) or ``cu_seqlens`` (packed), ``p``, ``eps``, ``r`` floats or 0-dim tensors. The
    executor runs the kernels and says what to keep; this class decides only how the backward is
    taken: the backward kernel (plus the composition for a tensor eps or r), or torch ops alone
    for a recorded backward and batched gradients. The saved tensors are unpacked exactly once.
    """

    @staticmethod
    def forward(ctx, run, x, index, p, eps, r, weights):
        out, kept, state = run.forward(x, index, p, eps, r, weights)
        ctx.run, ctx.state = run, state
        ctx.values = tuple(None if isinstance(v, Tensor) else float(v) for v in (p, eps, r))
        # kept: (x or None, weights or None, NaN rows or None, *the executor's own)
        ctx.save_for_backward(index, *(v if isinstance(v, Tensor) else None for v in (p, eps, r)),
                              *kept)
        return out

    @staticmethod
    def backward(ctx, g):
        index, p_t, eps_t, r_t, x, weights, nan, *extra = ctx.saved_tensors  # the one unpack
        p, eps, r = (t if v is None else v for t, v in zip((p_t, eps_t, r_t), ctx.values,
                                                            strict=True))
        run, needs = ctx.run, ctx.needs_input_grad
        inputs = (x, index, p, eps, r, weights)
        recorded = torch.is_grad_enabled()
        if recorded or _batched(g):  # torch ops only: differentiable again, and batched
            if x is None:  # kinds whose gradient needs no x (and that have no parameters)
                gx = run.linear_grad(g, index, nan, extra, ctx.state) if needs[_X] else None
                return None, gx, None, None, None, None, None
            wanted = tuple(i for i in (_X, _P, _EPS, _R, _W) if needs[i])
            return tuple(_composed_grads(run, inputs, g, wanted, create_graph=recorded))
        grads: list[Tensor | None] = [None] * 7
        gx, grads[_P], grads[_W] = run.backward(
            g, inputs, extra, ctx.state, needs[_P], needs[_W]
        )
        if needs[_X]:
            grads[_X] = gx if nan is None else run.fill_nan(gx, nan, index)
        others = tuple(i for i in (_EPS, _R) if needs[i])
        if others:  # the kernels give no gradient for eps or r
            composed = _composed_grads(run, inputs, g, others, create_graph=False)
            for i in others:
                grads[i] = composed[i]
        return tuple(grads)


def _composed_grads(run, inputs: tuple, g: Tensor, wanted: tuple[int, ...],
                    create_graph: bool) -> list:
    """Gradients of the inputs at positions ``wanted`` through the executor's torch composition,
    run again on the saved inputs (``create_graph``: differentiable again)."""
    inputs = list(inputs)
    if not create_graph:  # no graph through x or the rest beyond what is asked
        inputs = [v.detach() if isinstance(v, Tensor) else v for v in inputs]
        for i in wanted:
            inputs[i - 1].requires_grad_(True)
    with torch.enable_grad():
        y = run.compose(*inputs)
        got = torch.autograd.grad(
            y, [inputs[i - 1] for i in wanted], g.to(y.dtype), create_graph=create_graph,
            allow_unused=True,
        )
    grads: list[Tensor | None] = [None] * 7
    for i, gi in zip(wanted, got, strict=True):
        grads[i] = gi if gi is not None else torch.zeros_like(inputs[i - 1])
    return grads


class GridKernel(NamedTuple):
    """The executor of the grid kernels (``(N, C, L)`` / ``(N, L, C)``, CPU or CUDA) for
    :class:`FusedPool`; ``acc``: the output in the accumulation dtype."""

    kind: str
    channels_last: bool
    acc: bool = False

    def forward(self, x, mask, p, eps, r, weights):
        kind, cl = self.kind, self.channels_last
        out, aux = _forward_impl(x, cl, kind, mask, p, eps, r, weights, self.acc)
        keep_x = kind not in ("avg", "sum")
        rows = x_rows = None
        nan = None
        if kind in MAX_KINDS:
            nan = _nan_rows(x, out, mask, cl, kind)
            if x.is_cpu:  # the max scatter reads x only at tied maxima: keep just those rows
                keep_x = False
                rows, x_rows = backend_for(x).tied_rows(x, aux, cl)
        kept = (
            x if keep_x else None,
            weights if kind == "attention" else None,
            nan,
            out if kind in ("gem", "lse") and not aux.numel() else None,  # the CPU's aux instead
            aux if aux.numel() else None,
            rows,
            x_rows,
        )
        return out, kept, (tuple(x.shape), x.dtype)

    def backward(self, g, inputs, extra, state, need_p, need_w):
        x, mask, p, eps, r, weights = inputs
        out, aux, rows, x_rows = extra
        kind = self.kind
        if x is None:  # avg, CPU max kinds: x's data is never read, a zero-stride stand-in
            shape, dtype = state
            x = g.new_zeros((), dtype=dtype).expand(shape)
        need_p = need_p and kind == "gem"
        need_w = need_w and kind == "attention"
        gx, gp, gw = _backward_impl(
            g.contiguous(), x, g if out is None else out,
            g.new_empty((0,), dtype=torch.float32) if aux is None else aux,
            self.channels_last, kind, mask, p, eps, r, weights, need_p, need_w,
            tied=None if rows is None else (rows, x_rows),
        )
        return gx, (gp.to(p.dtype) if need_p else None), (gw if need_w else None)

    def compose(self, x, mask, p, eps, r, weights):
        return compose3(x, self.channels_last, self.kind, mask, p, eps, r, weights)

    def fill_nan(self, grad, rows, mask):
        return _fill_nan(grad, rows, mask, self.channels_last)

    def linear_grad(self, g, mask, nan, extra, state):
        """grad x of avg, sum and the CPU max kinds in torch ops from what was kept (aux, the
        tied rows), not x: linear in ``g``, so a recorded backward differentiates it further
        (w.r.t. x it is 0 almost everywhere, as for ``torch.amax``) and batched ``g`` work."""
        _, aux, rows, x_rows = extra
        (shape, dtype), kind = state, self.kind
        n, c, length = _dims(shape, self.channels_last)
        g = g.reshape(n, -1).to(torch.float64 if dtype == torch.float64 else torch.float32)
        real = torch.ones(n, length, dtype=torch.bool, device=g.device) if mask is None else mask
        count = real.sum(1, keepdim=True).to(g.dtype)
        inv = torch.where(count > 0, 1.0 / count.clamp(min=1), 0.0) if kind != "sum" else 1.0
        grad = torch.zeros(n, c, length, dtype=g.dtype, device=g.device)
        if kind in ("avg", "sum", "avgmax", "catavgmax"):
            scale = 0.5 if kind == "avgmax" else 1.0
            coef = (g if kind != "catavgmax" else g[:, :c]) * inv * scale  # no alias: batched g
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
        if nan is not None:
            grad = _fill_nan(grad, nan, mask, False)
        if self.channels_last:
            grad = grad.transpose(1, 2)
        return grad.to(dtype)


def grid_pool(
    x: Tensor,
    channels_last: bool,
    kind: str,
    mask: Tensor | None,
    p: float | Tensor,
    eps: float | Tensor,
    r: float | Tensor,
    weights: Tensor | None,
    acc: bool = False,
) -> Tensor:
    """The grid kernel on a contiguous 3-D ``x`` through :class:`FusedPool` (not for graphs:
    see :func:`pool_forward`).

    >>> import torch
    >>> x = torch.tensor([[[1.0, 3.0]]], requires_grad=True)
    >>> y = grid_pool(x, False, "max", None, 3.0, 1e-6, 1.0, None)
    >>> y.backward(torch.ones(1, 1)); x.grad
    tensor([[[0., 1.]]])
    """
    return FusedPool.apply(GridKernel(kind, channels_last, acc), x, mask, p, eps, r, weights)


# --------------------------------------------------------------------------------------------
# the custom op's autograd (graphs: torch.compile)

_OP_P, _OP_W = 4, 7  # positions of p and the weights among pool_forward's inputs


def _op_setup_context(ctx, inputs, output) -> None:
    x, channels_last, kind, mask, p, eps, r, weights, acc = inputs
    out, aux = output
    ctx.channels_last, ctx.kind = channels_last, kind
    ctx.x_meta = (tuple(x.shape), x.dtype)
    keep_out = kind in MAX_KINDS or (kind in ("gem", "lse") and not aux.numel())
    ctx.save_for_backward(
        x if kind not in ("avg", "sum") else None,
        out if keep_out else None,  # the max kinds: for the rows whose maximum is NaN
        aux if aux.numel() else None,
        mask,
        p,
        eps,
        r,
        weights if kind == "attention" else None,
    )


def _op_backward(ctx, grad_out: Tensor, grad_aux: Tensor):
    x, out, aux, mask, p, eps, r, weights = ctx.saved_tensors  # the one unpack
    kind = ctx.kind
    if x is None:  # avg: x's data is never read, a zero-stride stand-in has its shape
        shape, dtype = ctx.x_meta
        x = grad_out.new_zeros((), dtype=dtype).expand(shape)
    need_p = kind == "gem" and ctx.needs_input_grad[_OP_P]
    need_w = kind == "attention" and ctx.needs_input_grad[_OP_W]
    gx, gp, gw = torch.ops.globalpool.pool_backward(
        grad_out.contiguous(), x, grad_out if out is None else out,
        grad_out.new_empty((0,), dtype=torch.float32) if aux is None else aux,
        ctx.channels_last, kind, mask, p, eps, r, weights, need_p, need_w,
    )
    return (gx, None, None, None, gp.to(p.dtype) if need_p else None, None, None,
            gw if need_w else None, None)


torch.library.register_autograd(
    "globalpool::pool_forward", _op_backward, setup_context=_op_setup_context
)
