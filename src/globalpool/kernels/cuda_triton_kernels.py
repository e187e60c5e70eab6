"""Triton kernels behind :mod:`globalpool.kernels.cuda_triton` (imported only from there).

This module imports ``triton`` at the top and defines the ``@triton.jit`` functions, so whether
they run compiled or under Triton's CPU interpreter is decided when it is *loaded*;
``cuda_triton`` loads one copy per mode. Nothing here checks arguments: the wrappers do.

Every kernel sees a 3-D input viewed either as rows ``(N*C, L)`` (channels first, ``CL=False``)
or as ``(N, L, C)`` (channels last, ``CL=True``):

- channels first: a program owns ``BR`` rows and walks its L-range in ``[BR, BL]`` tiles, each
  row contiguous along L; per-row state is a ``[BR, 1]`` column.
- channels last: a program owns one sample and ``BC`` channels and walks its L-range in
  ``[BL, BC]`` tiles, each tile row contiguous along C; per-channel state is a ``[1, BC]`` row.

Reductions use ``keep_dims=True`` so the per-kind arithmetic in :func:`_update` and
:func:`_finalize` is written once and broadcasts in either orientation. The second grid axis
splits L into ``SPLIT`` ranges of ``L_PER`` positions: with ``SPLIT == 1`` the forward writes the
result directly (``FINAL``), otherwise it writes per-(row, split) partial states that
:func:`_pool_combine` merges; either way the input is read once.

>>> import globalpool.kernels.cuda_triton_kernels as k   # doctest: +SKIP
>>> k.AVG, k.ATT                                        # doctest: +SKIP
(0, 6)
"""

# Kernel code keeps `==` chains and if/else blocks on compile-time constants: these are the forms
# Triton's frontend is known to specialise away (`in (...)` is not supported).
# ruff: noqa: SIM108, SIM109

import triton
import triton.language as tl

# kind codes (cuda_triton.KIND_CODES) and the "no index" sentinel; globals used inside @jit
# functions must be tl.constexpr
AVG = tl.constexpr(0)
MAX = tl.constexpr(1)
AVGMAX = tl.constexpr(2)
CAT = tl.constexpr(3)
GEM = tl.constexpr(4)
LSE = tl.constexpr(5)
ATT = tl.constexpr(6)
BIG = tl.constexpr(2147483647)


# Reductions call tl.reduce with triton.language.standard's own combine functions rather than
# tl.sum / tl.max / tl.min: those wrappers are @jit functions fixed as compiled or interpreted when
# triton is first imported, which would tie the interpreter to TRITON_INTERPRET being set before
# that import. Compiled, this is exactly what tl.sum / tl.max / tl.min emit; interpreted, the
# interpreter recognises these combine functions and reduces with NumPy. (Local fallbacks keep
# the module working, slowly under the interpreter, if triton renames them.)
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


def _combine_fn(name: str, local):
    """triton's own combine function: always when interpreted (the interpreter only compares
    it by identity to pick its NumPy reduction), and when compiled if it was built compiled too
    (triton fixes that when first imported); else the local equivalent."""
    fn = getattr(tl.standard, name, None)
    if fn is None:
        return local
    interpreted = type(local).__name__ == "InterpretedFunction"
    return fn if interpreted or type(fn) is type(local) else local


_SUM_FN = _combine_fn("_sum_combine", _add)
_MAX_FN = _combine_fn("_elementwise_max", _maximum)
_MIN_FN = _combine_fn("_elementwise_min", _minimum)


@triton.jit
def _rsum(v, AX: tl.constexpr):
    return tl.reduce(v, AX, _SUM_FN, keep_dims=True)


@triton.jit
def _rmax(v, AX: tl.constexpr):
    return tl.reduce(v, AX, _MAX_FN, keep_dims=True)


@triton.jit
def _rmin(v, AX: tl.constexpr):
    return tl.reduce(v, AX, _MIN_FN, keep_dims=True)


@triton.jit
def _param(hi, lo, ACC: tl.constexpr):
    """A float parameter passed as a (hi, lo) float32 pair, rebuilt in the accumulation dtype."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _exponent(p_ptr, p_hi, p_lo, ACC: tl.constexpr, P_PTR: tl.constexpr):
    """The gem exponent: read from a 0-dim tensor (P_PTR, no host sync) or from (hi, lo)."""
    if P_PTR:
        p = tl.load(p_ptr).to(ACC)
    else:
        p = _param(p_hi, p_lo, ACC)
    return p


@triton.jit
def _powi(v, P_INT: tl.constexpr):
    """v ** P_INT for the small integer exponents 0..4 (P_INT is a compile-time constant)."""
    if P_INT == 0:
        r = v * 0.0 + 1.0
    elif P_INT == 1:
        r = v
    elif P_INT == 2:
        r = v * v
    elif P_INT == 3:
        r = v * v * v
    else:
        v2 = v * v
        r = v2 * v2
    return r


@triton.jit
def _update(
    acc,
    cnt,
    mx,
    idx,
    ties,
    nanc,
    xv,
    ok,
    lpos,
    wv,
    p,
    eps,
    zs,
    KIND: tl.constexpr,
    RAX: tl.constexpr,
    P_INT: tl.constexpr,
    ACC: tl.constexpr,
):
    """Fold one tile into the running state (reductions along RAX, kept as size-1 dims).

    acc: sum x | sum (clamp(x) / mx)^p | sum exp2((x - mx) r log2(e)) (lse) | sum w x
    cnt: number of real positions | sum w (attention)
    mx, idx, ties, nanc: running max key (NaN counted as +inf), first arg-max, tie and NaN counts
    (max kinds); mx is the running max of x for lse, of clamp(x) for gem.
    """
    if KIND == AVG or KIND == AVGMAX or KIND == CAT:
        acc += _rsum(xv, RAX)
        cnt += _rsum(ok.to(ACC), RAX)
    if KIND == MAX or KIND == AVGMAX or KIND == CAT:
        isn = xv != xv
        key = tl.where(ok, tl.where(isn, float("inf"), xv), float("-inf"))
        tmax = _rmax(key, RAX)
        hit = ok & (key == tmax)
        tidx = _rmin(tl.where(hit, lpos, BIG), RAX)
        tties = _rsum(hit.to(tl.int32), RAX)
        nanc += _rsum((ok & isn).to(tl.int32), RAX)
        gt = tmax > mx
        eq = tmax == mx
        idx = tl.where(gt, tidx, tl.where(eq, tl.minimum(idx, tidx), idx))
        ties = tl.where(gt, tties, tl.where(eq, ties + tties, ties))
        mx = tl.where(gt, tmax, mx)
    if KIND == GEM:  # sum (clamp(x) / mx)^p with mx the running max: no power over/underflows
        xc = tl.where(xv < eps, eps, xv)
        mnew = tl.maximum(mx, _rmax(tl.where(ok, xc, 0.0), RAX))
        inv = 1.0 / tl.where(mnew > 0, mnew, 1.0)
        acc = acc * _gem_pow(tl.where(mx > 0, mx * inv, 0.0), p, P_INT)
        acc += _rsum(tl.where(ok, _gem_pow(xc * inv, p, P_INT), 0.0), RAX)
        mx = mnew
        cnt += _rsum(ok.to(ACC), RAX)
    if KIND == LSE:
        xk = tl.where(ok, xv, float("-inf"))
        mnew = tl.maximum(mx, _rmax(xk, RAX))
        msafe = tl.where(mnew == float("-inf"), 0.0, mnew)
        acc = acc * tl.exp2((mx - msafe) * zs) + _rsum(tl.exp2((xk - msafe) * zs), RAX)
        mx = mnew
        cnt += _rsum(ok.to(ACC), RAX)
    if KIND == ATT:
        acc += _rsum(wv * xv, RAX)
        cnt += _rsum(wv, RAX)
    return acc, cnt, mx, idx, ties, nanc


@triton.jit
def _gem_pow(u, p, P_INT: tl.constexpr):
    """u^p for 0 <= u <= 1 (integer p by multiplications)."""
    if P_INT > 0:
        return _powi(u, P_INT)
    return tl.where(u > 0, tl.exp2(p * tl.log2(tl.where(u > 0, u, 1.0))), 0.0)


@triton.jit
def _finalize(
    out_ptr, aux_ptr, n, c, valid, C, acc, cnt, mx, idx, ties, nanc, ip, izs, KIND: tl.constexpr
):
    """Turn a row's full state into its output (and aux for the max kinds and lse) and store
    them."""
    OTY = out_ptr.dtype.element_ty
    if KIND == CAT:
        obase = n * (2 * C) + c
    else:
        obase = n * C + c
    nonempty = cnt > 0
    safe = tl.where(nonempty, cnt, 1.0)
    if KIND == MAX or KIND == AVGMAX or KIND == CAT:
        vmax = tl.where(ties > 0, mx, 0.0)
        vmax = tl.where(nanc > 0, float("nan"), vmax)
        row = n * C + c
        tl.store(aux_ptr + 2 * row, tl.where(ties > 0, idx, -1), mask=valid)
        tl.store(aux_ptr + 2 * row + 1, ties, mask=valid)
    if KIND == AVG:
        tl.store(out_ptr + obase, tl.where(nonempty, acc / safe, 0.0).to(OTY), mask=valid)
    if KIND == MAX:
        tl.store(out_ptr + obase, vmax.to(OTY), mask=valid)
    if KIND == AVGMAX:
        res = tl.where(nonempty, 0.5 * (acc / safe + vmax), 0.0)
        tl.store(out_ptr + obase, res.to(OTY), mask=valid)
    if KIND == CAT:
        tl.store(out_ptr + obase, tl.where(nonempty, acc / safe, 0.0).to(OTY), mask=valid)
        tl.store(out_ptr + obase + C, vmax.to(OTY), mask=valid)
    if KIND == GEM:  # mx * (mean (z / mx)^p)^(1/p)
        m = tl.where(nonempty, acc / safe, 1.0)
        res = tl.where(nonempty, mx * tl.exp2(tl.log2(m) * ip), 0.0)
        tl.store(out_ptr + obase, res.to(OTY), mask=valid)
    if KIND == LSE:  # aux (N, C, 2): the row's maximum and log2(mean 2**(zs (x - max)))
        lg = tl.where(nonempty, tl.log2(tl.where(nonempty, acc / safe, 1.0)), 0.0)
        res = tl.where(nonempty, mx + lg * izs, 0.0)
        res = tl.where(nonempty & (mx == float("inf")), float("inf"), res)  # not inf - inf
        tl.store(out_ptr + obase, res.to(OTY), mask=valid)
        row = n * C + c
        tl.store(aux_ptr + 2 * row, mx, mask=valid)
        tl.store(aux_ptr + 2 * row + 1, lg, mask=valid)
    if KIND == ATT:
        tl.store(out_ptr + obase, tl.where(nonempty, acc / safe, 0.0).to(OTY), mask=valid)


@triton.jit
def _pool_fwd(
    x_ptr,
    m_ptr,
    w_ptr,
    out_ptr,
    aux_ptr,
    pacc_ptr,
    pcnt_ptr,
    pmx_ptr,
    pidx_ptr,
    pties_ptr,
    pnan_ptr,
    p_ptr,
    N,
    C,
    L,
    L_PER,
    SPLIT,
    p_hi,
    p_lo,
    eps_hi,
    eps_lo,
    zs_hi,
    zs_lo,
    izs_hi,
    izs_lo,
    ip_hi,
    ip_lo,
    KIND: tl.constexpr,
    CL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    FINAL: tl.constexpr,
    P_PTR: tl.constexpr,
    P_INT: tl.constexpr,
    ACC: tl.constexpr,
    BR: tl.constexpr,
    BL: tl.constexpr,
    BC: tl.constexpr,
):
    """One pass over x: grid (row or channel blocks, SPLIT)."""
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    l_lo = sid * L_PER
    l_hi = tl.minimum(l_lo + L_PER, L)
    p = _exponent(p_ptr, p_hi, p_lo, ACC, P_PTR)
    eps = _param(eps_hi, eps_lo, ACC)
    zs = _param(zs_hi, zs_lo, ACC)
    if CL:
        ncb = (C + BC - 1) // BC
        n = (pid // ncb).to(tl.int64)
        c = (pid % ncb) * BC + tl.arange(0, BC)[None, :]
        valid = c < C
        RAX: tl.constexpr = 0
    else:
        r = pid * BR + tl.arange(0, BR)[:, None]
        valid = r < N * C
        n = (r // C).to(tl.int64)
        c = r % C
        RAX: tl.constexpr = 1
    zero = tl.where(valid, 0.0, 0.0).to(ACC)
    acc = zero
    cnt = zero
    mx = zero + float("-inf")
    izero = zero.to(tl.int32)
    idx = izero + BIG
    ties = izero
    nanc = izero
    for l0 in range(l_lo, l_hi, BL):
        if CL:
            lpos = l0 + tl.arange(0, BL)[:, None]
            okl = lpos < l_hi
            if HAS_MASK:
                okl = okl & (tl.load(m_ptr + n * L + lpos, mask=okl, other=0) != 0)
            ok = okl & valid
            xoff = (n * L + lpos) * C + c
            if KIND == ATT:
                wv = tl.load(w_ptr + n * L + lpos, mask=okl, other=0.0).to(ACC)
            else:
                wv = zero
        else:
            lpos = l0 + tl.arange(0, BL)[None, :]
            ok = valid & (lpos < l_hi)
            if HAS_MASK:
                ok = ok & (tl.load(m_ptr + n * L + lpos, mask=ok, other=0) != 0)
            xoff = (n * C + c) * L + lpos
            if KIND == ATT:
                wv = tl.load(w_ptr + n * L + lpos, mask=ok, other=0.0).to(ACC)
            else:
                wv = zero
        xv = tl.load(x_ptr + xoff, mask=ok, other=0.0).to(ACC)
        acc, cnt, mx, idx, ties, nanc = _update(
            acc, cnt, mx, idx, ties, nanc, xv, ok, lpos, wv, p, eps, zs, KIND, RAX, P_INT, ACC
        )
    if FINAL:
        if P_PTR:
            ip = 1.0 / p
        else:
            ip = _param(ip_hi, ip_lo, ACC)
        izs = _param(izs_hi, izs_lo, ACC)
        _finalize(out_ptr, aux_ptr, n, c, valid, C, acc, cnt, mx, idx, ties, nanc, ip, izs, KIND)
    else:
        po = (n * C + c) * SPLIT + sid
        tl.store(pacc_ptr + po, acc, mask=valid)
        tl.store(pcnt_ptr + po, cnt, mask=valid)
        if KIND == MAX or KIND == AVGMAX or KIND == CAT or KIND == LSE or KIND == GEM:
            tl.store(pmx_ptr + po, mx, mask=valid)
        if KIND == MAX or KIND == AVGMAX or KIND == CAT:
            tl.store(pidx_ptr + po, idx, mask=valid)
            tl.store(pties_ptr + po, ties, mask=valid)
            tl.store(pnan_ptr + po, nanc, mask=valid)


@triton.jit
def _pool_combine(
    out_ptr,
    aux_ptr,
    pacc_ptr,
    pcnt_ptr,
    pmx_ptr,
    pidx_ptr,
    pties_ptr,
    pnan_ptr,
    p_ptr,
    N,
    C,
    SPLIT,
    zs_hi,
    zs_lo,
    izs_hi,
    izs_lo,
    ip_hi,
    ip_lo,
    KIND: tl.constexpr,
    P_PTR: tl.constexpr,
    ACC: tl.constexpr,
    BR: tl.constexpr,
    BS: tl.constexpr,
):
    """Merge the SPLIT partial states of BR rows (a [BR, BS] tile) and finalize them."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    valid = r < N * C
    s = tl.arange(0, BS)[None, :]
    ok = valid & (s < SPLIT)
    po = r.to(tl.int64) * SPLIT + s
    acc = tl.load(pacc_ptr + po, mask=ok, other=0.0)
    cnt = _rsum(tl.load(pcnt_ptr + po, mask=ok, other=0.0), 1)
    mx = cnt
    if KIND == MAX or KIND == AVGMAX or KIND == CAT or KIND == LSE or KIND == GEM:
        mx = tl.load(pmx_ptr + po, mask=ok, other=float("-inf"))
    idx = tl.where(valid, 0, 0)
    ties = idx
    nanc = idx
    if P_PTR:
        ip = 1.0 / tl.load(p_ptr).to(ACC)
    else:
        ip = _param(ip_hi, ip_lo, ACC)
    if KIND == LSE:
        zs = _param(zs_hi, zs_lo, ACC)
        top = _rmax(mx, 1)
        tsafe = tl.where(top == float("-inf"), 0.0, top)
        acc = _rsum(acc * tl.exp2((mx - tsafe) * zs), 1)
        mx = top
    elif KIND == GEM:  # each split's sum is relative to its own maximum
        top = _rmax(mx, 1)
        inv = 1.0 / tl.where(top > 0, top, 1.0)
        acc = _rsum(acc * _gem_pow(tl.where(mx > 0, mx * inv, 0.0), 1.0 / ip, 0), 1)
        mx = top
    else:
        acc = _rsum(acc, 1)
    if KIND == MAX or KIND == AVGMAX or KIND == CAT:
        pt = tl.load(pties_ptr + po, mask=ok, other=0)
        pi = tl.load(pidx_ptr + po, mask=ok, other=BIG)
        top = _rmax(mx, 1)
        win = ok & (mx == top) & (pt > 0)
        ties = _rsum(tl.where(win, pt, 0), 1)
        idx = _rmin(tl.where(win, pi, BIG), 1)
        nanc = _rsum(tl.load(pnan_ptr + po, mask=ok, other=0), 1)
        mx = top
    n = (r // C).to(tl.int64)
    c = r % C
    izs = _param(izs_hi, izs_lo, ACC)
    _finalize(out_ptr, aux_ptr, n, c, valid, C, acc, cnt, mx, idx, ties, nanc, ip, izs, KIND)


@triton.jit
def _pool_bwd(
    g_ptr,
    x_ptr,
    out_ptr,
    aux_ptr,
    m_ptr,
    icnt_ptr,
    gx_ptr,
    ps_ptr,
    pt_ptr,
    p_ptr,
    N,
    C,
    L,
    L_PER,
    SPLIT,
    p_hi,
    p_lo,
    eps_hi,
    eps_lo,
    zs_hi,
    zs_lo,
    KIND: tl.constexpr,
    CL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    NEED_P: tl.constexpr,
    P_PTR: tl.constexpr,
    P_INT: tl.constexpr,
    ACC: tl.constexpr,
    BR: tl.constexpr,
    BL: tl.constexpr,
    BC: tl.constexpr,
):
    """One write pass of grad_x for every kind but attention; grid as in the forward.

    Max kinds read x only for rows whose maximum is tied; gem and lse read x (their gradient
    depends on it) and, with NEED_P, gem also writes per-(row, split) partial sums S = sum z^p
    and T = sum z^p log2 z, z = max(x, eps) / y, for the gradient with respect to p.
    """
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    l_lo = sid * L_PER
    l_hi = tl.minimum(l_lo + L_PER, L)
    p = _exponent(p_ptr, p_hi, p_lo, ACC, P_PTR)
    eps = _param(eps_hi, eps_lo, ACC)
    zs = _param(zs_hi, zs_lo, ACC)
    GTY = gx_ptr.dtype.element_ty
    if CL:
        ncb = (C + BC - 1) // BC
        n = (pid // ncb).to(tl.int64)
        c = (pid % ncb) * BC + tl.arange(0, BC)[None, :]
        valid = c < C
        RAX: tl.constexpr = 0
    else:
        r = pid * BR + tl.arange(0, BR)[:, None]
        valid = r < N * C
        n = (r // C).to(tl.int64)
        c = r % C
        RAX: tl.constexpr = 1
    row = n * C + c
    if KIND == CAT:
        OC = 2 * C
    else:
        OC = C
    g = tl.load(g_ptr + n * OC + c, mask=valid, other=0.0).to(ACC)
    ic = tl.load(icnt_ptr + n + c * 0, mask=valid, other=0.0)
    zero = tl.where(valid, 0.0, 0.0).to(ACC)
    ca = zero
    gm = zero
    if KIND == AVG:
        ca = g * ic
    if KIND == AVGMAX:
        ca = 0.5 * g * ic
        gm = 0.5 * g
    if KIND == MAX:
        gm = g
    if KIND == CAT:
        ca = g * ic
        gm = tl.load(g_ptr + n * OC + C + c, mask=valid, other=0.0).to(ACC)
    idx = zero.to(tl.int32)
    ties = idx
    mval = zero
    if KIND == MAX or KIND == AVGMAX or KIND == CAT:
        idx = tl.load(aux_ptr + 2 * row, mask=valid, other=0)
        ties = tl.load(aux_ptr + 2 * row + 1, mask=valid, other=0)
        if CL:
            moff = (n * L + idx) * C + c
        else:
            moff = row * L + idx
        mval = tl.load(x_ptr + moff, mask=valid & (ties > 1), other=0.0).to(ACC)
        gm = tl.where(ties > 1, gm / tl.maximum(ties, 1).to(ACC), gm)
    y = zero
    coef = zero
    yi = zero
    if KIND == GEM:  # grad = g / n * (x / y)^(p - 1): scaled by y, no power over- or underflows
        y = tl.load(out_ptr + n * C + c, mask=valid, other=0.0).to(ACC)
        yi = tl.where((y > 0) & (y < float("inf")), 1.0 / tl.where(y > 0, y, 1.0), 0.0)
        coef = g * ic
    top = zero
    if KIND == LSE:  # exp(r (x - lse)) = 2**(zs (x - max) - log2 mean): the difference first
        top = tl.load(aux_ptr + 2 * row, mask=valid, other=0.0).to(ACC)
        top = tl.where((top == float("-inf")) | (top == float("inf")), 0.0, top)
        y = tl.load(aux_ptr + 2 * row + 1, mask=valid, other=0.0).to(ACC)
        coef = g * ic
    S = zero
    T = zero
    for l0 in range(l_lo, l_hi, BL):
        if CL:
            lpos = l0 + tl.arange(0, BL)[:, None]
            inl = lpos < l_hi
            okl = inl
            if HAS_MASK:
                okl = okl & (tl.load(m_ptr + n * L + lpos, mask=inl, other=0) != 0)
            ok = okl & valid
            inb = inl & valid
            xoff = (n * L + lpos) * C + c
        else:
            lpos = l0 + tl.arange(0, BL)[None, :]
            inb = valid & (lpos < l_hi)
            ok = inb
            if HAS_MASK:
                ok = ok & (tl.load(m_ptr + n * L + lpos, mask=inb, other=0) != 0)
            xoff = (n * C + c) * L + lpos
        val = tl.where(ok, ca, 0.0)
        if KIND == MAX or KIND == AVGMAX or KIND == CAT:
            val += tl.where(ok & (ties == 1) & (lpos == idx), gm, 0.0)
            tied = ok & (ties > 1)
            xt = tl.load(x_ptr + xoff, mask=tied, other=0.0).to(ACC)
            val += tl.where(tied & (xt == mval), gm, 0.0)
        if KIND == GEM:
            xv = tl.load(x_ptr + xoff, mask=ok, other=1.0).to(ACC)
            xc = tl.where(xv < eps, eps, xv) * yi
            if P_INT > 0:
                zp1 = _powi(xc, P_INT - 1)
            else:
                zp1 = tl.exp2((p - 1.0) * tl.log2(xc))
            val = tl.where(ok & (xv >= eps), coef * zp1, 0.0)
            if NEED_P:
                zp = tl.where(ok, zp1 * xc, 0.0)
                S += _rsum(zp, RAX)
                T += _rsum(zp * tl.log2(xc), RAX)
        if KIND == LSE:
            xv = tl.load(x_ptr + xoff, mask=ok, other=0.0).to(ACC)
            val = tl.where(ok, coef * tl.exp2((xv - top) * zs - y), 0.0)
        tl.store(gx_ptr + xoff, val.to(GTY), mask=inb)
    if NEED_P:
        po = row * SPLIT + sid
        tl.store(ps_ptr + po, S, mask=valid)
        tl.store(pt_ptr + po, T, mask=valid)


@triton.jit
def _attn_bwd(
    g_ptr,
    x_ptr,
    m_ptr,
    w_ptr,
    isw_ptr,
    gx_ptr,
    pgw_ptr,
    N,
    C,
    L,
    C_PER,
    CL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    NEED_W: tl.constexpr,
    ACC: tl.constexpr,
    BL: tl.constexpr,
    BC: tl.constexpr,
):
    """Attention backward: grid (N, L blocks, C splits); loops over its channels, writing
    grad_x = g w / sum(w) and, with NEED_W, accumulating sum_c g x / sum(w) into a partial
    buffer (C splits, N, L) that the wrapper sums and centres into grad_w (only then is x
    read; the output, rounded to x's dtype, never enters)."""
    n = tl.program_id(0).to(tl.int64)
    lb = tl.program_id(1)
    cs = tl.program_id(2)
    GTY = gx_ptr.dtype.element_ty
    c_lo = cs * C_PER
    c_hi = tl.minimum(c_lo + C_PER, C)
    isw = tl.load(isw_ptr + n)
    if CL:
        lpos = lb * BL + tl.arange(0, BL)[:, None]
        CAX: tl.constexpr = 1
    else:
        lpos = lb * BL + tl.arange(0, BL)[None, :]
        CAX: tl.constexpr = 0
    inl = lpos < L
    okl = inl
    if HAS_MASK:
        okl = okl & (tl.load(m_ptr + n * L + lpos, mask=inl, other=0) != 0)
    wv = tl.load(w_ptr + n * L + lpos, mask=okl, other=0.0).to(ACC) * isw
    gw = tl.where(okl, 0.0, 0.0).to(ACC)
    for c0 in range(c_lo, c_hi, BC):
        if CL:
            c = c0 + tl.arange(0, BC)[None, :]
        else:
            c = c0 + tl.arange(0, BC)[:, None]
        inc = c < c_hi
        ok = okl & inc
        inb = inl & inc
        g = tl.load(g_ptr + n * C + c, mask=inc, other=0.0).to(ACC)
        if CL:
            xoff = (n * L + lpos) * C + c
        else:
            xoff = (n * C + c) * L + lpos
        tl.store(gx_ptr + xoff, tl.where(ok, g * wv, 0.0).to(GTY), mask=inb)
        if NEED_W:
            xv = tl.load(x_ptr + xoff, mask=ok, other=0.0).to(ACC)
            gw += _rsum(tl.where(ok, g * xv, 0.0), CAX)
    if NEED_W:
        tl.store(pgw_ptr + (cs * N + n) * L + lpos, gw * isw, mask=inl)
