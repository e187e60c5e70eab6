"""How well class activation maps find the digit in digits-shifted: pointing game and energy in
the box, per head and method, over the runs a ``compare --dataset digits-shifted`` kept.

digits-shifted does not store where it put each digit; :func:`digit_boxes` replays the placement
draws of :func:`globalpool.lab.data.digits_shifted.load_digits_shifted` with the same generator and
checks that pasting the digits there rebuilds every image exactly.

- pointing game: the map's maximum (upsampled to the canvas) falls inside the digit's 8x8 box
  (a map that is 0 everywhere misses);
- energy in the box: the share of the map's positive mass inside the box (a uniform map scores
  the box's share of the canvas, 64 / 576 = 11.1% on the 24x24 canvas).

>>> import torch
>>> maps = torch.zeros(2, 4, 4); maps[0, 1, 1] = 1.0; maps[1, 3, 3] = 1.0
>>> boxes = torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2]])   # (row, col, height, width)
>>> pointing_game(maps, boxes).tolist(), energy_in_box(maps, boxes).tolist()
([True, False], [1.0, 0.0])

Run ``python -m globalpool.lab.cam.localization RESULTS [OUT]`` for the table: ``localization.json``
(one row per head, method and test set, scores in %, mean ± 95% CI over the seeds and the
per-seed values), ``localization.md`` and ``localization.png`` in OUT (default
``RESULTS/localization``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from globalpool.lab.cam.localization_plot import plot_localization

DIGIT = 8
#: The map methods scored, and the order of the test sets in the table.
METHODS = ("cam", "gradcam", "gradcam++", "layercam")
SETS = ("test", "everywhere", "right", "larger-canvas")


def digit_boxes(data: Any) -> dict[str, torch.Tensor]:
    """``{set name: (N, 4) boxes (row, col, 8, 8)}`` for every evaluation set of a digits-shifted
    :class:`~globalpool.lab.data.Dataset` (its ``info`` says how it was drawn).

    >>> from globalpool.lab.data import load_dataset
    >>> boxes = digit_boxes(load_dataset("digits-shifted"))
    >>> sorted(boxes), tuple(boxes["test"].shape)
    (['everywhere', 'larger-canvas', 'right', 'test'], (449, 4))
    """
    from sklearn.datasets import load_digits

    from globalpool.lab.data.digits_shifted import place, split_indices

    info = data.info
    digits = load_digits()
    images = (np.asarray(digits.images, dtype=np.float32) / 16.0).clip(0.0, 1.0)
    labels = np.asarray(digits.target, dtype=np.int64)
    train_idx, test_idx = split_indices(labels, 0.25, info["split_seed"])
    if len(test_idx) != info["n_real_test"]:
        raise ValueError("digits-shifted was built with another test_fraction; cannot replay it")
    canvas, region, large = info["canvas"], info["region_width"], info["large_canvas"]
    rng = np.random.default_rng(info["seed"])
    span, left, right_start = canvas - DIGIT + 1, region - DIGIT + 1, canvas - region

    def draw(n: int, col_lo: int, col_hi: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, size - DIGIT + 1, n), rng.integers(col_lo, col_hi, n)

    draw(len(train_idx), 0, left, canvas)  # the training placements come first
    plan = {
        "test": (0, left, canvas),
        "everywhere": (0, span, canvas),
        "right": (right_start, span, canvas),
        "larger-canvas": (0, large - DIGIT + 1, large),
    }
    boxes: dict[str, torch.Tensor] = {}
    tests = data.test_sets()
    for name, (lo, hi, size) in plan.items():
        rows, cols = draw(len(test_idx), lo, hi, size)
        rebuilt = torch.from_numpy(place(images[test_idx], size, rows, cols))
        if not torch.equal(rebuilt, tests[name][0]):
            raise ValueError(f"replayed digit positions do not rebuild the {name!r} images")
        full = np.full(len(rows), DIGIT)
        boxes[name] = torch.from_numpy(np.stack([rows, cols, full, full], 1))
    return boxes


def _inside(shape: tuple[int, ...], boxes: torch.Tensor) -> torch.Tensor:
    """Bool ``(N, H, W)``: True inside each sample's box."""
    rows = torch.arange(shape[1])[None, :, None]
    cols = torch.arange(shape[2])[None, None, :]
    r0, c0, h, w = (boxes[:, i, None, None] for i in range(4))
    return (rows >= r0) & (rows < r0 + h) & (cols >= c0) & (cols < c0 + w)


def pointing_game(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Bool ``(N,)``: the (first) maximum of each map ``(N, H, W)`` lies in its box; a map with
    no positive value misses."""
    flat = maps.flatten(1)
    top = flat.argmax(1)
    hit = _inside(tuple(maps.shape), boxes).flatten(1).gather(1, top[:, None])[:, 0]
    return hit & (flat.amax(1) > 0)


def energy_in_box(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``(N,)``: share of each map's positive mass inside its box (0 for a map with none)."""
    positive = maps.clamp(min=0).flatten(1)
    inside = (positive * _inside(tuple(maps.shape), boxes).flatten(1)).sum(1)
    total = positive.sum(1)
    return torch.where(total > 0, inside / torch.where(total > 0, total, 1.0), 0.0)


def evaluate(
    results: str | Path,
    *,
    methods: tuple[str, ...] = METHODS,
    sets: tuple[str, ...] = ("test", "everywhere", "right"),
) -> list[dict[str, Any]]:
    """One row per (run, method, set) of the digits-shifted runs with kept weights under
    ``results`` (per head and seed the run of the largest training set, the newest of equals);
    ``cam`` only where it is exact. Maps of the true class, upsampled to the canvas."""
    from globalpool.cam import auto_method, class_activation_maps
    from globalpool.lab.data import load_dataset
    from globalpool.lab.experiments.saved import find_runs, load_run, read_record

    data = load_dataset("digits-shifted")
    boxes = digit_boxes(data)
    tests = data.test_sets()
    chosen: dict[tuple[str, int], tuple[tuple[float, str], Path]] = {}
    for path in find_runs(results):
        record = read_record(path)
        spec = record["spec"]
        if spec["dataset"] != "digits-shifted" or not record.get("model_file"):
            continue
        size = spec.get("train_size")
        rank = (float("inf") if size is None else size, record.get("finished_at", ""))
        key = (spec["head"], spec["seed"])
        if key not in chosen or rank > chosen[key][0]:
            chosen[key] = (rank, path)
    rows: list[dict[str, Any]] = []
    for _, path in sorted(chosen.values(), key=lambda item: str(item[1])):
        model, record = load_run(path)
        try:
            exact, layer = auto_method(model) == "cam", None
        except ValueError:  # flatten + FC: no pooling head, take the backbone's output
            exact, layer = False, "backbone"
        for method in methods:
            if method == "cam" and not exact:
                continue
            for name in sets:
                x, y = tests[name]
                size = tuple(x.shape[2:])
                maps = torch.cat(
                    [
                        class_activation_maps(
                            model, x[i : i + 256], y[i : i + 256], layer=layer, method=method,
                            upsample=size,
                        )
                        for i in range(0, len(x), 256)
                    ]
                )
                rows.append(
                    {
                        "head": record["spec"]["head"],
                        "seed": record["spec"]["seed"],
                        "method": method,
                        "set": name,
                        "pointing": float(pointing_game(maps, boxes[name]).float().mean()),
                        "energy": float(energy_in_box(maps, boxes[name]).mean()),
                        "accuracy": record["accuracies"].get(name),
                    }
                )
    return rows


def _order(head: str, method: str, name: str) -> tuple:
    """Sort key: heads in :data:`globalpool.HEADS` order (others after, by name), then
    :data:`METHODS`, then :data:`SETS`."""
    from globalpool import HEADS

    def rank(value: str, known: tuple[str, ...]) -> tuple[int, str]:
        return (known.index(value), "") if value in known else (len(known), value)

    return rank(head, HEADS), rank(method, METHODS), rank(name, SETS)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per head, method and set (in the order of ``rows``): the seeds' scores in %, as
    ``{"head", "method", "set", "seeds", "pointing_game": {"mean", "ci95", "values"},
    "energy_in_box": {...}}``; ``values`` in seed order, ``ci95`` the half width (None for one
    seed).

    >>> rows = [{"head": "avg", "method": "cam", "set": "right", "seed": s, "pointing": p,
    ...          "energy": 0.5} for s, p in ((1, 0.75), (0, 0.25))]
    >>> out = summarize(rows)[0]
    >>> out["seeds"], out["pointing_game"]["values"], out["energy_in_box"]["mean"]
    (2, [25.0, 75.0], 50.0)
    """
    from globalpool.lab.experiments.stats import mean_ci

    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["head"], r["method"], r["set"]), []).append(r)
    out = []
    for (head, method, name), group in sorted(groups.items(), key=lambda kv: _order(*kv[0])):
        group = sorted(group, key=lambda g: g["seed"])
        row: dict[str, Any] = {"head": head, "method": method, "set": name, "seeds": len(group)}
        for key, field in (("pointing_game", "pointing"), ("energy_in_box", "energy")):
            values = [100 * g[field] for g in group]
            mean, half = mean_ci(values)
            row[key] = {"mean": mean, "ci95": half, "values": values}
        out.append(row)
    return out


def _cell(score: dict[str, Any]) -> str:
    half = score["ci95"]
    return f"{score['mean']:.1f}" if half is None else f"{score['mean']:.1f} ± {half:.1f}"


def table(summary: list[dict[str, Any]]) -> str:
    """Markdown of :func:`summarize`'s rows: mean ± 95% CI over seeds of both scores (%)."""
    lines = [
        "| head | method | set | seeds | pointing game % | energy in box % |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| `{r['head']}` | {r['method']} | {r['set']} | {r['seeds']} "
            f"| {_cell(r['pointing_game'])} | {_cell(r['energy_in_box'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m globalpool.lab.cam.localization RESULTS [OUT]``: write and print the table."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m globalpool.lab.cam.localization RESULTS [OUT]", file=sys.stderr)
        return 2
    root = Path(args[0])
    torch.set_num_threads(1)
    rows = evaluate(root)
    if not rows:
        print(f"no digits-shifted runs with kept weights under {root}", file=sys.stderr)
        return 1
    out = Path(args[1]) if len(args) == 2 else root / "localization"
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    text = table(summary)
    (out / "localization.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "localization.md").write_text(text)
    plot_localization(summary, out / "localization.png")
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
