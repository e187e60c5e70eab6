"""The attention pools' speed and memory benchmark runs end to end on tiny sizes, its baselines
agree with the modules, and it writes its table and record."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("attention_pool_speed")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_quick_run_writes_its_table_and_record(bench, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only wait on each other (a shared machine)
    try:
        bench.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "speed.json").read_text())
    rows = record["rows"]
    assert {(r["pool"], r["input"], r["layout"]) for r in rows} == {
        (p, i, lay) for p in bench.POOLS for i in ("tokens", "map")
        for lay in ("channels_first", "channels_last")
    }
    for r in rows:
        assert r["max_abs_difference"] < 1e-4
        assert set(r["ratio"]) == {"pool / composition", "pool / sdpa"}
        assert r["saved_bytes"]["pool"]["activations"] > 0
    assert record["meta"]["quick"] and len(record["meta"]["load_start"]) == 3
    md = (tmp_path / "speed.md").read_text()
    assert "| map | 3×10×16 | channels_last | " in md and "pool / sdpa" in md


def test_a_wrong_baseline_is_caught(bench):
    """The check before timing compares the baselines with the module."""
    x, real = bench.inputs((2, 8, 5), "channels_last")
    module = bench.build("simpool", 8, (5,), "channels_last")
    methods = {"pool": lambda t, r: module(t, r),
               "composition": bench.plain("simpool", module, "channels_last", bench.by_hand),
               "sdpa": lambda t, r: module(t, r) * 1.01}
    with pytest.raises(AssertionError):
        bench.check(methods, x, real)
    assert torch.equal(real[0], torch.ones(5, dtype=torch.bool))
