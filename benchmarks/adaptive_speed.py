"""Adaptive pooling speed: ``gp.adaptive_pool`` against ``F.adaptive_avg/max_pool2d``, eager CPU.

Three methods per case, interleaved in one run on the same tensor: ``gp.adaptive_pool`` as a user
calls it (it takes torch's op where that is the same function: unmasked avg, and the max kinds
without a gradient), globalpool's composition alone (what masked inputs, the other kinds and a
max with a gradient run), and torch's op. Forward (no grad) and forward + backward; the median
with the min-max over the repeats and ratios of medians to torch (< 1 is faster).

    python benchmarks/adaptive_speed.py benchmarks/results/adaptive
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import globalpool as gp
from globalpool.adaptive import adaptive_compose
from globalpool.lab.bench.report import machine_info

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


def _composition(x, out, kind):
    """globalpool's own composition, as masked inputs and the other kinds run it."""
    sizes = (out,) * (x.ndim - 2) if isinstance(out, int) else out
    return adaptive_compose(x, sizes, kind, "channels_first", None, {})


def _machine() -> str:
    return f"{machine_info()['name']}, {torch.get_num_threads()} threads"


def main(out_dir: str, repeats: int = 15) -> None:
    torch.manual_seed(0)
    rows = []
    for shape, out in CASES:
        x = torch.randn(shape)
        for kind in ("avg", "max"):
            for backward in (False, True):
                methods = {
                    "ours": _step(lambda t, o, k=kind: gp.adaptive_pool(t, o, k), x, out, backward),
                    "composition": _step(lambda t, o, k=kind: _composition(t, o, k), x, out,
                                         backward),
                    "torch": _step(TORCH[kind], x, out, backward),
                }
                times = {name: [] for name in methods}
                for fn in methods.values():  # warm up
                    fn()
                for _ in range(repeats):  # interleaved: the same cache state and machine load
                    for name, fn in methods.items():
                        times[name] += _time(fn, 1)
                med = {name: statistics.median(t) for name, t in times.items()}
                row = {"shape": list(shape), "output_size": out, "kind": kind,
                       "pass": "forward+backward" if backward else "forward"}
                for name, t in times.items():
                    row[f"{name}_ms"] = [1e3 * med[name], 1e3 * min(t), 1e3 * max(t)]
                row["ratio"] = med["ours"] / med["torch"]
                row["composition_ratio"] = med["composition"] / med["torch"]
                rows.append(row)
                print(f"{shape} -> {out} {kind} {row['pass']}: ours {row['ratio']:.2f}, "
                      f"composition {row['composition_ratio']:.2f} x torch "
                      f"({1e3 * med['torch']:.2f} ms)", flush=True)
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
        "| input | output | kind | pass | gp.adaptive_pool ms | composition ms | torch ms "
        "| gp / torch | composition / torch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(t):
        return f"{t[0]:.2f} ({t[1]:.2f}-{t[2]:.2f})"

    for r in rows:
        lines.append(
            f"| {tuple(r['shape'])} | {r['output_size']} | {r['kind']} | {r['pass']} | "
            f"{cell(r['ours_ms'])} | {cell(r['composition_ms'])} | {cell(r['torch_ms'])} | "
            f"{r['ratio']:.2f} | {r['composition_ratio']:.2f} |"
        )
    (path / "speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/adaptive")
