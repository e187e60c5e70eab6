"""Numba kernels for packed variable-length sequences (all jitted code of ``gp.pool_packed``).

``x`` is ``(T, C)``: N sequences concatenated along T, sequence ``n`` the rows
``cu[n]:cu[n + 1]`` of the int64 offsets ``cu`` (N + 1 of them). Tasks are sequences
(``prange``), each reading its rows once, in order, with the inner loops over the C contiguous
channels; a sequence's running state (sums, maxima, tie counts, gem's and lse's scaled sums) lives
in its own rows of the output arrays, a few KiB that stay in L1.

Tasks are runs of whole sequences of about equal row counts (``bounds``: task ``j`` pools
sequences ``bounds[j]:bounds[j + 1]``), so that sequences of very different lengths still share
the cores evenly.

The helpers shared with :mod:`globalpool.kernels.cpu_kernels` (conversions, the fast exp) come
from :mod:`globalpool.kernels.cpu_simd`, named in the kernels' ``helpers`` (numba caches by
source file: see :mod:`globalpool.kernels.launch`); cached the same way
(:func:`globalpool.kernels.launch.can_cache`); launched through
:func:`globalpool.kernels.launch.parallel_kernel`, so that a ``fork()``ed child of an OpenMP
process runs them on its calling thread. ``group`` is the kernel's compile-time mode
(compiled once per group of kinds, on first use); ``mode`` picks the kind inside the group at
run time, outside the loops over positions.

Data: float16 arrives as ``uint16`` and bfloat16 as ``int16`` (same bits); loads widen to the
accumulation type (float32, float64 for float64 x) and the gradient's stores round back (nearest
even). Every other array (outputs, state, weights, gradients of the output) is in the
accumulation type. fastmath leaves out ``nnan``/``ninf``: NaN and inf keep their IEEE meaning.

Kinds (``MODES``): avg, sum, first, last, attention (group ``LINEAR``); max, avgmax, catavgmax
(``MAXES``: running maximum with its tie count, NaN propagating); gem (``GEM``: clamped at eps,
the sum of ``z^p`` in one read, as the grid kernels take it; a sequence whose mean of ``z^p``
overflows or leaves the normal range is read again with the running sum of ``(z / top)^p``
rescaled whenever the maximum ``top`` grows, so no power leaves [0, 1] and p = 64 neither
overflows nor underflows to a wrong value); lse (``LSE``: the
running sum of ``exp(r (x - top))`` rescaled in the same way; +-inf need no special case).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from globalpool.kernels import cpu_simd, launch
from globalpool.kernels.cpu_simd import (
    FASTMATH,
    U,
    fexp,
    flush_into,
    like,
    narrow,
    root_span,
    widen,
)


def _cache_probe():  # pragma: no cover - never called: tells launch.can_cache about this file
    pass


CACHE = launch.can_cache(_cache_probe)
_helper = njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=CACHE)
_OPTIONS = {"fastmath": FASTMATH, "error_model": "numpy", "cache": CACHE, "helpers": (cpu_simd,)}
_kernel = launch.parallel_kernel(("group",), **_OPTIONS)
_backward_kernel = launch.parallel_kernel(("group",), noalias=True, **_OPTIONS)  # see cpu_kernels

# groups (compile-time) and modes (run-time) of the kinds
LINEAR, MAXES, GEM, LSE = 0, 1, 2, 3
AVG, SUM, FIRST, LAST, ATTENTION = 0, 1, 2, 3, 4
MAX, AVGMAX, CATAVGMAX = 0, 1, 2
MODES = {
    "avg": (LINEAR, AVG),
    "sum": (LINEAR, SUM),
    "first": (LINEAR, FIRST),
    "last": (LINEAR, LAST),
    "attention": (LINEAR, ATTENTION),
    "max": (MAXES, MAX),
    "avgmax": (MAXES, AVGMAX),
    "catavgmax": (MAXES, CATAVGMAX),
    "gem": (GEM, 0),
    "lse": (LSE, 0),
}


@_helper
def _pow(q, p, ip):
    """q**p for q >= 0: multiplications for an integer p in 0..4 (``ip``), else ``pow``. With
    branches, not :func:`~globalpool.kernels.cpu_simd.ipow`'s selects: with ipow here (in the
    rescale, or in :func:`_gem_sums`' last loop, where it runs p = 4 twice as fast) the forward
    at p = 3 compiled 3-12% slower (256 sequences of 0-200 rows x 768, one thread)."""
    if ip == 1:
        return q
    if ip == 2:
        return q * q
    if ip == 3:
        return q * q * q
    if ip == 4:
        q2 = q * q
        return q2 * q2
    if ip == 0 and p == 0:
        return like(1.0, q)
    return q**p


# --------------------------------------------------------------------------------------------
# forward
#   out (N, width * C): the result in the accumulation type; A, B (N, C): per-group state kept
#   for the backward (MAXES: A the maximum, cnt room for the tie counts the backward takes; GEM:
#   A, B the scaled read's running maximum and sums of (z / A)^p, not read by the backward;
#   LSE: A the maximum, B the sum of exp(r (x - A))); wsum (N,): attention's weight sums.
#   Arrays a group does not use are (1, 1) / (1,) stand-ins, never indexed.


@_kernel
def forward(x, cu, bounds, w, group, mode, p, ip, eps, r, out, A, B, cnt, wsum):
    C = x.shape[1]
    # rows per chunk: 128 KiB of float32 (L2). Every running sum covers one chunk (``blk``, in
    # the accumulation type) and is added to a float64 total (``tot``) after it: two-level
    # summation, so the rounding error does not grow with the sequence's length
    rows = max(1, 32768 // C)
    for task in prange(bounds.shape[0] - 1):  # tasks of about equal rows
        tot = np.empty(C, np.float64)
        blk = np.zeros(C, out.dtype)  # flush_into leaves it 0 again
        for n in range(bounds[task], bounds[task + 1]):
            s = cu[n]
            e = cu[n + 1]
            k = e - s
            o = out[n]
            zero = like(0.0, eps)
            if k <= 0:  # an empty sequence pools to 0
                for j in range(o.shape[0]):
                    o[U(j)] = zero
                if group == LINEAR and mode == ATTENTION:
                    wsum[n] = zero
                if group == MAXES:
                    for c in range(C):
                        A[n, U(c)] = zero
                continue
            inv = like(1.0, eps) / like(k, eps)
            if group == LINEAR:
                if mode in (FIRST, LAST):
                    row = s if mode == FIRST else e - 1
                    for c in range(C):
                        o[U(c)] = widen(x[row, U(c)])
                elif mode == ATTENTION:
                    _zero(tot, C)
                    total = 0.0
                    for a in range(s, e, rows):
                        part = zero
                        for t in range(a, min(a + rows, e)):
                            wt = w[t]
                            part += wt
                            for c in range(C):
                                blk[U(c)] += wt * widen(x[t, U(c)])
                        total += part
                        flush_into(tot, blk, C)
                    wsum[n] = total
                    scale = 1.0 / total if total > 0.0 else 0.0
                    for c in range(C):
                        o[U(c)] = tot[U(c)] * scale if total > 0.0 else zero
                else:  # avg, sum
                    _zero(tot, C)
                    for a in range(s, e, rows):
                        _row_sums(x, a, min(a + rows, e), C, blk)
                        flush_into(tot, blk, C)
                    scale = inv if mode == AVG else like(1.0, eps)
                    for c in range(C):
                        o[U(c)] = tot[U(c)] * scale
            elif group == MAXES:
                m = A[n]
                for c in range(C):
                    m[U(c)] = like(-np.inf, eps)
                    o[U(c)] = zero
                if mode == MAX:  # selects only: the loops vectorise (ties are counted backward)
                    for t in range(s, e):
                        for c in range(C):
                            u = U(c)
                            v = widen(x[t, u])
                            # a NaN becomes the maximum and stays it, as in torch.amax
                            m[u] = v if (v > m[u]) | (v != v) else m[u]
                else:
                    _zero(tot, C)
                    for a in range(s, e, rows):
                        for t in range(a, min(a + rows, e)):
                            for c in range(C):
                                u = U(c)
                                v = widen(x[t, u])
                                blk[u] += v
                                m[u] = v if (v > m[u]) | (v != v) else m[u]
                        flush_into(tot, blk, C)
                    for c in range(C):
                        o[U(c)] = tot[U(c)]
                for c in range(C):
                    u = U(c)
                    if mode == MAX:
                        o[u] = m[u]
                    elif mode == AVGMAX:
                        o[u] = like(0.5, eps) * (o[u] * inv + m[u])
                    else:
                        o[u] = o[u] * inv
                        o[U(C + c)] = m[u]
            elif group == GEM:
                top = A[n]
                acc = B[n]
                cm = np.empty(C, A.dtype)
                one = like(1.0, eps)
                # one read: the sums of z^p unscaled (top = 1), as the grid kernels take them
                for c in range(C):
                    cm[U(c)] = one
                    tot[U(c)] = 0.0
                for a in range(s, e, rows):
                    _gem_sums(x, a, min(a + rows, e), C, eps, p, ip, cm, blk)
                    flush_into(tot, blk, C)
                if _gem_means_normal(tot, C, 1.0 / k):
                    for c in range(C):
                        o[U(c)] = tot[U(c)] * inv
                    root_span(o, 0, C, one / p)
                    continue
                # a mean of z^p that overflowed, left the normal range, or holds inf or NaN:
                # the sequence again, each sum scaled by its maximum
                for c in range(C):
                    top[U(c)] = zero
                    tot[U(c)] = 0.0
                for a in range(s, e, rows):  # chunks of rows, re-read from L1
                    b = min(a + rows, e)
                    for c in range(C):
                        cm[U(c)] = eps
                    for t in range(a, b):
                        for c in range(C):
                            v = widen(x[t, U(c)])
                            cm[U(c)] = v if v > cm[U(c)] else cm[U(c)]  # NaN: pass B carries it
                    for c in range(C):
                        u = U(c)
                        if cm[u] > top[u]:  # rescale the sum to the new maximum (0 the first time)
                            tot[u] = tot[u] * _pow(top[u] / cm[u], p, ip)
                            top[u] = cm[u]
                        cm[u] = one / top[u]
                    _gem_sums(x, a, b, C, eps, p, ip, cm, blk)
                    flush_into(tot, blk, C)
                for c in range(C):
                    acc[U(c)] = tot[U(c)]
                ip_ = one / p
                for c in range(C):
                    u = U(c)
                    y = top[u] * (acc[u] * inv) ** ip_
                    # a row holding +inf gives NaN, as the torch composition's inf / inf does
                    o[u] = y if top[u] < np.inf else like(np.nan, eps)
            else:  # LSE
                top = A[n]
                acc = B[n]
                cm = np.empty(C, A.dtype)
                for c in range(C):
                    top[U(c)] = like(-np.inf, eps)
                    tot[U(c)] = 0.0
                for a in range(s, e, rows):
                    b = min(a + rows, e)
                    for c in range(C):
                        cm[U(c)] = like(-np.inf, eps)
                    for t in range(a, b):
                        for c in range(C):
                            v = widen(x[t, U(c)])
                            cm[U(c)] = v if v > cm[U(c)] else cm[U(c)]
                    for c in range(C):
                        u = U(c)
                        if cm[u] > top[u]:  # from -inf: exp(-inf) = 0 drops what was counted
                            tot[u] = tot[u] * math.exp(r * (top[u] - cm[u]))
                            top[u] = cm[u]
                    for t in range(a, b):
                        for c in range(C):
                            u = U(c)
                            v = widen(x[t, u])
                            d = zero if v == top[u] else v - top[u]  # +-inf at the maximum count 1
                            blk[u] += fexp(r * d)  # NaN carries on
                    flush_into(tot, blk, C)
                for c in range(C):
                    u = U(c)
                    acc[u] = tot[u]
                    o[u] = top[u] + math.log(tot[u] * inv) / r


GEM_LOW_MEAN = 2.0**-103  # float32's smallest normal over its epsilon (see _gem_means_normal)


@_helper
def _gem_means_normal(tot, C, inv):
    """Whether every mean ``tot * inv`` of unscaled powers z^p lies in [2^-103, inf): then the
    terms lost below float32's normal range weigh less than 2^-23 of it. False for inf and NaN
    (a row holding +inf or NaN is taken scaled, which gives NaN as the composition does)."""
    fine = True
    for c in range(C):
        m = tot[U(c)] * inv
        fine &= (m >= GEM_LOW_MEAN) & (m < np.inf)
    return fine


@_helper
def _zero(a, C):
    for c in range(C):
        a[U(c)] = 0.0


@_helper
def _row_sums(x, a, b, C, acc):
    """acc += x[t] over rows a..b, four rows per pass over acc (one load and store of acc per
    four rows of x)."""
    b4 = a + (b - a) // 4 * 4
    for t in range(a, b4, 4):
        for c in range(C):
            u = U(c)
            acc[u] += (widen(x[t, u]) + widen(x[t + 1, u])) + (
                widen(x[t + 2, u]) + widen(x[t + 3, u]))
    for t in range(b4, b):
        for c in range(C):
            acc[U(c)] += widen(x[t, U(c)])


@_helper
def _cube(v, eps, itop):
    q = (eps if v < eps else v) * itop
    return q * q * q


@_helper
def _gem_sums(x, a, b, C, eps, p, ip, itop, acc):
    """acc += (max(x, eps) * itop)^p over rows a..b (itop: 1 / top, or 1 for unscaled sums),
    one loop per integer p (vectorised; p = 3, the default, four rows per pass over acc)."""
    if ip == 3:
        b4 = a + (b - a) // 4 * 4
        for t in range(a, b4, 4):
            for c in range(C):
                u = U(c)
                i = itop[u]
                acc[u] += (_cube(widen(x[t, u]), eps, i) + _cube(widen(x[t + 1, u]), eps, i)) + (
                    _cube(widen(x[t + 2, u]), eps, i) + _cube(widen(x[t + 3, u]), eps, i))
        for t in range(b4, b):
            for c in range(C):
                u = U(c)
                acc[u] += _cube(widen(x[t, u]), eps, itop[u])
    elif ip == 2:
        for t in range(a, b):
            for c in range(C):
                u = U(c)
                v = widen(x[t, u])
                q = (eps if v < eps else v) * itop[u]
                acc[u] += q * q
    else:
        for t in range(a, b):
            for c in range(C):
                u = U(c)
                v = widen(x[t, u])
                acc[u] += _pow((eps if v < eps else v) * itop[u], p, ip)


# --------------------------------------------------------------------------------------------
# backward: one write of gx (T, C) in x's dtype; x read by the max kinds, gem, lse and
# attention. g (N, width * C) and every state array in the accumulation type; gw (T,) gets
# attention's weight gradient (need_w); P0, P1 (N, C) gem's sums of u^p and u^p log u with
# u = max(x, eps) / y, for the gradient of p (need_p).


@_backward_kernel
def backward(g, x, cu, bounds, w, group, mode, p, ip, eps, r, out, A, B, cnt, wsum, gx, gw, P0, P1,
             need_p, need_w):
    C = gx.shape[1]
    rows = max(1, 32768 // C)  # gem's d/dp sums: per chunk of rows, then in float64 (forward)
    for task in prange(bounds.shape[0] - 1):  # tasks of about equal rows
        t0 = np.empty(C, np.float64)
        t1 = np.empty(C, np.float64)
        b0 = np.zeros(C, P0.dtype)
        b1 = np.zeros(C, P0.dtype)
        for n in range(bounds[task], bounds[task + 1]):
            s = cu[n]
            e = cu[n + 1]
            k = e - s
            zero = like(0.0, eps)
            if group == GEM and need_p:
                for c in range(C):
                    P0[n, U(c)] = zero
                    P1[n, U(c)] = zero
            if k <= 0:
                continue
            inv = like(1.0, eps) / like(k, eps)
            gn = g[n]
            if group == LINEAR:
                if mode in (FIRST, LAST):
                    row = s if mode == FIRST else e - 1
                    for t in range(s, e):
                        for c in range(C):
                            gx[t, U(c)] = narrow(gn[U(c)] if t == row else zero, gx)
                elif mode == ATTENTION:
                    total = wsum[n]
                    scale = like(1.0, eps) / total if total > zero else zero
                    y = out[n]
                    for t in range(s, e):
                        wt = w[t] * scale
                        d = zero
                        for c in range(C):
                            u = U(c)
                            gx[t, u] = narrow(gn[u] * wt, gx)
                            if need_w:
                                d += gn[u] * (widen(x[t, u]) - y[u])
                        if need_w:
                            gw[t] = d * scale
                else:
                    f = inv if mode == AVG else like(1.0, eps)
                    for t in range(s, e):
                        for c in range(C):
                            gx[t, U(c)] = narrow(gn[U(c)] * f, gx)
            elif group == MAXES:
                m = A[n]
                ct = cnt[n]  # the tie counts, from a first read of the sequence (then in cache)
                for c in range(C):
                    ct[U(c)] = 0
                for t in range(s, e):
                    for c in range(C):
                        u = U(c)
                        ct[u] += 1 if widen(x[t, u]) == m[u] else 0
                ga = np.empty(C, A.dtype)  # the avg part's coefficient and the max part's share
                gm = np.empty(C, A.dtype)
                for c in range(C):
                    u = U(c)
                    share = like(1.0, eps) / like(max(ct[u], 1), eps)
                    if mode == MAX:
                        ga[u], gm[u] = zero, gn[u] * share
                    elif mode == AVGMAX:
                        ga[u], gm[u] = like(0.5, eps) * gn[u] * inv, like(0.5, eps) * gn[u] * share
                    else:
                        ga[u], gm[u] = gn[u] * inv, gn[U(C + c)] * share
                for t in range(s, e):
                    for c in range(C):
                        u = U(c)
                        hit = widen(x[t, u]) == m[u]
                        gx[t, u] = narrow(ga[u] + (gm[u] if hit else zero), gx)
            elif group == GEM:
                y = out[n]
                q = np.empty(C, A.dtype)
                yi = np.empty(C, A.dtype)
                for c in range(C):
                    u = U(c)
                    q[u] = gn[u] * inv
                    yi[u] = like(1.0, eps) / y[u]
                if need_p:
                    _zero(t0, C)
                    _zero(t1, C)
                    for a in range(s, e, rows):
                        b = min(a + rows, e)
                        _gem_grad_rows(x, gx, a, b, C, eps, p, -1, q, yi, b0, b1, True)
                        flush_into(t0, b0, C)
                        flush_into(t1, b1, C)
                    for c in range(C):
                        P0[n, U(c)] = t0[U(c)]
                        P1[n, U(c)] = t1[U(c)]
                elif ip == 3:  # one loop per integer p: the powers vectorise
                    _gem_grad_rows(x, gx, s, e, C, eps, p, 3, q, yi, P0[0], P1[0], False)
                elif ip == 2:
                    _gem_grad_rows(x, gx, s, e, C, eps, p, 2, q, yi, P0[0], P1[0], False)
                elif ip == 1:
                    _gem_grad_rows(x, gx, s, e, C, eps, p, 1, q, yi, P0[0], P1[0], False)
                else:
                    _gem_grad_rows(x, gx, s, e, C, eps, p, ip, q, yi, P0[0], P1[0], False)
            else:  # LSE: g exp(r (x - top)) / sum exp(r (x - top))
                top = A[n]
                coef = np.empty(C, A.dtype)
                for c in range(C):
                    coef[U(c)] = gn[U(c)] / B[n, U(c)]
                for t in range(s, e):
                    for c in range(C):
                        u = U(c)
                        v = widen(x[t, u])
                        d = zero if v == top[u] else v - top[u]
                        gx[t, u] = narrow(coef[u] * fexp(r * d), gx)


@_helper
def _gem_grad_rows(x, gx, s, e, C, eps, p, ip, q, yi, s0, s1, need_p):
    """gx = q (z / y)^(p - 1) where x >= eps (else 0), z = max(x, eps), over rows s..e; with
    need_p also s0 += (z / y)^p and s1 += (z / y)^p log(z / y). ``ip`` is p when it is an
    integer in 1..4, else 0 (-1: unknown, take the general power)."""
    zero = like(0.0, eps)
    pm1 = p - like(1.0, eps)
    for t in range(s, e):
        for c in range(C):
            u = U(c)
            v = widen(x[t, u])
            zu = (eps if v < eps else v) * yi[u]
            if ip == 3:
                h = zu * zu
            elif ip == 2:
                h = zu
            elif ip == 1:
                h = like(1.0, eps)
            else:
                h = zu**pm1
            gx[t, u] = narrow(q[u] * h if v >= eps else zero, gx)
            if need_p:
                zp = h * zu
                s0[u] += zp
                s1[u] += zp * math.log(zu) if zp > zero else zero
