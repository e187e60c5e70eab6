"""How the numba CPU kernels are compiled, cached and launched (no kernel code here).

Threading. The kernels run under numba's threading layer as configured (``NUMBA_THREADING_LAYER``
or numba's default: OpenMP on Linux, the fastest here). GNU OpenMP cannot run a parallel region
in a ``fork()``ed child of a process that already used it (numba terminates such a child: a
``DataLoader`` worker, a ``multiprocessing`` fork pool), so in such a child every kernel runs
its whole range on the calling thread (the same compiled code, one slice): one thread per
child, as torch itself uses in ``DataLoader`` workers. numba's ``workqueue`` layer is
fork-safe but measured 10-60% slower here (README, "First call and caching") and is not
thread-safe; under it (chosen by the user) every launch goes through :data:`LAUNCH_LOCK`, so
that two Python threads never launch at once.

Caching. Kernels are cached on disk by numba (``__pycache__`` beside the source, else the
user's cache directory, or ``NUMBA_CACHE_DIR``). Where none is writable (a read-only install
in a container, ``HOME`` unset), :func:`can_cache` says so once with a warning and the kernels
are compiled in memory on every run. numba keys a cached function on its own file only, not on
the helpers and intrinsics it inlines from other files: a kernel names those files' modules in
``helpers`` (:func:`parallel_kernel`, :func:`serial_kernel`), and a digest of their source and
of the kernels' lane width (:func:`lane_bits`) is part of the name it is cached under, so that
editing a helper or choosing another width recompiles the kernels using it (numba keys the
target CPU itself).

Compile-time modes. :func:`parallel_kernel` compiles a kernel with ``modal`` arguments (a
``mode`` number, a ``need_aux`` flag) once per value of them, on first use of that value: the
kernel's own source, opening with ``mode = <value>``, so numba prunes the other modes'
branches before typing and the first call compiles only what it needs.

A body per kernel, one parallel loop for all (details below, "launching"). A kernel is not
compiled as a numba parallel function. Its body, the kernel's source with each ``prange`` loop
run serially over one slice of its range, is a plain compiled function, and every kernel's
slices are launched on numba's pool by the same small parallel loop, :func:`_parts`, compiled
once. Compiled as numba parallel functions, each kernel paid numba's parallel passes and had
each loop body optimised by LLVM three times (on its own, inside numba's generated parallel
wrapper, and inside the kernel): a first max training step in channels-last took 16 s with the
loop bodies inline, 8.3 s with them compiled apart, and 3.4 s now; every first call is at most
3 s (``benchmarks/cold_start.py``).

>>> from globalpool.kernels import launch
>>> launch.serial()
False
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import inspect
import operator
import os
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable
from types import FunctionType, ModuleType
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import cfunc, njit, prange, types
from numba._dispatcher import compute_fingerprint
from numba.core import cgutils
from numba.core.typing.typeof import Purpose, typeof
from numba.extending import intrinsic

__all__ = [
    "LAUNCH_LOCK", "cache_dir", "can_cache", "layer_info", "parallel_kernel", "serial",
    "serial_kernel", "lane_bits", "target_cpu", "vector_bits",
]

LAUNCH_LOCK = threading.RLock()
# parts: how many slices each parallel loop is cut into (numba's pool size; 1 where kernels run
# serially); unlocked: the threading layer is known to allow launches from several threads
_state: dict[str, Any] = {
    "serial": False, "parts": max(1, numba.config.NUMBA_NUM_THREADS), "unlocked": False
}


def _started_layer() -> str | None:
    """The layer numba has already started in this process, or None."""
    from numba.np.ufunc import parallel

    if not getattr(parallel, "_is_initialized", False):
        return None
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def _gnu_openmp() -> bool:
    if _started_layer() != "omp":
        return False
    try:
        from numba.np.ufunc import omppool

        return getattr(omppool, "openmp_vendor", "GNU") != "Intel"
    except ImportError:  # pragma: no cover
        return True


def _after_fork_in_child() -> None:
    global LAUNCH_LOCK
    LAUNCH_LOCK = threading.RLock()  # a lock held by another thread at fork() stays held: renew
    if _gnu_openmp():  # the parent ran GNU OpenMP regions: this child must not start one
        _state["serial"] = True
        _state["parts"] = 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def serial() -> bool:
    """Whether kernels run on the calling thread only (a fork()ed child of a GNU OpenMP
    process)."""
    return _state["serial"]


def layer_info() -> tuple[str, bool]:
    """(threading layer in use, or as configured if none started yet; whether kernels run on
    the calling thread only)."""
    return _started_layer() or numba.config.THREADING_LAYER, _state["serial"]


def _launch_guard() -> contextlib.AbstractContextManager:
    if _started_layer() not in ("workqueue", None):
        return contextlib.nullcontext()
    return LAUNCH_LOCK  # workqueue (or none started yet: layer unknown): one launch at a time


# --------------------------------------------------------------------------------------------
# caching


_cacheable: dict[str, bool] = {}  # directory of a probed file -> whether numba caches there


def can_cache(probe: Callable) -> bool:
    """Whether numba can cache functions of ``probe``'s source file; warns once if not (once
    per directory: numba's cache locators decide by the file's directory)."""
    where = os.path.dirname(os.path.abspath(inspect.getfile(probe)))
    if where in _cacheable:
        return _cacheable[where]
    try:
        from numba.core.caching import FunctionCache

        # numba's zip-file locator does not check that its directory can be made: check here
        FunctionCache(probe)._impl.locator.ensure_cache_path()
    except (RuntimeError, OSError) as exc:  # "cannot cache function ...: no locator available"
        warnings.warn(
            f"globalpool: numba cannot cache the fused CPU kernels here ({exc}); they are "
            "compiled in memory on every run (seconds per kind on first use). Set "
            "NUMBA_CACHE_DIR to a writable directory to cache them.",
            RuntimeWarning,
            stacklevel=2,
        )
        _cacheable[where] = False
        return False
    _cacheable[where] = True
    return True


def cache_dir(probe: Callable) -> str | None:
    """Where numba caches functions of ``probe``'s file (None when it cannot)."""
    try:
        from numba.core.caching import FunctionCache

        return FunctionCache(probe)._cache_path
    except (RuntimeError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------
# launching: one parallel loop for every kernel, the kernel's body called through a pointer
#
# A kernel's ``prange`` loops become its *phases*, run one after the other. Its *body* is a C
# function ``void body(void *args, int64 phase, int64 part, int64 parts)`` (a numba ``cfunc``,
# compiled once per modal values and argument types): the kernel's source reading its arguments
# from ``args``, with each ``prange`` loop in a branch of its own that runs slice ``part`` of
# ``parts`` of the loop's range serially (the static schedule numba's parallel loops use).
# :func:`_run`, compiled once per argument types and shared by all kernels, stores the
# arguments in its stack frame and, for each phase, calls the body once on the calling thread
# (one part) or from every thread of numba's pool through :func:`_parts`, the only ``prange``
# loop, compiled once. The body sees the caller's arrays: no copies.

_VOIDP = ir.IntType(8).as_pointer()
BODY_SIGNATURE = types.void(types.voidptr, types.int64, types.int64, types.int64)
LAUNCHER_SIGNATURE = types.void(types.int64, types.voidptr, types.int64, types.int64)


@intrinsic
def _address_of(typingctx, value):
    """The address of a copy of ``value`` in the calling function's stack frame (valid until
    it returns; references in it are borrowed)."""

    def codegen(context, builder, sig, args):
        slot = cgutils.alloca_once(builder, args[0].type)
        builder.store(args[0], slot)
        return builder.bitcast(slot, _VOIDP)

    return types.voidptr(value), codegen


@intrinsic
def _unpack(typingctx, address, kind):
    """The tuple of numba type ``kind`` stored at ``address`` by :func:`_address_of`, its
    arrays borrowed: their meminfo is null, so numba's reference counting skips them (the
    caller of :func:`_run` owns them for the whole launch). Counting them would cost two atomic
    operations on the caller's shared counters around every use in a loop: the max forward on
    (32, 512, 14, 14) over two threads took 1,183 us counted against 142 us borrowed, the
    counters' cache line passing between cores."""
    if not isinstance(kind, types.TypeRef) or not isinstance(kind.instance_type, types.BaseTuple):
        return None
    ty = kind.instance_type
    for member in ty.types:
        if not isinstance(member, (types.Array, types.Number, types.Boolean)):
            raise TypeError(f"a kernel argument of type {member}: arrays and scalars only")

    def codegen(context, builder, sig, args):
        slot = builder.bitcast(args[0], context.get_value_type(ty).as_pointer())
        value = builder.load(slot)
        for i, member in enumerate(ty.types):
            if isinstance(member, types.Array):
                array = context.make_array(member)(
                    context, builder, value=builder.extract_value(value, i)
                )
                array.meminfo = cgutils.get_null_value(array.meminfo.type)
                array.parent = cgutils.get_null_value(array.parent.type)
                value = builder.insert_value(value, array._getvalue(), i)
        return value

    return ty(types.voidptr, kind), codegen


@intrinsic
def _call(typingctx, address, a, b, c, d):
    """Calls the C function ``void f(a, b, c, d)`` at ``address`` (a body, or the launcher
    :func:`_parts`): integers passed as int64, pointers as they are."""
    args = (a, b, c, d)
    if not isinstance(address, types.Integer) or not all(
        isinstance(t, (types.Integer, types.RawPointer)) for t in args
    ):
        return None

    def codegen(context, builder, sig, values):
        passed = [
            v if isinstance(t, types.RawPointer) else context.cast(builder, v, t, types.int64)
            for v, t in zip(values[1:], sig.args[1:], strict=True)
        ]
        fnty = ir.FunctionType(ir.VoidType(), [v.type for v in passed])
        builder.call(builder.inttoptr(values[0], fnty.as_pointer()), passed)
        return context.get_dummy_value()

    return types.none(address, *args), codegen


def _parts(address, args, phase, parts):  # pragma: no cover - compiled by numba
    for part in prange(parts):
        _call(address, args, phase, part, parts)


def _run(args, address, phases, parts, launcher):  # pragma: no cover - compiled by numba
    pointer = _address_of(args)
    for phase in range(phases):
        if parts == 1:
            _call(address, pointer, phase, 0, 1)
        else:
            _call(launcher, address, pointer, phase, parts)


@functools.cache
def _runner(cache: bool) -> tuple[Any, Any]:
    """(:func:`_run` compiled per argument types, :func:`_parts` compiled once as a C function
    that ``_run`` calls through its address, so that it links no parallel code of its own);
    compiled, or loaded from numba's cache, on first use."""
    return njit(cache=cache)(_run), cfunc(LAUNCHER_SIGNATURE, parallel=True, cache=cache)(_parts)


# the names the generated code uses (prefixed so that no kernel variable can clash)
_ADDRESS, _ARGS, _PHASE, _PART, _PARTS = (
    "_gp_address", "_gp_args", "_gp_phase", "_gp_part", "_gp_parts"
)


LANE_BITS_ENV = "GLOBALPOOL_LANE_BITS"
_VECTOR_PROBE = """define <16 x float> @probe(<16 x float> %a, <16 x float> %b) {
  %c = fadd <16 x float> %a, %b
  ret <16 x float> %c
}"""


def target_cpu() -> str:
    """The CPU numba compiles the kernels for: ``NUMBA_CPU_NAME``, else this machine's."""
    import llvmlite.binding as ll
    from numba.core import config

    return config.CPU_NAME or ll.get_host_cpu_name()


@functools.cache
def vector_bits() -> int:
    """Bits in one vector register of the CPU numba compiles the kernels for: 512 with
    AVX-512, 256 with AVX2, 128 with SSE or ARM NEON. Read from the code numba's target emits
    for one 16-float addition, so that it follows ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``
    (``NUMBA_CPU_NAME=x86-64-v3 NUMBA_CPU_FEATURES=+avx2`` compiles AVX2 kernels on an AVX-512
    machine).

    >>> vector_bits() in (128, 256, 512)
    True
    """
    import llvmlite.binding as ll
    from numba.core import codegen, config

    features = (
        config.CPU_FEATURES if config.CPU_FEATURES is not None
        else codegen.get_host_cpu_features()
    )
    try:
        ll.initialize_native_target()
        ll.initialize_native_asmprinter()
        target = ll.Target.from_triple(ll.get_process_triple())
        machine = target.create_target_machine(cpu=target_cpu(), features=features, opt=0)
        assembly = machine.emit_assembly(ll.parse_assembly(_VECTOR_PROBE))
    except RuntimeError:  # no assembly for this target: 512 bits, which LLVM splits as needed
        return 512
    if "zmm" in assembly:
        return 512
    if "ymm" in assembly:
        return 256
    return 128


@functools.cache
def lane_bits() -> int:
    """Bits in one of the kernels' lane vectors (``Vec``): one vector register of the CPU
    compiled for (:func:`vector_bits`: 16 float32 lanes with AVX-512, 8 with AVX2), unless
    ``GLOBALPOOL_LANE_BITS`` (128, 256, 512 or 1024) says otherwise; LLVM splits a vector wider
    than the registers into several, which unrolls the loops. One register measured fastest
    with both AVX-512 and AVX2 (docs/performance.md, "Vector width"). Part of the kernels'
    cache names.

    >>> lane_bits() == vector_bits() or LANE_BITS_ENV in os.environ
    True
    """
    asked = os.environ.get(LANE_BITS_ENV, "").strip()
    if not asked:
        return vector_bits()
    if asked not in ("128", "256", "512", "1024"):
        raise ValueError(
            f"globalpool: {LANE_BITS_ENV}={asked!r} is not a lane width the kernels take; "
            "expected 128, 256, 512 or 1024 (bits), or unset for the CPU's vector registers"
        )
    return int(asked)


@functools.cache
def _stamp() -> str:
    """A digest of this file, in the names of the generated functions: numba's cache stamps
    them by the kernel's file only, and their code depends on the intrinsics above too."""
    return hashlib.sha1(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()[:8]


@functools.cache
def _digest(helpers: tuple[ModuleType, ...]) -> str:
    """A digest of the source of the modules in ``helpers`` ("" for none)."""
    if not helpers:
        return ""
    sources = "\0".join(inspect.getsource(m) for m in helpers) + f"\0{lane_bits()}"
    return hashlib.sha1(sources.encode()).hexdigest()[:8]


class ParallelKernel:
    """A kernel whose ``prange`` loops run on numba's thread pool, compiled as a body (see
    above) per value of its ``modal`` arguments and argument types; launched by :func:`_run`
    under :func:`_launch_guard`.

    >>> ParallelKernel.__call__.__doc__.startswith("Runs the kernel")
    True
    """

    def __init__(
        self,
        fn: Callable,
        options: dict[str, Any],
        modal: tuple[str, ...],
        noalias: bool,
        helpers: tuple[ModuleType, ...] = (),
    ) -> None:
        self.py_func = fn
        self._noalias = noalias
        self._helpers = tuple(helpers)
        self.__name__ = fn.__name__
        self.__qualname__ = fn.__qualname__
        self.__doc__ = fn.__doc__
        self._options = {k: v for k, v in options.items() if k != "parallel"}
        params = list(inspect.signature(fn).parameters)
        self._params = params
        self._modal = [params.index(m) for m in modal if m in params]
        self._free = [i for i in range(len(params)) if i not in self._modal]
        self._modal_of = _getter(self._modal)
        self._free_of = _getter(self._free)
        self._bodies: dict[tuple, tuple[int, int]] = {}  # -> (body's address, phases)
        self._by_name: dict[str, tuple[int, int]] = {}  # same numba types, other Python types
        self._run: Any = None  # set on first use (see _runner)
        self._launcher = 0
        self._compiled: list[Any] = []  # keeps the bodies' code alive

    def __call__(self, *args: Any) -> Any:
        """Runs the kernel on ``args`` (its parameters, in order), compiling on first use."""
        key = self._modal_of(args)
        free = self._free_of(args)
        kind = (key, compute_fingerprint(free))
        address, phases = self._bodies.get(kind) or self._body(kind, key, free)
        if _state["unlocked"]:
            return self._run(free, address, phases, _state["parts"], self._launcher)
        with _launch_guard():
            result = self._run(free, address, phases, _state["parts"], self._launcher)
        _state["unlocked"] = _started_layer() not in ("workqueue", None)
        return result

    def _consts(self, key: tuple) -> dict[str, bool | int]:
        return {self._params[i]: _constant(v) for i, v in zip(self._modal, key, strict=True)}

    def _tag(self, key: tuple) -> str:
        return "_".join(str(_constant(k)) for k in key)

    def _body(self, kind: tuple, key: tuple, free: tuple) -> tuple[int, int]:
        if self._run is None:
            self._run, launcher = _runner(bool(self._options.get("cache")))
            self._launcher = launcher.address
        argtypes = types.Tuple([typeof(a, Purpose.argument) for a in free])
        stamp = f"{_stamp()} {_digest(self._helpers)} {argtypes}"
        digest = hashlib.sha1(stamp.encode()).hexdigest()[:12]
        name = f"{self.__name__}__{self._tag(key)}__body_{digest}"
        found = self._by_name.get(name)
        if found is None:
            namespace = {**self.py_func.__globals__, "_gp_unpack": _unpack, _ARGS: argtypes}
            consts = self._consts(key)
            if self._noalias:  # the kernel's code as a function of its arrays, called
                inner = f"{name}_inner"
                code, phases = _generate(self.py_func, inner, consts, "inner")
                exec(code, namespace)
                namespace[inner] = _no_alias(njit(**self._options)(namespace[inner]))
                exec(_wrapper(self.py_func, name, inner, len(free)), namespace)
            else:  # one function: the kernel's code reads its arguments itself
                code, phases = _generate(self.py_func, name, consts, "body")
                exec(code, namespace)
            body = cfunc(BODY_SIGNATURE, **self._options)(namespace[name])
            self._compiled.append(body)
            found = self._by_name[name] = (body.address, phases)
        self._bodies[kind] = found
        return found


def _no_alias(dispatcher: Any) -> Any:
    """``dispatcher`` compiled with its array arguments marked ``noalias`` (a kernel's arrays
    never overlap), as numba marks the body of a parallel loop: without it LLVM must allow for
    a store to one array changing another, and compiled some backward loops to less vectorised
    code (channels-last lse backward: 33% more CPU time on one thread)."""
    compiler = getattr(dispatcher, "_compiler", None)
    base = getattr(compiler, "_customize_flags", None)
    if base is None:  # pragma: no cover - a numba without this hook: correct, maybe slower
        return dispatcher

    def customize(flags: Any) -> Any:
        flags = base(flags)
        flags.noalias = True
        return flags

    compiler._customize_flags = customize
    return dispatcher


def _wrapper(fn: Callable, name: str, inner: str, count: int) -> Any:
    """The code of a body: a C function that reads the ``count`` arguments :func:`_run` stored and
    passes them to ``inner`` (the kernel's code, as a function of them and of the slice), which
    LLVM inlines here. Compiled as if at ``fn``'s first line (numba's cache locates it by it)."""
    names = ", ".join(f"_gp_a{i}" for i in range(count))
    source = (
        f"def {name}({_ADDRESS}, {_PHASE}, {_PART}, {_PARTS}):\n"
        f"    ({names},) = _gp_unpack({_ADDRESS}, {_ARGS})\n"
        f"    {inner}({names}, {_PHASE}, {_PART}, {_PARTS})\n"
    )
    tree = ast.parse(source)
    ast.increment_lineno(tree, inspect.getsourcelines(fn)[1] - 1)
    return compile(tree, inspect.getfile(fn), "exec")


def _generate(fn: Callable, name: str, consts: dict[str, bool | int], part: str) -> Any:
    """The code of ``fn``'s ``"body"`` (see above), or of the body's ``"inner"`` function (its
    code taking the arguments), named ``name``, and the number of phases it has. Its modal
    arguments are pinned to ``consts`` (numba prunes the other values' branches before typing;
    ``if`` on one of them is pruned here, so that a loop it excludes is no phase). Compiled as
    if in ``fn``'s file, at its line numbers (numba's cache locates and stamps it by them)."""
    lines, first = inspect.getsourcelines(fn)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    ast.increment_lineno(tree, first - 1)
    func = tree.body[0]
    assert isinstance(func, ast.FunctionDef)
    stmts = func.body[1:] if ast.get_docstring(func) is not None else func.body
    at = stmts[0]
    free = [a.arg for a in func.args.args if a.arg not in consts]
    pins = [_assign(arg, ast.Constant(value), at) for arg, value in consts.items()]
    if part == "inner":
        params = [*free, _PHASE, _PART, _PARTS]
        head = []
    else:
        params = [_ADDRESS, _PHASE, _PART, _PARTS]
        unpack = _call_of("_gp_unpack", [_ADDRESS, _ARGS])
        names = ast.Tuple([ast.Name(n, ast.Store()) for n in free], ast.Store())
        head = [_assign(names, unpack, at)]
    func.name, func.decorator_list = name, []
    func.args = ast.arguments(
        posonlyargs=[], args=[ast.arg(p) for p in params], kwonlyargs=[], kw_defaults=[],
        defaults=[],
    )
    rewrite = _Phases()
    body = _Pinned(consts).visit(ast.Module(body=stmts, type_ignores=[])).body
    func.body = head + pins + [rewrite.visit(s) for s in body]
    if rewrite.count == 0:
        raise TypeError(f"{fn.__name__}: a parallel kernel needs a prange loop")
    return compile(ast.fix_missing_locations(tree), inspect.getfile(fn), "exec"), rewrite.count


class _Pinned(ast.NodeTransformer):
    """``if m:`` / ``if not m:`` on a pinned argument ``m`` replaced by the branch taken."""

    def __init__(self, consts: dict[str, bool | int]) -> None:
        self.consts = consts

    def visit_If(self, node: ast.If) -> Any:
        self.generic_visit(node)
        value = self.value(node.test)
        if value is None:
            return node
        taken = node.body if value else node.orelse
        return taken or ast.copy_location(ast.Pass(), node)

    def value(self, test: ast.expr) -> bool | None:
        """``test``'s truth if it is ``m``, ``not m``, ``m == c`` or ``m != c`` (``c`` a
        literal), else None."""
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            inner = self.value(test.operand)
            return None if inner is None else not inner
        if isinstance(test, ast.Name) and test.id in self.consts:
            return bool(self.consts[test.id])
        if (
            isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], (ast.Eq, ast.NotEq))
            and isinstance(test.left, ast.Name) and test.left.id in self.consts
            and isinstance(test.comparators[0], ast.Constant)
        ):
            equal = self.consts[test.left.id] == test.comparators[0].value
            return equal if isinstance(test.ops[0], ast.Eq) else not equal
        return None


def _assign(target: str | ast.expr, value: ast.expr, where: ast.AST) -> ast.Assign:
    if isinstance(target, str):
        target = ast.Name(target, ast.Store())
    return ast.copy_location(ast.Assign([target], value), where)


def _call_of(fn: str, names: list[str]) -> ast.Call:
    return ast.Call(ast.Name(fn, ast.Load()), [ast.Name(n, ast.Load()) for n in names], [])


def _is_prange(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.For)
        and isinstance(node.iter, ast.Call)
        and isinstance(node.iter.func, ast.Name)
        and node.iter.func.id == "prange"
    )


class _Phases(ast.NodeTransformer):
    """Each ``prange`` loop, counted in source order (its phase), becomes a branch taken when
    its phase is asked for, in which the loop runs slice ``part`` of ``parts`` of its range
    serially (its own body unchanged)."""

    def __init__(self) -> None:
        self.count = 0

    def visit_For(self, node: ast.For) -> ast.AST:
        if not _is_prange(node):
            return self.generic_visit(node)
        if not isinstance(node.target, ast.Name):
            raise TypeError("a prange loop needs one index name")
        if len(node.iter.args) != 1 or node.iter.keywords or node.orelse:
            raise TypeError("a prange loop takes one argument, the count, and no else")
        phase = self.count
        self.count += 1
        return ast.copy_location(self.replace(node, phase), node)

    def replace(self, loop: ast.For, phase: int) -> ast.AST:
        count = f"_gp_count{phase}"

        def bound(k: int) -> ast.expr:
            part = ast.Name(_PART, ast.Load())
            if k:
                part = ast.BinOp(part, ast.Add(), ast.Constant(k))
            return ast.BinOp(
                ast.BinOp(ast.Name(count, ast.Load()), ast.Mult(), part),
                ast.FloorDiv(),
                ast.Name(_PARTS, ast.Load()),
            )

        if any(_is_prange(n) for s in loop.body for n in ast.walk(s)):
            raise TypeError("a prange loop inside a prange loop")
        total = loop.iter.args[0]
        loop.iter = ast.Call(ast.Name("range", ast.Load()), [bound(0), bound(1)], [])
        test = ast.Compare(ast.Name(_PHASE, ast.Load()), [ast.Eq()], [ast.Constant(phase)])
        return ast.If(test, [_assign(count, total, loop), loop], [])


def _getter(indices: list[int]) -> Callable[[tuple], tuple]:
    """``args -> tuple(args[i] for i in indices)``, in C."""
    if len(indices) == 1:
        (i,) = indices
        return lambda args: (args[i],)
    return operator.itemgetter(*indices) if indices else lambda args: ()


def _constant(v: Any) -> bool | int:
    return bool(v) if isinstance(v, (bool, np.bool_)) else int(v)


def parallel_kernel(
    modal: tuple[str, ...] = ("mode",),
    noalias: bool = False,
    helpers: tuple[ModuleType, ...] = (),
    **options: Any,
) -> Callable:
    """Decorator: ``fn`` as a :class:`ParallelKernel` compiled with ``options`` (numba's, as
    for ``njit``; ``parallel`` is implied). With ``noalias`` its arrays are promised not to
    overlap (faster code for some loops that store, compiled in about 0.3 s more). ``helpers``:
    the modules, other than ``fn``'s own, whose jitted helpers it inlines (their digest is in
    the names it is cached under)."""

    def wrap(fn: Callable) -> ParallelKernel:
        return ParallelKernel(fn, options, modal, noalias, helpers)

    return wrap


def serial_kernel(helpers: tuple[ModuleType, ...] = (), **options: Any) -> Callable:
    """Decorator: ``fn`` compiled by ``njit(**options)``, run on the calling thread, cached
    under its name with the digest of ``helpers`` (see :func:`parallel_kernel`) appended."""

    def wrap(fn: Callable) -> Any:
        if not helpers or not options.get("cache"):
            return njit(**options)(fn)
        named = FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                             fn.__closure__)
        named.__qualname__ = f"{fn.__qualname__}__{_digest(tuple(helpers))}"
        named.__doc__, named.__module__ = fn.__doc__, fn.__module__
        return njit(**options)(named)

    return wrap
