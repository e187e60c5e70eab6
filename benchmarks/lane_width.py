"""Fused forward speed at each lane width and vector ISA: which default the kernels should take.

Every configuration builds the kernels in a child process of its own (numba reads the target
at import): the ISA through numba's ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` (``avx2`` builds
for ``x86-64-v3``, so an AVX-512 machine runs the AVX2 code), the width of the kernels' lane
vectors through ``GLOBALPOOL_LANE_BITS``. Each child times, per DRAM-sized shape, layout and
kind, the fused forward under ``no_grad`` and ``x.sum()`` alternately with the caches flushed
(a 256 MiB write) before every sample, and reports median ``x.sum()`` time / median fused time.
The configurations run in turn, ``--rounds`` times; the table gives each case's median over
the rounds, and the spread (min-max) of the rounds.

    python benchmarks/lane_width.py benchmarks/results/lane-width --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# numba's target options that build the AVX2 code (x86-64-v3) on any x86 machine
AVX2 = {"NUMBA_CPU_NAME": "x86-64-v3", "NUMBA_CPU_FEATURES": "+avx2"}
# name -> environment; every width is set explicitly (the default follows the CPU's registers)
CONFIGS = {
    f"{isa} / {bits}": {**env, "GLOBALPOOL_LANE_BITS": str(bits)}
    for isa, env in (("avx512", {}), ("avx2", AVX2)) for bits in (512, 256, 1024)
}
SHAPES = {"r50-head-14": (32, 2048, 14, 14), "early-224": (8, 64, 224, 224)}
KINDS = ("avg", "max", "avgmax", "catavgmax", "gem", "lse", "attention")


def child(repeats: int) -> dict:
    """Runs in the child: ratio x.sum() / fused per case, and what the kernels were built for."""
    import torch

    import globalpool as gp
    from globalpool.warmup import kernel_target

    torch.manual_seed(0)
    flush = torch.empty(64 << 20, dtype=torch.float32)
    ratios = {}
    for shape_name, shape in SHAPES.items():
        base = torch.randn(*shape)
        for layout in ("channels_first", "channels_last"):
            x = base if layout == "channels_first" else base.contiguous(
                memory_format=torch.channels_last)
            for kind in KINDS:
                weights = torch.rand(shape[0], *shape[2:])
                params = {"weights": weights} if kind == "attention" else {}
                fused, ceiling = [], []
                with torch.no_grad():
                    gp.pool(x, kind, backend="fused", **params)  # compiles or loads the kernels
                    for _ in range(repeats):
                        flush.fill_(1.0)
                        start = time.perf_counter()
                        x.sum()
                        ceiling.append(time.perf_counter() - start)
                        flush.fill_(1.0)
                        start = time.perf_counter()
                        gp.pool(x, kind, backend="fused", **params)
                        fused.append(time.perf_counter() - start)
                ratios[f"{shape_name} {layout} {kind}"] = (
                    statistics.median(ceiling) / statistics.median(fused))
    return {"target": kernel_target(), "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    from globalpool.lab.bench.report import machine_info

    names = args.configs.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    load_start = os.getloadavg()
    started = time.time()
    for round_ in range(args.rounds):
        for name in names:
            env = {**os.environ, **CONFIGS[name]}
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(args.repeats)], env=env,
                capture_output=True, text=True, check=True,
            )
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}/{args.rounds}: {name}", flush=True)
    machine = machine_info()
    record = {
        "machine": machine, "configs": {n: CONFIGS[n] for n in names}, "rounds": args.rounds,
        "repeats": args.repeats, "load_start": load_start, "load_end": os.getloadavg(),
        "seconds": round(time.time() - started), "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lane_width.json").write_text(json.dumps(record, indent=1))
    cases = list(runs[names[0]][0]["ratios"])
    lines = [
        "# Fused forward at each vector ISA / lane width (ratio to `x.sum()`, cold caches)", "",
        f"Machine: {machine['name']}; torch {machine['torch']}, numba {machine['numba']}; "
        f"{machine['torch_threads']} threads. {args.rounds} rounds of every configuration in "
        f"turn, {args.repeats} samples of each method per round; median over the rounds "
        f"(min-max of the rounds' medians). Load average at start / end: "
        f"{load_start[0]:.2f} / {record['load_end'][0]:.2f}; {record['seconds']} s in all.",
        "",
        "Configurations (ISA the kernels were compiled for / bits of their lane vectors): "
        + "; ".join(f"`{n}`: {runs[n][0]['target']}" for n in names), "",
        "| case | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
    ]
    for case in cases:
        cells = []
        for name in names:
            values = [r["ratios"][case] for r in runs[name]]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    (args.out / "lane_width.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(int(sys.argv[2]))))
    else:
        main()
