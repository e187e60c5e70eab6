"""One conformance suite for every registered kind: the built-in kinds and kinds registered here
through the public API (``gp.register_kind``). Each kind is checked on every path the registry
promises: values and gradients against its NumPy reference (or float64 gradcheck of its
composition), masks and poisoned padding, the backends on both sides of the size threshold, tuples
of kinds, adaptive and packed pooling, nested tensors, the layers and heads, ``swap_pool``,
``monitor``, Grad-CAM, ``torch.compile``, ``torch.export`` and ONNX.

A path that fails for a user kind is a library gap: the test stays as it is."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import globalpool as gp
from globalpool import reference, registry
from helpers import (
    KIND_PARAMS,
    assert_close,
    check_against_reference,
    make_input,
    make_mask,
    make_weights,
    poison_padded,
    reference_forward,
    to_np,
)

try:  # the threshold of backend="auto" (it may move to globalpool.dispatch)
    from globalpool.dispatch import FUSED_MIN_ELEMENTS
except ImportError:
    from globalpool.functional import FUSED_MIN_ELEMENTS


# --------------------------------------------------------------------------------------------
# kinds registered through the public API


def absmax(x, mask):
    """Largest magnitude over the real positions."""
    if mask is not None:
        x = torch.where(mask, x, 0.0)
    return x.abs().amax(-1)


def absmax_ref(xs):
    return np.abs(xs).max(axis=1)


def absmax_ref_grad(xs, g):
    grad = np.zeros_like(xs)
    idx = np.abs(xs).argmax(axis=1)
    rows = np.arange(xs.shape[0])
    grad[rows, idx] = g * np.sign(xs[rows, idx])
    return grad, {}


def softstats(x, mask, t):
    """Softmax(t x)-weighted mean and variance of each row, side by side (width 2)."""
    score = x * t
    if mask is not None:
        score = torch.where(mask, score, -torch.inf)
        score = torch.where(mask.any(-1, keepdim=True), score, 0.0)  # an empty row: no NaN
        x = torch.where(mask, x, 0.0)
    w = torch.softmax(score, -1)
    if mask is not None:
        w = w * mask
    mean = (w * x).sum(-1)
    var = (w * x * x).sum(-1) - mean * mean
    return torch.cat([mean, var], dim=1)


def softstats_ref(xs, t):
    s = t * xs
    w = np.exp(s - s.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    mean = (w * xs).sum(axis=1)
    return np.concatenate([mean, (w * xs * xs).sum(axis=1) - mean * mean])


USER_KINDS = ("absmax", "softstats")
USER_PARAMS = {"softstats": {"t": 0.7}}
ALL_KINDS = (*registry.kinds(), *USER_KINDS)


@pytest.fixture(scope="module", autouse=True)
def user_kinds():
    gp.register_kind("absmax", absmax, reference=absmax_ref, reference_grad=absmax_ref_grad,
                     summary="largest |x| over the real positions")
    gp.register_kind("softstats", softstats, width=2, reference=softstats_ref,
                     params=(gp.Param("t", 1.0, minimum=0, inclusive=False),),
                     summary="softmax(t x)-weighted mean and variance")
    yield
    for name in USER_KINDS:
        gp.unregister_kind(name)


# --------------------------------------------------------------------------------------------
# inputs

N, C = 3, 4
SPATIAL = {1: (9,), 2: (4, 5), 3: (2, 3, 4)}
LAYOUTS = ("channels_first", "channels_last")


def params_for(kind, x, layout="channels_first", seed=0, grad=False):
    """The kind's parameters for a call on x: test values for scalars, random weights for a
    per-position parameter (requiring grad if ``grad``)."""
    out = dict(KIND_PARAMS.get(kind, USER_PARAMS.get(kind, {})))
    for q in registry.spec(kind).params:
        if q.per_position:
            out[q.name] = make_weights(x, layout, seed).requires_grad_(grad)
    return out


def per_position(kind):
    return [q.name for q in registry.spec(kind).params if q.per_position]


def _pool(x, kind, layout, mask, keepdim, **params):
    return gp.pool(x, kind, layout=layout, keepdim=keepdim, mask=mask, **params)


def _padded_grad_is_zero(grad, mask, layout):
    if mask is None:
        return
    channel_dim = 1 if layout == "channels_first" else grad.ndim - 1
    padded = (~mask).unsqueeze(channel_dim).expand_as(grad)
    assert (grad[padded] == 0).all(), "a padded position got a gradient"


def check_values(x, kind, layout, mask, seed):
    """Forward (and backward) of gp.pool against the NumPy reference, padding poisoned."""
    entry = registry.spec(kind)
    params = params_for(kind, x, layout, seed, grad=True)
    if entry.reference is None:
        pytest.skip(f"{kind} has no NumPy reference")
    if entry.reference_grad is not None:
        _, gx = check_against_reference(_pool, x, kind, layout, mask, params)
    else:
        x_in = poison_padded(x, mask, layout).requires_grad_()
        y = _pool(x_in, kind, layout, mask, False, **params)
        assert y.dtype == x.dtype
        assert_close(y, reference_forward(x, kind, layout, mask, **params), x.dtype,
                     f"forward {kind}")
        y.backward(torch.randn_like(y))
        gx = x_in.grad
        assert torch.isfinite(gx).all(), "gradient holds NaN/inf"
    _padded_grad_is_zero(gx, mask, layout)


# --------------------------------------------------------------------------------------------
# values and gradients


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", (1, 2, 3))
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_values_against_reference(kind, rank, layout):
    for dtype in (torch.float32, torch.float64):
        for i, mode in enumerate(("none", "random", "empty")):
            seed = 10 * rank + i
            x = make_input(N, C, SPATIAL[rank], layout, dtype, seed)
            check_values(x, kind, layout, make_mask(N, SPATIAL[rank], mode, seed), seed)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_values_bfloat16(kind):
    x = make_input(N, C, SPATIAL[2], "channels_last", torch.bfloat16, 5)
    mask = make_mask(N, SPATIAL[2], "empty", 5)
    params = params_for(kind, x, "channels_last", 5)
    if registry.spec(kind).reference is None:
        pytest.skip(f"{kind} has no NumPy reference")
    y = _pool(poison_padded(x, mask, "channels_last"), kind, "channels_last", mask, False, **params)
    assert y.dtype == torch.bfloat16
    assert_close(y, reference_forward(x, kind, "channels_last", mask, **params), torch.bfloat16,
                 f"bfloat16 forward {kind}")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_gradients(kind):
    """Against reference_grad where the kind has one, else float64 gradcheck of the composition
    (x and a per-position parameter)."""
    x = make_input(2, 3, (5,), "channels_first", torch.float64, 7)
    mask = make_mask(2, (5,), "empty", 7)
    params = params_for(kind, x, seed=7, grad=True)
    if registry.spec(kind).reference_grad is not None:
        check_against_reference(_pool, x, kind, "channels_first", mask, params)
        return
    names = per_position(kind)

    def f(x, *pp):
        return gp.pool(x, kind, mask=mask, backend="torch",
                       **{**params, **dict(zip(names, pp, strict=True))})

    x = x.requires_grad_()
    assert torch.autograd.gradcheck(f, (x, *(params[n] for n in names)))


# --------------------------------------------------------------------------------------------
# backends


def _both(x, kind, backend, mask, params):
    x_in = x.detach().clone().requires_grad_()
    y = gp.pool(x_in, kind, mask=mask, backend=backend, **params)
    g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    (gx,) = torch.autograd.grad(y, x_in, g)
    return y, gx


@pytest.mark.parametrize("size", ("small", "large"))
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_backends(kind, size):
    shape = (2, 4, 5, 5) if size == "small" else (2, 64, 24, 24)
    numel = int(np.prod(shape))
    assert (numel < FUSED_MIN_ELEMENTS) == (size == "small")
    x = make_input(shape[0], shape[1], shape[2:], "channels_first", torch.float32, 3)
    mask = make_mask(shape[0], shape[2:], "random", 3)
    params = params_for(kind, x, seed=3)
    tol = dict(rtol=1e-4, atol=1e-4)
    want, gwant = _both(x, kind, "torch", mask, params)
    got, ggot = _both(x, kind, "auto", mask, params)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(ggot, gwant, **tol)
    if "cpu" in registry.spec(kind).kernels:
        got, ggot = _both(x, kind, "fused", mask, params)
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(ggot, gwant, **tol)
    else:
        with pytest.raises(ValueError, match=r"no (CPU )?kernel"):
            gp.pool(x, kind, mask=mask, backend="fused", **params)


# --------------------------------------------------------------------------------------------
# tuples, adaptive, packed, nested


@pytest.mark.parametrize("backend", ("auto", "fused"))
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_tuple_of_kinds(kind, backend):
    other = "max" if kind == "avg" else "avg"
    x = make_input(N, C, (4, 5), "channels_first", torch.float64, 11).requires_grad_()
    mask = make_mask(N, (4, 5), "empty", 11)
    params = params_for(kind, x, seed=11)
    y = gp.pool(x, (other, kind), mask=mask, backend=backend, **params)
    assert y.shape == (N, gp.output_width((other, kind), C))
    want = torch.cat([gp.pool(x, other, mask=mask, backend="torch"),
                      gp.pool(x, kind, mask=mask, backend="torch", **params)], dim=1)
    torch.testing.assert_close(y, want)
    expected = reference_forward(x, (other, kind), "channels_first", mask, **params)
    np.testing.assert_allclose(to_np(y), expected, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(want, x, g)[0])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_adaptive(kind, layout):
    spatial, out = (7, 5), (3, 2)  # uneven, overlapping bins
    x = make_input(2, C, spatial, layout, torch.float64, 13)
    mask = make_mask(2, spatial, "random", 13)
    params = params_for(kind, x, layout, 13)
    x_in = poison_padded(x, mask, layout).requires_grad_()
    y = gp.adaptive_pool(x_in, out, kind, layout=layout, mask=mask, **params)
    np_params = {k: to_np(v) if isinstance(v, torch.Tensor) else v for k, v in params.items()}
    want = reference.adaptive_forward(to_np(x), out, kind, layout=layout, mask=mask.numpy(),
                                      **np_params)
    np.testing.assert_allclose(to_np(y), want, rtol=1e-10, atol=1e-10)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(x_in.grad).all()
    _padded_grad_is_zero(x_in.grad, mask, layout)


LENGTHS = (3, 0, 5, 1)  # an empty sequence


def _padded_batch(x, lengths):
    n, lmax = len(lengths), max(lengths)
    padded = x.new_zeros(n, lmax, x.shape[1])
    mask = torch.zeros(n, lmax, dtype=torch.bool)
    start = 0
    for i, k in enumerate(lengths):
        padded[i, :k] = x[start:start + k]
        mask[i, :k] = True
        start += k
    return padded, mask


def _packed_params(kind, t, seed):
    out = dict(KIND_PARAMS.get(kind, USER_PARAMS.get(kind, {})))
    gen = torch.Generator().manual_seed(seed)
    for name in per_position(kind):
        out[name] = torch.rand(t, generator=gen, dtype=torch.float64)
    return out


@pytest.mark.parametrize("backend", ("auto", "torch", "fused"))
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_packed(kind, backend):
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(sum(LENGTHS), C, generator=gen, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor(np.cumsum((0, *LENGTHS)))
    params = _packed_params(kind, x.shape[0], 17)
    if backend == "fused" and "packed" not in registry.spec(kind).kernels:
        with pytest.raises(ValueError):
            gp.pool_packed(x, cu, kind, backend="fused", **params)
        return
    y = gp.pool_packed(x, cu, kind, backend=backend, **params)
    padded, mask = _padded_batch(x, LENGTHS)
    pparams = dict(params)
    for name in per_position(kind):
        pparams[name] = _padded_batch(params[name][:, None], LENGTHS)[0][..., 0]
    want = gp.pool(padded, kind, layout="channels_last", mask=mask, backend="torch", **pparams)
    assert y.shape == (len(LENGTHS), gp.output_width(kind, C))
    torch.testing.assert_close(y, want)
    assert (y[1] == 0).all(), "an empty sequence must pool to 0"
    expected = reference_forward(padded, kind, "channels_last", mask, **pparams)
    np.testing.assert_allclose(to_np(y), expected, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0],
                               torch.autograd.grad(want, x, g)[0])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_nested_tensor(kind):
    lengths = (3, 1, 5)
    gen = torch.Generator().manual_seed(19)
    seqs = [torch.randn(k, C, generator=gen, dtype=torch.float64) for k in lengths]
    nt = torch.nested.nested_tensor(seqs, layout=torch.jagged)
    params = _packed_params(kind, sum(lengths), 19)
    y = gp.pool(nt, kind, layout="channels_last", **params)
    padded, mask = _padded_batch(torch.cat(seqs), lengths)
    pparams = dict(params)
    for name in per_position(kind):
        pparams[name] = _padded_batch(params[name][:, None], lengths)[0][..., 0]
    want = gp.pool(padded, kind, layout="channels_last", mask=mask, backend="torch", **pparams)
    torch.testing.assert_close(y, want)


# --------------------------------------------------------------------------------------------
# layers, heads, swap_pool, monitor, CAM


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_layers_and_heads(kind):
    width = registry.spec(kind).width
    x = torch.randn(2, C, 5, 6, requires_grad=True)
    call = {n: make_weights(x, "channels_first", 0) for n in per_position(kind)}
    y = gp.GlobalPool(kind)(x, **call)
    assert y.shape == (2, width * C)
    a = gp.AdaptivePool(2, kind)(x, **call)
    assert a.shape == (2, width * C, 2, 2)
    heads = [gp.ClassifierHead(C, 5, pool=kind), gp.make_head(kind, C, 5)]
    total = y.sum() + a.sum()
    for head in heads:
        logits = head(x)
        assert logits.shape == (2, 5)
        total = total + logits.sum()
    total.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for head in heads:
        assert all(p.grad is not None for p in head.parameters() if p.requires_grad)


class SmallCNN(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_swap_pool_and_monitor(kind):
    net = gp.swap_pool(SmallCNN(), kind)
    assert not isinstance(net.pool, nn.AdaptiveAvgPool2d)
    assert net.fc.in_features == registry.spec(kind).width * 8
    x = torch.randn(2, 3, 6, 6)
    y = net(x)
    assert y.shape == (2, 3)
    y.sum().backward()
    assert net.conv.weight.grad is not None
    with gp.monitor(net) as stats:
        net(x)
        net(x)
    assert stats.records["pool"].calls == 2
    assert stats["pool"]["values"] > 0


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_gradcam(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), gp.ClassifierHead(C, 3, pool=kind))
    maps = gp.class_activation_maps(model, torch.randn(2, 3, 6, 5), method="gradcam")
    assert maps.shape == (2, 6, 5)
    assert torch.isfinite(maps).all()


# --------------------------------------------------------------------------------------------
# torch.compile, torch.export, ONNX (one rank and layout per kind: they are slow)


class Exported(nn.Module):
    """gp.GlobalPool(kind) called with a mask (and the per-position parameter, if any)."""

    def __init__(self, kind):
        super().__init__()
        self.pool = gp.GlobalPool(kind, **USER_PARAMS.get(kind, KIND_PARAMS.get(kind, {})))
        self.names = per_position(kind)

    def forward(self, x, mask, *pp):
        return self.pool(x, mask, **dict(zip(self.names, pp, strict=True)))


def _export_inputs(kind):
    x = make_input(2, C, (4, 5), "channels_first", torch.float32, 23)
    mask = make_mask(2, (4, 5), "empty", 23)
    return (x, mask, *(make_weights(x, "channels_first", 23) for _ in per_position(kind)))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_compile_fullgraph(kind):
    torch._dynamo.reset()
    module, args = Exported(kind), _export_inputs(kind)
    # aot_eager: the whole graph is captured (and differentiated) without inductor's codegen
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), module(*args))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_torch_export(kind):
    module, args = Exported(kind), _export_inputs(kind)
    program = torch.export.export(module, args)
    torch.testing.assert_close(program.module()(*args), module(*args))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_onnx(kind, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    module, args = Exported(kind), _export_inputs(kind)
    path = tmp_path / "model.onnx"
    names = ["x", "mask", *per_position(kind)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=True, input_names=names, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    feed = {n: a.numpy() for n, a in zip(names, args, strict=True) if n in wanted}
    got = session.run(None, feed)[0]
    with torch.no_grad():
        want = module(*args)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_user_kinds_are_registered():
    assert set(USER_KINDS) <= set(gp.KINDS)
    assert registry.spec("softstats").width == 2

