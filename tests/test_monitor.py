"""``gp.monitor``: statistics against direct computation, hooks removed, outputs untouched, views,
and ``compare --monitor`` end to end."""

from __future__ import annotations

import importlib
import json
import math
import warnings

import numpy as np
import pytest
import torch
from rich.table import Table
from torch import nn

import globalpool as gp
from globalpool.lab.models import build_model
from globalpool.monitor import FLUSH_BYTES, FLUSH_CALLS, call_stats

# --- helpers -------------------------------------------------------------------------------------


def hook_counts(model: nn.Module) -> dict[str, int]:
    return {
        name: len(m._forward_hooks) + len(m._forward_pre_hooks)
        for name, m in model.named_modules()
    }


def expected(outputs: list[torch.Tensor], floor: float = 0.0) -> dict:
    """Statistics of the pooled outputs ``(N, C, ...)`` computed directly (NumPy, float64); a
    channel is dead when no value is above ``floor``."""
    y = np.concatenate([  # (C, every value of the channel)
        o.detach().double().numpy().reshape(o.shape[0], o.shape[1], -1).transpose(1, 0, 2)
        .reshape(o.shape[1], -1)
        for o in outputs
    ], axis=1)
    flat = y.reshape(-1)
    finite = flat[np.isfinite(flat)]
    positive = np.where(np.isnan(y), 0.0, y) > floor
    dead = int((~positive.any(axis=1)).sum())
    return {
        "values": finite.size,
        "mean": finite.mean(),
        "std": finite.std(),
        "min": finite.min(),
        "max": finite.max(),
        "nan": int(np.isnan(flat).sum()),
        "inf": int(np.isinf(flat).sum()),
        "dead_channels": dead,
        "dead_fraction": dead / y.shape[0],
    }


def assert_stats(got: dict, want: dict) -> None:
    for key, value in want.items():
        if isinstance(value, int):
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def batches(n_calls: int, shape=(6, 5, 7), seed=0) -> list[torch.Tensor]:
    """ReLU'd inputs where channel 1 is never positive and channel 3 only in the last call."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for i in range(n_calls):
        x = torch.relu(torch.randn(*shape, generator=g) * 2 + 0.5)
        x[:, 1] = 0.0
        if i < n_calls - 1:
            x[:, 3] = 0.0
        xs.append(x)
    return xs


# --- statistics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["avg", "max", "catavgmax", "lse"])
def test_statistics_equal_direct_computation_over_several_calls(kind):
    pool = gp.GlobalPool(kind)
    xs = batches(4)
    with gp.monitor(pool) as stats:
        outs = [pool(x) for x in xs]
    got = stats[""]
    assert got["calls"] == 4 and got["input_shape"] == [6, 5, 7]
    assert got["output_shape"] == list(outs[-1].shape)
    assert got["kind"] == kind and got["type"] == "GlobalPool"
    want = expected(outs)
    assert want["dead_channels"] == (2 if kind == "catavgmax" else 1)  # channel 3 came alive
    assert_stats(got, want)


def test_nan_and_inf_are_counted_and_left_out_of_the_moments():
    pool = gp.GlobalPool("max")
    xs = batches(3)
    xs[0][0, 2, 3] = float("nan")
    xs[1][2, 4, 0] = float("inf")
    xs[1][3, 0, :] = -float("inf")
    with gp.monitor(pool) as stats:
        outs = [pool(x) for x in xs]
    want = expected(outs)
    assert (want["nan"], want["inf"]) == (1, 2)
    assert_stats(stats[""], want)


def test_fast_and_general_paths_agree():
    y = torch.randn(9, 4, 3, generator=torch.Generator().manual_seed(0))
    y[:, 2] = -1.0
    fast, general = call_stats(y, fast=True), call_stats(y, fast=False)
    for a, b in zip(fast[:7], general[:7], strict=True):
        assert float(a) == pytest.approx(float(b), rel=1e-12)
    assert float(fast[4]) == float(y.max())
    torch.testing.assert_close(fast[7].double(), general[7], rtol=1e-5, atol=0)  # float32 sums
    assert float(fast[7][2]) == 0.0 and bool((fast[7][[0, 1, 3]] > 0).all())


def test_more_calls_than_one_flush():
    pool = gp.GlobalPool("avg")
    xs = batches(FLUSH_CALLS + 5, shape=(3, 5, 2), seed=1)
    with gp.monitor(pool) as stats:
        outs = [pool(x) for x in xs]
        inside = stats[""]["calls"]  # a view inside the block
    assert inside == FLUSH_CALLS + 5
    assert_stats(stats[""], expected(outs))


def test_many_small_flushes_other_batch_sizes_and_outputs_larger_than_the_buffer(monkeypatch):
    """The reused buffer: flushes every few calls, slots re-cut for another batch size, outputs
    too large for it reduced at once (twice in a row), a channel alive only in the last call."""
    monitor_module = importlib.import_module("globalpool.monitor")
    monkeypatch.setattr(monitor_module, "FLUSH_BYTES", 3 * 6 * 5 * 8)  # 3 calls of (6, 5) f64
    xs = batches(9, shape=(6, 5, 7), seed=3)
    for at, n in ((2, 2), (5, 40), (6, 40)):  # another batch size; two larger than the buffer
        x = torch.relu(torch.randn(n, 5, 7))
        x[:, 1] = x[:, 3] = 0.0
        xs.insert(at, x)
    pool = gp.GlobalPool("avg")
    with gp.monitor(pool) as stats:
        outs = [pool(x) for x in xs]
    assert_stats(stats[""], expected(outs))
    assert stats[""]["dead_channels"] == 1 and stats[""]["calls"] == len(xs)


def test_adaptive_outputs_keepdim_and_channels_last():
    net = nn.Sequential(
        gp.AdaptivePool((2, 3), "max", layout="channels_last"),
    )
    x = torch.relu(torch.randn(4, 6, 6, 5))
    x[..., 2] = -1.0
    with gp.monitor(net) as stats:
        y = net(x)
    want = expected([y.movedim(-1, 1)])
    assert want["dead_channels"] == 1
    assert_stats(stats["0"], want)
    keep = gp.GlobalPool("avg", keepdim=True)
    with gp.monitor(keep) as stats:
        y = keep(x.movedim(-1, 1))
    assert stats[""]["output_shape"] == [4, 5, 1, 1]
    assert_stats(stats[""], expected([y]))


def test_masked_samples_without_a_real_position_are_left_out():
    pool = gp.GlobalPool("avg")
    x = torch.rand(4, 3, 5) + 0.5
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1] = False  # pools to 0: not a value, not a dead channel
    mask[2, 3:] = False
    with gp.monitor(pool) as stats:
        y = pool(x, mask=mask)
    got = stats[""]
    assert got["empty_samples"] == 1 and got["dead_channels"] == 0
    assert_stats(got, {k: v for k, v in expected([y[[0, 2, 3]]]).items()})
    ad = gp.AdaptivePool(2, "avg")
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, :3] = False  # bin 0 of sample 0 is empty
    with gp.monitor(ad) as stats:
        y = ad(torch.rand(4, 3, 6) + 0.5, mask)
    assert stats[""]["empty_samples"] == 1 and stats[""]["values"] == 3 * 7
    assert stats[""]["min"] == pytest.approx(float(y[y > 0].min()))


def test_gem_p_is_reported_at_exit():
    head = gp.make_head("gem", 5, 3, p=2.5)
    with gp.monitor(head) as stats:
        head(batches(1)[0])
        assert stats["pool"]["p"] == pytest.approx(2.5, rel=1e-6)
        with torch.no_grad():
            head.pool.raw_p += 1.0
    assert stats["pool"]["p"] == pytest.approx(float(head.pool.p.detach()), rel=1e-6)
    fixed = gp.GlobalPool("gem", p=4.0)
    with gp.monitor(fixed) as stats:
        fixed(torch.rand(2, 3, 4))
    assert stats[""]["p"] == 4.0


def test_attention_entropy_matches_a_hand_computation():
    torch.manual_seed(0)
    att = gp.AttentionPool(5)
    nn.init.normal_(att.score.weight, std=2.0)
    x = torch.randn(4, 5, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2, 1:] = False  # one real position: no entropy
    mask[3] = False  # none
    calls = [(x, None), (x * 0.5, mask)]
    hand = []
    with gp.monitor(att) as stats:
        for xi, m in calls:
            att(xi, mask=m)
    for xi, m in calls:
        w = att.weights(xi, m).detach().double()
        real = torch.ones_like(w, dtype=torch.bool) if m is None else m
        for i in range(len(w)):
            n = int(real[i].sum())
            if n < 2:
                continue
            a = w[i][real[i]] / w[i][real[i]].sum()
            hand.append(float(-(a * a.log()).sum() / math.log(n)))
    assert len(hand) == 6
    got = stats[""]["attention_entropy"]
    assert got == pytest.approx(sum(hand) / len(hand), rel=1e-6)  # float32 weights
    assert 0.0 < got < 1.0


def test_torch_pools_are_recognised_and_a_shared_module_counts_once():
    shared = nn.AdaptiveAvgPool2d(1)
    net = nn.ModuleDict({"a": shared, "b": shared, "m": nn.AdaptiveMaxPool2d(1, return_indices=True)})
    x = torch.randn(3, 4, 5, 5)
    with gp.monitor(net) as stats:
        ya = net["a"](x)
        net["b"](x)
        ym, _ = net["m"](x)
        net["a"](x[0])  # unbatched (C, H, W)
    assert list(stats.as_dict()) == ["a", "m"]
    assert stats["a"]["calls"] == 3 and stats["a"]["values"] == 2 * 12 + 4
    assert_stats(stats["m"], expected([ym]))
    assert stats["a"]["min"] == pytest.approx(float(ya.min()))


def test_nin_head_and_include():
    net = build_model("cnn1d", "nin", 10, in_channels=1, spatial_size=(40,))
    with gp.monitor(net, include="head") as stats:
        logits = net(torch.randn(8, 1, 40))
    assert list(stats.as_dict()) == ["head"]
    assert stats["head"]["type"] == "NiNHead" and stats["head"]["channels"] == 10
    assert_stats(stats["head"], expected([logits]))
    with pytest.raises(ValueError, match="include names 'heads'"):
        gp.monitor(net, include="heads")
    with pytest.raises(TypeError, match="include must be"):
        gp.monitor(net, include=3)


def test_a_model_without_pooling_is_refused():
    with pytest.raises(ValueError, match=r"model \(Sequential\) has no pooling module"):
        gp.monitor(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        gp.monitor("resnet")


# --- hooks and side effects ---------------------------------------------------------------------


def multi_pool_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        "multiscale", "attention", 10, in_channels=1, spatial_size=(24,), width=4
    )


def test_every_hook_is_removed_on_exit_and_on_error():
    net = multi_pool_model()
    before = hook_counts(net)
    x = torch.randn(2, 1, 24)
    with gp.monitor(net) as stats:
        assert stats.active and hook_counts(net) != before
        net(x)
    assert hook_counts(net) == before and not stats.active
    with pytest.raises(RuntimeError, match="boom"), gp.monitor(net):
        net(x)
        raise RuntimeError("boom")
    assert hook_counts(net) == before
    bad = torch.randn(2, 3, 24)  # a forward that raises inside the model
    with pytest.raises(RuntimeError), gp.monitor(net):
        net(bad)
    assert hook_counts(net) == before


def test_outputs_and_gradients_are_unchanged():
    x = torch.randn(3, 1, 24)
    results = []
    for monitored in (False, True):
        net = multi_pool_model()
        if monitored:
            with gp.monitor(net) as stats:
                y = net(x)
                y.square().sum().backward()
        else:
            y = net(x)
            y.square().sum().backward()
        results.append((y.detach(), [p.grad.clone() for p in net.parameters()]))
    (y0, g0), (y1, g1) = results
    assert torch.equal(y0, y1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert stats["head.pools.0"]["errors"] == 0 and stats["head.pools.0"]["calls"] == 1


def test_reentering_adds_to_the_statistics_and_nesting_is_refused():
    pool = gp.GlobalPool("avg")
    stats = gp.monitor(pool)
    xs = batches(2)
    with stats:
        y0 = pool(xs[0])
        with pytest.raises(RuntimeError, match="already active"), stats:
            pass
    pool(xs[1])  # outside: not recorded
    with stats:
        y1 = pool(xs[1])
    assert stats[""]["calls"] == 2
    assert_stats(stats[""], expected([y0, y1]))


# --- views --------------------------------------------------------------------------------------


def test_views(tmp_path):
    net = multi_pool_model()
    x = torch.randn(4, 1, 24)
    x[0, 0, 0] = float("nan")
    with gp.monitor(net) as stats:
        net(x)
        net(torch.randn(4, 1, 24))
    data = stats.as_dict()
    assert list(data) == ["head.pools.0", "head.pools.1", "head.pools.2"]
    text = stats.to_json(tmp_path / "m.json")
    assert json.loads(text) == json.loads((tmp_path / "m.json").read_text()) == data
    assert data["head.pools.0"]["attention_entropy"] is not None
    table = stats.table()
    assert isinstance(table, Table) and table.row_count == 3
    lines = str(stats).splitlines()
    assert lines[0].split()[:3] == ["module", "type", "calls"]
    assert len(lines) == 5 and lines[2].startswith("head.pools.0  AttentionPool")
    assert "MonitorStats(['head.pools.0'" in repr(stats)
    with pytest.raises(KeyError, match="no monitored module 'x'"):
        stats["x"]


# --- compare --monitor --------------------------------------------------------------------------


def test_compare_monitor_records_every_epoch_and_plots(tmp_path):
    from typer.testing import CliRunner

    from globalpool.lab.cli import app

    def compare(*extra: str):
        args = ["compare", "--train-sizes", "200", "--epochs", "2", "--heads", "gem,attention,fc",
                "--seeds", "2", "--workers", "1", "--threads", "1", *extra]
        return CliRunner().invoke(app, args)

    out = tmp_path / "mon"
    result = compare("--out", str(out), "--monitor")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    assert summary["meta"]["config"]["monitor"] is True
    runs = {(r["spec"]["head"], r["spec"]["seed"]): r for r in summary["runs"]}
    assert len(runs) == 6
    for (head, _seed), run in runs.items():
        mon = run["monitor"]
        assert mon["samples"] == 256 and mon["source"] == "test"
        assert [e["epoch"] for e in mon["epochs"]] == [1, 2]
        assert [e["step"] for e in mon["epochs"]] == [40, 80]  # 4000 / 100 steps per epoch
        for entry in mon["epochs"]:
            if head == "fc":
                assert entry["modules"] == {}
                continue
            stats = entry["modules"]["head.pool"]
            assert stats["calls"] == 1 and stats["values"] == 256 * 25
            assert stats["input_shape"] == [256, 25, 5] and stats["nan"] == 0
            assert 0.0 <= stats["dead_fraction"] <= 1.0 and stats["std"] > 0
            assert ("p" in stats) == (head == "gem")
            assert ("attention_entropy" in stats) == (head == "attention")
    # the last epoch's statistics are those of the trained model on that batch
    from globalpool.lab.data import load_dataset
    from globalpool.lab.experiments.saved import find_runs, load_run

    x = load_dataset("mnist1d").x_test[:256]
    for path in find_runs(out):
        model, record = load_run(path)
        if record["spec"]["head"] == "fc":
            continue
        with torch.no_grad():
            y = model.head.pool(model.backbone(x))
        got = record["monitor"]["epochs"][-1]["modules"]["head.pool"]
        assert_stats(got, expected([y], 1.001e-6 if record["spec"]["head"] == "gem" else 0.0))
        if record["spec"]["head"] == "gem":
            assert got["p"] == pytest.approx(float(model.head.pool.p.detach())) and got["p"] != 3.0
    assert (out / "monitor.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "## Pooled features (`--monitor`)" in md and "![monitor](monitor.png)" in md

    plain = tmp_path / "plain"
    result = compare("--out", str(plain), "--no-save-models")
    assert result.exit_code == 0, result.output
    summary = json.loads((plain / "results.json").read_text())
    assert all("monitor" not in r for r in summary["runs"])
    assert not (plain / "monitor.png").exists() and "--monitor" not in (plain / "results.md").read_text()


def test_a_dead_gem_channel_pools_to_eps_and_counts_as_dead():
    gem = gp.GeM(p=3.0)
    x = torch.rand(4, 3, 6) + 0.1
    x[:, 0] = -1.0  # clamped to eps: pools to eps
    with gp.monitor(gem) as stats:
        y = gem(x)
    assert float(y[:, 0].max().detach()) == pytest.approx(1e-6, rel=1e-4)
    assert stats[""]["dead_channels"] == 1


def test_outputs_changed_in_place_later_and_large_outputs():
    pool = gp.AdaptivePool(None, "avg")  # keeps the size: a large output when the input is
    xs = [torch.randn(2, 3, 8), torch.randn(5, 3, 8), torch.randn(2, 3, 4)]  # bins change
    big = torch.randn(2, 8, 2 ** 17)  # 8 MiB of output: reduced at once, not copied
    with gp.monitor(pool) as stats:
        outs = [pool(x) for x in xs]
        wanted = expected(outs)
        for y in outs:
            y.zero_()  # the caller reuses the outputs: the statistics must not change
    assert_stats(stats[""], wanted)
    assert big.numel() * 4 > FLUSH_BYTES
    with gp.monitor(pool) as stats:
        y = pool(big)
    assert_stats(stats[""], expected([y]))


def test_learnable_lse_temperature_is_reported():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), gp.LSEPool(r=2.0, channels=4))
    with gp.monitor(net) as stats:
        net(torch.randn(2, 3, 6, 6))
    rec = stats.as_dict()["1"]
    assert rec["kind"] == "lse" and "p" not in rec
    assert rec["r"]["min"] == pytest.approx(2.0, rel=1e-5)
    assert rec["r"]["max"] == pytest.approx(2.0, rel=1e-5)
    assert "p / r" in str(stats)


# --- a gem inside a tuple of kinds ------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", [("avg", "gem"), ("gem", "max"), ("catavgmax", "gem", "lse")],
    ids=["avg-gem", "gem-max", "catavgmax-gem-lse"],
)
@pytest.mark.parametrize("module", ["GlobalPool", "AdaptivePool"])
def test_dead_gem_channels_inside_a_tuple_of_kinds(kind, module):
    """Channels 1 (zeros) and 3 (negative) are dead in every block of the output: never above 0
    in the avg / max / lse blocks, never above eps in gem's (gem clamps them to eps)."""
    pool = (
        gp.GlobalPool(kind, p=2.0, eps=1e-4)
        if module == "GlobalPool"
        else gp.AdaptivePool(1, kind, p=2.0, eps=1e-4)
    )
    x = torch.rand(3, 5, 6) + 0.1
    x[:, 1] = 0.0
    x[:, 3] = -2.0
    with gp.monitor(pool) as stats:
        y = pool(x).reshape(3, -1)
    blocks = gp.output_width(kind, 1)
    gem = 5 * (blocks - 1 - list(reversed(kind)).index("gem"))  # where gem's block starts
    assert float(y[:, gem + 1].max()) == pytest.approx(1e-4, rel=1e-3)  # pools to eps, > 0
    record = stats[""]
    assert record["channels"] == 5 * blocks and record["p"] == 2.0
    assert record["dead_channels"] == 2 * blocks
    assert record["dead_fraction"] == pytest.approx(2 / 5)


def test_fixed_gem_p_of_a_tuple_and_of_an_adaptive_pool_is_reported():
    for pool in (gp.GlobalPool(("avg", "gem")), gp.AdaptivePool((2,), "gem", p=5.0)):
        with gp.monitor(pool) as stats:
            pool(torch.rand(2, 3, 8))
        assert stats[""]["p"] == (3.0 if isinstance(pool, gp.GlobalPool) else 5.0)
        assert "p / r" in str(stats)


# --- torch.compile: compiled code skips hooks added after compiling ---------------------------


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), gp.GeM(backend="torch"), nn.Linear(4, 3))


def test_a_compiled_model_that_already_ran_is_recorded():
    net = _small_net()
    compiled = torch.compile(net, backend="eager")
    xs = [torch.rand(2, 2, 9) for _ in range(2)]
    want = [compiled(x) for x in xs]  # compiled (and run) before the monitor
    forward = compiled.__dict__["forward"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every call is recorded: nothing to warn about
        with gp.monitor(compiled) as stats:
            got = [compiled(x) for x in xs]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    with gp.monitor(net) as eager:
        outputs = [net[:3](x) for x in xs]
    record = stats["_orig_mod.2"]
    assert record["calls"] == 2 and record["values"] == 16
    assert_stats(record, expected(outputs, floor=1e-6 * 1.001))
    assert record["mean"] == pytest.approx(eager["2"]["mean"], rel=1e-12)
    # after the block the compiled forward is back, and no hook is left
    assert compiled.__dict__["forward"] is forward and all(v == 0 for v in hook_counts(net).values())


def test_a_model_compiled_in_place_is_recorded():
    net = _small_net()
    net.compile(backend="eager")
    x = torch.rand(2, 2, 9)
    net(x)
    compiled_call = net._compiled_call_impl
    with gp.monitor(net) as stats:
        net(x)
    assert stats["2"]["calls"] == 1 and net._compiled_call_impl is compiled_call


def test_calls_that_bypass_the_hooks_are_warned_about():
    net = _small_net()
    compiled = torch.compile(net, backend="eager")
    x = torch.rand(2, 2, 9)
    compiled(x)
    warned = pytest.warns(
        UserWarning,
        match=r"recorded no call of \['2'\] inside the block: .*torch.compile .* "
        r"gp.monitor\(compiled\)",
    )
    with warned, gp.monitor(net) as stats:  # the hooks are on net; compiled code skips them
        compiled(x)
    assert stats["2"]["calls"] == 0
