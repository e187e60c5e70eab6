"""``globalpool compare``: statistics, the resumable store, reports, the CLI, errors and DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from globalpool.data import write_cifar10_fixture
from globalpool.experiments.command import parse_heads, parse_train_sizes
from globalpool.experiments.report import markdown_table, summarize
from globalpool.experiments.results import OutputError, ResultStore, check_writable
from globalpool.experiments.spec import RunSpec, TrainConfig
from globalpool.experiments.stats import mean_ci

# A tiny MNIST-1D config: 200 training samples, 40 steps of batch 100, ~0.2 s per run.
TINY = ["--train-sizes", "200", "--epochs", "1", "--heads", "avg,fc", "--seeds", "2"]
SEQUENTIAL = ["--workers", "1", "--threads", "1"]  # one process, no thread oversubscription
RECORD_KEYS = {
    "accuracy",
    "accuracies",
    "params_total",
    "params_head",
    "train_time_s",
    "peak_memory_bytes",
    "memory_method",
    "train_throughput",
    "eval_throughput",
    "world_size",
    "spec",
    "steps",
}


def invoke(*args: str):
    """``globalpool compare ARGS`` through the real command line (its error style)."""
    from globalpool.cli import app as cli

    return CliRunner().invoke(cli, ["compare", *args])


def run_files(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}


# --- statistics and parsing -------------------------------------------------------------------


def test_mean_ci_matches_student_t():
    from scipy import stats

    xs = [0.91, 0.93, 0.94, 0.90]
    mean, half = mean_ci(xs)
    lo, hi = stats.t.interval(0.95, len(xs) - 1, loc=stats.tmean(xs), scale=stats.sem(xs))
    assert mean == pytest.approx(sum(xs) / 4)
    assert half == pytest.approx((hi - lo) / 2)
    assert mean_ci([0.5]) == (0.5, None)
    with pytest.raises(ValueError):
        mean_ci([])


def test_parse_heads_and_sizes():
    from globalpool import HEADS

    assert parse_heads("all") == list(HEADS)
    assert parse_heads("gem,avg,gem") == ["gem", "avg"]
    with pytest.raises(ValueError, match="unknown head 'median'"):
        parse_heads("avg,median")
    assert parse_train_sizes(None) == [None]
    assert parse_train_sizes("full,100") == [100, None]
    with pytest.raises(ValueError, match="train-sizes"):
        parse_train_sizes("100,-3")


# --- store ------------------------------------------------------------------------------------


def test_store_keeps_configs_apart_and_ignores_broken_files(tmp_path):
    store = ResultStore(tmp_path)
    a = RunSpec("mnist1d", "cnn1d", "avg", 0, 200, TrainConfig(1, 100, 0.01))
    b = RunSpec("mnist1d", "cnn1d", "avg", 0, 200, TrainConfig(2, 100, 0.01))
    assert store.path(a) != store.path(b)
    same = RunSpec("mnist1d", "cnn1d", "avg", 0, 200, TrainConfig(1, 100, 0.01, augment="none"))
    other = RunSpec("mnist1d", "cnn1d", "avg", 0, 200, TrainConfig(1, 100, 0.01, backend="auto"))
    assert same.fingerprint == a.fingerprint != other.fingerprint  # defaults are not hashed
    assert store.path(a).name == "avg-seed0-n200.json"
    store.save(a, {"accuracy": 0.5})
    assert store.load(a) == {"accuracy": 0.5} and store.load(b) is None
    store.path(b).parent.mkdir(parents=True, exist_ok=True)
    store.path(b).write_text('{"accuracy": 0.')  # truncated by a crash: not finished
    assert store.load(b) is None
    assert not list(store.path(a).parent.glob("*.tmp"))


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "new" / "dir").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        check_writable(blocker)
    with pytest.raises(OutputError, match="not writable"):
        check_writable(blocker / "sub")


def test_report_table_marks_best_and_na():
    base = {
        "train_size": 10,
        "params_total": 100,
        "params_head": 10,
        "train_time_s": 1.0,
        "peak_memory_bytes": None,
        "train_throughput": 10.0,
        "eval_throughput": 20.0,
    }
    recs = [
        {
            **base,
            "spec": {"head": "fc", "seed": s},
            "accuracy": 0.5,
            "accuracies": {"test": 0.5, "bigger": None},
        }
        for s in range(2)
    ] + [
        {
            **base,
            "spec": {"head": "avg", "seed": s},
            "accuracy": 0.6 + s / 10,
            "accuracies": {"test": 0.6 + s / 10, "bigger": 0.6},
        }
        for s in range(2)
    ]
    rows = summarize(recs)
    assert [r["head"] for r in rows] == ["fc", "avg"]  # HEADS order
    table = markdown_table(rows)
    assert "**65.0 ± 63.5**" in table and "| n/a |" in table and "bigger acc %" in table


# --- the command ------------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "res"
    first = invoke(*TINY, "--out", str(out), "--workers", "2")
    assert first.exit_code == 0, first.output
    assert "4 runs trained, 0 reused" in first.stdout
    files = run_files(out)
    assert len(files) == 4
    for name in ("results.json", "results.md", "accuracy.png"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "results.json").read_text())
    assert [r["head"] for r in summary["rows"]] == ["fc", "avg"]
    assert all(r["seeds"] == 2 and r["train_size"] == 200 for r in summary["rows"])
    assert summary["meta"]["workers"] == 2
    run = summary["runs"][0]
    assert set(run) >= RECORD_KEYS
    assert run["steps"] == 40 and run["world_size"] == 1
    by_head = {r["head"]: r for r in summary["rows"]}
    assert by_head["fc"]["params_head"] > 10 * by_head["avg"]["params_head"]

    # Same command again: nothing retrained, nothing rewritten.
    second = invoke(*TINY, "--out", str(out), *SEQUENTIAL)
    assert second.exit_code == 0, second.output
    assert "0 runs trained, 4 reused" in second.stdout
    assert run_files(out) == files

    # One more seed: only the new runs train; a sweep adds a second size and its plot.
    third = invoke(*TINY[:-1], "3", "--out", str(out), *SEQUENTIAL)
    assert third.exit_code == 0, third.output
    assert "2 runs trained, 4 reused" in third.stdout
    assert set(files) < set(run_files(out))
    sweep_args = "--train-sizes 100,200 --epochs 1 --heads avg --seeds 2"
    sweep = invoke(*sweep_args.split(), "--out", str(out), *SEQUENTIAL)
    assert sweep.exit_code == 0, sweep.output
    assert "2 runs trained, 2 reused" in sweep.stdout
    assert (out / "accuracy_vs_train_size.png").stat().st_size > 0


@pytest.mark.slow
def test_digits_shifted_fc_cannot_take_the_larger_canvas(tmp_path):
    args = "--dataset digits-shifted --heads avg,fc --seeds 1 --epochs 1 --train-sizes 128"
    result = invoke(*args.split(), "--out", str(tmp_path), *SEQUENTIAL)
    assert result.exit_code == 0, result.output
    rows = {r["head"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows["fc"]["accuracies"]["larger-canvas"] is None
    assert rows["avg"]["accuracies"]["larger-canvas"]["mean"] >= 0.0
    assert "n/a" in (tmp_path / "results.md").read_text()


# --- bad input --------------------------------------------------------------------------------


def _cifar_fixture(root: Path) -> Path:
    return write_cifar10_fixture(root, n_train_per_batch=4, n_test=8)


def _truncated(root: Path) -> Path:
    batches = _cifar_fixture(root)
    path = batches / "data_batch_1"
    path.write_bytes(path.read_bytes()[:100])
    return root


def _wrong_checksum(root: Path) -> Path:
    batches = _cifar_fixture(root)
    path = batches / "test_batch"
    raw = bytearray(path.read_bytes())
    raw[-50] ^= 0xFF
    path.write_bytes(bytes(raw))
    return root


def _empty(root: Path) -> Path:
    root.mkdir()
    return root


# (id, arguments, message, exit code): 2 for a bad option value, 1 for what running found
BAD = [
    ("unknown-head", lambda d: ["--heads", "avg,median"], "--heads: unknown head 'median'", 2),
    ("unknown-dataset", lambda d: ["--dataset", "imagenet"], "--dataset: unknown dataset", 2),
    ("unknown-model", lambda d: ["--model", "vgg"], "--model: must be one of", 2),
    ("bad-seeds", lambda d: ["--seeds", "0"], "--seeds: must be a positive int", 2),
    ("bad-epochs", lambda d: ["--epochs", "0"], "--epochs: must be a positive int", 2),
    ("bad-device", lambda d: ["--device", "tpu"], "--device: must be one of", 2),
    ("not-an-int", lambda d: ["--seeds", "two"], "--seeds: ", 2),
    ("too-large", lambda d: ["--train-sizes", "99999"], "exceeds the 4000 training samples", 1),
    (
        "data-dir-empty",
        lambda d: ["--dataset", "cifar10", "--data-dir", str(_empty(d / "empty"))],
        "cifar10: missing",
        1,
    ),
    (
        "truncated-pickle",
        lambda d: ["--dataset", "cifar10", "--data-dir", str(_truncated(d / "trunc"))],
        "cifar10",
        1,
    ),
    (
        "wrong-checksum",
        lambda d: ["--dataset", "cifar10", "--data-dir", str(_wrong_checksum(d / "md5"))],
        "md5",
        1,
    ),
    ("missing-folder", lambda d: ["--dataset", f"folder:{d / 'nope'}"], "folder", 1),
]


@pytest.mark.parametrize(("case", "make_args", "message", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_keeps_results(tmp_path, case, make_args, message, code):
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "results.md").write_text("earlier results\n")
    (out / "runs" / "old.json").write_text('{"accuracy": 0.9}\n')
    result = invoke(*make_args(tmp_path), "--out", str(out))
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert (out / "results.md").read_text() == "earlier results\n"
    assert sorted(p.name for p in (out / "runs").rglob("*")) == ["old.json"]


def test_cuda_requested_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = invoke("--device", "cuda", "--out", str(tmp_path))
    assert result.exit_code == 1
    expected = "Error: --device cuda was requested but no CUDA device is available"
    assert result.stderr.strip() == expected


def test_unwritable_out_is_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        result = invoke(*TINY, "--out", str(out))
        assert result.exit_code == 1
        assert result.stderr.startswith("Error: --out ") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.output
    assert blocker.read_text() == "keep me"


# --- scale-out --------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_cpu_processes_same_format(tmp_path):
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    tiny = ["--train-sizes", "200", "--epochs", "1", "--heads", "avg", "--seeds", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [*cmd, "--standalone", "--nproc_per_node=2", "-m", "globalpool.experiments"]
    proc = subprocess.run(
        [*launch, *tiny, "--out", str(tmp_path / "ddp")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("1 runs trained, 0 reused") == 1  # rank 0 alone reports
    single = invoke(*tiny, "--out", str(tmp_path / "one"), *SEQUENTIAL)
    assert single.exit_code == 0, single.output

    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert ddp.keys() == one.keys() and ddp["meta"].keys() == one["meta"].keys()
    assert ddp["rows"][0].keys() == one["rows"][0].keys()
    assert ddp["runs"][0].keys() == one["runs"][0].keys()
    assert ddp["meta"]["world_size"] == 2 and ddp["runs"][0]["world_size"] == 2
    assert run_files(tmp_path / "ddp").keys() == run_files(tmp_path / "one").keys()
    # Same global batches and steps: the split only changes floating-point summation order.
    assert ddp["runs"][0]["steps"] == one["runs"][0]["steps"] == 40
    assert abs(ddp["runs"][0]["accuracy"] - one["runs"][0]["accuracy"]) <= 0.02


@pytest.mark.parametrize(
    "name",
    ["stats", "spec", "results", "measure", "runner", "report", "distributed", "command"],
)
def test_experiment_doctests(name):
    import doctest
    import importlib

    module = importlib.import_module(f"globalpool.experiments.{name}")
    assert doctest.testmod(module).failed == 0


def test_a_failing_run_keeps_the_finished_ones(tmp_path, monkeypatch):
    import globalpool.experiments.execute as execute

    real = execute.train_and_evaluate

    def flaky(spec, *args, **kwargs):
        if spec.head == "fc":
            raise RuntimeError("simulated failure\nwith a second line")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(execute, "train_and_evaluate", flaky)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("earlier results\n")
    result = invoke(*TINY, "--out", str(out), *SEQUENTIAL)  # plan: avg/seed0, then fc/seed0
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (  # after the progress display
        "Error: run mnist1d/cnn1d/fc/seed0/n200 failed: RuntimeError: simulated failure "
        "with a second line"
    )
    assert "Traceback" not in result.output
    assert [p.name for p in (out / "runs").rglob("*.json")] == ["avg-seed0-n200.json"]
    assert (out / "results.md").read_text() == "earlier results\n"

    monkeypatch.setattr(execute, "train_and_evaluate", real)
    again = invoke(*TINY, "--out", str(out), *SEQUENTIAL)
    assert again.exit_code == 0, again.output
    assert "3 runs trained, 1 reused" in again.stdout


@pytest.mark.slow
def test_cifar10_fixture_end_to_end(tmp_path):
    write_cifar10_fixture(tmp_path / "data", n_train_per_batch=8, n_test=10)
    args = "--dataset cifar10 --heads catavgmax --seeds 1 --epochs 1 --batch-size 20"
    result = invoke(*args.split(), "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["meta"]["model"] == "resnet18"
    assert summary["meta"]["config"]["augment"] == "crop-flip"
    assert [r["train_size"] for r in summary["rows"]] == [40]
    assert summary["runs"][0]["steps"] == 2  # full-width ResNet-18: keep it to two steps
