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

from globalpool.lab.data import write_cifar10_fixture
from globalpool.lab.experiments.command import parse_heads, parse_train_sizes
from globalpool.lab.experiments.report import markdown_table, summarize
from globalpool.lab.experiments.results import OutputError, ResultStore, check_writable
from globalpool.lab.experiments.spec import RunSpec, TrainConfig
from globalpool.lab.experiments.stats import mean_ci

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
    from globalpool.lab.cli import app as cli

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


LEARNED = ("map", "simpool", "clip")


def test_learned_pool_heads_are_opt_in():
    from globalpool.learned_pools import LEARNED_POOLS

    assert set(LEARNED) == set(LEARNED_POOLS)
    assert not set(LEARNED) & set(parse_heads("all"))  # the default run keeps its heads
    assert parse_heads("avg,map,simpool,clip,map") == ["avg", "map", "simpool", "clip"]
    with pytest.raises(ValueError, match="unknown head 'median'.*map, simpool, clip"):
        parse_heads("map,median")


@pytest.mark.parametrize(
    ("model", "size"), [("cnn1d", (40,)), ("cnn2d", (24, 24)), ("multiscale", (40,))]
)
@pytest.mark.parametrize("head", LEARNED)
def test_learned_pool_heads_build_and_train_a_step(model, size, head):
    import torch

    from globalpool.lab.models import build_model, count_parameters

    torch.manual_seed(0)
    net = build_model(model, head, 10, in_channels=1, spatial_size=size, backend="torch")
    base = build_model(model, "avg", 10, in_channels=1, spatial_size=size, backend="torch")
    assert net.head_name == head and count_parameters(net) > count_parameters(base)
    assert net.fixed_input_size == (head == "clip")  # clip's positional table has one size
    x, y = torch.randn(4, 1, *size), torch.randint(0, 10, (4,))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    moved = [n for n, p in net.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("head") for n in moved), moved  # the pool's weights train


def test_unknown_head_is_still_a_clear_model_error():
    from globalpool.lab.models import build_model

    with pytest.raises(ValueError, match=r"head must be one of .*clip; got 'median'"):
        build_model("cnn1d", "median", 10, in_channels=1, spatial_size=(40,))
    with pytest.raises(ValueError, match=r"head must be one of .*clip; got 'median'"):
        build_model("multiscale", "median", 10, in_channels=1, spatial_size=(40,))


def test_compare_runs_the_learned_pool_heads(tmp_path):
    args = ["--train-sizes", "200", "--epochs", "1", "--heads", "avg,map,simpool,clip"]
    result = invoke(*args, "--seeds", "1", "--out", str(tmp_path), *SEQUENTIAL)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["head"] for r in rows] == ["avg", *LEARNED]
    for row in rows:
        assert row["accuracy"]["mean"] > 0.1, row  # trained past chance on 10 classes


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
    assert "| n/a |" in table and "bigger acc %" in table
    # avg is in the table, so fc is compared with it seed by seed: -10, -20 pp, whose 95% CI
    # (-15.0 ± 63.5) holds 0: no bold, and fc is named as not shown to differ.
    assert "**" not in table
    assert "No head is bold in this table: none is better than `avg`" in table
    assert "Not shown to differ from `avg`" in table and "`fc` (−15.0 ± 63.5 pp)" in table


def _row(head, values, size=10):
    mean, half = mean_ci(values)
    acc = {"mean": mean, "ci95": half, "n": len(values), "values": values}
    return {
        "head": head,
        "train_size": size,
        "seeds": len(values),
        "accuracy": acc,
        "accuracies": {"test": acc},
        "params_total": 1,
        "params_head": 1,
        "train_time_s": 1.0,
        "train_cpu_time_s": 1.0,
        "peak_memory_bytes": None,
        "train_throughput": 1.0,
        "eval_throughput": 1.0,
    }


def test_best_head_is_bold_only_when_its_ci_clears_the_next_best():
    clear = [_row("avg", [0.90, 0.91, 0.92]), _row("fc", [0.50, 0.52, 0.51])]
    table = markdown_table(clear)
    assert "| `avg` | 10 | 3 | **91.0 ± 2.5** |" in table
    assert "Bold in this table: `avg`" in table and "does not overlap" in table
    close = [_row("avg", [0.90, 0.91, 0.92]), _row("fc", [0.89, 0.90, 0.91])]
    table = markdown_table(close)
    assert "**" not in table
    assert "No head is bold in this table" in table and "overlapping 95% CIs" in table
    one_seed = markdown_table([_row("avg", [0.9]), _row("fc", [0.5])])
    assert "**" not in one_seed and "with one seed there is no CI" in one_seed


def test_report_defines_every_column_and_states_the_test_size(tmp_path):
    from globalpool.lab.experiments.labels import describe_test_sets
    from globalpool.lab.experiments.report import markdown_report

    names = {"test": 450, "everywhere": 450, "right": 450, "larger-canvas": 450}
    rows = [_row("avg", [0.9, 0.8]), _row("fc", [0.7, 0.6])]
    for row in rows:
        row["accuracies"] = {n: row["accuracy"] for n in names}
    meta = {"dataset": "digits-shifted", "test_size": 450}
    meta["test_sets"] = describe_test_sets("digits-shifted", names)
    text = markdown_report(rows, meta)
    header = next(line for line in text.splitlines() if line.startswith("| head |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[3:7] == [
        "same region acc %",
        "anywhere acc %",
        "right half only (never seen) acc %",
        "larger canvas acc %",
    ]
    for column in columns:
        assert f"- **{column}**: " in text, column
    assert "450 samples" in text


def _record(head: str, seed: int, train_size: int, accuracy: float) -> dict:
    """A finished run's record as the runner writes it, with placeholder measurements."""
    return {
        "spec": {"head": head, "seed": seed},
        "train_size": train_size,
        "accuracy": accuracy,
        "accuracies": {"test": accuracy},
        "params_total": 1,
        "params_head": 1,
        "train_time_s": 1.0,
        "peak_memory_bytes": None,
        "train_throughput": 1.0,
        "eval_throughput": 1.0,
    }


def test_files_respect_the_umask(tmp_path):
    from globalpool.lab.experiments.report import write_report

    old = os.umask(0o022)
    try:
        store = ResultStore(tmp_path)
        spec = RunSpec("mnist1d", "cnn1d", "avg", 0, 200, TrainConfig(1, 100, 0.01))
        record = _record("avg", 0, 200, 0.5)
        written = [store.save(spec, record)]
        written += write_report(tmp_path, [record], {"dataset": "mnist1d"}).values()
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written}
    assert modes == {p.name: "0o644" for p in written}
    assert {"avg-seed0-n200.json", "results.json", "results.md", "accuracy.png"} <= set(modes)


def test_error_bars_are_clipped_to_the_metric_range(tmp_path):
    from globalpool.lab.experiments.plots import clip_errors
    from globalpool.lab.experiments.report import write_report

    below, above, clipped = clip_errors([97.0, 3.0, 50.0], [10.0, 10.0, 10.0])
    assert below == [10.0, 3.0, 10.0] and above == [3.0, 10.0, 10.0]
    assert clipped == [True, True, False]
    records = [_record("avg", s, 10, a) for s, a in enumerate([1.0, 0.9])]  # 95.0 ± 63.5: 158%
    write_report(tmp_path, records, {"dataset": "mnist1d"})
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["plots_clipped"] == {
        "plot": True
    }
    assert "CI clipped at 0% / 100%" in (tmp_path / "results.md").read_text()


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
    summary = json.loads((tmp_path / "results.json").read_text())
    rows = {r["head"]: r for r in summary["rows"]}
    assert rows["fc"]["accuracies"]["larger-canvas"] is None
    assert rows["avg"]["accuracies"]["larger-canvas"]["mean"] >= 0.0
    text = (tmp_path / "results.md").read_text()
    assert "n/a" in text
    labels = {s["name"]: s["label"] for s in summary["meta"]["test_sets"]}
    assert labels == {
        "test": "same region",
        "everywhere": "anywhere",
        "right": "right half only (never seen)",
        "larger-canvas": "larger canvas",
    }
    header = " | ".join(f"{label} acc %" for label in labels.values())
    assert f"| seeds | {header} |" in text
    assert summary["meta"]["test_size"] == 449  # a quarter of the 1797 digits, held out
    assert "same region 449, anywhere 449" in text


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
    ("lr-nan", lambda d: ["--lr", "nan"], "--lr: must be a finite number > 0, got nan", 2),
    ("lr-zero", lambda d: ["--lr", "0"], "--lr: must be a finite number > 0, got 0.0", 2),
    ("lr-negative", lambda d: ["--lr", "-1"], "--lr: must be a finite number > 0, got -1.0", 2),
    ("lr-inf", lambda d: ["--lr", "inf"], "--lr: must be a finite number > 0, got inf", 2),
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
    ("tune-unknown", lambda d: ["--tune", "momentum"], "--tune: expected 'lr' or", 2),
    ("tune-grid-alone", lambda d: ["--tune-grid", "lr=0.1"], "--tune-grid: needs --tune", 2),
    ("tune-seeds-alone", lambda d: ["--tune-seeds", "2"], "--tune-seeds: needs --tune", 2),
    (
        "tune-grid-bad-lr",
        lambda d: ["--tune", "lr", "--tune-grid", "lr=0.1,inf"],
        "--tune-grid: lr must be finite numbers > 0",
        2,
    ),
    (
        "tune-grid-warmup-untuned",
        lambda d: ["--tune", "lr", "--tune-grid", "lr=0.1;warmup=0,10"],
        "--tune-grid: warmup values given but --tune does not include warmup",
        2,
    ),
    (
        "tune-budget",
        lambda d: ["--tune", "lr", "--tune-budget", "0"],
        "--tune-budget: must be a fraction in (0, 1]",
        2,
    ),
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
    launch = [*cmd, "--standalone", "--nproc_per_node=2", "-m", "globalpool.lab.experiments"]
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
    # Two ranks' batch-norm statistics differ from one process's: the runs are kept apart.
    ddp_files, one_files = run_files(tmp_path / "ddp"), run_files(tmp_path / "one")
    assert [Path(f).name for f in ddp_files] == [Path(f).name for f in one_files]
    assert ddp_files.keys().isdisjoint(one_files)
    # Same global batches and steps: the split only changes floating-point summation order.
    assert ddp["runs"][0]["steps"] == one["runs"][0]["steps"] == 40
    assert abs(ddp["runs"][0]["accuracy"] - one["runs"][0]["accuracy"]) <= 0.02


@pytest.mark.parametrize(
    "name",
    [
        "stats",
        "spec",
        "results",
        "measure",
        "runner",
        "report",
        "distributed",
        "command",
        "interrupt",
        "provenance",
        "labels",
        "ranking",
        "paired",
        "execute",
        "plots",
        "monitoring",
        "monitor_plot",
        "tune",
    ],
)
def test_experiment_doctests(name):
    import doctest
    import importlib

    module = importlib.import_module(f"globalpool.lab.experiments.{name}")
    assert doctest.testmod(module).failed == 0


def test_a_failing_run_keeps_the_finished_ones(tmp_path, monkeypatch):
    import globalpool.lab.experiments.runner as runner

    real = runner.train_and_evaluate

    def flaky(spec, *args, **kwargs):
        if spec.head == "fc":
            raise RuntimeError("simulated failure\nwith a second line")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(runner, "train_and_evaluate", flaky)
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

    monkeypatch.setattr(runner, "train_and_evaluate", real)
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


# --- reproducibility --------------------------------------------------------------------------


def _runs(out: Path) -> dict[str, dict]:
    return {r["label"]: r for r in json.loads((out / "results.json").read_text())["runs"]}


@pytest.mark.slow
def test_runs_do_not_depend_on_the_worker_count(tmp_path):
    import torch

    one_args = ["--out", str(tmp_path / "one"), "--workers", "1"]
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # this process's own count must not leak into the run
    try:
        one = invoke(*TINY[:-1], "1", *one_args)
    finally:
        torch.set_num_threads(before)
    assert one.exit_code == 0, one.output
    two = invoke(*TINY[:-1], "1", "--out", str(tmp_path / "two"), "--workers", "2")
    assert two.exit_code == 0, two.output
    a, b = _runs(tmp_path / "one"), _runs(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 2
    for label in a:
        for key in ("accuracy", "accuracies", "final_train_loss", "weights_digest", "threads"):
            assert a[label][key] == b[label][key], (label, key)
        assert a[label]["threads"] == 1 and a[label]["reused"] is False
    assert run_files(tmp_path / "one").keys() == run_files(tmp_path / "two").keys()

    # The other way of running finds the first one's runs and labels them as reused.
    again = invoke(*TINY[:-1], "1", "--out", str(tmp_path / "one"), "--workers", "2")
    assert again.exit_code == 0, again.output
    assert "0 runs trained, 2 reused" in again.stdout
    assert all(r["reused"] is True for r in _runs(tmp_path / "one").values())
    assert "| reused (cached) |" in (tmp_path / "one" / "results.md").read_text()


def test_thread_count_and_provenance_are_part_of_the_cache_key(tmp_path):
    out = tmp_path / "out"
    tiny = ["--train-sizes", "200", "--epochs", "1", "--heads", "avg", "--seeds", "1"]
    first = invoke(*tiny, "--out", str(out), "--workers", "1")
    assert first.exit_code == 0, first.output
    second = invoke(*tiny, "--out", str(out), "--workers", "1", "--threads", "2")
    assert second.exit_code == 0, second.output
    assert "1 runs trained, 0 reused" in second.stdout  # not the one-thread run
    files = sorted(run_files(out))
    assert len(files) == 2 and Path(files[0]).parent != Path(files[1]).parent
    summary = json.loads((out / "results.json").read_text())
    run, meta = summary["runs"][0], summary["meta"]
    assert run["threads"] == 2 and run["spec"]["env"]["threads"] == 2
    for key in ("torch", "globalpool", "world_size", "device", "hardware"):
        assert run[key] is not None
    assert meta["env"]["threads"] == 2 and meta["test_size"] == 1000
    assert meta["test_sets"] == [
        {
            "name": "test",
            "label": "test",
            "size": 1000,
            "description": "the dataset's held-out test set",
        }
    ]
    text = (out / "results.md").read_text()
    assert "Test set: 1000 samples" in text and "2 torch thread(s)" in text


# --- stopping ---------------------------------------------------------------------------------

# Long enough that runs are still in flight when the first one is written.
STOP_ARGS = ["--train-sizes", "200", "--epochs", "10", "--heads", "avg,fc,max", "--seeds", "4"]


def _group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(entry.name))
    return alive


def _start_compare(out: Path) -> subprocess.Popen:
    import globalpool

    src = str(Path(globalpool.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "globalpool.lab.cli", "compare", *STOP_ARGS, "--workers", "2"]
    return subprocess.Popen(
        [*cmd, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: every worker can be found and signalled
    )


def _wait_for_a_finished_run(proc: subprocess.Popen, out: Path, timeout: float = 120) -> int:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = len(list(out.glob("runs/**/*.json")))
        if done:
            return done
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, 9)
    raise AssertionError("no run finished in time")


def _stop(proc: subprocess.Popen, signals: list[tuple[int, bool]], gap: float) -> tuple:
    """Send each (signal, to_group) ``gap`` seconds apart; return (rc, stderr, seconds)."""
    import time

    t0 = time.monotonic()
    for k, (sig, to_group) in enumerate(signals):
        if k:
            time.sleep(gap)
        (os.killpg if to_group else os.kill)(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise AssertionError("compare did not exit within 10 s of the signal") from None
    return proc.returncode, err, time.monotonic() - t0


def _assert_clean(proc: subprocess.Popen, out: Path, done_before: int) -> None:
    import time

    deadline = time.monotonic() + 2.0
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _group_alive(proc.pid) == [], "worker processes outlived compare"
    files = list(out.glob("runs/**/*.json"))
    assert done_before <= len(files) < 12  # finished runs kept; the others were stopped
    assert all("accuracy" in json.loads(f.read_text()) for f in files)
    assert not list(out.glob("runs/**/*.tmp"))


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@needs_proc
@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "to_group", "code"),
    [(2, True, 130), (15, False, 143)],
    ids=["ctrl-c-to-the-group", "sigterm-to-compare"],
)
def test_a_signal_stops_at_once_and_keeps_finished_runs(tmp_path, sig, to_group, code):
    out = tmp_path / "out"
    proc = _start_compare(out)
    done = _wait_for_a_finished_run(proc, out)
    rc, err, seconds = _stop(proc, [(sig, to_group)], 0.0)
    assert rc == code, err
    assert seconds < 5.0, f"took {seconds:.1f} s to stop"
    name = "SIGINT" if sig == 2 else "SIGTERM"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted ({name}): ") and "finished and kept under" in last
    assert "Traceback" not in err
    _assert_clean(proc, out, done)
    assert not (out / "results.md").exists()  # the report is written only for a full plan


@needs_proc
@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    out = tmp_path / "out"
    proc = _start_compare(out)
    done = _wait_for_a_finished_run(proc, out)
    rc, err, seconds = _stop(proc, [(2, True), (2, True)], 0.02)
    # 130 from either handler; a second signal after Python's own shutdown began ends the
    # process by SIGINT itself, which a shell reports as 130 too.
    assert rc in (130, -2), err
    assert seconds < 3.0, f"took {seconds:.1f} s to stop"
    assert "Traceback" not in err
    _assert_clean(proc, out, done)


# --- the workers' side of a stop ----------------------------------------------------------------


class _NoData:
    """A data source that loads nothing (a worker's data are never used by these tests)."""

    def load(self) -> None:
        return None


@pytest.mark.parametrize("closed", ["before-ready", "after-ready"])
def test_a_worker_ends_quietly_when_the_parent_has_closed_the_pipe(monkeypatch, closed):
    # A parent that stops closes its end of the pipe: the worker's next send was a
    # BrokenPipeError, its next recv an EOFError, and either ended it with a traceback on stderr
    # under the parent's one-line "interrupted" message. Now the worker just returns.
    import multiprocessing as mp
    import threading

    import torch

    from globalpool.lab.experiments import interrupt, pool

    monkeypatch.setattr(interrupt, "ignore_in_child", lambda: None)  # not in the test process
    monkeypatch.setattr(pool, "_die_with_parent", lambda parent: None)
    parent, child = mp.Pipe(duplex=True)
    seen = []
    if closed == "before-ready":
        parent.close()
    else:  # the parent reads "ready", then goes away while the worker waits for a run

        def read_then_close() -> None:
            seen.append(parent.recv())
            parent.close()

        threading.Thread(target=read_then_close, daemon=True).start()
    threads = torch.get_num_threads()
    try:
        pool._worker_main(child, os.getpid(), _NoData(), ResultStore("unused"), "cpu")
    finally:
        torch.set_num_threads(threads)
    assert seen == ([("ready",)] if closed == "after-ready" else [])


def test_a_graceful_stop_cut_short_by_a_signal_kills_the_workers_left(monkeypatch):
    # SIGTERM just after the last run: the signal's KeyboardInterrupt came while the first
    # worker was being told to exit; the others were left to find the pipe closed at exit.
    from types import SimpleNamespace

    from globalpool.lab.experiments import interrupt, pool

    calls: list[tuple[str, object]] = []

    class FakeWorker:
        def __init__(self, name: str, pid: int, interrupted: bool = False) -> None:
            self.name, self.interrupted = name, interrupted
            self.process = SimpleNamespace(pid=pid, exitcode=None)

        def stop(self, *, gracefully: bool) -> None:
            calls.append((self.name, gracefully))
            if gracefully and self.interrupted:
                raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(interrupt, "kill_now", lambda pids: calls.append(("kill", list(pids))))
    monkeypatch.setattr(pool, "_stop_resource_tracker", lambda: calls.append(("tracker", None)))
    workers = [FakeWorker("a", 11), FakeWorker("b", 12, interrupted=True), FakeWorker("c", 13)]
    with pytest.raises(KeyboardInterrupt):
        pool.stop_workers(workers, gracefully=True)
    assert calls == [
        ("a", True),
        ("b", True),  # interrupted here
        ("kill", [12, 13]),
        ("b", False),
        ("c", False),
        ("tracker", None),
    ]


# --- tuning (--tune) --------------------------------------------------------------------------

# The untuned runs' cache keys, as before --tune existed (warm-up, left at 0, is not hashed).
FINGERPRINTS = {"mnist1d": "525312f853", "digits-shifted": "8e3d8ca372", "cifar10": "f61249b407"}


def test_untuned_run_keys_are_unchanged():
    from globalpool.lab.experiments.provenance import RunEnv
    from globalpool.lab.experiments.spec import DEFAULTS

    env = RunEnv(1, 1, "cpu", "AVX2", "2.4", "0.1.0", "0123456789ab")
    for name, fingerprint in FINGERPRINTS.items():
        spec = RunSpec("mnist1d", "cnn1d", "avg", 0, None, DEFAULTS[name]["config"], env)
        assert spec.fingerprint == fingerprint, name
    warm = TrainConfig(1, 100, 0.01, warmup=10)
    assert RunSpec("m", "cnn1d", "avg", 0, None, warm).fingerprint != RunSpec(
        "m", "cnn1d", "avg", 0, None, TrainConfig(1, 100, 0.01)
    ).fingerprint


def test_tune_selection_rule():
    from globalpool.lab.experiments.tune import Point, select

    def rec(acc, loss=0.5):
        return {"accuracy": acc, "final_train_loss": loss, "spec": {"seed": 10000}}

    recipe = Point(0.02)
    runs = {
        Point(0.005): [rec(0.70), rec(0.72)],
        Point(0.01): [rec(0.80), rec(0.84)],  # best mean: 0.82
        Point(0.02): [rec(0.81), rec(0.81)],
        Point(0.04): [rec(0.95), rec(0.5, float("nan"))],  # one seed's loss is NaN: diverged
    }
    out = select("max", runs, recipe, chance=0.1)
    assert out["chosen"] == {"lr": 0.01, "warmup": 0} and not out["all_diverged"]
    by_lr = {p["lr"]: p for p in out["points"]}
    assert by_lr[0.01]["val_accuracy"] == pytest.approx(0.82) and by_lr[0.01]["chosen"]
    assert by_lr[0.04]["diverged"] == "non-finite training loss"
    assert out["lr_at_edge"] is None
    assert [r["val_accuracy"] for r in by_lr[0.005]["runs"]] == [0.70, 0.72]
    # A tie goes to the recipe's lr, then to the lower of two equally close ones.
    tie = {Point(0.01): [rec(0.8)], Point(0.02): [rec(0.8)], Point(0.04): [rec(0.8)]}
    assert select("avg", tie, recipe, 0.1)["chosen"]["lr"] == 0.02
    del tie[Point(0.02)]
    assert select("avg", tie, recipe, 0.1)["chosen"]["lr"] == 0.01
    # ... then to the shorter warm-up.
    warm = {Point(0.02, 100): [rec(0.8)], Point(0.02, 0): [rec(0.8)]}
    assert select("avg", warm, recipe, 0.1)["chosen"] == {"lr": 0.02, "warmup": 0}
    # At chance (majority class + 1 pp) counts as diverged; all diverged: the recipe, flagged.
    dead = {Point(0.01): [rec(0.105)], Point(0.04): [rec(0.3, float("inf"))]}
    out = select("max", dead, recipe, chance=0.1)
    assert out["all_diverged"] and out["chosen"] == {"lr": 0.02, "warmup": 0}
    assert all(p["diverged"] and not p["chosen"] for p in out["points"])


def test_tune_grid_and_validation_split():
    from globalpool.lab.data import load_dataset
    from globalpool.lab.experiments.tune import carve_validation, parse_grid, parse_tune

    assert parse_tune("lr") == ("lr",) and parse_tune("lr,warmup") == ("lr", "warmup")
    grid = parse_grid(None, ("lr",), recipe_lr=0.1, epoch=391)
    assert grid.lr == (0.0125, 0.025, 0.05, 0.1, 0.2) and grid.warmup == (0,)
    assert parse_grid("0.3, 0.1", ("lr",), recipe_lr=0.1, epoch=1).lr == (0.3, 0.1)
    both = parse_grid("warmup=0,50", ("lr", "warmup"), recipe_lr=0.1, epoch=391)
    assert both.lr == grid.lr and both.warmup == (0, 50) and len(both.points()) == 10

    data = load_dataset("mnist1d")
    split = carve_validation(data)
    assert (split.train_size, len(split.y_test)) == (3600, 400)
    assert list(split.test_sets()) == ["test"] and not split.extra_tests
    rows = {tuple(r) for r in data.x_train.flatten(1).tolist()}
    fit = {tuple(r) for r in split.x_train.flatten(1).tolist()}
    val = {tuple(r) for r in split.x_test.flatten(1).tolist()}
    assert fit | val == rows and not fit & val
    assert carve_validation(data).x_test.equal(split.x_test)  # fixed by the split seed


def _tune_guard(monkeypatch):
    """Check every run's data: tuning runs must see only the training set, split in two."""
    import globalpool.lab.experiments.runner as runner
    from globalpool.lab.data import load_dataset

    full = load_dataset("mnist1d")
    train_rows = {tuple(r) for r in full.x_train.flatten(1).tolist()}
    test_rows = {tuple(r) for r in full.x_test.flatten(1).tolist()}
    real = runner.train_and_evaluate
    calls: list[str] = []

    def guarded(spec, data, *args, **kwargs):
        calls.append(spec.label)
        if spec.label.startswith("tune/"):
            assert list(data.test_sets()) == ["test"]  # the validation split alone
            fit = {tuple(r) for r in data.x_train.flatten(1).tolist()}
            val = {tuple(r) for r in data.x_test.flatten(1).tolist()}
            assert val <= train_rows and fit <= train_rows and not fit & val
            assert not (fit | val) & test_rows
            assert not any(c.startswith("mnist1d/") for c in calls)  # tuning comes first
        return real(spec, data, *args, **kwargs)

    monkeypatch.setattr(runner, "train_and_evaluate", guarded)
    return calls


TUNE = [*TINY, "--tune", "lr", "--tune-grid", "lr=2e-4,x1,1e4"]


def test_tune_picks_the_best_point_and_never_reads_the_test_set(tmp_path, monkeypatch):
    calls = _tune_guard(monkeypatch)
    out = tmp_path / "out"
    result = invoke(*TUNE, "--out", str(out), *SEQUENTIAL)
    assert result.exit_code == 0, result.output
    assert "tuning: 6 tuning runs trained, 0 reused; chosen: avg lr 0.02, fc lr 0.02" in (
        result.stdout
    )
    assert "4 runs trained, 0 reused" in result.stdout
    assert sum(c.startswith("tune/") for c in calls) == 6 and len(calls) == 10
    summary = json.loads((out / "results.json").read_text())
    tuning = summary["meta"]["tuning"]
    assert tuning["grid"]["lr"] == [2e-4, 0.02, 1e4] and tuning["seeds"] == [10000]
    assert tuning["validation"]["size"] == 400 and tuning["epochs"] == 1
    for head in tuning["heads"]:
        by_lr = {p["lr"]: p for p in head["points"]}
        assert head["chosen"] == {"lr": 0.02, "warmup": 0} and by_lr[0.02]["chosen"]
        assert by_lr[0.02]["val_accuracy"] > by_lr[2e-4]["val_accuracy"]  # known: too slow
        assert by_lr[1e4]["diverged"]  # known: blows up
        assert all(len(p["runs"]) == 1 for p in head["points"])
    assert {r["spec"]["config"]["lr"] for r in summary["runs"]} == {0.02}
    assert len(list((out / "tuning" / "runs").rglob("*.json"))) == 6
    assert not list((out / "tuning").rglob("*.pt"))
    text = (out / "results.md").read_text()
    assert "## Tuning" in text and "| `avg` | 200 | 2 | lr 0.02 |" in text and "diverged" in text
    assert "At an end of the lr grid" not in text  # 0.02 is the middle of the grid

    # Untuned, same arguments: exactly the runs of before (the chosen lr is the recipe's, so
    # the tuned runs are the untuned ones), no tuning anywhere in the report.
    plain = invoke(*TINY, "--out", str(out), *SEQUENTIAL)
    assert plain.exit_code == 0, plain.output
    assert "0 runs trained, 4 reused" in plain.stdout and "tuning" not in plain.stdout
    summary = json.loads((out / "results.json").read_text())
    assert "tuning" not in summary["meta"]
    assert "## Tuning" not in (out / "results.md").read_text()


def test_tune_resumes_without_retraining(tmp_path, monkeypatch):
    import globalpool.lab.experiments.runner as runner

    real = runner.train_and_evaluate

    def flaky(spec, *args, **kwargs):
        if spec.label.startswith("tune/") and spec.head == "fc" and spec.config.lr == 1e4:
            raise RuntimeError("simulated failure")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(runner, "train_and_evaluate", flaky)
    out = tmp_path / "out"
    result = invoke(*TUNE, "--out", str(out), *SEQUENTIAL)
    assert result.exit_code == 1
    assert "tune/mnist1d/cnn1d/fc/lr=10000,warmup=0/seed10000/n200 failed" in result.stderr
    kept = run_files(out / "tuning")
    assert len(kept) == 5 and not (out / "runs").exists()  # no final run before tuning ends
    report = invoke(*TUNE, "--out", str(out), *SEQUENTIAL, "--report-only")
    assert report.exit_code == 1 and "--report-only: 1 of 6 tuning runs are not in" in report.stderr
    assert run_files(out / "tuning") == kept  # nothing trained

    monkeypatch.setattr(runner, "train_and_evaluate", real)
    again = invoke(*TUNE, "--out", str(out), *SEQUENTIAL)
    assert again.exit_code == 0, again.output
    assert "tuning: 1 tuning runs trained, 5 reused" in again.stdout
    assert all(run_files(out / "tuning")[k] == v for k, v in kept.items())
    files = {**run_files(out), **run_files(out / "tuning")}
    third = invoke(*TUNE, "--out", str(out), *SEQUENTIAL)
    assert "tuning: 0 tuning runs trained, 6 reused" in third.stdout
    assert "0 runs trained, 4 reused" in third.stdout
    assert {**run_files(out), **run_files(out / "tuning")} == files
    heads = json.loads((out / "results.json").read_text())["meta"]["tuning"]["heads"]
    assert all(r["reused"] for h in heads for p in h["points"] for r in p["runs"])


def test_tune_lr_and_warmup(tmp_path):
    out = tmp_path / "out"
    grid = "lr=x1;warmup=0,1000"
    args = [*TINY[:-1], "1", "--tune", "lr,warmup", "--tune-grid", grid, "--tune-seeds", "2"]
    result = invoke(*args, "--out", str(out), *SEQUENTIAL)
    assert result.exit_code == 0, result.output
    tuning = json.loads((out / "results.json").read_text())["meta"]["tuning"]
    assert tuning["grid"] == {"params": ["lr", "warmup"], "lr": [0.02], "warmup": [0, 1000]}
    assert tuning["seeds"] == [10000, 10001] and tuning["runs"] == 8
    for head in tuning["heads"]:
        assert [len(p["runs"]) for p in head["points"]] == [2, 2]
    assert "warm-up" in (out / "results.md").read_text()
