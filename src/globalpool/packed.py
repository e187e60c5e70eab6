"""Pooling of packed variable-length sequences: ``pool_packed(x, cu_seqlens, kind)``.

``x`` is ``(T, C)``: N sequences of tokens concatenated along T, sequence ``n`` the rows
``cu_seqlens[n]:cu_seqlens[n + 1]`` (the ``cu_seqlens`` offsets of variable-length attention
kernels). The result is what padding the sequences into ``(N, Lmax, C)`` with a mask and calling
``gp.pool(..., layout="channels_last", mask=mask)`` gives, for every kind, forward and backward:
an empty sequence pools to 0 with zero gradient, half inputs accumulate in float32, float64 stays
float64, tied maxima share the gradient. :func:`pool_nested` takes a jagged nested tensor.

Two paths compute it:

- the composition: the padded tensor and its mask are built (one scatter) and ``gp.pool(...,
  backend="torch")`` pools them; every autograd mode works there (double backward, forward AD,
  ``torch.func``), and it is the path on CUDA and inside ``torch.compile`` and exporters.
- the fused CPU kernel (numba, :mod:`globalpool.kernels.cpu_packed`): one read of ``x`` in the
  forward, no padded copy, parallel over sequences, with backward kernels for every kind
  (gradients of x, of the attention weights and of a tensor ``p``). A backward that is itself
  recorded (``create_graph=True``) is taken through the composition again.

>>> import torch, globalpool as gp
>>> x = torch.tensor([[1.0], [3.0], [5.0], [7.0], [9.0]])
>>> cu = torch.tensor([0, 2, 2, 5])            # lengths 2, 0, 3
>>> gp.pool_packed(x, cu, "avg")
tensor([[2.],
        [0.],
        [7.]])
>>> gp.pool_packed(x, cu, "catavgmax").shape
torch.Size([3, 2])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from globalpool import contract, registry
from globalpool.adaptive import deploying
from globalpool.kernels import _HAS_NUMBA, ops
from globalpool.kernels.huge_pages import empty_huge
from globalpool.registry import kernels_of

__all__ = ["pool_nested", "pool_packed"]

BACKENDS = ("auto", "fused", "torch")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# argument checks


def check_packed_input(x: Any) -> None:
    """``x`` must be a 2-D ``(T, C)`` floating tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"x must have a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    if x.ndim != 2:
        raise ValueError(
            f"x must be 2-D (T, C): the sequences concatenated along T, got shape "
            f"{tuple(x.shape)}"
        )


def check_cu_seqlens(cu_seqlens: Any, x: torch.Tensor) -> None:
    """``cu_seqlens`` must be int32/int64 offsets ``(N + 1,)`` on x's device, starting at 0,
    non-decreasing and ending at T (values are checked outside graphs only).

    >>> check_cu_seqlens(torch.tensor([0, 3, 2]), torch.zeros(2, 1))
    Traceback (most recent call last):
    ...
    ValueError: cu_seqlens must be non-decreasing, got cu_seqlens[2] = 2 < cu_seqlens[1] = 3
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must have dtype torch.int32 or torch.int64, got "
                        f"{cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(
            f"cu_seqlens must be 1-D (N + 1,) with at least one entry, got shape "
            f"{tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != x.device:
        raise ValueError(f"cu_seqlens must be on x's device {x.device}, got {cu_seqlens.device}")
    if torch.compiler.is_compiling() or deploying():
        return
    # one copy to the host (one sync on CUDA); torch ops, not NumPy: torch.func wraps even this
    cu = cu_seqlens.detach().cpu()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {int(cu[0])}")
    steps = (cu[1:] < cu[:-1]).nonzero()
    if len(steps):
        i = int(steps[0, 0]) + 1
        raise ValueError(
            f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {int(cu[i])} < "
            f"cu_seqlens[{i - 1}] = {int(cu[i - 1])}"
        )
    if int(cu[-1]) != x.shape[0]:
        raise ValueError(
            f"cu_seqlens must end at T = x.shape[0] = {x.shape[0]}, got cu_seqlens[-1] = "
            f"{int(cu[-1])}"
        )


# --------------------------------------------------------------------------------------------
# the composition: padded (N, Lmax, C) + mask through gp.pool(backend="torch")


def padded(
    x: torch.Tensor, cu_seqlens: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(x_padded (N, Lmax, C), mask (N, Lmax), weights_padded (N, Lmax) or None)`` from packed
    ``x`` (Lmax at least 1; padded slots hold 0). Differentiable in x and the weights.

    >>> xp, m, _ = padded(torch.arange(3.0).reshape(3, 1), torch.tensor([0, 1, 3]))
    >>> xp[..., 0], m
    (tensor([[0., 0.],
            [1., 2.]]), tensor([[ True, False],
            [ True,  True]]))
    """
    cu = cu_seqlens.to(torch.int64)
    n, (t, c) = cu.shape[0] - 1, x.shape
    lengths = cu[1:] - cu[:-1]
    lmax = max(int(lengths.max()), 1) if n else 1
    seq = torch.repeat_interleave(torch.arange(n, device=x.device), lengths, output_size=t)
    pos = torch.arange(t, device=x.device) - cu[:-1][seq]
    xp = x.new_zeros((n, lmax, c)).index_put((seq, pos), x)
    mask = torch.zeros((n, lmax), dtype=torch.bool, device=x.device)
    mask = mask.index_put((seq, pos), torch.ones((), dtype=torch.bool, device=x.device))
    wp = None if weights is None else weights.new_zeros((n, lmax)).index_put((seq, pos), weights)
    return xp, mask, wp


def _compose(x: torch.Tensor, cu_seqlens: torch.Tensor, kind: str, params: dict) -> torch.Tensor:
    """The kind's composition on the padded sequences: ``(N, Lmax, C)`` seen as the canonical
    ``(N, C, Lmax)``, the padding masked; per-position parameters padded alike."""
    per_position = [q.name for q in registry.spec(kind).params if q.per_position]
    full = dict(params)
    xp, mask, _ = padded(x, cu_seqlens, None)
    for name in per_position:
        _, _, full[name] = padded(x, cu_seqlens, params[name])
    acc = xp.to(torch.float32) if xp.dtype in (torch.float16, torch.bfloat16) else xp
    return registry.run_composition(kind, acc.transpose(1, 2), mask, full).to(x.dtype)


# --------------------------------------------------------------------------------------------
# the fused CPU kernel


def _acc(x: torch.Tensor) -> type:
    return np.float64 if x.dtype == torch.float64 else np.float32


def _np_acc(t: torch.Tensor, acc: type) -> np.ndarray:
    dtype = torch.float64 if acc is np.float64 else torch.float32
    return t.detach().to(dtype).contiguous().numpy()


_TASKS_PER_THREAD = 4


def _task_bounds(cu: np.ndarray) -> np.ndarray:
    """Sequence index bounds of about ``4 * threads`` tasks with equal row counts: task ``j``
    pools the sequences whose first row lies in its share of T (whole sequences each).

    >>> _task_bounds(np.array([0, 5, 5, 6, 100]))[[0, -1]]
    array([0, 4])
    """
    import numba

    n, total = cu.shape[0] - 1, int(cu[-1])
    tasks = max(1, min(n, _TASKS_PER_THREAD * numba.config.NUMBA_NUM_THREADS))
    targets = (np.arange(tasks + 1, dtype=np.int64) * total) // tasks
    bounds = np.searchsorted(cu[:-1], targets, side="left").astype(np.int64)
    bounds[0], bounds[-1] = 0, n
    return np.maximum.accumulate(bounds)


# torch.compiler.disable imports torch._dynamo (≈2 s) when it decorates; torch's own lazy form
# defers that to the first call, so ``import globalpool`` stays fast (torch < 2.1 lacks it)
_outside_graphs = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable


class _State:
    """What one fused forward leaves for its backward (NumPy arrays in the accumulation type)."""

    __slots__ = ("A", "B", "acc", "bounds", "cnt", "cu", "eps", "group", "ip", "mode", "out",
                 "p", "r", "w", "wsum")


@_outside_graphs  # NumPy and numba inside: never traced (dynamo would trace the NumPy)
def _fused_forward(
    x: torch.Tensor, cu: np.ndarray, kind: str, p: float, eps: float, r: float,
    weights: torch.Tensor | None,
) -> tuple[torch.Tensor, _State]:
    from globalpool.kernels import cpu_packed as K
    from globalpool.kernels.cpu_numba import _np as _np_raw
    from globalpool.kernels.cpu_numba import _p_int

    group, mode = K.MODES[kind]
    acc = _acc(x)
    xa = _np_raw(x.detach().contiguous())
    n, c = cu.shape[0] - 1, x.shape[1]
    st = _State()
    st.acc, st.cu, st.group, st.mode = acc, cu, group, mode
    st.bounds = _task_bounds(cu)
    st.p, st.ip, st.eps, st.r = acc(p), _p_int(p), acc(eps), acc(r)
    width = 2 if kind == "catavgmax" else 1
    st.out = np.empty((n, width * c), dtype=acc)
    state = (n, c) if group != K.LINEAR else (1, 1)
    st.A = np.empty(state, dtype=acc)
    st.B = np.empty(state if group in (K.GEM, K.LSE) else (1, 1), dtype=acc)
    st.cnt = np.empty(state if group == K.MAXES else (1, 1), dtype=np.int32)
    st.w = _np_acc(weights, acc) if kind == "attention" else np.zeros(1, dtype=acc)
    st.wsum = np.empty(n if kind == "attention" else 1, dtype=acc)
    K.forward(xa, cu, st.bounds, st.w, group, mode, st.p, st.ip, st.eps, st.r, st.out, st.A,
              st.B, st.cnt, st.wsum)
    out = torch.from_numpy(st.out)
    return (out if out.dtype == x.dtype else out.to(x.dtype)), st


@_outside_graphs
def _fused_backward(
    g: torch.Tensor, x: torch.Tensor, st: _State, need_p: bool, need_w: bool
) -> tuple[torch.Tensor, float | None, np.ndarray | None]:
    from globalpool.kernels import cpu_packed as K
    from globalpool.kernels.cpu_numba import _np as _np_raw

    acc = st.acc
    n, c = st.cu.shape[0] - 1, x.shape[1]
    ga = _np_acc(g.reshape(n, -1), acc)
    gx = empty_huge(tuple(x.shape), x.dtype)  # written once: huge pages halve its first touch
    reads_x = st.group != K.LINEAR or st.mode == K.ATTENTION
    xa = _np_raw(x.detach().contiguous()) if reads_x else np.zeros((1, c), _np_raw(gx).dtype)
    need_p = need_p and st.group == K.GEM
    need_w = need_w and st.group == K.LINEAR and st.mode == K.ATTENTION
    gw = np.empty(x.shape[0] if need_w else 1, dtype=acc)
    p0 = np.empty((n, c) if need_p else (1, 1), dtype=acc)
    p1 = np.empty_like(p0)
    K.backward(ga, xa, st.cu, st.bounds, st.w, st.group, st.mode, st.p, st.ip, st.eps, st.r,
               st.out, st.A, st.B, st.cnt, st.wsum, _np_raw(gx), gw, p0, p1, need_p, need_w)
    grad_p = _gem_grad_p(ga, st, p0, p1) if need_p else None
    return gx, grad_p, (gw if need_w else None)


def _gem_grad_p(g: np.ndarray, st: _State, s0: np.ndarray, s1: np.ndarray) -> float:
    """d/dp sum(g y) with y = (mean z^p)^(1/p): with u = z / y and mu = mean u^p (1 up to
    rounding), dy/dp = y (mean(u^p log u) / (p mu) - log(mu) / p^2); no power of an unscaled z."""
    k = np.diff(st.cu).astype(np.float64)[:, None]
    y, p = st.out.astype(np.float64), float(st.p)
    s0, s1 = s0.astype(np.float64), s1.astype(np.float64)
    real = (k > 0) & (s0 > 0) & np.isfinite(y)
    with np.errstate(all="ignore"):
        mu = s0 / np.where(k > 0, k, 1.0)
        dydp = y * (s1 / np.where(real, s0, 1.0) / p - np.log(np.where(real, mu, 1.0)) / p**2)
    return float((g * np.where(real, dydp, 0.0)).sum())


class _FusedPacked(torch.autograd.Function):
    """The fused packed pooling for eager autograd: kernels forward and backward; a recorded
    backward (``create_graph=True``) goes through the composition on the saved inputs."""

    @staticmethod
    def forward(ctx, x, weights, p, cu_seqlens, kind, eps, r):
        cu = cu_seqlens.detach().to(torch.int64).contiguous().numpy()
        out, st = _fused_forward(x, cu, kind, float(p), float(eps), float(r), weights)
        ctx.st, ctx.kind, ctx.eps, ctx.r = st, kind, eps, r
        ctx.p_value = None if isinstance(p, torch.Tensor) else p
        ctx.save_for_backward(x, weights, p if isinstance(p, torch.Tensor) else None, cu_seqlens)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weights, p_t, cu_seqlens = ctx.saved_tensors
        p = p_t if ctx.p_value is None else ctx.p_value
        need_x, need_w, need_p = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # recorded: differentiable again, through the composition
            return (*_composed_grads(ctx, x, weights, p, cu_seqlens, grad_out), None, None, None,
                    None)
        gx, gp, gw = _fused_backward(grad_out, x, ctx.st, need_p, need_w)
        grad_p = None if gp is None or not need_p else torch.tensor(gp, dtype=p_t.dtype)
        grad_w = None if gw is None else torch.from_numpy(gw).to(weights.dtype)
        return (gx if need_x else None), grad_w, grad_p, None, None, None, None


def _composed_grads(ctx, x, weights, p, cu_seqlens, grad_out) -> tuple:
    inputs = (x, weights, p)
    wanted = [i for i in range(3) if ctx.needs_input_grad[i]]
    params = _params_of(ctx.kind, p, ctx.eps, ctx.r, weights)
    y = _compose(x, cu_seqlens, ctx.kind, params)
    got = torch.autograd.grad(y, [inputs[i] for i in wanted], grad_out, create_graph=True,
                              allow_unused=True)
    grads = [None, None, None]
    for i, gi in zip(wanted, got, strict=True):
        grads[i] = gi if gi is not None else torch.zeros_like(inputs[i])
    return tuple(grads)


def _params_of(kind: str, p, eps, r, weights) -> dict:
    """The kind's own parameters from the kernel's (p, eps, r, weights)."""
    given = {"p": p, "eps": eps, "r": r, "weights": weights}
    return {k: given[k] for k in registry.spec(kind).defaults if k in given}


def fused_packed(
    x: torch.Tensor, cu_seqlens: torch.Tensor, kind: str, **params: Any
) -> torch.Tensor:
    """The fused CPU kernel on checked arguments (every kind of the registry has one);
    differentiable in x, the weights and a tensor ``p``.

    >>> x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    >>> fused_packed(x, torch.tensor([0, 2, 3]), "sum")
    tensor([[4., 2.],
            [5., 4.]])
    >>> fused_packed(x, torch.tensor([0, 2, 3]), "last")
    tensor([[3., 0.],
            [5., 4.]])
    """
    p, eps, r = params.get("p", 3.0), params.get("eps", 1e-6), params.get("r", 1.0)
    weights = params.get("weights") if kind == "attention" else None
    if ops.needs_grad(x, p, eps, r, weights):
        return _FusedPacked.apply(x, weights, p, cu_seqlens, kind, eps, r)
    cu = cu_seqlens.detach().to(torch.int64).contiguous().numpy()
    return _fused_forward(x, cu, kind, float(p), float(eps), float(r), weights)[0]


# --------------------------------------------------------------------------------------------
# backend choice and the public functions


def _min_elements() -> int:
    from globalpool.functional import FUSED_MIN_ELEMENTS

    return FUSED_MIN_ELEMENTS


def _choose_backend(backend: Any, x: torch.Tensor, kind: str, params: dict) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or deploying():  # exported / traced graphs record the composition
        return "torch"
    per_channel = any(contract.is_per_channel(params.get(k)) for k in ("p", "r"))
    available = _HAS_NUMBA and x.is_cpu and not per_channel and "packed" in kernels_of(kind)
    compiling = torch.compiler.is_compiling()
    # under torch.compile the kernel runs outside the graph (torch.compiler.disable: a graph
    # break), so only backend="fused" takes it there; the autograd modes need eager tensors
    mode = None if compiling else ops.unsupported_mode(x, *params.values())
    # the kernels give no gradient for eps or r: those calls take the composition
    extra = [k for k in ("eps", "r") if isinstance(params.get(k), torch.Tensor)
             and params[k].requires_grad and torch.is_grad_enabled()]
    if backend == "fused":
        if not available:
            what = "a per-channel p or r" if per_channel else f"kind {kind!r} on device {x.device}"
            raise ValueError(
                f"backend='fused' has no packed kernel for {what} (numba CPU kernels, one p or r "
                "for every channel); use backend='auto' or 'torch'"
            )
        if mode is not None:
            raise ValueError(
                f"backend='fused' cannot run under {mode}; use backend='auto' (which takes the "
                "torch composition there) or 'torch'"
            )
        if extra:
            raise ValueError(
                f"backend='fused' gives no gradient for a tensor {extra[0]} that requires grad; "
                "use backend='auto' or 'torch'"
            )
        return "fused"
    if compiling or not available or mode is not None or extra or x.numel() < _min_elements():
        return "torch"
    return "fused"


def pool_packed(
    x: torch.Tensor,
    cu_seqlens: torch.Tensor,
    kind: str = "avg",
    *,
    backend: str = "auto",
    **params: Any,
) -> torch.Tensor:
    """Pool each of N packed sequences of ``x`` with one of :data:`globalpool.KINDS`.

    Args:
        x: ``(T, C)``, the N sequences concatenated along T (floating dtype).
        cu_seqlens: ``(N + 1,)`` int32/int64 offsets on x's device: sequence ``n`` is rows
            ``cu_seqlens[n]:cu_seqlens[n + 1]``; starts at 0, non-decreasing, ends at T.
        kind: any kind of ``gp.pool`` (or a tuple of kinds, concatenated along channels), with
            its keyword parameters (``p``, ``eps``, ``r``, each a number, a 0-dim tensor or for
            ``p``/``r`` a ``(C,)`` tensor; attention's ``weights`` have shape ``(T,)``,
            non-negative).
        backend: ``auto`` (the fused CPU kernel for inputs of >= 64K elements where numba is
            installed and the call's autograd mode is one it serves; the composition
            otherwise), ``fused`` (raises a ValueError where it cannot serve) or ``torch`` (the
            composition: padding to ``(N, Lmax, C)`` + mask through ``gp.pool``). On CUDA, under
            ``torch.compile``, exporters and tracers, ``torch.func`` transforms and forward-mode
            AD, and when a tensor ``eps`` or ``r`` requires grad, ``auto`` takes the composition
            (``fused`` refuses all but ``torch.compile``, where the kernel runs outside the
            graph, and exporters, which record the composition whatever the backend). The
            composition reads ``Lmax`` from ``cu_seqlens`` on the host (one sync on CUDA, a graph
            break under ``torch.compile``).

    Returns:
        ``(N, width * C)`` (width 2 for ``catavgmax``) in x's dtype: exactly what
        ``gp.pool(padded, kind, layout="channels_last", mask=mask)`` returns on the padded
        sequences. Empty sequences give 0 with zero gradient.

    >>> import torch, globalpool as gp
    >>> x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 8.0]])
    >>> gp.pool_packed(x, torch.tensor([0, 2, 3]), "max")
    tensor([[3., 2.],
            [2., 8.]])
    >>> w = torch.tensor([1.0, 3.0, 1.0])
    >>> gp.pool_packed(x, torch.tensor([0, 2, 3]), "attention", weights=w)
    tensor([[2.5000, 1.5000],
            [2.0000, 8.0000]])
    """
    kind = contract.check_kinds(kind)
    check_packed_input(x)
    check_cu_seqlens(cu_seqlens, x)
    full = contract.check_packed_params(kind, params, x)
    if isinstance(kind, tuple):  # side by side along channels, each kind its own call
        return torch.cat([
            pool_packed(x, cu_seqlens, k, backend=backend,
                        **{n: full[n] for n in registry.spec(k).defaults})
            for k in kind
        ], dim=1)
    if _choose_backend(backend, x, kind, full) == "fused":
        return fused_packed(x, cu_seqlens, kind, **full)
    return _compose(x, cu_seqlens, kind, full)


def pool_nested(nt: torch.Tensor, kind: str = "avg", **params: Any) -> torch.Tensor:
    """Pool a jagged nested tensor ``(N, j, C)`` of token sequences over its ragged dim.

    ``nt`` must have ``layout=torch.jagged`` with the ragged dim at 1 (channels last); its
    ``values()`` ``(T, C)`` and ``offsets()`` go to :func:`pool_packed`, with ``backend`` and
    the kind's parameters. Attention ``weights`` may be a ``(T,)`` tensor or a jagged nested
    tensor ``(N, j)`` with the same offsets.

    >>> import torch
    >>> nt = torch.nested.nested_tensor([torch.ones(2, 3), torch.zeros(1, 3)], layout=torch.jagged)
    >>> pool_nested(nt, "avg")
    tensor([[1., 1., 1.],
            [0., 0., 0.]])
    """
    jagged = getattr(torch, "jagged", None)
    if jagged is None:  # pragma: no cover - torch < 2.3
        raise TypeError(
            f"nested tensors need torch >= 2.3 with layout=torch.jagged, got torch "
            f"{torch.__version__}"
        )
    if not isinstance(nt, torch.Tensor) or not nt.is_nested:
        got = type(nt).__name__ if not isinstance(nt, torch.Tensor) else "a regular tensor"
        raise TypeError(f"x must be a nested tensor (torch.nested.nested_tensor), got {got}")
    if nt.layout != jagged:
        raise TypeError(
            f"x must be a jagged nested tensor (layout=torch.jagged), got layout {nt.layout}; "
            "convert with torch.nested.nested_tensor(list(x.unbind()), layout=torch.jagged)"
        )
    if nt.dim() != 3 or getattr(nt, "_ragged_idx", 1) != 1:
        raise ValueError(
            f"x must be a jagged nested tensor (N, j, C) ragged in dim 1, got {nt.dim()} dims "
            f"ragged in dim {getattr(nt, '_ragged_idx', '?')}"
        )
    offsets = nt.offsets()
    w = params.get("weights")
    if isinstance(w, torch.Tensor) and w.is_nested:
        if w.layout != jagged or not torch.equal(w.offsets(), offsets):
            raise ValueError("weights as a nested tensor must be jagged with x's offsets")
        params = {**params, "weights": w.values()}
    return pool_packed(nt.values(), offsets, kind, **params)
