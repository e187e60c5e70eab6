"""Every kind x rank x layout x dtype x mask x keepdim x backend against the NumPy reference."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

import globalpool as gp
from globalpool import kernels
from globalpool.registry import kernels_of
from helpers import (
    DTYPES,
    KIND_PARAMS,
    MASKS,
    assert_close,
    check_against_reference,
    make_input,
    make_mask,
    make_weights,
    reference_backward,
    reference_forward,
)

SPATIAL = {1: (7,), 2: (4, 5), 3: (3, 2, 4)}
LAYOUTS = ("channels_first", "channels_last")
BACKENDS = ("torch", "fused")


def _skip_unless_backend(backend: str, x: torch.Tensor, kind: str) -> None:
    # first / last have no grid kernel: backend="fused" refuses them (tested apart)
    if backend == "fused" and not kernels.supports(x, kind):
        pytest.skip(f"no fused kernel for {kind} on {x.device}/{x.dtype}")


def _run(kind, spatial, layout, dtype, mask_mode, keepdim, backend, seed=0, n=3, c=4):
    x = make_input(n, c, spatial, layout, dtype, seed)
    _skip_unless_backend(backend, x, kind)
    mask = make_mask(n, spatial, mask_mode, seed)
    params = dict(KIND_PARAMS.get(kind, {}))
    if kind == "attention":
        params["weights"] = make_weights(x, layout, seed).requires_grad_()

    def pool_fn(x, kind, layout, mask, keepdim, **params):
        return gp.pool(x, kind, layout=layout, keepdim=keepdim, mask=mask, backend=backend,
                       **params)

    return check_against_reference(pool_fn, x, kind, layout, mask, params, keepdim=keepdim,
                                   grad_seed=seed + 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("mask_mode", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("kind", gp.KINDS)
def test_matches_reference(kind, rank, layout, dtype, mask_mode, keepdim, backend):
    _run(kind, SPATIAL[rank], layout, dtype, mask_mode, keepdim, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", gp.KINDS)
def test_output_shapes(kind, backend):
    x = torch.randn(2, 5, 3, 4)
    _skip_unless_backend(backend, x, kind)
    params = {"weights": torch.rand(2, 3, 4)} if kind == "attention" else {}
    width = 10 if kind == "catavgmax" else 5
    assert gp.pool(x, kind, backend=backend, **params).shape == (2, width)
    assert gp.pool(x, kind, keepdim=True, backend=backend, **params).shape == (2, width, 1, 1)
    xl = x.movedim(1, -1)
    kw = dict(layout="channels_last", keepdim=True, backend=backend)
    assert gp.pool(xl, kind, **kw, **params).shape == (2, 1, 1, width)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", gp.KINDS)
def test_empty_sample_pools_to_zero_with_zero_gradient(kind, backend):
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    _skip_unless_backend(backend, x, kind)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    x[1] = float("nan")
    x.requires_grad_()
    params = {"weights": torch.rand(2, 6, dtype=torch.float64)} if kind == "attention" else {}
    y = gp.pool(x, kind, mask=mask, backend=backend, **params)
    y.sum().backward()
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
    assert torch.isfinite(y[0]).all() and x.grad[0].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_ties_share_gradient(backend):
    x = torch.tensor([[[1.0, 3.0, 3.0, 2.0, 3.0]]], requires_grad=True)
    _skip_unless_backend(backend, x, "max")
    gp.pool(x, "max", backend=backend).sum().backward()
    third = 1.0 / 3.0
    assert torch.allclose(x.grad, torch.tensor([[[0.0, third, third, 0.0, third]]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gem_gradient_wrt_p(backend):
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) + 0.1
    _skip_unless_backend(backend, x, "gem")
    p = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    gp.pool(x, "gem", p=p, backend=backend).sum().backward()
    grads = reference_backward(x, torch.ones(2, 3, dtype=torch.float64), "gem",
                               "channels_first", None, p=2.5)
    np.testing.assert_allclose(float(p.grad), grads["p"], rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar-r", "per-channel-r"])
def test_lse_gradient_wrt_r_matches_the_reference(backend, per_channel):
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 3
    _skip_unless_backend(backend, x, "lse")
    backend = "auto" if backend == "fused" and per_channel else backend  # fused refuses it
    mask = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.3
    r0 = torch.tensor([0.5, 1.5, 4.0] if per_channel else 2.5, dtype=torch.float64)
    r = r0.clone().requires_grad_(True)
    g = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    gp.pool(x, "lse", r=r, mask=mask, backend=backend).backward(g)
    grads = reference_backward(x, g, "lse", "channels_first", mask, r=r0.numpy())
    assert grads["r"] is not None and np.shape(grads["r"]) == tuple(r.shape)
    np.testing.assert_allclose(r.grad.numpy(), grads["r"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", gp.KINDS)
def test_gradcheck_float64(kind, backend):
    x = torch.rand(2, 3, 4, 3, dtype=torch.float64) + 0.1
    _skip_unless_backend(backend, x, kind)
    mask = torch.rand(2, 4, 3) > 0.3
    mask[:, 0, 0] = True
    inputs = [x.requires_grad_()]
    if kind == "gem":
        inputs.append(torch.tensor(2.5, dtype=torch.float64, requires_grad=True))
    if kind == "attention":
        inputs.append(torch.rand(2, 4, 3, dtype=torch.float64, requires_grad=True))
    if kind in ("max", "avgmax", "catavgmax"):  # keep the arg-max unique and away from ties
        x.data += torch.arange(x.numel(), dtype=torch.float64).view_as(x) * 1e-2

    def fn(x, *extra):
        params = dict(KIND_PARAMS.get(kind, {}))
        if kind == "gem":
            params["p"] = extra[0]
        if kind == "attention":
            params["weights"] = extra[0]
        return gp.pool(x, kind, mask=mask, backend=backend, **params)

    assert torch.autograd.gradcheck(fn, tuple(inputs))


@given(
    kind=st.sampled_from(gp.KINDS),
    rank=st.integers(1, 3),
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from(DTYPES),
    mask_mode=st.sampled_from(MASKS),
    backend=st.sampled_from(BACKENDS),
    n=st.integers(1, 4),
    c=st.integers(1, 6),
    sizes=st.lists(st.integers(1, 6), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=150, deadline=None)
def test_property_random_shapes(kind, rank, layout, dtype, mask_mode, backend, n, c, sizes, seed):
    spatial = tuple(sizes[:rank])
    x = make_input(n, c, spatial, layout, dtype, seed)
    if backend == "fused" and not kernels.supports(x, kind):
        return
    _run(kind, spatial, layout, dtype, mask_mode, False, backend, seed=seed, n=n, c=c)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_equals_torch_ops(rank, layout):
    x = make_input(2, 3, SPATIAL[rank], layout, torch.float32, 0)
    dims = tuple(range(2, x.ndim)) if layout == "channels_first" else tuple(range(1, x.ndim - 1))
    torch.testing.assert_close(gp.pool(x, "avg", layout=layout), x.mean(dims))
    torch.testing.assert_close(gp.pool(x, "max", layout=layout), x.amax(dims), rtol=0, atol=0)


def test_layout_is_declared_not_guessed():
    x = torch.randn(2, 3, 3, 3)
    cf = gp.pool(x, "avg", layout="channels_first")
    cl = gp.pool(x, "avg", layout="channels_last")
    torch.testing.assert_close(cf, x.mean((2, 3)))
    torch.testing.assert_close(cl, x.mean((1, 2)))
    x_cl_memory = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gp.pool(x_cl_memory, "avg"), cf)


def test_fp16_large_values_do_not_overflow():
    x = torch.full((1, 2, 3, 3), 60000.0, dtype=torch.float16)
    for kind in ("avg", "gem", "lse", "avgmax"):
        y = gp.pool(x, kind)
        assert torch.isfinite(y).all(), kind
        torch.testing.assert_close(y.float(), torch.full((1, 2), 60000.0), rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gem_large_p_on_dead_channel_stays_finite(backend):
    """ReLU-dead channels clamp to eps; eps^p underflows in float32 once p > 7.5."""
    x = torch.zeros(2, 3, 4, 4)
    x[:, 1] = torch.rand(2, 4, 4)
    _skip_unless_backend(backend, x, "gem")
    x.requires_grad_()
    p = torch.tensor(12.0, requires_grad=True)
    y = gp.pool(x, "gem", p=p, backend=backend)
    y.sum().backward()
    torch.testing.assert_close(y[:, 0], torch.full((2,), 1e-6))
    expected = reference_forward(x, "gem", "channels_first", None, p=12.0)
    assert_close(y, expected, torch.float32, "gem p=12")
    assert torch.isfinite(x.grad).all() and torch.isfinite(p.grad)


def test_auto_backend_choice():
    """auto: fused for large inputs, except an unmasked CPU avg that needs no gradient and is
    stored channels-first (x.mean is as fast there); torch for small inputs."""
    from globalpool.dispatch import plan

    def path(backend, x, kind, mask, layout):
        return plan(backend, x, kind, mask, {}, layout).path

    cf = "channels_first"
    big = torch.randn(2, 64, 32, 32)
    stored_last = big.contiguous(memory_format=torch.channels_last)
    mask = torch.ones(2, 32, 32, dtype=torch.bool)
    assert path("auto", big, "avg", None, cf) == "compose"
    assert path("auto", stored_last, "avg", None, cf) == "cpu"
    assert path("auto", big.movedim(1, -1), "avg", None, "channels_last") == "compose"
    assert path("auto", stored_last.movedim(1, -1), "avg", None, "channels_last") == "cpu"
    assert path("auto", big, "avg", mask, cf) == "cpu"
    assert path("auto", big, "max", None, cf) == "cpu"
    assert path("auto", big.requires_grad_(), "avg", None, cf) == "cpu"
    with torch.no_grad():
        assert path("auto", big, "avg", None, cf) == "compose"
    assert path("auto", torch.randn(2, 4, 8, 8), "gem", None, cf) == "compose"
    assert path("fused", torch.randn(2, 4, 8, 8), "avg", None, cf) == "cpu"


@pytest.mark.parametrize("kind", ["first", "last"])
def test_fused_backend_refuses_a_kind_without_a_kernel(kind):
    assert "cpu" not in kernels_of(kind)
    with pytest.raises(ValueError, match=f"backend='fused'.*kernel.*{kind}|{kind}.*kernel"):
        gp.pool(torch.randn(2, 3, 8), kind, backend="fused")
    # auto and torch run its composition (one gather)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(gp.pool(x, kind), x[..., 0 if kind == "first" else -1])
