"""The speed targets, evaluated from the benchmark results themselves.

One row per (target, kind, layout), the worst value over the shapes it concerns: on CPU, float32
inputs larger than the L3 cache ("DRAM-sized"); on CUDA, every shape (forward only).

>>> evaluate_targets([], {"l3_bytes": 2**25})
[]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

FWD_TARGET = 0.9
BWD_TARGET = 0.8
SPEEDUP_TARGETS = {"gem": 25.0, "catavgmax": 2.0}
CPU_DTYPE = "float32"  # the CPU targets concern this dtype only
DIRECTIONS = ("forward", "backward")


def timed(rec: dict[str, Any] | None, direction: str) -> bool:
    """``rec`` (a method's record) passed its check and has timings for ``direction``."""
    return bool(rec) and rec["status"] == "ok" and direction in rec


def method_record(case: dict[str, Any], method_id: str) -> dict[str, Any] | None:
    """The record of ``method_id`` in ``case`` (None if it did not run there)."""
    return next((m for m in case["methods"] if m["id"] == method_id), None)


def _dram_sized(case: dict[str, Any], machine: dict[str, Any]) -> bool:
    l3 = machine.get("l3_bytes") or 32 * 2**20
    return case["input_bytes"] > l3


def evaluate_targets(cases: Sequence[dict[str, Any]], machine: dict[str, Any]) -> list[dict]:
    """The issue's targets, one row per (target, kind, layout): worst value over the shapes.

    CPU: float32 cases whose input exceeds the L3 cache ("DRAM-sized"): fused forward ratio
    >= 0.9, fused backward ratio >= 0.8, fused GeM >= 25x and catavgmax >= 2x the composed op
    (time ratio, forward and backward). CUDA: fused forward ratio >= 0.9 on every shape.
    """
    groups: dict[tuple, list[tuple[float | None, str]]] = {}

    def add(key: tuple, value: float | None, shape: str) -> None:
        groups.setdefault(key, []).append((value, shape))

    for case in cases:
        cpu = case["device"] == "cpu"
        if cpu and not (case["dtype"] == CPU_DTYPE and _dram_sized(case, machine)):
            continue
        kinds = sorted({m["kind"] for m in case["methods"] if m["family"] == "fused"})
        for kind in kinds:
            fused = method_record(case, f"fused:{kind}")
            directions = DIRECTIONS if cpu else ("forward",)
            for d in directions:
                threshold = FWD_TARGET if d == "forward" else BWD_TARGET
                value = fused[d]["ratio"] if timed(fused, d) else None
                add(
                    (case["device"], f"{d} ratio to ceiling", kind, case["layout"], threshold),
                    value,
                    case["shape_name"],
                )
            if cpu and kind in SPEEDUP_TARGETS:
                composed = method_record(case, f"torch:{kind}")
                for d in DIRECTIONS:
                    value = None
                    if timed(fused, d) and timed(composed, d):
                        value = composed[d]["median_s"] / fused[d]["median_s"]
                    add(
                        (
                            "cpu",
                            f"{d} speedup over composed",
                            kind,
                            case["layout"],
                            SPEEDUP_TARGETS[kind],
                        ),
                        value,
                        case["shape_name"],
                    )
    rows = []
    for (device, target, kind, layout, threshold), values in groups.items():
        known = [(v, s) for v, s in values if v is not None]
        missing = [s for v, s in values if v is None]
        worst = min(known) if known else (None, None)
        met = not missing and worst[0] is not None and worst[0] >= threshold
        rows.append(
            {
                "device": device,
                "target": target,
                "kind": kind,
                "layout": layout,
                "threshold": threshold,
                "worst": worst[0],
                "worst_shape": worst[1],
                "shapes": [s for _, s in values],
                "not_measured": missing,
                "met": met,
                "shortfall": None if worst[0] is None else max(0.0, threshold - worst[0]),
            }
        )
    return rows
