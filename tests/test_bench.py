"""The benchmark harness on tiny shapes: files, ratios, FAILED/ERROR reporting, memory counting."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from globalpool.lab.bench.cache import cache_flusher
from globalpool.lab.bench.check import ReferenceCache, check_method
from globalpool.lab.bench.command import bench, bench_memory
from globalpool.lab.bench.memory import saved_bytes
from globalpool.lab.bench.methods import SEED_METHODS, Method, default_methods
from globalpool.lab.bench.report import machine_info, write_report
from globalpool.lab.bench.runner import run_case
from globalpool.lab.bench.shapes import Case, Shape, parse_shapes
from globalpool.lab.bench.timing import time_backward, time_forward

TINY = Case(Shape("tiny", (3, 8, 5, 4)), "channels_first", torch.float32, "cpu")


def _fused_available() -> bool:
    try:
        from globalpool import kernels
    except ImportError:
        return False
    if not hasattr(kernels, "supports"):
        return False
    try:
        return bool(kernels.supports(torch.zeros(2, 3, 4), "avg", None))
    except Exception:
        return False


def _off_by_five_percent(case: Case):
    dims = case.spatial_dims
    return lambda x, params: x.mean(dims) * 1.05


def _raises(case: Case):
    def fn(x, params):
        raise RuntimeError("no kernel here")

    return fn


WRONG = Method("test:wrong", "torch", "avg", _off_by_five_percent, lambda c: "mean * 1.05")
BROKEN = Method("test:broken", "torch", "avg", _raises, lambda c: "raises")


def test_bench_writes_json_markdown_png(tmp_path):
    data = bench(
        device="cpu",
        dtype="float32",
        layout="all",
        kinds="avg,max,gem,attention",
        shapes="2x8x5x5,2x6x7",
        repeats=2,
        compile=False,
        out=tmp_path,
    )
    assert (tmp_path / "bench.json").exists()
    assert (tmp_path / "bench.md").exists()
    assert (tmp_path / "bench_cpu_float32.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["machine"]["torch"] == torch.__version__
    assert saved["settings"]["cache"] == "cold"  # the default outside --quick
    assert len(saved["cases"]) == 4  # 2 shapes x 2 layouts
    assert {c["cache"] for c in saved["cases"]} == {"cold"}
    for case in data["cases"]:
        assert case["ceiling"]["forward"]["gbps"] > 0
        for m in case["methods"]:
            if m["family"] == "fused" and m["status"] != "ok":
                continue  # fused kernels may not be built yet; reported, not fatal
            assert m["status"] == "ok", m
            for d in ("forward", "backward"):
                assert m[d]["ratio"] > 0 and m[d]["gbps"] > 0 and m[d]["median_s"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "Ratio to ceiling" in md and "seed:mean" in md


def test_wrong_method_is_failed_and_not_timed():
    result = run_case(TINY, [WRONG, BROKEN, *SEED_METHODS[:1]], repeats=2)
    by_id = {m["id"]: m for m in result["methods"]}
    assert by_id["test:wrong"]["status"] == "FAILED"
    assert "forward" not in by_id["test:wrong"]
    assert by_id["test:wrong"]["check"]["forward_error"] > 0.01
    assert by_id["test:broken"]["status"] == "ERROR"
    assert "no kernel here" in by_id["test:broken"]["error"]
    assert by_id["seed:avg_pool"]["status"] == "ok"
    assert by_id["seed:avg_pool"]["forward"]["ratio"] > 0


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dims", [(2, 4, 6), (2, 4, 3, 5), (2, 3, 2, 3, 4)])
def test_every_default_method_passes_its_check(layout, dims):
    case = Case(Shape("t", dims), layout, torch.float32, "cpu")
    methods = [m for m in default_methods(("avg", "max", "catavgmax", "gem"), compile=False)]
    methods = [m for m in methods if m.family != "fused"]
    result = run_case(case, methods, repeats=1, warmup=0)
    assert all(m["status"] == "ok" for m in result["methods"]), result["methods"]


def test_first_argmax_rule_for_adaptive_max_with_ties():
    case = Case(Shape("ties", (2, 3, 4, 4)), "channels_last", torch.float32, "cpu")
    x = torch.zeros(case.tensor_shape)  # every position ties
    adaptive = next(m for m in SEED_METHODS if m.id == "seed:adaptive_max_pool")
    amax = next(m for m in SEED_METHODS if m.id == "seed:amax")
    refs = ReferenceCache(case, x)
    g = torch.randn(2, 3)
    xg = x.clone().requires_grad_(True)
    assert check_method(adaptive.build(case), "max", "first", xg, {}, g, refs).ok
    assert check_method(amax.build(case), "max", "shared", xg, {}, g, refs).ok
    # the shared rule is not the first-arg-max rule: swapping them must fail
    assert not check_method(adaptive.build(case), "max", "shared", xg, {}, g, refs).ok


def test_backward_timing_does_not_accumulate_grad():
    x = torch.randn(2, 3, 8, requires_grad=True)
    g = torch.ones(2, 3)
    t = time_backward(lambda: x.mean(2), [x], g, device="cpu", repeats=3)
    assert x.grad is None and t.repeats == 3
    f = time_forward(lambda: x.sum(), device="cpu", repeats=7, budget_s=0.0)
    assert f.repeats == 3  # cut to the minimum by the budget


def test_cold_cache_flushes_before_every_timed_sample():
    log: list[str] = []
    ref = {"ref": lambda: log.append("ref")}
    time_forward(
        lambda: log.append("fn"),
        device="cpu",
        repeats=4,
        flush=lambda: log.append("F"),
        references=ref,
    )
    # every call (warm-up and estimates included) is preceded by a flush
    assert all(log[i - 1] == "F" for i, v in enumerate(log) if v != "F"), log
    assert log.count("fn") >= 4 and log.count("ref") >= 4
    log.clear()
    x = torch.randn(2, 3, 8, requires_grad=True)
    time_backward(
        lambda: (log.append("fwd"), x.mean(2))[1],
        [x],
        torch.ones(2, 3),
        device="cpu",
        repeats=3,
        flush=lambda: log.append("F"),
    )
    # the flush comes after the untimed forward, right before the timed backward
    assert log[:2] == ["fwd", "F"] and log.count("F") == log.count("fwd")


def test_quick_defaults_to_warm_caches(tmp_path):
    data = bench(quick=True, kinds="avg", shapes="2x4x3x3", repeats=1, out=tmp_path)
    assert data["settings"]["cache"] == "warm" and data["settings"]["quick"]
    cold = bench(quick=True, kinds="avg", shapes="2x4x3x3", repeats=1, cache="cold", out=tmp_path)
    assert cold["settings"]["cache"] == "cold"


def test_cache_modes():
    assert cache_flusher("cpu", "warm") is None
    cache_flusher("cpu", "cold")()
    with pytest.raises(ValueError, match="cache must be one of"):
        cache_flusher("cpu", "lukewarm")


def test_saved_bytes_counts_unique_storages():
    x = torch.randn(4, 8, 6, 6)
    n = x.numel() * 4
    assert saved_bytes(lambda x, p: x.mean((2, 3)), x, {})["total_bytes"] == 0
    amax = saved_bytes(lambda x, p: x.amax((2, 3)), x, {})
    assert amax["input_bytes_saved"] == n and amax["output_bytes_saved"] == 4 * 8 * 4
    # two views of one intermediate count once
    two = saved_bytes(lambda x, p: (x * 2)[:, :4].exp().sum() + (x * 2)[:, 4:].sum(), x, {})
    assert two["other_bytes_saved"] <= 2 * n


def test_composed_gem_saves_about_three_inputs(tmp_path):
    data = bench_memory(
        kinds="avg,gem", layout="channels_first", dtype="float32", shape="4x16x7x7", out=tmp_path
    )
    rows = {(r["kind"], r["family"]): r for r in data["rows"]}
    assert rows[("avg", "torch")]["total_bytes"] == 0
    assert 2.5 < rows[("gem", "torch")]["ratio_to_input"] < 3.5
    assert (tmp_path / "memory.md").exists() and (tmp_path / "memory.json").exists()


@pytest.mark.skipif(not _fused_available(), reason="fused kernels not available")
def test_fused_avg_saves_no_input_sized_bytes(tmp_path):
    data = bench_memory(
        kinds="avg,max,gem", layout="all", dtype="float32", shape="4x16x7x7", out=tmp_path
    )
    for r in data["rows"]:
        if r["family"] == "fused" and r["kind"] == "avg":
            assert r["status"] == "ok" and r["total_bytes"] == 0, r
    # gem saves only the input and the output (max's target is reported, not asserted here)
    gem = [t for t in data["targets"] if t["kind"] in ("avg", "gem")]
    assert gem and all(t["met"] for t in gem), gem


def test_cli_registration_and_bad_arguments(tmp_path):
    from globalpool.lab.cli import app

    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "bench",
            "--shapes",
            "2x4x3x3",
            "--kinds",
            "avg",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--layout",
            "channels_last",
            "--repeats",
            "1",
            "--no-compile",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "bench.json").exists()
    bad = runner.invoke(app, ["bench", "--shapes", "2x4", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and bad.stderr.startswith("Error: --shapes: must be names from")
    bad = runner.invoke(app, ["bench", "--cache", "lukewarm", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "Error: --cache: must be one of" in bad.stderr
    assert parse_shapes("tokens")[0].dims == (32, 768, 196)


# --- honest figures: ratios from the medians printed next to them, spreads, labels ----------------


def _torch_methods(kind: str = "avg") -> list[Method]:
    """Seed and composed methods of ``kind``: nothing to compile."""
    return [m for m in default_methods((kind,), compile=False) if m.family != "fused"]


def test_json_ratio_is_computed_from_stored_medians_with_spreads():
    result = run_case(TINY, _torch_methods(), repeats=3, warmup=0)
    for m in result["methods"]:
        for d in ("forward", "backward"):
            t = m[d]
            assert t["ratio"] == t["ceiling_median_s"] / t["median_s"]
            assert t["min_s"] <= t["median_s"] <= t["max_s"]
            assert t["ceiling_min_s"] <= t["ceiling_median_s"] <= t["ceiling_max_s"]
        bwd = m["backward"]
        assert bwd["ratio_write"] == bwd["write_median_s"] / bwd["median_s"]
        assert bwd["write_min_s"] <= bwd["write_median_s"] <= bwd["write_max_s"]
    for c in result["ceiling"].values():
        assert c["min_s"] <= c["median_s"] <= c["max_s"]


_MS = r"(\d+\.\d{3}) \((\d+\.\d{3})–(\d+\.\d{3})\)"  # median (min–max)


def test_markdown_ratio_matches_the_medians_beside_it(tmp_path):
    cases = [run_case(TINY, _torch_methods(), repeats=3, warmup=0)]
    data = {"machine": machine_info(), "settings": {}, "cases": cases, "targets": []}
    md = write_report(data, tmp_path)["markdown"].read_text()
    # a method row: label | ok | fwd ms | paired x.sum() ms | fwd ratio | GB/s | bwd ms | paired
    # fill_ ms | bwd ratio | paired buf.fill_ ms | ratio to write | ...
    row = re.compile(
        rf"^\| `[^`]+` \| ok \| {_MS} \| {_MS} \| (\d+\.\d\d) \| [^|]+ \| {_MS} \| {_MS} \| "
        rf"(\d+\.\d\d) \| {_MS} \| (\d+\.\d\d) \|",
        flags=re.M,
    )
    rows = row.findall(md)
    assert len(rows) == len(cases[0]["methods"]), md
    for cells in rows:
        values = [float(v) for v in cells]
        groups = [values[0:3], values[3:6], values[7:10], values[10:13], values[14:17]]
        for median, lo, hi in groups:
            assert lo <= median <= hi
        pairs = [  # (method median, ceiling median, printed ratio)
            (values[0], values[3], values[6]),
            (values[7], values[10], values[13]),
            (values[7], values[14], values[17]),
        ]
        for method, ceiling, printed in pairs:
            # the printed medians carry 3 decimals: bound the ratio's rounding error
            slack = 0.005 + ceiling / method * (0.0005 / method + 0.0005 / ceiling) * 1.01
            assert abs(printed - ceiling / method) <= slack, (method, ceiling, printed)
    assert "separate ceiling runs" in md.lower() and "not a ratio's denominator" in md


def test_speedup_table_has_no_rows_for_baselines_that_did_not_run(tmp_path):
    fake = Method("fused:avg", "fused", "avg", lambda case: lambda x, p: x.mean(case.spatial_dims),
                  lambda c: "fake fused")  # fmt: skip
    cases = [run_case(TINY, [*_torch_methods(), fake], repeats=1, warmup=0)]
    data = {"machine": machine_info(), "settings": {}, "cases": cases, "targets": []}
    md = write_report(data, tmp_path)["markdown"].read_text()
    assert "| avg | torch |" in md
    assert "| compile |" not in md  # compile was off: no row of dashes for it


def test_console_omits_targets_when_the_run_has_none(tmp_path, monkeypatch):
    from globalpool.lab.bench import command
    from globalpool.lab.cli import app

    monkeypatch.setattr(command, "default_methods", lambda kinds, compile: SEED_METHODS[:1])
    args = ["bench", "--shapes", "2x4x3x3", "--layout", "channels_first", "--repeats", "1"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "bench finished in" in result.stderr
    assert "targets met" not in result.stderr  # no "targets met 0/0"
    assert command._targets_text({"targets": [{"met": True}, {"met": False}]}) == (
        "; targets met 1/2"
    )


def _plot_case(layout: str, dtype: str = "float32") -> dict:
    def rec(mid: str, family: str, status: str = "ok") -> dict:
        timed = {"forward": {"ratio": 0.7}, "backward": {"ratio": 0.4}} if status == "ok" else {}
        return {"id": mid, "family": family, "kind": "avg", "status": status, **timed}

    methods = [
        rec("seed:mean", "seed"),
        rec("torch:avg", "torch"),
        rec("compile:avg", "compile", "ERROR"),  # no bar anywhere: no legend entry
        rec("fused:avg", "fused"),
    ]
    return {"device": "cpu", "dtype": dtype, "layout": layout, "shape_name": "big",
            "methods": methods}  # fmt: skip


def test_plot_legend_has_no_empty_families_and_target_lines_are_labelled():
    import matplotlib.pyplot as plt

    from globalpool.lab.bench.plot import figure

    targets = [
        {"device": "cpu", "target": f"{d} ratio to ceiling", "kind": "avg", "layout": lay,
         "threshold": thr, "shapes": ["big"]}
        for d, thr in (("forward", 0.9), ("backward", 0.8))
        for lay in ("channels_first", "channels_last")
    ]  # fmt: skip
    cases = [_plot_case(lay, dt) for lay in ("channels_first", "channels_last")
             for dt in ("float32", "bfloat16")]  # fmt: skip
    data = {"cases": cases, "targets": targets, "machine": {"name": "test machine"}}
    fig = figure(data, "cpu", "float32")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["seed", "torch", "fused"]
    for row in fig.axes[0:2], fig.axes[2:4]:
        for ax, threshold in zip(row, (0.9, 0.8), strict=True):
            texts = [t.get_text() for t in ax.texts]
            assert f"target {threshold:g} (big)" in texts and "ceiling = 1" in texts, texts
            dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
            assert [ln.get_label() for ln in dashed] == [f"target {threshold:g} (big)"]
    plt.close(fig)
    fig = figure(data, "cpu", "bfloat16")  # the CPU targets concern float32 only
    assert all("target" not in t.get_text() for ax in fig.axes for t in ax.texts)
    plt.close(fig)
