"""``globalpool cam``: draw the class activation maps of the models a ``compare`` run kept.

For a results directory (``compare --out``) it takes one run per dataset and head (``--seed``,
the largest training-set size), a few test samples (the first of each class in turn) and draws
one PNG grid per dataset (rows: samples, columns: heads) beside a JSON file with the maps.
A single run's ``.json`` or ``.pt`` as ``--results`` draws that run alone. Errors are one
``Error:`` line.

The test samples come from the dataset the runs recorded (``folder:`` with its absolute path),
and must be the data they were trained on: data whose digest is not the one each run recorded
(``spec.env.data``) is refused, naming both. Runs recorded before ``compare`` made ``folder:``
paths absolute read a relative path from the working directory: run ``cam`` where ``compare``
ran (the digest check refuses another folder of the same name).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from globalpool.lab.cli_errors import runtime_error, usage_error

TARGETS = ("true", "pred")


def cam(
    results: Annotated[
        Path,
        typer.Option(
            help="A compare results directory (compare's --out), or one run's .json/.pt file."
        ),
    ] = Path("globalpool-results"),
    out: Annotated[
        Path | None,
        typer.Option(help="Where the PNG and JSON go (default: RESULTS/cam, or beside the run)."),
    ] = None,
    samples: Annotated[int, typer.Option(help="Test samples per grid.")] = 6,
    method: Annotated[
        str,
        typer.Option(
            help="auto, cam, gradcam, gradcam++ or layercam; heads without an exact map "
            "use gradcam where cam is asked for."
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Which seed's runs to draw (results directory).")] = 0,
    target: Annotated[
        str, typer.Option(help="Map of the true class (true) or of the predicted one (pred).")
    ] = "true",
) -> None:
    """Draw test samples with each head's class activation maps (PNG grid + JSON) for the
    models a compare run kept."""
    from globalpool.cam import METHODS

    if method not in METHODS:
        raise usage_error("--method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    if samples < 1:
        raise usage_error("--samples", f"must be a positive int, got {samples}")
    if target not in TARGETS:
        raise usage_error("--target", f"must be one of {', '.join(TARGETS)}, got {target!r}")
    path = Path(results).expanduser()
    runs = _pick_runs(path, seed)
    out = Path(out) if out is not None else (path / "cam" if path.is_dir() else path.parent / "cam")
    written = []
    for dataset, paths in runs.items():
        written += _draw(dataset, paths, out, samples=samples, method=method, target=target)
    typer.echo(f"wrote {', '.join(str(p) for p in written)}")


def _pick_runs(path: Path, seed: int) -> dict[str, list[Path]]:
    """Run records to draw, by dataset: one per head (largest training set, newest)."""
    from globalpool.lab.experiments.saved import find_runs, read_record

    if path.is_file():
        try:
            record = read_record(path)
        except ValueError as err:
            raise runtime_error(str(err)) from None
        return {record["spec"]["dataset"]: [Path(record["_path"])]}
    if not path.is_dir():
        raise runtime_error(f"{path} is neither a compare results directory nor a run file")
    best: dict[tuple[str, str], tuple[Any, Path]] = {}
    for run in find_runs(path):
        try:
            record = read_record(run)
        except ValueError:
            continue
        spec = record["spec"]
        if spec.get("seed") != seed or not record.get("model_file"):
            continue
        size = spec.get("train_size")
        key = (spec["dataset"], spec["head"])
        rank = (float("inf") if size is None else size, record.get("finished_at", ""))
        if key not in best or rank > best[key][0]:
            best[key] = (rank, run)
    if not best:
        raise runtime_error(
            f"no run of seed {seed} with kept weights under {path / 'runs'}; run "
            f"'globalpool compare --out {path}' first (weights are kept unless --no-save-models)"
        )
    from globalpool import HEADS

    by_dataset: dict[str, list[Path]] = {}
    order = {h: i for i, h in enumerate(HEADS)}
    for (dataset, _), (_, run) in sorted(best.items(), key=lambda kv: order.get(kv[0][1], 99)):
        by_dataset.setdefault(dataset, []).append(run)
    return by_dataset


def _samples(y: Any, count: int) -> list[int]:
    """The first test sample of each class in turn (class 0, 1, ... then again)."""
    per_class: dict[int, list[int]] = {}
    for i, label in enumerate(y.tolist()):
        per_class.setdefault(int(label), []).append(i)
    picked: list[int] = []
    depth = 0
    while len(picked) < min(count, len(y)):
        for label in sorted(per_class):
            if depth < len(per_class[label]) and len(picked) < count:
                picked.append(per_class[label][depth])
        depth += 1
    return picked


def _layer_for(model: Any) -> str | None:
    """None where the model has a globalpool head; else (flatten + FC) its last feature map."""
    from globalpool.cam import auto_method

    try:
        auto_method(model)  # refuses a model without a globalpool head or pool
        return None
    except ValueError:
        if hasattr(model, "backbone"):
            return "backbone"
        if hasattr(model, "stages"):
            return f"stages.{len(model.stages) - 1}"
        raise


def _where(dataset: str) -> str:
    """The dataset, and for a relative ``folder:`` path (an older run record) where it is read."""
    from globalpool.lab.data.registry import absolute_spec, is_relative_spec

    if is_relative_spec(dataset):
        return f"{dataset} (a relative path, read here as {absolute_spec(dataset)})"
    return dataset


_RELATIVE_HINT = (
    "; its runs recorded a path relative to the directory compare ran in (globalpool did not "
    "record absolute paths then): run cam from that directory"
)


def _load_data(dataset: str) -> Any:
    """The dataset the runs named, as ``compare`` loaded it; a one-line error if it cannot be."""
    from globalpool.lab.data import load_dataset
    from globalpool.lab.data.registry import is_relative_spec

    try:
        return load_dataset(dataset, download=False)
    except Exception as err:
        hint = _RELATIVE_HINT if is_relative_spec(dataset) else ""
        raise runtime_error(
            f"cannot load {_where(dataset)} to draw its maps: {err}{hint}"
        ) from None


def _check_data(record: dict[str, Any], dataset: str, digest: str) -> None:
    """Refuse data whose digest is not the one the run recorded (``spec.env.data``): its maps
    would be those of a model on other images. Runs that recorded none get a warning."""
    from globalpool.lab.data.registry import is_relative_spec

    run = record.get("label") or record.get("_path")
    recorded = (record["spec"].get("env") or {}).get("data")
    if recorded is None:
        typer.echo(
            f"warning: run {run} recorded no data digest (an older globalpool): cannot check "
            f"that {_where(dataset)} holds the images it was trained on",
            err=True,
        )
    elif recorded != digest:
        hint = (
            _RELATIVE_HINT
            if is_relative_spec(dataset)
            else "; the data changed since the run: restore it, or re-run compare on it"
        )
        raise runtime_error(
            f"{_where(dataset)} is not the data run {run} was trained on: its digest is "
            f"{digest}, the run recorded data digest {recorded}{hint}"
        )


def _draw(
    dataset: str, paths: list[Path], out: Path, *, samples: int, method: str, target: str
) -> list[Path]:
    import torch

    from globalpool.cam import auto_method, class_activation_maps
    from globalpool.lab.cam.render import render_grid
    from globalpool.lab.experiments.provenance import data_digest
    from globalpool.lab.experiments.results import atomic_write, dataset_slug
    from globalpool.lab.experiments.saved import load_run

    data = _load_data(dataset)
    digest = data_digest(data)
    idx = _samples(data.y_test, samples)
    x, y = data.x_test[idx], data.y_test[idx]
    maps: dict[str, torch.Tensor] = {}
    titles: dict[str, str] = {}
    entries = []
    for path in paths:
        try:
            model, record = load_run(path)
        except ValueError as err:
            raise runtime_error(str(err)) from None
        _check_data(record, dataset, digest)
        head = record["spec"]["head"]
        layer = _layer_for(model)
        exact = layer is None and auto_method(model) == "cam"
        used = method
        if method == "auto" or (method == "cam" and not exact):
            used = "cam" if exact else "gradcam"
        with torch.no_grad():
            pred = model(x).argmax(1)
        targets = y if target == "true" else pred
        maps[head] = class_activation_maps(model, x, targets, layer=layer, method=used)
        titles[head] = f"{head} ({used}, acc {100 * record['accuracy']:.1f}%)"
        entries.append(
            {
                "run": record.get("label"),
                "record": str(path),
                "head": head,
                "method": used,
                "accuracy": record["accuracy"],
                "predicted": pred.tolist(),
                "maps": maps[head].tolist(),
            }
        )
    slug = dataset_slug(dataset)
    names = data.class_names if getattr(data, "class_names", None) else None
    rows = [
        f"test #{i}\nclass {names[int(c)] if names else int(c)}"
        for i, c in zip(idx, y.tolist(), strict=True)
    ]
    png = render_grid(x, maps, out / f"cam-{slug}.png", titles=rows, column_titles=titles)
    summary = {
        "dataset": dataset,
        "samples": idx,
        "labels": y.tolist(),
        "target": target,
        "runs": entries,
    }
    js = out / f"cam-{slug}.json"
    atomic_write(js, json.dumps(summary, indent=1) + "\n")
    return [png, js]
