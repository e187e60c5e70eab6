"""Run the whole export matrix and publish it: ``benchmarks/results/export/matrix.json`` and
``docs/export.md``.

    PYTHONPATH=src:tests python benchmarks/export_matrix.py            # full matrix, then the doc
    PYTHONPATH=src:tests python benchmarks/export_matrix.py --doc-only # the doc from the JSON
    PYTHONPATH=src:tests python benchmarks/export_matrix.py --quick    # the test suite's subset
    PYTHONPATH=src:tests python benchmarks/export_matrix.py --modules SimPool CLIPAttentionPool
                                     # those modules' cells again, merged into the full record
    PYTHONPATH=src:tests python benchmarks/export_matrix.py --exporters onnx export
                                     # every module's cells of those exporters again, merged

The cells are the test suite's (``tests/export_matrix_cells.py``); each records pass / fail /
n.a., the largest absolute difference from eager at the new sizes, the first line of its error,
and for ``torch.compile`` the compiler backend it used. The JSON keeps the machine, the versions,
the ONNX opset and the load average before and after (other jobs inflate the times).

>>> _versions()["torch"].split(".")[0]
'2'
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "benchmarks")]

JSON_PATH = ROOT / "benchmarks" / "results" / "export" / "matrix.json"
DOC_PATH = ROOT / "docs" / "export.md"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "onnx", "onnxruntime", "onnxscript", "numba"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _machine() -> dict[str, object]:
    from globalpool.lab.bench.report import cpu_name, machine_info

    info = machine_info()
    cpu = cpu_name(info)
    return {"cpu": cpu, "cores": info["logical_cores"], "system": platform.system()}


def run(quick: bool, cells: list | None = None) -> dict[str, object]:
    """Run the cells (the default subset, the full matrix, or those given) and return the
    matrix record."""
    from export_cases import CASES_BY_NAME
    from export_matrix_cells import default_cells, full_cells
    from export_runners import run_cell

    logging.getLogger("torch").setLevel(logging.ERROR)
    if cells is None:
        cells = default_cells() if quick else full_cells()
    load_start, start = os.getloadavg(), time.perf_counter()
    results = []
    for i, c in enumerate(cells):
        cell = run_cell(CASES_BY_NAME[c.module], c.exporter, c.backend, c.rank,
                        c.compile_backend or "aot_eager")
        results.append(cell.as_dict())
        print(f"[{i + 1}/{len(cells)}] {c.id}: {cell.status} {cell.error or ''}", flush=True)
    opsets = sorted({r["opset"] for r in results if r["opset"] is not None})
    return {
        "matrix": "default subset" if quick else "full",
        "machine": _machine(),
        "versions": _versions(),
        "onnx_opset": opsets,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "wall_s": round(time.perf_counter() - start, 1),
        "cells": results,
    }


def _key(cell: dict) -> tuple:
    return (cell["module"], cell["exporter"], cell["backend"], cell["rank"],
            cell["compile_backend"] if cell["exporter"] == "compile" else None)


def rerun_modules(
    record: dict, modules: list[str] | None, exporters: list[str] | None = None
) -> dict:
    """``record`` (a full matrix) with the cells of ``modules`` (every module if None) and
    ``exporters`` (every exporter if None) run again (new modules' cells added, in the matrix's
    order); the update is listed under ``updates`` with its machine, load and time, the rest of
    the record kept as it was measured."""
    from export_cases import CASES_BY_NAME
    from export_matrix_cells import full_cells
    from export_runners import EXPORTERS

    unknown = sorted(set(modules or ()) - set(CASES_BY_NAME))
    if unknown:
        raise SystemExit(f"unknown module(s) {unknown}; known: {sorted(CASES_BY_NAME)}")
    unknown = sorted(set(exporters or ()) - set(EXPORTERS))
    if unknown:
        raise SystemExit(f"unknown exporter(s) {unknown}; known: {list(EXPORTERS)}")
    if record.get("matrix") != "full":
        raise SystemExit("--modules updates a full matrix record; run the full matrix first")
    record.setdefault("run_cells", len(record["cells"]))  # the full run's, before any update
    partial = run_only(modules, exporters)
    fresh = {_key(c): c for c in partial.pop("cells")}
    old = {_key(c): c for c in record["cells"]}
    order = [(c.module, c.exporter, c.backend, c.rank, c.compile_backend) for c in full_cells()]
    record["cells"] = [fresh.get(k) or old[k] for k in order if k in fresh or k in old]
    partial.pop("matrix")
    partial.pop("onnx_opset")
    update = {"modules": modules or "all", "cells": len(fresh), **partial}
    if exporters:
        update["exporters"] = exporters
    record.setdefault("updates", []).append(update)
    record["onnx_opset"] = sorted({c["opset"] for c in record["cells"] if c["opset"] is not None})
    return record


def run_only(modules: list[str] | None, exporters: list[str] | None = None) -> dict[str, object]:
    """The full matrix's cells of ``modules`` and ``exporters`` only (None: all), as :func:`run`
    records them."""
    from export_matrix_cells import full_cells

    wanted = [c for c in full_cells() if (modules is None or c.module in modules)
              and (exporters is None or c.exporter in exporters)]
    return run(False, wanted)


def _explain_failures(record: dict) -> None:
    """Attach the current explanation of each known failure to its failing cells."""
    from export_matrix_cells import KNOWN_FAILURES

    for cell in record["cells"]:
        if cell["status"] == "fail":
            cell["known_reason"] = KNOWN_FAILURES.get((cell["module"], cell["exporter"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc-only", action="store_true", help="render the doc from the JSON")
    parser.add_argument("--quick", action="store_true", help="the default subset only")
    parser.add_argument("--modules", nargs="+", metavar="MODULE",
                        help="run these modules' cells again and merge them into the record")
    parser.add_argument("--exporters", nargs="+", metavar="EXPORTER",
                        help="run these exporters' cells again (of --modules, else of every "
                             "module) and merge them into the record")
    parser.add_argument("--json", type=Path, default=JSON_PATH)
    parser.add_argument("--doc", type=Path, default=DOC_PATH)
    args = parser.parse_args(argv)
    from export_matrix_doc import render

    if args.modules or args.exporters:
        record = rerun_modules(json.loads(args.json.read_text()), args.modules, args.exporters)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    elif not args.doc_only:
        record = run(args.quick)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    record = json.loads(args.json.read_text())
    _explain_failures(record)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    args.doc.write_text(render(record))
    print(f"wrote {args.json} and {args.doc}")


if __name__ == "__main__":
    main()
