"""CPU backend of the fused global-pooling kernels (numba, parallel over the cores).

Implements the fused-kernel interface shared with the Triton backend::

    forward(x, channels_last, kind, mask, p, eps, r, weights) -> (out, aux)
    backward(grad_out, x, out, aux, channels_last, kind, mask, p, eps, r, weights)
        -> (grad_x, grad_p or None, grad_weights or None)

``x`` is 3-D and C-contiguous: ``(N, C, L)`` or, with ``channels_last``, ``(N, L, C)``; dtype
float16, bfloat16, float32 or float64. The forward reads x once; the backward writes grad_x once
and reads x only where the gradient depends on it (gem, lse, attention, tied maxima). The jitted
code is in :mod:`globalpool.kernels.cpu_kernels`; this module prepares the small per-sample and
per-channel arrays (counts, coefficients) with NumPy (single-threaded, so that it never wakes
torch's OpenMP pool between two numba launches) and picks the work split.

>>> import torch
>>> from globalpool.kernels import cpu_numba
>>> x = torch.tensor([[[1.0, 3.0, 3.0], [0.0, 2.0, 4.0]]])
>>> out, aux = cpu_numba.forward(x, False, "max", None)
>>> out, aux[..., 1]
(tensor([[3., 4.]]), tensor([[2, 1]], dtype=torch.int32))
>>> cpu_numba.backward(torch.ones(1, 2), x, out, aux, False, "max", None)[0]
tensor([[[0.0000, 0.5000, 0.5000],
         [0.0000, 0.0000, 1.0000]]])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager

import numba
import numpy as np
import torch

from globalpool import reference
from globalpool.kernels import cpu_kernels as K
from globalpool.kernels.cpu_simd import LN2, LOG2E
from globalpool.kernels.huge_pages import empty_huge

__all__ = ["DTYPES", "KINDS", "MAX_KINDS", "backward", "forward", "gem_grad_p"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_KINDS = frozenset({"max", "avgmax", "catavgmax"})
_MAX_MODE = {"max": K.MAX_ONLY, "avgmax": K.MAX_AVGMAX, "catavgmax": K.MAX_CAT}
# sum is the mean kernel with every count 1 (an empty sample's sum is 0 either way)
_SUM_MODE = {"avg": K.SUM_AVG, "sum": K.SUM_AVG, "gem": K.SUM_GEM, "attention": K.SUM_WEIGHTED}
#: The kinds these kernels serve (the registry's family "cpu"): the sum and max kernels' modes
#: and log-sum-exp (its own kernels).
KINDS = frozenset(_SUM_MODE) | MAX_KINDS | {"lse"}
_TASKS_PER_THREAD = 4
_MIN_CHUNK = 256  # positions per chunk of L when the channels-last forward splits L
_MAX_BLOCK = 4096  # a whole row of C per task when there are enough samples: x streams in order
_SERIAL_BELOW = 1 << 16  # elements: smaller inputs run on the calling thread (no pool wake-up)
# tasks are split for the pool's full size (looking the current size up costs more than
# the few spare tasks it saves when fewer threads are active)
_MAX_THREADS = max(1, numba.config.NUMBA_NUM_THREADS)


# --------------------------------------------------------------------------------------------
# NumPy views and conversions (no torch compute ops)


def _np(t: torch.Tensor) -> np.ndarray:
    """NumPy view of a CPU tensor; float16 as uint16 and bfloat16 as int16 (same bits)."""
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def _np_float(t: torch.Tensor, acc: type) -> np.ndarray:
    """A float tensor's values as a NumPy array of dtype ``acc``."""
    t = t.detach().contiguous()
    if t.dtype == torch.float16:
        a = t.view(torch.int16).numpy().view(np.float16)
    elif t.dtype == torch.bfloat16:
        a = (t.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        a = t.numpy()
    return a.astype(acc, copy=False)


def _to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A float32/float64 NumPy array as a tensor of ``dtype`` (round to nearest even)."""
    if dtype == torch.float16:
        return torch.from_numpy(a.astype(np.float16))
    if dtype == torch.bfloat16:
        u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        bits = np.where(np.isnan(a), (u >> 16).astype(np.uint16) | 0x40, bits)
        return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(
        np.ascontiguousarray(a, dtype=np.float64 if dtype == torch.float64 else np.float32)
    )


def _acc(x: torch.Tensor) -> type:
    return np.float64 if x.dtype == torch.float64 else np.float32


def _dims(x: torch.Tensor, channels_last: bool) -> tuple[int, int, int]:
    n, a, b = x.shape
    return (n, b, a) if channels_last else (n, a, b)


def _mask_rows(mask: torch.Tensor | None, length: int) -> tuple[np.ndarray, int]:
    """(mask array, row stride): an unmasked call reads one all-True row for every sample."""
    if mask is None:
        return _all_real(length), 0
    return mask.contiguous().numpy(), 1


@functools.lru_cache(maxsize=64)
def _all_real(length: int) -> np.ndarray:
    return np.ones((1, length), dtype=np.bool_)  # shared: the kernels never write masks


def _counts(mask: np.ndarray, ms: int, n: int, length: int) -> np.ndarray:
    if ms == 0:
        return _full_counts(n, length)
    return mask.sum(1, dtype=np.float64)


@functools.lru_cache(maxsize=64)
def _full_counts(n: int, length: int) -> np.ndarray:
    return np.full(n, float(length))  # shared: callers derive new arrays from it, never write it


def _unit_counts(n: int) -> np.ndarray:
    """The counts that turn the mean kernels into sums."""
    return _full_counts(n, 1)


# NumPy type codes of the arrays :func:`_np` makes, per torch dtype, and back
_CHAR_OF = {torch.float16: "H", torch.bfloat16: "h", torch.float32: "f", torch.float64: "d"}
_TORCH_OF = {c: t for t, c in _CHAR_OF.items()}

# stand-ins for the weights of unweighted kinds, of the type real weights would have
_NO_WEIGHTS = {
    np.dtype(t).char: np.zeros((1, 1), dtype=t)
    for t in (np.uint16, np.int16, np.float32, np.float64)
}


def _inverse(v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(v, dtype=np.float64)
    np.divide(1.0, v, out=out, where=v > 0)
    return out


# --------------------------------------------------------------------------------------------
# work split


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run a small problem on the calling thread: waking the pool costs more than the work."""
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


@contextmanager
def _parallelism(numel: int) -> Iterator[None]:
    if numel >= _SERIAL_BELOW:
        yield
        return
    with _one_thread():
        yield


@functools.lru_cache(maxsize=256)
def _row_tasks(rows: int, threads: int) -> int:
    return max(1, min(rows, _TASKS_PER_THREAD * threads))


@functools.lru_cache(maxsize=256)
def _cl_split(n: int, c: int, length: int, threads: int) -> tuple[int, int]:
    """(channels per block, chunks of L) for the channels-last forward: blocks are whole rows of
    C (up to ``_MAX_BLOCK``), as tasks splitting a row read each cache line twice (measured
    0.57x of ``x.sum()`` vs 1.03x whole rows on a (2, 32, 64, 64, 64) input), and L is chunked
    when samples alone would not give every core ``_TASKS_PER_THREAD`` tasks."""
    cb = max(1, min(c, _MAX_BLOCK))
    tasks = n * math.ceil(c / cb)
    want = _TASKS_PER_THREAD * threads
    if tasks >= want:
        return cb, 1
    return cb, max(1, min(math.ceil(want / max(tasks, 1)), length // _MIN_CHUNK))


def _l_chunks(n: int, length: int) -> int:
    """Chunks of L per sample so that ``n * chunks`` tasks keep every core busy."""
    want = _TASKS_PER_THREAD * _MAX_THREADS
    if n >= want:
        return 1
    return max(1, min(math.ceil(want / max(n, 1)), length // 64 or 1))


def _p_int(p: float) -> int:
    return int(p) if p in (1.0, 2.0, 3.0, 4.0) else 0


def _weight_sums(wa: np.ndarray, mask: np.ndarray, ms: int) -> np.ndarray:
    out = np.empty(wa.shape[0])
    K.weight_sums(wa, mask, ms, out)
    return out


# --------------------------------------------------------------------------------------------
# forward


def forward(
    x: torch.Tensor,
    channels_last: bool,
    kind: str,
    mask: torch.Tensor | None,
    p: float = 3.0,
    eps: float = 1e-6,
    r: float = 1.0,
    weights: torch.Tensor | None = None,
    need_aux: bool = True,
    *,
    view: tuple[tuple[int, ...] | None, tuple[int, int, int]] | None = None,
    acc_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pool ``x`` over L in one read; returns ``(out, aux)``.

    ``out`` is ``(N, C)`` (``(N, 2C)`` for catavgmax) in x's dtype; ``aux`` is what the backward
    needs besides x: int32 ``(N, C, 2)`` = (first arg-max along L, tie count) for the max kinds;
    for gem the output ``(N, C)`` in the accumulation dtype (float32, float64 for float64 x: a
    half output's rounding would enter the gradient as ``(x / y)^(p - 1)``); for lse ``(2, N, C)``
    in that dtype, each row's maximum of x and ``log2(mean 2**(r log2(e) (x - max)))``; else
    ``torch.empty(0)``. ``need_aux=False`` (no backward will follow): aux is None.
    ``view=(perm, shape3)``: x is given in its original N-D shape and its 3-D form is
    ``x.permute(perm).reshape(shape3)`` (perm None: no permute), taken here on the NumPy array
    (a view; the plan comes from ``globalpool.kernels._storage_plan``). ``acc_out``: ``out`` in
    the accumulation dtype (float32 for half inputs), not rounded to x's.

    >>> import torch
    >>> forward(torch.tensor([[[1.0, 2.0], [5.0, 5.0]]]), False, "avg", None)[0]
    tensor([[1.5000, 5.0000]])
    """
    xa = _np(x)  # numpy shapes and allocations: fewer cold steps than torch's on a large input
    if view is not None:
        perm, shape3 = view
        xa = (xa if perm is None else xa.transpose(perm)).reshape(shape3)
    n, length, c = xa.shape if channels_last else (xa.shape[0], xa.shape[2], xa.shape[1])
    width = 2 * c if kind == "catavgmax" else c
    out = np.empty((n, width), dtype=np.float64 if xa.dtype == np.float64 else np.float32)
    table = need_aux and kind in MAX_KINDS
    aux = np.empty((n, c, 2), dtype=np.int32) if table else _NO_TABLE
    if kind == "lse":
        aux = np.zeros((2, n, c), dtype=out.dtype)
    if n * c > 0 and length > 0:
        args = (xa, channels_last, kind, mask, p, eps, r, weights, out, aux, table)
        if xa.size < _SERIAL_BELOW:
            with _one_thread():
                _forward(*args)
        else:
            _forward(*args)
        if kind in ("gem", "lse"):
            _fix_extreme_rows(xa, channels_last, kind, mask, p, eps, r, out, aux)
    else:
        out[...] = 0
        if table:
            aux[..., 0], aux[..., 1] = -1, 0
    out_t = torch.from_numpy(out) if acc_out or xa.dtype.kind == "f" else _to_torch(out, x.dtype)
    if not need_aux:
        return out_t, None
    if table or kind == "lse":
        return out_t, torch.from_numpy(aux)
    if kind == "gem":
        return out_t, torch.from_numpy(out.copy() if xa.dtype.kind == "f" else out)
    return out_t, torch.empty(0)


_NO_TABLE = np.empty((1, 1, 2), dtype=np.int32)  # stands in for aux; never written


def _fix_extreme_rows(xa, channels_last, kind, mask, p, eps, r, out, aux) -> None:
    """Rows the one-pass kernels cannot represent, taken again in float64 from their maximum.

    gem sums ``max(x, eps)^p`` unscaled (scaling by the row's maximum would need a second read
    of x): that sum overflows (p = 20 on x near 100, float16 near 6e4 with p = 8) or leaves the
    normal range (p = 20 on x < 1e-3, or x <= eps). lse is NaN where a row holds +inf (inf - inf
    in its sum). Those rows (almost never any) are pooled here by the NumPy reference, which
    scales by the maximum in float64, as the torch composition does.
    """
    y = out[:, : aux.shape[-1]] if kind == "lse" else out
    if kind == "gem":  # the mean of z^p must be normal: lost tiny terms then weigh < 2**-23
        low = (np.finfo(y.dtype).tiny / np.finfo(y.dtype).eps) ** (1.0 / p)
        bad = ~((y >= low) & (y < np.inf))  # also NaN rows: taken again, NaN again
    else:
        bad = np.isnan(y)  # +inf in the row (NaN x too: taken again, NaN again)
    if not bad.any():  # the common case: two or three passes over the (N, C) outputs
        return
    n, c = y.shape
    real = None if mask is None else mask.reshape(n, -1).numpy()
    if real is not None:
        bad &= real.any(1)[:, None]  # an empty sample's 0 is right
    rows = np.flatnonzero(bad)
    if not len(rows):
        return
    n_idx, c_idx = rows // c, rows % c
    xs = _widen64(xa[n_idx, :, c_idx] if channels_last else xa[n_idx, c_idx, :])
    keep = None if real is None else real[n_idx]
    with np.errstate(all="ignore"):  # the NumPy reference, one row per sample
        y[n_idx, c_idx] = reference.pool_forward(xs[:, None, :], kind, mask=keep, p=p, eps=eps,
                                                 r=r)[:, 0]


def _widen64(a: np.ndarray) -> np.ndarray:
    """Raw values (float16 as uint16, bfloat16 as int16 bits) as float64."""
    if a.dtype == np.uint16:
        return a.view(np.float16).astype(np.float64)
    if a.dtype == np.int16:
        return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


@functools.lru_cache(maxsize=256)
def _plan(n: int, c: int, length: int, channels_last: bool) -> tuple:
    """Per-shape constants: the all-real mask row, the real counts and the work split."""
    if channels_last:
        split, nch = _cl_split(n, c, length, _MAX_THREADS)
    else:
        split, nch = _row_tasks(n * c, _MAX_THREADS), 1
    return _all_real(length), _full_counts(n, length), split, nch


def _forward(xa, channels_last, kind, mask, p, eps, r, weights, out, aux, need_aux) -> None:
    n, length, c = xa.shape if channels_last else (xa.shape[0], xa.shape[2], xa.shape[1])
    acc = out.dtype.type
    m, den, split, nch = _plan(n, c, length, channels_last)
    ms = 0
    if mask is not None:
        m, ms = _mask_rows(mask, length)
        den = _counts(m, ms, n, length)
    chunked = nch > 1  # channels-last: partials per chunk of L, merged by the kernel
    part = (n, nch, c) if chunked else (1, 1, 1)
    if kind in MAX_KINDS:
        if channels_last:
            pm, ps = np.empty(part, dtype=acc), np.empty(part, dtype=acc)
            pi, pt = np.empty(part, dtype=np.int32), np.empty(part, dtype=np.int32)
            mode = _MAX_MODE[kind]
            K.fwd_max_cl(
                xa, m, ms, mode, den, out, aux, split, need_aux, nch, chunked, pm, ps, pi, pt
            )
        else:
            long_rows = need_aux and K.max_long_rows(length, acc)
            K.fwd_max_cf(xa, m, ms, _MAX_MODE[kind], den, out, aux, split, need_aux, long_rows)
        return
    if kind == "lse":
        rl = acc(r * LOG2E)  # the kernels work in base 2 and write the finished result
        atop, alog = aux.reshape(2, n * c)  # views: the kernels write aux through them
        if channels_last:
            pm, ps = np.empty(part, dtype=acc), np.empty(part, dtype=acc)
            K.fwd_lse_cl(xa, m, ms, rl, den, out, split, nch, chunked, pm, ps, atop, alog)
        else:
            K.fwd_lse_cf(xa, m, ms, rl, den, out, split, atop, alog)
        return
    if kind == "attention":
        wa, ws = _np(weights.contiguous()), 1
        den = _weight_sums(wa, m, ms)
    else:
        wa, ws = _NO_WEIGHTS[xa.dtype.char], 0
    if kind == "sum":
        den = _unit_counts(n)
    ip = _p_int(p) if kind == "gem" else 0
    args = (xa, m, ms, wa, ws, _SUM_MODE[kind], acc(p), ip, acc(eps), den, out, split)
    if channels_last:
        K.fwd_sum_cl(*args, nch, chunked, np.empty(part, dtype=acc))
    else:
        K.fwd_sum_cf(*args)


# --------------------------------------------------------------------------------------------
# backward


def backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    aux: torch.Tensor,
    channels_last: bool,
    kind: str,
    mask: torch.Tensor | None,
    p: float = 3.0,
    eps: float = 1e-6,
    r: float = 1.0,
    weights: torch.Tensor | None = None,
    *,
    need_p: bool = True,
    need_weights: bool = True,
    tied: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. x (one write), p (gem) and weights (attention).

    ``x`` is read only by gem, lse, attention and rows whose maximum is tied: for avg (and the
    max kinds without ties) it may be a placeholder of the right shape and dtype (e.g. an
    expanded scalar), and ``out`` is only used by gem and lse. For the max kinds,
    ``tied = (rows, x_rows)`` (see :func:`tied_rows`) may stand in for x: the flat indices
    ``n * C + c`` of the rows whose maximum is tied and their values, ``(T, L)``.
    Returns ``(grad_x, grad_p, grad_weights)``: grad_p a 0-dim tensor for gem (else None), float32
    (float64 for float64 x, so that a float64 GeM exponent keeps its precision),
    grad_weights ``(N, L)`` in weights' dtype for attention (else None).

    >>> import torch
    >>> x = torch.tensor([[[1.0, 2.0], [5.0, 5.0]]])
    >>> backward(torch.ones(1, 2), x, None, None, False, "avg", None)[0]
    tensor([[[0.5000, 0.5000],
             [0.5000, 0.5000]]])
    """
    n, c, length = _dims(x, channels_last)
    gx = empty_huge(tuple(x.shape), x.dtype)  # written once: huge pages halve its first touch
    p_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad_p = torch.zeros((), dtype=p_dtype) if kind == "gem" else None
    grad_w = None
    if kind == "attention":
        grad_w = torch.zeros((n, length), dtype=weights.dtype)
    if n * c == 0 or length == 0:
        return gx.zero_(), grad_p, grad_w
    width = 2 * c if kind == "catavgmax" else c
    g = _np_float(grad_out, np.float64).reshape(n, width)
    m, ms = _mask_rows(mask, length)
    den = _counts(m, ms, n, length)
    gxa = _np(gx)
    with _parallelism(gx.numel()):
        nch = _l_chunks(n, length)
        if kind in ("gem", "lse"):
            with_p = kind == "gem" and need_p
            aux = _nl_aux(x, out, aux, channels_last, kind, mask, p, eps, r)
            y, parts = _backward_nl(
                g, x, aux, channels_last, kind, m, ms, den, p, eps, r, gxa, nch, with_p
            )
            if with_p:  # the kernels sum u^p and u^p log2 u per (n, chunk of L, c)
                s0, s1 = (part.astype(np.float64).sum(1) for part in parts)
                grad_p = torch.tensor(gem_grad_p(g, y, den, p, s0, s1 * LN2), dtype=p_dtype)
            return gx, grad_p, grad_w
        gw = _backward_linear(
            g, x, aux, channels_last, kind, m, ms, den, weights, gxa, nch, need_weights, tied
        )
    if gw is not None:
        grad_w = _to_torch(gw, weights.dtype)
    return gx, grad_p, grad_w


def _backward_linear(
    g, x, aux, channels_last, kind, m, ms, den, weights, gxa, nch, need_weights, saved=None
):
    """avg, attention and the max scatter: grad = A[n, c] B[n, l] + G[n, c] [l = arg-max].

    With ``saved`` tied rows given instead of x, the kernel scatters those rows as if untied and
    :func:`_rewrite_tied` then writes them again from their saved values."""
    n, c, length = _dims(x, channels_last)
    acc = _acc(x)
    zeros = np.zeros((n, c), dtype=acc)
    a_coef, g_max = zeros, zeros
    inv = 1.0 if kind == "sum" else _inverse(den)[:, None]
    if kind in ("avg", "sum", "avgmax", "catavgmax"):
        scale = 0.5 if kind == "avgmax" else 1.0
        a_coef = (g[:, :c] * (scale * inv)).astype(acc)
    if kind in MAX_KINDS:
        g_max = g[:, c:] if kind == "catavgmax" else g * (0.5 if kind == "avgmax" else 1.0)
        g_max = np.ascontiguousarray(g_max, dtype=acc)
        aux_a = aux.numpy()
        idx = np.ascontiguousarray(aux_a[..., 0])
        ties = np.ascontiguousarray(aux_a[..., 1])
        if saved is not None:
            ties = np.minimum(ties, 1)  # x is not here: the kernel must not read it
    else:
        idx = np.full((n, c), -1, dtype=np.int32)
        ties = np.zeros((n, c), dtype=np.int32)
    need_w = kind == "attention" and need_weights
    wa, ws = _NO_WEIGHTS[_CHAR_OF[x.dtype]], 0
    if kind == "attention":
        wa, ws = _np(weights.contiguous()), 1
        w_sums = _weight_sums(wa, m, ms)
        a_coef = (g * _inverse(w_sums)[:, None]).astype(acc)
    tied = ties > 1
    xa = _np(x) if (need_w or tied.any()) else _np(_placeholder(x))
    d_rows = np.zeros((n, length) if need_w else (1, 1), dtype=acc)  # sum_c A_c x_cl
    if channels_last:
        K.bwd_lin_cl(
            xa,
            m,
            ms,
            wa,
            ws,
            ws == 1,
            a_coef,
            g_max,
            idx,
            ties,
            tied.any(1),
            gxa,
            d_rows,
            need_w,
            nch,
        )
    else:
        K.bwd_lin_cf(
            xa, m, ms, wa, ws, ws == 1, a_coef, g_max, idx, ties, gxa, d_rows, need_w, nch
        )
    if saved is not None and len(saved[0]):
        _rewrite_tied(gxa, channels_last, saved, a_coef, g_max, m, ms)
    return _centred(d_rows, weights, w_sums, m) if need_w else None


def _centred(
    d: np.ndarray, weights: torch.Tensor, w_sums: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """The attention weights' gradient from ``d_l = sum_c g_c x_cl / S``: ``d_l - sum_l' w_l'
    d_l' / S`` at real positions (S = ``w_sums``, the sums of the real weights), 0 at padded
    ones. The same as ``sum_c g_c (x_cl - out_c) / S`` without the output, which is rounded to
    x's dtype: in bfloat16 its error (2**-9 of |out|) survived the cancellation against x
    (measured: -0.31 for -0.28)."""
    w = np.where(mask, _np_float(weights, np.float64), 0.0)
    d = d.astype(np.float64)
    mean = (w * d).sum(1) * _inverse(w_sums)
    return np.where(mask, d - mean[:, None], 0.0)


def tied_rows(x: torch.Tensor, aux: torch.Tensor, channels_last: bool):
    """``(rows, x_rows)`` for the rows of a max-kind forward whose maximum is tied: the flat
    indices ``n * C + c`` (int64) and those rows' values along L, ``(T, L)`` — all that the
    backward needs of x, usually far less than x itself.

    >>> import torch
    >>> x = torch.tensor([[[1.0, 3.0, 3.0], [0.0, 2.0, 1.0]]])
    >>> rows, vals = tied_rows(x, forward(x, False, "max", None)[1], False)
    >>> rows, vals
    (tensor([0]), tensor([[1., 3., 3.]]))
    """
    rows = (aux[..., 1] > 1).flatten().nonzero().squeeze(1)
    if not channels_last:  # whole rows of a (N * C, L) view: one gather, no index arithmetic
        return rows, x.reshape(-1, x.shape[-1]).index_select(0, rows)
    c = aux.shape[1]
    return rows, x[rows // c, :, rows % c]


def _rewrite_tied(gxa, channels_last, tied, a_coef, g_max, m, ms):
    """Tied rows: grad = A (at real positions) + G / T at every real position equal to the max
    (:func:`globalpool.kernels.cpu_kernels.bwd_tied`, from the rows' saved values)."""
    rows, x_rows = tied
    rows = np.ascontiguousarray(rows.numpy(), dtype=np.int64)
    K.bwd_tied(rows, _np(x_rows.contiguous()), m, ms, a_coef, g_max, gxa, channels_last)


def _placeholder(x: torch.Tensor) -> torch.Tensor:
    """A one-element stand-in with x's rank and dtype for kernels that will not read x."""
    return torch.zeros((1, 1, 1), dtype=x.dtype)


def _nl_aux(x, out, aux, channels_last, kind, mask, p, eps, r) -> torch.Tensor:
    """The forward's aux for gem / lse (see :func:`forward`); taken again if a caller has none:
    gem then falls back to ``out`` (exact in float32 and float64)."""
    n, c, _ = _dims(x, channels_last)
    want = (2, n, c) if kind == "lse" else (n, c)
    if aux is not None and tuple(aux.shape) == want and aux.is_floating_point():
        return aux
    if kind == "gem" and out is not None and out.dtype in (torch.float32, torch.float64):
        return out
    return forward(x.detach(), channels_last, kind, mask, p, eps, r)[1]


def _backward_nl(g, x, aux, channels_last, kind, m, ms, den, p, eps, r, gxa, nch, with_p):
    """gem / lse: grad = Q * h(x); returns gem's output (float64) and partial sums (S0, S1) per
    (n, chunk, c) of the scaled z = max(x, eps) / y."""
    n, c, _ = _dims(x, channels_last)
    acc = _acc(x)
    q = g * _inverse(den)[:, None]
    if kind == "gem":
        y = _np_float(aux, np.float64).reshape(n, c)
        yv = _inverse(np.where(np.isinf(y), 0.0, y))  # 1 / y; 0 for an empty sample
        tv = yv
        mode = K.NL_GEM
    else:
        a = _np_float(aux, np.float64)
        y, yv = None, a[1]
        tv = np.where(np.isfinite(a[0]), a[0], 0.0)  # the maximum the forward's sums used
        mode = K.NL_LSE
        r = r * LOG2E  # the kernel works in base 2
    shape = (n, nch, c) if with_p else (1, 1, 1)
    p0 = np.zeros(shape, dtype=acc)
    p1 = np.zeros(shape, dtype=acc)
    fn = K.bwd_nl_cl if channels_last else K.bwd_nl_cf
    fn(
        _np(x),
        m,
        ms,
        q.astype(acc),
        yv.astype(acc),
        tv.astype(acc),
        mode,
        acc(p),
        _p_int(p) if kind == "gem" else 0,
        acc(eps),
        acc(r),
        gxa,
        p0,
        p1,
        with_p,
        nch,
    )
    return y, (p0, p1)


def gem_grad_p(
    g: np.ndarray, y: np.ndarray, count: np.ndarray, p: float, s0: np.ndarray, s1: np.ndarray
) -> float:
    """GeM's d/dp of ``sum(g * y)``, finished from the sums the CPU backward kernels (grid and
    packed) take over each row's real positions: ``s0 = sum u^p`` and ``s1 = sum u^p ln u`` with
    ``u = max(x, eps) / y``. ``g``, ``y``, ``s0``, ``s1`` are ``(N, C)``, ``count`` ``(N,)`` the
    real positions per row.

    With ``y = M^(1/p)``, ``M = mean max(x, eps)^p`` and ``mu = s0 / count`` (1 up to the rounding
    of y), ``dy/dp = y (s1 / (p s0) - ln(mu) / p^2)`` exactly: no power of an unscaled x, so none
    overflows. Rows that are empty, whose sums vanish or whose y is not finite add 0.

    >>> u = np.array([0.5, 1.5])  # x = (1, 3), p = 1: y = 2
    >>> round(gem_grad_p(np.ones((1, 1)), np.full((1, 1), 2.0), np.array([2]), 1.0,
    ...                  np.full((1, 1), u.sum()), np.full((1, 1), (u * np.log(u)).sum())), 6)
    0.261624
    """
    k = np.asarray(count, dtype=np.float64).reshape(-1, 1)
    y = np.asarray(y, dtype=np.float64)
    s0, s1 = np.asarray(s0, dtype=np.float64), np.asarray(s1, dtype=np.float64)
    p = float(p)
    real = (k > 0) & (s0 > 0) & np.isfinite(y)
    with np.errstate(all="ignore"):
        mu = s0 / np.where(k > 0, k, 1.0)
        dydp = y * (s1 / np.where(real, s0, 1.0) / p - np.log(np.where(real, mu, 1.0)) / p**2)
    return float((g * np.where(real, dydp, 0.0)).sum())
