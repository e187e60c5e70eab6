"""The fused kernel never reaches a deployed graph: ``torch.export``, both ONNX exporters and
``torch.jit.trace`` record the torch composition (standard ops only) for ``backend="auto"`` and
``"fused"`` alike, on an input large enough that eager ``auto`` runs the kernel; ``torch.compile``
(not exporting) keeps the kernel's custom op."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import globalpool as gp
from globalpool.dispatch import FUSED_MIN_ELEMENTS, deploying, plan

LARGE = (2, 32, 32, 33)
NEW = [(3, 32, 20, 41), (1, 32, 9, 7)]
assert np.prod(LARGE) >= FUSED_MIN_ELEMENTS
BACKENDS = ["auto", "fused"]


def _x(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) + 0.1


def _dims():
    return {0: torch.export.Dim("N", min=1, max=64), 2: torch.export.Dim("H", min=2, max=512),
            3: torch.export.Dim("W", min=2, max=512)}


def test_eager_auto_takes_the_kernel_on_this_input():
    assert plan("auto", _x(LARGE), "gem", None, {}, "channels_first").path == "cpu"
    assert not deploying()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["catavgmax", "gem"])
def test_torch_export_holds_no_globalpool_op(kind, backend):
    layer = gp.GlobalPool(kind, backend=backend).eval()
    program = torch.export.export(layer, (_x(LARGE),), dynamic_shapes=(_dims(),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets and not [t for t in targets if "globalpool" in t]
    for seed, shape in enumerate(NEW):
        x = _x(shape, seed + 1)
        torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-5, atol=1e-5)


def _onnx_nodes(path):
    import onnx

    return {(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_onnx_holds_no_globalpool_op(backend, dynamo, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    layer = gp.GlobalPool("gem", backend=backend).eval()
    path = tmp_path / "gem.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(layer, (_x(LARGE),), str(path), dynamo=True, input_names=["x"],
                              dynamic_shapes=(_dims(),))
        else:  # the TorchScript exporter traces the module
            torch.onnx.export(layer, (_x(LARGE),), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}})
    nodes = _onnx_nodes(path)
    assert nodes and all(domain in ("", "ai.onnx") for domain, _ in nodes), nodes
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, shape in enumerate(NEW):
        x = _x(shape, seed + 1)
        (got,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jit_trace_of_a_head_holds_no_globalpool_op(backend):
    head = gp.ClassifierHead(32, 5, pool="catavgmax", backend=backend).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(head, (_x(LARGE),))
    assert "globalpool::" not in str(traced.inlined_graph)
    for seed, shape in enumerate(NEW):
        x = _x(shape, seed + 1)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), head(x), rtol=1e-5, atol=1e-5)


def test_deploying_is_seen_by_a_tracer():
    seen = []

    def f(x):
        seen.append(deploying())
        return x * 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(f, (torch.ones(2),), check_trace=False)
    assert seen == [True]


def test_compile_keeps_the_fused_op():
    """torch.compile is no exporter: the fused kernel stays, as one custom op."""
    graphs = []

    def capture(gm, inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    layer = gp.GlobalPool("max", backend="fused").eval()
    x = _x(LARGE)
    got = torch.compile(layer, fullgraph=True, backend=capture)(x)
    assert any("globalpool.pool_forward" in g for g in graphs)
    torch.testing.assert_close(got, gp.pool(x, "max", backend="torch"))
