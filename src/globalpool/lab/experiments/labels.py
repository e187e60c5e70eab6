"""Names for the test sets as reports show them, e.g. digits-shifted's ``right`` is
"right half only (never seen)"; the same label heads the results.md column, the plot legend and
``meta.test_sets`` in results.json.

>>> [s["label"] for s in describe_test_sets("digits-shifted", {"test": 450, "right": 450})]
['same region', 'right half only (never seen)']
>>> describe_test_sets("mnist1d", {"test": 1000})[0]["label"]
'test'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from globalpool.lab.data.invariance import INVARIANCE_LABELS

#: dataset -> test-set name -> (label, what the set is)
TEST_SET_LABELS: dict[str, dict[str, tuple[str, str]]] = {
    "digits-shifted": {
        "test": (
            "same region",
            "held-out digits in the left half of the canvas, where every training digit sits",
        ),
        "everywhere": ("anywhere", "held-out digits anywhere on the canvas"),
        "right": (
            "right half only (never seen)",
            "held-out digits only in the right half, where no training digit ever sits",
        ),
        "larger-canvas": (
            "larger canvas",
            "held-out digits anywhere on a larger canvas than the training canvas",
        ),
    },
    "cifar10": INVARIANCE_LABELS,
    "folder": INVARIANCE_LABELS,
}

_PLAIN = {"test": ("test", "the dataset's held-out test set")}


def describe_test_sets(dataset: str, sizes: Mapping[str, int]) -> list[dict[str, Any]]:
    """``[{"name", "label", "size", "description"}]`` for each test set, in ``sizes``' order."""
    from globalpool.lab.experiments.spec import dataset_base

    known = {**_PLAIN, **TEST_SET_LABELS.get(dataset_base(dataset), {})}
    out = []
    for name, size in sizes.items():
        label, description = known.get(name, (name, f"the extra test set {name!r}"))
        out.append({"name": name, "label": label, "size": int(size), "description": description})
    return out


def labels_of(meta: Mapping[str, Any]) -> dict[str, str]:
    """``{name: label}`` from a report's ``meta``, in its test sets' order (may be empty)."""
    return {s["name"]: s["label"] for s in meta.get("test_sets", [])}


def ordered(names: Iterable[str], labels: Mapping[str, str]) -> list[str]:
    """``names`` with ``"test"`` first, then in ``labels``' order, then any others.

    >>> ordered(["right", "test", "x"], {"test": "a", "everywhere": "b", "right": "c"})
    ['test', 'right', 'x']
    """
    rank = {name: i for i, name in enumerate(["test", *labels])}
    return sorted(names, key=lambda n: rank.get(n, len(rank)))
