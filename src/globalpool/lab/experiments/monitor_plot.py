"""``monitor.png`` and its Markdown lines: the ``compare --monitor`` statistics per head.

Per head (largest training-set size), the mean over seeds at every epoch of the head's
dead-channel fraction and of the standard deviation of its pooled features
(:func:`globalpool.lab.experiments.monitoring.head_summary`); heads without a pooling module
(``fc``) are left out.

>>> rec = {"spec": {"head": "avg", "seed": 0}, "train_size": 100, "monitor": {"epochs": [
...     {"epoch": 1, "modules": {"head.pool": {"values": 4, "mean": 1.0, "std": 0.5,
...      "channels": 4, "dead_channels": 1}}}]}}
>>> curves = monitor_curves([rec])
>>> curves["avg"]["dead_fraction"], curves["avg"]["std"]
([0.25], [0.5])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from globalpool import HEADS, LEARNED_POOLS
from globalpool.lab.experiments.monitoring import head_summary

METRICS = (("dead_fraction", "dead-channel fraction"), ("std", "pooled-feature std"))


def _mean(values: list[float | None]) -> float:
    xs = [v for v in values if v is not None]
    return math.fsum(xs) / len(xs) if xs else math.nan


def monitor_curves(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """``{head: {"epoch": [...], metric: [mean over seeds per epoch]}}`` for the largest
    training-set size, heads in :data:`~globalpool.HEADS` order."""
    watched = [r for r in records if r.get("monitor")]
    if not watched:
        return {}
    size = max(int(r["train_size"]) for r in watched)
    by_head: dict[str, dict[int, dict[str, list]]] = {}
    for rec in watched:
        if int(rec["train_size"]) != size:
            continue
        for entry in rec["monitor"]["epochs"]:
            if not entry["modules"]:
                continue
            summary = head_summary(entry["modules"])
            cell = by_head.setdefault(rec["spec"]["head"], {}).setdefault(
                int(entry["epoch"]), {m: [] for m, _ in METRICS}
            )
            for metric, _ in METRICS:
                cell[metric].append(summary[metric])
    order = {h: i for i, h in enumerate((*HEADS, *LEARNED_POOLS))}
    curves = {}
    for head in sorted(by_head, key=lambda h: (order.get(h, 99), h)):
        epochs = sorted(by_head[head])
        curves[head] = {"epoch": epochs}
        for metric, _ in METRICS:
            curves[head][metric] = [_mean(by_head[head][e][metric]) for e in epochs]
    return curves


def plot_monitor(records: Sequence[dict[str, Any]], meta: dict[str, Any], path: Path) -> bool:
    """Write ``monitor.png`` (two panels over epochs); False (nothing written) when no run has
    a pooling head's statistics."""
    curves = monitor_curves(records)
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from globalpool.lab.experiments.plots import _save

    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.0), dpi=120)
    for ax, (metric, label) in zip(axes, METRICS, strict=True):
        for head, curve in curves.items():
            ax.plot(curve["epoch"], curve[metric], marker="o", ms=3, label=head)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{label} (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    size = max(int(r["train_size"]) for r in records if r.get("monitor"))
    fig.suptitle(
        f"{meta.get('dataset')} / {meta.get('model')}: head's pooled features on a fixed test "
        f"batch, train n={size}"
    )
    fig.tight_layout()
    _save(fig, path)
    return True


def monitor_markdown(records: Sequence[dict[str, Any]]) -> list[str]:
    """The ``results.md`` section: the plot and the last epoch's values per head."""
    curves = monitor_curves(records)
    if not curves:
        return []
    samples = next(r["monitor"]["samples"] for r in records if r.get("monitor"))
    lines = [
        "## Pooled features (`--monitor`)",
        "",
        f"At the end of every epoch each run pooled the first {samples} test samples (eval "
        "mode) and recorded its head's pooling statistics (`gp.monitor`; per run and epoch in "
        "`results.json`, `runs[].monitor`). A channel is dead when none of its pooled values "
        "in that batch was > 0. Mean over seeds, largest training-set size.",
        "",
        "![monitor](monitor.png)",
        "",
        "| head | last epoch | dead channels % | pooled std |",
        "|---|---|---|---|",
    ]
    for head, curve in curves.items():
        dead, std = curve["dead_fraction"][-1], curve["std"][-1]
        lines.append(
            f"| `{head}` | {curve['epoch'][-1]} | "
            f"{'n/a' if math.isnan(dead) else f'{100 * dead:.1f}'} | "
            f"{'n/a' if math.isnan(std) else f'{std:.4g}'} |"
        )
    return [*lines, ""]
