"""Compile the fused CPU kernels ahead of time (into numba's cache): :func:`warmup`.

The first fused call of a kind, layout and dtype compiles its kernels (seconds each, README
"First call and caching"); numba caches them on disk, so a later process loads them in a
fraction of that. :func:`warmup` makes those first calls now, on tiny inputs: inference
(under ``no_grad``) and training (forward and backward) for every selected item. The
``globalpool warmup`` command (:mod:`globalpool.lab`) runs it with a progress bar.

>>> import torch
>>> rows = warmup("avg", layouts="channels_first", dtypes=torch.float32)
>>> [(r["kind"], r["layout"], r["dtype"]) for r in rows], rows[0]["seconds"] > 0
([('avg', 'channels_first', 'float32')], True)
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch

from globalpool.functional import pool
from globalpool.kernels import served

__all__ = [
    "DTYPES", "FUSED_KINDS", "LAYOUTS", "cache_location", "kernel_target", "threading_layer",
    "warmup",
]

#: The kinds with a fused CPU grid kernel (the registry's ``"cpu"`` family).
FUSED_KINDS: tuple[str, ...] = served("cpu")

LAYOUTS = ("channels_first", "channels_last")
#: The dtypes the fused CPU kernels take.
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def compile_item(kind: str, layout: str, dtype: torch.dtype) -> float:
    """Run the fused forward (inference and training) and backward of ``kind`` once on a tiny
    input; returns the seconds it took (compile or cache load included)."""
    shape = (2, 8, 4, 4) if layout == "channels_first" else (2, 4, 4, 8)
    x = torch.rand(shape).to(dtype) + 0.5
    params = {"weights": torch.rand(2, 4, 4).to(dtype)} if kind == "attention" else {}
    start = time.perf_counter()
    with torch.no_grad():
        pool(x, kind, layout=layout, backend="fused", **params)
    x.requires_grad_(True)
    pool(x, kind, layout=layout, backend="fused", **params).sum().backward()
    return time.perf_counter() - start


def cache_location() -> str | None:
    """The folder where numba caches the fused CPU kernels; None where it cannot cache them
    (they are then compiled in memory in every process)."""
    from globalpool.kernels import cpu_kernels, launch  # imports numba: only when asked

    return launch.cache_dir(cpu_kernels._cache_probe) if cpu_kernels.CACHE else None


def threading_layer() -> str:
    """numba's threading layer that runs the kernels (as configured if none started yet)."""
    from globalpool.kernels import launch  # imports numba: only when asked

    return launch.layer_info()[0]


def kernel_target() -> dict[str, Any]:
    """What the fused CPU kernels are compiled for: numba's target CPU (``cpu``, this machine's
    unless ``NUMBA_CPU_NAME`` says otherwise), the bits of its vector registers
    (``register_bits``: 512 with AVX-512, 256 with AVX2) and of the kernels' lane vectors
    (``lane_bits``, ``GLOBALPOOL_LANE_BITS``).

    >>> sorted(kernel_target())
    ['cpu', 'lane_bits', 'register_bits']
    """
    from globalpool.kernels import launch  # imports numba: only when asked

    return {
        "cpu": launch.target_cpu(),
        "register_bits": launch.vector_bits(),
        "lane_bits": launch.lane_bits(),
    }


def _selection(values: Any, allowed: tuple, default: tuple, what: str) -> tuple:
    """``values`` (one value, several, or None for ``default``) checked against ``allowed``."""
    if values is None:
        return default
    chosen = (values,) if isinstance(values, (str, torch.dtype)) else tuple(values)
    for v in chosen:
        if v not in allowed:
            raise ValueError(f"{what} must be among {allowed}, got {v!r}")
    return tuple(dict.fromkeys(chosen))


def warmup(
    kinds: str | Iterable[str] | None = None,
    layouts: str | Iterable[str] | None = None,
    dtypes: torch.dtype | Iterable[torch.dtype] | None = None,
) -> list[dict]:
    """Compile the fused CPU kernels of these kinds, layouts and dtypes now, or load them from
    numba's cache, so that no later call pays for it (in a Docker image build, before a
    benchmark).

    Args:
        kinds: a kind or kinds with a fused kernel (default: all of them, :data:`FUSED_KINDS`).
        layouts: ``"channels_first"``, ``"channels_last"`` or both (default both).
        dtypes: a dtype or dtypes among :data:`DTYPES` (default ``torch.float32``).

    Returns:
        One dict per item (dtypes outermost, then layouts, then kinds): ``kind``, ``layout``,
        ``dtype`` (its name, such as ``"float32"``) and ``seconds`` (the first inference call
        and one training step, compile or cache load included).

    Raises:
        ValueError: for a kind without a fused kernel, or an unknown layout or dtype (before
            anything is compiled).

    >>> import globalpool as gp
    >>> gp.warmup("median")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: kinds must be among ('avg', ...), got 'median'
    """
    kinds = _selection(kinds, FUSED_KINDS, FUSED_KINDS, "kinds")
    layouts = _selection(layouts, LAYOUTS, LAYOUTS, "layouts")
    dtypes = _selection(dtypes, DTYPES, (torch.float32,), "dtypes")
    return [
        {
            "kind": kind,
            "layout": layout,
            "dtype": str(dtype).removeprefix("torch."),
            "seconds": compile_item(kind, layout, dtype),
        }
        for dtype in dtypes
        for layout in layouts
        for kind in kinds
    ]
