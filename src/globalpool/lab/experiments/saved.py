"""Rebuild the trained model of a finished ``compare`` run from its record and weights file.

``compare`` writes each run's weights (``state_dict``) beside its JSON record as ``<run>.pt``
unless told ``--no-save-models``; :func:`load_run` rebuilds the model (same model, head and
dataset shape), loads the weights, checks them against the record's ``weights_digest`` and
returns it in eval mode.

>>> import tempfile, torch
>>> from globalpool.lab.data import Dataset
>>> from globalpool.lab.experiments import ResultStore, RunSpec, TrainConfig, train_and_evaluate
>>> x = torch.randn(32, 1, 40); y = (x.mean((1, 2)) > 0).long()
>>> data = Dataset("toy", x, y, x, y, num_classes=2, spatial_rank=1)
>>> spec = RunSpec("toy", "cnn1d", "nin", 0, None, TrainConfig(1, 32, 0.01))
>>> kept = []
>>> record = train_and_evaluate(spec, data, device=torch.device("cpu"), on_model=kept.append)
>>> path = ResultStore(tempfile.mkdtemp()).save(spec, record, model=kept[0])
>>> model, rec = load_run(path)
>>> type(model).__name__, model.head_name, torch.equal(model(x), kept[0](x))
('CNN1D', 'nin', True)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn


def find_runs(root: str | os.PathLike[str]) -> list[Path]:
    """Every run record (``*.json``) under a ``compare`` results directory, sorted.

    >>> import tempfile
    >>> find_runs(tempfile.mkdtemp())
    []
    """
    return sorted(Path(root).expanduser().glob("runs/*/*/*.json"))


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The run record at ``path`` (its ``.json``, or the ``.pt`` beside it)."""
    path = Path(path).expanduser()
    if path.suffix == ".pt":
        path = path.with_suffix(".json")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"run record {path} cannot be read ({type(err).__name__})") from None
    if not isinstance(record, dict) or "spec" not in record:
        raise ValueError(f"{path} is not a compare run record (no 'spec')")
    record["_path"] = str(path)
    return record


def build_from_record(record: dict[str, Any]) -> nn.Module:
    """A freshly initialised model shaped as the run's (model, head, classes, input shape)."""
    from globalpool.lab.models import build_model

    missing = [k for k in ("num_classes", "in_channels", "input_shape") if k not in record]
    if missing:
        raise ValueError(
            f"run record lacks {missing} (written by an older globalpool); re-run compare to "
            "rebuild its model"
        )
    spec = record["spec"]
    return build_model(
        spec["model"],
        spec["head"],
        record["num_classes"],
        in_channels=record["in_channels"],
        spatial_size=tuple(record["input_shape"]),
        backend=spec["config"].get("backend", "torch"),
    )


def load_run(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, record)`` of the run whose record (or weights file) is ``path``; the model has
    the trained weights and is in eval mode. ``ValueError`` if the run kept no weights or they
    do not match the record's digest."""
    from globalpool.lab.experiments.provenance import weights_digest

    record = read_record(path)
    json_path = Path(record["_path"])
    name = record.get("model_file")
    if not name:
        raise ValueError(
            f"run {record.get('label', json_path.name)} kept no weights (trained with "
            "--no-save-models or by an older globalpool); re-run compare to keep them"
        )
    weights = json_path.with_name(name)
    try:
        state = torch.load(weights, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"weights {weights} cannot be read ({type(err).__name__})") from None
    model = build_from_record(record)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # e.g. a head whose layers changed since the run was trained
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"weights {weights} do not fit the model this globalpool builds for run "
            f"{record.get('label')} ({first}); re-run compare to retrain it"
        ) from None
    digest = record.get("weights_digest")
    if digest is not None and weights_digest(model) != digest:
        raise ValueError(f"weights {weights} do not match the record's weights_digest {digest}")
    return model.eval(), record
