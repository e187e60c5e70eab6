"""``globalpool cam``: PNG grids and JSON maps of the models a ``compare`` run kept."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import globalpool as gp
from globalpool.lab.cam.render import render_grid
from globalpool.lab.cli import app
from globalpool.lab.data import load_dataset
from globalpool.lab.experiments import find_runs, load_run

TINY = ["--train-sizes", "200", "--epochs", "1", "--seeds", "1", "--threads", "1", "--workers", "1"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cam") / "res"
    run = CliRunner().invoke(app, ["compare", *TINY, "--heads", "fc,gem,nin", "--out", str(out)])
    assert run.exit_code == 0, run.output
    return out


def test_cam_draws_every_head_and_saves_the_maps(results):
    run = CliRunner().invoke(app, ["cam", "--results", str(results), "--samples", "4"])
    assert run.exit_code == 0, run.output
    png, js = results / "cam" / "cam-mnist1d.png", results / "cam" / "cam-mnist1d.json"
    assert png.stat().st_size > 10_000
    saved = json.loads(js.read_text())
    assert [r["head"] for r in saved["runs"]] == ["fc", "gem", "nin"]
    assert [r["method"] for r in saved["runs"]] == ["gradcam", "gradcam", "cam"]
    data = load_dataset("mnist1d")
    assert len(set(saved["labels"])) == 4  # one sample of each of four classes
    x, y = data.x_test[saved["samples"]], data.y_test[saved["samples"]]
    assert y.tolist() == saved["labels"]
    by_head = {p.stem.split("-")[0]: p for p in find_runs(results)}
    for entry in saved["runs"]:  # the maps are those of the API on the kept model
        model, _ = load_run(by_head[entry["head"]])
        layer = "backbone" if entry["head"] == "fc" else None
        want = gp.class_activation_maps(model, x, y, layer=layer, method=entry["method"])
        torch.testing.assert_close(torch.tensor(entry["maps"]), want, rtol=1e-5, atol=1e-6)


def test_cam_of_one_run_and_its_errors(results, tmp_path):
    (nin,) = [p for p in find_runs(results) if p.name.startswith("nin")]
    args = ["cam", "--results", str(nin.with_suffix(".pt")), "--out", str(tmp_path), "--target", "pred"]
    run = CliRunner().invoke(app, [*args, "--method", "layercam"])
    assert run.exit_code == 0, run.output
    saved = json.loads((tmp_path / "cam-mnist1d.json").read_text())
    assert saved["runs"][0]["method"] == "layercam" and saved["target"] == "pred"
    bad = CliRunner().invoke(app, ["cam", "--results", str(results), "--method", "scorecam"])
    assert bad.exit_code == 2 and "--method: must be one of" in bad.output
    missing = CliRunner().invoke(app, ["cam", "--results", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "neither a compare results directory" in missing.output
    other_seed = CliRunner().invoke(app, ["cam", "--results", str(results), "--seed", "7"])
    assert other_seed.exit_code == 1 and "no run of seed 7" in other_seed.output


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 3, 8, 8), (2, 1, 4, 6, 6)])
def test_render_grid_2d_and_3d(shape, tmp_path):
    x = torch.randn(shape)
    maps = {"avg": torch.rand(2, *[s // 2 for s in shape[2:]])}
    assert render_grid(x, maps, tmp_path / "g.png").stat().st_size > 1000
