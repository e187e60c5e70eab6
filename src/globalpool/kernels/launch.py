"""How the numba CPU kernels are compiled, cached and launched (no kernel code here).

Threading. A kernel is a serial, GIL-free numba function over a range of tasks ``t0 <= t < t1``
(its last two arguments). :meth:`ParallelKernel.launch` splits ``[0, ntask)`` into one
contiguous range per thread (``torch.get_num_threads()`` of them, as torch's own CPU ops use)
and runs them at once: the calling thread takes the first range, a pool of Python threads the
others. Nothing here uses OpenMP or numba's threading layer, so a ``fork()``ed child (a
``DataLoader`` worker, a ``multiprocessing`` fork pool) pools like its parent: the pool's
threads do not survive ``fork()``, and the child makes its own on first use. Within
:func:`one_thread` (small inputs: waking a thread costs more than the work) every task runs on
the calling thread. Two Python threads may launch at once.

Caching. Kernels are cached on disk by numba (``__pycache__`` beside the source, else the
user's cache directory, or ``NUMBA_CACHE_DIR``). Where none is writable (a read-only install
in a container, ``HOME`` unset), :func:`can_cache` says so once with a warning and the kernels
are compiled in memory on every run.

Compile-time modes. :func:`parallel_kernel` builds, for a kernel with ``modal`` arguments (a
``mode`` number, a ``need_aux`` flag), one compiled entry point per value of them, on first use
of that value: the kernel's own source, its body opening with ``mode = <value>``, so numba
prunes the other modes' branches before typing and the first call compiles only what it
needs. (Serial compilation measured 2-4x faster than numba's ``parallel=True`` on the same
kernels, whose parfor passes ran over each kernel body twice.)

>>> from globalpool.kernels import launch
>>> launch.threads() >= 1
True
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import os
import textwrap
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from numba import njit

__all__ = ["ParallelKernel", "cache_dir", "can_cache", "one_thread", "parallel_kernel", "threads"]

_local = threading.local()
_pool: dict[str, Any] = {"executor": None, "size": 0}
_pool_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _pool_lock
    _pool_lock = threading.Lock()  # a lock held by another thread at fork() stays held: renew
    _pool.update(executor=None, size=0)  # its threads did not survive fork(): make new ones


os.register_at_fork(after_in_child=_after_fork_in_child)


def threads() -> int:
    """How many threads a launch uses here: 1 within :func:`one_thread`, else torch's count."""
    return 1 if getattr(_local, "single", False) else max(1, torch.get_num_threads())


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run every launch of this thread's block on the calling thread alone."""
    previous = getattr(_local, "single", False)
    _local.single = True
    try:
        yield
    finally:
        _local.single = previous


def _executor(workers: int) -> ThreadPoolExecutor:
    with _pool_lock:
        if _pool["size"] < workers:  # grown, never shrunk: idle threads cost nothing
            old = _pool["executor"]
            _pool.update(
                executor=ThreadPoolExecutor(workers, thread_name_prefix="globalpool"),
                size=workers,
            )
            if old is not None:
                old.shutdown(wait=False)
        return _pool["executor"]


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
# kernels


class ParallelKernel:
    """A kernel over tasks ``t0 <= t < t1`` (its last two arguments), compiled GIL-free; with
    ``modal`` argument names, one compiled entry point per value of those arguments (see the
    module docstring). Calling it runs the given range on the calling thread; :meth:`launch`
    splits a task count over threads."""

    def __init__(self, fn: Callable, options: dict[str, Any], modal: tuple[str, ...]) -> None:
        self.py_func = fn
        self.__name__ = fn.__name__
        self.__qualname__ = fn.__qualname__
        self.__doc__ = fn.__doc__
        self._options = {**options, "nogil": True}
        params = list(inspect.signature(fn).parameters)
        if params[-2:] != ["t0", "t1"]:
            raise TypeError(f"{fn.__name__}: a kernel's last two arguments must be t0, t1")
        self._params = params
        self._modal = [params.index(m) for m in modal if m in params]
        self._entries: dict[tuple, Any] = {}

    def _build(self, key: tuple) -> Any:
        disp = self._entries.get(key)
        if disp is None:
            disp = self._entry(key) if self._modal else njit(**self._options)(self.py_func)
            self._entries[key] = disp
        return disp

    def _entry(self, key: tuple) -> Any:
        name = f"{self.__name__}__" + "_".join(str(int(k)) for k in key)
        consts = {self._params[i]: v for i, v in zip(self._modal, key, strict=True)}
        namespace = dict(self.py_func.__globals__)
        # compiled as if in the kernels' file: numba's cache locates and stamps entries by it
        exec(_specialised(self.py_func, name, consts), namespace)
        return njit(**self._options)(namespace[name])

    def _dispatcher(self, args: tuple) -> Any:
        key = tuple(_constant(args[i]) for i in self._modal)
        return self._entries.get(key) or self._build(key)

    def __call__(self, *args: Any) -> Any:
        return self._dispatcher(args)(*args)

    def launch(self, ntask: int, *args: Any) -> None:
        """Run tasks ``0 <= t < ntask``: one contiguous range per thread, all at once."""
        disp = self._dispatcher(args + (0, 0))
        n = min(threads(), ntask)
        if n <= 1:
            disp(*args, 0, ntask)
            return
        bounds = [ntask * i // n for i in range(n + 1)]
        pool = _executor(n - 1)
        rest = [pool.submit(disp, *args, bounds[i], bounds[i + 1]) for i in range(1, n)]
        try:
            disp(*args, bounds[0], bounds[1])
        finally:
            for f in rest:
                f.result()


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
