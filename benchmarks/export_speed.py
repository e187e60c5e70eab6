"""Exported vs eager speed: heads exported to ONNX and run in onnxruntime against eager torch.

    PYTHONPATH=src python benchmarks/export_speed.py [--repeats 30] [--out DIR]

Models: ``ClassifierHead(2048, 1000, pool=k)`` for k in avg, gem, catavgmax on a
``(32, 2048, 7, 7)`` float32 feature map (eager: ``backend="auto"``, which runs the fused kernel
for gem and catavgmax at this size), and ``AdaptivePool((3, 3), "avg")`` on the same map (3 does
not divide 7) against eager ``F.adaptive_avg_pool2d``. ONNX: the dynamo exporter with a dynamic
batch, onnxruntime's CPUExecutionProvider with 2 intra-op threads (eager torch uses its default,
``torch.get_num_threads()``). Every repeat times each runtime of each model once, in turn
(interleaved, the order alternating), each time the mean of ``--calls`` calls; the record keeps
the median and min-max over the repeats and the ratio of the medians (ONNX / eager: below 1 the
exported model is faster). Writes ``speed.json`` and ``speed.md`` with the machine and the load
average before and after (check ``uptime`` first: other jobs distort the times).

>>> _ratio(2.0, 4.0)
0.5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import globalpool as gp  # noqa: E402

SHAPE = (32, 2048, 7, 7)



def _ratio(a: float, b: float) -> float:
    return a / b


def _machine() -> dict[str, object]:
    from globalpool.lab.bench.report import cpu_name, machine_info

    info = machine_info()
    cpu = cpu_name(info)
    return {"cpu": cpu, "cores": info["logical_cores"],
            "torch_threads": info["torch_threads"]}


def _session(module: torch.nn.Module, x: torch.Tensor, path: Path, dynamic: bool):
    import onnxruntime as ort

    dims = ({0: torch.export.Dim("N", min=1, max=1024)},) if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=True, input_names=["x"],
                          dynamic_shapes=dims)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    # no spin-waiting after a run: spinning threads would take the cores from the eager call
    # that follows in the interleaved loop
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda a: session.run(None, {"x": a})[0]


def _models(tmp: Path, x: torch.Tensor) -> tuple[dict, dict]:
    """name -> (eager fn, onnx fn), and notes on how each was exported."""
    models, notes = {}, {}
    xn = x.numpy()
    for kind in ("avg", "gem", "catavgmax"):
        head = gp.ClassifierHead(2048, 1000, pool=kind).eval()
        onnx_fn = _session(head, x, tmp / f"{kind}.onnx", dynamic=True)
        models[f"ClassifierHead(2048, 1000, pool={kind!r})"] = (lambda h=head: h(x),
                                                                lambda f=onnx_fn: f(xn))
        notes[f"ClassifierHead(2048, 1000, pool={kind!r})"] = "dynamic batch"
    layer = gp.AdaptivePool((3, 3), "avg").eval()
    name = "AdaptivePool((3, 3), 'avg') vs F.adaptive_avg_pool2d"
    for dynamic in (True, False):
        try:
            onnx_fn = _session(layer, x, tmp / f"adaptive_{dynamic}.onnx", dynamic)
            got = torch.from_numpy(onnx_fn(xn))
            torch.testing.assert_close(got, F.adaptive_avg_pool2d(x, (3, 3)), rtol=1e-4,
                                       atol=1e-5)
        except Exception as err:  # noqa: BLE001 - recorded, then the static export is tried
            line = next((s for s in str(err).splitlines() if s.strip()), "")
            notes[name] = f"{'dynamic' if dynamic else 'static'} batch failed: {line[:200]}"
            continue
        models[name] = (lambda: F.adaptive_avg_pool2d(x, (3, 3)), lambda f=onnx_fn: f(xn))
        notes[name] = ("dynamic batch" if dynamic else
                       f"static shape (the dynamic export failed: {notes.get(name, '')})")
        break
    return models, notes


def _time(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def run(repeats: int, calls: int) -> dict:
    logging.getLogger("torch").setLevel(logging.ERROR)
    x = torch.randn(SHAPE)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        models, notes = _models(Path(tmp), x)
        for eager, onnx_fn in models.values():  # warm up (and check) both sides
            for _ in range(3):
                eager(), onnx_fn()
            torch.testing.assert_close(torch.from_numpy(onnx_fn()), eager(), rtol=1e-4,
                                       atol=1e-4)
        times = {name: {"eager": [], "onnx": []} for name in models}
        for r in range(repeats):
            for name, (eager, onnx_fn) in models.items():
                order = (("eager", eager), ("onnx", onnx_fn))
                for side, fn in order if r % 2 == 0 else order[::-1]:
                    times[name][side].append(_time(fn, calls))
    rows = []
    for name, sides in times.items():
        row = {"model": name, "export": notes[name]}
        for side, ts in sides.items():
            row[side] = {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                         "max_ms": max(ts) * 1e3}
        row["onnx_over_eager"] = _ratio(row["onnx"]["median_ms"], row["eager"]["median_ms"])
        rows.append(row)
    failed = {n: v for n, v in notes.items() if n not in models}
    import onnxruntime

    return {
        "shape": list(SHAPE), "dtype": "float32", "repeats": repeats, "calls_per_repeat": calls,
        "machine": _machine(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "ort_threads": {"intra_op": 2, "inter_op": 1, "allow_spinning": 0},
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "rows": rows, "not_measured": failed,
    }


def markdown(record: dict) -> str:
    m = record["machine"]
    lines = [
        "# Exported (ONNX, onnxruntime) vs eager torch",
        "",
        f"Input {tuple(record['shape'])} {record['dtype']}; {record['repeats']} interleaved "
        f"repeats of {record['calls_per_repeat']} calls; median (min-max) per call. "
        f"onnxruntime {record['onnxruntime']} CPUExecutionProvider, 2 intra-op threads (no "
        "spin-waiting); eager "
        f"torch {record['torch']} with {m['torch_threads']} threads, `backend=\"auto\"`. "
        f"Machine: {m['cpu']}, {m['cores']} cores; load average "
        f"{record['load_average_start'][0]:.2f} before, {record['load_average_end'][0]:.2f} "
        "after.",
        "",
        "| model | ONNX export | eager ms | ONNX ms | ONNX / eager |",
        "|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        e, o = r["eager"], r["onnx"]
        lines.append(
            f"| `{r['model']}` | {r['export']} | {e['median_ms']:.2f} ({e['min_ms']:.2f}-"
            f"{e['max_ms']:.2f}) | {o['median_ms']:.2f} ({o['min_ms']:.2f}-{o['max_ms']:.2f}) | "
            f"{r['onnx_over_eager']:.2f} |"
        )
    for name, why in record["not_measured"].items():
        lines.append(f"| `{name}` | {why} | – | – | – |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export")
    args = parser.parse_args(argv)
    record = run(args.repeats, args.calls)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / "speed.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
