"""Pooling of packed variable-length sequences: ``pool_packed(x, cu_seqlens, kind)``.

``x`` is ``(T, C)``: N sequences of tokens concatenated along T, sequence ``n`` the rows
``cu_seqlens[n]:cu_seqlens[n + 1]`` (the ``cu_seqlens`` offsets of variable-length attention
kernels). The result is what padding the sequences into ``(N, Lmax, C)`` with a mask and calling
``gp.pool(..., layout="channels_last", mask=mask)`` gives, for every kind, forward and backward:
an empty sequence pools to 0 with zero gradient, half inputs accumulate in float32, float64 stays
float64, tied maxima share the gradient. :func:`pool_nested` takes a jagged nested tensor.

Two paths compute it:

- the composition: the padded tensor and its mask are built (one scatter) and the kind's torch
  composition pools them (what ``gp.pool(..., backend="torch")`` does); every autograd mode
  works there (double backward, forward AD, ``torch.func``), and it is the path on CUDA and
  inside ``torch.compile`` and exporters.
- the fused CPU kernel (numba, :mod:`globalpool.kernels.cpu_packed`): one read of ``x`` in the
  forward, no padded copy, parallel over sequences, with backward kernels for every kind
  (gradients of x, of the attention weights and of a tensor ``p``). A backward that is itself
  recorded (``create_graph=True``) or batched is taken through the composition again
  (one autograd Function for every kernel: ``globalpool.kernels.ops.FusedPool``).

The choice between them is ``globalpool.dispatch.plan_packed``'s.

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

from typing import Any, NamedTuple

import numpy as np
import torch

from globalpool import contract, dispatch, registry
from globalpool.dispatch import BACKENDS, deploying  # noqa: F401  (BACKENDS: public name)
from globalpool.kernels import ops
from globalpool.kernels.huge_pages import empty_huge

__all__ = ["pool_nested", "pool_packed"]

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
    lmax = _longest(lengths, t) if n else 1
    seq = torch.repeat_interleave(torch.arange(n, device=x.device), lengths, output_size=t)
    pos = torch.arange(t, device=x.device) - cu[:-1][seq]
    xp = x.new_zeros((n, lmax, c)).index_put((seq, pos), x)
    mask = torch.zeros((n, lmax), dtype=torch.bool, device=x.device)
    mask = mask.index_put((seq, pos), torch.ones((), dtype=torch.bool, device=x.device))
    wp = None if weights is None else weights.new_zeros((n, lmax)).index_put((seq, pos), weights)
    return xp, mask, wp


def _longest(lengths: torch.Tensor, t: int) -> int:
    """The longest of the (N >= 1) lengths, at least 1. Under ``torch.compile`` and
    ``torch.export`` it has no value yet: a size read when the graph runs, in ``[1, max(T, 1)]``,
    so the graph serves any lengths. That size is the read value itself (clamped before the
    read), not ``max(value, 1)`` of it: inductor cannot generate a backward whose shapes hold
    such an expression of a size the forward read."""
    if not torch.compiler.is_compiling():
        return max(int(lengths.max()), 1)
    lmax = lengths.max().clamp_min(1).item()
    torch._check(lmax >= 1)
    torch._check(lmax <= max(t, 1))
    return lmax


def _compose(x: torch.Tensor, cu_seqlens: torch.Tensor, kind: str, params: dict) -> torch.Tensor:
    """The composition: the padded sequences and their mask through the kind's torch
    composition (what ``gp.pool(padded, kind, layout="channels_last", mask=mask,
    backend="torch")`` computes), in x's dtype: ``(N, Lmax, C)`` seen as the canonical
    ``(N, C, Lmax)``, per-position parameters padded alike. Any registered kind, whatever its
    parameters."""
    per_position = [q.name for q in registry.spec(kind).params if q.per_position]
    full = dict(params)
    xp, mask, _ = padded(x, cu_seqlens, None)
    for name in per_position:
        _, _, full[name] = padded(x, cu_seqlens, params[name])
    acc = xp.to(torch.float32) if xp.dtype in (torch.float16, torch.bfloat16) else xp
    return registry.run_composition(kind, acc.transpose(1, 2), mask, full).to(x.dtype)


def _compose_acc(x, cu_seqlens, kind, p, eps, r, weights) -> torch.Tensor:
    """The composition of a kind the packed kernel serves, in the accumulation dtype (float32
    for half inputs), from the kernel's own arguments: its backward's composed gradients."""
    weights = weights if "weights" in registry.spec(kind).defaults else None
    xp, mask, wp = padded(x, cu_seqlens, weights)
    return ops.compose3(xp, True, kind, mask, p, eps, r, wp)


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
    from globalpool.kernels.cpu_numba import gem_grad_p

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
    grad_p = gem_grad_p(ga, st.out, np.diff(st.cu), st.p, p0, p1) if need_p else None
    return gx, grad_p, (gw if need_w else None)


def _seq_ids(cu_seqlens: torch.Tensor, t: int) -> torch.Tensor:
    """The sequence index of each of the T rows."""
    cu = cu_seqlens.to(torch.int64)
    n = cu.shape[0] - 1
    return torch.repeat_interleave(torch.arange(n, device=cu.device), cu[1:] - cu[:-1],
                                   output_size=t)


def _nan_rows(x: torch.Tensor, cu_seqlens: torch.Tensor, out: torch.Tensor,
              kind: str) -> torch.Tensor | None:
    """``(N, C)`` bool: the (sequence, channel) rows of a max kind whose maximum is NaN, or None
    (see ``globalpool.kernels.ops``: their gradient is NaN at every position of the row)."""
    c = x.shape[1]
    rows = torch.isnan(out[:, c:] if kind == "catavgmax" else out)
    if not bool(rows.any()):
        return None
    if kind == "avgmax":  # inf - inf in the average is NaN too: only a NaN in x counts
        seen = torch.zeros(rows.shape, dtype=torch.float32)
        seen.index_add_(0, _seq_ids(cu_seqlens, x.shape[0]), torch.isnan(x).float())
        rows = rows & (seen > 0)
        if not bool(rows.any()):
            return None
    return rows


class PackedKernel(NamedTuple):
    """The executor of the packed CPU kernel for :class:`globalpool.kernels.ops.FusedPool`
    (its index is ``cu_seqlens``); a recorded or batched backward goes through the padded
    composition on the saved inputs."""

    kind: str

    def forward(self, x, cu_seqlens, p, eps, r, weights):
        kind = self.kind
        cu = cu_seqlens.detach().to(torch.int64).contiguous().numpy()
        out, st = _fused_forward(x, cu, kind, float(p), float(eps), float(r), weights)
        nan = _nan_rows(x, cu_seqlens, out, kind) if kind in ops.MAX_KINDS else None
        return out, (x, weights if kind == "attention" else None, nan), st

    def backward(self, g, inputs, extra, st, need_p, need_w):
        x, _, p, _, _, weights = inputs
        gx, gp, gw = _fused_backward(g, x, st, need_p, need_w)
        grad_p = None if gp is None or not need_p else torch.tensor(gp, dtype=p.dtype)
        grad_w = None if gw is None else torch.from_numpy(gw).to(weights.dtype)
        return gx, grad_p, grad_w

    def compose(self, x, cu_seqlens, p, eps, r, weights):
        return _compose_acc(x, cu_seqlens, self.kind, p, eps, r, weights)

    def fill_nan(self, grad, rows, cu_seqlens):
        return torch.where(rows[_seq_ids(cu_seqlens, grad.shape[0])], torch.nan, grad)

    def linear_grad(self, g, index, nan, extra, state):  # pragma: no cover - x is always kept
        raise AssertionError("the packed kernel keeps x")


def fused_packed(
    x: torch.Tensor, cu_seqlens: torch.Tensor, kind: str, *, plan: Any = None, **params: Any
) -> torch.Tensor:
    """The fused CPU kernel on checked arguments, run as ``plan`` says (``plan.mode``; a direct
    call without a plan: as :func:`globalpool.dispatch.direct` says). The kernel has a mode for
    every built-in kind (``first`` and ``last`` too, though ``pool_packed`` composes them: their
    registry entry names no kernel); differentiable in x, the weights and a tensor ``p`` (and a
    tensor ``eps`` or ``r``, through the composition in the backward).

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
    mode = dispatch.direct(x, params).mode if plan is None else plan.mode
    if mode == "inference":
        cu = cu_seqlens.detach().to(torch.int64).contiguous().numpy()
        return _fused_forward(x, cu, kind, float(p), float(eps), float(r), weights)[0]
    return ops.FusedPool.apply(PackedKernel(kind), x, cu_seqlens, p, eps, r, weights)


# --------------------------------------------------------------------------------------------
# the public functions


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
            composition: padding to ``(N, Lmax, C)`` + mask, pooled as ``gp.pool`` pools). On
            CUDA, under ``torch.compile``, exporters and tracers, ``torch.func`` transforms and
            forward-mode AD, and for ``first`` and ``last`` (which have no kernel), ``auto``
            takes the composition (``fused`` refuses CUDA and those autograd modes, runs the
            kernel outside the graph under ``torch.compile``, and records the composition under
            exporters). A tensor ``eps`` or ``r`` that requires grad gets its gradient on
            either path. The
            composition reads ``Lmax`` from ``cu_seqlens`` on the host (one sync on CUDA; under
            ``torch.compile`` and exporters a size the graph reads when it runs, no graph
            break).

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
    plan = dispatch.plan_packed(backend, x, kind, full)
    if plan.path == "compose":
        return _compose(x, cu_seqlens, kind, full)
    return fused_packed(x, cu_seqlens, kind, plan=plan, **full)


def check_nested(nt: Any) -> None:
    """``nt`` (the argument ``x``) must be a jagged nested tensor ``(N, j, C)`` ragged in dim 1.

    >>> check_nested(torch.ones(2, 3))
    Traceback (most recent call last):
    ...
    TypeError: x must be a nested tensor (torch.nested.nested_tensor), got a regular tensor
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


def nested_as_packed(nt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A jagged nested tensor ``(N, j, C)`` as packed rows ``(T, C)`` and their ``cu_seqlens``
    ``(N + 1,)``: each sequence's own tokens (a non-contiguous one, as ``torch.nested.narrow``
    makes, keeps only the rows its ``lengths()`` cover). Differentiable in the values.

    >>> nt = torch.nested.nested_tensor([torch.ones(2, 3), torch.zeros(1, 3)], layout=torch.jagged)
    >>> rows, cu = nested_as_packed(nt)
    >>> rows.shape, cu
    (torch.Size([3, 3]), tensor([0, 2, 3]))
    """
    check_nested(nt)
    values, offsets, lengths = nt.values(), nt.offsets(), nt.lengths()
    if lengths is None:
        return values, offsets
    rows, cu = _own_rows(offsets, lengths, values.shape[0])
    return values.index_select(0, rows), cu


def pool_nested(nt: torch.Tensor, kind: str = "avg", **params: Any) -> torch.Tensor:
    """Pool a jagged nested tensor ``(N, j, C)`` of token sequences over its ragged dim.

    ``nt`` must have ``layout=torch.jagged`` with the ragged dim at 1 (channels last); each
    sequence's own tokens (rows ``offsets()[n]`` to ``offsets()[n] + lengths()[n]`` of
    ``values()`` for a non-contiguous one, as ``torch.nested.narrow`` makes; to
    ``offsets()[n + 1]`` otherwise) go to :func:`pool_packed`, with ``backend`` and the kind's
    parameters. Attention ``weights`` may be a tensor with one weight per row of ``values()``
    or a jagged nested tensor ``(N, j)`` with the same offsets and lengths.

    >>> import torch
    >>> nt = torch.nested.nested_tensor([torch.ones(2, 3), torch.zeros(1, 3)], layout=torch.jagged)
    >>> pool_nested(nt, "avg")
    tensor([[1., 1., 1.],
            [0., 0., 0.]])
    """
    check_nested(nt)
    jagged = torch.jagged
    values, offsets, lengths = nt.values(), nt.offsets(), nt.lengths()
    w = params.get("weights")
    if isinstance(w, torch.Tensor) and w.is_nested:
        if (w.layout != jagged or not torch.equal(w.offsets(), offsets)
                or (w.lengths() is None) != (lengths is None)
                or (lengths is not None and not torch.equal(w.lengths(), lengths))):
            raise ValueError("weights as a nested tensor must be jagged with x's offsets and "
                             "lengths")
        w = w.values()
    if lengths is not None:  # non-contiguous: each sequence's tokens, not the rows between
        rows, offsets = _own_rows(offsets, lengths, values.shape[0])
        values = values.index_select(0, rows)
        if isinstance(w, torch.Tensor) and w.ndim == 1 and w.shape[0] == nt.values().shape[0]:
            w = w.index_select(0, rows)
    if isinstance(w, torch.Tensor):
        params = {**params, "weights": w}
    return pool_packed(values, offsets, kind, **params)


def _own_rows(
    offsets: torch.Tensor, lengths: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``values()`` that hold a non-contiguous jagged tensor's tokens, sequence by
    sequence, and the ``cu_seqlens`` of those rows packed together.

    >>> _own_rows(torch.tensor([1, 10, 22]), torch.tensor([3, 2]), 30)
    (tensor([ 1,  2,  3, 10, 11]), tensor([0, 3, 5]))
    """
    n = lengths.shape[0]
    lengths = lengths.to(torch.int64)
    starts = offsets[:n].to(torch.int64)
    if bool(((lengths < 0) | (starts < 0) | (starts + lengths > rows)).any()):
        raise ValueError(
            f"x's offsets and lengths must lie within its {rows} rows of values(), got offsets "
            f"{offsets.tolist()} and lengths {lengths.tolist()}"
        )
    cu = torch.zeros(n + 1, dtype=torch.int64, device=lengths.device)
    cu[1:] = lengths.cumsum(0)
    total = int(cu[-1])
    shift = torch.repeat_interleave(starts - cu[:-1], lengths, output_size=total)
    return torch.arange(total, device=lengths.device) + shift, cu
