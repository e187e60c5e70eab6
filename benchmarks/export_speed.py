"""Exported vs eager speed: heads and adaptive pooling exported to ONNX, run in onnxruntime,
against eager torch.

    PYTHONPATH=src python benchmarks/export_speed.py [--repeats 30] [--out DIR]

Models: ``ClassifierHead(2048, 1000, pool=k)`` for every built-in kind k on a
``(32, 2048, 7, 7)`` float32 feature map (eager: ``backend="auto"``, which runs the fused kernel
where the kind has one at this size), exported with a dynamic batch, and the gem head once more
with a non-integer p (2.7, as a learned p ends up); and
``AdaptivePool((3, 3), "avg")`` against eager ``F.adaptive_avg_pool2d`` on that map (3 does not
divide 7) and on a ``(32, 2048, 6, 6)`` map (divisible), each exported twice: with a dynamic
batch only (static spatial sizes) and with dynamic batch and spatial sizes. ONNX: the dynamo
exporter, onnxruntime's CPUExecutionProvider with 2 intra-op threads (eager torch uses its
default, ``torch.get_num_threads()``). Every repeat times each runtime of each model once, in
turn (interleaved, the order alternating), each time the mean of ``--calls`` calls; the record
keeps the median and min-max over the repeats and the ratio of the medians (ONNX / eager: below
1 the exported model is faster), with the ONNX op types of each graph. Writes ``speed.json`` and
``speed.md`` with the machine and the load average before and after (check ``uptime`` first:
other jobs distort the times).

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
LEARNED_P = 2.7  # GeM's p as training leaves it: not an integer (the default p = 3 is one)
NOTE = ("A load average above 1 means other jobs shared the machine: eager torch's threads "
        "suffer more from the contention than onnxruntime's non-spinning ones, so ratios below 1 "
        "then overstate onnxruntime's lead.")



def _ratio(a: float, b: float) -> float:
    return a / b


def _machine() -> dict[str, object]:
    from globalpool.lab.bench.report import cpu_name, machine_info

    info = machine_info()
    cpu = cpu_name(info)
    return {"cpu": cpu, "cores": info["logical_cores"],
            "torch_threads": info["torch_threads"]}


def _session(module: torch.nn.Module, x: torch.Tensor, path: Path, spatial: bool):
    """An onnxruntime call of ``module`` exported with a dynamic batch (and dynamic spatial
    sizes if ``spatial``), and the sorted op types of its graph."""
    import onnx
    import onnxruntime as ort

    dims = {0: torch.export.Dim("N", min=1, max=1024)}
    if spatial:
        dims.update({2: torch.export.Dim("H", min=2, max=512),
                     3: torch.export.Dim("W", min=2, max=512)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=True, input_names=["x"],
                          dynamic_shapes=(dims,))
    ops = sorted({n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node})
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    # no spin-waiting after a run: spinning threads would take the cores from the eager call
    # that follows in the interleaved loop
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return (lambda a: session.run(None, {"x": a})[0]), ops


def _models(tmp: Path, x: torch.Tensor) -> tuple[dict, dict]:
    """name -> (eager fn, onnx fn, input), and notes on how each was exported."""
    models, notes = {}, {}
    heads = [(kind, {}) for kind in gp.KINDS] + [("gem", {"p": LEARNED_P})]
    for kind, params in heads:
        extra = "".join(f", {k}={v!r}" for k, v in params.items())
        name = f"ClassifierHead(2048, 1000, pool={kind!r}{extra})"
        head = gp.ClassifierHead(2048, 1000, pool=kind, **params).eval()
        onnx_fn, ops = _session(head, x, tmp / f"{kind}{len(models)}.onnx", spatial=False)
        models[name] = (head, onnx_fn, x)
        notes[name] = {"export": "dynamic batch", "ops": ops}
    layer = gp.AdaptivePool((3, 3), "avg").eval()
    divisible = torch.randn(SHAPE[:2] + (6, 6), generator=torch.Generator().manual_seed(1))
    for size, inp in (("7x7", x), ("6x6", divisible)):
        for spatial in (False, True):
            name = f"AdaptivePool((3, 3), 'avg') {size} vs F.adaptive_avg_pool2d"
            name += ", dynamic H, W" if spatial else ", static H, W"
            onnx_fn, ops = _session(layer, inp, tmp / f"adaptive_{size}_{spatial}.onnx", spatial)
            models[name] = (lambda a: F.adaptive_avg_pool2d(a, (3, 3)), onnx_fn, inp)
            notes[name] = {"export": "dynamic batch" + (", H, W" if spatial else ""), "ops": ops}
    return models, notes


def _time(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def run(repeats: int, calls_per_repeat: int) -> dict:
    logging.getLogger("torch").setLevel(logging.ERROR)
    x = torch.randn(SHAPE)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        models, notes = _models(Path(tmp), x)
        calls = {}
        for name, (eager, onnx_fn, inp) in models.items():  # warm up (and check) both sides
            arr = inp.numpy()
            calls[name] = (lambda e=eager, i=inp: e(i), lambda f=onnx_fn, a=arr: f(a))
            for _ in range(3):
                calls[name][0](), calls[name][1]()
            torch.testing.assert_close(torch.from_numpy(calls[name][1]()), calls[name][0](),
                                       rtol=1e-4, atol=1e-4)
        times = {name: {"eager": [], "onnx": []} for name in models}
        for r in range(repeats):
            for name, (eager, onnx_fn) in calls.items():
                order = (("eager", eager), ("onnx", onnx_fn))
                for side, fn in order if r % 2 == 0 else order[::-1]:
                    times[name][side].append(_time(fn, calls_per_repeat))
    rows = []
    for name, sides in times.items():
        row = {"model": name, "export": notes[name]["export"], "ops": notes[name]["ops"]}
        for side, ts in sides.items():
            row[side] = {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                         "max_ms": max(ts) * 1e3}
        row["onnx_over_eager"] = _ratio(row["onnx"]["median_ms"], row["eager"]["median_ms"])
        rows.append(row)
    import onnxruntime

    return {
        "shape": list(SHAPE), "dtype": "float32", "repeats": repeats,
        "calls_per_repeat": calls_per_repeat,
        "machine": _machine(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "ort_threads": {"intra_op": 2, "inter_op": 1, "allow_spinning": 0},
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "rows": rows, "note": NOTE,
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
    lines += ["", record.get("note", ""), "",
              "ONNX ops per graph (the top level: an `If` holds its branches' ops):", ""]
    lines += [f"- `{r['model']}`: {', '.join(r['ops'])}" for r in record["rows"]]
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
