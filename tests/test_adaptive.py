"""Adaptive pooling: every kind per bin with PyTorch's exact bins, against F.adaptive_* and the
NumPy reference, forward and backward, ranks, layouts, dtypes, masks, ``None`` dims."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import globalpool as gp
from globalpool import reference
from globalpool.adaptive import BINNED_KINDS
from globalpool.contract import LAYOUTS
from helpers import (
    KIND_PARAMS,
    MASKS,
    assert_close,
    make_input,
    make_mask,
    make_weights,
    poison_padded,
    to_np,
)

TORCH_OPS = {
    ("avg", 1): F.adaptive_avg_pool1d,
    ("avg", 2): F.adaptive_avg_pool2d,
    ("avg", 3): F.adaptive_avg_pool3d,
    ("max", 1): F.adaptive_max_pool1d,
    ("max", 2): F.adaptive_max_pool2d,
    ("max", 3): F.adaptive_max_pool3d,
}
CASES = {  # input spatial size, output size: divisible, non-divisible, larger than the input, None
    1: [((8,), 4), ((7,), 3), ((3,), 5), ((6,), None)],
    2: [((8, 6), (4, 3)), ((7, 5), (3, 2)), ((3, 4), (5, 7)), ((7, 5), (None, 2))],
    3: [((4, 4, 4), 2), ((5, 3, 7), (2, 1, 3)), ((2, 3, 2), (3, 4, 5)), ((5, 3, 4), (2, None, 3))],
}
TORCH_PARAMS = [(kind, rank, i) for kind in ("avg", "max") for rank in (1, 2, 3) for i in range(4)]


def _layout_input(x_cf: torch.Tensor, layout: str) -> torch.Tensor:
    return x_cf if layout == "channels_first" else x_cf.movedim(1, -1).contiguous()


def _to_cf(y: torch.Tensor, layout: str) -> torch.Tensor:
    return y if layout == "channels_first" else y.movedim(-1, 1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind,rank,case", TORCH_PARAMS)
def test_equals_torch_adaptive_ops(kind, rank, case, layout):
    """Forward and backward equal F.adaptive_*_pool*d (random values: no tied maxima)."""
    spatial, out = CASES[rank][case]
    gen = torch.Generator().manual_seed(case)
    x_cf = torch.randn((2, 3, *spatial), generator=gen, dtype=torch.float64, requires_grad=True)
    sizes = (out,) * rank if not isinstance(out, tuple) else out
    torch_out = tuple(i if o is None else o for o, i in zip(sizes, spatial, strict=True))
    expected = TORCH_OPS[(kind, rank)](x_cf, torch_out)
    x = _layout_input(x_cf.detach(), layout).requires_grad_()
    y = gp.adaptive_pool(x, out, kind, layout=layout)
    torch.testing.assert_close(_to_cf(y, layout), expected, rtol=0, atol=1e-12)
    grad_out = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    expected.backward(grad_out)
    _to_cf(y, layout).backward(grad_out)
    torch.testing.assert_close(_to_cf(x.grad, layout), x_cf.grad, rtol=0, atol=1e-12)


def _reference(x, out, kind, layout, mask, params, grad_out=None):
    np_params = {k: to_np(v) if isinstance(v, torch.Tensor) else v for k, v in params.items()}
    np_mask = None if mask is None else mask.numpy()
    if grad_out is None:
        return reference.adaptive_forward(to_np(x), out, kind, layout=layout, mask=np_mask,
                                          **np_params)
    return reference.adaptive_backward(to_np(x), to_np(grad_out), out, kind, layout=layout,
                                       mask=np_mask, **np_params)


def _check(kind, spatial, out, layout, dtype, mask_mode, seed, n=2, c=3):
    """Forward, grad x (and grad weights / p) against the reference, with NaN and inf poured
    into the padded positions."""
    x = make_input(n, c, spatial, layout, dtype, seed)
    mask = make_mask(n, spatial, mask_mode, seed)
    params = dict(KIND_PARAMS.get(kind, {}))
    if kind == "attention":
        # away from 0: a bin of one position with a tiny weight makes the weight gradient a
        # difference of two huge terms, beyond float32's tolerance
        weights = 0.1 + 0.9 * make_weights(x, layout, seed)
        params["weights"] = weights.requires_grad_()
    if kind == "gem":
        x = x.abs() + 0.05
        params["p"] = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    x_in = poison_padded(x, mask, layout).requires_grad_()
    y = gp.adaptive_pool(x_in, out, kind, layout=layout, mask=mask, **params)
    assert y.dtype == dtype
    expected = _reference(x, out, kind, layout, mask, params)
    assert_close(y, expected, dtype, f"forward {kind}")
    with torch.no_grad():  # inference may take torch's own adaptive ops
        y_inference = gp.adaptive_pool(x_in, out, kind, layout=layout, mask=mask, **params)
    assert_close(y_inference, expected, dtype, f"forward {kind} under no_grad")
    gen = torch.Generator().manual_seed(seed + 7)
    grad_out = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    y.backward(grad_out)
    grads = _reference(x, out, kind, layout, mask, params, grad_out)
    assert torch.isfinite(x_in.grad).all(), "gradient holds NaN/inf"
    assert_close(x_in.grad, grads["x"], dtype, f"grad x {kind}")
    if kind == "attention":
        assert_close(params["weights"].grad, grads["weights"], dtype, "grad weights")
    if kind == "gem" and dtype == torch.float64:
        np.testing.assert_allclose(params["p"].grad.item(), grads["p"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mask_mode", MASKS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("kind", gp.KINDS)
def test_matches_reference(kind, rank, case, layout, mask_mode):
    spatial, out = CASES[rank][case]
    _check(kind, spatial, out, layout, torch.float64, mask_mode, seed=10 * rank + case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", gp.KINDS)
def test_matches_reference_in_each_dtype(kind, dtype):
    _check(kind, (7, 5), (3, 2), "channels_last", dtype, "random", seed=3)


@given(
    kind=st.sampled_from(gp.KINDS),
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    mask_mode=st.sampled_from(MASKS),
    n=st.integers(1, 3),
    c=st.integers(1, 4),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    outs=st.lists(st.one_of(st.none(), st.integers(1, 10)), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=120, deadline=None)
def test_property_random_sizes(kind, layout, dtype, mask_mode, n, c, sizes, outs, seed):
    out = tuple(outs[: len(sizes)])
    _check(kind, tuple(sizes), out, layout, dtype, mask_mode, seed, n=n, c=c)


@pytest.mark.parametrize("kind", gp.KINDS)
def test_gradcheck_float64(kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, 5, 4, generator=gen, dtype=torch.float64) + 0.1
    mask = make_mask(2, (5, 4), "random", 0)
    inputs = [x.requires_grad_()]
    if kind == "attention":
        inputs.append(torch.rand(2, 5, 4, generator=gen, dtype=torch.float64).requires_grad_())
    if kind == "gem":
        inputs.append(torch.tensor(2.5, dtype=torch.float64, requires_grad=True))

    def fn(x, *extra):
        params = dict(KIND_PARAMS.get(kind, {}))
        if extra:
            params["weights" if kind == "attention" else "p"] = extra[0]
        return gp.adaptive_pool(x, (3, 3), kind, mask=mask, **params)

    if kind in ("max", "avgmax", "catavgmax"):  # the max is not differentiable at a tie
        x.data += torch.arange(x.numel(), dtype=torch.float64).view_as(x) * 1e-3
    assert torch.autograd.gradcheck(fn, tuple(inputs))


@pytest.mark.parametrize("kind", gp.KINDS)
def test_output_one_is_global_pooling(kind):
    x = make_input(3, 4, (5, 6), "channels_last", torch.float64, 1).abs() + 0.1
    mask = make_mask(3, (5, 6), "empty", 1)
    params = dict(KIND_PARAMS.get(kind, {}))
    if kind == "attention":
        params["weights"] = make_weights(x, "channels_last", 1)
    got = gp.adaptive_pool(x, 1, kind, layout="channels_last", mask=mask, **params)
    want = gp.pool(x, kind, layout="channels_last", mask=mask, keepdim=True, backend="torch",
                   **params)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", gp.KINDS)
def test_empty_bin_is_zero_with_zero_gradient(kind):
    x = torch.randn(1, 2, 6, dtype=torch.float64) + 2.0
    mask = torch.tensor([[True, True, False, False, True, True]])
    x_in = poison_padded(x, mask, "channels_first").requires_grad_()
    params = dict(KIND_PARAMS.get(kind, {}))
    if kind == "attention":
        params["weights"] = torch.ones(1, 6, dtype=torch.float64)
    y = gp.adaptive_pool(x_in, 3, kind, mask=mask, **params)  # bins [0,2) [2,4) [4,6)
    assert (y[..., 1] == 0).all() and (y[..., [0, 2]] != 0).all()
    (y[..., 1].sum() * 1.0 + 0.0).backward()
    assert (x_in.grad == 0).all()


def test_ties_share_the_gradient_as_in_global_pooling():
    x = torch.tensor([[[5.0, 5.0, 1.0, 2.0, 2.0]]], requires_grad=True)
    gp.adaptive_pool(x, 2, "max").sum().backward()  # bins [0, 3) and [2, 5)
    torch.testing.assert_close(x.grad, torch.tensor([[[0.5, 0.5, 0.0, 0.5, 0.5]]]))


def test_output_width_and_layouts():
    x = torch.randn(2, 7, 5, 8)
    y = gp.adaptive_pool(x, (3, None), "catavgmax", layout="channels_last")
    assert y.shape == (2, 3, 5, 16)
    torch.testing.assert_close(y[..., :8], gp.adaptive_pool(x, (3, None), layout="channels_last"))
    assert gp.AdaptivePool((3, None), "catavgmax", layout="channels_last").output_width(8) == 16


def test_module_takes_mask_and_parameters():
    layer = gp.AdaptivePool((2, 3), "gem", p=4.0)
    x = torch.rand(2, 3, 7, 7) + 0.1
    mask = torch.rand(2, 7, 7) > 0.3
    torch.testing.assert_close(layer(x, mask), gp.adaptive_pool(x, (2, 3), "gem", mask=mask, p=4.0))
    assert "p=4.0" in repr(layer)
    weights = torch.rand(2, 7, 7)
    got = gp.AdaptivePool(2, "attention")(x, weights=weights)
    torch.testing.assert_close(got, gp.adaptive_pool(x, 2, "attention", weights=weights))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_keep_dtype(dtype):
    x = torch.randn(2, 3, 7, 5).to(dtype)
    y = gp.adaptive_pool(x, (3, 2), "avg")
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), F.adaptive_avg_pool2d(x.float(), (3, 2)),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "output_size",
    [0, -2, (3,), (3, 2, 1), (3, 0), 2.5, True, "3", (2, 2.0)],
    ids=repr,
)
def test_bad_output_size(output_size):
    with pytest.raises(ValueError, match=r"output_size must be .* got "):
        gp.adaptive_pool(torch.randn(1, 2, 7, 5), output_size)


def test_bad_arguments_name_themselves():
    x = torch.randn(2, 3, 7, 5)
    with pytest.raises(ValueError, match=r"mask must have shape \(N, \*S\) = \(2, 7, 5\)"):
        gp.adaptive_pool(x, (3, 2), mask=torch.ones(2, 3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="p for kind 'gem' must be >= 1, got 0.5"):
        gp.adaptive_pool(x, 2, "gem", p=0.5)
    with pytest.raises(TypeError, match=r"kind 'avg' got unexpected parameter\(s\) \['p'\]"):
        gp.adaptive_pool(x, 2, "avg", p=2.0)
    with pytest.raises(TypeError, match="kind 'attention' requires weights"):
        gp.adaptive_pool(x, 2, "attention")
    with pytest.raises(ValueError, match="kind must be one of"):
        gp.adaptive_pool(x, 2, "median")
    with pytest.raises(ValueError, match="r for kind 'lse' must be > 0"):
        gp.AdaptivePool(2, "lse", r=-1.0)
    with pytest.raises(ValueError, match="output_size must be"):
        gp.AdaptivePool(0)
    with pytest.raises(ValueError, match=r"output_size must be .* tuple of 2"):
        gp.AdaptivePool((2, 2, 2))(x)


def _as_graph(monkeypatch, dynamic: bool) -> None:
    """Make adaptive pooling take the form a graph records: with ``dynamic``, as if every size
    were a dynamic dim of the export (binned sums for the sum kinds, gathered windows else)."""
    monkeypatch.setattr("globalpool.adaptive._in_graph", lambda: True)
    if dynamic:
        monkeypatch.setattr("globalpool.adaptive.fixed", lambda size: False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask_mode", ["none", "random"])
@pytest.mark.parametrize("kind", gp.KINDS)
def test_graph_forms_equal_eager_form(kind, mask_mode, layout, monkeypatch):
    """Eager mode views equal, disjoint bins without a gather; a graph with fixed divisible
    sizes does too (or records torch's ops), one with dynamic sizes gathers windows with padded
    slots or (avg, sum, attention) sums over bin-membership matrices. Every form gives the same
    numbers and gradients."""
    x = make_input(2, 3, (8, 6, 4), layout, torch.float64, 5).abs() + 0.1
    mask = None if mask_mode == "none" else make_mask(2, (8, 6, 4), "random", 5)
    params = dict(KIND_PARAMS.get(kind, {}))
    if kind == "attention":
        params["weights"] = make_weights(x, layout, 5)
    results = []
    for form in ("eager", "fixed", "dynamic"):
        if form != "eager":
            _as_graph(monkeypatch, form == "dynamic")
        xg = x.clone().requires_grad_()
        y = gp.adaptive_pool(xg, (4, 3, None), kind, layout=layout, mask=mask, **params)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), xg.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0], results[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask_mode", MASKS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("kind", sorted(BINNED_KINDS))
def test_binned_form_matches_reference(kind, rank, case, layout, mask_mode, monkeypatch):
    """The bin-membership form a graph with dynamic sizes records: forward and gradients
    against the NumPy reference, NaN and inf in the padded positions."""
    _as_graph(monkeypatch, dynamic=True)
    spatial, out = CASES[rank][case]
    _check(kind, spatial, out, layout, torch.float64, mask_mode, seed=10 * rank + case)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", sorted(BINNED_KINDS))
def test_binned_form_keeps_non_finite_values_in_their_bins(kind, layout, monkeypatch):
    """inf * 0 is NaN: a matmul with a 0/1 matrix would spread an inf (or NaN) over every bin
    of its row. The binned form gives what the windows give: +inf, -inf, NaN or a mix (NaN) in
    the bins holding them, the other bins untouched."""
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    x[0, 0, 0, 0] = torch.inf  # one corner bin
    x[0, 1, 4, 3] = -torch.inf  # the middle, in overlapping bins
    x[0, 2, 8, 6], x[0, 2, 8, 5] = torch.inf, -torch.inf  # both: NaN
    x[1, 0, 2, 2] = torch.nan
    params = {"weights": torch.rand(2, 9, 7, dtype=torch.float64) + 0.1} if kind == (
        "attention") else {}
    if layout == "channels_last":
        x = x.movedim(1, -1)
    want = gp.adaptive_pool(x, (4, 3), kind, layout=layout, **params)
    _as_graph(monkeypatch, dynamic=True)
    got = gp.adaptive_pool(x, (4, 3), kind, layout=layout, **params)
    assert torch.isfinite(want).sum() > 0.8 * want.numel()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("kind,rank", [("avg", 2), ("max", 3), ("gem", 1)])
def test_onnx_export_with_dynamic_sizes_runs_equal(kind, rank, tmp_path):
    """torch's adaptive ops cannot export to a non-divisible size with dynamic shapes; these
    export once and run in onnxruntime at other input sizes."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    out = {1: 3, 2: (3, 2), 3: (2, None, 3)}[rank]

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = gp.AdaptivePool(out, kind)

        def forward(self, x, mask):
            return self.pool(x, mask)

    model = Model().eval()
    dims = {d: torch.export.Dim(f"S{d}", min=2, max=256) for d in range(rank)}
    batch = torch.export.Dim("N", min=1, max=64)
    spatial = (7, 5, 6)[:rank]
    x = torch.rand(2, 4, *spatial) + 0.1
    mask = torch.rand(2, *spatial) > 0.2
    torch.onnx.export(
        model, (x, mask), str(tmp_path / "m.onnx"), dynamo=True,
        dynamic_shapes={"x": {0: batch, **{d + 2: v for d, v in dims.items()}},
                        "mask": {0: batch, **{d + 1: v for d, v in dims.items()}}},
    )
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for n, sizes in [(3, (10, 9, 4)), (1, (2, 17, 3))]:
        x = torch.rand(n, 4, *sizes[:rank]) + 0.1
        mask = torch.rand(n, *sizes[:rank]) > 0.2
        (got,) = session.run(None, {"x": x.numpy(), "mask": mask.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), model(x, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["avg", "max", "gem"])
def test_cuda_backward_is_deterministic_on_overlapping_bins(kind):
    """Overlapping bins (7 -> 3, 5 -> 4) add into shared positions: run the backward twice under
    torch's deterministic mode and compare bit for bit."""
    x = torch.rand(8, 64, 7, 5, device="cuda") + 0.1
    mask = torch.rand(8, 7, 5, device="cuda") > 0.2
    grads = []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            xg = x.clone().requires_grad_()
            gp.adaptive_pool(xg, (3, 4), kind, mask=mask).square().sum().backward()
            grads.append(xg.grad)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_onnx_binned_form_keeps_non_finite_values_in_their_bins(layout, tmp_path):
    """The exported avg with dynamic sizes (bin-membership matmuls, exact sums redone in an
    ONNX If only when a bin came out non-finite) runs in onnxruntime equal to eager, inf and NaN
    included, at other sizes than the export's."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = gp.AdaptivePool((3, 2), "avg", layout=layout).eval()
    first = layout == "channels_first"
    dims = {0: torch.export.Dim("N", min=1, max=64)}
    for i, name in enumerate(("H", "W")):
        dims[(2 if first else 1) + i] = torch.export.Dim(name, min=2, max=256)
    x = torch.rand(2, 4, 7, 5) if first else torch.rand(2, 7, 5, 4)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=True, input_names=["x"],
                      dynamic_shapes=(dims,))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for poison in (False, True):
        x = torch.randn(3, 4, 10, 9) if first else torch.randn(3, 10, 9, 4)
        if poison:
            x.view(-1)[[0, 57, 300]] = torch.tensor([torch.inf, -torch.inf, torch.nan])
        (got,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-6,
                                   equal_nan=True)
        assert torch.isfinite(torch.from_numpy(got)).all() != poison


@pytest.mark.parametrize("kind", sorted(BINNED_KINDS))
def test_torch_export_binned_form_runs_at_batch_one(kind):
    """torch.export with a dynamic batch and spatial sizes (binned sums, their exact redo under
    ``torch.cond``) re-run at batch 1 and 3, inf and NaN included: the cond's output keeps the
    input's batch size (no unbacked size asserted >= 2, the export size's batch)."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = gp.AdaptivePool((3, 2), kind)

        def forward(self, x, mask, weights):
            extra = {"weights": weights} if kind == "attention" else {}
            return self.pool(x, mask, **extra)

    model = Model().eval()
    batch = torch.export.Dim("N", min=1, max=64)
    h, w = torch.export.Dim("H", min=2, max=256), torch.export.Dim("W", min=2, max=256)
    per_position = {0: batch, 1: h, 2: w}

    def inputs(n, sizes, poison=False):
        x = torch.randn(n, 4, *sizes)
        if poison:
            x.view(-1)[[0, 57, 130]] = torch.tensor([torch.inf, -torch.inf, torch.nan])
        mask = torch.rand(n, *sizes) > 0.2
        mask.view(n, -1)[:, :2] = True
        return x, mask, torch.rand(n, *sizes) + 0.1

    program = torch.export.export(model, inputs(2, (7, 5)),
                                  dynamic_shapes=({0: batch, 2: h, 3: w}, per_position,
                                                  per_position))
    run = program.module()
    for n, sizes in [(1, (6, 11)), (3, (10, 9))]:
        for poison in (False, True):
            args = inputs(n, sizes, poison)
            torch.testing.assert_close(run(*args), model(*args), rtol=1e-5, atol=1e-6,
                                       equal_nan=True)


@pytest.mark.parametrize("kind,layout,out", [
    ("max", "channels_first", (3,)),
    ("first", "channels_last", (3,)),
    ("gem", "channels_first", (3,)),
    ("weightedmean", "channels_last", (3,)),
    ("mean_sqrt_len", "channels_first", (3, None)),
    ("last", "channels_last", (1, 3)),
])
def test_torch_export_of_gathered_windows_serves_every_size(kind, layout, out):
    """torch.export with a dynamic batch and dynamic spatial sizes, for kinds that gather bin
    windows, one spatial dim included: the export succeeds (no guard on the spatial size), and
    the program re-run at other sizes and at batch 1 matches the NumPy reference with NaN and inf
    at padded positions; an inf at a real position reaches only its own bin, as in eager."""
    rank, first = len(out), layout == "channels_first"
    params = dict(KIND_PARAMS.get(kind, {}))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = gp.AdaptivePool(out, kind, layout=layout, **params)

        def forward(self, x, mask):
            return self.pool(x, mask)

    def inputs(n, sizes, seed):
        x = make_input(n, 3, sizes, layout, torch.float64, seed)
        x = x.abs() + 0.05 if kind == "gem" else x
        mask = make_mask(n, sizes, "random", seed)
        mask[(slice(None),) + (0,) * rank] = True  # position 0 real in every sample
        return x, mask

    model = Model().eval()
    batch = torch.export.Dim("N", min=1, max=64)
    spatial = {i: torch.export.Dim(f"S{i}", min=2, max=256) for i in range(rank)}
    per_position = {0: batch, **{1 + i: d for i, d in spatial.items()}}
    x_dims = {0: batch, **{(2 if first else 1) + i: d for i, d in spatial.items()}}
    program = torch.export.export(model, inputs(2, (7, 5)[:rank], 0),
                                  dynamic_shapes=(x_dims, per_position))
    run = program.module()
    for seed, (n, sizes) in enumerate([(1, (13, 6)), (3, (10, 9))], start=1):
        x, mask = inputs(n, sizes[:rank], seed)
        want = _reference(x, out, kind, layout, mask, params)
        got = run(poison_padded(x, mask, layout), mask)
        assert_close(got, want, torch.float64, f"exported {kind} at batch {n}, size {sizes}")
        x[(0, 0) if first else (0,)][(0,) * rank + (() if first else (0,))] = torch.inf
        got, eager = run(x, mask), model(x, mask)
        torch.testing.assert_close(got, eager, rtol=1e-12, atol=1e-12, equal_nan=True)
        corner = (0, 0, *(0,) * rank) if first else (0, *(0,) * rank, 0)
        finite = torch.isfinite(got)
        finite[corner] = True  # the one bin holding the inf
        assert finite.all(), f"an inf reached other bins: {got}"
