"""One behaviour per call whatever the backend: the fused kernels and the torch composition run
through the same cases (parameter extremes, special values, every autograd mode and tracer), on
both sides of ``auto``'s size threshold, so that a kernel cannot diverge silently."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import globalpool as gp
from globalpool.dispatch import FUSED_MIN_ELEMENTS, plan
from globalpool.registry import kernels_of
from helpers import reference_backward, reference_forward

LAYOUTS = ("channels_first", "channels_last")
SMALL = (2, 4, 5, 6)  # below auto's threshold: the composition
LARGE = (2, 32, 32, 33)  # above it: the fused kernel on the CPU
assert np.prod(SMALL) < FUSED_MIN_ELEMENTS <= np.prod(LARGE)


def _x(shape, layout="channels_first", dtype=torch.float32, seed=0, low=None, high=None):
    gen = torch.Generator().manual_seed(seed)
    if layout == "channels_last":
        shape = (shape[0], *shape[2:], shape[1])
    if low is None:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    return (low * (high / low) ** u).to(dtype)  # log-uniform in [low, high]


def _params(kind, x, layout, tensor=False):
    n = x.shape[0]
    spatial = x.shape[2:] if layout == "channels_first" else x.shape[1:-1]
    made = {
        "gem": {"p": 3.5, "eps": 1e-6},
        "lse": {"r": 1.5},
        "attention": {"weights": torch.rand((n, *spatial), generator=torch.Generator()
                                            .manual_seed(9), dtype=torch.float64).to(x.dtype)},
    }.get(kind, {})
    if tensor:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        made = {k: (v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=acc))
                for k, v in made.items()}
        made = {k: v.clone().requires_grad_() for k, v in made.items()}
    return made


def _pool_and_grads(backend, x, kind, layout="channels_first", mask=None, **params):
    """Output and the gradients of x and of every tensor parameter, as float64 arrays."""
    x = x.clone().requires_grad_()
    params = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v)
              for k, v in params.items()}
    y = gp.pool(x, kind, layout=layout, mask=mask, backend=backend, **params)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y.backward(g.to(y.dtype))
    grads = {k: v.grad for k, v in params.items() if isinstance(v, torch.Tensor)}
    return y, x.grad, grads


def _close(a, b, rtol, what, scale_atol=True):
    a = a.detach().double().numpy()
    b = b.detach().double().numpy()
    finite = np.isfinite(b)
    atol = rtol * (np.abs(b[finite]).max() if scale_atol and finite.any() else 1.0)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


def _both(x, kind, layout="channels_first", mask=None, rtol=1e-5, grad_rtol=1e-4, **params):
    yt, gt, pt = _pool_and_grads("torch", x, kind, layout, mask, **params)
    yf, gf, pf = _pool_and_grads("fused", x, kind, layout, mask, **params)
    _close(yf, yt, rtol, f"{kind} forward", scale_atol=False)
    _close(gf, gt, grad_rtol, f"{kind} grad x")
    assert set(pf) == set(pt)
    for k in pt:
        assert pf[k] is not None, f"fused gave no gradient for {k}"
        _close(pf[k], pt[k], grad_rtol, f"{kind} grad {k}")
    return yt


# --------------------------------------------------------------------------------------------
# parameter extremes and special values


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 100.0, 1e30])
@pytest.mark.parametrize("p", [1.0, 3.0, 7.5, 20.0, 64.0])
def test_gem_float32_extremes(p, scale, layout):
    """GeM for p in [1, 64] and x from 1e-30 to 1e30: the fused kernel used to sum clamp(x)^p
    unscaled (p = 20 on [1, 101] gave inf, on x < 1e-3 gave 0)."""
    x = _x((2, 6, 9, 7), layout, low=scale, high=101 * scale)
    eps = min(1e-6, scale * 1e-3)
    p_t = torch.tensor(p)
    y = _both(x, "gem", layout, rtol=2e-5, grad_rtol=2e-4, p=p_t, eps=eps)
    assert torch.isfinite(y).all() and (y > 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    ("dtype", "high", "p"),
    [(torch.float16, 65504.0, 8.0), (torch.float16, 65504.0, 3.0), (torch.bfloat16, 3e38, 8.0),
     (torch.float16, 1e-3, 20.0)],
)
def test_gem_half_up_to_dtype_max(dtype, high, p, layout):
    """GeM(p=8) on float16 near 6e4 gave inf with NaN grad p and zero grad x. Checked against
    the NumPy reference: near bfloat16's max the composition's own gradient overflows float32
    (its intermediate d out / d mean is ~1e38), the fused one does not."""
    x = _x((2, 5, 8, 8), layout, dtype=dtype, low=high / 4, high=high)
    rtol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    y, gx, grads = _pool_and_grads("fused", x, "gem", layout, p=torch.tensor(p))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = reference_backward(x, g, "gem", layout, None, p=p)
    _close(y, torch.from_numpy(reference_forward(x, "gem", layout, None, p=p)), rtol, "forward",
           scale_atol=False)
    _close(gx, torch.from_numpy(want["x"]), 2 * rtol, "grad x")
    _close(grads["p"], torch.tensor(want["p"]), 2 * rtol, "grad p")
    module = gp.GeM(p=p, backend="fused")
    xg = x.clone().requires_grad_()
    (module(xg).float() / high).sum().backward()  # the plain sum of ~1e38s overflows
    assert torch.isfinite(module.raw_p.grad) and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lse_special_values(layout):
    """Rows holding +inf, -inf, only -inf, NaN: the fused lse gave NaN for a row with +inf."""
    x = _x((3, 4, 6, 5), "channels_first")
    x[0, 0, 1, 1] = float("inf")
    x[0, 1, 2, 2] = float("-inf")
    x[1, 2] = float("-inf")
    x[2, 3, 0, 0] = float("nan")
    x[2, 0, 0, 0], x[2, 0, 3, 3] = float("inf"), float("-inf")
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous()
    for r in (0.5, 1.0, 40.0):
        yt = gp.pool(x, "lse", layout=layout, r=r, backend="torch")
        yf = gp.pool(x, "lse", layout=layout, r=r, backend="fused")
        torch.testing.assert_close(yf, yt, equal_nan=True)
        assert yt[0, 0] == float("inf") and yt[1, 2] == float("-inf") and yt[2, 3].isnan()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("dtype", "centre", "r"), [(torch.float32, 1e4, 50.0),
                                                    (torch.float32, -3e3, 7.0),
                                                    (torch.bfloat16, 100.0, 2.0)])
def test_lse_gradient_large_values(dtype, centre, r, layout):
    """The fused lse gradient had relative error 3e-2 at x ~ 1e4, r = 50 (float32)."""
    x = (centre + _x((2, 3, 8, 8), layout, dtype=torch.float64)).to(dtype)
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    _both(x, "lse", layout, rtol=rtol, grad_rtol=4 * rtol, r=torch.tensor(r))


def test_float64_keeps_float64_parameters():
    """float64 GeM with a Python-float p had gradient error 2e-8 (p rebuilt as float32)."""
    x = _x((2, 3, 7, 7), dtype=torch.float64, low=0.1, high=3.0)
    _both(x, "gem", rtol=1e-12, grad_rtol=1e-12, p=3.3)
    _both(x, "gem", rtol=1e-12, grad_rtol=1e-12, p=torch.tensor(3.3, dtype=torch.float64))
    _both(x, "lse", rtol=1e-12, grad_rtol=1e-12, r=torch.tensor(0.7, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# autograd modes and tracers, on both sides of auto's threshold


SIDES = [("auto", SMALL), ("auto", LARGE), ("fused", SMALL)]
KINDS_UNDER_TEST = ("avg", "max", "catavgmax", "gem", "lse", "attention", "sum", "last")


def _same_as_torch(fn, backend, shape, kind, layout="channels_first", rtol=1e-4):
    if backend == "fused" and "cpu" not in kernels_of(kind):
        pytest.skip(f"{kind} has no grid kernel: backend='fused' refuses it")
    x = _x(shape, layout)
    if kind == "gem":
        x = x.abs() + 0.1
    got = fn(backend, x, kind, layout)
    want = fn("torch", x, kind, layout)
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            _close(a, b, rtol, f"{kind} {backend} {shape}")


def test_threshold_sides_take_the_paths_they_claim():
    x_small, x_large = _x(SMALL), _x(LARGE).requires_grad_()
    assert plan("auto", x_small, "gem", None, {}, "channels_first").path == "compose"
    assert plan("auto", x_large, "gem", None, {}, "channels_first").path == "cpu"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("backend", "shape"), SIDES)
@pytest.mark.parametrize("kind", ["gem", "lse", "attention"])
def test_tensor_parameters_get_gradients(kind, backend, shape, layout):
    """Tensor r and eps got gradients on small inputs and None on large ones."""

    def grads(b, x, kind, layout):
        params = _params(kind, x, layout, tensor=True)
        if kind == "gem":
            params["eps"] = torch.tensor(0.3, requires_grad=True)  # clamps some positions
        xg = x.clone().requires_grad_()
        gp.pool(xg, kind, layout=layout, backend=b, **params).pow(2).sum().backward()
        return [xg.grad, *(v.grad for v in params.values())]

    _same_as_torch(grads, backend, shape, kind, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("backend", "shape"), SIDES)
@pytest.mark.parametrize("kind", KINDS_UNDER_TEST)
def test_double_backward(kind, backend, shape, layout):
    """create_graph=True (gradient penalties): the fused backward was once_differentiable."""

    def second(b, x, kind, layout):
        params = _params(kind, x, layout, tensor=True)
        xg = x.clone().requires_grad_()
        y = gp.pool(xg, kind, layout=layout, backend=b, **params)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), xg, create_graph=True)
        inputs = [xg, *params.values()]
        return torch.autograd.grad(gx.pow(2).sum() + gx.sum(), inputs, allow_unused=True)

    _same_as_torch(second, backend, shape, kind, layout, rtol=1e-3)


@pytest.mark.parametrize(("backend", "shape"), [("auto", SMALL), ("auto", LARGE)])
@pytest.mark.parametrize("kind", KINDS_UNDER_TEST)
def test_forward_ad_and_torch_func(kind, backend, shape):
    """Forward-mode AD returned a None tangent; torch.func.grad / vmap crashed."""

    def modes(b, x, kind, layout):
        params = _params(kind, x, layout)
        fn = lambda t: gp.pool(t, kind, layout=layout, backend=b, **params)  # noqa: E731
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(fn(fwAD.make_dual(x, torch.ones_like(x)))).tangent
        grad = torch.func.grad(lambda t: fn(t).pow(2).sum())(x)
        _, jvp = torch.func.jvp(fn, (x,), (torch.ones_like(x),))
        if kind == "attention":  # the weights belong to the batch
            batched = torch.stack([fn(x), fn(x * 2)])
        else:
            batched = torch.func.vmap(fn)(torch.stack([x, x * 2]))
        return tangent, grad, jvp, batched

    _same_as_torch(modes, backend, shape, kind)


def test_fused_refuses_modes_it_cannot_serve():
    x = _x(LARGE)
    with pytest.raises(ValueError, match="backend='auto'"):
        torch.func.grad(lambda t: gp.pool(t, "max", backend="fused").sum())(x)
    with pytest.raises(ValueError, match="forward-mode"), fwAD.dual_level():
        gp.pool(fwAD.make_dual(x, torch.ones_like(x)), "avg", backend="fused")


@pytest.mark.parametrize("backend", ["auto", "fused"])
@pytest.mark.parametrize("kind", ["max", "gem", "lse"])
def test_jit_trace_records_the_composition(kind, backend):
    """torch.jit.trace of GlobalPool('max') on a large input baked the output in; a fused trace
    recorded the globalpool custom op. A trace holds torch ops only and re-runs on new sizes."""
    layer = gp.GlobalPool(kind, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(layer, _x(LARGE).abs())
    assert "globalpool::" not in str(traced.inlined_graph)
    for shape in [LARGE, (3, 32, 20, 41), (1, 32, 9, 7)]:
        fresh = _x(shape, seed=3).abs() + 1
        torch.testing.assert_close(traced(fresh), layer(fresh), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "fused", "torch"])
@pytest.mark.parametrize("kind", ["gem", "lse"])
def test_compile_fullgraph_with_tensor_parameters(kind, backend):
    """torch.compile(fullgraph=True) of pool(x, 'lse', r=tensor) failed (schema said float)."""
    x = _x(LARGE).abs() + 0.1
    name = "r" if kind == "lse" else "p"
    value = torch.tensor(2.0)
    fn = torch.compile(lambda t, v: gp.pool(t, kind, backend=backend, **{name: v}),
                       fullgraph=True, backend="aot_eager")
    xg = x.clone().requires_grad_()
    got = fn(xg, value)
    want = gp.pool(x, kind, backend="torch", **{name: value})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    if kind == "lse":  # eps / r needing a gradient: auto takes the composition, fused refuses
        v = value.clone().requires_grad_()
        if backend == "fused":
            with pytest.raises(Exception, match="backend='auto'"):
                fn(x, v)
        else:
            fn(x, v).sum().backward()
            assert v.grad is not None
