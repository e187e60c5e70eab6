"""Run one export-matrix cell: export or trace a case, re-run it at new sizes, compare to eager.

Exporters: ``onnx`` (``torch.onnx.export(dynamo=True, dynamic_shapes=...)``, run in onnxruntime),
``export`` (``torch.export.export`` with ``Dim`` dynamic shapes), ``compile``
(``torch.compile(fullgraph=True, dynamic=True)``) and ``trace`` (``torch.jit.trace``). Every
graph that leaves the process (onnx, export, trace) must hold no ``globalpool`` op.

>>> from export_cases import CASES_BY_NAME
>>> cell = run_cell(CASES_BY_NAME["GlobalPool[max]"], "trace", "fused", 1)
>>> cell.status, cell.max_abs_error == 0.0
('pass', True)
"""

from __future__ import annotations

import re
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from export_cases import EXPORT_BATCH, EXPORT_SIZE, Built, Case, NotBuiltError, new_sizes

EXPORTERS = ("onnx", "export", "compile", "trace")
RTOL, ATOL = 1e-4, 1e-5


@dataclass
class Cell:
    """The outcome of one cell; ``status`` is ``pass``, ``fail`` or ``n.a.``."""

    module: str
    family: str
    exporter: str
    backend: str
    rank: int
    status: str = "pass"
    max_abs_error: float | None = None
    error: str | None = None
    compile_backend: str | None = None
    opset: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ForeignOpError(AssertionError):
    """An exported or traced graph holds a globalpool op."""


def _eager(module: torch.nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return module(*inputs)


def _onnx(built: Built, rank: int, cell: Cell, tmp: Path):
    import onnx
    import onnxruntime as ort

    path = tmp / "model.onnx"
    args = tuple(built.inputs(EXPORT_BATCH, EXPORT_SIZE[rank]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(built.module, args, str(path), dynamo=True, input_names=list(built.names),
                          dynamic_shapes=built.dynamic_shapes(rank), verbose=False)
    model = onnx.load(str(path))
    cell.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    nodes = [*model.graph.node, *(n for f in model.functions for n in f.node)]
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in nodes
                      if "globalpool" in f"{n.domain}.{n.op_type}".lower()})
    if foreign:
        raise ForeignOpError(f"the ONNX model holds {foreign}")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = [i.name for i in session.get_inputs()]

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        feed = {n: t.numpy() for n, t in zip(built.names, inputs, strict=True) if n in wanted}
        return torch.from_numpy(session.run(None, feed)[0])

    return run


def _export(built: Built, rank: int, cell: Cell, tmp: Path):
    args = tuple(built.inputs(EXPORT_BATCH, EXPORT_SIZE[rank]))
    program = torch.export.export(built.module, args, dynamic_shapes=built.dynamic_shapes(rank))
    foreign = sorted({str(n.target) for n in program.graph.nodes
                      if n.op == "call_function" and "globalpool" in str(n.target)})
    if foreign:
        raise ForeignOpError(f"the exported program holds {foreign}")
    module = program.module()
    return lambda *inputs: module(*inputs)


def _compile(built: Built, rank: int, cell: Cell, tmp: Path):
    torch._dynamo.reset()  # one code object serves many cells: no stale cache, no recompile limit
    compiled = torch.compile(built.module, fullgraph=True, dynamic=True,
                             backend=cell.compile_backend)
    with torch.no_grad():
        compiled(*built.inputs(EXPORT_BATCH, EXPORT_SIZE[rank]))
    return lambda *inputs: compiled(*inputs)


def _trace(built: Built, rank: int, cell: Cell, tmp: Path):
    args = tuple(built.inputs(EXPORT_BATCH, EXPORT_SIZE[rank]))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(built.module, args, check_trace=False)
    graph = str(traced.inlined_graph)
    if "globalpool::" in graph:
        raise ForeignOpError("the traced graph calls a globalpool:: op")
    return lambda *inputs: traced(*inputs)


def first_line(err: BaseException) -> str:
    """The error's type and first line; for the ONNX exporter, the first cause it lists.

    >>> first_line(ValueError("bad\\nmore"))
    'ValueError: bad'
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    causes = re.findall(r"^<class '(?:[\w.]*\.)?(\w+)'>: (.*)$", text, flags=re.MULTILINE)
    if causes:
        name, line = causes[0]
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        name, line = type(err).__name__, lines[0] if lines else ""
    return f"{name}: {line}"[:300]


_RUN = {"onnx": _onnx, "export": _export, "compile": _compile, "trace": _trace}


def run_cell(
    case: Case, exporter: str, backend: str, rank: int, compile_backend: str = "aot_eager"
) -> Cell:
    """Export ``case`` with ``exporter`` and compare it to eager at new sizes (never raises)."""
    cell = Cell(case.name, case.family, exporter, backend, rank)
    if exporter == "compile":
        cell.compile_backend = compile_backend
    start = time.perf_counter()
    try:
        built = case.build(backend, rank)
    except NotBuiltError as err:
        cell.status, cell.error = "n.a.", str(err)
        return cell
    cell.notes = list(built.notes)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run = _RUN[exporter](built, rank, cell, Path(tmp))
            worst = 0.0
            for seed, (n, spatial) in enumerate(new_sizes(built, rank)):
                inputs = built.inputs(n, spatial, seed=seed + 1)
                want = _eager(built.module, inputs)
                with torch.no_grad():
                    got = run(*inputs)
                if got.shape != want.shape:
                    raise AssertionError(f"shape {tuple(got.shape)} != eager {tuple(want.shape)}")
                worst = max(worst, float((got - want).abs().max()))
                torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
            cell.max_abs_error = worst
    except Exception as err:  # noqa: BLE001 - a cell records its failure
        cell.status, cell.error = "fail", first_line(err)
        if cell.max_abs_error is None and "worst" in locals():
            cell.max_abs_error = worst or None
    cell.seconds = round(time.perf_counter() - start, 3)
    return cell
