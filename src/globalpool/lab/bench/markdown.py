"""The benchmark's Markdown report: targets, ratio and speedup summaries, per-case details.

Every ratio is traceable to medians printed in the same report: a summary ratio is
*paired ceiling median / method median*, and the details print both medians next to it, each
with its min–max over the samples. The ceiling GB/s rows come from separate ceiling runs
(before and after the methods) and are labelled so; they are not a ratio's denominator.

>>> _ms({"median_s": 7.4e-3, "min_s": 7.1e-3, "max_s": 8.0e-3})
'7.400 (7.100–8.000)'
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from globalpool.lab.bench.targets import DIRECTIONS, method_record, timed


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


def _ms(t: dict[str, Any], prefix: str = "") -> str:
    """``median (min–max)`` in ms of the ``{prefix}median_s`` / ``min_s`` / ``max_s`` of ``t``."""
    med, lo, hi = (t.get(f"{prefix}{k}_s") for k in ("median", "min", "max"))
    if med is None:
        return ""
    spread = f" ({lo * 1e3:.3f}–{hi * 1e3:.3f})" if lo is not None and hi is not None else ""
    return f"{med * 1e3:.3f}{spread}"


def _gbps(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.3g}"


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
        ceil_row = "| (scale) separate ceiling runs, GB/s: sum / new fill (write into buf) | "
        ceil_row += " | ".join(
            f"{_gbps(c['ceiling']['forward']['gbps'])} / "
            f"{_gbps(c['ceiling']['backward']['gbps'])}"
            + (f" ({_gbps(c['ceiling']['write']['gbps'])})" if "write" in c["ceiling"] else "")
            for c in group
        )
        lines.append(ceil_row + " |")
        for mid in _method_order(group):
            cells = " | ".join(_cell(method_record(c, mid)) for c in group)
            lines.append(f"| {mid} | {cells} |")
        lines.append("")
    return lines


def _speedup_tables(cases: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for (device, dtype, layout), group in _groups(cases).items():
        kinds = sorted({m["kind"] for c in group for m in c["methods"] if m["family"] == "fused"})
        ids = set(_method_order(group))
        rows = [(k, b) for k in kinds for b in ("torch", "compile") if f"{b}:{k}" in ids]
        if not rows:
            continue
        lines += [f"### {device}, {dtype}, {layout}", ""]
        lines.append("| kind | baseline | " + " | ".join(c["shape_name"] for c in group) + " |")
        lines.append("|---" * (len(group) + 2) + "|")
        for kind, base in rows:
            cells = []
            for c in group:
                f, b = method_record(c, f"fused:{kind}"), method_record(c, f"{base}:{kind}")
                parts = []
                for d in DIRECTIONS:
                    ok = timed(f, d) and timed(b, d)
                    parts.append(_fmt(b[d]["median_s"] / f[d]["median_s"], 1) if ok else "—")
                cells.append(" / ".join(parts))
            lines.append(f"| {kind} | {base} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _ceiling_table(case: dict[str, Any]) -> list[str]:
    lines = [
        "Separate ceiling runs, before and after the methods (the faster run gives the "
        "summary's GB/s; not a ratio's denominator):",
        "",
        "| ceiling | ms median (min–max) | GB/s | run medians before / after, ms | repeats |",
        "|---" * 5 + "|",
    ]
    for d, c in case["ceiling"].items():
        runs = " / ".join(f"{v * 1e3:.3f}" for v in c.get("runs_median_s", []))
        lines.append(
            f"| {d}: `{c['label']}` | {_ms(c)} | {_gbps(c['gbps'])} | {runs} | {c['repeats']} |"
        )
    return [*lines, ""]


_METHOD_HEADER = (
    "| method | status | fwd ms | paired `x.sum()` ms | fwd ratio | fwd GB/s | bwd ms "
    "| paired `empty_like(x).fill_` ms | bwd ratio | paired `buf.fill_` ms | bwd ratio to write "
    "| repeats | first call s | check err fwd / bwd |"
)


def _method_row(m: dict[str, Any]) -> str:
    cells = [f"`{m['label']}`", m["status"]]
    fwd, bwd = m.get("forward"), m.get("backward")
    if isinstance(fwd, dict):
        cells += [_ms(fwd), _ms(fwd, "ceiling_"), _fmt(fwd["ratio"]), _gbps(fwd["gbps"])]
    else:
        cells += [""] * 4
    if isinstance(bwd, dict):
        cells += [_ms(bwd), _ms(bwd, "ceiling_"), _fmt(bwd["ratio"])]
        cells += [_ms(bwd, "write_"), _fmt(bwd.get("ratio_write"))]
    else:
        cells += [""] * 5
    cells.append(str(fwd["repeats"]) if isinstance(fwd, dict) else "")
    cells.append(_fmt(m.get("first_call_s"), 2))
    chk = m.get("check") or {}
    cells.append(
        f"{_fmt(chk.get('forward_error'), 7)} / {_fmt(chk.get('backward_error'), 7)}"
        if chk
        else m.get("error", "")[:80]
    )
    return "| " + " | ".join(cells) + " |"


def _detail_tables(cases: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for case in cases:
        lines += [
            f"### {case['device']} {case['dtype']} {case['layout']} {case['shape_name']} "
            f"{tuple(case['shape'])}",
            "",
            f"Load average (1 min) at the end of the case: {case.get('load_average_1m', 0):.2f}.",
            "",
            *_ceiling_table(case),
            "Methods: each ratio is the paired ceiling's median over the method's median, both "
            "in the row; times are ms, median (min–max) over the samples.",
            "",
            _METHOD_HEADER,
            "|---" * 14 + "|",
            *(_method_row(m) for m in case["methods"]),
            "",
        ]
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
    """The Markdown report of :func:`globalpool.lab.bench.command.bench` results."""
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
        "`torch.empty_like(x).fill_(1.0)`); the Details print both medians next to each ratio, "
        "with their min–max over the samples. The *separate ceiling runs* (before and after the "
        "methods; the faster gives the case's GB/s) are for scale only: on a busy machine they "
        "can differ from the paired samples a ratio uses. Forward is timed under `no_grad`; "
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
        "Each cell: paired ceiling median / method median (both in Details).",
        "",
        *_ratio_tables(cases),
        "## Fused speedup (time of baseline / time of fused), forward / backward",
        "",
        "Each cell: baseline median / fused median, the fwd and bwd ms of Details.",
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
