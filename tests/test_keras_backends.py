"""globalpool.keras on the other Keras backends, each in a process of its own (Keras picks its
backend once per process): outputs and input gradients against ``gp.pool`` computed here with
the torch composition. Also: the core never imports Keras, the subpackage never imports torch at
module level."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import globalpool as gp
from helpers import KIND_PARAMS, TOLERANCE, make_input, make_mask, poison_padded

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "keras_backend_child.py"
POOL_KINDS = ("avg", "max", "avgmax", "catavgmax", "gem", "lse", "sum", "first", "last",
              "mean_sqrt_len", "weightedmean")
SPATIAL = {1: (9,), 2: (4, 5), 3: (2, 3, 4)}
DATA_FORMATS = ("channels_first", "channels_last")


def _env(backend: str | None = None) -> dict:
    paths = [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    if backend is not None:
        env["KERAS_BACKEND"] = backend
    if backend == "jax":  # tiny graphs: XLA's optimisations cost more than they save
        env.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
    return env


def test_the_core_package_never_imports_keras():
    code = (
        "import sys, globalpool, globalpool.lab.cli, globalpool.heads\n"
        "assert 'keras' not in sys.modules, sorted(m for m in sys.modules if 'keras' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], env=_env(), check=True, timeout=120)


def test_the_keras_subpackage_imports_torch_nowhere_at_module_level():
    for path in sorted((ROOT / "src" / "globalpool" / "keras").glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                assert top != "torch", f"{path.name} imports {name} at module level"
                if top == "globalpool":  # its own modules, and the registry every layer reads
                    assert name.startswith(("globalpool.keras", "globalpool.registry")) or (
                        isinstance(node, ast.ImportFrom) and name == "globalpool"
                        and [a.name for a in node.names] == ["registry"]
                    ), f"{path.name} imports {name}"


# --------------------------------------------------------------------------------------------
# cases: the layer to build, its arguments, inputs and the expected numbers (torch, this process)


def _case(cases, arrays, key, layer, kwargs, x, mask, expected_fn, weights=None):
    """Record one case; ``expected_fn(x_poisoned_with_grad) -> y`` gives the expected output."""
    layout = kwargs.get("data_format", "channels_last")
    poisoned = poison_padded(x, mask, layout)
    xt = x.clone().requires_grad_()
    y = expected_fn(xt)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(len(cases)))
    (y.float() * g).sum().backward()
    arrays[f"{key}.x"] = poisoned.numpy() if x.dtype != torch.bfloat16 else None
    if x.dtype == torch.bfloat16:  # NumPy has no bfloat16: send float32, the layer casts it
        arrays[f"{key}.x"] = poisoned.float().numpy()
    if mask is not None:
        arrays[f"{key}.mask"] = mask.numpy()
    arrays[f"{key}.g"] = g.numpy()
    for name, value in (weights or {}).items():
        arrays[f"{key}.{name}"] = value
    cases.append(
        {
            "id": key,
            "layer": layer,
            "kwargs": kwargs,
            "weights": sorted(weights or {}),
            "y": y.detach().double().numpy(),
            "gx": xt.grad.double().numpy(),
            "dtype": x.dtype,
        }
    )


# The child compiles all cases into one XLA program; a sample of the torch suite's matrix keeps it
# small: every kind on every rank in both data formats, masks and keepdims both ways on each rank.
POOL_CASES = [  # (rank, data_format, mask, keepdims)
    (1, "channels_last", "none", False),
    (1, "channels_first", "empty", True),
    (2, "channels_last", "empty", False),
    (2, "channels_first", "none", True),
    (3, "channels_last", "empty", True),
    (3, "channels_first", "empty", False),
]
HALF_CASES = [("gem", torch.float16), ("max", torch.bfloat16)]
LEARNED_CASES = [  # (layer, rank, data_format)
    ("GeM", 2, "channels_last"),
    ("GeM", 3, "channels_first"),
    ("Attention", 1, "channels_last"),
    ("Attention", 2, "channels_first"),
]


def _cases():
    cases, arrays = [], {}
    for kind in POOL_KINDS:
        params = KIND_PARAMS.get(kind, {})
        for rank, layout, mode, keepdims in POOL_CASES:
            seed = len(cases)
            x = make_input(3, 4, SPATIAL[rank], layout, torch.float32, seed)
            x = x.abs() + 0.1 if kind == "gem" else x
            mask = make_mask(3, SPATIAL[rank], mode, seed)
            kw = dict(data_format=layout, keepdims=keepdims, **params)
            _case(
                cases,
                arrays,
                f"{kind}-{rank}d-{layout}-{mode}-{keepdims}",
                f"GlobalPooling{rank}D",
                {"kind": kind, **kw},
                x,
                mask,
                lambda t, kind=kind, layout=layout, mask=mask, keepdims=keepdims, params=params: (
                    gp.pool(
                        t,
                        kind,
                        layout=layout,
                        keepdim=keepdims,
                        mask=mask,
                        backend="torch",
                        **params,
                    )
                ),
            )
    for kind, dtype in HALF_CASES:
        params = KIND_PARAMS.get(kind, {})
        x = make_input(2, 6, (4, 4), "channels_last", dtype, seed=len(cases))
        x = x.abs() + 0.1 if kind == "gem" else x
        mask = make_mask(2, (4, 4), "random", seed=len(cases))
        name = str(dtype).removeprefix("torch.")
        _case(
            cases,
            arrays,
            f"{kind}-{name}",
            "GlobalPooling2D",
            {"kind": kind, "dtype": name, **params},
            x,
            mask,
            lambda t, kind=kind, mask=mask, params=params: gp.pool(
                t, kind, layout="channels_last", mask=mask, backend="torch", **params
            ),
        )
    for layer, rank, layout in LEARNED_CASES:
        x = make_input(3, 4, SPATIAL[rank], layout, torch.float32, seed=rank).abs()
        mask = make_mask(3, SPATIAL[rank], "empty", seed=rank)
        if layer == "GeM":
            gem = gp.GeM(p=2.5, layout=layout, backend="torch")
            _case(
                cases,
                arrays,
                f"GeM-{rank}d-{layout}",
                f"GeMPooling{rank}D",
                {"p": 2.5, "data_format": layout},
                x,
                mask,
                lambda t, gem=gem, mask=mask: gem(t, mask=mask),
            )
            continue
        torch.manual_seed(rank)
        att = gp.AttentionPool(4, layout=layout, backend="torch")
        weights = {
            "kernel": att.score.weight.detach().T.numpy(),
            "bias": att.score.bias.detach().numpy(),
        }
        _case(
            cases,
            arrays,
            f"Attention-{rank}d-{layout}",
            f"AttentionPooling{rank}D",
            {"data_format": layout},
            x,
            mask,
            lambda t, att=att, mask=mask: att(t, mask=mask),
            weights,
        )
    return cases, arrays


def _run_backend(backend: str, tmp_path: Path) -> None:
    cases, arrays = _cases()
    spec = [{k: c[k] for k in ("id", "layer", "kwargs", "weights")} for c in cases]
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    np.savez(tmp_path / "inputs.npz", **arrays)
    proc = subprocess.run(
        [
            sys.executable,
            str(CHILD),
            str(tmp_path / "cases.json"),
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "out.npz"),
        ],
        env=_env(backend),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"{backend}: {len(cases)} cases" in proc.stdout
    assert "fit and reload: ok" in proc.stdout
    out = np.load(tmp_path / "out.npz")
    for case in cases:
        key, tol = case["id"], TOLERANCE[case["dtype"]]
        assert str(out[f"{key}.dtype"]) == str(case["dtype"]).removeprefix("torch."), key
        np.testing.assert_allclose(out[f"{key}.y"], case["y"], err_msg=f"{key} output", **tol)
        np.testing.assert_allclose(out[f"{key}.gx"], case["gx"], err_msg=f"{key} grad x", **tol)
        assert np.isfinite(out[f"{key}.gx"]).all(), f"{key}: NaN/inf reached the gradient"


def _needs(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")


def test_jax_backend_matches_gp_pool(tmp_path):
    _needs("keras", "jax")
    _run_backend("jax", tmp_path)


def test_tensorflow_backend_matches_gp_pool(tmp_path):
    _needs("keras", "tensorflow")
    _run_backend("tensorflow", tmp_path)
