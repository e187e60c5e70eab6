"""Localisation scores on digits-shifted: the replayed digit boxes, the pointing game and the
energy in the box against a NumPy oracle, and the evaluation of kept runs."""

from __future__ import annotations

import numpy as np
import torch
from typer.testing import CliRunner

from globalpool.cam.localization import energy_in_box, evaluate, pointing_game, table
from globalpool.cli import app


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
    assert "| `avg` | cam | right | 1 |" in table(rows)
