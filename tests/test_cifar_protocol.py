"""The CIFAR-10 head-comparison protocol: invariance test sets, the train - test gap column,
``--recipe``, bfloat16 backbones with float32 heads, the quarter-width ResNet-18."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from globalpool.lab.cli import app
from globalpool.lab.data import Dataset, load_dataset
from globalpool.lab.data.invariance import place_on_canvas, shift_images, with_invariance_tests
from globalpool.lab.experiments.report import markdown_table, summarize
from globalpool.lab.experiments.runner import count_correct, precision_context
from globalpool.lab.experiments.spec import RECIPES, TrainConfig
from globalpool.lab.models import build_model, count_parameters
from helpers import image_archive


def _shift_reference(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(img)
    h, w = img.shape[1:]
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[:, i, j] = img[:, i - dy, j - dx]
    return out


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 6), st.integers(1, 6), st.lists(st.tuples(st.integers(-5, 5), st.integers(-5, 5)),
    min_size=1, max_size=4),
)  # fmt: skip
def test_shift_images_matches_a_pixel_loop(h, w, offsets):
    x = torch.randn(len(offsets), 2, h, w)
    got = shift_images(x, torch.tensor(offsets))
    for k, (dy, dx) in enumerate(offsets):
        np.testing.assert_array_equal(got[k].numpy(), _shift_reference(x[k].numpy(), dy, dx))


def test_canvas_holds_each_image_once_and_zeros_elsewhere():
    x = torch.rand(20, 3, 5, 4) + 1.0  # never 0
    canvas = place_on_canvas(x, 8, torch.Generator().manual_seed(0))
    assert canvas.shape == (20, 3, 13, 12)
    assert ((canvas != 0).sum((1, 2, 3)) == 3 * 5 * 4).all()
    assert torch.allclose(canvas.sum((1, 2, 3)), x.sum((1, 2, 3)))
    tops = {int((canvas[i, 0] != 0).any(1).nonzero()[0]) for i in range(20)}
    assert len(tops) > 1, "positions must vary"


def test_invariance_sets_are_fixed_and_the_train_subset_is_stratified():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 8, 8, generator=g)
    y = torch.arange(40) % 4
    data = Dataset("toy", x, y, x[:12], y[:12], num_classes=4, spatial_rank=2)
    a, b = with_invariance_tests(data, train_subset=20), with_invariance_tests(data, train_subset=20)
    for name in ("shifted", "canvas", "train-subset"):
        assert torch.equal(a.extra_tests[name][0], b.extra_tests[name][0]), name
    xs, ys = a.extra_tests["train-subset"]
    assert len(xs) == 20 and torch.bincount(ys).tolist() == [5, 5, 5, 5]
    assert torch.equal(a.extra_tests["shifted"][1], y[:12])
    with pytest.raises(ValueError, match="2d images"):
        with_invariance_tests(Dataset("t", x[:, 0], y, x[:, 0], y, num_classes=4, spatial_rank=1))


def test_gap_column_is_train_minus_test_per_seed():
    def rec(seed, test, train):
        accs = {"test": test, "train-subset": train, "canvas": None}
        return {
            "spec": {"head": "fc", "seed": seed}, "train_size": 100, "accuracy": test,
            "accuracies": accs, "params_total": 10, "params_head": 2, "train_time_s": 1.0,
            "peak_memory_bytes": 1, "train_throughput": 1.0, "eval_throughput": 1.0,
        }  # fmt: skip

    (row,) = summarize([rec(0, 0.8, 0.9), rec(1, 0.7, 1.0)])
    assert row["gap"]["values"] == pytest.approx([0.1, 0.3])
    table = markdown_table([row], {"train-subset": "train (no aug)"})
    assert "train − test gap pp" in table and "| 20.0 ± " in table


def test_bf16_backbone_feeds_a_float32_head():
    net = build_model("resnet18-w16", "gem", 10, in_channels=3, spatial_size=(32, 32))
    seen = []
    net.head.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    cfg = TrainConfig(1, 4, 0.1, precision="bf16", channels_last=True)
    with precision_context(cfg, torch.device("cpu")):
        out = net(torch.randn(2, 3, 32, 32))
    assert seen == [torch.float32] and out.dtype == torch.float32
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6) % 10
    net.eval()
    assert 0 <= count_correct(net, x, y, torch.device("cpu"), 4, cfg) <= 6


def test_quarter_width_resnet_sizes():
    avg = build_model("resnet18-w16", "avg", 10, in_channels=3, spatial_size=(32, 32))
    fc = build_model("resnet18-w16", "fc", 10, in_channels=3, spatial_size=(32, 32))
    assert count_parameters(avg.backbone) == 700_176
    assert count_parameters(fc.head) == 128 * 4 * 4 * 1024 + 1024 + 1024 * 10 + 10
    assert avg(torch.randn(1, 3, 40, 40)).shape == (1, 10)


def test_train_config_refuses_unknown_precision():
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(1, 1, 0.1, precision="fp16")
    with pytest.raises(TypeError, match="channels_last must be a bool"):
        TrainConfig(1, 1, 0.1, channels_last=1)
    assert RECIPES["cifar-cpu"]["config"].precision == "bf16"


def test_folder_datasets_carry_the_invariance_sets(tmp_path):
    data = load_dataset(f"folder:{image_archive(tmp_path)}", data_dir=tmp_path / "cache", image_size=8)
    sizes = {k: tuple(v[0].shape) for k, v in data.test_sets().items()}
    assert sizes == {
        "test": (4, 3, 8, 8), "shifted": (4, 3, 8, 8), "canvas": (4, 3, 16, 16),
        "train-subset": (12, 3, 8, 8),
    }  # fmt: skip


@pytest.mark.slow
def test_compare_with_the_cpu_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOBALPOOL_CACHE_DIR", str(tmp_path / "cache"))
    args = [
        "compare", "--dataset", f"folder:{image_archive(tmp_path)}", "--recipe", "cifar-cpu",
        "--heads", "fc,avg", "--seeds", "1", "--epochs", "1", "--batch-size", "6",
        "--workers", "1", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    meta = summary["meta"]
    assert meta["model"] == "resnet18-w16"
    assert meta["config"]["precision"] == "bf16" and meta["config"]["channels_last"]
    fc, avg = summary["rows"]
    assert fc["accuracies"]["canvas"] is None and avg["accuracies"]["canvas"] is not None
    assert fc["gap"] is not None
    md = (tmp_path / "out" / "results.md").read_text()
    for label in ("shifted ±4 px acc %", "canvas +8 px acc %", "train − test gap pp"):
        assert label in md, label
    bad = CliRunner().invoke(app, [*args[:3], "--recipe", "gpu-fast", *args[5:]])
    assert bad.exit_code == 2 and "--recipe" in bad.output and "cifar-cpu" in bad.output
