"""What a globalpool Keras layer costs over calling ``gp.pool`` directly, on the torch backend.

    python benchmarks/keras_overhead.py [OUT_DIR] [--repeats 25] [--shapes 32,7,7,2048;2,7,7,8]

For each kind (avg, gem, catavgmax) on channels-last float32 inputs (Keras' default layout; a
ResNet50 feature map, and a tiny one that shows the fixed cost of a call) it times three ways of
pooling the same torch tensor, forward only: ``gp.pool`` itself, the Keras layer (which hands
torch tensors to ``gp.pool``), and the layer's ``keras.ops`` composition (what the other backends
run, here on torch ops). The repeats are interleaved (every repeat times every case and method
once, in a rotating order), each sample is the median of a few calls, and the table gives
medians with min-max and each method's ratio to ``gp.pool`` from the medians. Writes
``overhead.json`` and ``overhead.md`` to OUT_DIR (default ``benchmarks/results/keras``) with the
machine (``lscpu`` model name) and the load average before and after.

>>> _ratio(3.0, 2.0)
1.5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ["KERAS_BACKEND"] = "torch"

KINDS = {"avg": {}, "gem": {"p": 3.0}, "catavgmax": {}}
METHODS = ("gp.pool", "keras layer", "keras.ops composition")
OUT = Path(__file__).resolve().parent / "results" / "keras"



def _ratio(a: float, b: float) -> float:
    return a / b


def _cpu_model() -> str:
    from globalpool.lab.bench.report import cpu_name, machine_info

    info = machine_info()
    return cpu_name(info)


def _callers(kind: str, params: dict, x):
    import globalpool as gp
    from globalpool.keras import GlobalPooling2D, _ops

    layer = GlobalPooling2D(kind, data_format="channels_last", **params)
    full = layer.params
    return {
        "gp.pool": lambda: gp.pool(x, kind, layout="channels_last", **params),
        "keras layer": lambda: layer(x),
        "keras.ops composition": lambda: _ops.pool(x, kind, axes=(1, 2), channel_axis=3, **full),
    }


def _sample(fn, calls: int) -> float:
    """Median seconds per call over ``calls`` calls."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, nargs="?", default=OUT)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--calls", type=int, default=5, help="calls per sample")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and numba threads (1: on a shared 2-core machine two threads get preempted "
        "and the samples split into fast and 8 ms slow ones)",
    )
    parser.add_argument("--shapes", default="32,7,7,2048;2,7,7,8", help="N,H,W,C;N,H,W,C")
    args = parser.parse_args()
    load_start = os.getloadavg()
    import keras
    import torch

    import globalpool

    torch.set_num_threads(args.threads)
    try:
        import numba

        numba.set_num_threads(args.threads)
    except ImportError:  # pragma: no cover
        pass
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
    xs = {shape: torch.rand(shape) + 0.1 for shape in shapes}  # positive, as after a ReLU
    callers = {
        (shape, kind): _callers(kind, params, xs[shape])
        for shape in shapes
        for kind, params in KINDS.items()
    }
    for calls in callers.values():  # warm up: the fused kernels compile (or load) on first use
        expected = calls["gp.pool"]()
        for method in METHODS:
            torch.testing.assert_close(calls[method](), expected, rtol=1e-5, atol=1e-5)
            _sample(calls[method], 3)
    samples = {(case, m): [] for case in callers for m in METHODS}
    pairs = list(samples)
    total = time.perf_counter()
    for r in range(args.repeats):
        shift = r % len(pairs)
        for case, method in pairs[shift:] + pairs[:shift]:
            samples[(case, method)].append(_sample(callers[case][method], args.calls))
    rows = []
    for case in callers:
        base = statistics.median(samples[(case, "gp.pool")])
        for method in METHODS:
            s = samples[(case, method)]
            median = statistics.median(s)
            rows.append(
                {
                    "shape": case[0],
                    "kind": case[1],
                    "method": method,
                    "median_ms": 1e3 * median,
                    "min_ms": 1e3 * min(s),
                    "max_ms": 1e3 * max(s),
                    "ratio_to_gp_pool": _ratio(median, base),
                    "samples_ms": [1e3 * t for t in s],
                }
            )
    machine = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "keras": keras.__version__,
        "globalpool": globalpool.__version__,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "timed_s": time.perf_counter() - total,
    }
    setup = {
        "shapes": shapes,
        "layout": "channels_last",
        "dtype": "float32",
        "repeats": args.repeats,
        "calls_per_sample": args.calls,
        "pass": "forward",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(
        json.dumps({"machine": machine, "setup": setup, "rows": rows}, indent=1)
    )
    load = ", ".join(f"{v:.2f}" for v in machine["load_average_start"])
    load_end = ", ".join(f"{v:.2f}" for v in machine["load_average_end"])
    lines = [
        "# Keras layer vs gp.pool (torch backend, forward)",
        "",
        f"Inputs {' and '.join(map(str, shapes))} (N, H, W, C) float32, channels_last; "
        f"{args.repeats} interleaved repeats, each the "
        f"median of {args.calls} calls. Machine: {machine['cpu']}, {machine['cores']} cores, "
        f"torch {machine['torch']}, keras {machine['keras']}, {args.threads} thread(s); load "
        f"average {load} at the start, {load_end} at the end.",
        "",
        "| shape | kind | method | median | min - max | ratio to gp.pool |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['shape']} | {r['kind']} | {r['method']} | {r['median_ms']:.3f} ms | "
        f"{r['min_ms']:.3f} - {r['max_ms']:.3f} ms | {r['ratio_to_gp_pool']:.2f} |"
        for r in rows
    ]
    (args.out / "overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
