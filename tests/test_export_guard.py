"""Exported gem and lse pool without their range guard (gem's division by the row maximum, lse's
shift by it) and fall back to the guarded path when a pooled row leaves the range where that is
exact: the exported program equals eager on inputs that take either branch, with a mask, an
all-padded sample, a per-channel p, and a batch of 1."""

from __future__ import annotations

import warnings

import pytest
import torch

import globalpool as gp


class _Masked(torch.nn.Module):
    def __init__(self, kind: str, **params):
        super().__init__()
        self.kind, self.params = kind, params

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return gp.pool(x, self.kind, mask=mask, **self.params)


def _dims():
    n, h, w = (torch.export.Dim(name, min=1 if name == "N" else 2, max=512) for name in "NHW")
    return {0: n, 2: h, 3: w}, {0: n, 1: h, 2: w}


def _mask(n, h, w, seed):
    mask = torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed)) < 0.7
    mask[-1] = False  # the last sample is all padding
    mask[0, 0, 0] = True
    return mask


def _rand(shape, seed, low, high):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(shape, generator=g)


# (params, {case: input}): "fast" takes the unguarded branch, the others the guarded one, where
# the unguarded mean would be 0 or inf (each of those cases fails without the guard)
CASES = {
    "gem": ({"p": 20.0}, {
        "fast": lambda s, i: _rand(s, i, -0.5, 4.0),
        "underflow": lambda s, i: _rand(s, i, 5e-4, 1.5e-3),
        "overflow": lambda s, i: _rand(s, i, 1e29, 1e30),
    }),
    "lse": ({"r": 1.0}, {
        "fast": lambda s, i: _rand(s, i, -3.0, 3.0),
        "underflow": lambda s, i: _rand(s, i, -300.0, -200.0),
        "overflow": lambda s, i: _rand(s, i, 200.0, 300.0),
    }),
}


@pytest.mark.parametrize("kind", ["gem", "lse"])
def test_torch_export_equals_eager_on_either_branch(kind):
    params, cases = CASES[kind]
    model = _Masked(kind, **params).eval()
    program = torch.export.export(model, (cases["fast"]((2, 4, 6, 5), 0), _mask(2, 6, 5, 0)),
                                  dynamic_shapes=_dims())
    top = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert any("cond" in t for t in top)
    assert not [t for t in top if "amax" in t]  # the row maximum: in the guarded branch only
    for case, make in cases.items():
        for seed, shape in enumerate([(3, 4, 7, 9), (1, 4, 2, 3)], start=1):
            x, mask = make(shape, seed), _mask(shape[0], *shape[2:], seed)
            if shape[0] == 1:
                mask[0] = True  # a batch of 1 with a real position
            want = model(x, mask)
            assert torch.isfinite(want).all() and (want[:-1] != 0).all()
            torch.testing.assert_close(program.module()(x, mask), want, rtol=2e-6, atol=0,
                                       msg=lambda m, case=case: f"{case}: {m}")


def test_per_channel_p_and_special_values_under_export():
    p = torch.tensor([1.0, 2.5, 3.0, 20.0])
    model = _Masked("gem", p=p).eval()
    x = _rand((2, 4, 6, 5), 0, 0.0, 2.0)
    program = torch.export.export(model, (x, _mask(2, 6, 5, 0)), dynamic_shapes=_dims())
    for x in (_rand((3, 4, 5, 5), 1, 0.0, 2.0), _rand((3, 4, 5, 5), 2, 5e-4, 1e-3)):
        mask = _mask(3, 5, 5, 3)
        torch.testing.assert_close(program.module()(x, mask), model(x, mask), rtol=2e-6, atol=0)
    lse = _Masked("lse", r=2.0).eval()
    program = torch.export.export(lse, (_rand((2, 4, 6, 5), 0, -1.0, 1.0), _mask(2, 6, 5, 0)),
                                  dynamic_shapes=_dims())
    x = _rand((3, 4, 5, 5), 4, -1.0, 1.0)
    x[0, 0, 1, 1], x[0, 1, 2, 2], x[1, 2] = float("inf"), float("-inf"), float("-inf")
    x[2, 3, 0, 0] = float("nan")
    mask = torch.ones(3, 5, 5, dtype=torch.bool)
    torch.testing.assert_close(program.module()(x, mask), lse(x, mask), equal_nan=True)


@pytest.mark.parametrize("kind", ["gem", "lse"])
def test_onnx_equals_eager_on_either_branch(kind, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = gp.ClassifierHead(4, 3, pool=kind).eval()  # a learnable p or r, as trained
    x = CASES[kind][1]["fast"]((2, 4, 6, 5), 0)
    path = str(tmp_path / f"{kind}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=True, input_names=["x"],
                          dynamic_shapes=(_dims()[0],))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for seed, case in enumerate(["fast", "overflow", "underflow", "fast"], start=1):
        x = CASES[kind][1][case]((1 + seed % 3, 4, 5, 7), seed)  # gem's p is 3 here
        (got,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            want = model(x)
        atol = 1e-5 * float(want.abs().max())
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=atol)
