"""``globalpool warmup``: compile the fused CPU kernels ahead of time (into numba's cache).

The command line of the library's :func:`globalpool.warmup`: it prints where numba caches the
kernels and the CPU they are built for, then compiles one item (kind, layout, dtype) at a time
under a progress bar and prints the seconds each took.

>>> import inspect
>>> sorted(inspect.signature(warmup).parameters)
['dtype', 'kind', 'layout']
"""

from __future__ import annotations

import time
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import globalpool as gp
from globalpool.lab.cli_errors import usage_error
from globalpool.warmup import FUSED_KINDS, cache_location, kernel_target, threading_layer

__all__ = ["warmup"]

_LAYOUTS = ("channels_first", "channels_last")
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _split(values: list[str] | None, allowed: tuple[str, ...], what: str) -> list[str]:
    out: list[str] = []
    for v in values or ["all"]:
        for part in (p.strip() for p in v.split(",")):
            if part == "all":
                out.extend(allowed)
            elif part in allowed:
                out.append(part)
            elif part:
                raise usage_error(f"--{what}", f"must be among {allowed} or 'all', got {part!r}")
    return list(dict.fromkeys(out))


def warmup(
    kind: Annotated[
        list[str] | None,
        typer.Option(
            "--kind", help="Kind to compile (repeatable, or comma-separated; default all)."
        ),
    ] = None,
    layout: Annotated[str, typer.Option(help="channels_first, channels_last, or all.")] = "all",
    dtype: Annotated[
        str, typer.Option(help="Comma-separated dtypes among float32, float64, float16, bfloat16.")
    ] = "float32",
) -> list[dict]:
    """Compile the fused CPU kernels for these kinds, layouts and dtypes into numba's cache."""
    kinds = _split(kind, FUSED_KINDS, "kind")
    layouts = _split([layout], _LAYOUTS, "layout")
    dtypes = _split([dtype], tuple(_DTYPES), "dtype")
    out = Console(emoji=False, highlight=False)
    where = cache_location()
    out.print(
        f"numba cache: {where}"
        if where
        else "numba cache: off (compiled in memory; set "
        "NUMBA_CACHE_DIR to a writable directory to cache)"
    )
    out.print(f"threading layer: {threading_layer()}")
    target = kernel_target()
    out.print(f"built for: {target['cpu']} ({target['register_bits']}-bit vector registers, "
              f"{target['lane_bits']}-bit lanes)")
    items = [(k, lay, d) for d in dtypes for lay in layouts for k in kinds]
    rows = []
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True, emoji=False),
    )
    total = time.perf_counter()
    with progress:
        task = progress.add_task("warmup", total=len(items))
        for k, lay, d in items:
            progress.update(task, description=escape(f"{k} {lay} {d}"))
            (row,) = gp.warmup(k, layouts=lay, dtypes=_DTYPES[d])
            rows.append(row)
            progress.console.print(f"{k:<10} {lay:<15} {d:<9} {row['seconds']:6.2f} s")
            progress.advance(task)
    out.print(f"{len(items)} items in {time.perf_counter() - total:.1f} s")
    return rows
