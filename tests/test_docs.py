"""Every public name carries a docstring, and every runnable example in the core modules runs."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

import globalpool as gp

MODULES = [
    "globalpool",
    "globalpool.compose",
    "globalpool.contract",
    "globalpool.functional",
    "globalpool.kernels",
    "globalpool.kernels.cpu_numba",
    "globalpool.kernels.ops",
    "globalpool.heads",
    "globalpool.kinds",
    "globalpool.layers",
    "globalpool.reference",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests_pass(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


@pytest.mark.parametrize("name", [n for n in gp.__all__ if n not in ("KINDS", "HEADS")])
def test_public_names_have_examples(name):
    doc = getattr(gp, name).__doc__ or ""
    assert ">>>" in doc, f"globalpool.{name} needs a docstring with a runnable example"


README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize(
    "block", re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) or [""]
)
def test_readme_python_blocks_run(block):
    exec(compile(block, "README.md", "exec"), {})
