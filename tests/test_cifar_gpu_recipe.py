"""The ``cifar-gpu`` recipe: FastNet (patch whitening, logit scale), label smoothing, the
triangular schedule, shifts of 2 pixels, flip TTA; tiny CPU runs; old cache keys unchanged;
the GPU table script's checks."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from globalpool.lab.cli import app
from globalpool.lab.data import Dataset
from globalpool.lab.experiments.provenance import RunEnv
from globalpool.lab.experiments.runner import (
    count_correct,
    lr_factor,
    train_and_evaluate,
    training_loss,
)
from globalpool.lab.experiments.spec import DEFAULTS, RECIPES, RunSpec, TrainConfig
from globalpool.lab.models import build_model, count_parameters, registry
from globalpool.lab.models.fastnet import FastNet, PatchWhitening

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_cifar_table.py"


class TinyFastNet(FastNet):
    """FastNet at width 4, so a CPU test trains it in a moment."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, width=4, **kwargs)


def _archive(tmp_path: Path, per_class: int = 50, size: int = 16) -> Path:
    """A tar.gz of 4 classes x (``per_class`` train + 10 test) PNGs of ``size``x``size`` RGB."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src" / "tiny"
    for split, n in (("train", per_class), ("test", 10)):
        for k, name in enumerate(("a", "b", "c", "d")):
            (src / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                pixels[..., k % 3] //= 2  # a faint class signal
                Image.fromarray(pixels).save(src / split / name / f"{i}.png")
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="tiny")
    return archive


def test_recipe_settings_and_model_size():
    recipe = RECIPES["cifar-gpu"]
    cfg = recipe["config"]
    assert recipe["model"] == "fastnet"
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.optimizer) == (12, 1024, 0.8, "sgd")
    assert (cfg.schedule, cfg.warmup, cfg.label_smoothing, cfg.crop_padding) == (
        "linear", 120, 0.2, 2
    )
    assert cfg.flip_tta and cfg.channels_last and cfg.precision == "bf16"
    avg = build_model("fastnet", "avg", 10, in_channels=3, spatial_size=(32, 32))
    # trainable backbone: 3x3 convs 24-64, 64-64, 64-256, 256-256 x 3, and their batch norms
    convs = 9 * (24 * 64 + 64 * 64 + 64 * 256 + 3 * 256 * 256)
    norms = 2 * (64 + 64 + 256 * 4)
    assert count_parameters(avg.backbone) == convs + norms == 1_969_920
    assert avg.feature_shape == (256, 3, 3)
    assert avg.logit_scale == 0.125
    fc = build_model("fastnet", "fc", 10, in_channels=3, spatial_size=(32, 32))
    assert count_parameters(fc.head) == 256 * 9 * 1024 + 1024 + 1024 * 10 + 10
    assert avg(torch.randn(1, 3, 40, 40)).shape == (1, 10)  # the larger canvas


def test_existing_cache_keys_are_unchanged():
    """The new settings are off by default, so no earlier run's cache key moves."""
    env = RunEnv(1, 1, "cpu", "AVX512", "2.13.0+cpu", "0.1.0", "0123456789ab")
    expected = {
        "mnist1d": "a59271b28b", "digits-shifted": "c6de90d2ec", "cifar10": "04e20ff3bc",
        "folder": "7453735a7a", "cifar-cpu": "e6ae97e821", "cifar-resnet18": "71b8742291",
    }  # fmt: skip
    found = {
        name: RunSpec("d", d["model"], "avg", 0, None, d["config"], env).fingerprint
        for name, d in [*DEFAULTS.items(), *RECIPES.items()]
        if name != "cifar-gpu"
    }
    assert found == expected


def test_whitening_matches_a_numpy_eigendecomposition():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 3, generator=g)  # correlated channels
    images = torch.einsum("dc,nchw->ndhw", mix, torch.randn(40, 3, 9, 9, generator=g))
    stem = PatchWhitening(3, eps=1e-2)
    stem.fit(images)
    # NumPy, float64: every 2x2 patch as (c, dy, dx) flattened, its covariance, eigen-basis
    x = images.double().numpy()
    patches = np.stack(
        [x[:, :, i : i + 2, j : j + 2].reshape(len(x), -1) for i in range(8) for j in range(8)], 1
    ).reshape(-1, 12)
    cov = np.cov(patches, rowvar=False)
    lam, vec = np.linalg.eigh(cov)
    out = stem(images).double().permute(0, 2, 3, 1).reshape(-1, 24).numpy()
    white, negated = out[:, :12], out[:, 12:]
    np.testing.assert_allclose(negated, -white, atol=1e-6)
    # the whitened patches' covariance is diag(lambda / (lambda + eps)), largest first
    want = (lam / (lam + 1e-2))[::-1]
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.diag(want), atol=2e-4)
    # each filter is an eigenvector scaled by 1 / sqrt(lambda + eps), up to sign
    filters = stem.conv.weight[:12].double().reshape(12, 12).numpy()
    scaled = (vec / np.sqrt(lam + 1e-2)).T[::-1]
    np.testing.assert_allclose(np.abs(filters), np.abs(scaled), atol=1e-5)
    assert not stem.conv.weight.requires_grad


def test_unfitted_stem_passes_pixels_and_their_negatives():
    x = torch.randn(2, 3, 4, 4)
    out = PatchWhitening(3)(x)
    assert torch.equal(out[:, 0], x[:, 0, :-1, :-1]) and torch.equal(out[:, 13], -x[:, 0, :-1, 1:])


def test_linear_schedule_is_a_triangle():
    steps, warm = 100, 20
    f = [lr_factor("linear", s, steps, warm) for s in range(steps + 1)]
    assert f[0] == pytest.approx(1 / 20 * (1 - 0 / 100))
    assert f[19] == pytest.approx(1 - 19 / 100) and max(f) == f[19]
    assert all(a <= b for a, b in zip(f[:20], f[1:20], strict=False))
    assert all(a > b for a, b in zip(f[19:], f[20:], strict=False)) and f[-1] == 0.0


def test_label_smoothing_matches_its_definition():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.tensor([0, 1, 4, 2, 3, 0])
    eps = 0.2
    target = torch.full((6, 5), eps / 5, dtype=torch.float64)
    target[torch.arange(6), y] += 1 - eps
    want = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
    got = training_loss(logits, y, TrainConfig(1, 1, 0.1, label_smoothing=eps))
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    plain = training_loss(logits, y, TrainConfig(1, 1, 0.1))
    assert float(plain) == pytest.approx(float(-torch.log_softmax(logits, 1)[torch.arange(6), y].mean()), rel=1e-6)


def test_flip_tta_sums_the_logits_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    net = TinyFastNet("gem", 4, spatial_size=(16, 16)).eval()
    x, y = torch.randn(30, 3, 16, 16), torch.randint(0, 4, (30,))
    cfg = TrainConfig(1, 1, 0.1, flip_tta=True)
    with torch.no_grad():
        logits = net(x) + net(torch.flip(x, dims=[3]))
    want = int((logits.argmax(1) == y).sum())
    assert count_correct(net, x, y, torch.device("cpu"), 7, cfg) == want


def test_new_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="label_smoothing must be a number in \\[0, 1\\)"):
        TrainConfig(1, 1, 0.1, label_smoothing=1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(1, 1, 0.1, label_smoothing="0.1")
    with pytest.raises(ValueError, match="crop_padding must be a non-negative int, got -1"):
        TrainConfig(1, 1, 0.1, crop_padding=-1)
    with pytest.raises(TypeError, match="flip_tta must be a bool"):
        TrainConfig(1, 1, 0.1, flip_tta=1)
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(1, 1, 0.1, schedule="triangle")
    with pytest.raises(ValueError, match="logit_scale must be a finite number > 0, got 0"):
        TinyFastNet("avg", 4, spatial_size=(16, 16), logit_scale=0)
    with pytest.raises(ValueError, match="at least \\(16, 16\\) for FastNet"):
        FastNet("avg", 4, spatial_size=(8, 8))
    x1 = torch.randn(8, 1, 20)
    y1 = torch.arange(8) % 2
    data = Dataset("toy", x1, y1, x1, y1, num_classes=2, spatial_rank=1)
    spec = RunSpec("toy", "cnn1d", "avg", 0, None, TrainConfig(1, 4, 0.1, flip_tta=True))
    with pytest.raises(ValueError, match="flip_tta=True needs 2d images, got 1d data"):
        train_and_evaluate(spec, data, device=torch.device("cpu"))


def test_a_tiny_run_fits_the_whitening_before_training():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 16, 16, generator=g), torch.arange(64) % 4
    data = Dataset("toy", x, y, x[:16], y[:16], num_classes=4, spatial_rank=2)
    registry.MODELS["tiny-fastnet"] = TinyFastNet
    try:
        cfg = dataclasses.replace(
            RECIPES["cifar-gpu"]["config"], epochs=2, batch_size=32, warmup=2, precision="fp32"
        )
        spec = RunSpec("toy", "tiny-fastnet", "max", 0, None, cfg)
        kept = []
        record = train_and_evaluate(spec, data, device=torch.device("cpu"), on_model=kept.append)
    finally:
        del registry.MODELS["tiny-fastnet"]
    assert record["steps"] == 4 and np.isfinite(record["final_train_loss"])
    stem = kept[0].backbone[0]
    fitted = PatchWhitening(3)
    fitted.fit(x)
    assert torch.allclose(stem.conv.weight, fitted.conv.weight, atol=1e-6)


def test_compare_with_the_gpu_recipe_on_a_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOBALPOOL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(registry.MODELS, "fastnet", TinyFastNet)  # CPU-sized
    args = [
        "compare", "--dataset", f"folder:{_archive(tmp_path)}", "--recipe", "cifar-gpu",
        "--heads", "avg,max,gem", "--seeds", "2", "--epochs", "1", "--workers", "1",
        "--no-save-models", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    cfg = summary["meta"]["config"]
    assert summary["meta"]["model"] == "fastnet"
    assert (cfg["label_smoothing"], cfg["crop_padding"], cfg["flip_tta"]) == (0.2, 2, True)
    assert (cfg["schedule"], cfg["warmup"], cfg["batch_size"]) == ("linear", 120, 1024)
    rows = {r["head"]: r for r in summary["rows"]}
    assert rows["avg"]["vs_avg"] is None
    for head in ("max", "gem"):
        diff = rows[head]["vs_avg"]
        runs = {r["spec"]["seed"]: r["accuracy"] for r in summary["runs"] if r["spec"]["head"] == head}
        base = {r["spec"]["seed"]: r["accuracy"] for r in summary["runs"] if r["spec"]["head"] == "avg"}
        assert diff["values"] == pytest.approx([runs[s] - base[s] for s in (0, 1)])
    md = (tmp_path / "out" / "results.md").read_text()
    for text in (
        "Δ vs `avg` pp (paired)", "label smoothing 0.2", "crop-flip (shifts up to 2 px)",
        "flip test-time augmentation", "linear, linear warm-up 120 steps",
    ):  # fmt: skip
        assert text in md, text
    # --report-only rewrites the report from the cached runs, and trains nothing
    (tmp_path / "out" / "results.md").unlink()
    again = CliRunner().invoke(app, [*args, "--report-only"])
    assert again.exit_code == 0, again.output
    meta = json.loads((tmp_path / "out" / "results.json").read_text())["meta"]
    assert (meta["runs_this_call"], meta["runs_reused"]) == (0, 6)
    assert "Δ vs `avg` pp (paired)" in (tmp_path / "out" / "results.md").read_text()
    more = [*args[: args.index("--seeds") + 1], "3", *args[args.index("--seeds") + 2 :]]
    refused = CliRunner().invoke(app, [*more, "--report-only"])
    assert refused.exit_code == 1
    assert "--report-only: 3 of 9 runs are not in" in refused.output and "nothing trained" in refused.output
    assert json.loads((tmp_path / "out" / "results.json").read_text())["meta"]["seeds"] == 2


def test_gpu_table_script_stops_at_once_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "sees no CUDA device" in proc.stdout and "nothing run" in proc.stdout
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["packages"]["torch"] == torch.__version__ and env["cuda_available"] is False


def _script():
    spec = importlib.util.spec_from_file_location("gpu_cifar_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_table_script_time_guard(tmp_path, monkeypatch):
    """Rounds of 1 .. N seeds; no round starts that the last one says cannot end in time; a
    round cut at the limit ends the table at the rounds before it."""
    script = _script()
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    archive.write_bytes(b"")
    monkeypatch.setattr(script, "environment", lambda: {"packages": {"torch": "x"}})
    clock = [0.0]
    monkeypatch.setattr(script.time, "monotonic", lambda: clock[0])
    calls = []

    def fake_round(cmd, timeout, log, env, *, cost=100.0, status="done"):
        calls.append((cmd[cmd.index("--seeds") + 1], timeout))
        clock[0] += min(cost, timeout)
        return status if cost <= timeout else "stopped"

    monkeypatch.setattr(script, "run_round", fake_round)
    base = ["--allow-cpu", "--data", str(archive), "--work", str(tmp_path / "w"), "--seeds", "5"]
    # 100 s a round, 540 s in all, 15 s kept for the end: rounds 1-4 fit (400 s), the fifth
    # would need 1.2 x 100 s with 125 s left: it starts, and ends in time
    assert script.main([*base, "--out", str(tmp_path / "a")]) == 0
    assert [c[0] for c in calls] == ["1", "2", "3", "4", "5"]
    assert calls[1][1] == pytest.approx(540 - 100 - 15)
    # 300 s limit: round 3 would need 120 s with 85 s left, so it does not start
    calls.clear()
    clock[0] = 0.0
    assert script.main([*base, "--out", str(tmp_path / "b"), "--time-limit", "300"]) == 3
    assert [c[0] for c in calls] == ["1", "2"]
    summary = (tmp_path / "b" / "summary.txt").read_text()
    assert "2 of 5" in summary and "stopped before seed 2: 85 s left" in summary
    # a round longer than the time left is cut: the table holds the rounds before it
    calls.clear()
    clock[0] = 0.0
    monkeypatch.setattr(
        script, "run_round", lambda *a: fake_round(*a, cost=1000.0)
    )
    assert script.main([*base, "--out", str(tmp_path / "c")]) == 3
    assert "0 of 5" in (tmp_path / "c" / "summary.txt").read_text()
    assert "round 1 (seed 0) stopped" in (tmp_path / "c" / "summary.txt").read_text()
    # the real command line: the recipe, the heads, the cache outside --out
    cmd = script.compare_command(script.parse_args(["--epochs", "1"]), archive, 3, "cuda")
    assert cmd[cmd.index("--recipe") + 1] == "cifar-gpu" and "--no-save-models" in cmd
    assert cmd[cmd.index("--heads") + 1] == "avg,max,catavgmax,gem,attention,fc"
    assert cmd[cmd.index("--device") + 1] == "cuda" and cmd[-2:] == ["--epochs", "1"]


def test_gpu_table_script_needs_the_data(tmp_path, monkeypatch):
    script = _script()
    monkeypatch.delenv("CIFAR10_ARCHIVE", raising=False)
    monkeypatch.setattr(script, "environment", lambda: {"packages": {"torch": "x"}})
    monkeypatch.setattr(script, "ROOT", tmp_path)
    assert script.main(["--allow-cpu", "--out", str(tmp_path / "o")]) == 2
    monkeypatch.setattr(script, "environment", lambda: {"packages": {"torch": "x", "scipy": None}})
    assert script.main(["--allow-cpu", "--out", str(tmp_path / "o")]) == 2


def test_fastnet_doctests():
    import doctest

    from globalpool.lab.models import fastnet

    assert doctest.testmod(fastnet).failed == 0
