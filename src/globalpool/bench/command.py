"""``globalpool bench`` and ``globalpool bench-memory``: typer-compatible command functions.

Both are plain functions whose defaults are real values, so they can be called from Python as
well as registered on the typer app (``app.command("bench")(bench)``).

>>> import inspect
>>> sorted(inspect.signature(bench).parameters)[:4]
['budget', 'cache', 'compile', 'device']
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from globalpool.bench.cache import CACHE_MODES
from globalpool.bench.memory import MEMORY_SHAPE, run_memory, write_memory_report
from globalpool.bench.methods import default_methods
from globalpool.bench.report import machine_info, write_report
from globalpool.bench.runner import count_steps, run_case
from globalpool.bench.shapes import (
    DEFAULT_SHAPES,
    QUICK_SHAPES,
    cases,
    dtype_name,
    parse_devices,
    parse_dtypes,
    parse_layouts,
    parse_shapes,
)
from globalpool.cli_errors import runtime_error, usage_error

T = TypeVar("T")


def _option(option: str, parse: Callable[[str], T], text: str) -> T:
    """``parse(text)``; a ``ValueError`` is a usage error of ``option`` (exit 2), a
    ``RuntimeError`` (e.g. CUDA asked for but absent) a runtime error about it (exit 1)."""
    try:
        return parse(text)
    except ValueError as exc:
        raise usage_error(option, str(exc)) from None
    except RuntimeError as exc:
        raise runtime_error(str(exc), option=option) from None


def _kinds(text: str) -> tuple[str, ...]:
    from globalpool.kernels import served

    KINDS = served("cpu")  # noqa: N806 - kinds with a kernel to measure (not first / last)

    if text.strip() == "all":
        return tuple(KINDS)
    out = tuple(k.strip() for k in text.split(",") if k.strip())
    for k in out:
        if k not in KINDS:
            raise usage_error("--kinds", f"must be among {KINDS} or 'all', got {k!r}")
    return out


def _check_out(out: Path) -> None:
    """``out`` must be (or become) a writable folder."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise runtime_error(f"cannot create {out} ({exc})", option="--out") from None
    if not os.access(out, os.W_OK):
        raise runtime_error(f"{out} is not writable", option="--out")


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def bench(
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="Reduced set (2 small shapes, float32, CPU, no compile, 5 repeats, 0.5 s "
            "budget, warm caches). On 2 quiet cores about 50 s the first time (numba compiles "
            "the fused kernels; 'globalpool warmup' does that ahead) and 11 s once they are "
            "cached; up to twice that on busy cores.",
        ),
    ] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or all (cuda when present).")] = "all",
    dtype: Annotated[
        str | None, typer.Option(help="Comma-separated dtypes (default: float32,bfloat16).")
    ] = None,
    layout: Annotated[str, typer.Option(help="channels_first, channels_last, or all.")] = "all",
    kinds: Annotated[str, typer.Option(help="Comma-separated kinds, or all.")] = "all",
    shapes: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated shape names (r50-head-7, r50-head-14, early-224, "
            "tokens, volume, tokens-small) or channels-first sizes like 8x64x56x56."
        ),
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(min=1, help="Timed samples per measurement (default: 10).")
    ] = None,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed warm-up calls.")] = 1,
    budget: Annotated[
        float | None,
        typer.Option(
            help="Seconds per measurement; repeats are cut (to >= 3) to fit (default: 2, "
            "0.5 with --quick)."
        ),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="Include torch.compile of the composition (default: on, off with --quick).",
        ),
    ] = None,
    memory: Annotated[
        bool, typer.Option("--memory", help="Also run the saved-for-backward memory benchmark.")
    ] = False,
    cache: Annotated[
        str | None,
        typer.Option(
            help="cold: flush the caches before every timed sample (method and ceiling alike); "
            "warm: leave them as the previous sample left them (default: cold, warm with "
            "--quick, whose small shapes fit in the caches)."
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1, help="Threads for torch and numba's kernels (default: as configured)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("globalpool-bench"),
) -> dict[str, Any]:
    """Time every way of global pooling against the x.sum() / fill_ ceilings of the same run."""
    console = Console(stderr=True, emoji=False)
    if quick and device == "all":
        device = "cpu"
    dtype = dtype or ("float32" if quick else "float32,bfloat16")
    repeats = repeats or (5 if quick else 10)
    budget = budget if budget is not None else (0.5 if quick else 2.0)
    compile = (not quick) if compile is None else compile
    shape_set = (
        _option("--shapes", parse_shapes, shapes)
        if shapes
        else (QUICK_SHAPES if quick else DEFAULT_SHAPES)
    )
    all_cases = cases(
        shape_set,
        _option("--layout", parse_layouts, layout),
        _option("--dtype", parse_dtypes, dtype),
        _option("--device", parse_devices, device),
    )
    cache = cache or ("warm" if quick else "cold")
    if cache not in CACHE_MODES:
        raise usage_error("--cache", f"must be one of {CACHE_MODES}, got {cache!r}")
    kind_list = _kinds(kinds)
    _check_out(out)  # before minutes of benchmarking, not after
    if threads:
        _set_threads(threads)
    methods = default_methods(kind_list, compile=compile)
    settings = {
        "quick": quick,
        "devices": sorted({c.device for c in all_cases}),
        "dtypes": sorted({dtype_name(c.dtype) for c in all_cases}),
        "layouts": sorted({c.layout for c in all_cases}),
        "kinds": list(kind_list),
        "shapes": {s.name: list(s.dims) for s in shape_set},
        "repeats": repeats,
        "warmup": warmup,
        "budget_s": budget,
        "compile": compile,
        "cache": cache,
        "threads": torch.get_num_threads(),
    }
    start = time.perf_counter()
    load_start = os.getloadavg()
    results = []
    with _progress(console) as progress:
        task = progress.add_task("bench", total=count_steps(all_cases, methods))

        started = []

        def step(text: str) -> None:  # called as each step starts: finish the previous one
            if started:
                progress.advance(task)
            started.append(text)
            progress.update(task, description=escape(text))

        for case in all_cases:
            results.append(
                run_case(
                    case,
                    methods,
                    repeats=repeats,
                    warmup=warmup,
                    budget_s=budget,
                    cache=cache,
                    progress=step,
                )
            )
        progress.advance(task)
    data: dict[str, Any] = {
        "machine": machine_info(),
        "settings": settings,
        "cases": results,
        "wall_s": time.perf_counter() - start,
        # other processes on the machine distort timings: the 1/5/15-minute load averages
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
    }
    try:
        paths = write_report(data, out)
    except OSError as exc:
        raise runtime_error(f"cannot write the report into {out} ({exc})", option="--out") from None
    _summary(console, data, paths)
    if memory:
        for dev in settings["devices"]:
            stem = "memory" if dev == "cpu" else f"memory_{dev}"
            bench_memory(kinds=kinds, layout=layout, dtype=dtype, device=dev, out=out, stem=stem)
    return data


def _targets_text(data: dict[str, Any]) -> str:
    """``"; targets met 3/5"``, or nothing when no case of the run has a target.

    >>> _targets_text({"targets": []}), _targets_text({"targets": [{"met": True}, {"met": 0}]})
    ('', '; targets met 1/2')
    """
    targets = data.get("targets") or []
    if not targets:
        return ""
    return f"; targets met {sum(bool(t['met']) for t in targets)}/{len(targets)}"


def _summary(console: Console, data: dict[str, Any], paths: dict[str, Any]) -> None:
    bad = [
        f"{c['device']} {c['dtype']} {c['layout']} {c['shape_name']} {m['id']}: {m['status']}"
        for c in data["cases"]
        for m in c["methods"]
        if m["status"] != "ok"
    ]
    console.print(f"bench finished in {data['wall_s']:.1f} s{_targets_text(data)}")
    for line in bad[:20]:
        console.print(f"  [red]{line}[/red]")
    if len(bad) > 20:
        console.print(f"  ... and {len(bad) - 20} more FAILED/ERROR")
    pngs = ", ".join(str(p) for p in paths["png"])
    console.print(f"wrote {paths['json']}, {paths['markdown']}, {pngs}")


def bench_memory(
    kinds: Annotated[str, typer.Option(help="Comma-separated kinds, or all.")] = "all",
    layout: Annotated[str, typer.Option(help="channels_first, channels_last, or all.")] = "all",
    dtype: Annotated[str, typer.Option(help="Comma-separated dtypes.")] = "float32,bfloat16",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    shape: Annotated[
        str, typer.Option(help="One shape name or channels-first sizes.")
    ] = MEMORY_SHAPE.name,
    compile: Annotated[
        bool, typer.Option("--compile/--no-compile", help="Also measure torch.compile.")
    ] = False,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("globalpool-bench"),
    stem: Annotated[str, typer.Option(help="File name stem of the JSON/Markdown.")] = "memory",
) -> dict[str, Any]:
    """Bytes saved for backward per kind: fused kernel vs composed torch (vs torch.compile)."""
    console = Console(stderr=True, emoji=False)
    (shape_obj,) = _option("--shape", parse_shapes, shape)[:1]
    dtypes = _option("--dtype", parse_dtypes, dtype)
    layouts = _option("--layout", parse_layouts, layout)
    (dev,) = _option("--device", parse_devices, device)[:1]
    kind_list = _kinds(kinds)
    _check_out(out)
    families = ("torch", "compile", "fused") if compile else ("torch", "fused")
    with console.status("measuring saved-for-backward bytes"):
        rows = run_memory(
            kind_list,
            shape=shape_obj,
            layouts=layouts,
            dtypes=dtypes,
            device=dev,
            families=families,
        )
    data: dict[str, Any] = {"machine": machine_info(), "shape": list(shape_obj.dims), "rows": rows}
    try:
        paths = write_memory_report(data, out, stem)
    except OSError as exc:
        raise runtime_error(f"cannot write the report into {out} ({exc})", option="--out") from None
    console.print(f"memory{_targets_text(data)}; wrote {paths['json']}, {paths['markdown']}")
    if torch.cuda.is_available() and dev == "cpu":
        console.print("(CUDA present: run with --device cuda for the GPU numbers)")
    return data
