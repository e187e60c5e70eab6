"""How the numba CPU kernels are compiled, cached and launched (no kernel code here).

Threading layer. Unless the user chose one (``NUMBA_THREADING_LAYER`` in the environment, or
``numba.config.THREADING_LAYER`` set before the first fused call), :func:`select_layer` sets
numba's ``workqueue`` layer before the first parallel launch. The default layer on Linux is
GNU OpenMP, which kills any ``fork()``ed child (a ``DataLoader`` worker, a ``multiprocessing``
fork pool) that launches a parallel kernel after its parent did; ``workqueue`` is built into
numba, survives ``fork()`` and ran the kernels as fast (README, "First call and caching"). It is
not thread-safe (two threads launching at once abort the process), so every launch of a
parallel kernel goes through :data:`LAUNCH_LOCK` while that layer is in use. If numba had already
started another layer, that one stays (numba cannot switch) and a ``fork()``ed child that would
launch a kernel under GNU OpenMP gets a ``RuntimeError`` instead of being terminated.

Caching. Kernels are cached on disk by numba (``__pycache__`` beside the source, else the
user's cache directory, or ``NUMBA_CACHE_DIR``). Where none is writable (a read-only install
in a container, ``HOME`` unset), :func:`can_cache` says so once with a warning and the kernels
are compiled in memory on every run.

Compile-time modes. :func:`parallel_kernel` builds, for a kernel with a ``mode`` argument, one
compiled entry point per mode value (on first use of that value), into which the kernel body is
inlined with the mode as a constant, so numba prunes the other modes' branches before typing:
the first call compiles only what it needs.

>>> from globalpool.kernels import launch
>>> launch.select_layer() in ("workqueue", "omp", "tbb", "default", "safe", "forksafe",
...                           "threadsafe")
True
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba import njit

__all__ = ["LAUNCH_LOCK", "cache_dir", "can_cache", "parallel_kernel", "select_layer"]

FORK_SAFE_LAYER = "workqueue"

LAUNCH_LOCK = threading.RLock()
_state: dict[str, Any] = {"layer": None, "chosen_by": None, "pid": os.getpid()}


def _reset_after_fork() -> None:  # a lock held by another thread at fork() stays held: renew it
    global LAUNCH_LOCK
    LAUNCH_LOCK = threading.RLock()


os.register_at_fork(after_in_child=_reset_after_fork)


def _started_layer() -> str | None:
    """The layer numba has already started in this process, or None."""
    from numba.np.ufunc import parallel

    if not getattr(parallel, "_is_initialized", False):
        return None
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def select_layer() -> str:
    """Pick the threading layer before the first parallel launch; returns the layer in effect
    (or the one configured, if numba has not started one yet)."""
    if _state["layer"] is not None:
        return _state["layer"]
    started = _started_layer()
    if started is not None:
        layer, by = started, "numba (already started)"
        if started == "omp":
            warnings.warn(
                "numba's OpenMP threading layer was started before globalpool's fused CPU "
                "kernels: fork()ed children (DataLoader workers) cannot run them. Set "
                f"NUMBA_THREADING_LAYER={FORK_SAFE_LAYER} to allow it.",
                RuntimeWarning,
                stacklevel=3,
            )
    elif "NUMBA_THREADING_LAYER" in os.environ or numba.config.THREADING_LAYER != "default":
        layer, by = numba.config.THREADING_LAYER, "user"
    else:
        numba.config.THREADING_LAYER = FORK_SAFE_LAYER
        layer, by = FORK_SAFE_LAYER, "globalpool"
    _state.update(layer=layer, chosen_by=by, pid=os.getpid())
    return layer


def layer_info() -> tuple[str, str]:
    """(layer, who chose it): ``globalpool``, ``user`` or ``numba (already started)``."""
    select_layer()
    started = _started_layer()
    return started or _state["layer"], _state["chosen_by"]


def _launch_guard() -> contextlib.AbstractContextManager:
    layer = _state["layer"] or select_layer()
    if layer == "omp" and os.getpid() != _state["pid"] and _started_layer() == "omp":
        raise RuntimeError(
            "globalpool's fused CPU kernels cannot run in a fork()ed child under numba's OpenMP "
            f"threading layer; set NUMBA_THREADING_LAYER={FORK_SAFE_LAYER} (or use "
            "backend='torch' here)"
        )
    if layer in (FORK_SAFE_LAYER, "default", "safe", "forksafe"):  # possibly not thread-safe
        return LAUNCH_LOCK
    return contextlib.nullcontext()


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
        if self._modal:
            self._body = njit(
                inline="always",
                **{k: v for k, v in options.items() if k not in ("parallel", "cache")},
            )(fn)
        else:
            self._entries[()] = njit(**options)(fn)

    def entry(self, key: tuple) -> Any:
        """The compiled dispatcher for these modal argument values (built on first use)."""
        disp = self._entries.get(key)
        if disp is None:
            disp = self._build(key)
        return disp

    def _build(self, key: tuple) -> Any:
        consts = dict(zip(self._modal, key, strict=True))
        name = f"{self.__name__}__{'_'.join(str(int(k)) for k in key)}"
        call = ", ".join(repr(consts[i]) if i in consts else p for i, p in enumerate(self._params))
        src = f"def {name}({', '.join(self._params)}):\n    return _body({call})\n"
        namespace: dict[str, Any] = {"__name__": self.py_func.__module__, "_body": self._body}
        # compiled as if in the kernels' file: numba's cache locates and stamps entries by it
        exec(compile(src, inspect.getfile(self.py_func), "exec"), namespace)
        disp = njit(**self._options)(namespace[name])
        self._entries[key] = disp
        return disp

    def __call__(self, *args: Any) -> Any:
        key = tuple(_constant(args[i]) for i in self._modal)
        disp = self._entries.get(key) or self._build(key)
        with _launch_guard():
            return disp(*args)


def _constant(v: Any) -> bool | int:
    return bool(v) if isinstance(v, (bool, np.bool_)) else int(v)


def parallel_kernel(modal: tuple[str, ...] = ("mode",), **options: Any) -> Callable:
    """Decorator: ``fn`` as a :class:`ParallelKernel` compiled with ``njit(**options)``."""

    def wrap(fn: Callable) -> ParallelKernel:
        return ParallelKernel(fn, options, modal)

    return wrap
