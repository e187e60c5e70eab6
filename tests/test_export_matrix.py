"""The export matrix: every layer and head through ONNX (run in onnxruntime), ``torch.export``,
``torch.compile`` and ``torch.jit.trace``, with both backends and 1 to 3 spatial dims, each
re-run at new batch and spatial sizes and compared with eager.

The default run takes a subset (see ``export_matrix_cells``); ``GLOBALPOOL_EXPORT_MATRIX=full``
runs every cell (``benchmarks/export_matrix.py`` writes the published table from the same cells).
"""

from __future__ import annotations

import doctest
import importlib
import json
import sys
from pathlib import Path

import pytest

from export_cases import CASES_BY_NAME
from export_matrix_cells import KNOWN_FAILURES, selected_cells
from export_runners import run_cell

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CELLS = selected_cells()


@pytest.mark.parametrize("cell", CELLS, ids=[c.id for c in CELLS])
def test_cell_matches_eager_at_new_sizes(cell):
    reason = KNOWN_FAILURES.get((cell.module, cell.exporter))
    result = run_cell(CASES_BY_NAME[cell.module], cell.exporter, cell.backend, cell.rank,
                      cell.compile_backend or "aot_eager")
    if result.status == "n.a.":
        pytest.skip(result.error)
    if reason is not None and result.status == "fail":
        pytest.xfail(f"{reason} ({result.error})")
    assert result.status == "pass", result.error
    assert result.max_abs_error is not None and result.max_abs_error <= 1e-4


def test_a_wrong_export_fails_its_cell(monkeypatch):
    """The comparison can fail: a module whose export drifts from eager is reported."""
    import export_runners

    real = export_runners._trace

    def drifting(built, rank, cell, tmp):
        run = real(built, rank, cell, tmp)
        return lambda *inputs: run(*inputs) + 1e-3

    monkeypatch.setitem(export_runners._RUN, "trace", drifting)
    result = run_cell(CASES_BY_NAME["GlobalPool[avg]"], "trace", "auto", 2)
    assert result.status == "fail" and "AssertionError" in result.error


def test_a_globalpool_op_fails_its_cell(monkeypatch):
    """A deployed graph holding a globalpool op is reported (here: the kernel called directly)."""
    import torch

    from globalpool import kernels

    class Direct(torch.nn.Module):
        def forward(self, x, mask):
            return kernels.fused_pool(x, "max", mask=mask)

    case = CASES_BY_NAME["GlobalPool[max]"]
    built = case.build("auto", 2)
    built.module = Direct()
    monkeypatch.setattr(type(case), "build", lambda self, backend, rank: built)
    result = run_cell(case, "export", "fused", 2)
    assert result.status == "fail" and "globalpool" in result.error


ROOT = Path(__file__).resolve().parents[1]


def test_published_page_is_rendered_from_the_record():
    """docs/export.md is the rendering of the committed matrix record, never edited by hand."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from export_matrix_doc import render

    record = json.loads((ROOT / "benchmarks/results/export/matrix.json").read_text())
    assert record["matrix"] == "full"
    assert (ROOT / "docs/export.md").read_text() == render(record)


@pytest.mark.parametrize("name", ["export_cases", "export_matrix_cells", "export_runners"])
def test_helper_examples_run(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted and not result.failed


def test_a_rerun_of_some_exporters_replaces_only_their_cells(monkeypatch):
    """``export_matrix.py --exporters trace`` runs every module's trace cells again and keeps the
    others as measured; the page says which cells were run later."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import export_matrix
    from export_matrix_doc import render

    record = json.loads((ROOT / "benchmarks/results/export/matrix.json").read_text())
    before = {export_matrix._key(c): c for c in record["cells"]}

    def fake_run(quick, cells):
        fresh = [dict(before[(c.module, c.exporter, c.backend, c.rank, None)], seconds=-1.0)
                 for c in cells]
        return {"matrix": "full", "machine": {"cpu": "test CPU", "cores": 2}, "versions": {},
                "onnx_opset": [], "load_average_start": [0.0] * 3,
                "load_average_end": [0.0] * 3, "wall_s": 1.0, "cells": fresh}

    monkeypatch.setattr(export_matrix, "run", fake_run)
    updated = export_matrix.rerun_modules(json.loads(json.dumps(record)), None, ["trace"])
    rerun = [c for c in updated["cells"] if c["seconds"] == -1.0]
    assert rerun and {c["exporter"] for c in rerun} == {"trace"}
    assert len(rerun) == sum(c["exporter"] == "trace" for c in record["cells"])
    assert len(updated["cells"]) == len(record["cells"])
    assert f"The {len(rerun)} `trace` cells of every module were run later" in render(updated)
