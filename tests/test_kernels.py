"""Fused kernels (globalpool.kernels) against the NumPy reference, and the custom ops' plumbing.

Every kind x rank x layout x dtype x mask runs forward and backward through ``fused_pool`` (the
``globalpool::pool_forward`` custom op) and is compared with ``globalpool.reference``; padded
positions hold NaN/inf. Further tests cover the physical-layout handling, ties, long rows (chunk
boundaries), gradients w.r.t. p and weights, gradcheck, opcheck, torch.compile and torch.export.
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from numba import types as numba_types

from globalpool import kernels
from globalpool.kernels import cpu_kernels, cpu_numba, cpu_simd, ops
from helpers import (
    DTYPES,
    KIND_PARAMS,
    MASKS,
    check_against_reference,
    make_input,
    make_mask,
    make_weights,
    poison_padded,
    reference_backward,
)

KINDS = ("avg", "max", "avgmax", "catavgmax", "gem", "lse", "attention", "sum")
LAYOUTS = ("channels_first", "channels_last")


def _params(kind: str, x: torch.Tensor, layout: str, seed: int) -> dict:
    params = dict(KIND_PARAMS.get(kind, {}))
    if kind == "attention":
        params["weights"] = make_weights(x, layout, seed).requires_grad_()
    return params


def _check(x, kind, layout, mask, params, *, keepdim=False, grad_seed=3):
    """Fused forward/backward of x (padded positions poisoned with NaN/inf) vs the reference.

    The full kind x rank x layout x dtype x mask grid of the fused path runs in
    test_functional.py (backend="fused"); this file adds the kernel-specific cases."""
    return check_against_reference(kernels.fused_pool, x, kind, layout, mask, params,
                                   keepdim=keepdim, grad_seed=grad_seed)


def test_each_family_serves_the_kinds_its_registry_entries_name():
    """Which kinds a kernel family serves is declared once, in each kind's registry entry
    (``kernels``); each family's own table of kinds (grid CPU: its modes, ``cpu_numba.KINDS``;
    packed CPU: ``cpu_packed.MODES``; CUDA: ``cuda_triton.KIND_CODES``) holds exactly those."""
    from globalpool import registry
    from globalpool.kernels import cpu_packed, cuda_triton

    def served(family: str) -> set[str]:
        return {k for k in registry.kinds() if family in registry.kernels_of(k)}

    assert set(cpu_numba.KINDS) == served("cpu")
    assert set(cpu_packed.MODES) == served("packed")
    assert set(cuda_triton.KIND_CODES) == served("cuda")
    assert set(registry.KERNEL_FAMILIES) == {"cpu", "packed", "cuda"}


def test_gem_grad_p_finisher_against_finite_differences():
    """The one d/dp finisher of the CPU kernels, from the sums over u = max(x, eps) / y, against
    a central difference of y(p) = (mean max(x, eps)^p)^(1/p) in float64; y rounded to float32
    (mu != 1) still gives d/dp of the exact y, and empty rows add 0."""
    rng = np.random.default_rng(3)
    x = rng.uniform(0.0, 4.0, size=(3, 2, 7))
    x[0, 0, :3] = 0.0  # below eps
    eps, p = 1e-6, 2.7
    z = np.maximum(x, eps)

    def y_of(q):
        return (z**q).mean(-1) ** (1.0 / q)

    g = rng.normal(size=(3, 2))
    y = y_of(p).astype(np.float32).astype(np.float64)
    u = z / y[..., None]
    s0, s1 = (u**p).sum(-1), (u**p * np.log(u)).sum(-1)
    got = cpu_numba.gem_grad_p(g, y, np.full(3, 7), p, s0, s1)
    h = 1e-6
    want = (g * (y_of(p + h) - y_of(p - h)) / (2 * h)).sum()
    assert got == pytest.approx(want, rel=1e-6, abs=1e-8)
    count = np.array([7, 0, 7])  # the middle row empty: its terms drop out
    got = cpu_numba.gem_grad_p(g, y, count, p, s0, s1)
    rest = want - (g[1] * (y_of(p + h) - y_of(p - h))[1] / (2 * h)).sum()
    assert got == pytest.approx(rest, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_keepdim_shapes(kind, layout):
    x = make_input(2, 3, (4, 5), layout, torch.float32, seed=0)
    y, _ = _check(x, kind, layout, None, _params(kind, x, layout, 0), keepdim=True)
    width = 6 if kind == "catavgmax" else 3
    assert y.shape == ((2, width, 1, 1) if layout == "channels_first" else (2, 1, 1, width))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("mask_mode", ("none", "random"))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_long_rows_and_odd_channels(layout, kind, mask_mode, dtype):
    """L spans several 1024-position chunks; C = 37 exercises partial vectors along C."""
    x = make_input(2, 37, (3000,), layout, dtype, seed=5)
    mask = make_mask(2, (3000,), mask_mode, seed=5)
    _check(x, kind, layout, mask, _params(kind, x, layout, 5))


@pytest.mark.parametrize("mask_mode", ("none", "random"))
@pytest.mark.parametrize("kind", KINDS)
def test_channels_last_chunks_merge(kind, mask_mode):
    """One channels-last sample is split along L into chunks whose partials are merged: a max
    tied across three chunks, and a sample whose real positions all lie in one chunk."""
    x = make_input(2, 5, (2048,), "channels_last", torch.float32, seed=11)
    x[0, [10, 700, 1900], 0] = 50.0
    mask = make_mask(2, (2048,), mask_mode, seed=11)
    if mask is not None:
        mask[0, [10, 700, 1900]] = True
        mask[1] = False
        mask[1, 1200:1300] = True
    _check(x, kind, "channels_last", mask, _params(kind, x, "channels_last", 11))
    if kind in ("max", "lse", "avg"):
        x[0, 1500, 1] = float("nan")  # a real NaN in a late chunk is the result
        assert torch.isnan(kernels.fused_pool(x, kind, "channels_last")[0, 1])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("mask_mode", ("none", "random"))
def test_attention_long_rows_four_at_a_time(mask_mode, dtype):
    """Channels-first rows of >= ROWS4_MIN_L positions are summed four rows at a time sharing
    each load of the weights: C = 6 makes groups of four cross sample boundaries (those rows
    fall back to one at a time), L % 16 != 0 leaves a tail, and N * C * L is past the
    parallel threshold so groups also meet task boundaries (8 samples: a task gets >= 4 rows)."""
    length = cpu_kernels.ROWS4_MIN_L + 13
    x = make_input(8, 6, (length,), "channels_first", dtype, seed=5)
    mask = make_mask(8, (length,), mask_mode, seed=5)
    _check(x, "attention", "channels_first", mask, _params("attention", x, "channels_first", 5))


def test_exp2_and_log2_match_numpy_at_ties_and_edges():
    """The float32 exp2/log2 the kernels emit, scalar and in lanes, against NumPy: exact
    half-integers (where a rounding that breaks ties differently from rint doubles or halves
    the result), the clamps at -126 / 128, 0, inf and NaN."""
    from numba import njit

    K = cpu_simd
    lanes = K.lanes_of(numba_types.float32)

    @njit
    def run(u, e_s, e_v, x, l_s, l_v):
        for i in range(u.size):
            e_s[i] = K.sexp2(u[i])
            l_s[i] = K.slog2(x[i])
        for b in range(0, u.size, lanes):
            K.vput(e_v, b, K.vexp2(K.vload(u, b)))
            K.vput(l_v, b, K.vlog2(K.vload(x, b)))

    halves = np.arange(-125.5, 126.0, 1.0)
    # 2**u for u in (127.5, 128) overflows to inf (2**rint(u) does): not tested
    u = np.concatenate([halves, [-130.0, -126.0, 0.0, 127.4, 128.0, 200.0, np.nan, -np.inf]])
    rng = np.random.default_rng(0)
    u = np.concatenate([u, rng.uniform(-30, 30, 16 - u.size % 16 + 64)]).astype(np.float32)
    x = np.abs(u) + np.float32(1e-3)
    x[:4] = [0.0, np.inf, np.nan, 1.0]
    e_s, e_v, l_s, l_v = (np.empty_like(u) for _ in range(4))
    run(u, e_s, e_v, x, l_s, l_v)
    with np.errstate(over="ignore", divide="ignore"):
        want_e = np.exp2(u.astype(np.float64)).astype(np.float32)
        want_l = np.log2(x.astype(np.float64))
    want_e[u < -126] = 0.0
    for got_e, got_l in ((e_s, l_s), (e_v, l_v)):
        np.testing.assert_allclose(got_e, want_e, rtol=4e-7, atol=0)
        np.testing.assert_allclose(got_l, want_l, rtol=4e-7, atol=1e-7)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_lse_maximum_rising_in_a_later_chunk(layout):
    """Channels-first lse keeps one running maximum per row and rescales its sums when a later
    chunk beats it (by far: 2**(r * gap) would overflow float32 without the rescale)."""
    x = make_input(2, 3, (3000,), layout, torch.float32, seed=9)
    ch = (slice(None), 1) if layout == "channels_first" else (slice(None), slice(None), 1)
    pos = (slice(None), slice(None), 2500) if layout == "channels_first" else (slice(None), 2500)
    x[pos] = 120.0  # one large value late in every row
    x[ch] -= 300.0  # and a row far below zero everywhere else
    _check(x, "lse", layout, make_mask(2, (3000,), "random", seed=9), {"r": 1.0})


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n, c, length", [(1, 1, 1), (1, 3, 17), (5, 1, 33), (1, 70, 2), (9, 2, 5)])
def test_odd_sizes(layout, n, c, length):
    for kind in KINDS:
        x = make_input(n, c, (length,), layout, torch.float32, seed=n + c)
        _check(
            x, kind, layout, make_mask(n, (length,), "random", seed=1), _params(kind, x, layout, 1)
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", ("channels_last", "strided"))
def test_physical_layout(kind, fmt):
    """A channels-first tensor stored channels-last is pooled as (N, L, C) without a copy."""
    base = make_input(2, 6, (5, 4), "channels_first", torch.float32, seed=7)
    if fmt == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
        x3, cl = kernels._physical(x, "channels_first")
        assert cl and x3.data_ptr() == x.data_ptr()
    else:
        x = base.transpose(2, 3).contiguous().transpose(2, 3)  # neither layout is contiguous
    mask = make_mask(2, (5, 4), "random", seed=7)
    _check(x, kind, "channels_first", mask, _params(kind, x, "channels_first", 7))
    # and a declared channels-last tensor stored channels-first
    xl = base.movedim(1, -1)
    assert kernels._physical(xl, "channels_last")[1] is False
    _check(xl, kind, "channels_last", mask, _params(kind, xl, "channels_last", 7))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_physical_views_keep_offset_and_ignore_unit_dims(layout):
    """_physical reads x's strides: a batch slice (storage offset), size-1 dims with odd strides
    and a channels-last slice are all viewed in place; an expanded dim is copied."""
    big = make_input(4, 6, (5, 1), layout, torch.float32, seed=3)
    x = big[1:3]  # storage offset 1 * 30
    x3, _ = kernels._physical(x, layout)
    assert x3.data_ptr() == x.data_ptr() and torch.equal(x3.reshape(x.shape), x.reshape(x.shape))
    _check(x, "avg", layout, None, {})
    odd = torch.empty(2, 6, 5, 1).as_strided((2, 6, 5, 1), (30, 5, 1, 99))  # stride of a 1-dim
    odd.copy_(make_input(2, 6, (5, 1), "channels_first", torch.float32, seed=4))
    if layout == "channels_first":
        assert kernels._physical(odd, layout)[0].data_ptr() == odd.data_ptr()
        _check(odd, "max", layout, None, {})
    expanded = make_input(2, 1, (5, 4), layout, torch.float32, seed=5)
    cf = layout == "channels_first"
    expanded = expanded.expand(2, 3, 5, 4) if cf else expanded.expand(2, 5, 4, 3)
    x3, _ = kernels._physical(expanded, layout)
    assert x3.is_contiguous()
    _check(expanded.contiguous(), "avg", layout, None, {})
    want = kernels.fused_pool(expanded.contiguous(), "avg", layout)
    assert torch.equal(kernels.fused_pool(expanded, "avg", layout), want)


def _graph_nodes(fn) -> set[str]:
    seen, todo = set(), [fn]
    while todo:
        f = todo.pop()
        if f is not None and type(f).__name__ not in seen:
            seen.add(type(f).__name__)
            todo.extend(g for g, _ in f.next_functions)
    return seen


@pytest.mark.parametrize("fmt", ("contiguous", "channels_last", "offset"))
def test_physical_views_have_cheap_gradients(fmt):
    """The views _physical takes are reshapes/permutes: an as_strided view would make autograd
    materialise a zero tensor of x's whole storage and scatter into it (measured: the fused
    backward fell to 0.2-0.6 of a fill_)."""
    x = make_input(3, 6, (5, 4), "channels_first", torch.float32, seed=2)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.detach().requires_grad_(True)
    xin = x[1:] if fmt == "offset" else x
    nodes = _graph_nodes(kernels.fused_pool(xin, "avg").grad_fn)
    assert not any("AsStrided" in name for name in nodes), nodes


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_max_ties_share_gradient(layout, dtype):
    # row 0: maximum 3 at positions 1, 4 and 2900 (different chunks); row 1: a single maximum
    x = torch.zeros(1, 2, 3000, dtype=torch.float64)
    x[0, 0, [1, 4, 2900]] = 3.0
    x[0, 1, 7] = 5.0
    x[0, 1, 8] = 4.0
    xs = (x if layout == "channels_first" else x.transpose(1, 2)).contiguous().to(dtype)
    out, aux = cpu_numba.forward(xs, layout == "channels_last", "max", None)
    assert aux.dtype == torch.int32 and aux.shape == (1, 2, 2)
    assert aux[0, 0].tolist() == [1, 3] and aux[0, 1].tolist() == [7, 1]
    for kind in ("max", "avgmax", "catavgmax"):
        _check(xs, kind, layout, None, {})
    # a mask hiding one of the ties: two remain
    mask = torch.ones(1, 3000, dtype=torch.bool)
    mask[0, 4] = False
    _check(xs, "max", layout, mask, {})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_and_special_values(layout):
    x = torch.tensor([[[1.0, float("nan"), 2.0], [float("-inf"), float("-inf"), float("-inf")]]])
    if layout == "channels_last":
        x = x.transpose(1, 2).contiguous()
    mask = torch.tensor([[True, False, True]])

    def pool(x, kind, **kw):
        return kernels.fused_pool(x, kind, layout, **kw)

    for kind in ("avg", "max", "lse", "gem"):
        assert torch.isfinite(pool(x, kind, mask=mask)[0, 0])
    assert pool(x, "max")[0, 1] == float("-inf")
    assert torch.isnan(pool(x, "max")[0, 0])  # a real NaN is the max
    assert torch.isnan(pool(x, "lse")[0, 0])
    assert torch.isnan(pool(x, "avg")[0, 0])
    empty = torch.zeros(1, 3, dtype=torch.bool)
    for kind in KINDS:
        params = {"weights": torch.ones(1, 3)} if kind == "attention" else {}
        xg = x.clone().requires_grad_()
        y = pool(xg, kind, mask=empty, **params)
        assert (y == 0).all()
        y.sum().backward()
        assert (xg.grad == 0).all()


def test_attention_zero_weights():
    x = make_input(2, 3, (6,), "channels_first", torch.float64, seed=0).requires_grad_()
    w = torch.rand(2, 6, dtype=torch.float64)
    w[0] = 0.0
    w.requires_grad_()
    y = kernels.fused_pool(x, "attention", weights=w)
    assert (y[0] == 0).all()
    y.sum().backward()
    assert (x.grad[0] == 0).all() and (w.grad[0] == 0).all()


@pytest.mark.parametrize("p", (1.0, 2.0, 3.0, 4.0, 2.5, 7.3))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_gem_grad_p(p, layout, dtype):
    x = make_input(3, 4, (5, 3), layout, dtype, seed=11)
    mask = make_mask(3, (5, 3), "empty", seed=11)
    pt = torch.tensor(p, dtype=dtype, requires_grad=True)
    params = {"p": pt, "eps": 1e-6}
    _check(x, "gem", layout, mask, params)
    grads = reference_backward(x, torch.ones(3, 4, dtype=dtype), "gem", layout, mask, **params)
    pt.grad = None
    x_in = poison_padded(x, mask, layout)
    kernels.fused_pool(x_in, "gem", layout, mask, p=pt).sum().backward()
    assert pt.grad.dtype == dtype
    np.testing.assert_allclose(
        float(pt.grad), grads["p"], rtol=1e-4 if dtype == torch.float32 else 1e-9
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(kind, layout):
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3, 5) if layout == "channels_first" else (2, 5, 3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, True], [False, True, True, True, False]])
    inputs = [x]
    if kind == "gem":
        x.data = x.data.abs() + 0.1
        p = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
        inputs.append(p)

        def fn(x, p):
            return kernels.fused_pool(x, kind, layout, mask, p=p)
    elif kind == "attention":
        w = torch.rand(2, 5, generator=gen, dtype=torch.float64).add(0.1).requires_grad_()
        inputs.append(w)

        def fn(x, w):
            return kernels.fused_pool(x, kind, layout, mask, weights=w)
    else:

        def fn(x):
            return kernels.fused_pool(x, kind, layout, mask, r=0.7)

    assert torch.autograd.gradcheck(fn, tuple(inputs))


def _sample(kind: str, channels_last: bool, masked: bool, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, generator=gen, dtype=dtype)
    mask = torch.tensor([[True] * 5 + [False], [False] + [True] * 5]) if masked else None
    w = torch.rand(2, 6, generator=gen, dtype=dtype) if kind == "attention" else None
    return x, channels_last, kind, mask, torch.tensor(2.5 if kind == "gem" else 3.0), torch.tensor(1e-6), torch.tensor(1.3), w


@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind):
    x, cl, kind, mask, p, eps, r, w = _sample(kind, False, True)
    x.requires_grad_()
    if w is not None:
        w.requires_grad_()
    torch.library.opcheck(ops.pool_forward, (x, cl, kind, mask, p, eps, r, w))
    torch.library.opcheck(ops.pool_forward, _sample(kind, True, False))
    xd = x.detach()
    out, aux = ops.pool_forward(xd, cl, kind, mask, p, eps, r, None if w is None else w.detach())
    args = (
        torch.ones_like(out),
        xd,
        out,
        aux,
        cl,
        kind,
        mask,
        p,
        eps,
        r,
        None if w is None else w.detach(),
        kind == "gem",
        kind == "attention",
    )
    torch.library.opcheck(ops.pool_backward, args)


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 7, 10)
        out, aux = ops.pool_forward(x, True, "catavgmax", None, torch.tensor(3.0), torch.tensor(1e-6), torch.tensor(1.0), None)
        assert out.shape == (4, 20) and aux.shape == (4, 10, 2) and aux.dtype == torch.int32
        out, aux = ops.pool_forward(x, False, "lse", None, torch.tensor(3.0), torch.tensor(1e-6), torch.tensor(1.0), None)
        assert out.shape == (4, 7) and aux.shape == (2, 4, 7)  # row maxima, log-means


def test_saved_tensors():
    """avg saves nothing; gem saves only x, the output and p; max its arg-max table, plus the
    values and indices of the rows whose maximum is tied (the backward needs x nowhere else)."""

    def saved(kind, x=None, **params):
        x = torch.randn(4, 8, 6, 6) if x is None else x
        x.requires_grad_()
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            kernels.fused_pool(x, kind, **params)
        return sum(sizes), x.numel() * 4, 4 * 8 * 4

    assert saved("avg")[0] == 0
    total, xb, outb = saved("gem", p=torch.tensor(3.0, requires_grad=True))
    assert total <= xb + outb + 4
    total, xb, outb = saved("max")
    assert total == 2 * outb  # int32 (arg-max, tie count) per output
    tied = torch.randn(4, 8, 6, 6)
    tied[0, 0, :, :2] = 100.0
    total, xb, outb = saved("max", tied)
    assert total == 2 * outb + 36 * 4 + 8  # + one tied row of 6 x 6 floats and its int64 index
    x = tied.detach().clone().requires_grad_()
    kernels.fused_pool(x, "max").sum().backward()
    assert torch.allclose(x.grad[0, 0, :, :2], torch.full((6, 2), 1 / 12))
    assert x.grad[0, 0, :, 2:].abs().sum() == 0 and x.grad[1].sum() == 8


def test_compile_fullgraph():
    def f(x, w, p):
        a = kernels.fused_pool(x, "gem", p=p)
        b = kernels.fused_pool(x, "catavgmax", "channels_first", keepdim=True).flatten(1)
        c = kernels.fused_pool(x, "attention", weights=w)
        return a.sum() + b.sum() + c.sum()

    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    w = torch.rand(2, 4, 4, requires_grad=True)
    p = torch.tensor(3.0, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ref = f(x, w, p)
    got = compiled(x, w, p)
    torch.testing.assert_close(got, ref)
    g_ref = torch.autograd.grad(ref, (x, w, p))
    g_got = torch.autograd.grad(compiled(x, w, p), (x, w, p))
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_export():
    class Head(torch.nn.Module):
        def forward(self, x):
            return kernels.fused_pool(x, "lse", "channels_last", r=2.0)

    x = torch.randn(2, 5, 5, 3)
    ep = torch.export.export(Head(), (x,))
    assert "globalpool.pool_forward" in str(ep.graph)
    torch.testing.assert_close(ep.module()(x), Head()(x))


def test_supports():
    x = torch.ones(2, 3, 4)
    assert all(kernels.supports(x.to(d), k) for d in DTYPES for k in KINDS)
    assert not kernels.supports(x.int(), "avg")
    assert not kernels.supports(x, "median")
    assert not kernels.supports(torch.ones(2, 3), "avg")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 4),
    c=st.integers(1, 40),
    spatial=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    kind=st.sampled_from(KINDS),
    layout=st.sampled_from(LAYOUTS),
    mask_mode=st.sampled_from(MASKS),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(n, c, spatial, kind, layout, mask_mode, seed):
    x = make_input(n, c, tuple(spatial), layout, torch.float32, seed=seed)
    mask = make_mask(n, tuple(spatial), mask_mode, seed=seed)
    _check(x, kind, layout, mask, _params(kind, x, layout, seed), grad_seed=seed)


def test_huge_page_buffers_are_ordinary_tensors():
    """The huge-page hint changes nothing visible: shape, dtype, writability, results."""
    from globalpool.kernels import huge_pages

    g = huge_pages.empty_huge((9, 1 << 20), torch.float32)  # 36 MiB: the hint is given
    assert g.shape == (9, 1 << 20) and g.dtype == torch.float32 and g.is_contiguous()
    g.fill_(2.0)
    assert float(g.sum()) == 18 * (1 << 20)
    x = torch.randn(4, 64, 192, 192, requires_grad=True)  # a 36 MiB gradient
    kernels.fused_pool(x, "avg").sum().backward()
    assert torch.all(x.grad == 1 / (192 * 192))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("kind", ("max", "avgmax", "catavgmax"))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_tied_maxima(layout, kind, dtype):
    """Rounded inputs tie often: the backward rebuilds tied rows from the saved rows alone."""
    x = (make_input(3, 6, (5, 4), layout, torch.float64, seed=21) * 2).round().to(dtype)
    mask = make_mask(3, (5, 4), "random", seed=21)
    _check(x, kind, layout, mask, {})


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tied_rows_at_scale(layout, dtype):
    """Most rows tied, rows longer than one chunk of the channels-first max (1600 positions)
    and more than 64K elements: the long-row forward and the parallel tied-rows backward."""
    x = (make_input(4, 16, (40, 40), layout, torch.float64, seed=5) * 1.5).round().to(dtype)
    _check(x, "max", layout, make_mask(4, (40, 40), "random", seed=5), {})
    _check(x, "catavgmax", layout, None, {})


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_attention_weight_grad_in_bfloat16_avoids_the_rounded_output(layout):
    """d/dw of attention pooling is sum_c g_c (x_cl - out_c) / S: computed from the bfloat16
    output (rounded to 2**-9 of |out|) the difference lost its precision (hypothesis found
    -0.31 for -0.28 with values near 12; here near 100, where the rounding is 0.25)."""
    gen = torch.Generator().manual_seed(0)
    x = (100.0 + 4 * torch.rand(3, 5, 4, generator=gen)).to(torch.bfloat16)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous()
    w = torch.rand(3, 4, generator=gen).to(torch.bfloat16).requires_grad_(True)
    g = torch.randn(3, 5, generator=gen).to(torch.bfloat16)
    y = kernels.fused_pool(x, "attention", layout, weights=w)
    (gw,) = torch.autograd.grad(y, w, g)
    xd = x.double() if layout == "channels_first" else x.double().movedim(-1, 1)
    wd = w.detach().double().requires_grad_(True)
    yd = (xd * wd[:, None, :]).sum(-1) / wd.sum(-1, keepdim=True)
    (expected,) = torch.autograd.grad(yd, wd, g.double())
    torch.testing.assert_close(gw.double(), expected, rtol=2e-2, atol=2e-2)


_F32_LANES = cpu_simd.lanes_of(numba_types.float32)  # 16 with AVX-512, 8 with AVX2


@pytest.mark.parametrize(
    "channels",
    (_F32_LANES, 2 * _F32_LANES + 1, cpu_kernels.REGS_CL_MAX * _F32_LANES,
     cpu_kernels.REGS_CL_MAX * _F32_LANES + 1),
)
@pytest.mark.parametrize("kind", ("max", "avgmax", "catavgmax"))
def test_channels_last_inference_max_in_registers(kind, channels):
    """Without a graph the channels-last max kinds skip the arg-max table, and up to
    REGS_CL_MAX vectors of channels (64 float32 with AVX-512) keep their running max and sum in
    registers; one channel more takes the plain loop. A real NaN in the last channel reaches
    the output."""
    x = make_input(2, channels, (300,), "channels_last", torch.float32, seed=3)
    _check(x, kind, "channels_last", make_mask(2, (300,), "random", seed=3),
           _params(kind, x, "channels_last", 3))
    x[1, 123, channels - 1] = float("nan")
    with torch.no_grad():
        y = kernels.fused_pool(x, kind, "channels_last")
    nan_columns = [channels - 1, 2 * channels - 1] if kind == "catavgmax" else [channels - 1]
    assert torch.isnan(y).nonzero().tolist() == [[1, c] for c in nan_columns]


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_lse_grad_in_bfloat16_avoids_the_rounded_output(layout):
    """d lse / dx = softmax(r x) = exp(r (x - out)) / L: with the output rounded to bfloat16 near
    100 (a step of 0.5) the factor exp(r (x - out)) was off by up to exp(0.25 r)."""
    gen = torch.Generator().manual_seed(0)
    x = (100.0 + 4 * torch.rand(3, 5, 40, generator=gen)).to(torch.bfloat16)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous()
    g = torch.randn(3, 5, generator=gen).to(torch.bfloat16)
    xg = x.detach().requires_grad_(True)
    (gx,) = torch.autograd.grad(kernels.fused_pool(xg, "lse", layout, r=2.0), xg, g)
    xd = x.double() if layout == "channels_first" else x.double().movedim(-1, 1)
    xd.requires_grad_(True)
    yd = (torch.logsumexp(2.0 * xd, -1) - math.log(40)) / 2.0
    (expected,) = torch.autograd.grad(yd, xd, g.double())
    if layout == "channels_last":
        expected = expected.movedim(1, -1)
    torch.testing.assert_close(gx.double(), expected, rtol=2e-2, atol=2e-2)
