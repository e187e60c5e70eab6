"""Which cells of the export matrix run: all of them (``GLOBALPOOL_EXPORT_MATRIX=full``) or the
default subset that fits the test suite's budget (private test helper).

The default subset: every module at rank 2 with ``torch.export`` and ``torch.jit.trace``; one
module per family (:data:`REPRESENTATIVE`) with ONNX, ``torch.compile`` and one of the other two,
each at another rank (rotating, so every exporter meets every rank); the fused backend for every
family that takes one (``torch.export`` or ``torch.jit.trace``), and for one head
(:data:`FUSED_HEAD`) with every exporter; and the cells of :data:`WATCHED`. ``torch.compile``
uses the ``aot_eager`` backend; the full matrix adds ``inductor`` (:data:`INDUCTOR`) for the
representatives at rank 2.

>>> len(default_cells()) < len(full_cells())
True
"""

from __future__ import annotations

import os
from typing import NamedTuple

from export_cases import BACKENDS, CASES, CASES_BY_NAME, FAMILIES, RANKS

EXPORTERS = ("onnx", "export", "compile", "trace")
INDUCTOR = "inductor"
REPRESENTATIVE = {
    "GlobalPool": "GlobalPool[attention]",
    "GeM": "GeM",
    "AttentionPool": "AttentionPool",
    "AdaptivePool": "AdaptivePool[max]",
    "ClassifierHead": "ClassifierHead[catavgmax]",
    "NiNHead": "NiNHead",
    "FlattenFCHead": "FlattenFCHead",
    "MultiScaleNet": "MultiScaleNet[catavgmax]",
    "swap_pool": "swap_pool(CNN, catavgmax)",
    "query attention pools": "CLIPAttentionPool",
}
FUSED_HEAD = "ClassifierHead[lse]"
# cells the rotation above leaves out that once failed in the full matrix alone: adaptive
# pooling that gathers bin windows, exported with one dynamic spatial dim; a learned GeM p (its
# power picked in the graph) exported to ONNX with one spatial dim
WATCHED = (("AdaptivePool[max]", "export", 1), ("GeM", "onnx", 1))
assert set(REPRESENTATIVE) == set(FAMILIES)

# (module, exporter) -> why its cells fail, for failures outside globalpool's pooling
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


class CellId(NamedTuple):
    module: str
    exporter: str
    backend: str
    rank: int
    compile_backend: str | None = None

    @property
    def id(self) -> str:
        tool = self.exporter if self.compile_backend in (None, "aot_eager") else (
            f"{self.exporter}-{self.compile_backend}"
        )
        return f"{self.module}-{tool}-{self.backend}-r{self.rank}"


def _cell(module: str, exporter: str, backend: str, rank: int, inductor: bool = False) -> CellId:
    compile_backend = None
    if exporter == "compile":
        compile_backend = INDUCTOR if inductor else "aot_eager"
    return CellId(module, exporter, backend, rank, compile_backend)


def full_cells() -> list[CellId]:
    """Every module x exporter x backend x rank, plus the inductor cells."""
    cells = [_cell(c.name, e, b, r) for c in CASES for e in EXPORTERS for b in BACKENDS
             for r in RANKS]
    cells += [_cell(m, "compile", b, 2, inductor=True) for m in REPRESENTATIVE.values()
              for b in BACKENDS]
    return cells


def default_cells() -> list[CellId]:
    cells = [_cell(c.name, e, "auto", 2) for c in CASES for e in ("export", "trace")]
    for i, family in enumerate(FAMILIES):
        rep = CASES_BY_NAME[REPRESENTATIVE[family]]
        cells += [_cell(rep.name, "onnx", "auto", RANKS[i % 3]),
                  _cell(rep.name, "compile", "auto", RANKS[(i + 1) % 3]),
                  _cell(rep.name, ("export", "trace")[i % 2], "auto", RANKS[(i + 2) % 3])]
        if "fused" in rep.backends:
            cells.append(_cell(rep.name, ("trace", "export")[i % 2], "fused", RANKS[i % 3]))
    cells += [_cell(FUSED_HEAD, e, "fused", 2) for e in EXPORTERS]
    cells += [_cell(m, e, "auto", r) for m, e, r in WATCHED]
    return list(dict.fromkeys(cells))


def selected_cells() -> list[CellId]:
    """The full matrix when ``GLOBALPOOL_EXPORT_MATRIX=full``, else the default subset."""
    full = os.environ.get("GLOBALPOOL_EXPORT_MATRIX", "").lower() == "full"
    return full_cells() if full else default_cells()
