"""What ``gp.monitor`` adds to a model's forward: the ``compare`` models with every pooling head.

    python benchmarks/monitor_overhead.py [OUT_DIR] [--budget 45] [--threads 1]

For each ``compare`` model (``cnn1d``, ``cnn2d``, ``multiscale``, ``resnet18``) and each head that
has a pooling module (every head but ``fc``, which :func:`globalpool.monitor` refuses) it times
the eval-mode forward under ``torch.no_grad`` (the cheapest forward, so the largest relative
overhead) of one batch, plain and inside ``with gp.monitor(model)``, from the same cache state:
both are warmed up (and their outputs compared: equal), then the repeats alternate the two
(which goes first alternates too); a sample times enough forwards to last about 30 ms. The
monitored forwards run on a copy of the model (same weights) that stays inside one ``with
gp.monitor`` block for all its samples, as in a training loop or an evaluation pass watched by
one monitor: what is measured is the steady cost per forward, the hooks and copies of every
call and the batched reductions of the flushes that fall inside the samples. What one ``with``
block costs in itself (building the monitor and its hooks, the final flush) is measured apart,
around a single forward (``block us``). The overhead is the median over the repeats of each
monitored sample's CPU time over the plain sample beside it, minus 1: CPU time of the timing
thread (``time.thread_time``, one torch thread) is what a shared machine's load disturbs least;
the wall-time ratio is given too. The repeats fit ``--budget`` seconds (the script ends within
about twice that on a busy machine); the target is < 5%. Writes ``overhead.json`` and
``overhead.md`` to OUT_DIR (default ``benchmarks/results/monitor``) with
the machine and the load average before and after.

>>> _overhead(1.05, 1.0)
0.05
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import globalpool as gp
from globalpool.lab.bench.report import cpu_name, machine_info
from globalpool.lab.models import build_model

OUT = Path(__file__).resolve().parent / "results" / "monitor"
TARGET = 0.05
# (model, input shape without the batch, batch): each dataset's training batch (mnist1d 100,
# digits-shifted 64); resnet18 on 4 CIFAR images, since its batch of 128 takes seconds on one
# thread, and a small batch is the worst case for a per-call overhead.
MODELS = [
    ("cnn1d", (1, 40), 100),
    ("multiscale", (1, 40), 100),
    ("cnn2d", (1, 24, 24), 64),
    ("resnet18", (3, 32, 32), 4),
]
SAMPLE_S = 0.03  # a sample lasts about this long: many forwards for the small models


def _overhead(monitored: float, plain: float) -> float:
    return round(monitored / plain - 1.0, 12)


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def _plain(model: torch.nn.Module, x: torch.Tensor, calls: int) -> tuple[float, float]:
    """(wall, CPU) seconds per forward, over ``calls`` forwards."""
    w, c = _clocks()
    for _ in range(calls):
        model(x)
    w1, c1 = _clocks()
    return (w1 - w) / calls, (c1 - c) / calls


def _monitored(model: torch.nn.Module, x: torch.Tensor, calls: int) -> tuple[float, float]:
    """The same inside a ``gp.monitor`` block of its own (entered and left once)."""
    w, c = _clocks()
    with gp.monitor(model):
        for _ in range(calls):
            model(x)
    w1, c1 = _clocks()
    return (w1 - w) / calls, (c1 - c) / calls


def _block_cost(model: torch.nn.Module, x: torch.Tensor, tries: int) -> float:
    """CPU seconds one ``with gp.monitor(model): model(x)`` block adds to one forward (building
    the monitor, its hooks and the final flush), the median of ``tries``."""
    added = []
    for _ in range(tries):
        plain = _plain(model, x, 1)[1]
        added.append(_monitored(model, x, 1)[1] - plain)
    return statistics.median(added)


def _summary(samples: list[tuple[float, float]], k: int) -> list[float]:
    xs = [s[k] for s in samples]
    return [1e3 * statistics.median(xs), 1e3 * min(xs), 1e3 * max(xs)]


def _case(model: torch.nn.Module, x: torch.Tensor, budget_s: float, threads: int) -> dict:
    with torch.no_grad():
        reference = model(x)
        with gp.monitor(model) as stats:
            torch.testing.assert_close(model(x), reference, rtol=0, atol=0)
        t = min(_plain(model, x, 1)[0] for _ in range(2))  # also warms both paths up
        _monitored(model, x, 1)
        _set_threads(threads)  # after the warm-up: a library loaded there may change it
        calls = max(1, round(SAMPLE_S / t))
        repeats = int(min(40, max(3, budget_s / (2 * calls * t))))
        plain, monitored = [], []
        watched = copy.deepcopy(model)
        with gp.monitor(watched) as steady:
            _plain(watched, x, 2)  # the copy warmed up too
            for r in range(repeats):  # alternate, and alternate which goes first
                if r % 2 == 0:
                    plain.append(_plain(model, x, calls))
                    monitored.append(_plain(watched, x, calls))
                else:
                    monitored.append(_plain(watched, x, calls))
                    plain.append(_plain(model, x, calls))
        assert all(r["calls"] == 2 + repeats * calls for r in steady.as_dict().values())
        block = _block_cost(model, x, tries=20) if t < 0.01 else None  # else negligible
    row: dict = {"pools": len(stats.records), "calls_per_sample": calls, "repeats": repeats}
    for k, clock in enumerate(("wall", "cpu")):
        row[f"plain_{clock}_ms"] = _summary(plain, k)
        row[f"monitored_{clock}_ms"] = _summary(monitored, k)
        ratios = [m[k] / p[k] for p, m in zip(plain, monitored, strict=True)]
        row[f"overhead_{clock}"] = round(statistics.median(ratios) - 1.0, 12)
    row["overhead_cpu_of_minima"] = _overhead(
        min(m[1] for m in monitored), min(p[1] for p in plain)
    )
    row["block_cpu_us"] = None if block is None else 1e6 * block
    row["overhead"] = row["overhead_cpu"]
    return row


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)
    if "numba" in sys.modules:
        sys.modules["numba"].set_num_threads(min(n, sys.modules["numba"].config.NUMBA_NUM_THREADS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, nargs="?", default=OUT)
    parser.add_argument("--budget", type=float, default=45.0, help="seconds of timing in all")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    load_start = os.getloadavg()
    _set_threads(args.threads)
    torch.manual_seed(0)
    heads = [h for h in gp.HEADS if h != "fc"]
    cases = len(MODELS) * len(heads)
    rows = []
    total = time.perf_counter()
    for name, shape, batch in MODELS:
        x = torch.randn(batch, *shape)
        for head in heads:
            model = build_model(name, head, 10, in_channels=shape[0], spatial_size=shape[1:])
            _set_threads(args.threads)  # a kernel library loaded on the way may change it
            row = {"model": name, "head": head, "input": [batch, *shape]}
            left = args.budget - (time.perf_counter() - total)  # a busy machine: fewer repeats
            budget = max(left, 0.0) / (cases - len(rows))
            row.update(_case(model.eval(), x, budget, args.threads))
            row["torch_threads_after"] = torch.get_num_threads()
            rows.append(row)
            print(f"{name:10s} {head:9s} CPU plain {row['plain_cpu_ms'][0]:8.3f} ms  monitored "
                  f"{row['monitored_cpu_ms'][0]:8.3f} ms  {100 * row['overhead']:+.1f}% (wall "
                  f"{100 * row['overhead_wall']:+.1f}%)", flush=True)
    info = machine_info()
    machine = {
        "cpu": cpu_name(info),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "globalpool": gp.__version__,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "timed_s": time.perf_counter() - total,
    }
    worst = max(rows, key=lambda r: r["overhead"])
    result = {"machine": machine, "target": TARGET, "rows": rows,
              "within_target": all(r["overhead"] < TARGET for r in rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "overhead.md").write_text(markdown(result, worst))
    print(f"worst {worst['model']}/{worst['head']} {100 * worst['overhead']:+.1f}%; "
          f"{machine['timed_s']:.0f} s; wrote {args.out}")


def _fmt(t: list[float]) -> str:
    return f"{t[0]:.3f} ({t[1]:.3f}-{t[2]:.3f})"


def _per_model(rows: list[dict]) -> list[str]:
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == name]
        over = statistics.median(r["overhead"] for r in sel)
        plain = statistics.median(r["plain_cpu_ms"][0] for r in sel)
        out.append(f"`{name}` {100 * over:+.1f}% (forward {plain:.2f} ms)")
    return out


def markdown(result: dict, worst: dict) -> str:
    m = result["machine"]
    load = ", ".join(f"{v:.2f}" for v in m["load_average_start"])
    load_end = ", ".join(f"{v:.2f}" for v in m["load_average_end"])
    lines = [
        "# gp.monitor overhead on the compare models (eval forward, no_grad, CPU)",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s); torch "
        f"{m['torch']}, globalpool {m['globalpool']}. Load average {load} at the start, "
        f"{load_end} at the end, on {m['cores']} cores (other jobs inflate and scatter wall "
        "times), so the overhead is measured on the CPU time of the timing thread "
        "(`time.thread_time`; one torch thread, so all "
        "the work is on it), which another process's load disturbs far less (caches aside). "
        "Plain and monitored samples alternate (which goes first too), each sample a "
        f"number of forwards lasting about {1e3 * SAMPLE_S:.0f} ms together; times are per "
        f"forward, median (min-max) of the samples. Timed in {m['timed_s']:.0f} s.",
        "",
        "**overhead** = median over the repeats of (monitored sample / the plain sample beside "
        "it) - 1, on CPU time; **wall** the same on wall time. The monitored samples run on a "
        "copy of the model that stays inside one `with gp.monitor(...)` block for all of them "
        "(the steady cost per forward: hooks, copies and the flushes that fall inside); "
        "**block us** is what a block itself adds, around one single forward (building "
        "the monitor, its hooks, the final flush; median of 20 tries; `-` for the models "
        "whose forward takes over 10 ms, where it is lost in the noise). "
        f"Target < {100 * result['target']:.0f}%. `fc` has no pooling module (the monitor "
        f"refuses it). Worst case: `{worst['model']}` / `{worst['head']}` at "
        f"{100 * worst['overhead']:+.1f}%; "
        + ("every case is within the target." if result["within_target"] else
           "cases at or above the target are marked **bold**."),
        "",
        "Median overhead over the heads, per model: "
        + "; ".join(_per_model(result["rows"]))
        + ". The monitor costs a roughly fixed time per call of a pooling module (the hook, "
        "a copy of the pooled output, its share of the batched reductions), so its relative "
        "cost falls as the forward's time grows.",
        "",
        "| model | head | input | pools | forwards per sample | repeats | plain CPU ms "
        "| monitored CPU ms | overhead | wall | block us |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        over = f"{100 * r['overhead']:+.1f}%"
        if r["overhead"] >= result["target"]:
            over = f"**{over}**"
        lines.append(
            f"| {r['model']} | {r['head']} | {tuple(r['input'])} | {r['pools']} | "
            f"{r['calls_per_sample']} | {r['repeats']} | {_fmt(r['plain_cpu_ms'])} | "
            f"{_fmt(r['monitored_cpu_ms'])} | {over} | {100 * r['overhead_wall']:+.1f}% | "
            f"{'-' if r['block_cpu_us'] is None else format(r['block_cpu_us'], '.0f')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
