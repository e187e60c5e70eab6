"""Each head against the ``avg`` head, paired by seed.

Runs of the same seed share their data order, augmentation draws and, as far as the heads
allow, their initial backbone, so seed-to-seed luck moves both heads' accuracies together.
The difference ``acc(head, seed) - acc(avg, seed)`` cancels that shared part: its mean ± 95%
Student-t CI over the seeds both heads ran tells whether a head beats ``avg`` far more sharply
than two overlapping per-head intervals can. A head is called **better** (or **worse**) than
``avg`` only when that interval lies wholly above (below) 0; otherwise, or with one seed, the
comparison is **inconclusive**.

>>> d = paired_difference({0: 0.92, 1: 0.93, 2: 0.95}, {0: 0.90, 1: 0.91, 2: 0.92})
>>> [round(v, 3) for v in d["values"]], round(d["mean"], 4), round(d["ci95"], 4), d["verdict"]
([0.02, 0.02, 0.03], 0.0233, 0.0143, 'better')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from globalpool.lab.experiments.stats import mean_ci

#: The head every other head is compared with.
BASELINE = "avg"

#: What a paired comparison can conclude.
VERDICTS = ("better", "worse", "inconclusive")


def paired_difference(
    head: Mapping[int, float | None], baseline: Mapping[int, float | None]
) -> dict[str, Any] | None:
    """Mean ± 95% CI of ``head[seed] - baseline[seed]`` over the seeds both have a value for.

    Returns ``None`` when no seed is shared; else a dict with ``baseline`` (:data:`BASELINE`),
    ``mean``, ``ci95`` (``None`` with one seed), ``n``, ``seeds``, ``values`` (the per-seed
    differences, in seed order) and ``verdict``: ``"better"`` when ``mean - ci95 > 0``,
    ``"worse"`` when ``mean + ci95 < 0``, else ``"inconclusive"``.

    >>> paired_difference({0: 0.8}, {1: 0.9}) is None
    True
    >>> paired_difference({0: 0.8, 1: 0.7}, {0: 0.9, 1: 0.9, 2: 0.9})["n"]
    2
    """
    seeds = sorted(
        s for s in head if s in baseline and head[s] is not None and baseline[s] is not None
    )
    if not seeds:
        return None
    values = [float(head[s]) - float(baseline[s]) for s in seeds]  # type: ignore[arg-type]
    mean, half = mean_ci(values)
    verdict = "inconclusive"
    if half is not None and mean - half > 0:
        verdict = "better"
    elif half is not None and mean + half < 0:
        verdict = "worse"
    return {
        "baseline": BASELINE,
        "mean": mean,
        "ci95": half,
        "n": len(seeds),
        "seeds": seeds,
        "values": values,
        "verdict": verdict,
    }


def format_difference(diff: Mapping[str, Any]) -> str:
    """``"+1.2 ± 0.8"`` in percentage points (``"+1.2"`` with one seed).

    >>> format_difference({"mean": -0.031, "ci95": 0.012})
    '−3.1 ± 1.2'
    """
    text = f"{100 * diff['mean']:+.1f}".replace("-", "−")
    return text if diff.get("ci95") is None else f"{text} ± {100 * diff['ci95']:.1f}"


def verdict_lines(rows: list[dict[str, Any]], where: str, test: str) -> tuple[set[str], list[str]]:
    """``(bold heads, sentences)`` for the rows of one training-set size holding ``vs_avg``.

    The heads better than ``avg`` are bold; one sentence each says which heads are better,
    worse, and inconclusive.

    >>> rows = [{"head": "avg", "vs_avg": None},
    ...         {"head": "gem", "vs_avg": {"mean": 0.02, "ci95": 0.01, "verdict": "better"}}]
    >>> bold, lines = verdict_lines(rows, "this table", "test")
    >>> bold, lines[0][:54]
    ({'gem'}, 'Bold in this table: `gem` (+2.0 ± 1.0 pp), better than')
    """
    groups: dict[str, list[str]] = {v: [] for v in VERDICTS}
    for row in rows:
        diff = row.get("vs_avg")
        if diff is not None:
            groups[diff["verdict"]].append(f"`{row['head']}` ({format_difference(diff)} pp)")
    how = f"{test} accuracy, paired by seed: the 95% CI of the mean difference"
    lines = []
    if groups["better"]:
        lines.append(
            f"Bold in {where}: {', '.join(groups['better'])}, better than `{BASELINE}` "
            f"({how} lies above 0).  "
        )
    else:
        lines.append(
            f"No head is bold in {where}: none is better than `{BASELINE}` ({test} accuracy, "
            "paired by seed: no head's 95% CI of the mean difference lies above 0).  "
        )
    if groups["worse"]:
        worse = ", ".join(groups["worse"])
        lines.append(f"Worse than `{BASELINE}` ({how} lies below 0): {worse}.  ")
    if groups["inconclusive"]:
        lines.append(
            f"Not shown to differ from `{BASELINE}` (the CI contains 0, or one seed): "
            f"{', '.join(groups['inconclusive'])}.  "
        )
    bold = {row["head"] for row in rows if (row.get("vs_avg") or {}).get("verdict") == "better"}
    return bold, lines
