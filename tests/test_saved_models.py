"""``compare`` keeps each run's trained weights beside its record; ``load_run`` rebuilds the model
with them (checked against the recorded accuracy and weights digest)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from globalpool.lab.cli import app
from globalpool.lab.data import load_dataset
from globalpool.lab.experiments import find_runs, load_run
from globalpool.lab.experiments.runner import count_correct

TINY = ["--train-sizes", "200", "--epochs", "1", "--seeds", "1", "--threads", "1"]


def compare(*args: str):
    return CliRunner().invoke(app, ["compare", *TINY, *args])


@pytest.mark.parametrize("workers", ["1", "2"])  # in this process, and in worker processes
def test_compare_keeps_models_that_reproduce_their_accuracy(tmp_path, workers):
    out = tmp_path / "res"
    result = compare("--heads", "nin,catavgmax", "--out", str(out), "--workers", workers)
    assert result.exit_code == 0, result.output
    runs = find_runs(out)
    assert len(runs) == 2 and all(p.with_suffix(".pt").is_file() for p in runs)
    data = load_dataset("mnist1d")
    for path in runs:
        model, record = load_run(path)
        assert record["model_file"] == path.with_suffix(".pt").name
        assert not model.training and model.head_name == record["spec"]["head"]
        correct = count_correct(model, data.x_test, data.y_test, torch.device("cpu"), 1000)
        assert correct / len(data.y_test) == record["accuracy"]
        same, _ = load_run(path.with_suffix(".pt"))  # the weights file names the run too
        assert torch.equal(same(data.x_test[:5]), model(data.x_test[:5]))


def test_no_save_models_and_broken_weights(tmp_path):
    out = tmp_path / "res"
    result = compare("--heads", "avg", "--out", str(out), "--workers", "1", "--no-save-models")
    assert result.exit_code == 0, result.output
    (path,) = find_runs(out)
    assert not path.with_suffix(".pt").exists()
    with pytest.raises(ValueError, match="kept no weights"):
        load_run(path)
    # weights that are not the run's own are refused by the digest check
    record = json.loads(path.read_text())
    other = compare("--heads", "avg", "--out", str(tmp_path / "b"), "--workers", "1")
    assert other.exit_code == 0, other.output
    (saved,) = find_runs(tmp_path / "b")
    state = torch.load(saved.with_suffix(".pt"), weights_only=True)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, saved.with_suffix(".pt"))
    with pytest.raises(ValueError, match="weights_digest"):
        load_run(saved)
    assert "model_file" not in record
    torch.save({"conv.weight": torch.zeros(1)}, saved.with_suffix(".pt"))  # another model's
    with pytest.raises(ValueError, match="do not fit the model"):
        load_run(saved)
    with pytest.raises(ValueError, match="cannot be read"):
        load_run(tmp_path / "missing.json")


def test_saved_doctests_pass():
    import doctest

    import globalpool.lab.experiments.saved as saved

    result = doctest.testmod(saved)
    assert result.failed == 0 and result.attempted > 0
