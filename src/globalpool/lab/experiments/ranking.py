"""Which head, if any, is clearly best: the best mean test accuracy counts as a win only when
its 95% CI does not overlap the next-best head's CI.

>>> rows = [{"head": "avg", "accuracy": {"mean": 0.9, "ci95": 0.01}},
...         {"head": "fc", "accuracy": {"mean": 0.8, "ci95": 0.02}}]
>>> winner(rows)[0]["head"]
'avg'
>>> rows[1]["accuracy"]["ci95"] = 0.2
>>> winner(rows)[0] is None
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _fmt(acc: dict[str, Any]) -> str:
    half = acc.get("ci95")
    return f"{100 * acc['mean']:.1f}" + ("" if half is None else f" ± {100 * half:.1f}")


def winner(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """``(row, why)`` for rows of one training-set size: the clearly best row or ``None``.

    ``why`` is one sentence: why the row wins, or why no row does (one head, one seed, a tie,
    overlapping CIs).
    """
    ranked = sorted(
        (r for r in rows if r.get("accuracy") is not None),
        key=lambda r: r["accuracy"]["mean"],
        reverse=True,
    )
    if len(ranked) < 2:
        return None, "only one head, so none is compared"
    best, second = ranked[0], ranked[1]
    a, b = best["accuracy"], second["accuracy"]
    first = f"`{best['head']}` ({_fmt(a)})"
    other = f"`{second['head']}` ({_fmt(b)})"
    if a.get("ci95") is None or b.get("ci95") is None:
        return None, f"with one seed there is no CI to tell the best, {first}, from {other}"
    if a["mean"] - a["ci95"] > b["mean"] + b["ci95"]:
        return best, f"its 95% CI does not overlap that of the next best, {other}"
    return None, f"the best, {first}, and the next best, {other}, have overlapping 95% CIs"
