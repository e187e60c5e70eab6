"""ONNX export (dynamo exporter) with dynamic batch and spatial sizes, checked in onnxruntime."""

from __future__ import annotations

import pytest
import torch

import globalpool as gp

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

KINDS = ["avg", "max", "gem", "catavgmax"]


def _export(model: torch.nn.Module, x: torch.Tensor, path) -> None:
    batch, height, width = (torch.export.Dim(n, min=1, max=4096) for n in ("N", "H", "W"))
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=True,
        dynamic_shapes={"x": {0: batch, 2: height, 3: width}},
    )


@pytest.mark.parametrize("kind", KINDS)
def test_global_pool_onnx_dynamic_shapes(kind, tmp_path):
    model = gp.GlobalPool(kind).eval()
    path = tmp_path / f"{kind}.onnx"
    _export(model, torch.rand(2, 8, 7, 7) + 0.1, path)
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for shape in [(1, 8, 7, 7), (3, 8, 5, 9), (2, 8, 14, 14)]:
        x = torch.rand(shape) + 0.1
        (got,) = session.run(None, {name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-6)


def test_classifier_head_onnx(tmp_path):
    model = gp.ClassifierHead(8, 3, pool="gem").eval()
    path = tmp_path / "head.onnx"
    _export(model, torch.rand(2, 8, 7, 7), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(4, 8, 6, 10)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-5)


class _MaskedTokens(torch.nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return gp.pool(x, ("first", "last", "sum", "max"), layout="channels_last", mask=mask)


def test_token_kinds_with_a_mask_onnx_dynamic_shapes(tmp_path):
    """first / last find the real token inside the graph (left and right padding, any length)."""
    model = _MaskedTokens().eval()
    path = tmp_path / "tokens.onnx"
    batch, length = torch.export.Dim("N", min=1, max=4096), torch.export.Dim("L", min=2, max=4096)
    mask = torch.tensor([[True, True, True, False, False], [False, True, True, True, True]])
    torch.onnx.export(model, (torch.randn(2, 5, 8), mask), str(path), dynamo=True,
                      dynamic_shapes={"x": {0: batch, 1: length}, "mask": {0: batch, 1: length}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for n, length_ in ((3, 9), (1, 4)):
        x = torch.randn(n, length_, 8)
        m = torch.rand(n, length_) > 0.5
        m[0] = False  # an empty sample gives 0
        (got,) = session.run(None, {names[0]: x.numpy(), names[1]: m.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), model(x, m), rtol=1e-5, atol=1e-5)


def _op_types(path) -> set[str]:
    model = onnx.load(str(path))
    found = set()

    def walk(graph):
        for node in graph.node:
            found.add(node.op_type)
            for a in node.attribute:
                if a.g.node:
                    walk(a.g)

    walk(model.graph)
    return found


@pytest.mark.parametrize(("module", "power"), [
    (gp.GlobalPool("gem", p=3.0), True),
    (gp.GlobalPool("gem", p=2.7), False),
    (gp.GlobalPool("gem", p=4.0), False),
    # a tensor p: an If picks Pow or exp and log when the graph runs (the exporter may fold it);
    # the range guard's rarely taken branch keeps a Pow
    (gp.GeM(p=3.0), None),
    (gp.GeM(p=2.5), None),
    (gp.GeM(p=2.0, channels=8), False),  # one p per channel: exp and log only
], ids=["p3", "p2.7", "p4", "learned-3", "learned-2.5", "per-channel"])
def test_gem_exports_its_power_as_onnxruntime_computes_it_fastest(module, power, tmp_path):
    """A power of 2 or 3 stays a Pow (onnxruntime's fast case); any other p becomes an exp of p
    times the log; the values match eager either way, at new sizes, across the range guard."""
    module = module.eval()
    path = tmp_path / "gem.onnx"
    _export(module, torch.rand(2, 8, 7, 7) + 0.1, path)
    ops = _op_types(path)
    assert {"Exp", "Log"} <= ops
    if power is not None:
        assert ("Pow" in ops) == power
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for x in (torch.rand(3, 8, 5, 9) + 0.1, torch.rand(1, 8, 6, 6) * 1e-20,
              torch.rand(2, 8, 4, 4) * 1e30):
        (got,) = session.run(None, {name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), module(x), rtol=1e-5, atol=0)
