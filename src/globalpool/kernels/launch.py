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
            disp = self._entry(key, options) if self._modal else njit(**options)(self.py_func)
            built[key] = disp
        return disp

    def _entry(self, key: tuple, options: dict[str, Any]) -> Any:
        tag = "_".join(str(int(k)) for k in key) + ("" if options["parallel"] else "_serial")
        name = f"{self.__name__}__{tag}"
        consts = {self._params[i]: v for i, v in zip(self._modal, key, strict=True)}
        namespace = dict(self.py_func.__globals__)
        # compiled as if in the kernels' file: numba's cache locates and stamps entries by it
        exec(_specialised(self.py_func, name, consts), namespace)
        return njit(**options)(namespace[name])

    def __call__(self, *args: Any) -> Any:
        key = tuple(_constant(args[i]) for i in self._modal)
        if _state["serial"]:
            return self._build(key, serial=True)(*args)
        disp = self._entries.get(key) or self._build(key)
        with _launch_guard():
            return disp(*args)


def _specialised(fn: Callable, name: str, consts: dict[str, bool | int]) -> Any:
    """``fn``'s code compiled anew as ``name``, undecorated, its body opening with
    ``arg = constant`` for each of ``consts`` (same signature, same file and line numbers)."""
    lines, first = inspect.getsourcelines(fn)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    ast.increment_lineno(tree, first - 1)
    func = tree.body[0]
    assert isinstance(func, ast.FunctionDef)
    func.name, func.decorator_list = name, []
    at = func.body[0].lineno
    pins = [
        ast.Assign([ast.Name(arg, ast.Store())], ast.Constant(value), lineno=at, col_offset=0)
        for arg, value in consts.items()
    ]
    body = func.body[1:] if ast.get_docstring(func) is not None else func.body
    func.body = pins + body
    return compile(ast.fix_missing_locations(tree), inspect.getfile(fn), "exec")


def _constant(v: Any) -> bool | int:
    return bool(v) if isinstance(v, (bool, np.bool_)) else int(v)


def parallel_kernel(modal: tuple[str, ...] = ("mode",), **options: Any) -> Callable:
    """Decorator: ``fn`` as a :class:`ParallelKernel` compiled with ``njit(**options)``."""

    def wrap(fn: Callable) -> ParallelKernel:
        return ParallelKernel(fn, options, modal)

    return wrap
