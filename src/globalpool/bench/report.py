"""Write benchmark results: JSON (everything), Markdown (tables and targets), PNG (ratio bars).

Ratios are ``ceiling time / method time`` on the same tensor in the same run (forward ceiling
``x.sum()``, backward ceiling ``torch.empty_like(x).fill_(1.0)``), so 1.0 means "as fast as one
read (write) of the input". The issue's targets are evaluated from the results themselves.

>>> info = machine_info()
>>> sorted(k for k in info if k in ("cpu_model", "torch", "logical_cores"))
['cpu_model', 'logical_cores', 'torch']
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from globalpool.bench.cache import cache_bytes

FWD_TARGET = 0.9
BWD_TARGET = 0.8
SPEEDUP_TARGETS = {"gem": 25.0, "catavgmax": 2.0}
DIRECTIONS = ("forward", "backward")


# ------------------------------------------------------------------------------------------
# machine


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "cpu family", "model", "flags", "cpu MHz") and key not in out:
            out[key] = value.strip()
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, caches, library versions and GPU (if any) of this machine."""
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    info: dict[str, Any] = {
        "cpu_model": cpu.get("model name", platform.processor() or "unknown"),
        "cpu_family": cpu.get("cpu family"),
        "cpu_model_number": cpu.get("model"),
        "cpu_mhz": cpu.get("cpu MHz"),
        "simd": simd,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "l2_bytes": cache_bytes(2),
        "l3_bytes": cache_bytes(3),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "numba": _version("numba"),
        "triton": _version("triton"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    name = f"{info['cpu_model']}"
    if info["cpu_family"]:
        name += f" (family {info['cpu_family']} model {info['cpu_model_number']})"
    name += f", {info['logical_cores']} cores"
    if info["l3_bytes"]:
        name += f", L3 {info['l3_bytes'] // 2**20} MiB"
    if info["gpu"]:
        name += f"; GPU {info['gpu']}"
    info["name"] = name
    return info


# ------------------------------------------------------------------------------------------
# targets


def _ok(rec: dict[str, Any] | None, direction: str) -> bool:
    return bool(rec) and rec["status"] == "ok" and direction in rec


def _method(case: dict[str, Any], method_id: str) -> dict[str, Any] | None:
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
        if cpu and not (case["dtype"] == "float32" and _dram_sized(case, machine)):
            continue
        kinds = sorted({m["kind"] for m in case["methods"] if m["family"] == "fused"})
        for kind in kinds:
            fused = _method(case, f"fused:{kind}")
            directions = DIRECTIONS if cpu else ("forward",)
            for d in directions:
                threshold = FWD_TARGET if d == "forward" else BWD_TARGET
                value = fused[d]["ratio"] if _ok(fused, d) else None
                add(
                    (case["device"], f"{d} ratio to ceiling", kind, case["layout"], threshold),
                    value,
                    case["shape_name"],
                )
            if cpu and kind in SPEEDUP_TARGETS:
                composed = _method(case, f"torch:{kind}")
                for d in DIRECTIONS:
                    value = None
                    if _ok(fused, d) and _ok(composed, d):
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


# ------------------------------------------------------------------------------------------
# Markdown


def _load(data: dict[str, Any]) -> str:
    load = data.get("load_average") or {}
    return (
        " / ".join(
            "(" + ", ".join(f"{v:.2f}" for v in load[k]) + ")"
            for k in ("start", "end")
            if k in load
        )
        or "not recorded"
    )


def _fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _cell(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return ""
    if rec["status"] != "ok":
        return rec["status"]
    return f"{_fmt(rec['forward']['ratio'])} / {_fmt(rec['backward']['ratio'])}"


def _groups(cases: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict]]:
    out: dict[tuple[str, str, str], list[dict]] = {}
    for case in cases:
        out.setdefault((case["device"], case["dtype"], case["layout"]), []).append(case)
    return out


def _method_order(cases: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for case in cases:
        for m in case["methods"]:
            seen.setdefault(m["id"], None)
    return list(seen)


def _ratio_tables(cases: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for (device, dtype, layout), group in _groups(cases).items():
        lines += [f"### {device}, {dtype}, {layout}", ""]
        header = "| method | " + " | ".join(
            f"{c['shape_name']} {tuple(c['shape'])} {c['input_bytes'] / 2**20:.0f} MiB"
            for c in group
        )
        lines += [header + " |", "|---" * (len(group) + 1) + "|"]
        ceil_row = "| ceiling GB/s: sum / new fill (write into buf) | " + " | ".join(
            f"{_fmt(c['ceiling']['forward']['gbps'], 1)} / "
            f"{_fmt(c['ceiling']['backward']['gbps'], 1)}"
            + (f" ({_fmt(c['ceiling']['write']['gbps'], 1)})" if "write" in c["ceiling"] else "")
            for c in group
        )
        lines.append(ceil_row + " |")
        for mid in _method_order(group):
            lines.append(f"| {mid} | " + " | ".join(_cell(_method(c, mid)) for c in group) + " |")
        lines.append("")
    return lines


def _speedup_tables(cases: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for (device, dtype, layout), group in _groups(cases).items():
        kinds = sorted({m["kind"] for c in group for m in c["methods"] if m["family"] == "fused"})
        if not kinds:
            continue
        lines += [f"### {device}, {dtype}, {layout}", ""]
        lines.append("| kind | baseline | " + " | ".join(c["shape_name"] for c in group) + " |")
        lines.append("|---" * (len(group) + 2) + "|")
        for kind in kinds:
            for base in ("torch", "compile"):
                cells = []
                for c in group:
                    f, b = _method(c, f"fused:{kind}"), _method(c, f"{base}:{kind}")
                    parts = []
                    for d in DIRECTIONS:
                        ok = _ok(f, d) and _ok(b, d)
                        parts.append(_fmt(b[d]["median_s"] / f[d]["median_s"], 1) if ok else "—")
                    cells.append(" / ".join(parts))
                lines.append(f"| {kind} | {base} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _detail_tables(cases: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for case in cases:
        lines += [
            f"### {case['device']} {case['dtype']} {case['layout']} {case['shape_name']} "
            f"{tuple(case['shape'])}",
            "",
            f"Load average (1 min) at the end of the case: {case.get('load_average_1m', 0):.2f}.",
            "",
            "| method | status | fwd ms | fwd GB/s | fwd ratio | bwd ms | bwd GB/s | bwd ratio "
            "| bwd ratio to write | repeats | first call s | check err fwd / bwd |",
            "|---" * 12 + "|",
        ]
        for d, c in case["ceiling"].items():
            t = f"{c['median_s'] * 1e3:.3f} | {c['gbps']:.1f}"
            cells = {
                "forward": f"{t} | 1 | | | | |",
                "backward": f" | | | {t} | 1 | |",
                "write": f" | | | {t} | | 1 |",
            }[d]
            lines.append(f"| ceiling {d}: `{c['label']}` | ok | {cells} {c['repeats']} | | |")
        for m in case["methods"]:
            cells = [f"`{m['label']}`", m["status"]]
            for d in DIRECTIONS:
                t = m.get(d)
                if isinstance(t, dict):
                    cells += [f"{t['median_s'] * 1e3:.3f}", f"{t['gbps']:.1f}", _fmt(t["ratio"])]
                else:
                    cells += ["", "", ""]
            bwd = m.get("backward")
            cells.append(_fmt(bwd.get("ratio_write")) if isinstance(bwd, dict) else "")
            fwd = m.get("forward")
            cells.append(str(fwd["repeats"]) if isinstance(fwd, dict) else "")
            cells.append(_fmt(m.get("first_call_s"), 2))
            chk = m.get("check") or {}
            cells.append(
                f"{_fmt(chk.get('forward_error'), 7)} / {_fmt(chk.get('backward_error'), 7)}"
                if chk
                else m.get("error", "")[:80]
            )
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _target_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    if not rows:
        return [
            "No case qualifies for the targets in this run "
            "(CPU targets need float32 inputs larger than the L3 cache).",
            "",
        ]
    lines = [
        "| device | target | kind | layout | threshold | worst | at shape | met | short by |",
        "|---" * 9 + "|",
    ]
    for r in sorted(rows, key=lambda r: (r["device"], r["target"], r["kind"], r["layout"])):
        worst = _fmt(r["worst"])
        if r["not_measured"]:
            worst += f" (not measured on {', '.join(r['not_measured'])})"
        lines.append(
            f"| {r['device']} | {r['target']} | {r['kind']} | {r['layout']} | "
            f"{r['threshold']:g} | {worst} | {r['worst_shape'] or ''} | "
            f"{'yes' if r['met'] else '**no**'} | {_fmt(r['shortfall'])} |"
        )
    lines.append("")
    return lines


def markdown(data: dict[str, Any]) -> str:
    """The Markdown report of :func:`globalpool.bench.command.bench` results."""
    m, s, cases = data["machine"], data["settings"], data["cases"]
    problems = [(c, x) for c in cases for x in c["methods"] if x["status"] in ("FAILED", "ERROR")]
    lines = [
        "# globalpool bench",
        "",
        f"Machine: **{m['name']}**; torch {m['torch']}, numba {m['numba']}, numpy {m['numpy']}, "
        f"{m['torch_threads']} torch threads, {m['platform']}.",
        "",
        f"Settings: {json.dumps(s)}. Total wall time {data.get('wall_s', 0):.0f} s; "
        f"load average (1, 5, 15 min) at start / end: {_load(data)}.",
        "",
        "Ratios are *median ceiling time / median method time* on the same tensor, the ceiling "
        "sampled right after each sample of the method (1.0 = as fast as one read of the input "
        "for forward, `x.sum()`; one write of its size for backward, "
        "`torch.empty_like(x).fill_(1.0)`). The ceiling row gives the case's GB/s from separate "
        "runs before and after its methods (the faster). Forward is timed under `no_grad`; "
        "backward times only `torch.autograd.grad` after an untimed forward. Every method was "
        "checked against the NumPy reference first: FAILED = wrong result, ERROR = raised (not "
        "timed). The backward ceiling allocates a new tensor, like a backward that returns a "
        "fresh gradient, so it includes first-touch page faults; `buf.fill_(1.0)` into a buffer "
        "allocated once (the bracketed GB/s and the details' *bwd ratio to write*) is the pure "
        "write bandwidth.",
        "",
        _cache_text(s.get("cache", "warm")),
        "",
        "## Targets",
        "",
        *_target_table(data.get("targets", [])),
        "## Ratio to ceiling, forward / backward",
        "",
        *_ratio_tables(cases),
        "## Fused speedup (time of baseline / time of fused), forward / backward",
        "",
        *_speedup_tables(cases),
    ]
    if problems:
        lines += ["## FAILED and ERROR methods", ""]
        for c, x in problems:
            lines.append(
                f"- {c['device']} {c['dtype']} {c['layout']} {c['shape_name']}: `{x['id']}` "
                f"**{x['status']}**: {x.get('error', '')}"
            )
        lines.append("")
    lines += ["## Details", "", *_detail_tables(cases)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# plot


def _geomean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def plot(data: dict[str, Any], path: Path) -> list[Path]:
    """One PNG per (device, dtype): ratio-to-ceiling bars per kind and family.

    Subplots: rows = layouts, columns = forward / backward. Bar = geometric mean over the shapes
    of the ratio; for the seed family, the best seed method of that kind per shape.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = data["cases"]
    families = ("seed", "torch", "compile", "fused")
    colors = {"seed": "#999999", "torch": "#4c72b0", "compile": "#dd8452", "fused": "#55a868"}
    written = []
    by_dev: dict[tuple[str, str], list[dict]] = {}
    for c in cases:
        by_dev.setdefault((c["device"], c["dtype"]), []).append(c)
    for (device, dtype), group in by_dev.items():
        layouts = sorted({c["layout"] for c in group})
        kinds = list(dict.fromkeys(m["kind"] for c in group for m in c["methods"]))
        fig, axes = plt.subplots(
            len(layouts),
            2,
            figsize=(max(8, 1.6 * len(kinds) + 2) * 1.6, 3.6 * len(layouts)),
            squeeze=False,
        )
        for i, layout in enumerate(layouts):
            lcases = [c for c in group if c["layout"] == layout]
            for j, d in enumerate(DIRECTIONS):
                ax = axes[i][j]
                width = 0.8 / len(families)
                for f_i, fam in enumerate(families):
                    heights = []
                    for kind in kinds:
                        per_shape = []
                        for c in lcases:
                            vals = [
                                m[d]["ratio"]
                                for m in c["methods"]
                                if m["family"] == fam and m["kind"] == kind and _ok(m, d)
                            ]
                            if vals:
                                per_shape.append(max(vals))
                        heights.append(_geomean(per_shape) or 0.0)
                    xs = [k + (f_i - (len(families) - 1) / 2) * width for k in range(len(kinds))]
                    ax.bar(xs, heights, width, label=fam, color=colors[fam])
                ax.axhline(FWD_TARGET if d == "forward" else BWD_TARGET, color="k", ls="--", lw=1)
                ax.axhline(1.0, color="k", lw=0.5)
                ax.set_xticks(range(len(kinds)), kinds)
                ax.set_ylabel("ratio to ceiling")
                ax.set_title(f"{device} {dtype} {layout}: {d}", fontsize=10)
        axes[0][0].legend(fontsize=8, ncols=len(families))
        fig.suptitle(
            f"globalpool bench: ratio to the same-run ceiling (x.sum() forward, fill_ backward), "
            f"geometric mean over shapes\n{data['machine']['name']}",
            fontsize=10,
        )
        fig.tight_layout()
        out = path.with_name(f"{path.stem}_{device}_{dtype}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def _cache_text(cache: str) -> str:
    if cache == "cold":
        return (
            "Cache: **cold** - the caches were flushed (a read of four times the last-level "
            "cache on CPU, a 256 MiB write on CUDA) before every timed sample of every method and "
            "of its paired ceiling, outside the clock, so both stream the input from memory."
        )
    return (
        "Cache: **warm** - each sample found the caches as the previous sample (of the method "
        "or of its paired ceiling) left them; on inputs near the last-level cache size this "
        "favours whichever call happens to reuse the other's lines."
    )


def write_report(data: dict[str, Any], out_dir: Path, stem: str = "bench") -> dict[str, Any]:
    """Write ``{stem}.json``, ``{stem}.md`` and ``{stem}_{device}_{dtype}.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data.setdefault("targets", evaluate_targets(data["cases"], data["machine"]))
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(data, indent=1, default=str))
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown(data))
    pngs = plot(data, out_dir / f"{stem}.png")
    return {"json": json_path, "markdown": md_path, "png": pngs}
