"""Segment pooling speed: ``gp.pool_segments`` with a sorted and an unsorted index, against
``torch.Tensor.scatter_reduce`` (what graph libraries' global pools run on the CPU).

T = 100,000 rows of C = 64 float32 channels into 1000 segments (each row's segment drawn
uniformly, seeded), eager CPU, ``backend="auto"``. Per kind (sum, avg, max) and pass (forward
without grad; forward + backward), interleaved in one run on the same tensors:

- ``segments sorted``: ``gp.pool_segments(x, index_sorted, kind, 1000)`` (rows already grouped:
  the packed path directly);
- ``segments unsorted``: ``gp.pool_segments(x, index, kind, 1000)`` (a stable sort of the index
  and a gather of the rows first);
- ``scatter_reduce``: ``x.new_zeros(1000, C).scatter_reduce(0, index, x, reduce,
  include_self=False)`` on the unsorted index (sum / mean / amax);
- ``scatter_reduce sorted``: the same on the sorted index.

Each at torch's default thread count and again at 1 thread: on a shared machine torch's
parallel sort waits for its descheduled threads. Medians with min-max of interleaved repeats
(the machine may be shared: its load average is written with the results).

    python benchmarks/segments_speed.py benchmarks/results/segments
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import globalpool as gp
from globalpool.lab.bench.report import machine_info

T, C, SEGMENTS = 100_000, 64, 1000
KINDS = {"sum": "sum", "avg": "mean", "max": "amax"}  # kind -> scatter_reduce's reduce
REPEATS, INNER = 5, 3


def _step(fn, x: torch.Tensor, backward: bool):
    def step():
        if backward:
            xg = x.detach().requires_grad_()
            fn(xg).sum().backward()
        else:
            with torch.no_grad():
                fn(x)

    return step


def _methods(kind: str, x, index, index_sorted, x_sorted):
    reduce = KINDS[kind]
    expand = index[:, None].expand(-1, C)
    expand_sorted = index_sorted[:, None].expand(-1, C)

    def scatter(t, e):
        return t.new_zeros(SEGMENTS, C).scatter_reduce(0, e, t, reduce, include_self=False)

    return {
        "segments sorted": (lambda t: gp.pool_segments(t, index_sorted, kind, SEGMENTS),
                            x_sorted),
        "segments unsorted": (lambda t: gp.pool_segments(t, index, kind, SEGMENTS), x),
        "scatter_reduce": (lambda t: scatter(t, expand), x),
        "scatter_reduce sorted": (lambda t: scatter(t, expand_sorted), x_sorted),
    }


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return ", ".join(f"{k} {fields[k].strip()}" for k in ("Model name", "CPU family", "Model")
                     if k in fields)


def main(out_dir: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, C, generator=gen)
    index = torch.randint(0, SEGMENTS, (T,), generator=gen)
    order = torch.argsort(index, stable=True)
    index_sorted, x_sorted = index[order], x[order]
    start, load_start = time.perf_counter(), _load()
    rows = []
    default_threads = torch.get_num_threads()
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        rows += _measure(threads, x, index, index_sorted, x_sorted)
    torch.set_num_threads(default_threads)
    meta = {
        "machine": f"{machine_info()['name']}, {default_threads} threads by default",
        "lscpu": _lscpu_model(), "torch": torch.__version__,
        "load_at_start": load_start, "load_at_end": _load(), "T": T, "C": C,
        "segments": SEGMENTS, "repeats": REPEATS * INNER,
        "seconds": time.perf_counter() - start,
    }
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (path / "speed.md").write_text(_markdown(meta, rows))


def _measure(threads: int, x, index, index_sorted, x_sorted) -> list[dict]:
    rows = []
    for backward in (False, True):
        pass_name = "forward+backward" if backward else "forward"
        for kind in KINDS:
            methods = {name: _step(fn, t, backward)
                       for name, (fn, t) in _methods(kind, x, index, index_sorted,
                                                     x_sorted).items()}
            for fn in methods.values():  # warm up
                fn()
            times = {name: [] for name in methods}
            for _ in range(REPEATS):  # interleaved: the same cache state and machine load
                for name, fn in methods.items():
                    for _ in range(INNER):
                        times[name].append(_time(fn))
            row = {"threads": threads, "kind": kind, "pass": pass_name}
            for name, t in times.items():
                row[f"{name} ms"] = [1e3 * statistics.median(t), 1e3 * min(t), 1e3 * max(t)]
            rows.append(row)
            print(f"{threads} threads, {pass_name} {kind}: " + ", ".join(
                f"{k} {v[0]:.2f}" for k, v in row.items() if k.endswith(" ms")), flush=True)
    return rows


def _markdown(meta: dict, rows: list[dict]) -> str:
    names = ("segments sorted", "segments unsorted", "scatter_reduce", "scatter_reduce sorted")

    def cell(r, name):
        t = r[f"{name} ms"]
        return f"{t[0]:.2f} ({t[1]:.2f}-{t[2]:.2f})"

    lines = [
        "# Segment pooling: gp.pool_segments vs scatter_reduce (eager CPU)", "",
        f"{meta['machine']} ({meta['lscpu']}); torch {meta['torch']}. x is {meta['T']} x "
        f"{meta['C']} float32, {meta['segments']} segments (index uniform at random). Median "
        f"(min-max) ms of {meta['repeats']} samples, the four methods interleaved. The machine "
        f"was shared with other jobs: load average {meta['load_at_start']} at the start and "
        f"{meta['load_at_end']} at the end of the {meta['seconds']:.0f} s run, so absolute "
        "times are inflated and noisy; compare within a row.", "",
        "`segments unsorted` includes the stable sort of the index and the gather of the rows "
        "(and their scatter back in the backward); `segments sorted` is given the rows already "
        "grouped. `scatter_reduce` is `x.new_zeros(S, C).scatter_reduce(0, index, x, reduce, "
        "include_self=False)` with reduce sum / mean / amax.", "",
        "| threads | kind | pass | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['kind']} | {r['pass']} | "
                     + " | ".join(cell(r, n) for n in names) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/segments")
