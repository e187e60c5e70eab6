"""PNG of the localisation scores: one panel per score and test set, the heads along x, one bar
per map method (mean over seeds, 95% CI whiskers, the seeds as dots).

>>> import tempfile, pathlib
>>> score = {"mean": 50.0, "ci95": 5.0, "values": [45.0, 55.0]}
>>> rows = [{"head": "avg", "method": "cam", "set": "right", "seeds": 2,
...          "pointing_game": score, "energy_in_box": score}]
>>> path = pathlib.Path(tempfile.mkdtemp()) / "loc.png"
>>> plot_localization(rows, path); path.read_bytes()[:4] == b"\\x89PNG"
True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from globalpool.cam import METHODS as MAP_METHODS  # the bars' order: the library's

SCORES = (("pointing_game", "pointing game %"), ("energy_in_box", "energy in box %"))
SET_TITLES = {
    "test": "same region as training",
    "everywhere": "anywhere on the canvas",
    "right": "right half only (never seen)",
    "larger-canvas": "larger canvas",
}


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def plot_localization(summary: list[dict[str, Any]], path: Path) -> None:
    """Draw the rows of :func:`globalpool.lab.cam.localization.summarize` into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from globalpool.lab.experiments.plots import _save

    heads = _unique([r["head"] for r in summary])
    present = _unique([r["method"] for r in summary])
    methods = [m for m in MAP_METHODS if m in present]
    methods += [m for m in present if m not in MAP_METHODS]
    sets = _unique([r["set"] for r in summary])
    index = {(r["head"], r["method"], r["set"]): r for r in summary}
    fig, axes = plt.subplots(
        len(SCORES), len(sets), figsize=(max(6.0, 0.9 * len(heads)) * len(sets), 7.5),
        dpi=100, squeeze=False,
    )
    width = 0.8 / len(methods)
    for col, name in enumerate(sets):
        for row, (key, label) in enumerate(SCORES):
            ax = axes[row][col]
            for j, method in enumerate(methods):
                xs, ys, es = [], [], []
                for i, head in enumerate(heads):
                    r = index.get((head, method, name))
                    if r is None:
                        continue
                    x = i + (j - (len(methods) - 1) / 2) * width
                    xs.append(x)
                    ys.append(r[key]["mean"])
                    es.append(r[key]["ci95"] or 0.0)
                    seeds = r[key]["values"]
                    ax.scatter([x] * len(seeds), seeds, s=5, c="black", alpha=0.5, zorder=3)
                ax.bar(xs, ys, width, yerr=es, capsize=2, label=method, color=f"C{j}")
            ax.set_xticks(range(len(heads)), heads, rotation=30, ha="right", fontsize="small")
            ax.set_ylim(0, 100)
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3)
            if row == 0:
                ax.set_title(SET_TITLES.get(name, name))
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    seeds = max(r["seeds"] for r in summary)
    fig.suptitle(f"digits-shifted: where the class map of the true class points ({seeds} seeds)")
    fig.tight_layout()
    _save(fig, path)
