"""PNG plots of ``compare``'s results (matplotlib, Agg): accuracy per head, and accuracy vs
training-set size for a sweep.

Error bars are 95% CIs of the mean accuracy; a CI that reaches past 0% or 100% (few seeds, a
wide t quantile) is clipped to the metric's range, and the clipped end is marked with a red
triangle (pointing past the limit), explained in the legend.

>>> clip_errors([50.0, 99.0, 2.0], [10.0, 5.0, None])
([10.0, 5.0, 0.0], [10.0, 1.0, 0.0], [False, True, False])
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from globalpool.lab.experiments.labels import labels_of, ordered
from globalpool.lab.experiments.results import atomic_write

LOW, HIGH = 0.0, 100.0  # the range of an accuracy in percent
CLIP_NOTE = "CI clipped at 0% / 100%"


def clip_errors(
    means: Sequence[float], halves: Sequence[float | None]
) -> tuple[list[float], list[float], list[bool]]:
    """``(below, above, clipped)``: error-bar lengths kept inside ``[LOW, HIGH]``.

    A missing half width (one seed) is a zero-length bar; ``clipped[i]`` is true where the
    CI of point ``i`` reached past either end.
    """
    below, above, clipped = [], [], []
    for mean, half in zip(means, halves, strict=True):
        h = float(half or 0.0)
        below.append(min(h, mean - LOW))
        above.append(min(h, HIGH - mean))
        clipped.append(mean - h < LOW or mean + h > HIGH)
    return below, above, clipped


def _errorbar(ax: Any, xs: list[float], means: list[float], halves: list, **kw: Any) -> bool:
    """Draw clipped error bars, mark clipped ends; True if any bar was clipped."""
    below, above, clipped = clip_errors(means, halves)
    ax.errorbar(xs, means, yerr=[below, above], **kw)
    for x, m, half in zip(xs, means, halves, strict=True):
        h = float(half or 0.0)
        if m + h > HIGH:
            ax.plot([x], [HIGH], marker="^", color="red", ms=7, ls="none")
        if m - h < LOW:
            ax.plot([x], [LOW], marker="v", color="red", ms=7, ls="none")
    return any(clipped)


def _add_clip_legend(ax: Any, clipped: bool, *, always: bool = False, **kw: Any) -> None:
    """The legend, with an entry for the clipping marker if a bar was clipped."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    if clipped:
        handles.append(Line2D([], [], marker="^", color="red", ls="none"))
        labels.append(CLIP_NOTE)
    if always or len(handles) > 1 or clipped:
        ax.legend(handles, labels, fontsize="small", **kw)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def plot_accuracy(rows: Sequence[dict[str, Any]], meta: dict[str, Any], path: Path) -> bool:
    """Accuracy per head (largest training size), one marker per test set; True if clipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels_of(meta)
    size = max(r["train_size"] for r in rows)
    sel = [r for r in rows if r["train_size"] == size]
    names = ordered(sel[0]["accuracies"], labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(sel) + 2) + 2.5, 4.0), dpi=120)
    width = 0.8 / max(len(names), 1)
    clipped = False
    for j, name in enumerate(names):
        xs, ys, es = [], [], []
        for i, row in enumerate(sel):
            acc = row["accuracies"].get(name)
            if acc is None:
                continue
            xs.append(i + (j - (len(names) - 1) / 2) * width)
            ys.append(100 * acc["mean"])
            es.append(None if acc["ci95"] is None else 100 * acc["ci95"])
            seeds = [100 * v for v in acc["values"]]
            ax.scatter([xs[-1] + 0.12 * width] * len(seeds), seeds, s=8, c="gray", alpha=0.6)
        label = labels.get(name, name)
        clipped |= _errorbar(ax, xs, ys, es, fmt="o", capsize=4, label=label)
    ax.set_xticks(range(len(sel)), [r["head"] for r in sel])
    ax.set_ylabel("accuracy % (mean ± 95% CI within 0–100; dots: seeds)")
    ax.set_title(
        f"{meta.get('dataset')} / {meta.get('model')}: {sel[0]['seeds']} seeds, train n={size}"
    )
    bottom, _ = ax.get_ylim()
    ax.set_ylim(max(bottom, LOW - 2), HIGH + 2)
    ax.grid(axis="y", alpha=0.3)
    _add_clip_legend(  # beside the axes: never over a bar
        ax,
        clipped,
        title="test set" if len(names) > 1 else None,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    fig.tight_layout()
    _save(fig, path)
    return clipped


def plot_sweep(rows: Sequence[dict[str, Any]], meta: dict[str, Any], path: Path) -> bool:
    """Test accuracy vs training-set size, one line per head; True if a CI was clipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = labels_of(meta).get("test", "test")
    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=120)
    heads = list(dict.fromkeys(r["head"] for r in rows))
    clipped = False
    for k, head in enumerate(heads):
        sel = [r for r in rows if r["head"] == head and r["accuracy"] is not None]
        nudge = 1.0 + 0.012 * (k - (len(heads) - 1) / 2)  # keep error bars apart (log x)
        clipped |= _errorbar(
            ax,
            [r["train_size"] * nudge for r in sel],
            [100 * r["accuracy"]["mean"] for r in sel],
            [None if r["accuracy"]["ci95"] is None else 100 * r["accuracy"]["ci95"] for r in sel],
            marker="o",
            capsize=3,
            label=head,
        )
    ax.set_xscale("log")
    sizes = sorted({r["train_size"] for r in rows})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_ylim(LOW - 2, HIGH + 2)
    ax.set_xlabel("training-set size")
    ax.set_ylabel(f"{label} accuracy % (mean ± 95% CI)")
    ax.set_title(f"{meta.get('dataset')} / {meta.get('model')}: accuracy vs training-set size")
    ax.grid(alpha=0.3)
    _add_clip_legend(ax, clipped, always=True, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    return clipped
