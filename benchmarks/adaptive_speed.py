"""Adaptive pooling speed: ``gp.adaptive_pool`` against ``F.adaptive_avg/max_pool2d``, eager CPU.

Each case times both, interleaved in one run from the same cache state (a fresh copy of x is not
made: both read the same tensor), forward and forward + backward, and reports the median with the
min-max over the repeats and the ratio of medians (ours / torch; < 1 is faster).

    python benchmarks/adaptive_speed.py benchmarks/results/adaptive
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import globalpool as gp

CASES = [  # (shape, output size): common head and pyramid sizes, divisible and not
    ((32, 2048, 7, 7), 1),
    ((32, 2048, 14, 14), (7, 7)),
    ((32, 512, 28, 28), (7, 7)),
    ((32, 256, 56, 56), (7, 7)),
    ((32, 2048, 7, 7), (3, 3)),
    ((32, 512, 13, 13), (6, 6)),
    ((32, 256, 32, 32), (6, 6)),
]
TORCH = {"avg": F.adaptive_avg_pool2d, "max": F.adaptive_max_pool2d}


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _step(pool, x, out, backward: bool):
    def run():
        if backward:
            xg = x.detach().requires_grad_()
            pool(xg, out).sum().backward()
        else:
            with torch.no_grad():
                pool(x, out)

    return run


def _machine() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                     if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.CalledProcessError):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {torch.get_num_threads()} threads"


def main(out_dir: str, repeats: int = 15) -> None:
    torch.manual_seed(0)
    rows = []
    for shape, out in CASES:
        x = torch.randn(shape)
        for kind in ("avg", "max"):
            for backward in (False, True):
                ours = _step(lambda t, o, k=kind: gp.adaptive_pool(t, o, k), x, out, backward)
                theirs = _step(TORCH[kind], x, out, backward)
                ours(), theirs()  # warm up
                t_ours, t_theirs = [], []
                for _ in range(repeats):  # interleaved: the same cache state and machine load
                    t_ours += _time(ours, 1)
                    t_theirs += _time(theirs, 1)
                med_o, med_t = statistics.median(t_ours), statistics.median(t_theirs)
                rows.append({
                    "shape": list(shape), "output_size": out, "kind": kind,
                    "pass": "forward+backward" if backward else "forward",
                    "ours_ms": [1e3 * med_o, 1e3 * min(t_ours), 1e3 * max(t_ours)],
                    "torch_ms": [1e3 * med_t, 1e3 * min(t_theirs), 1e3 * max(t_theirs)],
                    "ratio": med_o / med_t,
                })
                print(f"{shape} -> {out} {kind} {rows[-1]['pass']}: "
                      f"{1e3 * med_o:.2f} ms vs {1e3 * med_t:.2f} ms, ratio {med_o / med_t:.2f}",
                      flush=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    meta = {"machine": _machine(), "torch": torch.__version__, "repeats": repeats,
            "load_at_end": float(load)}
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# Adaptive pooling vs torch's adaptive ops (eager CPU)", "",
        f"{meta['machine']}; torch {meta['torch']}; median (min-max) of {repeats} interleaved "
        f"repeats; load average {load} at the end. Ratio = ours / torch (< 1 is faster).", "",
        "| input | output | kind | pass | globalpool ms | torch ms | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, t = r["ours_ms"], r["torch_ms"]
        lines.append(
            f"| {tuple(r['shape'])} | {r['output_size']} | {r['kind']} | {r['pass']} | "
            f"{o[0]:.2f} ({o[1]:.2f}-{o[2]:.2f}) | {t[0]:.2f} ({t[1]:.2f}-{t[2]:.2f}) | "
            f"{r['ratio']:.2f} |"
        )
    (path / "speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/adaptive")
