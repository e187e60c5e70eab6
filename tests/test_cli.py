"""CLI conventions: --version, python -m globalpool, one error style and exit-code scheme across
commands, plain help, and compare --download (from a local URL: no internet here)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from globalpool.lab.bench import command as bench_command
from globalpool.lab.bench.methods import SEED_METHODS
from globalpool.lab.cli import app
from globalpool.lab.data import cifar10 as cifar10_module
from globalpool.lab.data import write_cifar10_fixture
from helpers import image_archive


def invoke(*args: str, **kwargs):
    return CliRunner().invoke(app, list(args), **kwargs)


def _one_error_line(result) -> str:
    """The one ``Error:`` line, last on stderr (a progress display may come before it)."""
    lines = result.stderr.strip().splitlines()
    assert [i for i, line in enumerate(lines) if "Error" in line] == [len(lines) - 1], lines
    assert "Traceback" not in result.output and "╭" not in result.output, result.output
    assert lines[-1].startswith("Error: "), lines[-1]
    return lines[-1]


@pytest.fixture
def seed_methods_only(monkeypatch):
    """bench with one seed method: no fused kernel to compile."""
    monkeypatch.setattr(bench_command, "default_methods", lambda kinds, compile: SEED_METHODS[:1])


# --- version and entry points ------------------------------------------------------------------


def test_version_from_package_metadata():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"globalpool {metadata.version('globalpool')}\n"
    assert re.fullmatch(r"globalpool \d+\.\d+\.\d+\S*\n", result.stdout)


def test_python_dash_m_globalpool(tmp_path):
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src}
    run = subprocess.run(
        [sys.executable, "-m", "globalpool", "--version"], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("globalpool ")
    run = subprocess.run(
        [sys.executable, "-m", "globalpool", "bench", "--kinds", "foo"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("Error: --kinds: must be among") and run.stderr.count("\n") == 1


# --- errors: one line, the option first, exit 2 for usage and 1 for runtime --------------------

USAGE = [
    (["bench", "--kinds", "foo"], "Error: --kinds: must be among ("),
    (["bench", "--repeats", "0"], "Error: --repeats: "),
    (["bench", "--repeats", "many"], "Error: --repeats: "),
    (["bench", "--cache", "lukewarm"], "Error: --cache: must be one of ('cold', 'warm')"),
    (["bench", "--shapes", "2x4"], "Error: --shapes: must be names from"),
    (["bench", "--layout", "diagonal"], "Error: --layout: must be among"),
    (["bench-memory", "--dtype", "int8"], "Error: --dtype: must be among"),
    (["warmup", "--kind", "median"], "Error: --kind: must be among"),
    (["compare", "--heads", "median"], "Error: --heads: unknown head 'median'"),
    (["compare", "--seeds", "0"], "Error: --seeds: must be a positive int, got 0"),
    (["compare", "--device", "tpu"], "Error: --device: must be one of cpu, cuda, auto"),
    (["bench", "--no-such-option"], "Error: No such option: --no-such-option"),
    (["no-such-command"], "Error: No such command 'no-such-command'"),
]


@pytest.mark.parametrize(("args", "start"), USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors_exit_2_with_one_line(args, start, tmp_path):
    result = invoke(*args, "--out", str(tmp_path)) if args[0] == "bench" else invoke(*args)
    assert result.exit_code == 2, result.output
    assert _one_error_line(result).startswith(start)


def test_bench_unwritable_out_is_a_runtime_error(tmp_path, seed_methods_only):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke(
        "bench", "--shapes", "2x4x3x3", "--layout", "channels_first", "--repeats", "1",
        "--out", str(blocker / "sub"),
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert _one_error_line(result).startswith(f"Error: --out: cannot create {blocker}")


def test_unexpected_exception_is_one_line_unless_debugging(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(bench_command, "run_case", boom)
    args = ["bench", "--shapes", "2x4x3x3", "--kinds", "avg", "--out", str(tmp_path)]
    result = invoke(*args)
    assert result.exit_code == 1
    assert _one_error_line(result) == "Error: RuntimeError: boom"
    monkeypatch.setenv("GLOBALPOOL_DEBUG", "1")
    assert isinstance(invoke(*args).exception, RuntimeError)


# --- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["compare", "cam", "bench", "bench-memory", "warmup"])
def test_help_is_plain_and_flags_take_no_value(command):
    result = invoke(command, "--help", terminal_width=120)
    assert result.exit_code == 0
    assert "<" not in result.output and "╭" not in result.output, result.output
    options = re.findall(r"^  (--[\w-]+(?: / --[\w-]+)?)( [A-Z_]+)?", result.output, flags=re.M)
    assert options, result.output
    flags = {"--help", "--quick", "--memory", "--download", "--monitor", "--report-only",
             "--compile / --no-compile",
             "--save-models / --no-save-models"}
    for name, metavar in options:
        assert (name in flags) == (metavar == ""), (name, metavar)


def test_top_level_help_lists_version():
    result = invoke("--help")
    assert result.exit_code == 0 and "--version" in result.output and "<bool>" not in result.output


# --- compare --download --------------------------------------------------------------------------


def _fixture_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve a tiny CIFAR-10 archive from a file:// URL in place of the official one."""
    batches = write_cifar10_fixture(tmp_path / "src", n_train_per_batch=4, n_test=8)
    tarball = tmp_path / "fixture.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(batches, arcname=cifar10_module.CIFAR10_DIRNAME)
    monkeypatch.setattr(cifar10_module, "CIFAR10_URL", tarball.as_uri())
    monkeypatch.setattr(
        cifar10_module, "CIFAR10_TARBALL_MD5", hashlib.md5(tarball.read_bytes()).hexdigest()
    )


TINY_CIFAR = [
    "compare", "--dataset", "cifar10", "--model", "cnn2d", "--heads", "avg", "--seeds", "1",
    "--epochs", "1", "--batch-size", "20", "--workers", "1", "--threads", "1",
]  # fmt: skip


def test_cifar10_is_not_downloaded_without_download(tmp_path, monkeypatch):
    _fixture_url(tmp_path, monkeypatch)
    monkeypatch.setenv("GLOBALPOOL_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    # no cache dir yet; an empty --data-dir
    for where in ([], ["--data-dir", str(tmp_path / "empty")]):
        result = invoke(*TINY_CIFAR, *where, "--out", str(tmp_path / "out"))
        assert result.exit_code == 1, result.output
        line = _one_error_line(result)
        assert "--download" in line and "--data-dir" in line, line
    assert not (tmp_path / "cache").exists() and not list((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("explicit_dir", [False, True], ids=["cache-dir", "data-dir"])
def test_download_fetches_into_the_cache_or_data_dir(tmp_path, monkeypatch, explicit_dir):
    _fixture_url(tmp_path, monkeypatch)
    monkeypatch.setenv("GLOBALPOOL_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / ("data" if explicit_dir else "cache")
    where = ["--data-dir", str(root)] if explicit_dir else []
    result = invoke(*TINY_CIFAR, *where, "--download", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert (root / "cifar-10-python.tar.gz").is_file()
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    again = invoke(*TINY_CIFAR, *where, "--out", str(tmp_path / "out"))  # found, no download
    assert again.exit_code == 0, again.output


# --- compare --dataset folder:ARCHIVE ----------------------------------------------------------


TINY_FOLDER = [
    "compare", "--model", "cnn2d", "--heads", "avg", "--seeds", "1", "--epochs", "1",
    "--batch-size", "8", "--workers", "1", "--threads", "1",
]  # fmt: skip


def test_compare_reads_a_folder_archive_and_caches_it(tmp_path, monkeypatch):
    archive = image_archive(tmp_path)
    monkeypatch.setenv("GLOBALPOOL_CACHE_DIR", str(tmp_path / "cache"))
    args = [*TINY_FOLDER, "--dataset", f"folder:{archive}", "--out", str(tmp_path / "out")]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    (entry,) = (tmp_path / "cache" / "folder").iterdir()
    assert entry.name.startswith("tar-") and entry.suffix == ".npz"
    # A cache dir that cannot be made is a warning; the run goes on.
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("GLOBALPOOL_CACHE_DIR", str(tmp_path / "file" / "cache"))
    with pytest.warns(UserWarning, match="could not cache the decoded images"):
        result = invoke(*args[:-1], str(tmp_path / "out2"))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("damage", ["truncated", "corrupt-member"])
def test_compare_damaged_folder_archive_is_one_error_line(tmp_path, monkeypatch, damage):
    archive = image_archive(tmp_path, broken=damage == "corrupt-member")
    if damage == "truncated":
        archive.write_bytes(archive.read_bytes()[:-200])
        expected = f"Error: folder: cannot list archive {archive}: truncated or corrupt"
    else:
        expected = f"Error: folder: cannot read image tiny/train/dog/bad.png in {archive} ("
    monkeypatch.setenv("GLOBALPOOL_CACHE_DIR", str(tmp_path / "cache"))
    args = [*TINY_FOLDER, "--dataset", f"folder:{archive}", "--out", str(tmp_path / "out")]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert _one_error_line(result).startswith(expected)
    assert not (tmp_path / "cache" / "folder").exists()
