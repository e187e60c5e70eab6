"""Numba kernels behind :mod:`globalpool.kernels.cpu_numba`: pooling over a grid, ``(N, C, L)``
or ``(N, L, C)``.

The helpers they share with the packed kernels (element conversions, fast exp2 / log2, the
``Vec`` type and its intrinsics) are in :mod:`globalpool.kernels.cpu_simd`, named in each
kernel's ``helpers`` so that numba's cache, which is keyed on this file, is renewed when that
one changes (:mod:`globalpool.kernels.launch`). Every other helper these kernels inline is in
this file.

Data. Arrays arrive as NumPy views of torch tensors (float16 as ``uint16`` and bfloat16 as
``int16`` bits), widen to the accumulation type and round back on stores (see ``cpu_simd``).
Channels-first rows ``(N, C, L)`` are reduced with ``Vec`` values explicitly, two independent
vectors per step, so order-dependent states (running max with first arg-max and tie count,
log-sum-exp) vectorise too; channels-last ``(N, L, C)`` keeps one lane per channel.

Masks are ``(Nm, L)`` bool arrays read at row ``n * ms``: an unmasked call passes one all-True
row and ``ms = 0``, which the kernels test to skip mask loads. Padded positions are dropped with
selects, never multiplied by 0, so NaN/inf there never reaches a result.

fastmath allows reassociation and contraction but not ``nnan``/``ninf``: NaN and inf keep their
IEEE meaning.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types

from globalpool.kernels import cpu_simd, launch
from globalpool.kernels.cpu_simd import (
    FASTMATH,
    U,
    ctz,
    flush_into,
    hany,
    hmax,
    hsum,
    iadd,
    ieq,
    ifull,
    ipow,
    izero_of,
    lanes_of,
    lds,
    ldx,
    like,
    mand,
    mbits,
    mor,
    narrow,
    nlanes,
    popc,
    root_span,
    sexp2,
    slog2,
    spow,
    sts,
    vadd,
    vdiv,
    veq,
    vexp2,
    vexp2n,
    vfull,
    vget,
    vget_part,
    vgt,
    vgt_i,
    vipow,
    visnan,
    vlanes,
    vload,
    vload_part,
    vlog2,
    vlt,
    vmaximum,
    vmul,
    vput_part,
    vsel,
    vsub,
    vzero_of,
    widen,
)


def _cache_probe():  # pragma: no cover - never called: tells launch.can_cache about this file
    pass


CACHE = launch.can_cache(_cache_probe)  # False (with one warning) where numba cannot cache
# helpers are inlined into numba's IR, so a kernel's constant mode prunes their branches too
# (plain njit helpers left to LLVM compiled ~20% faster but ran the max forward up to 1.7x slower)
_helper = njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=CACHE)
# kernels: compiled once per value of their modal arguments (the other values' branches pruned
# before typing), launched on numba's pool through launch.parallel_kernel. The backward kernels
# store into gx in loops that also load: their arrays are promised not to overlap, as numba
# does for its own parallel loops (one thread, (64, 32, 28, 28): channels-last lse 25% and
# channels-first avg and max 12% less CPU time than without; it compiles in ~0.2 s more)
_MODAL = ("mode", "need_aux", "chunked", "long_rows", "channels_last")
_OPTIONS = {"fastmath": FASTMATH, "error_model": "numpy", "cache": CACHE, "helpers": (cpu_simd,)}
_kernel = launch.parallel_kernel(_MODAL, **_OPTIONS)
_backward_kernel = launch.parallel_kernel(_MODAL, noalias=True, **_OPTIONS)

# forward / backward modes (chosen by the Python side)
SUM_AVG, SUM_GEM, SUM_WEIGHTED = 0, 1, 2
MAX_ONLY, MAX_AVGMAX, MAX_CAT = 0, 1, 2
NL_GEM, NL_LSE = 0, 1


# --------------------------------------------------------------------------------------------
# forward: sum family (avg, gem, attention)


@_helper
def _finish_sum(s, den):
    """Mean over the real positions (0 for an empty sample). GeM's root is taken afterwards,
    vectorised over all outputs, by the caller."""
    return np.float64(s) / den if den > 0.0 else 0.0


@_helper
def _real(mask, off, z, ms):
    """Real-position lanes at flat mask offset off; an unmasked call (ms == 0) needs no load."""
    return vget(mask, off, z) if ms else veq(z, z)


@_helper
def _real_part(mask, off, k, z, ms):
    return vget_part(mask, off, k, z) if ms else vlanes(k, z)


@_helper
def _sum_step(s, v, real, wv, mode, pv, ip, epsv, z):
    """Add one vector of contributions (zero at padded lanes) to the lane sums ``s``."""
    if mode == SUM_AVG:
        return vadd(s, vsel(real, v, z))
    if mode == SUM_WEIGHTED:
        return vadd(s, vsel(real, vmul(v, wv), z))
    v = vsel(vlt(v, epsv), epsv, v)
    if ip > 0:
        return vadd(s, vsel(real, vipow(v, ip), z))
    return vadd(s, vsel(real, vexp2(vmul(pv, vlog2(v))), z))


ROWS4_MIN_L = 4096  # attention rows at least this long are summed four at a time (fwd_sum_cf)


@_helper
def _wsum_step(s, v, wv, real, z):
    """s + w * x at real lanes (a padded lane's NaN in x or w never reaches s)."""
    return vadd(s, vsel(real, vmul(v, wv), z))


@_helper
def _weighted_rows4(x, xo, L, mask, mo, ms, w, wo, z):
    """Lane sums of w * x over four rows of one sample (x at xo, xo + L, xo + 2L, xo + 3L):
    each vector of weights and of the mask is loaded once for the four rows."""
    W = nlanes(x)
    full = L // W * W
    chunk = W * 64  # lane sums are flushed into the totals every chunk (two-level summation)
    t0, t1, t2, t3 = z, z, z, z
    for c0 in range(0, full, chunk):
        s0, s1, s2, s3 = z, z, z, z
        for b in range(c0, min(c0 + chunk, full), W):
            wv = vload(w, wo + b)
            real = _real(mask, mo + b, z, ms)
            s0 = _wsum_step(s0, vload(x, xo + b), wv, real, z)
            s1 = _wsum_step(s1, vload(x, xo + L + b), wv, real, z)
            s2 = _wsum_step(s2, vload(x, xo + 2 * L + b), wv, real, z)
            s3 = _wsum_step(s3, vload(x, xo + 3 * L + b), wv, real, z)
        t0, t1, t2, t3 = vadd(t0, s0), vadd(t1, s1), vadd(t2, s2), vadd(t3, s3)
    if full < L:
        k = L - full
        wv = vload_part(w, wo + full, k)
        real = _real_part(mask, mo + full, k, z, ms)
        t0 = _wsum_step(t0, vload_part(x, xo + full, k), wv, real, z)
        t1 = _wsum_step(t1, vload_part(x, xo + L + full, k), wv, real, z)
        t2 = _wsum_step(t2, vload_part(x, xo + 2 * L + full, k), wv, real, z)
        t3 = _wsum_step(t3, vload_part(x, xo + 3 * L + full, k), wv, real, z)
    return hsum(t0), hsum(t1), hsum(t2), hsum(t3)


@_kernel
def fwd_sum_cf(x, mask, ms, w, ws, mode, p, ip, eps, den, out, ntask):
    N, C, L = x.shape
    rows = N * C
    W = nlanes(x)
    W2 = 2 * W
    full2 = L // W2 * W2
    chunk = W2 * 32  # lane sums are flushed into `total` every chunk (two-level summation)
    weighted = mode == SUM_WEIGHTED
    # four rows at a time share each load of w; on short rows the four interleaved streams
    # defeat the hardware prefetcher (measured slower from DRAM than one row at a time)
    rows4 = weighted and L >= ROWS4_MIN_L
    for t in prange(ntask):
        z = vzero_of(x)
        pv = vfull(p, z)
        epsv = vfull(eps, z)
        r0, r1 = t * rows // ntask, (t + 1) * rows // ntask
        row = r0
        while row < r1:
            n = row // C
            xo = row * L
            mo = n * ms * L
            wo = n * ws * L
            if rows4 and row + 4 <= r1 and (row + 3) // C == n:  # rows share w and mask
                a0, a1, a2, a3 = _weighted_rows4(x, xo, L, mask, mo, ms, w, wo, z)
                c = row - n * C
                out[n, c] = _finish_sum(a0, den[n])
                out[n, c + 1] = _finish_sum(a1, den[n])
                out[n, c + 2] = _finish_sum(a2, den[n])
                out[n, c + 3] = _finish_sum(a3, den[n])
                row += 4
                continue
            total = z
            for c0 in range(0, full2, chunk):
                s1 = z
                s2 = z
                for b in range(c0, min(c0 + chunk, full2), W2):
                    b2 = b + W
                    w1 = vload(w, wo + b) if weighted else z
                    w2 = vload(w, wo + b2) if weighted else z
                    s1 = _sum_step(
                        s1, vload(x, xo + b), _real(mask, mo + b, z, ms), w1, mode, pv, ip, epsv, z
                    )
                    s2 = _sum_step(
                        s2,
                        vload(x, xo + b2),
                        _real(mask, mo + b2, z, ms),
                        w2,
                        mode,
                        pv,
                        ip,
                        epsv,
                        z,
                    )
                total = vadd(total, vadd(s1, s2))
            for b in range(full2, L, W):
                k = min(W, L - b)
                wv = vload_part(w, wo + b, k) if weighted else z
                real = _real_part(mask, mo + b, k, z, ms)
                total = _sum_step(total, vload_part(x, xo + b, k), real, wv, mode, pv, ip, epsv, z)
            out[n, row - n * C] = _finish_sum(hsum(total), den[n])
            row += 1
        if mode == SUM_GEM:  # out's flat index is the row
            root_span(out, r0, r1, 1.0 / p)


# channels-last kernels: a task is (sample n, block of channels). Per-channel lane states live in
# small arrays; for each vector of channels they are loaded once per block of ROWS positions and
# updated in registers while x streams along C (ROWS concurrent contiguous streams).
ROWS = 8
# Running float32 sums cover at most SPAN positions; each span's sums are then added to float64
# totals (two-level summation), so the rounding error does not grow with the row length
# (float32 results stay within ~1e-6 of float64 at 2**20 positions). A multiple of ROWS.
SPAN = 2048


@_helper
def _cl_task(t, nb, nch, cb, C, L):
    """Task t of a channels-last kernel: (sample, first channel, channels, chunk, positions)."""
    n = t // (nb * nch)
    rest = t - n * nb * nch
    blk = rest // nch
    ch = rest - blk * nch
    c0 = blk * cb
    return n, c0, min(cb, C - c0), ch, ch * L // nch, (ch + 1) * L // nch


@_helper
def _plain_cl_sum(x, mask, ms, w, ws, mode, ip, eps, n, c0, k, la, lb, acc):
    """acc[j] += contribution of x[n, pos, c0 + j] for the real pos in [la, lb), positions in
    memory order and channels innermost: plain loops that LLVM vectorises, a single forward
    stream (measured 0.81 -> 1.08 of x.sum() on (8, 224, 224, 64) against the blocked loop)."""
    xf = x.reshape(x.size)
    L, C = x.shape[1], x.shape[2]
    for pos in range(la, lb):
        if mask[n * ms, pos]:
            b = U((n * L + pos) * C + c0)
            if mode == SUM_AVG:
                for j in range(U(k)):
                    acc[j] += widen(xf[b + j])
            elif mode == SUM_WEIGHTED:
                wv = widen(w[n * ws, pos])
                for j in range(U(k)):
                    acc[j] += widen(xf[b + j]) * wv
            else:  # gem, integer p; NaN is not < eps and stays NaN
                for j in range(U(k)):
                    v = widen(xf[b + j])
                    acc[j] += ipow(eps if v < eps else v, ip)


@_kernel
def fwd_sum_cl(x, mask, ms, w, ws, mode, p, ip, eps, den, out, cb, nch, chunked, part):
    """Tasks are (sample, block of cb channels, chunk of L). With ``nch > 1`` chunks (too few
    samples to keep every core busy) each task writes partial sums to ``part[n, chunk, c]`` and
    a second parallel loop adds them up; blocks stay whole rows of C where possible, as tasks
    that share cache lines read them twice."""
    N, L, C = x.shape
    nb = (C + cb - 1) // cb
    W = nlanes(x)
    weighted = mode == SUM_WEIGHTED
    for t in prange(N * nb * nch):
        n, c0, k, ch, la, lb = _cl_task(t, nb, nch, cb, C, L)
        z = vzero_of(x)
        pv = vfull(p, z)
        epsv = vfull(eps, z)
        real = veq(z, z)
        acc = np.zeros(k, out.dtype)
        tot = np.zeros(k, np.float64)
        for sa in range(la, lb, SPAN):
            sb = min(sa + SPAN, lb)
            if mode != SUM_GEM or ip > 0:
                _plain_cl_sum(x, mask, ms, w, ws, mode, ip, eps, n, c0, k, sa, sb, acc)
            else:
                for l0 in range(sa, sb, ROWS):
                    l1 = min(l0 + ROWS, sb)
                    for j in range(0, k, W):
                        r = min(W, k - j)
                        s = lds(acc, j, r, W, z)
                        for pos in range(l0, l1):
                            if mask[n * ms, pos]:
                                wv = vfull(widen(w[n * ws, pos]), z) if weighted else z
                                v = ldx(x, (n * L + pos) * C + c0 + j, r, W)
                                s = _sum_step(s, v, real, wv, mode, pv, ip, epsv, z)
                        sts(acc, j, s, r, W)
            flush_into(tot, acc, k)
        for j in range(k):
            acc[j] = tot[j]
        if chunked:
            for j in range(k):
                part[n, ch, c0 + j] = acc[j]
            continue
        for j in range(k):
            out[n, c0 + j] = _finish_sum(acc[j], den[n])
        if mode == SUM_GEM:
            root_span(out, n * C + c0, n * C + c0 + k, 1.0 / p)
    if chunked:
        for n in prange(N):
            for c in range(C):
                s = part[n, 0, c]
                for ch in range(1, nch):
                    s += part[n, ch, c]
                out[n, c] = _finish_sum(s, den[n])
            if mode == SUM_GEM:
                root_span(out, n * C, (n + 1) * C, 1.0 / p)


# --------------------------------------------------------------------------------------------
# forward: max family (max, avgmax, catavgmax) -> value, first arg-max, tie count (+ sum)


@_helper
def _max_sum_step(m, s, v, real, z):
    """Pass A: lane max over real lanes (NaN never wins) and lane sum (NaN propagates)."""
    return vsel(mand(real, vgt(v, m)), v, m), vadd(s, vsel(real, v, z))


@_helper
def _tie_bits(v, real, mv):
    """Pass B: bit mask of the real lanes equal to the max."""
    return mbits(mand(real, veq(v, mv)))


@_helper
def _finish_max(out, aux, n, c, C, mode, m, i, t, s, den, need_aux):
    mv = m if t > 0 else 0.0
    if need_aux:
        aux[n, c, 0] = i if t > 0 else -1
        aux[n, c, 1] = t
    avg = np.float64(s) / den if den > 0.0 else 0.0
    if mode == MAX_ONLY:
        out[n, c] = mv
    elif mode == MAX_AVGMAX:
        out[n, c] = 0.5 * (avg + mv)
    else:
        out[n, c] = avg
        out[n, C + c] = mv


@_helper
def _max_pass_a(x, xo, mask, mo, ms, c0, c1, W, z, ninf, s):
    """Pass A over positions [c0, c1) of a row: (max over real lanes, lane sums + s)."""
    W2 = 2 * W
    e2 = c0 + (c1 - c0) // W2 * W2
    ma, mb, sa, sb = ninf, ninf, s, z
    for b in range(c0, e2, W2):
        ma, sa = _max_sum_step(ma, sa, vload(x, xo + b), _real(mask, mo + b, z, ms), z)
        mb, sb = _max_sum_step(mb, sb, vload(x, xo + b + W), _real(mask, mo + b + W, z, ms), z)
    for b in range(e2, c1, W):
        k = min(W, c1 - b)
        real = _real_part(mask, mo + b, k, z, ms)
        ma, sa = _max_sum_step(ma, sa, vload_part(x, xo + b, k), real, z)
    return hmax(vmaximum(ma, mb)), vadd(sa, sb)


@_helper
def _max_pass_b(x, xo, mask, mo, ms, c0, c1, W, z, cm):
    """Pass B over [c0, c1): (number of real positions equal to cm, first such position)."""
    W2 = 2 * W
    e2 = c0 + (c1 - c0) // W2 * W2
    mv = vfull(cm, z)
    ct = 0
    cf = -1
    for b in range(c0, e2, W2):
        bits = _tie_bits(vload(x, xo + b), _real(mask, mo + b, z, ms), mv) | (
            _tie_bits(vload(x, xo + b + W), _real(mask, mo + b + W, z, ms), mv) << W
        )
        ct += popc(bits)
        cf = b + ctz(bits) if (cf < 0) & (bits != 0) else cf
    for b in range(e2, c1, W):
        k = min(W, c1 - b)
        bits = _tie_bits(vload_part(x, xo + b, k), _real_part(mask, mo + b, k, z, ms), mv)
        ct += popc(bits)
        cf = b + ctz(bits) if (cf < 0) & (bits != 0) else cf
    return ct, cf


@_helper
def _max_finish_row(x, mask, ms, mode, den, out, aux, row, C, L, m, ties, first, s, need_aux):
    n = row // C
    c = row - n * C
    if s != s:  # NaN (or inf - inf) in the sum: a real NaN, if any, is the max
        i = _first_nan(x, n, c, mask, n * ms, L)
        if i >= 0:
            m = np.nan
            ties = 1
            first = i
    _finish_max(out, aux, n, c, C, mode, m, first, ties, s, den[n], need_aux)


MAX_CHUNK_LANES = 64  # vectors per chunk of a long row in the channels-first max


def max_long_rows(length: int, acc: type) -> bool:
    """Whether rows of ``length`` positions, accumulated in ``acc`` (np.float32 or np.float64),
    take :func:`fwd_max_cf`'s chunked long-row path."""
    lanes = lanes_of(types.float64 if acc is np.float64 else types.float32)
    return length > MAX_CHUNK_LANES * lanes


@_kernel
def fwd_max_cf(x, mask, ms, mode, den, out, aux, ntask, need_aux, long_rows):
    """Two passes per chunk of a row (the chunk stays in L1): pass A takes lane maxima and sums;
    pass B, run only when the chunk's max reaches the running max, counts ties and finds the
    first arg-max. x leaves DRAM once and long rows mostly skip pass B. Rows of one chunk are
    software-pipelined: pass A of the next row runs before pass B of this one, hiding the
    latency of the horizontal max. Without ``need_aux`` (no backward will follow) pass B is
    skipped: the value needs only pass A and the count of real positions. ``long_rows``
    (``L > MAX_CHUNK_LANES`` vectors, chosen by the caller; compiled apart) splits rows into
    chunks of that many vectors."""
    N, C, L = x.shape
    rows = N * C
    W = nlanes(x)
    chunk = W * MAX_CHUNK_LANES
    for t in prange(ntask):
        z = vzero_of(x)
        ninf = vfull(-np.inf, z)
        r0 = t * rows // ntask
        r1 = (t + 1) * rows // ntask
        if not need_aux:
            for row in range(r0, r1):
                n = row // C
                cm = -np.inf
                total = 0.0  # float64: the chunks' lane sums are added up here (two-level sum)
                for c0 in range(0, L, chunk):
                    bm, sv = _max_pass_a(
                        x, row * L, mask, n * ms * L, ms, c0, min(c0 + chunk, L), W, z, ninf, z
                    )
                    cm = bm if bm > cm else cm
                    total += hsum(sv)
                ties = 1 if den[n] > 0.0 else 0
                _max_finish_row(
                    x, mask, ms, mode, den, out, aux, row, C, L, cm, ties, -1, total, False
                )
            continue
        if not long_rows:  # rows of one chunk: pass A of row k, then pass B of row k - 1
            cm_next, s_next = hmax(ninf), z
            for k in range(r0, r1 + 1):
                cm, sv = cm_next, s_next
                if k < r1:
                    cm_next, s_next = _max_pass_a(
                        x, k * L, mask, (k // C) * ms * L, ms, 0, L, W, z, ninf, z
                    )
                if k == r0:
                    continue
                row = k - 1
                ties, first = _max_pass_b(x, row * L, mask, (row // C) * ms * L, ms, 0, L, W, z, cm)
                m = cm if ties > 0 else -np.inf
                _max_finish_row(
                    x, mask, ms, mode, den, out, aux, row, C, L, m, ties, first, hsum(sv), True
                )
            continue
        for row in range(r0, r1):
            xo = row * L
            mo = (row // C) * ms * L
            m = -np.inf
            ties = 0
            first = -1
            total = 0.0  # float64, as above
            for c0 in range(0, L, chunk):
                c1 = min(c0 + chunk, L)
                cm, sv = _max_pass_a(x, xo, mask, mo, ms, c0, c1, W, z, ninf, z)
                total += hsum(sv)
                if cm < m:
                    continue
                ct, cf = _max_pass_b(x, xo, mask, mo, ms, c0, c1, W, z, cm)
                if ct > 0:
                    if cm > m or ties == 0:
                        m = cm
                        ties = ct
                        first = cf
                    else:
                        ties += ct
            _max_finish_row(
                x, mask, ms, mode, den, out, aux, row, C, L, m, ties, first, total, True
            )


@_helper
def _first_nan(x, n, c, mask, mi, L):
    for pos in range(L):
        v = widen(x[n, c, pos])
        if mask[mi, pos] and v != v:
            return pos
    return -1


@_helper
def _plain_cl_max(x, mask, ms, n, c0, k, la, lb, mx, sm, with_sum):
    """Value-only channels-last max (no arg-max), as plain loops in memory order (see
    :func:`_plain_cl_sum`). With the sum (avgmax, catavgmax) NaN never wins the max and the sums
    carry it; without (max), the max itself propagates NaN, one array update per element."""
    xf = x.reshape(x.size)
    L, C = x.shape[1], x.shape[2]
    for pos in range(la, lb):
        if mask[n * ms, pos]:
            b = U((n * L + pos) * C + c0)
            if with_sum:
                for j in range(U(k)):
                    v = widen(xf[b + j])
                    mx[j] = v if v > mx[j] else mx[j]
                    sm[j] += v
            else:
                for j in range(U(k)):
                    v = widen(xf[b + j])
                    mx[j] = v if (v > mx[j]) | (v != v) else mx[j]


@_helper
def _cl_max_step(m, s, v, with_sum):
    if with_sum:  # NaN never wins the max; the sum carries it
        return vsel(vgt(v, m), v, m), vadd(s, v)
    return vsel(mor(vgt(v, m), visnan(v)), v, m), s  # the max itself propagates NaN


REGS_CL_MAX = 4  # channel vectors up to which the value-only max keeps its state in registers


@_helper
def _regs_cl_max(x, mask, ms, n, c0, k, la, lb, mx, sm, with_sum):
    """:func:`_plain_cl_max` for k <= REGS_CL_MAX vectors of channels: the running maxima and
    sums stay in registers across positions instead of going through ``mx``/``sm`` at every
    position (that loop is bound by its loads and stores when rows are short: avgmax measured
    0.78-0.98 of ``x.sum()`` on (2, 262144, 32), 1.06 with registers)."""
    W = nlanes(x)
    z = vzero_of(x)
    ninf = vfull(-np.inf, z)
    L, C = x.shape[1], x.shape[2]
    ra, rb = min(k, W), min(max(k - W, 0), W)
    rc, rd = min(max(k - 2 * W, 0), W), min(max(k - 3 * W, 0), W)
    ma, mb, mc, md = ninf, ninf, ninf, ninf
    sa, sb, sc, sd = z, z, z, z
    for pos in range(la, lb):
        if mask[n * ms, pos]:
            b = (n * L + pos) * C + c0
            ma, sa = _cl_max_step(ma, sa, ldx(x, b, ra, W), with_sum)
            if rb > 0:
                mb, sb = _cl_max_step(mb, sb, ldx(x, b + W, rb, W), with_sum)
                if rc > 0:
                    mc, sc = _cl_max_step(mc, sc, ldx(x, b + 2 * W, rc, W), with_sum)
                    if rd > 0:
                        md, sd = _cl_max_step(md, sd, ldx(x, b + 3 * W, rd, W), with_sum)
    sts(mx, 0, ma, ra, W)
    sts(sm, 0, sa, ra, W)
    if rb > 0:
        sts(mx, W, mb, rb, W)
        sts(sm, W, sb, rb, W)
    if rc > 0:
        sts(mx, 2 * W, mc, rc, W)
        sts(sm, 2 * W, sc, rc, W)
    if rd > 0:
        sts(mx, 3 * W, md, rd, W)
        sts(sm, 3 * W, sd, rd, W)


@_kernel
def fwd_max_cl(x, mask, ms, mode, den, out, aux, cb, need_aux, nch, chunked, pm, ps, pi, pt):
    """Per vector of channels and block of ROWS positions: pass A takes the block's lane maxima
    and sums; pass B (the block is re-read from L1), only where a lane's block max reaches its
    running max, counts ties and finds the first position. Without ``need_aux`` a plain
    value-only loop (:func:`_plain_cl_max`) runs instead. With
    ``nch > 1`` chunks of L, tasks write (max, sum, first, ties) partials to ``pm, ps, pi, pt``
    ``[n, chunk, c]`` and a second loop merges them in chunk order (as in :func:`fwd_sum_cl`)."""
    N, L, C = x.shape
    nb = (C + cb - 1) // cb
    W = nlanes(x)
    for t in prange(N * nb * nch):
        n, c0, k, ch, la, lb = _cl_task(t, nb, nch, cb, C, L)
        z = vzero_of(x)
        ninf = vfull(-np.inf, z)
        izero = izero_of(z)
        ione = ifull(1, z)
        never = ifull(L, z)
        mx = np.full(k, -np.inf, out.dtype)
        sm = np.zeros(k, out.dtype)
        ix = np.full(k, -1, np.int32)
        tc = np.zeros(k, np.int32)
        tot = np.zeros(k, np.float64)  # the sums, span by span (see SPAN)
        if not need_aux:
            bm = np.full(k, -np.inf, out.dtype)
            for sa in range(la, lb, SPAN):
                sb = min(sa + SPAN, lb)
                if k <= REGS_CL_MAX * W:  # writes the span's maxima and sums to bm, sm
                    _regs_cl_max(x, mask, ms, n, c0, k, sa, sb, bm, sm, mode != MAX_ONLY)
                else:
                    for j in range(k):
                        bm[j] = -np.inf
                    _plain_cl_max(x, mask, ms, n, c0, k, sa, sb, bm, sm, mode != MAX_ONLY)
                for j in range(k):  # a NaN maximum (max alone) stays the maximum
                    mx[j] = bm[j] if (bm[j] > mx[j]) | (bm[j] != bm[j]) else mx[j]
                flush_into(tot, sm, k)
        flush_at = la + SPAN  # a compare per block of ROWS positions, no division
        for l0 in range(la, lb if need_aux else la, ROWS):  # with the arg-max table
            if l0 >= flush_at:
                flush_into(tot, sm, k)
                flush_at += SPAN
            l1 = min(l0 + ROWS, lb)
            for j in range(0, k, W):
                r = min(W, k - j)
                m = lds(mx, j, r, W, z)
                bm = ninf
                bs = lds(sm, j, r, W, z)
                for pos in range(l0, l1):
                    if mask[n * ms, pos]:
                        v = ldx(x, (n * L + pos) * C + c0 + j, r, W)
                        bm = vsel(vgt(v, bm), v, bm)
                        bs = vadd(bs, v)
                sts(sm, j, bs, r, W)
                gt = vgt(bm, m)
                eq = veq(bm, m)
                if hany(mor(gt, eq)):
                    c = lds(tc, j, r, W, z)
                    bt = izero
                    bi = never
                    for pos in range(l0, l1):
                        if mask[n * ms, pos]:
                            v = ldx(x, (n * L + pos) * C + c0 + j, r, W)
                            hit = veq(v, bm)
                            bt = iadd(bt, vsel(hit, ione, izero))
                            bi = vsel(mand(hit, ieq(bi, never)), ifull(pos, z), bi)
                    has = vgt_i(bt, izero)
                    newer = mand(has, mor(gt, mand(eq, ieq(c, izero))))
                    sts(ix, j, vsel(newer, bi, lds(ix, j, r, W, z)), r, W)
                    sts(tc, j, vsel(mand(has, gt), bt, vsel(eq, iadd(c, bt), c)), r, W)
                    sts(mx, j, vsel(gt, bm, m), r, W)
        flush_into(tot, sm, k)
        for j in range(k):
            m, i, ties, s = mx[j], ix[j], tc[j], tot[j]
            if not need_aux:
                ties = 1 if den[n] > 0.0 else 0
            if chunked:
                pm[n, ch, c0 + j], ps[n, ch, c0 + j] = m, s
                pi[n, ch, c0 + j], pt[n, ch, c0 + j] = i, ties
                continue
            if s != s:  # a real NaN, if any, is the max
                nan_at = _first_nan_cl(x, n, c0 + j, mask, n * ms, L)
                if nan_at >= 0:
                    m, i, ties = np.nan, nan_at, 1
            _finish_max(out, aux, n, c0 + j, C, mode, m, i, ties, s, den[n], need_aux)
    if chunked:
        for n in prange(N):
            for c in range(C):
                m, i, ties, s = pm[n, 0, c], pi[n, 0, c], pt[n, 0, c], ps[n, 0, c]
                for ch in range(1, nch):
                    s += ps[n, ch, c]
                    if pm[n, ch, c] != pm[n, ch, c]:  # a chunk's NaN max (value-only max)
                        m = pm[n, ch, c]
                        continue
                    if m != m:
                        continue
                    if pt[n, ch, c] > 0:
                        if ties == 0 or pm[n, ch, c] > m:
                            m, i, ties = pm[n, ch, c], pi[n, ch, c], pt[n, ch, c]
                        elif pm[n, ch, c] == m:
                            ties += pt[n, ch, c]
                if s != s:
                    nan_at = _first_nan_cl(x, n, c, mask, n * ms, L)
                    if nan_at >= 0:
                        m, i, ties = np.nan, nan_at, 1
                _finish_max(out, aux, n, c, C, mode, m, i, ties, s, den[n], need_aux)


@_helper
def _first_nan_cl(x, n, c, mask, mi, L):
    for pos in range(L):
        v = widen(x[n, pos, c])
        if mask[mi, pos] and v != v:
            return pos
    return -1


# --------------------------------------------------------------------------------------------
# forward: log-sum-exp in one read of x, in base 2: with rl = r * log2(e) each row's terms are
# 2**(rl * (x - top)) with top its maximum (0 when that is -inf): the difference first, so that
# no rounding of rl * x or rl * top (0.03 near 7e5) enters the sum. The result is
# top + log2(sum / n) / rl; (top, log2(sum / n)) are also written out for the backward, which
# needs exp(r (x - lse)) to float32 accuracy even where r x is large.


@_helper
def _vmax_real(m, v, real):
    """Lane-wise running max over real lanes (NaN never wins here; the sums propagate it)."""
    return vsel(mand(real, vgt(v, m)), v, m)


@_helper
def _exp2_sum(s, v, real, rlv, top, z):
    return vadd(s, vsel(real, vexp2n(vmul(vsub(v, top), rlv)), z))


@_helper
def _lse_pass_a(x, xo, mask, mo, ms, c0, c1, e2, W, W2, z, ninf):
    """The maximum of x over the real positions c0..c1 of a row, -inf if none (ms: a literal 0
    or 1 at each call site, so the unmasked loop carries no mask test)."""
    na, nb = ninf, ninf
    for b in range(c0, e2, W2):
        na = _vmax_real(na, vload(x, xo + b), _real(mask, mo + b, z, ms))
        nb = _vmax_real(nb, vload(x, xo + b + W), _real(mask, mo + b + W, z, ms))
    for b in range(e2, c1, W):
        k = min(W, c1 - b)
        na = _vmax_real(na, vload_part(x, xo + b, k), _real_part(mask, mo + b, k, z, ms))
    return hmax(vmaximum(na, nb))


@_helper
def _lse_pass_b(x, xo, mask, mo, ms, c0, c1, e2, W, W2, z, rlv, ref, Sa, Sb):
    """Sa, Sb + 2**(rl * (x - ref)) over the real positions c0..c1 of a row."""
    for b in range(c0, e2, W2):
        Sa = _exp2_sum(Sa, vload(x, xo + b), _real(mask, mo + b, z, ms), rlv, ref, z)
        Sb = _exp2_sum(Sb, vload(x, xo + b + W), _real(mask, mo + b + W, z, ms), rlv, ref, z)
    for b in range(e2, c1, W):
        k = min(W, c1 - b)
        real = _real_part(mask, mo + b, k, z, ms)
        Sa = _exp2_sum(Sa, vload_part(x, xo + b, k), real, rlv, ref, z)
    return Sa, Sb


@_helper
def _lse_finish(out, o, tops, tots, ti, cnts, k, rl, atop, alog):
    """out.flat[o:o + k] <- log(mean over the real positions of e**(r x)) / r, vectorised,
    from each output's maximum of x (``tops.flat[ti:]``), sum of 2**(rl * (x - top))
    (``tots.flat[ti:]``, rl = r log2 e) and real count (``cnts``); 0 where the count is 0.
    ``atop``, ``alog`` (flat, like out) get the maximum and log2(sum / count) for the backward.
    Taken by each task while its outputs are in cache (as a NumPy epilogue it cost more than the
    log2s themselves: temporaries and their page faults)."""
    z = vzero_of(out)
    rlv = vfull(rl, z)
    c = vload_part(cnts, 0, k)
    top = vload_part(tops, ti, k)
    lg = vsel(vgt(c, z), vlog2(vdiv(vload_part(tots, ti, k), c)), z)
    y = vadd(vmul(top, rlv), lg)
    vput_part(out, o, vsel(vgt(c, z), vdiv(y, rlv), z), k)
    vput_part(atop, o, top, k)
    vput_part(alog, o, lg, k)


@_kernel
def fwd_lse_cf(x, mask, ms, rl, den, out, ntask, atop, alog):
    """Per chunk of a row (in L1): pass A takes the chunk's maximum, the running sums are
    rescaled (one scalar exp2) when it beats the row's maximum so far, pass B adds
    2**(rl * (x - max)). x leaves DRAM once; one exp2 per element."""
    N, C, L = x.shape
    rows = N * C
    W = nlanes(x)
    W2 = 2 * W
    chunk = W2 * 32
    for t in prange(ntask):
        z = vzero_of(x)
        ninf = vfull(-np.inf, z)
        rlv = vfull(rl, z)
        tops, tots, cnts = np.empty(W, out.dtype), np.empty(W, out.dtype), np.empty(W, out.dtype)
        r0, r1 = t * rows // ntask, (t + 1) * rows // ntask
        for row in range(r0, r1):
            n = row // C
            xo = row * L
            mo = n * ms * L
            top = like(-np.inf, rl)  # the row's maximum so far over real positions (never NaN)
            # sum of 2**(rl * (x - top)): lane sums Sa, Sb over one chunk, added up in float64
            # after each (two-level summation)
            total = 0.0
            for c0 in range(0, L, chunk):
                c1 = min(c0 + chunk, L)
                e2 = c0 + (c1 - c0) // W2 * W2
                if ms:
                    cm = _lse_pass_a(x, xo, mask, mo, 1, c0, c1, e2, W, W2, z, ninf)
                else:
                    cm = _lse_pass_a(x, xo, mask, mo, 0, c0, c1, e2, W, W2, z, ninf)
                if cm > top:
                    if top != -np.inf:
                        total *= sexp2(rl * (top - cm))
                    top = cm
                ref = vfull(0.0 if top == -np.inf else top, z)
                Sa, Sb = z, z
                if ms:
                    Sa, Sb = _lse_pass_b(x, xo, mask, mo, 1, c0, c1, e2, W, W2, z, rlv, ref, Sa, Sb)
                else:
                    Sa, Sb = _lse_pass_b(x, xo, mask, mo, 0, c0, c1, e2, W, W2, z, rlv, ref, Sa, Sb)
                total += hsum(vadd(Sa, Sb))
            i = (row - r0) % W  # results are finished W rows at a time (out's flat index: row)
            tops[i], tots[i], cnts[i] = top, total, den[n]
            if i == W - 1 or row == r1 - 1:
                _lse_finish(out, row - i, tops, tots, 0, cnts, i + 1, rl, atop, alog)


@_helper
def _lse_flush(tot, tm, mx, sx, k, rl):
    """One span's sums of 2**(rl * (x - mx)) into the float64 totals, which are kept scaled to
    ``tm`` (rescaled to mx when it grew); sx <- 0."""
    for j in range(k):
        if tm[j] != mx[j]:  # from -inf: a factor 0 (a NaN carried so far stays NaN)
            tot[j] = tot[j] * (sexp2(rl * (tm[j] - mx[j])) if tm[j] != -np.inf else 0.0)
            tm[j] = mx[j]
        tot[j] += sx[j]
        sx[j] = 0.0


@_kernel
def fwd_lse_cl(x, mask, ms, rl, den, out, cb, nch, chunked, pm, ps, atop, alog):
    """Per vector of channels and block of ROWS positions: pass A takes the block max, the sums
    are rescaled, pass B adds 2**(rl * (x - max)) (the block is re-read from L1). With ``nch > 1``
    chunks of L, (max, sum) partials go to ``pm, ps[n, chunk, c]`` and are merged after."""
    N, L, C = x.shape
    nb = (C + cb - 1) // cb
    W = nlanes(x)
    for t in prange(N * nb * nch):
        n, c0, k, ch, la, lb = _cl_task(t, nb, nch, cb, C, L)
        z = vzero_of(x)
        one = vfull(1.0, z)
        ninf = vfull(-np.inf, z)
        rlv = vfull(rl, z)
        real = veq(z, z)
        mx = np.full(k, -np.inf, out.dtype)
        sx = np.zeros(k, out.dtype)
        tm = np.full(k, -np.inf, out.dtype)  # the maximum the float64 totals are scaled to
        tot = np.zeros(k, np.float64)
        flush_at = la + SPAN
        for l0 in range(la, lb, ROWS):
            if l0 >= flush_at:
                _lse_flush(tot, tm, mx, sx, k, rl)
                flush_at += SPAN
            l1 = min(l0 + ROWS, lb)
            for j in range(0, k, W):
                r = min(W, k - j)
                m = lds(mx, j, r, W, z)
                s = lds(sx, j, r, W, z)
                nm = m
                for pos in range(l0, l1):
                    if mask[n * ms, pos]:
                        nm = _vmax_real(nm, ldx(x, (n * L + pos) * C + c0 + j, r, W), real)
                s = vmul(s, vsel(veq(m, nm), one, vexp2(vmul(rlv, vsub(m, nm)))))
                ref = vsel(veq(nm, ninf), z, nm)
                for pos in range(l0, l1):
                    if mask[n * ms, pos]:
                        s = _exp2_sum(
                            s, ldx(x, (n * L + pos) * C + c0 + j, r, W), real, rlv, ref, z
                        )
                sts(mx, j, nm, r, W)
                sts(sx, j, s, r, W)
        _lse_flush(tot, tm, mx, sx, k, rl)
        for j in range(k):
            sx[j] = tot[j]
        if chunked:
            for j in range(k):
                pm[n, ch, c0 + j], ps[n, ch, c0 + j] = mx[j], sx[j]
            continue
        cnts = np.full(W, den[n], out.dtype)
        for j in range(0, k, W):
            _lse_finish(out, n * C + c0 + j, mx, sx, j, cnts, min(W, k - j), rl, atop, alog)
    if chunked:
        for n in prange(N):
            for c in range(C):
                top = pm[n, 0, c]
                for ch in range(1, nch):
                    top = max(top, pm[n, ch, c])
                total = like(0.0, top)
                for ch in range(nch):
                    if pm[n, ch, c] == top:
                        total += ps[n, ch, c]
                    elif pm[n, ch, c] != -np.inf:
                        total += ps[n, ch, c] * sexp2(rl * (pm[n, ch, c] - top))
                    else:
                        total += ps[n, ch, c]  # 0, or NaN carried on
                pm[n, 0, c], ps[n, 0, c] = top, total
            cnts = np.full(W, den[n], out.dtype)
            for c in range(0, C, W):
                _lse_finish(
                    out, n * C + c, pm, ps, n * nch * C + c, cnts, min(W, C - c), rl, atop, alog
                )


# --------------------------------------------------------------------------------------------
# backward: linear kinds (avg, attention) and the max scatter, one write of grad_x
#   grad[n, c, pos] = A[n, c] * B[n, pos] + G[n, c] * [pos is the arg-max]
#   B[n, pos] = w[n, pos] (attention) or 1, and 0 at padded pos
#   tied rows (T > 1): G / T at every real pos with x == max (reads x for those rows only)
#   need_w: D[n, pos] = sum_c A[n, c] * x[n, c, pos] at real pos (attention's d/dw is D minus its
#   weighted mean, taken by the caller: the output, rounded to x's dtype, never enters)


@_helper
def _b_coef(w, wi, pos, weighted, real, zero):
    b = widen(w[wi, pos]) if weighted else like(1.0, zero)
    return like(b, zero) if real else zero


@launch.serial_kernel(**_OPTIONS)
def weight_sums(w, mask, ms, out):
    """out[n] = sum of w[n, pos] over the real positions (float64)."""
    for n in range(w.shape[0]):
        s = 0.0
        for pos in range(w.shape[1]):
            s += np.float64(widen(w[n, pos])) if mask[n * ms, pos] else 0.0
        out[n] = s


@_backward_kernel
def bwd_lin_cf(x, mask, ms, w, ws, weighted, A, G, idx, tc, gx, D, need_w, nch):
    N, C, L = gx.shape
    for t in prange(N * nch):
        n = t // nch
        q = t - n * nch
        l0 = q * L // nch
        l1 = (q + 1) * L // nch
        mi = n * ms
        wi = n * ws
        dacc = np.zeros(l1 - l0, A.dtype)
        zero = like(0.0, A[0, 0])
        for c in range(C):
            a = A[n, c]
            g = G[n, c]
            ties = tc[n, c]
            i = idx[n, c]
            if ties > 1:
                mval = widen(x[n, c, i])
                share = g / like(ties, g)
                for pos in range(l0, l1):
                    u = U(pos)
                    hit = mask[mi, u] & (widen(x[n, c, u]) == mval)
                    b = _b_coef(w, wi, u, weighted, mask[mi, u], zero)
                    gx[n, c, u] = narrow(a * b + (share if hit else zero), gx)
            else:
                i = i if ties == 1 else -1
                for pos in range(l0, l1):
                    u = U(pos)
                    b = _b_coef(w, wi, u, weighted, mask[mi, u], zero)
                    gx[n, c, u] = narrow(a * b + (g if pos == i else zero), gx)
            if need_w:
                for pos in range(l0, l1):
                    u = U(pos)
                    v = a * widen(x[n, c, u])
                    dacc[U(pos - l0)] += v if mask[mi, u] else zero
        if need_w:
            for pos in range(l0, l1):
                D[n, pos] = dacc[U(pos - l0)]


@_backward_kernel
def bwd_lin_cl(x, mask, ms, w, ws, weighted, A, G, idx, tc, anytie, gx, D, need_w, nch):
    N, L, C = gx.shape
    for t in prange(N * nch):
        n = t // nch
        q = t - n * nch
        l0 = q * L // nch
        l1 = (q + 1) * L // nch
        mi = n * ms
        wi = n * ws
        zero = like(0.0, A[0, 0])
        for pos in range(l0, l1):
            b = _b_coef(w, wi, pos, weighted, mask[mi, pos], zero)
            for c in range(C):
                u = U(c)
                hit = (idx[n, u] == pos) & (tc[n, u] == 1)
                gx[n, pos, u] = narrow(A[n, u] * b + (G[n, u] if hit else zero), gx)
            if need_w:
                s = zero
                if mask[mi, pos]:
                    for c in range(C):
                        s += A[n, U(c)] * widen(x[n, pos, U(c)])
                D[n, pos] = s
        if anytie[n]:
            for c in range(C):
                ties = tc[n, c]
                if ties > 1:
                    mval = widen(x[n, idx[n, c], c])
                    share = G[n, c] / like(ties, zero)
                    for pos in range(l0, l1):
                        if mask[mi, pos] and widen(x[n, pos, c]) == mval:
                            b = _b_coef(w, wi, pos, weighted, True, zero)
                            gx[n, pos, c] = narrow(A[n, c] * b + share, gx)


# --------------------------------------------------------------------------------------------
# backward: gem and lse, grad = Q[n, c] * h(x) at real positions
#   gem: h = (x / y)^(p-1) where x >= eps (else 0), Y holds 1 / y and Q = g / n: scaled by the
#        output, so that no power over- or underflows (x / y <= n^(1/p)); with need_p also the
#        per-(n, c, chunk) partial sums P0 = sum z^p and P1 = sum z^p log2 z, z = max(x, eps) / y
#   lse: h = 2**(rl (x - T) - Y) = exp(r (x - y)), rl = r log2(e), with T the row's maximum and
#        Y = log2(mean 2**(rl (x - T))) from the forward: the difference first, as there


@_helper
def _gem_grad(xv, real, qv, p, ip, eps, yi):
    ok = real & (xv >= eps)
    v = xv * yi
    h = ipow(v, ip - 1) if ip > 0 else spow(v, p - like(1.0, p))
    return qv * h if ok else like(0.0, qv)


@_helper
def _gem_grad_p(xv, real, qv, p, ip, eps, yi):
    """(grad, z^p, z^p log2 z) at one position, z = max(x, eps) / y; the last two are 0 at padded
    positions."""
    zero = like(0.0, qv)
    z = (eps if xv < eps else xv) * yi
    lz = slog2(z)
    h = ipow(z, ip - 1) if ip > 0 else sexp2((p - like(1.0, p)) * lz)
    zp = h * z
    g = qv * h if real & (xv >= eps) else zero
    return g, (zp if real else zero), (zp * lz if real else zero)


@_backward_kernel
def bwd_nl_cf(x, mask, ms, Q, Y, T, mode, p, ip, eps, r, gx, P0, P1, need_p, nch):
    N, C, L = gx.shape
    for t in prange(N * nch):
        n = t // nch
        q = t - n * nch
        l0 = q * L // nch
        l1 = (q + 1) * L // nch
        mi = n * ms
        zero = like(0.0, Q[0, 0])
        for c in range(C):
            qv = Q[n, c]
            yv = Y[n, c]
            if mode == NL_LSE:
                tv = T[n, c]
                for pos in range(l0, l1):
                    u = U(pos)
                    h = sexp2(r * (widen(x[n, c, u]) - tv) - yv)
                    gx[n, c, u] = narrow(qv * h if mask[mi, u] else zero, gx)
            elif need_p:  # the sums span by span, then in float64 (see SPAN)
                t0 = 0.0
                t1 = 0.0
                for sa in range(l0, l1, SPAN):
                    s0 = zero
                    s1 = zero
                    for pos in range(sa, min(sa + SPAN, l1)):
                        u = U(pos)
                        g, a0, a1 = _gem_grad_p(
                            widen(x[n, c, u]), mask[mi, u], qv, p, ip, eps, yv
                        )
                        gx[n, c, u] = narrow(g, gx)
                        s0 += a0
                        s1 += a1
                    t0 += s0
                    t1 += s1
                P0[n, q, c] = t0
                P1[n, q, c] = t1
            else:
                for pos in range(l0, l1):
                    u = U(pos)
                    g = _gem_grad(widen(x[n, c, u]), mask[mi, u], qv, p, ip, eps, yv)
                    gx[n, c, u] = narrow(g, gx)


@_backward_kernel
def bwd_nl_cl(x, mask, ms, Q, Y, T, mode, p, ip, eps, r, gx, P0, P1, need_p, nch):
    N, L, C = gx.shape
    for t in prange(N * nch):
        n = t // nch
        q = t - n * nch
        l0 = q * L // nch
        l1 = (q + 1) * L // nch
        mi = n * ms
        zero = like(0.0, Q[0, 0])
        s0 = np.zeros(C, Q.dtype)
        s1 = np.zeros(C, Q.dtype)
        t0 = np.zeros(C, np.float64)  # the sums, span by span (see SPAN)
        t1 = np.zeros(C, np.float64)
        flush_at = l0 + SPAN
        for pos in range(l0, l1):
            if need_p and pos >= flush_at:
                flush_into(t0, s0, C)
                flush_into(t1, s1, C)
                flush_at += SPAN
            if not mask[mi, pos]:
                for c in range(C):
                    gx[n, pos, U(c)] = narrow(zero, gx)
            elif mode == NL_LSE:
                for c in range(C):
                    u = U(c)
                    h = sexp2(r * (widen(x[n, pos, u]) - T[n, u]) - Y[n, u])
                    gx[n, pos, u] = narrow(Q[n, u] * h, gx)
            elif need_p:
                for c in range(C):
                    u = U(c)
                    g, a0, a1 = _gem_grad_p(
                        widen(x[n, pos, u]), True, Q[n, u], p, ip, eps, Y[n, u]
                    )
                    gx[n, pos, u] = narrow(g, gx)
                    s0[u] += a0
                    s1[u] += a1
            else:
                for c in range(C):
                    u = U(c)
                    g = _gem_grad(widen(x[n, pos, u]), True, Q[n, u], p, ip, eps, Y[n, u])
                    gx[n, pos, u] = narrow(g, gx)
        if need_p:
            flush_into(t0, s0, C)
            flush_into(t1, s1, C)
            for c in range(C):
                P0[n, q, c] = t0[c]
                P1[n, q, c] = t1[c]


@_backward_kernel
def bwd_tied(rows, xr, mask, ms, A, G, gx, channels_last):
    """The max kinds' gradient of the rows whose maximum is tied, from those rows' saved values
    (x itself is not kept): ``rows`` their flat indices ``n * C + c``, ``xr`` their values
    ``(T, L)``. grad = A[n, c] at real positions + G[n, c] / (number of real positions equal to
    the max) at each of them; computed in float64 and rounded once to the accumulation type,
    then to gx's. A NaN makes the row's max NaN, which no position equals (as NumPy's max)."""
    C = A.shape[1]
    L = xr.shape[1]
    for t in prange(rows.shape[0]):
        n = rows[t] // C
        c = rows[t] - n * C
        mi = n * ms
        top = -np.inf
        for pos in range(L):
            v = np.float64(widen(xr[t, pos]))
            if mask[mi, pos] and (v > top or v != v):
                top = v
        count = 0
        for pos in range(L):
            if mask[mi, pos] and np.float64(widen(xr[t, pos])) == top:
                count += 1
        share = np.float64(G[n, c]) / count if count > 0 else 0.0
        a = np.float64(A[n, c])
        for pos in range(L):
            real = mask[mi, pos]
            hit = real and np.float64(widen(xr[t, pos])) == top
            g = (a if real else 0.0) + (share if hit else 0.0)
            v = narrow(like(g, A[0, 0]), gx)
            if channels_last:
                gx[n, pos, c] = v
            else:
                gx[n, c, pos] = v
