"""The helper layer of the numba CPU kernels (:mod:`globalpool.kernels.cpu_kernels` over a
grid, :mod:`globalpool.kernels.cpu_packed` over packed sequences): element conversions, fast
exp2 / log2 and powers, the ``Vec`` type and its intrinsics. No kernel here.

Data. Arrays arrive as NumPy views of torch tensors; float16 comes in as ``uint16`` and bfloat16
as ``int16`` (same bits). Loads widen to the accumulation type (float32, or float64 for float64
inputs) and stores round back (``vcvtph2ps``/``vcvtps2ph`` for float16, bit arithmetic with
round-to-nearest-even for bfloat16): :func:`widen`, :func:`narrow`, and in lanes :func:`vload`,
:func:`vput`.

Vectorisation. ``Vec`` is a numba type whose LLVM value is one vector register of the CPU
compiled for (:func:`~globalpool.kernels.launch.lane_bits`: 16 float32 or 8 float64 lanes with
AVX-512, 8 or 4 with AVX2, with matching int32 and bool vectors) and the intrinsics below
(``vload``, ``vsel``, ``vexp2``, ``hsum``...) operate on it, so that order-dependent states
(running max with first arg-max and tie count, log-sum-exp) vectorise too. Indices are unsigned
(``U``) so numba emits no negative-index fix-up that would turn contiguous loads into gathers.

fastmath allows reassociation and contraction but not ``nnan``/``ninf``: NaN and inf keep their
IEEE meaning. exp2/log2 for float32 are branch-free polynomials emitted as IR (~1e-7 relative
error, no SVML needed); float64 uses LLVM's exp2/log2 (libm).

Caching. numba caches a kernel by its own file, not by the helpers it inlines from here: the
kernels name this module in ``helpers`` (:func:`globalpool.kernels.launch.parallel_kernel`), so
that a digest of this file is in the names they are cached under and editing it recompiles
them. This file's own cache verdict comes from its :func:`_cache_probe`, as in the kernels'.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

from globalpool.kernels import launch

FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}  # deliberately no nnan / ninf
U = np.uintp  # unsigned indices: numba skips the negative-index fix-up, loops vectorise


def _cache_probe():  # pragma: no cover - never called: tells launch.can_cache about this file
    pass


CACHE = launch.can_cache(_cache_probe)  # False (with one warning) where numba cannot cache
# inlined into the caller's numba IR, so that a kernel's constant mode prunes their branches too
_helper = njit(inline="always", fastmath=FASTMATH, error_model="numpy", cache=CACHE)

# --------------------------------------------------------------------------------------------
# bit-level conversions


@intrinsic
def _f16_to_f32(typingctx, h):
    if h != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_f16(typingctx, f):
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _bf16_to_f32(typingctx, b):
    if b != types.int16:
        return None

    def codegen(context, builder, sig, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _f32_to_bf16(typingctx, f):
    """Round to nearest even; NaN stays a (quiet) NaN."""
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        u = builder.bitcast(args[0], i32)
        lsb = builder.and_(builder.lshr(u, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        rounded = builder.add(u, builder.add(ir.Constant(i32, 0x7FFF), lsb))
        hi = builder.trunc(builder.lshr(rounded, ir.Constant(i32, 16)), ir.IntType(16))
        quiet = builder.or_(
            builder.trunc(builder.lshr(u, ir.Constant(i32, 16)), ir.IntType(16)),
            ir.Constant(ir.IntType(16), 0x40),
        )
        isnan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.select(isnan, quiet, hi)

    return types.int16(types.float32), codegen


def widen(v):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(widen)
def _widen(v):
    if v == types.uint16:
        return lambda v: _f16_to_f32(v)
    if v == types.int16:
        return lambda v: _bf16_to_f32(v)
    if isinstance(v, types.Float):
        return lambda v: v
    return None


def narrow(v, a):  # pragma: no cover
    raise NotImplementedError


@overload(narrow)
def _narrow(v, a):
    dt = a.dtype
    if dt == types.uint16:
        return lambda v, a: _f32_to_f16(np.float32(v))
    if dt == types.int16:
        return lambda v, a: _f32_to_bf16(np.float32(v))
    if dt == types.float32:
        return lambda v, a: np.float32(v)
    if dt == types.float64:
        return lambda v, a: np.float64(v)
    return None


def like(c, v):  # pragma: no cover
    raise NotImplementedError


@overload(like)
def _like(c, v):
    """The constant ``c`` in ``v``'s float type (keeps float32 code in float32)."""
    if v == types.float32:
        return lambda c, v: np.float32(c)
    if v == types.float64:
        return lambda c, v: np.float64(c)
    return None


# --------------------------------------------------------------------------------------------
# exp2 / log2 emitted as LLVM IR for float32 scalars and vectors alike: branch-free polynomials
# (~1e-7 relative error) that vectorise without SVML. (numba later stamps the kernels' fast-math
# flags on these instructions too, so nothing here relies on exact rounding of float sums.)
# float64 goes through LLVM's exp2 / log2 (libm).

LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634
# 2**f on [-0.5, 0.5]: degree-6 polynomial fitted for relative error (about 1e-7 in float32)
_EXP2_POLY = (
    1.0000000005606806,
    0.6931472057136645,
    0.24022646842066023,
    0.05550328815031586,
    0.009618494225249088,
    0.0013399918989378558,
    0.00015344393100911625,
)
_EXP2_MAGIC = 1.5 * 2**23  # even: see _exp2_ir


def _const(ty, v):
    return ir.Constant(ty, [v] * ty.count) if isinstance(ty, ir.VectorType) else ir.Constant(ty, v)


def _base(ty):
    return ty.element if isinstance(ty, ir.VectorType) else ty


def _int_like(ty):
    return (
        ir.VectorType(ir.IntType(32), ty.count) if isinstance(ty, ir.VectorType) else ir.IntType(32)
    )


def _tname(ty):
    if isinstance(ty, ir.VectorType):
        return f"v{ty.count}{_ename(ty.element)}"
    return _ename(ty)


def _ename(t):
    if isinstance(t, ir.IntType):
        return f"i{t.width}"
    return {"float": "f32", "double": "f64", "half": "f16"}[str(t)]


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _fma_ir(builder, a, b, c):
    ty = a.type
    return builder.call(_fn(builder, f"llvm.fma.{_tname(ty)}", ty, [ty, ty, ty]), [a, b, c])


def _exp2_ir(builder, u, nonpositive=False):
    """2**u. With ``nonpositive`` (u <= 0 or NaN, as in log-sum-exp) the overflow clamp is
    skipped and u < -126 gives 2**-126 instead of 0 (harmless next to a sum >= 1).

    The scale 2**rint(u) comes from a magic addend: t = u + 1.5 * 2**23 holds rint(u) in its
    low mantissa bits, so ``(bits(t) + 127) << 23`` is that float (the higher bits shift out):
    no float-to-int conversion, and a NaN u needs no guard (it stays NaN through the
    polynomial). The addend is even, so a tie (u = k + 0.5) rounds to the same even integer as
    ``llvm.rint``, which gives the reduced argument (t - addend would be folded back to u under
    the function's unsafe-fp-math attribute). 2**u for u in (127.5, 128) overflows to inf, as
    2**rint(u) does."""
    ty = u.type
    if _base(ty) != ir.FloatType():
        return builder.call(_fn(builder, f"llvm.exp2.{_tname(ty)}", ty, [ty]), [u])
    it = _int_like(ty)
    low = builder.fcmp_ordered("<", u, _const(ty, -126.0))
    uc = builder.select(low, _const(ty, -126.0), u)
    if not nonpositive:
        uc = builder.select(builder.fcmp_ordered(">", uc, _const(ty, 128.0)), _const(ty, 128.0), uc)
    t = builder.fadd(uc, _const(ty, _EXP2_MAGIC))
    k = builder.call(_fn(builder, f"llvm.rint.{_tname(ty)}", ty, [ty]), [uc])
    f = builder.fsub(uc, k)  # in [-0.5, 0.5] (NaN stays NaN and carries through q)
    q = _const(ty, _EXP2_POLY[-1])
    for coef in reversed(_EXP2_POLY[:-1]):
        q = _fma_ir(builder, q, f, _const(ty, coef))
    biased = builder.add(builder.bitcast(t, it), _const(it, 127))
    scale = builder.bitcast(builder.shl(biased, _const(it, 23)), ty)
    res = builder.fmul(q, scale)
    if nonpositive:
        return res
    return builder.select(low, _const(ty, 0.0), res)  # NaN is not < -126: it stays NaN


def _log2_ir(builder, x):
    """log2 for x >= 0 (0 -> -inf, inf -> inf, NaN -> NaN); negative x gives garbage."""
    ty = x.type
    if _base(ty) != ir.FloatType():
        return builder.call(_fn(builder, f"llvm.log2.{_tname(ty)}", ty, [ty]), [x])
    it = _int_like(ty)
    u = builder.bitcast(x, it)
    e = builder.sub(builder.lshr(u, _const(it, 23)), _const(it, 127))
    m = builder.or_(builder.and_(u, _const(it, 0x7FFFFF)), _const(it, 0x3F800000))
    m = builder.bitcast(m, ty)
    big = builder.fcmp_ordered(">", m, _const(ty, 1.4142135))
    m = builder.select(big, builder.fmul(m, _const(ty, 0.5)), m)
    e = builder.select(big, builder.add(e, _const(it, 1)), e)
    t = builder.fdiv(builder.fsub(m, _const(ty, 1.0)), builder.fadd(m, _const(ty, 1.0)))
    t2 = builder.fmul(t, t)
    s = _const(ty, 1.0 / 9.0)
    for coef in (1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0):
        s = _fma_ir(builder, s, t2, _const(ty, coef))
    res = _fma_ir(builder, builder.fmul(t, s), _const(ty, 2.0 * LOG2E), builder.sitofp(e, ty))
    res = builder.select(builder.fcmp_ordered("==", x, _const(ty, 0.0)), _const(ty, -np.inf), res)
    keep = builder.or_(
        builder.fcmp_unordered("uno", x, x), builder.fcmp_ordered("==", x, _const(ty, np.inf))
    )
    return builder.select(keep, x, res)


def _scalar_math(emit):
    @intrinsic
    def fn(typingctx, v):
        if not isinstance(v, types.Float):
            return None

        def codegen(context, builder, sig, args):
            return emit(builder, args[0])

        return v(v), codegen

    return fn


sexp2 = _scalar_math(_exp2_ir)
slog2 = _scalar_math(_log2_ir)


@_helper
def ipow(v, k):
    """v**k for k in 0..4 with selects only."""
    v2 = v * v
    r = v2 * v2 if k == 4 else v2 * v
    r = v2 if k == 2 else r
    r = v if k == 1 else r
    return like(1.0, v) if k == 0 else r


@_helper
def spow(v, p):
    """v**p for v >= 0 (any real p)."""
    return sexp2(p * slog2(v))


sexp2n = _scalar_math(lambda builder, u: _exp2_ir(builder, u, nonpositive=True))


def fexp(y):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(fexp)
def _fexp(y):
    """e**y for y <= 0 (or NaN): float32 through the exp2 polynomial (``_exp2_ir``,
    ``nonpositive``: y < -87.3 gives 2**-126 instead of 0, harmless next to a sum >= 1), so that
    loops calling it vectorise; float64 through libm's exp."""
    if y == types.float64:
        return lambda y: math.exp(y)
    if y != types.float32:
        return None
    log2e = np.float32(LOG2E)
    return lambda y: sexp2n(y * log2e)


# --------------------------------------------------------------------------------------------
# explicit SIMD: a numba type whose LLVM value is one vector register (float, int32 or bool
# lanes). Loops written with these values vectorise by construction: the order-dependent lane
# states (running max with arg-max and tie count, online log-sum-exp) stay in registers.


class Vec(types.Type):
    """``count`` lanes of ``dtype`` held in one LLVM vector value."""

    def __init__(self, dtype, count):
        self.dtype = dtype
        self.count = count
        super().__init__(name=f"Vec({dtype}, {count})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        elt = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(elt, fe_type.count))


_I1, _I8, _I16, _I32 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32)
_F16, _F32 = ir.HalfType(), ir.FloatType()


def _acc_type(dt):
    return types.float64 if dt == types.float64 else types.float32


def lanes_of(dt):
    """Lanes of a ``Vec`` holding numba dtype ``dt``'s accumulation type: one register of
    :func:`globalpool.kernels.launch.lane_bits` bits (16 float32 or 8 float64 with AVX-512)."""
    return launch.lane_bits() // (64 if dt == types.float64 else 32)


def _splat(builder, value, vty):
    tmp = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(tmp, tmp, zeros)


def _vconst(vty, value):
    return ir.Constant(vty, [value] * vty.count)


def _lane_mask(builder, k, n):
    k32 = builder.trunc(k, _I32) if k.type.width > 32 else builder.sext(k, _I32)
    lanes = ir.Constant(ir.VectorType(_I32, n), list(range(n)))
    return builder.icmp_signed("<", lanes, _splat(builder, k32, ir.VectorType(_I32, n)))


def _vptr(context, builder, aty, aval, off, rty):
    ary = context.make_array(aty)(context, builder, value=aval)
    return builder.bitcast(builder.gep(ary.data, [off]), rty.as_pointer())


def _load(context, builder, aty, aval, off, n, k):
    """Raw load of n elements at flat offset off (masked to the first k when k is given)."""
    rty = ir.VectorType(context.get_data_type(aty.dtype), n)
    ptr = _vptr(context, builder, aty, aval, off, rty)
    if k is None:
        return builder.load(ptr, align=1, typ=rty)
    mask = _lane_mask(builder, k, n)
    fn = _fn(builder, f"llvm.masked.load.{_tname(rty)}.p0", rty, [ptr.type, _I32, mask.type, rty])
    return builder.call(fn, [ptr, ir.Constant(_I32, 1), mask, ir.Constant(rty, None)])


def _store(context, builder, aty, aval, off, raw, k):
    ptr = _vptr(context, builder, aty, aval, off, raw.type)
    if k is None:
        builder.store(raw, ptr, align=1)
        return
    mask = _lane_mask(builder, k, raw.type.count)
    fn = _fn(
        builder,
        f"llvm.masked.store.{_tname(raw.type)}.p0",
        ir.VoidType(),
        [raw.type, ptr.type, _I32, mask.type],
    )
    builder.call(fn, [raw, ptr, ir.Constant(_I32, 1), mask])


def _widen_ir(builder, raw, dt):
    """Raw array lanes -> value lanes (float16/bfloat16 bits -> float32, bool bytes -> i1)."""
    n = raw.type.count
    if dt == types.uint16:
        return builder.fpext(builder.bitcast(raw, ir.VectorType(_F16, n)), ir.VectorType(_F32, n))
    if dt == types.int16:
        wide = builder.shl(
            builder.zext(raw, ir.VectorType(_I32, n)), _vconst(ir.VectorType(_I32, n), 16)
        )
        return builder.bitcast(wide, ir.VectorType(_F32, n))
    if dt == types.boolean:
        return builder.icmp_unsigned("!=", raw, ir.Constant(raw.type, None))
    return raw


def _narrow_ir(builder, v, dt):
    """Value lanes -> raw array lanes (float32 -> float16 / bfloat16 bits, nearest even)."""
    n = v.type.count
    i32 = ir.VectorType(_I32, n)
    if dt == types.uint16:
        return builder.bitcast(builder.fptrunc(v, ir.VectorType(_F16, n)), ir.VectorType(_I16, n))
    if dt == types.int16:
        u = builder.bitcast(v, i32)
        lsb = builder.and_(builder.lshr(u, _vconst(i32, 16)), _vconst(i32, 1))
        rounded = builder.add(u, builder.add(_vconst(i32, 0x7FFF), lsb))
        hi = builder.trunc(builder.lshr(rounded, _vconst(i32, 16)), ir.VectorType(_I16, n))
        quiet = builder.or_(
            builder.trunc(builder.lshr(u, _vconst(i32, 16)), ir.VectorType(_I16, n)),
            _vconst(ir.VectorType(_I16, n), 0x40),
        )
        return builder.select(builder.fcmp_unordered("uno", v, v), quiet, hi)
    if dt == types.boolean:
        return builder.zext(v, ir.VectorType(_I8, n))
    return v


@intrinsic
def vload(typingctx, a, off):
    """Lanes x[off : off + lanes] of a float array, widened to the accumulation type."""
    vt = Vec(_acc_type(a.dtype), lanes_of(a.dtype))

    def codegen(context, builder, sig, args):
        raw = _load(context, builder, a, args[0], args[1], vt.count, None)
        return _widen_ir(builder, raw, a.dtype)

    return vt(a, off), codegen


@intrinsic
def vload_part(typingctx, a, off, k):
    """Like :func:`vload` for the first ``k`` lanes only (the others read as 0)."""
    vt = Vec(_acc_type(a.dtype), lanes_of(a.dtype))

    def codegen(context, builder, sig, args):
        raw = _load(context, builder, a, args[0], args[1], vt.count, args[2])
        return _widen_ir(builder, raw, a.dtype)

    return vt(a, off, k), codegen


@intrinsic
def vget(typingctx, a, off, like):
    """``like.count`` lanes of an int32, bool or float array, in its own type."""
    vt = Vec(a.dtype, like.count)

    def codegen(context, builder, sig, args):
        return _widen_ir(
            builder, _load(context, builder, a, args[0], args[1], vt.count, None), a.dtype
        )

    return vt(a, off, like), codegen


@intrinsic
def vget_part(typingctx, a, off, k, like):
    vt = Vec(a.dtype, like.count)

    def codegen(context, builder, sig, args):
        raw = _load(context, builder, a, args[0], args[1], vt.count, args[2])
        return _widen_ir(builder, raw, a.dtype)

    return vt(a, off, k, like), codegen


@intrinsic
def vput(typingctx, a, off, v):
    """Store lanes at a[off : off + lanes], rounding into the array's type."""

    def codegen(context, builder, sig, args):
        _store(context, builder, a, args[0], args[1], _narrow_ir(builder, args[2], a.dtype), None)
        return context.get_dummy_value()

    return types.none(a, off, v), codegen


@intrinsic
def vput_part(typingctx, a, off, v, k):
    def codegen(context, builder, sig, args):
        raw = _narrow_ir(builder, args[2], a.dtype)
        _store(context, builder, a, args[0], args[1], raw, args[3])
        return context.get_dummy_value()

    return types.none(a, off, v, k), codegen


@intrinsic
def vzero_of(typingctx, a):
    """A zero vector of the accumulation type and lane count of float array ``a``."""
    vt = Vec(_acc_type(a.dtype), lanes_of(a.dtype))

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(vt), None)

    return vt(a), codegen


@intrinsic
def vfull(typingctx, s, like):
    """``s`` in every lane, typed like ``like`` (float lanes)."""

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], s, like.dtype)
        return _splat(builder, v, context.get_value_type(like))

    return like(s, like), codegen


@intrinsic
def ifull(typingctx, i, like):
    """int32 lanes holding ``i``, with like's lane count."""
    vt = Vec(types.int32, like.count)

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], i, types.int32)
        return _splat(builder, v, context.get_value_type(vt))

    return vt(i, like), codegen


@intrinsic
def vlanes(typingctx, k, like):
    """Bool lanes: the first k true."""
    vt = Vec(types.boolean, like.count)

    def codegen(context, builder, sig, args):
        return _lane_mask(builder, args[0], like.count)

    return vt(k, like), codegen


@intrinsic
def izero_of(typingctx, like):
    """int32 zero lanes with like's lane count."""
    vt = Vec(types.int32, like.count)

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(vt), None)

    return vt(like), codegen


def _binary(op):
    @intrinsic
    def fn(typingctx, a, b):
        if not isinstance(a, Vec) or a != b:
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, op)(args[0], args[1])

        return a(a, b), codegen

    return fn


vadd, vsub, vmul, vdiv = _binary("fadd"), _binary("fsub"), _binary("fmul"), _binary("fdiv")
iadd = _binary("add")
mand, mor = _binary("and_"), _binary("or_")


def _compare(op, ordered=True, signed_int=False):
    @intrinsic
    def fn(typingctx, a, b):
        if not isinstance(a, Vec) or a != b:
            return None
        vt = Vec(types.boolean, a.count)

        def codegen(context, builder, sig, args):
            if signed_int:
                return builder.icmp_signed(op, args[0], args[1])
            if ordered:
                return builder.fcmp_ordered(op, args[0], args[1])
            return builder.fcmp_unordered(op, args[0], args[1])

        return vt(a, b), codegen

    return fn


vgt, vlt, veq = _compare(">"), _compare("<"), _compare("==")
ieq = _compare("==", signed_int=True)
vgt_i = _compare(">", signed_int=True)


@intrinsic
def visnan(typingctx, a):
    vt = Vec(types.boolean, a.count)

    def codegen(context, builder, sig, args):
        return builder.fcmp_unordered("uno", args[0], args[0])

    return vt(a), codegen


@intrinsic
def vsel(typingctx, m, a, b):
    """Lane-wise ``a if m else b``."""
    if not isinstance(a, Vec) or a != b:
        return None

    def codegen(context, builder, sig, args):
        return builder.select(args[0], args[1], args[2])

    return a(m, a, b), codegen


@intrinsic
def vmaximum(typingctx, a, b):
    """Lane-wise maximum that propagates NaN."""
    if not isinstance(a, Vec) or a != b:
        return None

    def codegen(context, builder, sig, args):
        vty = args[0].type
        return builder.call(
            _fn(builder, f"llvm.maximum.{_tname(vty)}", vty, [vty, vty]), list(args)
        )

    return a(a, b), codegen


@intrinsic
def mbits(typingctx, m):
    """A bool vector as an int64 bit mask (lane i -> bit i)."""
    if not isinstance(m, Vec) or m.dtype != types.boolean:
        return None

    def codegen(context, builder, sig, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(m.count)), ir.IntType(64))

    return types.int64(m), codegen


@intrinsic
def popc(typingctx, i):
    def codegen(context, builder, sig, args):
        ty = ir.IntType(64)
        return builder.call(_fn(builder, "llvm.ctpop.i64", ty, [ty]), [args[0]])

    return types.int64(types.int64), codegen


@intrinsic
def ctz(typingctx, i):
    """Index of the lowest set bit (64 for 0)."""

    def codegen(context, builder, sig, args):
        ty = ir.IntType(64)
        fn = _fn(builder, "llvm.cttz.i64", ty, [ty, ir.IntType(1)])
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 0)])

    return types.int64(types.int64), codegen


def _reduce(kind, flags=()):
    @intrinsic
    def fn(typingctx, a):
        def codegen(context, builder, sig, args):
            vty = args[0].type
            et = vty.element
            name = f"llvm.vector.reduce.{kind}.{_tname(vty)}"
            if kind == "fadd":
                f = _fn(builder, name, et, [et, vty])
                return builder.call(f, [ir.Constant(et, -0.0), args[0]], fastmath=flags)
            return builder.call(_fn(builder, name, et, [vty]), [args[0]])

        return a.dtype(a), codegen

    return fn


hsum = _reduce("fadd", ("reassoc",))
hmax = _reduce("fmaximum")  # NaN-propagating


def _vector_math(emit):
    @intrinsic
    def fn(typingctx, a):
        if not isinstance(a, Vec):
            return None

        def codegen(context, builder, sig, args):
            return emit(builder, args[0])

        return a(a), codegen

    return fn


vexp2 = _vector_math(_exp2_ir)
vexp2n = _vector_math(lambda builder, u: _exp2_ir(builder, u, nonpositive=True))
vlog2 = _vector_math(_log2_ir)


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c, one rounding."""
    if not isinstance(a, Vec) or a != b or a != c:
        return None

    def codegen(context, builder, sig, args):
        return _fma_ir(builder, *args)

    return a(a, b, c), codegen


def nlanes(a):  # pragma: no cover
    raise NotImplementedError


@overload(nlanes)
def _nlanes_ov(a):
    n = lanes_of(a.dtype)
    return lambda a: n


@_helper
def vipow(v, k):
    """Lanes v**k for k in 1..4 (k constant in the caller: the other branches are pruned)."""
    v2 = vmul(v, v)
    if k == 1:
        return v
    if k == 2:
        return v2
    if k == 3:
        return vmul(v2, v)
    return vmul(v2, v2)


@intrinsic
def hany(typingctx, m):
    """True if any bool lane is set."""
    if not isinstance(m, Vec) or m.dtype != types.boolean:
        return None

    def codegen(context, builder, sig, args):
        bits = builder.bitcast(args[0], ir.IntType(m.count))
        return builder.icmp_unsigned("!=", bits, ir.Constant(ir.IntType(m.count), 0))

    return types.boolean(m), codegen


# --------------------------------------------------------------------------------------------
# whole or partial vectors, chosen at run time


def _whole_or_part(context, builder, r, W, whole, part):
    """``whole()`` where ``r == W`` (all lanes), else ``part()`` (the first r lanes): a branch,
    so that full vectors use plain loads and stores. Returns the phi of their values, if any."""
    i64 = ir.IntType(64)
    r64 = builder.sext(r, i64) if r.type.width < 64 else r
    W64 = builder.sext(W, i64) if W.type.width < 64 else W
    with builder.if_else(builder.icmp_signed("==", r64, W64)) as (then, otherwise):
        with then:
            a = whole()
            from_whole = builder.block
        with otherwise:
            b = part()
            from_part = builder.block
    if a is None:
        return None
    phi = builder.phi(a.type)
    phi.add_incoming(a, from_whole)
    phi.add_incoming(b, from_part)
    return phi


@intrinsic
def ldx(typingctx, x, off, r, W):
    """:func:`vload` where ``r == W``, else :func:`vload_part` of r lanes."""
    vt = Vec(_acc_type(x.dtype), lanes_of(x.dtype))

    def codegen(context, builder, sig, args):
        a, o, r_, w_ = args
        return _whole_or_part(
            context, builder, r_, w_,
            lambda: _widen_ir(builder, _load(context, builder, x, a, o, vt.count, None), x.dtype),
            lambda: _widen_ir(builder, _load(context, builder, x, a, o, vt.count, r_), x.dtype),
        )

    return vt(x, off, r, W), codegen


@intrinsic
def lds(typingctx, a, off, r, W, z):
    """:func:`vget` (lanes like z) where ``r == W``, else :func:`vget_part` of r lanes."""
    vt = Vec(a.dtype, z.count)

    def codegen(context, builder, sig, args):
        arr, o, r_, w_, _ = args
        return _whole_or_part(
            context, builder, r_, w_,
            lambda: _widen_ir(builder, _load(context, builder, a, arr, o, vt.count, None), a.dtype),
            lambda: _widen_ir(builder, _load(context, builder, a, arr, o, vt.count, r_), a.dtype),
        )

    return vt(a, off, r, W, z), codegen


@intrinsic
def sts(typingctx, a, off, v, r, W):
    """:func:`vput` where ``r == W``, else :func:`vput_part` of r lanes."""

    def codegen(context, builder, sig, args):
        arr, o, v_, r_, w_ = args
        raw = _narrow_ir(builder, v_, a.dtype)
        _whole_or_part(
            context, builder, r_, w_,
            lambda: _store(context, builder, a, arr, o, raw, None),
            lambda: _store(context, builder, a, arr, o, raw, r_),
        )
        return context.get_dummy_value()

    return types.none(a, off, v, r, W), codegen


@_helper
def flush_into(tot, part, k):
    """tot[:k] += part[:k], then part[:k] <- 0: one span's running sums added to the (float64)
    totals of a two-level summation, so float32 rounding does not grow with the row length."""
    for j in range(k):
        tot[j] += part[j]
        part[j] = 0.0


@_helper
def root_span(out, o0, o1, invp):
    """GeM's root, out.flat[o0:o1] <- out ** invp, vectorised (0, inf and NaN stay as they are),
    applied by each task (grid and packed kernels) to the outputs it wrote while they are still
    in cache."""
    W = nlanes(out)
    z = vzero_of(out)
    ipv = vfull(invp, z)
    inf = vfull(np.inf, z)
    for b in range(o0, o1, W):
        k = min(W, o1 - b)
        v = vload_part(out, b, k)
        ok = mand(vgt(v, z), vlt(v, inf))
        vput_part(out, b, vsel(ok, vexp2(vmul(ipv, vlog2(v))), v), k)
