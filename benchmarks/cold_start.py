"""Time the first fused CPU call of each kind and layout, in a fresh process with an empty cache.

    python benchmarks/cold_start.py OUT_DIR [--dtype float32] [--kinds avg,max,...]

For every (kind, layout) three fresh interpreters run, each with its own empty numba cache
(``NUMBA_CACHE_DIR``): one times a first inference call (``no_grad``), one a first training step
(forward and backward; it compiles the training forward and the backward; the forward call and
the backward call are also timed apart), and a third, sharing the training process's now filled
cache, times the same training step again (the cost of loading cached kernels). Each time
counts from before ``import globalpool`` to the end of the call (the backward call: from the
end of the forward call), so loading the package and the kernels module is included; the
interpreter start and ``import torch`` are not. Writes ``cold_start.json`` and
``cold_start.md`` to OUT_DIR with the machine and the load average before and after (other
jobs on the machine inflate the times).

>>> _CHILD.count("perf_counter")  # the child script times itself
4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KINDS = ("avg", "max", "avgmax", "catavgmax", "gem", "lse", "attention")
LAYOUTS = ("channels_first", "channels_last")

_CHILD = """
import sys, torch
kind, layout, dtype, train = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4]
shape = (2, 8, 4, 4) if layout == "channels_first" else (2, 4, 4, 8)
x = (torch.rand(shape) + 0.5).to(dtype)
params = {"weights": torch.rand(2, 4, 4).to(dtype)} if kind == "attention" else {}
import time
start = time.perf_counter()
import globalpool as gp
if train == "1":
    x.requires_grad_(True)
    y = gp.pool(x, kind, layout=layout, backend="fused", **params)
    middle = time.perf_counter()
    y.sum().backward()
    print(middle - start, time.perf_counter() - middle)
else:
    with torch.no_grad():
        gp.pool(x, kind, layout=layout, backend="fused", **params)
    print(time.perf_counter() - start, 0.0)
"""


def _first_call(kind: str, layout: str, dtype: str, train: bool, cache: str) -> tuple[float, float]:
    """(seconds to the end of the forward call, seconds of the backward call after it)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, layout, dtype, "1" if train else "0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    forward, backward = proc.stdout.strip().splitlines()[-1].split()
    return float(forward), float(backward)


def _cpu_name() -> str:
    """The CPU's model name, family and model number (Linux), else what platform knows."""
    try:
        info = dict(
            line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()
            if ":" in line
        )
        info = {k.strip(): v.strip() for k, v in info.items()}
        return f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
    except (OSError, KeyError):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    args.out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    total = time.perf_counter()
    rows = []
    for layout in LAYOUTS:
        for kind in kinds:
            with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
                inference, _ = _first_call(kind, layout, args.dtype, False, a)
                forward, backward = _first_call(kind, layout, args.dtype, True, b)
                cached = sum(_first_call(kind, layout, args.dtype, True, b))
            rows.append(
                {"kind": kind, "layout": layout, "dtype": args.dtype, "inference_s": inference,
                 "training_s": forward + backward, "training_forward_s": forward,
                 "training_backward_s": backward, "training_cached_s": cached}
            )
            print(f"{kind:<10} {layout:<15} {inference:6.2f} s {forward:6.2f} s "
                  f"+ {backward:5.2f} s {cached:6.2f} s")
    machine = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "wall_s": time.perf_counter() - total,
    }
    try:
        import numba
        import torch

        machine.update(torch=torch.__version__, numba=numba.__version__)
    except ImportError:  # pragma: no cover
        pass
    (args.out / "cold_start.json").write_text(json.dumps({"machine": machine, "rows": rows},
                                                         indent=1))
    lines = [
        f"# First fused CPU call, empty cache ({args.dtype})",
        "",
        f"Machine: {machine}",
        "",
        "| kind | layout | inference | training: forward call | training: backward call "
        "| training (fwd + bwd) | training, cache filled |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['kind']} | {r['layout']} | {r['inference_s']:.2f} s | "
        f"{r['training_forward_s']:.2f} s | {r['training_backward_s']:.2f} s | "
        f"{r['training_s']:.2f} s | {r['training_cached_s']:.2f} s |"
        for r in rows
    ]
    (args.out / "cold_start.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
