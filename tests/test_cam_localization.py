"""Localisation scores on digits-shifted: the replayed digit boxes, the pointing game and the
energy in the box against a NumPy oracle, and the evaluation of kept runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from globalpool.lab.cam.localization import (
    energy_in_box,
    evaluate,
    main,
    pointing_game,
    summarize,
    table,
)
from globalpool.lab.cli import app


def test_scores_match_a_numpy_oracle():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(20, 9, 7, generator=g)
    maps[3] = -1.0  # no positive value: a miss and no energy
    boxes = torch.stack(
        [torch.randint(0, 5, (20,), generator=g), torch.randint(0, 4, (20,), generator=g),
         torch.full((20,), 3), torch.full((20,), 2)], 1)
    hit, energy = pointing_game(maps, boxes), energy_in_box(maps, boxes)
    for i in range(20):
        m = maps[i].numpy()
        r, c, h, w = boxes[i].tolist()
        inside = np.zeros_like(m, bool)
        inside[r : r + h, c : c + w] = True
        top = np.unravel_index(m.argmax(), m.shape)
        assert bool(hit[i]) == (bool(inside[top]) and m.max() > 0)
        pos = np.maximum(m, 0)
        want = pos[inside].sum() / pos.sum() if pos.sum() > 0 else 0.0
        assert abs(float(energy[i]) - want) < 1e-6
    assert not hit[3] and energy[3] == 0


def test_evaluate_kept_digits_shifted_runs(tmp_path):
    out = tmp_path / "res"
    args = ["compare", "--dataset", "digits-shifted", "--train-sizes", "200", "--epochs", "1",
            "--seeds", "1", "--heads", "avg,fc", "--threads", "1", "--workers", "1"]
    run = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert run.exit_code == 0, run.output
    rows = evaluate(out, methods=("cam", "layercam"), sets=("right",))
    assert {(r["head"], r["method"]) for r in rows} == {
        ("avg", "cam"), ("avg", "layercam"), ("fc", "layercam")}
    assert all(0 <= r["pointing"] <= 1 and 0 <= r["energy"] <= 1 for r in rows)
    assert "| `avg` | cam | right | 1 |" in table(summarize(rows))
    loc = tmp_path / "loc"
    assert main([str(out), str(loc)]) == 0
    summary = json.loads((loc / "localization.json").read_text())
    assert [(r["head"], r["method"], r["set"]) for r in summary[:3]] == [
        ("fc", "gradcam", "test"), ("fc", "gradcam", "everywhere"), ("fc", "gradcam", "right")]
    assert set(summary[0]) == {"head", "method", "set", "seeds", "pointing_game", "energy_in_box"}
    assert summary[0]["seeds"] == 1 and summary[0]["pointing_game"]["ci95"] is None
    assert (loc / "localization.png").read_bytes()[:4] == b"\x89PNG"
    assert "| `avg` | cam | everywhere | 1 |" in (loc / "localization.md").read_text()


def test_summary_is_mean_and_t_interval_over_seeds_in_percent():
    values = {0: (0.9, 0.3), 2: (0.5, 0.1), 1: (0.7, 0.2)}  # seed: (pointing, energy)
    rows = [{"head": h, "method": "cam", "set": name, "seed": seed, "pointing": p, "energy": e}
            for name in ("right", "everywhere") for h in ("zz", "max", "avg")
            for seed, (p, e) in values.items()]
    summary = summarize(rows)
    assert [(r["head"], r["set"]) for r in summary[:4]] == [
        ("avg", "everywhere"), ("avg", "right"), ("max", "everywhere"), ("max", "right")]
    assert summary[-1]["head"] == "zz"
    first = summary[0]
    assert first["seeds"] == 3 and first["pointing_game"]["values"] == pytest.approx([90, 70, 50])
    # t_{0.975, 2} = 4.302653; sample sd of (90, 70, 50) is 20, of (30, 20, 10) is 10
    assert first["pointing_game"]["mean"] == pytest.approx(70)
    assert first["pointing_game"]["ci95"] == pytest.approx(4.302653 * 20 / 3**0.5, rel=1e-5)
    assert first["energy_in_box"]["ci95"] == pytest.approx(4.302653 * 10 / 3**0.5, rel=1e-5)
    assert "| `avg` | cam | everywhere | 3 | 70.0 ± 49.7 | 20.0 ± 24.8 |" in table(summary)


@pytest.mark.parametrize("name", ["render", "localization", "localization_plot"])
def test_lab_cam_doctests_pass(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"globalpool.lab.cam.{name}"))
    assert result.failed == 0 and result.attempted > 0
