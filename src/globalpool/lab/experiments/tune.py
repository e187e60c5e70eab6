"""``compare --tune``: pick each head's learning rate (and warm-up) on a validation split.

One shared learning rate favours the heads it happens to suit; papers compare methods at each
method's tuned settings. With ``--tune lr`` (or ``lr,warmup``) ``compare`` first runs, per head,
every point of a small grid, then trains the head's seeds at the point it picked:

- **Validation split.** 10% of the training set (:data:`VAL_FRACTION`, class-stratified, drawn
  with the fixed :data:`SPLIT_SEED`) is held out; the tuning runs train on the other 90% and
  are scored on the held-out 10%. The tuning runs get a :class:`~globalpool.lab.data.Dataset`
  built by :func:`carve_validation`, whose only evaluation set *is* the validation split: the
  test set (and any extra test set) is not in it, so selection cannot read it. The final runs
  train on the whole training set, as without ``--tune``.
- **Budget.** A tuning run takes :data:`BUDGET` (a quarter) of the run's epochs, at least one
  (``--tune-budget``), with the same schedule squeezed into its steps.
- **Seeds.** :data:`TUNE_SEEDS` tuning seed per grid point by default (``--tune-seeds``),
  numbered from :data:`TUNE_SEED_BASE` so that no tuning run shares an initialisation with
  a final run.
- **Grid.** ``lr``: the recipe's lr times :data:`LR_FACTORS` (1/8 .. 2); ``warmup`` (linear
  warm-up, in optimiser steps): 0 and one epoch's steps. ``--tune-grid`` overrides either.
- **Rule** (:func:`select`): the highest mean validation accuracy over the tuning seeds among
  the grid points that did not diverge; ties go to the lr closest to the recipe's (in log
  scale, the lower of two equally close), then to the shorter warm-up. A grid point diverged
  if any of its tuning runs ended with a non-finite training loss or a validation accuracy at
  most :data:`CHANCE_MARGIN` above chance (the validation split's majority-class share). A head
  whose every grid point diverged keeps the recipe's settings for its final runs, and the
  report says so.

Tuning runs are cached like runs (:class:`~globalpool.lab.experiments.results.ResultStore`) under
``OUT/tuning/``; the key hashes the reduced budget, the grid point and the split (through the
digest of the split data), so an interrupted ``--tune`` resumes where it stopped.

>>> grid = parse_grid("lr=x0.5,x1,0.3;warmup=0,10", ("lr", "warmup"), recipe_lr=0.1, epoch=40)
>>> grid.lr, grid.warmup
((0.05, 0.1, 0.3), (0, 10))
>>> [p.key for p in grid.points()][:2]
['lr=0.05,warmup=0', 'lr=0.05,warmup=10']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from globalpool.lab.experiments.spec import RunSpec, TrainConfig

PARAMS = ("lr", "warmup")
VAL_FRACTION = 0.1
SPLIT_SEED = 0
BUDGET = 0.25
TUNE_SEEDS = 1
TUNE_SEED_BASE = 10_000
LR_FACTORS = (0.125, 0.25, 0.5, 1.0, 2.0)
CHANCE_MARGIN = 0.01
RULE = (
    "highest mean validation accuracy over the tuning seeds among grid points that did not "
    "diverge; ties to the lr closest to the recipe's (log scale; the lower of two equally "
    "close), then to the shorter warm-up. Diverged: a tuning run with a non-finite training "
    f"loss or a validation accuracy at most {100 * CHANCE_MARGIN:g} pp above chance (the "
    "validation split's majority-class share). A head whose every grid point diverged is "
    "trained at the recipe's settings."
)


class TuneError(ValueError):
    """A bad ``--tune`` option value; ``option`` names it (a usage error)."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


def parse_tune(text: str) -> tuple[str, ...]:
    """``"lr"`` or ``"lr,warmup"`` (any order, de-duplicated) -> the tuned parameters.

    >>> parse_tune("warmup, lr")
    ('lr', 'warmup')
    """
    names = {w.strip().lower().replace("-", "") for w in text.split(",") if w.strip()}
    unknown = sorted(names - set(PARAMS))
    if unknown or "lr" not in names:
        raise TuneError(f"expected 'lr' or 'lr,warmup', got {text.strip()!r}", "--tune")
    return tuple(p for p in PARAMS if p in names)


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point."""

    lr: float
    warmup: int = 0

    @property
    def key(self) -> str:
        """``"lr=0.01,warmup=0"``: how results.json names the point."""
        return f"lr={self.lr:g},warmup={self.warmup}"


@dataclasses.dataclass(frozen=True)
class Grid:
    """The values tried per tuned parameter (``warmup`` is ``(0,)`` when it is not tuned)."""

    params: tuple[str, ...]
    lr: tuple[float, ...]
    warmup: tuple[int, ...] = (0,)

    def points(self) -> list[Point]:
        """Every (lr, warmup) combination, lr-major, each list in the order given."""
        return [Point(lr, w) for lr in self.lr for w in self.warmup]

    def to_dict(self) -> dict[str, Any]:
        return {"params": list(self.params), "lr": list(self.lr), "warmup": list(self.warmup)}


def _values(name: str, text: str, recipe_lr: float) -> tuple[Any, ...]:
    out: list[Any] = []
    for item in text.split(","):
        word = item.strip().lower()
        if not word:
            continue
        try:
            if name == "lr":
                value: Any = (
                    recipe_lr * float(word[1:]) if word[0] in "x×*" else float(word)
                )
                ok = value > 0 and math.isfinite(value)
            else:
                value = int(word)
                ok = value >= 0
        except ValueError:
            ok = False
        if not ok:
            what = "finite numbers > 0 (or xF: F times the recipe's lr)" if name == "lr" else (
                "non-negative integers (optimiser steps)"
            )
            raise TuneError(f"{name} must be {what}, got {item.strip()!r}", "--tune-grid")
        if value not in out:
            out.append(value)
    if not out:
        raise TuneError(f"no values for {name}", "--tune-grid")
    return tuple(out)


def parse_grid(
    text: str | None, params: Sequence[str], *, recipe_lr: float, epoch: int
) -> Grid:
    """The grid of ``--tune-grid`` (``None``: the defaults, see the module docstring).

    ``text`` is ``"lr=V,V,...;warmup=S,S,..."`` with either part optional (a missing part keeps
    its default); a bare list is the lr values. An lr value ``xF`` is F times ``recipe_lr``.
    ``epoch`` is the optimiser steps of one epoch (the default warm-up).

    >>> parse_grid(None, ("lr",), recipe_lr=0.02, epoch=40).lr
    (0.0025, 0.005, 0.01, 0.02, 0.04)
    >>> parse_grid(None, ("lr", "warmup"), recipe_lr=0.02, epoch=40).warmup
    (0, 40)
    """
    given: dict[str, tuple[Any, ...]] = {}
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        name, sep, values = part.partition("=")
        name = name.strip().lower() if sep else "lr"
        values = values if sep else part
        if name not in PARAMS:
            raise TuneError(f"unknown parameter {name!r}; expected lr or warmup", "--tune-grid")
        if name not in params:
            raise TuneError(f"{name} values given but --tune does not include {name}",
                            "--tune-grid")
        given[name] = _values(name, values, recipe_lr)
    lr = given.get("lr") or tuple(recipe_lr * f for f in LR_FACTORS)
    warmup: tuple[int, ...] = (0,)
    if "warmup" in params:
        warmup = given.get("warmup") or (0, max(1, int(epoch)))
    return Grid(tuple(params), tuple(lr), warmup)


def carve_validation(data: Any, fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED) -> Any:
    """``data`` with a class-stratified ``fraction`` of its training set as its only
    evaluation set (``"test"``) and the rest as its training set: the test set is not in it.

    >>> import torch
    >>> from globalpool.lab.data import Dataset
    >>> x = torch.arange(40.0).reshape(20, 1, 2); y = torch.arange(20) % 2
    >>> split = carve_validation(Dataset("toy", x, y, x[:4], y[:4], num_classes=2, spatial_rank=1))
    >>> split.train_size, len(split.y_test), list(split.test_sets())
    (18, 2, ['test'])
    >>> sorted(split.y_test.tolist()), set(split.x_train[:, 0, 0].tolist()).isdisjoint(
    ...     split.x_test[:, 0, 0].tolist())
    ([0, 1], True)
    """
    import dataclasses as dc

    import torch

    from globalpool.lab.data.dataset import subsample_indices

    n = data.train_size
    n_val = max(1, round(fraction * n))
    fit = torch.from_numpy(subsample_indices(data.y_train, n - n_val, seed))
    mask = torch.ones(n, dtype=torch.bool)
    mask[fit] = False
    val = mask.nonzero().flatten()
    info = {
        **data.info,
        "validation": {"fraction": fraction, "seed": seed, "size": int(n_val), "of": n},
    }
    return dc.replace(
        data,
        name=f"{data.name} (validation split)",
        x_train=data.x_train[fit],
        y_train=data.y_train[fit],
        x_test=data.x_train[val],
        y_test=data.y_train[val],
        extra_tests={},
        info=info,
    )


def chance_level(data: Any) -> float:
    """The share of the most frequent class in ``data``'s (validation) test set."""
    import torch

    counts = torch.bincount(data.y_test, minlength=data.num_classes)
    return float(counts.max()) / max(1, len(data.y_test))


@dataclasses.dataclass(frozen=True)
class DataSplitSource:
    """Loads the dataset in a worker process, then carves its validation split."""

    source: Any
    fraction: float = VAL_FRACTION
    seed: int = SPLIT_SEED

    def load(self) -> Any:
        return carve_validation(self.source.load(), self.fraction, self.seed)


@dataclasses.dataclass(frozen=True)
class TuneSpec(RunSpec):
    """A tuning run: a :class:`RunSpec` whose label names its grid point (its key is the
    config's and env's, as for any run)."""

    @property
    def label(self) -> str:
        size = "full" if self.train_size is None else str(self.train_size)
        point = Point(self.config.lr, self.config.warmup).key
        return f"tune/{self.dataset}/{self.model}/{self.head}/{point}/seed{self.seed}/n{size}"


def tune_epochs(config: TrainConfig, budget: float) -> int:
    """Epochs of a tuning run: ``budget`` of the run's, rounded, at least 1.

    >>> tune_epochs(TrainConfig(60, 100, 0.02), 0.25), tune_epochs(TrainConfig(1, 100, 0.1), 0.25)
    (15, 1)
    """
    return max(1, round(config.epochs * budget))


def tuning_plan(
    *,
    dataset: str,
    model: str,
    heads: Sequence[str],
    grid: Grid,
    config: TrainConfig,
    budget: float,
    seeds: int,
    train_size: int | None,
    env: Any,
) -> list[TuneSpec]:
    """Every tuning run, seed-major then head, then grid point."""
    epochs = tune_epochs(config, budget)
    return [
        TuneSpec(
            dataset,
            model,
            head,
            TUNE_SEED_BASE + k,
            train_size,
            dataclasses.replace(config, epochs=epochs, lr=p.lr, warmup=p.warmup),
            env,
        )
        for k in range(seeds)
        for head in heads
        for p in grid.points()
    ]


def diverged(record: dict[str, Any], chance: float) -> str | None:
    """Why a tuning run counts as diverged, or ``None``.

    >>> diverged({"final_train_loss": float("nan"), "accuracy": 0.5}, 0.1)
    'non-finite training loss'
    >>> diverged({"final_train_loss": 2.3, "accuracy": 0.105}, 0.1)
    'validation accuracy at chance (10.5% <= 10.0% + 1 pp)'
    >>> diverged({"final_train_loss": 0.3, "accuracy": 0.9}, 0.1) is None
    True
    """
    loss, acc = record.get("final_train_loss"), record.get("accuracy")
    if loss is None or not math.isfinite(loss):
        return "non-finite training loss"
    if acc is None or not math.isfinite(acc) or acc <= chance + CHANCE_MARGIN:
        shown = "n/a" if acc is None else f"{100 * acc:.1f}%"
        return (
            f"validation accuracy at chance ({shown} <= {100 * chance:.1f}% + "
            f"{100 * CHANCE_MARGIN:g} pp)"
        )
    return None


def _closeness(point: Point, recipe: Point) -> tuple[float, float, int]:
    return (abs(math.log(point.lr / recipe.lr)), point.lr, abs(point.warmup - recipe.warmup))


def select(
    head: str,
    runs: dict[Point, list[dict[str, Any]]],
    recipe: Point,
    chance: float,
) -> dict[str, Any]:
    """The tuning summary of one head: every grid point's runs, and the chosen point.

    ``runs`` maps each grid point to its tuning runs' records (``accuracy`` is the validation
    accuracy). See the module docstring for the rule.

    >>> rec = lambda acc: {"accuracy": acc, "final_train_loss": 0.5, "spec": {"seed": 0}}
    >>> runs = {Point(0.01): [rec(0.8)], Point(0.02): [rec(0.9)], Point(0.04): [rec(0.9)]}
    >>> select("avg", runs, Point(0.02), 0.1)["chosen"]
    {'lr': 0.02, 'warmup': 0}

    ``lr_at_edge`` is ``"lowest"`` or ``"highest"`` when the chosen lr is an end of the grid
    (the best may lie beyond it), else ``None``.
    >>> runs[Point(0.02)] = [rec(0.1)]
    >>> out = select("avg", runs, Point(0.02), 0.1)
    >>> out["chosen"], [p["diverged"] is not None for p in out["points"]], out["lr_at_edge"]
    ({'lr': 0.04, 'warmup': 0}, [False, True, False], 'highest')
    """
    points = []
    for point, recs in runs.items():
        accs = [r.get("accuracy") for r in recs]
        why = next((w for w in (diverged(r, chance) for r in recs) if w), None)
        finite = [float(a) for a in accs if a is not None and math.isfinite(a)]
        mean = math.fsum(finite) / len(finite) if finite and len(finite) == len(accs) else None
        points.append(
            {
                "lr": point.lr,
                "warmup": point.warmup,
                "key": point.key,
                "val_accuracy": mean,
                "runs": [
                    {
                        "seed": r.get("spec", {}).get("seed"),
                        "val_accuracy": r.get("accuracy"),
                        "final_train_loss": r.get("final_train_loss"),
                        "steps": r.get("steps"),
                        "train_time_s": r.get("train_time_s"),
                        "label": r.get("label"),
                        "reused": r.get("reused"),
                    }
                    for r in recs
                ],
                "diverged": why,
                "_point": point,
            }
        )
    ok = [p for p in points if p["diverged"] is None and p["val_accuracy"] is not None]
    if ok:
        best = min(ok, key=lambda p: (-p["val_accuracy"], *_closeness(p["_point"], recipe)))
        chosen, all_diverged = best["_point"], False
    else:
        chosen, all_diverged = recipe, True
    for p in points:
        p["chosen"] = not all_diverged and p["_point"] == chosen
        del p["_point"]
    lrs = sorted({point.lr for point in runs})
    edge = None
    if not all_diverged and len(lrs) > 1 and chosen.lr in (lrs[0], lrs[-1]):
        edge = "lowest" if chosen.lr == lrs[0] else "highest"
    return {
        "head": head,
        "points": points,
        "chosen": {"lr": chosen.lr, "warmup": chosen.warmup},
        "all_diverged": all_diverged,
        "lr_at_edge": edge,
    }


def chosen_config(config: TrainConfig, summary: dict[str, Any]) -> TrainConfig:
    """``config`` at the head's chosen lr and warm-up (the recipe's if all diverged)."""
    return dataclasses.replace(
        config, lr=summary["chosen"]["lr"], warmup=summary["chosen"]["warmup"]
    )
