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
