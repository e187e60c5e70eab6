"""``globalpool cam``: PNG grids and JSON maps of the models a ``compare`` run kept."""

from __future__ import annotations

import json
import shutil

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


# --- folder: data from another working directory -----------------------------------------------

TINY_FOLDER = [
    "compare", "--model", "cnn2d", "--heads", "avg", "--seeds", "1", "--epochs", "1",
    "--batch-size", "8", "--workers", "1", "--threads", "1",
]  # fmt: skip


def _pets(root, seed):
    """``root/pets/<cat|dog>/*.png``: 16 tiny images whose pixels depend on ``seed``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in ("cat", "dog"):
        (root / "pets" / name).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "pets" / name / f"{i}.png")
    return root / "pets"


@pytest.fixture
def folder_runs(tmp_path, monkeypatch):
    """Runs made by ``compare --dataset folder:pets`` in ``made/``; ``elsewhere/`` has no pets,
    ``impostor/`` has other images in a ``pets/`` of its own."""
    monkeypatch.setenv("GLOBALPOOL_CACHE_DIR", str(tmp_path / "cache"))
    dirs = {name: tmp_path / name for name in ("made", "elsewhere", "impostor")}
    _pets(dirs["made"], 0)
    dirs["elsewhere"].mkdir()
    _pets(dirs["impostor"], 1)
    results = tmp_path / "res"
    monkeypatch.chdir(dirs["made"])
    run = CliRunner().invoke(app, [*TINY_FOLDER, "--dataset", "folder:pets", "--out", str(results)])
    assert run.exit_code == 0, run.output
    return results, dirs


def _cam(results, where, monkeypatch):
    monkeypatch.chdir(where)
    args = ["cam", "--results", str(results), "--out", str(where / "cam"), "--samples", "2"]
    return CliRunner().invoke(app, args)


def test_cam_of_a_relative_folder_run_from_any_directory(folder_runs, monkeypatch):
    results, dirs = folder_runs
    (path,) = find_runs(results)
    record = json.loads(path.read_text())
    assert record["spec"]["dataset"] == f"folder:{dirs['made'] / 'pets'}"  # recorded absolute
    for where in ("elsewhere", "impostor"):  # not this directory's pets/
        run = _cam(results, dirs[where], monkeypatch)
        assert run.exit_code == 0, run.output
        (saved,) = (dirs[where] / "cam").glob("cam-*.json")
        assert json.loads(saved.read_text())["dataset"] == f"folder:{dirs['made'] / 'pets'}"
    # The images changed since the runs: refused, naming both digests.
    _pets(dirs["elsewhere"] / "new", 2)
    for name in ("cat", "dog"):
        shutil.rmtree(dirs["made"] / "pets" / name)
        shutil.move(dirs["elsewhere"] / "new" / "pets" / name, dirs["made"] / "pets" / name)
    run = _cam(results, dirs["elsewhere"], monkeypatch)
    assert run.exit_code == 1, run.output
    recorded = record["spec"]["env"]["data"]
    line = run.output.strip().splitlines()[-1]
    assert line.startswith(f"Error: folder:{dirs['made'] / 'pets'} is not the data run ")
    assert f"the run recorded data digest {recorded}" in line
    assert "the data changed since the run" in line


def test_cam_of_a_run_recorded_with_a_relative_folder_path(folder_runs, monkeypatch):
    # Records written before compare made folder: paths absolute hold the path as typed.
    results, dirs = folder_runs
    (path,) = find_runs(results)
    record = json.loads(path.read_text())
    record["spec"]["dataset"] = "folder:pets"
    path.write_text(json.dumps(record))
    recorded = record["spec"]["env"]["data"]

    run = _cam(results, dirs["made"], monkeypatch)  # from its own directory: as before
    assert run.exit_code == 0, run.output
    run = _cam(results, dirs["elsewhere"], monkeypatch)
    assert run.exit_code == 1, run.output
    line = run.output.strip().splitlines()[-1]
    assert line.startswith(
        f"Error: cannot load folder:pets (a relative path, read here as "
        f"folder:{dirs['elsewhere'] / 'pets'}) to draw its maps: "
    )
    assert line.endswith("run cam from that directory")
    run = _cam(results, dirs["impostor"], monkeypatch)  # another pets/: never drawn silently
    assert run.exit_code == 1, run.output
    line = run.output.strip().splitlines()[-1]
    assert line.startswith("Error: folder:pets (a relative path, read here as ")
    assert f"the run recorded data digest {recorded}" in line
    assert line.endswith("run cam from that directory")
