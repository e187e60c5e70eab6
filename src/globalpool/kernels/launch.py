"""How the numba CPU kernels are compiled, cached and launched (no kernel code here).

Threading. The kernels run under numba's threading layer as configured (``NUMBA_THREADING_LAYER``
or numba's default: OpenMP on Linux, the fastest here). GNU OpenMP cannot run a parallel region
in a ``fork()``ed child of a process that already used it (numba terminates such a child: a
``DataLoader`` worker, a ``multiprocessing`` fork pool), so in such a child every kernel runs a
serial build of itself instead (``parallel=False``, compiled on first use there and cached like
the others): one thread per child, as torch itself uses in ``DataLoader`` workers.
numba's ``workqueue`` layer is fork-safe but measured 10-60% slower here (README, "First call
and caching") and is not thread-safe; under it (chosen by the user) every launch goes through
:data:`LAUNCH_LOCK`, so that two Python threads never launch at once.

Caching. Kernels are cached on disk by numba (``__pycache__`` beside the source, else the
user's cache directory, or ``NUMBA_CACHE_DIR``). Where none is writable (a read-only install
in a container, ``HOME`` unset), :func:`can_cache` says so once with a warning and the kernels
are compiled in memory on every run.

Compile-time modes. :func:`parallel_kernel` builds, for a kernel with ``modal`` arguments (a
``mode`` number, a ``need_aux`` flag), one compiled entry point per value of them, on first use
of that value: the kernel's own source, its body opening with ``mode = <value>``, so numba
prunes the other modes' branches before typing and the first call compiles only what it needs.
(Inlining the whole kernel into a small entry function, numba's ``inline="always"``, did the
same but copied the kernel's IR once per block: 7 s of a max kernel's 10 s compile.)

Outlined loop bodies. numba's parallel passes (parfor conversion, copy propagation, parfor
lowering) cost time in proportion to the IR inside each ``prange`` loop, and a kernel's loop
body, with its helpers inlined, is large: they took 70% of a first max training call. So the
parallel build of a kernel runs each ``prange`` loop over a call to its body, compiled apart as
a serial function of the loop index (the kernel's arguments and the values the loop reads from
before it passed in; a ``continue`` of the parallel loop becomes a ``return``). The parallel
passes then see a loop of one call; LLVM still optimises the body on its own, as before. The
first max training call took 16 s before, about 7 s after (``benchmarks/cold_start.py``).

>>> from globalpool.kernels import launch
>>> launch.serial()
False
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import os
import textwrap
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba import njit

__all__ = ["LAUNCH_LOCK", "cache_dir", "can_cache", "layer_info", "parallel_kernel", "serial"]

LAUNCH_LOCK = threading.RLock()
_state: dict[str, Any] = {"serial": False}


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


os.register_at_fork(after_in_child=_after_fork_in_child)


def serial() -> bool:
    """Whether kernels run their serial builds (a fork()ed child of a GNU OpenMP process)."""
    return _state["serial"]


def layer_info() -> tuple[str, bool]:
    """(threading layer in use, or as configured if none started yet; whether serial builds
    run)."""
    return _started_layer() or numba.config.THREADING_LAYER, _state["serial"]


def _launch_guard() -> contextlib.AbstractContextManager:
    if _started_layer() not in ("workqueue", None):
        return contextlib.nullcontext()
    return LAUNCH_LOCK  # workqueue (or none started yet: layer unknown): one launch at a time


# --------------------------------------------------------------------------------------------
# caching


def can_cache(probe: Callable) -> bool:
    """Whether numba can cache functions of ``probe``'s source file; warns once if not."""
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
        return False
    return True


def cache_dir(probe: Callable) -> str | None:
    """Where numba caches functions of ``probe``'s file (None when it cannot)."""
    try:
        from numba.core.caching import FunctionCache

        return FunctionCache(probe)._cache_path
    except (RuntimeError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------
# parallel kernels


class ParallelKernel:
    """A parallel numba kernel launched under :func:`_launch_guard`; with ``modal`` argument
    names, one compiled entry point per value of those arguments (see the module docstring)."""

    def __init__(self, fn: Callable, options: dict[str, Any], modal: tuple[str, ...]) -> None:
        self.py_func = fn
        self.__name__ = fn.__name__
        self.__qualname__ = fn.__qualname__
        self.__doc__ = fn.__doc__
        self._options = options
        params = list(inspect.signature(fn).parameters)
        self._params = params
        self._modal = [params.index(m) for m in modal if m in params]
        self._entries: dict[tuple, Any] = {}
        self._serial: dict[tuple, Any] = {}

    def _build(self, key: tuple, serial: bool = False) -> Any:
        built = self._serial if serial else self._entries
        disp = built.get(key)
        if disp is None:
            options = {**self._options, "parallel": not serial and self._options["parallel"]}
            disp = self._entry(key, options)
            built[key] = disp
        return disp

    def _entry(self, key: tuple, options: dict[str, Any]) -> Any:
        tag = "_".join(str(int(k)) for k in key) + ("" if options["parallel"] else "_serial")
        name = f"{self.__name__}__{tag}"
        consts = {self._params[i]: v for i, v in zip(self._modal, key, strict=True)}
        namespace = dict(self.py_func.__globals__)
        serial_options = {**options, "parallel": False}
        # compiled as if in the kernels' file: numba's cache locates and stamps entries by it
        code, bodies = _specialised(self.py_func, name, consts, outline=options["parallel"])
        namespace[_INDEX] = np.int64
        exec(code, namespace)
        for body in bodies:  # the wrapper finds its compiled bodies among its globals
            namespace[body] = _no_alias(njit(**serial_options)(namespace[body]))
        return njit(**options)(namespace[name])

    def __call__(self, *args: Any) -> Any:
        key = tuple(_constant(args[i]) for i in self._modal)
        if _state["serial"]:
            return self._build(key, serial=True)(*args)
        disp = self._entries.get(key) or self._build(key)
        with _launch_guard():
            return disp(*args)


def _specialised(
    fn: Callable, name: str, consts: dict[str, bool | int], outline: bool = False
) -> tuple[Any, list[str]]:
    """``fn``'s code compiled anew as ``name``, undecorated, its body opening with
    ``arg = constant`` for each of ``consts`` (same signature, same file and line numbers).
    With ``outline``, each ``prange`` loop's body becomes a function of its own (see the module
    docstring); returns the code and the names of those functions."""
    lines, first = inspect.getsourcelines(fn)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    ast.increment_lineno(tree, first - 1)
    func = tree.body[0]
    assert isinstance(func, ast.FunctionDef)
    func.name, func.decorator_list = name, []
    body = func.body[1:] if ast.get_docstring(func) is not None else func.body
    func.body = _pins(consts, body[0].lineno) + body
    bodies = _outline_loops(func, consts) if outline else []
    tree.body = bodies + tree.body
    code = compile(ast.fix_missing_locations(tree), inspect.getfile(fn), "exec")
    return code, [b.name for b in bodies]


_INDEX = "_globalpool_loop_index"


def _no_alias(dispatcher: Any) -> Any:
    """``dispatcher`` compiled with its array arguments marked ``noalias``, as numba marks the
    body of a parallel loop (a kernel's arrays never overlap): without it LLVM must allow for a
    store to one array changing another, and compiled some backward loops to less vectorised
    code (channels-last ``bwd_lin_cl``: 192 zmm instructions against 445)."""
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


def _pins(consts: dict[str, bool | int], at: int) -> list[ast.stmt]:
    return [
        ast.Assign([ast.Name(arg, ast.Store())], ast.Constant(value), lineno=at, col_offset=0)
        for arg, value in consts.items()
    ]


def _is_prange(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.For)
        and isinstance(node.iter, ast.Call)
        and isinstance(node.iter.func, ast.Name)
        and node.iter.func.id == "prange"
    )


def _outline_loops(func: ast.FunctionDef, consts: dict[str, bool | int]) -> list[ast.FunctionDef]:
    """Moves the body of each ``prange`` loop of ``func`` into a new function (returned) and
    calls it from the loop. Its arguments: ``func``'s own but ``consts``, then every name the
    body reads that ``func`` assigns before the loop, then the loop index."""
    ast.fix_missing_locations(func)
    # the pinned constants are pinned in the body too, not passed: a constant argument is typed
    # as a literal at one call site and as a plain int at the other, and compiled twice
    params = [a.arg for a in func.args.args if a.arg not in consts]
    loops = [node for node in ast.walk(func) if _is_prange(node)]
    bodies = []
    for k, loop in enumerate(loops):
        if not isinstance(loop.target, ast.Name):
            raise TypeError(f"{func.name}: a prange loop needs one index name")
        index = loop.target.id
        earlier = _assigned_before(func, loop)
        read = {
            n.id for stmt in loop.body for n in ast.walk(stmt)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
        }
        carried = sorted((read & earlier) - set(params) - set(consts) - {index})
        names = [*params, *carried, index]
        outlined = f"{func.name}__loop{k}"
        at = loop.body[0].lineno
        body = [_ContinueToReturn().visit(stmt) for stmt in loop.body]
        bodies.append(
            ast.FunctionDef(
                name=outlined,
                args=ast.arguments(
                    posonlyargs=[], args=[ast.arg(n) for n in names], kwonlyargs=[],
                    kw_defaults=[], defaults=[],
                ),
                body=_pins(consts, at) + body,
                decorator_list=[],
                lineno=loop.lineno,
                end_lineno=loop.end_lineno,
                col_offset=0,
            )
        )
        args = [ast.Name(n, ast.Load()) for n in names]
        # the index is int64 when numba types the kernel and uint64 inside its parallel loop:
        # one type for both, or the body is compiled twice
        args[-1] = ast.Call(ast.Name(_INDEX, ast.Load()), [args[-1]], [])
        call = ast.Call(ast.Name(outlined, ast.Load()), args, [])
        loop.body = [ast.copy_location(ast.Expr(call), loop.body[0])]
    return bodies


def _assigned_before(func: ast.FunctionDef, loop: ast.For) -> set[str]:
    """Names ``func`` assigns in statements that end before ``loop`` starts."""
    names = set()
    for node in ast.walk(func):
        if node is loop or not isinstance(node, ast.Name) or not isinstance(node.ctx, ast.Store):
            continue
        if node.lineno < loop.lineno:
            names.add(node.id)
    return names


class _ContinueToReturn(ast.NodeTransformer):
    """``continue`` of the outlined loop itself becomes ``return`` (inner loops keep theirs)."""

    def visit_For(self, node: ast.For) -> ast.For:  # an inner loop: its continues are its own
        return node

    def visit_While(self, node: ast.While) -> ast.While:
        return node

    def visit_Continue(self, node: ast.Continue) -> ast.Return:
        return ast.copy_location(ast.Return(value=None), node)


def _constant(v: Any) -> bool | int:
    return bool(v) if isinstance(v, (bool, np.bool_)) else int(v)


def parallel_kernel(modal: tuple[str, ...] = ("mode",), **options: Any) -> Callable:
    """Decorator: ``fn`` as a :class:`ParallelKernel` compiled with ``njit(**options)``."""

    def wrap(fn: Callable) -> ParallelKernel:
        return ParallelKernel(fn, options, modal)

    return wrap
