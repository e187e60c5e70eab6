"""Render ``docs/export.md`` from the export matrix record (``benchmarks/export_matrix.py``).

>>> text = render({"matrix": "full", "machine": {"cpu": "x", "cores": 2}, "versions": {},
...                "onnx_opset": [18], "load_average_start": [0, 0, 0], "wall_s": 1.0,
...                "cells": []})
>>> "opset 18" in text
True
"""

from __future__ import annotations

import statistics
from collections import defaultdict

EXPORTER_TITLES = {
    "onnx": "ONNX",
    "export": "torch.export",
    "compile": "torch.compile",
    "trace": "torch.jit.trace",
}

EXAMPLE = '''```python
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
import globalpool as gp

head = gp.ClassifierHead(16, 10, pool="gem", backend="fused").eval()
x, mask = torch.randn(2, 16, 7, 5), torch.ones(2, 7, 5, dtype=torch.bool)
n, h, w = (torch.export.Dim(name, min=2, max=1024) for name in ("N", "H", "W"))
dims = ({0: n, 2: h, 3: w}, {0: n, 1: h, 2: w})         # x (N, C, H, W), mask (N, H, W)

program = torch.export.export(head, (x, mask), dynamic_shapes=dims)
assert not [t for t in map(str, (n.target for n in program.graph.nodes)) if "globalpool" in t]

with tempfile.TemporaryDirectory() as tmp:
    path = str(Path(tmp) / "head.onnx")
    torch.onnx.export(head, (x, mask), path, dynamo=True, input_names=["x", "mask"],
                      dynamic_shapes=dims)
    assert {node.domain for node in onnx.load(path).graph.node} <= {"", "ai.onnx"}
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x2 = torch.randn(3, 16, 10, 9)                      # another batch and spatial size
    mask2 = torch.rand(3, 10, 9) < 0.8                  # padded positions are False
    (logits,) = session.run(None, {"x": x2.numpy(), "mask": mask2.numpy()})
with torch.no_grad():
    torch.testing.assert_close(torch.from_numpy(logits), head(x2, mask2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(program.module()(x2, mask2), head(x2, mask2))
```'''


def _ranks(cells: list[dict]) -> str:
    by_rank = {c["rank"]: c["status"] for c in cells}
    statuses = set(by_rank.values())
    if statuses == {"pass"}:
        return "pass"
    if statuses == {"n.a."}:
        return "n.a."
    mark = {"pass": "✓", "fail": "**✗**", "n.a.": "n.a."}
    return " ".join(f"{r}d {mark[by_rank[r]]}" for r in sorted(by_rank))


def _matrix_table(cells: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    modules: list[str] = []
    for c in cells:
        if c["exporter"] == "compile" and c["compile_backend"] != "aot_eager":
            continue
        groups[(c["module"], c["exporter"], c["backend"])].append(c)
        if c["module"] not in modules:
            modules.append(c["module"])
    columns = [(e, b) for e in EXPORTER_TITLES for b in ("auto", "fused")]
    head = "| module | " + " | ".join(f"{EXPORTER_TITLES[e]} {b}" for e, b in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for m in modules:
        row = [_ranks(groups[(m, e, b)]) if groups.get((m, e, b)) else "–" for e, b in columns]
        lines.append(f"| `{m}` | " + " | ".join(row) + " |")
    return lines


def _inductor_table(cells: list[dict]) -> list[str]:
    ind = [c for c in cells if c["exporter"] == "compile" and c["compile_backend"] == "inductor"]
    if not ind:
        return ["No cell ran with inductor in this run."]
    lines = ["| module | backend | spatial dims | result | seconds |", "|---|---|---|---|---|"]
    for c in ind:
        result = c["status"] if c["status"] != "fail" else f"fail: {c['error']}"
        lines.append(f"| `{c['module']}` | {c['backend']} | {c['rank']} | {result} | "
                     f"{c['seconds']:.0f} |")
    return lines


def _failures(cells: list[dict]) -> list[str]:
    failed: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        if c["status"] == "fail":
            tool = EXPORTER_TITLES[c["exporter"]]
            if c["exporter"] == "compile":
                tool += f" ({c['compile_backend']})"
            failed[(c["module"], tool, c.get("known_reason"), c["error"])].append(c)
    if not failed:
        return ["No cell fails."]
    lines = ["| module | exporter | backend, spatial dims | why | error (first line) |",
             "|---|---|---|---|---|"]
    for (module, tool, reason, error), group in failed.items():
        where = ", ".join(f"{c['backend']} {c['rank']}d" for c in group)
        error = error.replace("|", "\\|")
        lines.append(f"| `{module}` | {tool} | {where} | {reason or 'not known'} | `{error}` |")
    return lines


def _accuracy(cells: list[dict]) -> list[str]:
    lines = ["| exporter | cells passed | failed | n.a. | largest abs. difference from eager |"
             " median seconds per cell |", "|---|---|---|---|---|---|"]
    for e, title in EXPORTER_TITLES.items():
        mine = [c for c in cells if c["exporter"] == e]
        done = [c for c in mine if c["status"] == "pass"]
        worst = max((c["max_abs_error"] for c in done), default=0.0)
        secs = [c["seconds"] for c in mine if c["status"] != "n.a."]
        median = f"{statistics.median(secs):.2f}" if secs else "–"
        counts = [sum(c["status"] == s for c in mine) for s in ("pass", "fail", "n.a.")]
        lines.append(f"| {title} | {counts[0]} | {counts[1]} | {counts[2]} | {worst:.1e} | "
                     f"{median} |")
    return lines


def _adaptive_note(cells: list[dict]) -> str:
    mine = [c for c in cells if c["family"] == "AdaptivePool"]
    missing = sorted({c["module"] for c in mine if (c["error"] or "").startswith("not built")})
    unmasked = any("no mask" in n for c in mine for n in c["notes"])
    note = ("- `AdaptivePool` pools to a size that does not divide the input (3 / 3×2 / 3×2×2) "
            "and takes no `backend` (its fused cells are n.a.)")
    if missing:
        names = ", ".join(f"`{m.split('[')[1][:-1]}`" for m in missing)
        note += f"; it does not take the kinds {names} (n.a.)"
    if unmasked:
        note += "; it takes no mask, so it is exported without one"
    return note + "."


def _updates(record: dict) -> str:
    """A sentence per later run of some modules' or exporters' cells (``export_matrix.py
    --modules / --exporters``)."""
    out = []
    for u in record.get("updates", []):
        names = ("every module" if u["modules"] == "all"
                 else ", ".join(f"`{m}`" for m in u["modules"]))
        kinds = ""
        if u.get("exporters"):
            kinds = " and ".join(", ".join(f"`{e}`" for e in u["exporters"]).rsplit(", ", 1)) + " "
        out.append(
            f" The {u['cells']} {kinds}cells of {names} were run later (added to the matrix, or "
            f"run again), on {u['machine']['cpu']} ({u['machine']['cores']} cores), in "
            f"{u['wall_s']:.0f} s (load average {u['load_average_start'][0]:.1f} at the start)."
        )
    return "".join(out)


def render(record: dict) -> str:
    """The Markdown page for ``record``."""
    cells = record["cells"]
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    opsets = ", ".join(str(o) for o in record["onnx_opset"]) or "–"
    machine = record["machine"]
    load = record["load_average_start"][0]
    parts = [
        "# Exporting models",
        "",
        "Every layer and head of globalpool exports with `torch.export` and the ONNX exporter, "
        "traces with `torch.jit.trace` and compiles with `torch.compile(fullgraph=True)`, with "
        "dynamic batch and spatial sizes and an optional padding mask. Whatever `backend` a "
        "module was built with, an exported or traced graph holds standard torch/ONNX operators "
        "only: the fused kernels are an optimisation of the same function, used in eager mode "
        "and under `torch.compile`, and a deployed model never needs globalpool installed.",
        "",
        "## Export a head with dynamic shapes",
        "",
        "Give each dynamic dim one `torch.export.Dim` and use the same one wherever the size "
        "must match (here the mask's dims follow x's):",
        "",
        EXAMPLE,
        "",
        "`torch.jit.trace(head, (x, mask))` records the same standard operators and re-runs at "
        "other sizes. `torch.jit.script` is not applicable: the layers take keyword-only "
        "arguments and keyword parameters (`**params`, e.g. `p=` or `weights=`) and check "
        "their arguments in plain Python, which TorchScript cannot compile; use "
        "`torch.jit.trace`, `torch.export` or ONNX instead.",
        "",
        "Under `torch.export` and the ONNX exporter, `gem` and `lse` pool without their range "
        "guard (gem's division by each row's maximum, lse's shift by it), which saves two of "
        "their passes over the input, and keep the guarded computation behind one `torch.cond` "
        "(an ONNX `If`) that runs only when a pooled row leaves the range where the unguarded "
        "result is exact to float32 rounding (a mean of powers or exponentials outside "
        "[2^-100, float32's largest value]: tiny inputs with a large p, overflowing ones). "
        "Either branch gives eager's values. `torch.jit.trace` and the TorchScript-based ONNX "
        "exporter record the guarded computation alone.",
        "",
        "## What the matrix tests",
        "",
        "Each cell builds a module for 1, 2 or 3 spatial dims (4 channels, batch 2, spatial "
        "size 7 / 7×5 / 5×5×3), exports or compiles it with dynamic batch and spatial dims, "
        "then runs it at two other sizes, one of them with batch 1 (10 and 13; 10×9 and 6×11; "
        "6×7×5 and 4×9×5), and compares with the eager module. A module that takes a mask gets "
        "a random one, in which the last sample of a batch of 3 is all padding. A cell passes "
        "when every output is within `rtol=1e-4, atol=1e-5` of eager.",
        "",
        "- **ONNX**: `torch.onnx.export(..., dynamo=True, dynamic_shapes=...)`, run in "
        f"onnxruntime (CPUExecutionProvider); opset {opsets}, read from the exported models. "
        "The model must hold no globalpool operator. The TorchScript-based exporter "
        "(`dynamo=False`, `dynamic_axes=`) records standard operators too (tested on "
        "`GlobalPool(\"gem\")`, not in the matrix).",
        "- **torch.export**: `torch.export.export` with `Dim` dynamic shapes, run through "
        "`program.module()`; no globalpool operator in the graph.",
        "- **torch.compile**: `fullgraph=True, dynamic=True`, with the `aot_eager` backend in "
        "every cell of the main table; the `inductor` backend, which compiles C++ (about 30 s a "
        "cell with an empty compile cache on this machine, the times below with a filled one), "
        "in the cells listed below it. Under `torch.compile` a `fused` module keeps the fused "
        "kernel, as one custom operator.",
        "- **torch.jit.trace**: traced once, re-run at the new sizes; no globalpool operator.",
        "- **auto** and **fused** are the `backend` argument. Eager `fused` runs the fused kernel, "
        "so these cells also compare the exported composition with the kernel.",
        "",
        "Module notes:",
        "",
        "- `GlobalPool[attention]` takes its weights `(N, *S)` as a third input (a thin wrapper "
        "passes them as `weights=`); `AttentionPool` learns them.",
        _adaptive_note(cells),
        "- `ClassifierHead[kind]` is `ClassifierHead(4, 3, pool=kind)`; `NiNHead(4, 3)`.",
        "- `FlattenFCHead` only accepts the spatial size it was built for: it is exported with a "
        "static spatial size and a dynamic batch, and checked at other batch sizes; it does no "
        "pooling, so it takes no `backend` (fused cells n.a.).",
        "- `MultiScaleNet[catavgmax]` is `MultiScaleNet(\"catavgmax\", 3, in_channels=4, "
        "width=4, stages=2)`; its dynamic spatial dims start at 3 (`Dim(min=3)`): with 2, a "
        "stride-2 stage would reach size 1, which `torch.export` specialises.",
        "- `swap_pool(CNN, catavgmax)`: a small convolution + `AdaptiveAvgPool(1)` + `Linear` "
        "model after `gp.swap_pool(net, \"catavgmax\", classifier=...)`.",
        "- The query-based attention pools take no `backend` (fused cells n.a.): "
        "`LatentAttentionPool(4, num_heads=2)`, `SimPool(4, num_heads=2, gamma=2.0)` and "
        "`CLIPAttentionPool(4, table, num_heads=2, interpolate=True)` with a positional table "
        "of 5 / 4×4 / 3×3×3, a size no input has, so every export records its resizing; "
        "`ClassifierHead[map]`, `[simpool]` and `[clip]` are `ClassifierHead(4, 3, pool=..., "
        "num_heads=2)` with those pools' defaults (the same table for `clip`).",
        "",
        "## The matrix",
        "",
        "\"pass\": every spatial rank (1d, 2d, 3d) passed; otherwise per rank. \"–\": not run.",
        "",
        *_matrix_table(cells),
        "",
        "`torch.compile` with the inductor backend:",
        "",
        *_inductor_table(cells),
        "",
        "## Cells that fail, and why",
        "",
        *_failures(cells),
        "",
        "## Accuracy and cost",
        "",
        *_accuracy(cells),
        "",
        f"Measured on {machine['cpu']} ({machine['cores']} cores), {versions}; the "
        f"{record.get('run_cells', len(cells))} cells of the full run took "
        f"{record['wall_s']:.0f} s (load average {load:.1f} at "
        f"the start, shared with other work).{_updates(record)} Raw record: "
        "[benchmarks/results/export/matrix.json](../benchmarks/results/export/matrix.json). "
        "Speed of exported heads in onnxruntime against eager torch: "
        "[benchmarks/results/export/speed.md](../benchmarks/results/export/speed.md).",
        "",
    ]
    return "\n".join(parts)
