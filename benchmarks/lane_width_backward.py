"""Fused backward time at each vector ISA / lane width (see benchmarks/lane_width.py).

Each configuration builds the kernels in a child process of its own; the child times
``torch.autograd.grad`` of the fused pool on (32, 2048, 14, 14) float32, both layouts, after 8
untimed calls (the first gradients of a new size fault in fresh huge pages, docs/performance.md),
12 timed calls with the caches flushed before each. Configurations run in turn, ``ROUNDS``
times; the table gives the median over the rounds of each round's median.

    python benchmarks/lane_width_backward.py benchmarks/results/lane-width 3
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lane_width import CONFIGS as FORWARD_CONFIGS  # noqa: E402

CONFIGS = {name: FORWARD_CONFIGS[name] for name in ("avx512 / 512", "avx2 / 256", "avx2 / 512")}
CHILD = r"""
import json, statistics, time
import torch
import globalpool as gp
torch.manual_seed(0)
flush = torch.empty(64 << 20)
res = {}
for layout in ("channels_first", "channels_last"):
    x = torch.randn(32, 2048, 14, 14).abs() + 0.1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for kind in ("avg", "max", "gem", "lse", "attention"):
        xg = x.clone().requires_grad_()
        kw = {"weights": torch.rand(32, 14, 14)} if kind == "attention" else {}
        times = []
        for i in range(20):
            y = gp.pool(xg, kind, backend="fused", **kw)
            g = torch.ones_like(y)
            flush.fill_(1)
            start = time.perf_counter()
            torch.autograd.grad(y, xg, g)
            if i >= 8:
                times.append(time.perf_counter() - start)
        res[f"{layout[9:]} {kind}"] = statistics.median(times) * 1e3
print(json.dumps(res))
"""


def main(out_dir: Path, rounds: int) -> None:
    from globalpool.lab.bench.report import machine_info

    out: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for _ in range(rounds):
        for name, env in CONFIGS.items():
            done = subprocess.run([sys.executable, "-c", CHILD], env={**os.environ, **env},
                                  capture_output=True, text=True, check=True)
            out[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    lines = [
        "# Fused backward at each vector ISA / lane width (ms, lower is faster)", "",
        f"Machine: {machine_info()['name']}. (32, 2048, 14, 14) float32; {rounds} rounds of "
        "every configuration in turn; per round the median of 12 timed calls after 8 untimed "
        "ones; the table: median over the rounds. Configurations: ISA the kernels were built "
        "for / bits of their lane vectors (AVX2 built with NUMBA_CPU_NAME=x86-64-v3 "
        "NUMBA_CPU_FEATURES=+avx2 on this machine).", "",
        "| case | " + " | ".join(CONFIGS) + " |", "|---" * (len(CONFIGS) + 1) + "|",
    ]
    for case in next(iter(out.values()))[0]:
        cells = [f"{statistics.median(o[case] for o in out[n]):.2f}" for n in CONFIGS]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lane_width_backward.json").write_text(json.dumps(out, indent=1))
    (out_dir / "lane_width_backward.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
