"""The line between the library and the lab: ``import globalpool`` needs none of the lab
extra's packages, and without them the ``globalpool`` command says in one line what to install
(exit 2) while the library works as ever."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from globalpool import _entry

ROOT = Path(__file__).resolve().parents[1]
LAB_ONLY = ("matplotlib", "sklearn", "typer", "rich", "mnist1d", "PIL")

# installed as sitecustomize: every import of a lab package fails, as where none is installed
BLOCKER = f"""
import sys

BLOCKED = {set(LAB_ONLY)!r}


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"No module named {{name!r}} (blocked)", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
"""

LIBRARY_USE = """
import sys
import torch
import globalpool as gp

x = torch.randn(2, 8, 5, 5)
assert gp.pool(x, "gem", p=3.0).shape == (2, 8)
assert gp.pool(x, ("avg", "max")).shape == (2, 16)
head = gp.make_head("catavgmax", 8, 3)
assert head(x).shape == (2, 3)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), gp.ClassifierHead(8, 4, pool="avg")).eval()
assert gp.class_activation_maps(net, torch.randn(2, 3, 9, 9)).shape == (2, 7, 7)
with gp.monitor(net) as stats:
    net(torch.randn(2, 3, 9, 9))
assert "pool" in str(stats)
print(sorted(m for m in sys.modules if m.partition(".")[0] in {blocked!r} or "globalpool.lab" in m))
"""


def _env(tmp_path: Path | None = None) -> dict[str, str]:
    paths = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    if tmp_path is not None:
        (tmp_path / "sitecustomize.py").write_text(BLOCKER)
        paths.insert(0, str(tmp_path))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_import_globalpool_imports_no_lab_package():
    code = (
        "import sys, globalpool\n"
        f"print(sorted(m for m in sys.modules if m.partition('.')[0] in {set(LAB_ONLY)!r}"
        " or m.startswith('globalpool.lab')))\n"
    )
    run = _run(["-c", code], _env())
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_without_the_lab_packages_the_command_says_what_to_install(tmp_path):
    env = _env(tmp_path)
    run = _run(["-c", "import typer"], env)
    assert run.returncode != 0 and "blocked" in run.stderr  # the blocker is in place
    for args, command in (
        (["compare"], "globalpool compare"),
        (["bench", "--quick"], "globalpool bench"),
        ([], "globalpool"),
        (["--version"], "globalpool"),
    ):
        run = _run(["-m", "globalpool", *args], env)
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        assert run.stdout == ""
        lines = run.stderr.splitlines()
        assert len(lines) == 1, run.stderr
        assert lines[0].startswith(f"{command} needs the lab extra ("), lines[0]
        assert lines[0].endswith(': pip install "globalpool[lab]"'), lines[0]


def test_without_the_lab_packages_the_library_works(tmp_path):
    run = _run(["-c", LIBRARY_USE.format(blocked=set(LAB_ONLY))], _env(tmp_path))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_with_the_lab_packages_the_command_runs():
    run = _run(["-m", "globalpool", "--help"], _env())
    assert run.returncode == 0, run.stderr
    assert "compare" in run.stdout and "warmup" in run.stdout


def test_the_message_names_the_command_and_what_is_missing(capsys, monkeypatch):
    monkeypatch.setattr(_entry, "LAB_MODULES", ("json", "no_such_module_here"))
    with pytest.raises(SystemExit) as exit_info:
        _entry.main(["cam", "--results", "x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "globalpool cam needs the lab extra (no_such_module_here is missing): "
        'pip install "globalpool[lab]"\n'
    )


# --- packaging ---------------------------------------------------------------------------------


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def test_the_library_depends_on_torch_numpy_numba_only():
    assert {_name(r) for r in _project()["dependencies"]} == {"torch", "numpy", "numba"}


def test_dev_holds_the_lab_extra_and_the_entry_checks_its_modules():
    extras = _project()["optional-dependencies"]
    assert set(extras["lab"]) <= set(extras["dev"])
    modules = {"scikit-learn": "sklearn", "pillow": "PIL"}
    assert {modules.get(_name(r), _name(r)) for r in extras["lab"]} == set(_entry.LAB_MODULES)


def test_the_console_script_is_the_entry():
    assert _project()["scripts"] == {"globalpool": "globalpool._entry:main"}
