"""``globalpool warmup``: compile the fused CPU kernels ahead of time (into numba's cache).

The first fused call of a kind, layout and dtype compiles its kernels (seconds each, README
"First call and caching"); numba caches them on disk, so a later process loads them in a
fraction of that. :func:`warmup` makes those first calls now, on tiny inputs: inference
(under ``no_grad``) and training (forward and backward) for every selected item.

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

from globalpool.cli_errors import usage_error

__all__ = ["compile_item", "warmup"]

_LAYOUTS = ("channels_first", "channels_last")
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def compile_item(kind: str, layout: str, dtype: torch.dtype) -> float:
    """Run the fused forward (inference and training) and backward of ``kind`` once on a tiny
    input; returns the seconds it took (compile or cache load included)."""
    import globalpool as gp

    shape = (2, 8, 4, 4) if layout == "channels_first" else (2, 4, 4, 8)
    x = torch.rand(shape).to(dtype) + 0.5
    params = {"weights": torch.rand(2, 4, 4).to(dtype)} if kind == "attention" else {}
    start = time.perf_counter()
    with torch.no_grad():
        gp.pool(x, kind, layout=layout, backend="fused", **params)
    x.requires_grad_(True)
    gp.pool(x, kind, layout=layout, backend="fused", **params).sum().backward()
    return time.perf_counter() - start


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
    from globalpool.kernels import cpu_kernels, launch, served

    kinds = _split(kind, served("cpu"), "kind")
    layouts = _split([layout], _LAYOUTS, "layout")
    dtypes = _split([dtype], tuple(_DTYPES), "dtype")
    out = Console(emoji=False, highlight=False)
    where = launch.cache_dir(cpu_kernels._cache_probe) if cpu_kernels.CACHE else None
    out.print(
        f"numba cache: {where}"
        if where
        else "numba cache: off (compiled in memory; set "
        "NUMBA_CACHE_DIR to a writable directory to cache)"
    )
    out.print(f"threading layer: {launch.layer_info()[0]}")
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
            seconds = compile_item(k, lay, _DTYPES[d])
            rows.append({"kind": k, "layout": lay, "dtype": d, "seconds": seconds})
            progress.console.print(f"{k:<10} {lay:<15} {d:<9} {seconds:6.2f} s")
            progress.advance(task)
    out.print(f"{len(items)} items in {time.perf_counter() - total:.1f} s")
    return rows
