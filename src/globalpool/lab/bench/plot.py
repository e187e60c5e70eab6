"""The benchmark's PNG: ratio-to-ceiling bars per kind and family, one file per (device, dtype).

Subplots: rows = layouts, columns = forward / backward. A bar is the geometric mean over the
shapes of the ratio (for the seed family, the best seed method of that kind per shape). The
legend lists only the families that have a bar in the figure (no ``compile`` entry when
``--no-compile``). The thin line at 1.0 is the ceiling; a dashed line marks a target only where
the run has one, labelled with its value and the shapes it concerns (the targets are judged on
those shapes' worst ratio, not on the bars' mean).

>>> case = {"device": "cpu", "dtype": "float32", "layout": "channels_first", "methods": [
...     {"id": "fused:avg", "family": "fused", "kind": "avg", "status": "ok",
...      "forward": {"ratio": 0.8}, "backward": {"ratio": 0.5}}]}
>>> fig = figure({"cases": [case], "targets": [], "machine": {"name": "m"}}, "cpu", "float32")
>>> [t.get_text() for t in fig.legends[0].get_texts()]
['fused']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from globalpool.lab.bench.targets import CPU_DTYPE, DIRECTIONS, timed

FAMILIES = ("seed", "torch", "compile", "fused")
COLORS = {"seed": "#999999", "torch": "#4c72b0", "compile": "#dd8452", "fused": "#55a868"}


def _geomean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _height(cases: Sequence[dict[str, Any]], family: str, kind: str, d: str) -> float | None:
    per_shape = []
    for c in cases:
        vals = [
            m[d]["ratio"]
            for m in c["methods"]
            if m["family"] == family and m["kind"] == kind and timed(m, d)
        ]
        if vals:
            per_shape.append(max(vals))
    return _geomean(per_shape)


def target_lines(
    targets: Sequence[dict[str, Any]], device: str, dtype: str, layout: str, direction: str
) -> list[tuple[float, str]]:
    """(threshold, label) of the ratio targets this subplot's cases are judged by."""
    if device == "cpu" and dtype != CPU_DTYPE:
        return []
    rows = [
        t
        for t in targets
        if t["device"] == device
        and t["layout"] == layout
        and t["target"] == f"{direction} ratio to ceiling"
    ]
    lines = []
    for threshold in sorted({t["threshold"] for t in rows}):
        shapes = sorted({s for t in rows if t["threshold"] == threshold for s in t["shapes"]})
        lines.append((threshold, f"target {threshold:g} ({', '.join(shapes)})"))
    return lines


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(data: dict[str, Any], device: str, dtype: str) -> Any:
    """The matplotlib figure of one (device, dtype) of ``data`` (bench results)."""
    plt = _pyplot()
    group = [c for c in data["cases"] if c["device"] == device and c["dtype"] == dtype]
    targets = data.get("targets") or []
    layouts = sorted({c["layout"] for c in group})
    kinds = list(dict.fromkeys(m["kind"] for c in group for m in c["methods"]))
    present = {
        m["family"] for c in group for m in c["methods"] if any(timed(m, d) for d in DIRECTIONS)
    }
    families = [f for f in FAMILIES if f in present] + sorted(present - set(FAMILIES))
    fig, axes = plt.subplots(
        len(layouts),
        2,
        figsize=(max(8, 1.6 * len(kinds) + 2) * 1.6, 3.6 * len(layouts)),
        squeeze=False,
    )
    handles = {}
    width = 0.8 / max(1, len(families))
    for i, layout in enumerate(layouts):
        lcases = [c for c in group if c["layout"] == layout]
        for j, d in enumerate(DIRECTIONS):
            ax = axes[i][j]
            for f_i, fam in enumerate(families):
                heights = [_height(lcases, fam, kind, d) or 0.0 for kind in kinds]
                xs = [k + (f_i - (len(families) - 1) / 2) * width for k in range(len(kinds))]
                color = COLORS.get(fam)
                handles.setdefault(fam, ax.bar(xs, heights, width, label=fam, color=color))
            ax.axhline(1.0, color="k", lw=0.5)
            ax.annotate("ceiling = 1", (1.0, 1.0), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize=7)  # fmt: skip
            for threshold, label in target_lines(targets, device, dtype, layout, d):
                ax.axhline(threshold, color="k", ls="--", lw=1, label=label)
                ax.annotate(label, (0.0, threshold), xycoords=("axes fraction", "data"),
                            ha="left", va="bottom", fontsize=7)  # fmt: skip
            ax.set_xticks(range(len(kinds)), kinds)
            ax.set_ylabel("ratio to ceiling")
            ax.set_title(f"{device} {dtype} {layout}: {d}", fontsize=10)
    if handles:
        fig.legend(list(handles.values()), list(handles), fontsize=8, ncols=len(handles),
                   loc="upper right")  # fmt: skip
    fig.suptitle(
        f"globalpool bench: ratio to the same-run ceiling (x.sum() forward, fill_ backward), "
        f"geometric mean over shapes\n{data['machine']['name']}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def plot(data: dict[str, Any], path: Path) -> list[Path]:
    """Write one PNG per (device, dtype) next to ``path``: ``{stem}_{device}_{dtype}.png``."""
    plt = _pyplot()

    written = []
    for device, dtype in dict.fromkeys((c["device"], c["dtype"]) for c in data["cases"]):
        fig = figure(data, device, dtype)
        out = path.with_name(f"{path.stem}_{device}_{dtype}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written
