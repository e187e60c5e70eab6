"""Exported graphs give their scalars the rank of the pooled tensors they meet: onnxruntime's CPU
provider broadcasts a rank-0 value against a ``(N, C, 1)`` tensor one element at a time (see
``onnx_broadcast_lint``). Every kind, with and without a mask, the adaptive path, and the
attention scorer."""

from __future__ import annotations

import doctest
import warnings

import pytest
import torch

import globalpool as gp
from globalpool import compose

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx_broadcast_lint  # noqa: E402
from onnx_broadcast_lint import slow_broadcasts  # noqa: E402


class _EveryKind(torch.nn.Module):
    """Every built-in kind side by side (attention with its weights as an input)."""

    def forward(self, x, mask, weights):
        return gp.pool(x, gp.KINDS, mask=mask, weights=weights, backend="torch")


class _EveryKindUnmasked(torch.nn.Module):
    def forward(self, x, weights):
        return gp.pool(x, gp.KINDS, weights=weights, backend="torch")


def _exported(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], tmp_path):
    batch = torch.export.Dim("N", min=1, max=1024)
    dims = tuple({0: batch} for _ in inputs)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, str(path), dynamo=True, dynamic_shapes=dims,
                          verbose=False)
    return onnx.load(str(path))


def _inputs(masked: bool) -> tuple[torch.Tensor, ...]:
    x = torch.rand(3, 8, 5, 4) + 0.1
    mask = torch.rand(3, 5, 4) < 0.7
    mask[:, 0, 0] = True
    weights = torch.rand(3, 5, 4)
    return (x, mask, weights) if masked else (x, weights)


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
def test_every_kind_exports_without_an_element_wise_broadcast(masked, tmp_path):
    module = _EveryKind() if masked else _EveryKindUnmasked()
    assert slow_broadcasts(_exported(module, _inputs(masked), tmp_path)) == []


@pytest.mark.parametrize("module", [
    gp.AdaptivePool((2, 3), "gem"),
    gp.ClassifierHead(8, 3, pool="attention"),
    gp.ClassifierHead(8, 3, pool="lse"),
], ids=["adaptive-gem", "attention-head", "lse-head"])
def test_layers_export_without_an_element_wise_broadcast(module, tmp_path):
    x, mask, _ = _inputs(masked=True)
    assert slow_broadcasts(_exported(module.eval(), (x, mask), tmp_path)) == []


def test_the_check_finds_rank_0_scalars(tmp_path, monkeypatch):
    """Without the reshaping the same export is flagged (the check can fail)."""
    monkeypatch.setattr(compose, "full_rank", lambda value, like: value)
    found = slow_broadcasts(_exported(_EveryKind(), _inputs(masked=True), tmp_path))
    assert any(f.startswith("Div(") for f in found) and any(f.startswith("Where(") for f in found)


def test_the_check_s_own_examples():
    assert doctest.testmod(onnx_broadcast_lint).failed == 0
