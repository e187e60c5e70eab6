"""Tests of the NumPy reference against hand-computed values, finite differences and properties.

NumPy only (no torch), so this file stays fast. Expected values never come from the code path
under test: they are worked out by hand, from plain NumPy formulas, from finite differences, or
from properties (cropping, permutation, shift, homogeneity) that the definitions imply.
"""

from __future__ import annotations

import doctest
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from globalpool import reference as ref
from globalpool.reference import (
    GlobalPool,
    adaptive_backward,
    adaptive_forward,
    bins,
    pool_backward,
    pool_forward,
)
from globalpool.registry import kinds

KINDS = kinds()
LAYOUTS = ("channels_first", "channels_last")
PARAMS = {"p": 2.5, "eps": 1e-6, "r": 1.7}
SHAPES = {1: (3, 2, 5), 2: (3, 2, 3, 4), 3: (3, 2, 2, 3, 3)}  # channels_first, N = 3
HOMOGENEOUS = (  # f(a x) = a f(x), a > 0
    "avg", "max", "avgmax", "catavgmax", "attention", "sum", "first", "last", "mean_sqrt_len",
    "weightedmean",
)
ORDER_FREE = tuple(  # symmetric in positions
    k for k in KINDS if k not in ("first", "last", "weightedmean")
)


# ------------------------------------------------------------------------------------------
# helpers


def distinct_x(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Positive values in [0.5, 2.5), all distinct with gaps >= 2 / size (no max ties)."""
    size = math.prod(shape)
    return 0.5 + rng.permutation(size).reshape(shape) * (2.0 / size)


def random_mask(rng: np.random.Generator, n: int, spatial: tuple[int, ...]) -> np.ndarray:
    """Random mask, sample 0 keeps >= 1 real position, the last sample is empty."""
    mask = rng.random((n, *spatial)) < 0.6
    mask[0].flat[rng.integers(mask[0].size)] = True
    mask[-1] = False
    return mask


def poison(x: np.ndarray, mask: np.ndarray, layout: str) -> np.ndarray:
    """Return a copy of x with NaN / +inf / -inf written at every padded position."""
    x = np.array(x, dtype=np.float64)
    xc = np.moveaxis(x, -1, 1) if layout == "channels_last" else x
    junk = np.array([np.nan, np.inf, -np.inf])
    for n_, *pos in zip(*np.nonzero(~mask), strict=True):
        xc[(n_, slice(None), *pos)] = junk[(n_ + sum(pos)) % 3]
    return x


def fd(fun, a: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Central finite differences of the scalar fun at every element of a (float64)."""
    a = np.array(a, dtype=np.float64)
    grad = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        old = a[idx]
        a[idx] = old + h
        up = fun(a)
        a[idx] = old - h
        down = fun(a)
        a[idx] = old
        grad[idx] = (up - down) / (2 * h)
    return grad


def to_last(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, 1, -1)


def cf(x: np.ndarray, layout: str) -> np.ndarray:
    """View x (or a gradient shaped like it) as channels_first."""
    return np.moveaxis(x, -1, 1) if layout == "channels_last" else x


def kind_kwargs(kind: str, weights: np.ndarray | None) -> dict:
    kw = dict(PARAMS)
    if kind == "attention":
        kw["weights"] = weights
    return kw


# ------------------------------------------------------------------------------------------
# forward: hand-computed values


ROW = np.array([[[1.0, 2.0, 3.0, 6.0]]])  # (1, 1, 4)


@pytest.mark.parametrize(
    ("kind", "kw", "expected"),
    [
        ("avg", {}, 3.0),
        ("max", {}, 6.0),
        ("avgmax", {}, 4.5),
        ("gem", {"p": 1.0}, 3.0),
        ("gem", {"p": 2.0}, math.sqrt((1 + 4 + 9 + 36) / 4)),
        ("lse", {"r": 1.0}, math.log((math.e + math.e**2 + math.e**3 + math.e**6) / 4)),
        ("lse", {"r": 0.5}, 2 * math.log((math.e**0.5 + math.e + math.e**1.5 + math.e**3) / 4)),
        ("attention", {"weights": np.array([[1.0, 1.0, 2.0, 0.0]])}, (1 + 2 + 6) / 4),
        ("attention", {"weights": np.array([[0.0, 0.0, 0.0, 3.0]])}, 6.0),
    ],
)
def test_forward_hand_values(kind, kw, expected):
    out = pool_forward(ROW, kind, **kw)
    assert out.shape == (1, 1)
    assert out[0, 0] == pytest.approx(expected, rel=1e-12)


def test_catavgmax_is_avg_block_then_max_block():
    x = np.array([[[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]]])  # (1, 2, 4)
    np.testing.assert_array_equal(pool_forward(x, "catavgmax"), [[3.0, 1.0, 6.0, 4.0]])


def test_gem_clamps_at_eps():
    x = np.array([[[-1.0, 0.0, 2.0]]])
    assert pool_forward(x, "gem", p=1.0, eps=0.5)[0, 0] == pytest.approx((0.5 + 0.5 + 2.0) / 3)
    g = pool_backward(x, np.ones((1, 1)), "gem", p=1.0, eps=0.5)["x"]
    np.testing.assert_allclose(g, [[[0.0, 0.0, 1.0 / 3]]])


def test_gem_gradient_passes_at_exactly_eps():
    x = np.array([[[0.5, 2.0]]])
    g = pool_backward(x, np.ones((1, 1)), "gem", p=1.0, eps=0.5)["x"]
    np.testing.assert_allclose(g, [[[0.5, 0.5]]])


def test_lse_is_stable_for_large_values():
    x = np.array([[[1000.0, 1000.0], [-1000.0, -1000.0]]])
    np.testing.assert_allclose(pool_forward(x, "lse"), [[1000.0, -1000.0]])
    g = pool_backward(x, np.ones((1, 2)), "lse")["x"]
    np.testing.assert_allclose(g, np.full((1, 2, 2), 0.5))


def test_max_ties_share_gradient_equally():
    x = np.array([[[1.0, 3.0, 3.0, 2.0], [7.0, 7.0, 7.0, 7.0]]])
    g = pool_backward(x, np.array([[2.0, 1.0]]), "max")["x"]
    np.testing.assert_allclose(g, [[[0.0, 1.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])
    g = pool_backward(x, np.array([[2.0, 1.0]]), "avgmax")["x"]
    np.testing.assert_allclose(g, [[[0.25, 0.75, 0.75, 0.25], [0.25, 0.25, 0.25, 0.25]]])
    g = pool_backward(x, np.array([[2.0, 1.0, 4.0, 8.0]]), "catavgmax")["x"]
    np.testing.assert_allclose(g, [[[0.5, 2.5, 2.5, 0.5], [2.25, 2.25, 2.25, 2.25]]])


def test_mask_with_nan_and_inf_in_padded_positions():
    x = np.array([[[1.0, np.nan, np.inf, 3.0, -np.inf]]])
    mask = np.array([[True, False, False, True, False]])
    w = np.array([[1.0, np.nan, np.inf, 3.0, 5.0]])
    expected = {
        "avg": 2.0,
        "max": 3.0,
        "avgmax": 2.5,
        "gem": math.sqrt((1 + 9) / 2),
        "lse": math.log((math.e + math.e**3) / 2),
        "attention": (1 + 9) / 4,
    }
    grads = {
        "avg": [0.5, 0, 0, 0.5, 0],
        "max": [0, 0, 0, 1, 0],
        "avgmax": [0.25, 0, 0, 0.75, 0],
        "gem": [1 / (2 * math.sqrt(5)), 0, 0, 3 / (2 * math.sqrt(5)), 0],
        "lse": [1 / (1 + math.e**2), 0, 0, math.e**2 / (1 + math.e**2), 0],
        "attention": [0.25, 0, 0, 0.75, 0],
    }
    for kind, value in expected.items():
        kw = {"p": 2.0, "weights": w}
        out = pool_forward(x, kind, mask=mask, **kw)
        assert out[0, 0] == pytest.approx(value, rel=1e-12), kind
        res = pool_backward(x, np.ones((1, 1)), kind, mask=mask, **kw)
        assert np.all(np.isfinite(res["x"])), kind
        np.testing.assert_allclose(res["x"][0, 0], grads[kind], rtol=1e-12, err_msg=kind)
        if kind == "attention":
            # dy/dw_s = (x_s - y) / sum(w) at real positions, exactly 0 elsewhere
            np.testing.assert_allclose(res["weights"], [[(1 - 2.5) / 4, 0, 0, (3 - 2.5) / 4, 0]])


@pytest.mark.parametrize("kind", KINDS)
def test_empty_sample_pools_to_zero_with_zero_gradient(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4))
    x[1] = np.nan
    mask = np.zeros((2, 4), dtype=bool)
    mask[0, 1:3] = True
    w = rng.uniform(0.5, 1.5, size=(2, 4))
    out = pool_forward(x, kind, mask=mask, weights=w)
    np.testing.assert_array_equal(out[1], 0.0)
    assert np.all(np.isfinite(out))
    res = pool_backward(x, np.ones_like(out), kind, mask=mask, weights=w)
    np.testing.assert_array_equal(res["x"][1], 0.0)
    np.testing.assert_array_equal(res["x"][0][:, [0, 3]], 0.0)
    if kind == "attention":
        np.testing.assert_array_equal(res["weights"][1], 0.0)
        np.testing.assert_array_equal(res["weights"][0, [0, 3]], 0.0)
    if kind == "gem":
        assert math.isfinite(res["p"])


def test_attention_zero_total_weight_gives_zero():
    x = np.array([[[1.0, 2.0, 3.0]]])
    w = np.array([[0.0, 0.0, 9.0]])  # the only positive weight sits at a padded position
    mask = np.array([[True, True, False]])
    assert pool_forward(x, "attention", weights=w, mask=mask)[0, 0] == 0.0
    res = pool_backward(x, np.ones((1, 1)), "attention", weights=w, mask=mask)
    np.testing.assert_array_equal(res["x"], 0.0)
    np.testing.assert_array_equal(res["weights"], 0.0)


def test_unmasked_forward_matches_plain_numpy():
    rng = np.random.default_rng(1)
    x = rng.uniform(0.1, 2.0, size=(2, 3, 4, 5))
    w = rng.uniform(0.0, 1.0, size=(2, 4, 5))
    ax = (2, 3)
    p, r = 3.0, 0.7
    plain = {
        "avg": x.mean(ax),
        "max": x.max(ax),
        "avgmax": (x.mean(ax) + x.max(ax)) / 2,
        "catavgmax": np.concatenate([x.mean(ax), x.max(ax)], axis=1),
        "gem": np.mean(x**p, axis=ax) ** (1 / p),
        "lse": np.log(np.mean(np.exp(r * x), axis=ax)) / r,
        "attention": np.einsum("ncij,nij->nc", x, w) / w.sum((1, 2))[:, None],
        "sum": x.sum(ax),
        "first": x[:, :, 0, 0],
        "last": x[:, :, -1, -1],
    }
    # the kinds written out above, independently of the reference (a new kind's reference is
    # checked against its composition by the conformance suite)
    for kind, expected in plain.items():
        out = pool_forward(x, kind, p=p, r=r, weights=w)
        np.testing.assert_allclose(out, expected, rtol=1e-12, err_msg=kind)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_keepdim_shapes_and_backward_accepts_both_shapes(layout, rank):
    rng = np.random.default_rng(rank)
    shape = SHAPES[rank]
    x = distinct_x(rng, shape)
    if layout == "channels_last":
        x = to_last(x)
    w = rng.uniform(0.5, 1.0, size=(shape[0], *shape[2:]))
    for kind in KINDS:
        c_out = 2 * shape[1] if kind == "catavgmax" else shape[1]
        flat = pool_forward(x, kind, layout=layout, weights=w)
        kept = pool_forward(x, kind, layout=layout, keepdim=True, weights=w)
        ones = (1,) * rank
        expected = (shape[0], c_out, *ones) if layout == "channels_first" else (3, *ones, c_out)
        assert flat.shape == (shape[0], c_out)
        assert kept.shape == expected
        np.testing.assert_array_equal(kept.reshape(flat.shape), flat)
        g = rng.normal(size=flat.shape)
        a = pool_backward(x, g, kind, layout=layout, weights=w)
        b = pool_backward(x, g.reshape(kept.shape), kind, layout=layout, weights=w)
        assert a["x"].shape == x.shape
        np.testing.assert_array_equal(a["x"], b["x"])


def test_computes_in_float64_for_float32_and_float16_input():
    x = np.array([[[1.0, 2.0, 4.0]]], dtype=np.float32)
    for dtype in (np.float32, np.float16):
        out = pool_forward(x.astype(dtype), "avg")
        assert out.dtype == np.float64
        assert out[0, 0] == pytest.approx(7 / 3, rel=1e-15)
        assert pool_backward(x.astype(dtype), [[1.0]], "avg")["x"].dtype == np.float64


def test_gradient_p_and_weights_are_none_for_other_kinds():
    x = np.ones((1, 1, 3))
    res = pool_backward(x, [[1.0]], "avg")
    assert res["p"] is None
    assert res["weights"] is None
    res = pool_backward(x, [[1.0]], "gem", p=np.array(2.0))  # 0-dim p is accepted
    assert isinstance(res["p"], float)
    assert res["weights"] is None


def test_errors_name_the_argument():
    x = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match="kind"):
        pool_forward(x, "median")
    with pytest.raises(ValueError, match="layout"):
        pool_forward(x, "avg", layout="nchw")
    with pytest.raises(ValueError, match="mask"):
        pool_forward(x, "avg", mask=np.ones((2, 5), dtype=bool))
    with pytest.raises(ValueError, match="weights"):
        pool_forward(x, "attention")
    with pytest.raises(ValueError, match="weights"):
        pool_forward(x, "attention", weights=-np.ones((2, 4)))
    with pytest.raises(ValueError, match="x must"):
        pool_forward(np.ones((2, 3)), "avg")
    with pytest.raises(ValueError, match="grad_out"):
        pool_backward(x, np.ones((2, 4)), "avg")
    with pytest.raises(ValueError, match="kind"):
        adaptive_forward(x, 2, "median")
    with pytest.raises(ValueError, match="output_size"):
        adaptive_forward(x, (2, 2))
    with pytest.raises(ValueError, match="layout"):
        GlobalPool("avg", layout="nhwc")


# ------------------------------------------------------------------------------------------
# backward against central finite differences


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_backward_matches_finite_differences(kind, rank, layout, masked):
    rng = np.random.default_rng([KINDS.index(kind), rank, LAYOUTS.index(layout), masked])
    shape = SHAPES[rank]
    n, spatial = shape[0], shape[2:]
    x = distinct_x(rng, shape)
    w = rng.uniform(0.2, 2.0, size=(n, *spatial))
    mask = random_mask(rng, n, spatial) if masked else None
    if layout == "channels_last":
        x = to_last(x)
    if masked:
        x = poison(x, mask, layout)
        w = np.where(mask, w, np.nan)
    c_out = 2 * shape[1] if kind == "catavgmax" else shape[1]
    g = rng.normal(size=(n, c_out))
    kw = kind_kwargs(kind, w)

    def loss_x(a):
        return float(np.sum(g * pool_forward(a, kind, layout=layout, mask=mask, **kw)))

    res = pool_backward(x, g, kind, layout=layout, mask=mask, **kw)
    assert res["x"].shape == x.shape
    assert np.all(np.isfinite(res["x"]))
    expected = fd(loss_x, x)
    if masked:
        assert np.all(np.isfinite(pool_forward(x, kind, layout=layout, mask=mask, **kw)))
        # NaN +- h stays NaN, so padded entries of the finite difference are 0, like the grad
        assert np.count_nonzero(res["x"][np.isnan(x) | np.isinf(x)]) == 0
    np.testing.assert_allclose(res["x"], expected, rtol=1e-6, atol=1e-8)

    if kind == "gem":

        def loss_p(pv):
            kw_p = {**kw, "p": float(pv[0])}
            return float(np.sum(g * pool_forward(x, kind, layout=layout, mask=mask, **kw_p)))

        expected_p = fd(loss_p, np.array([kw["p"]]))[0]
        assert res["p"] == pytest.approx(expected_p, rel=1e-6, abs=1e-8)
    if kind == "lse":
        r0 = kw.get("r", 1.0)

        def loss_r(rv):
            kw_r = {**kw, "r": rv[0] if rv.shape == (1,) else rv}
            return float(np.sum(g * pool_forward(x, kind, layout=layout, mask=mask, **kw_r)))

        assert res["r"] == pytest.approx(fd(loss_r, np.array([r0]))[0], rel=1e-6, abs=1e-8)
        per_channel = np.linspace(0.5, 2.0, shape[1])  # one r per channel: a (C,) gradient
        res_c = pool_backward(x, g, kind, layout=layout, mask=mask, **{**kw, "r": per_channel})
        assert res_c["r"].shape == (shape[1],)
        np.testing.assert_allclose(res_c["r"], fd(loss_r, per_channel), rtol=1e-6, atol=1e-8)
    if kind == "attention":

        def loss_w(wv):
            kw_w = {**kw, "weights": wv}
            return float(np.sum(g * pool_forward(x, kind, layout=layout, mask=mask, **kw_w)))

        w_fd = np.nan_to_num(w, nan=1.0)  # keep the finite-difference weights finite
        expected_w = fd(loss_w, w_fd)
        assert res["weights"].shape == w.shape
        np.testing.assert_allclose(res["weights"], expected_w, rtol=1e-6, atol=1e-8)
        if masked:
            np.testing.assert_array_equal(res["weights"][~mask], 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_layouts_agree(kind):
    rng = np.random.default_rng(7)
    for rank, shape in SHAPES.items():
        x = rng.normal(size=shape)
        mask = random_mask(rng, shape[0], shape[2:])
        w = rng.uniform(0.2, 2.0, size=(shape[0], *shape[2:]))
        kw = {**kind_kwargs(kind, w), "mask": mask}
        first = pool_forward(x, kind, **kw)
        last = pool_forward(to_last(x), kind, layout="channels_last", **kw)
        np.testing.assert_array_equal(first, last, err_msg=f"rank {rank}")
        kept_f = pool_forward(x, kind, keepdim=True, **kw)
        kept_l = pool_forward(to_last(x), kind, layout="channels_last", keepdim=True, **kw)
        np.testing.assert_array_equal(to_last(kept_f), kept_l)
        g = rng.normal(size=first.shape)
        gf = pool_backward(x, g, kind, **kw)
        gl = pool_backward(to_last(x), g, kind, layout="channels_last", **kw)
        np.testing.assert_array_equal(to_last(gf["x"]), gl["x"])
        assert gf["p"] == gl["p"]
        assert gf["r"] == gl["r"]
        if kind == "attention":
            np.testing.assert_array_equal(gf["weights"], gl["weights"])


# ------------------------------------------------------------------------------------------
# limits between kinds


def test_lse_tends_to_avg_for_small_r_and_to_max_for_large_r():
    rng = np.random.default_rng(3)
    x = distinct_x(rng, (2, 3, 4, 5))
    ax = (2, 3)
    np.testing.assert_allclose(pool_forward(x, "lse", r=1e-7), x.mean(ax), atol=1e-6)
    # with distinct values lse = max - log(L) / r + o(1/r)
    np.testing.assert_allclose(pool_forward(x, "lse", r=1e5), x.max(ax), atol=1e-4)
    soft = pool_backward(x, np.ones((2, 3)), "lse", r=1e5)["x"]
    hard = pool_backward(x, np.ones((2, 3)), "max")["x"]
    np.testing.assert_allclose(soft, hard, atol=1e-6)
    smooth = pool_backward(x, np.ones((2, 3)), "lse", r=1e-9)["x"]
    np.testing.assert_allclose(smooth, np.full(x.shape, 1 / 20), atol=1e-8)


def test_gem_with_p_one_is_avg_and_large_p_tends_to_max():
    rng = np.random.default_rng(4)
    x = rng.uniform(0.1, 3.0, size=(2, 3, 3, 3, 2))
    ax = (2, 3, 4)
    np.testing.assert_allclose(pool_forward(x, "gem", p=1.0), x.mean(ax), rtol=1e-12)
    g = pool_backward(x, np.ones((2, 3)), "gem", p=1.0)["x"]
    np.testing.assert_allclose(g, np.full(x.shape, 1 / 18), rtol=1e-12)
    np.testing.assert_allclose(pool_forward(x, "gem", p=400.0), x.max(ax), rtol=1e-2)


# ------------------------------------------------------------------------------------------
# property tests


@st.composite
def cases(draw, kinds=KINDS):
    kind = draw(st.sampled_from(kinds))
    rank = draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c, *spatial))
    if layout == "channels_last":
        x = to_last(x)
    mask = rng.random((n, *spatial)) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    w = rng.uniform(0.0, 2.0, size=(n, *spatial))
    return kind, layout, x, mask, w, rng


@settings(max_examples=60, deadline=None)
@given(cases())
def test_padding_garbage_never_matters(case):
    kind, layout, x, mask, w, rng = case
    kw = {**kind_kwargs(kind, w), "layout": layout, "mask": mask}
    g = rng.normal(size=pool_forward(x, kind, **kw).shape)
    clean = pool_backward(x, g, kind, **kw)
    dirty_x = poison(x, mask, layout)
    dirty_w = np.where(mask, w, np.inf)
    dirty_kw = {**kw, "weights": dirty_w} if kind == "attention" else kw
    np.testing.assert_array_equal(
        pool_forward(x, kind, **kw), pool_forward(dirty_x, kind, **dirty_kw)
    )
    dirty = pool_backward(dirty_x, g, kind, **dirty_kw)
    np.testing.assert_array_equal(clean["x"], dirty["x"])
    np.testing.assert_array_equal(np.moveaxis(cf(clean["x"], layout), 1, -1)[~mask], 0.0)
    empty = ~mask.reshape(mask.shape[0], -1).any(axis=1)
    np.testing.assert_array_equal(pool_forward(x, kind, **kw)[empty], 0.0)


@settings(max_examples=60, deadline=None)
@given(cases(), st.data())
def test_masked_prefix_equals_cropped_input(case, data):
    kind, layout, x, _, w, _ = case
    xc = cf(x, layout)
    spatial = xc.shape[2:]
    dim = data.draw(st.integers(0, len(spatial) - 1))
    keep = data.draw(st.integers(1, spatial[dim]))
    index = np.arange(spatial[dim]).reshape([-1 if d == dim else 1 for d in range(len(spatial))])
    mask = np.broadcast_to(index < keep, (xc.shape[0], *spatial))
    crop = [slice(None)] * len(spatial)
    crop[dim] = slice(0, keep)
    x_crop = np.ascontiguousarray(xc[(slice(None), slice(None), *crop)])
    w_crop = w[(slice(None), *crop)]
    masked = pool_forward(xc, kind, mask=mask, **kind_kwargs(kind, w))
    cropped = pool_forward(x_crop, kind, **kind_kwargs(kind, w_crop))
    np.testing.assert_allclose(masked, cropped, rtol=1e-12, atol=1e-14)


@settings(max_examples=60, deadline=None)
@given(cases(kinds=ORDER_FREE))
def test_permuting_positions_permutes_nothing_but_the_gradient(case):
    kind, layout, x, mask, w, rng = case
    xc = cf(x, layout)
    n, c, spatial = xc.shape[0], xc.shape[1], xc.shape[2:]
    perm = rng.permutation(math.prod(spatial))
    xp = xc.reshape(n, c, -1)[:, :, perm].reshape(xc.shape)
    mp = mask.reshape(n, -1)[:, perm].reshape(mask.shape)
    wp = w.reshape(n, -1)[:, perm].reshape(w.shape)
    y = pool_forward(xc, kind, mask=mask, **kind_kwargs(kind, w))
    yp = pool_forward(xp, kind, mask=mp, **kind_kwargs(kind, wp))
    np.testing.assert_allclose(y, yp, rtol=1e-12, atol=1e-14)
    g = rng.normal(size=y.shape)
    gx = pool_backward(xc, g, kind, mask=mask, **kind_kwargs(kind, w))["x"]
    gxp = pool_backward(xp, g, kind, mask=mp, **kind_kwargs(kind, wp))["x"]
    np.testing.assert_allclose(
        gx.reshape(n, c, -1)[:, :, perm], gxp.reshape(n, c, -1), rtol=1e-12, atol=1e-14
    )


@settings(max_examples=80, deadline=None)
@given(cases(), st.floats(-3.0, 3.0), st.floats(0.25, 4.0))
def test_shift_scale_and_gradient_identities(case, shift, scale):
    kind, layout, x, mask, w, rng = case
    kw = {**kind_kwargs(kind, w), "layout": layout, "mask": mask}
    xc = cf(x, layout)
    n, c = xc.shape[:2]
    real = mask.reshape(n, -1)
    nonempty = real.any(axis=1)
    if kind == "attention":
        nonempty &= (w.reshape(n, -1) * real).sum(axis=1) > 0
    y = pool_forward(x, kind, **kw)
    g = rng.normal(size=y.shape)
    gx = cf(pool_backward(x, g, kind, **kw)["x"], layout).reshape(n, c, -1)
    g_in = g[:, :c] + g[:, c:] if kind == "catavgmax" else g  # total weight per input channel

    # values lie between the min and the max over the real positions
    big = np.where(real[:, None, :], xc.reshape(n, c, -1), np.nan)
    lo, hi = np.nanmin(big, axis=2, initial=np.inf), np.nanmax(big, axis=2, initial=-np.inf)
    ys = [y[:, :c], y[:, c:]] if kind == "catavgmax" else [y]
    for part in ys:
        # gem clamps negatives up to eps; a sum (or a sum over sqrt(n)) is not a mean
        if kind not in ("gem", "sum", "mean_sqrt_len"):
            assert np.all(part[nonempty] >= lo[nonempty] - 1e-12)
            assert np.all(part[nonempty] <= hi[nonempty] + 1e-12)

    if kind not in ("gem", "sum", "mean_sqrt_len"):
        # shift equivariance f(x + a) = f(x) + a, so the gradient sums to grad_out
        shifted = pool_forward(x + shift, kind, **kw)
        np.testing.assert_allclose(shifted[nonempty], (y + shift)[nonempty], atol=1e-10)
        np.testing.assert_allclose(gx.sum(axis=2)[nonempty], g_in[nonempty], atol=1e-10)
    if kind in HOMOGENEOUS or kind == "gem":
        xs = np.abs(x) + 0.1 if kind == "gem" else x  # gem is homogeneous above eps
        ys_ = pool_forward(xs, kind, **kw)
        np.testing.assert_allclose(pool_forward(scale * xs, kind, **kw), scale * ys_, rtol=1e-10)
        # Euler: sum_s x_s dy/dx_s = y for degree-1 homogeneous functions
        gxs = cf(pool_backward(xs, g, kind, **kw)["x"], layout).reshape(n, c, -1)
        euler = np.sum(np.where(real[:, None, :], cf(xs, layout).reshape(n, c, -1) * gxs, 0), 2)
        np.testing.assert_allclose(euler, _euler_rhs(kind, g, ys_, c), atol=1e-10)


def _euler_rhs(kind: str, g: np.ndarray, y: np.ndarray, c: int) -> np.ndarray:
    """Per (n, c_in): sum of grad_out * output that flows into input channel c_in."""
    if kind == "catavgmax":
        return g[:, :c] * y[:, :c] + g[:, c:] * y[:, c:]
    return g * y


@settings(max_examples=40, deadline=None)
@given(cases(kinds=("sum",)))
def test_sum_is_avg_times_the_count_and_first_last_are_real_values(case):
    _, layout, x, mask, _, _ = case
    kw = {"layout": layout, "mask": mask}
    n, c = x.shape[0], (x.shape[1] if layout == "channels_first" else x.shape[-1])
    count = mask.reshape(n, -1).sum(1)[:, None]
    np.testing.assert_allclose(
        pool_forward(x, "sum", **kw), pool_forward(x, "avg", **kw) * count, atol=1e-12
    )
    flat = cf(x, layout).reshape(n, c, -1)
    real = mask.reshape(n, -1)
    for kind, pick in (("first", 0), ("last", -1)):
        y = pool_forward(x, kind, **kw)
        for i in range(n):
            expected = flat[i][:, real[i]][:, pick] if real[i].any() else np.zeros(c)
            np.testing.assert_array_equal(y[i], expected)


@settings(max_examples=40, deadline=None)
@given(cases(kinds=("gem",)), st.floats(1.0, 6.0))
def test_gem_is_at_least_avg_for_positive_input(case, p):
    _, layout, x, mask, _, _ = case
    x = np.abs(x) + 0.01
    kw = {"layout": layout, "mask": mask}
    gem = pool_forward(x, "gem", p=p, **kw)
    assert np.all(gem >= pool_forward(x, "avg", **kw) - 1e-12)
    assert np.all(gem <= pool_forward(x, "max", **kw) + 1e-12)


@settings(max_examples=40, deadline=None)
@given(cases(kinds=("avg", "gem", "lse", "attention")))
def test_backward_is_linear_in_grad_out(case):
    kind, layout, x, mask, w, rng = case
    kw = {**kind_kwargs(kind, w), "layout": layout, "mask": mask}
    shape = pool_forward(x, kind, **kw).shape
    g1, g2 = rng.normal(size=shape), rng.normal(size=shape)
    a = pool_backward(x, g1, kind, **kw)
    b = pool_backward(x, g2, kind, **kw)
    ab = pool_backward(x, 2 * g1 - g2, kind, **kw)
    np.testing.assert_allclose(ab["x"], 2 * a["x"] - b["x"], atol=1e-12)
    if kind == "gem":
        assert ab["p"] == pytest.approx(2 * a["p"] - b["p"], abs=1e-10)


# ------------------------------------------------------------------------------------------
# the stateful class


def test_globalpool_class_matches_the_functions():
    rng = np.random.default_rng(5)
    x = rng.uniform(0.5, 1.5, size=(2, 4, 3, 3))
    w = rng.uniform(0.5, 1.5, size=(2, 3, 3))
    mask = random_mask(rng, 2, (3, 3))
    layer = GlobalPool("gem", p=2.0)
    assert "gem" in repr(layer)
    y = layer.forward(x, mask=mask)
    np.testing.assert_array_equal(y, pool_forward(x, "gem", p=2.0, mask=mask))
    g = rng.normal(size=y.shape)
    got = layer.backward(g)
    want = pool_backward(x, g, "gem", p=2.0, mask=mask)
    np.testing.assert_array_equal(got["x"], want["x"])
    assert got["p"] == want["p"]

    att = GlobalPool("attention", layout="channels_last", keepdim=True)
    y = att(to_last(x), weights=w)
    assert y.shape == (2, 1, 1, 4)
    got = att.backward(np.ones_like(y))
    want = pool_backward(
        to_last(x), np.ones((2, 4)), "attention", layout="channels_last", weights=w
    )
    np.testing.assert_array_equal(got["weights"], want["weights"])

    with pytest.raises(RuntimeError):
        GlobalPool("avg").backward(np.ones((1, 1)))
    with pytest.raises(ValueError, match="params"):
        GlobalPool("avg", q=1.0)


# ------------------------------------------------------------------------------------------
# adaptive pooling


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 50))
def test_bins_follow_the_floor_ceil_formula_and_cover_everything(in_size, out_size):
    got = bins(in_size, out_size)
    assert len(got) == out_size
    covered = set()
    for i, (start, end) in enumerate(got):
        assert start == math.floor(Fraction(i * in_size, out_size))
        assert end == math.ceil(Fraction((i + 1) * in_size, out_size))
        assert 0 <= start < end <= in_size
        assert end - start <= -(-in_size // out_size) + 1
        covered.update(range(start, end))
    assert covered == set(range(in_size))
    assert got[0][0] == 0
    assert got[-1][1] == in_size
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(got, got[1:], strict=False))
    if out_size >= in_size:
        assert all(end - start <= 2 for start, end in got)
    if in_size % out_size == 0:
        k = in_size // out_size
        assert got == [(i * k, (i + 1) * k) for i in range(out_size)]


def test_bins_hand_examples():
    assert bins(5, 3) == [(0, 2), (1, 4), (3, 5)]
    assert bins(7, 3) == [(0, 3), (2, 5), (4, 7)]
    assert bins(3, 5) == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)]
    assert bins(4, 1) == [(0, 4)]
    assert bins(1, 3) == [(0, 1)] * 3


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_adaptive_divisible_equals_reshape_reduce(rank, layout):
    rng = np.random.default_rng(rank)
    out = (2, 3, 1)[:rank]
    k = (3, 2, 4)[:rank]
    x = rng.normal(size=(2, 3, *(o * kk for o, kk in zip(out, k, strict=True))))
    blocks = x.reshape(2, 3, *[v for pair in zip(out, k, strict=True) for v in pair])
    inner = tuple(3 + 2 * d for d in range(rank))
    xin = to_last(x) if layout == "channels_last" else x
    for kind, reduce in (("avg", np.mean), ("max", np.max)):
        expected = reduce(blocks, axis=inner)
        if layout == "channels_last":
            expected = to_last(expected)
        got = adaptive_forward(xin, out, kind, layout=layout)
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_adaptive_hand_example_with_overlapping_bins():
    x = np.arange(5.0).reshape(1, 1, 5)
    np.testing.assert_allclose(adaptive_forward(x, 3), [[[0.5, 2.0, 3.5]]])
    np.testing.assert_allclose(adaptive_forward(x, 3, "max"), [[[1.0, 3.0, 4.0]]])
    # index 1 lies in bins 0 and 1, index 3 in bins 1 and 2
    g = adaptive_backward(x, np.ones((1, 1, 3)), 3, "avg")["x"]
    np.testing.assert_allclose(g, [[[0.5, 0.5 + 1 / 3, 1 / 3, 1 / 3 + 0.5, 0.5]]])
    x2 = np.arange(6.0).reshape(1, 1, 2, 3)
    np.testing.assert_allclose(adaptive_forward(x2, (1, 2)), [[[[2.0, 3.0]]]])


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_adaptive_identity_and_global(kind):
    rng = np.random.default_rng(11)
    for shape in SHAPES.values():
        x = rng.normal(size=shape)
        np.testing.assert_array_equal(adaptive_forward(x, shape[2:], kind), x)
        np.testing.assert_allclose(
            adaptive_forward(x, 1, kind), pool_forward(x, kind, keepdim=True), rtol=1e-12
        )
        g = rng.normal(size=x.shape)
        np.testing.assert_array_equal(adaptive_backward(x, g, shape[2:], kind)["x"], g)


def test_adaptive_output_larger_than_input():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(1, 2, 2, 3))
    y = adaptive_forward(x, (5, 4), "max")
    assert y.shape == (1, 2, 5, 4)
    # every output picks an input value; every input is reached
    assert np.all(np.isin(y, x))
    g = adaptive_backward(x, np.ones_like(y), (5, 4), "avg")["x"]
    assert np.all(g > 0)


ADAPTIVE_CASES = [
    ((2, 3, 7), (3,)),
    ((2, 2, 5, 4), (3, 3)),
    ((1, 2, 3, 4, 5), (2, 3, 2)),
    ((2, 2, 3), (5,)),
]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("shape", "out"), ADAPTIVE_CASES)
def test_adaptive_backward_matches_finite_differences(shape, out, kind, layout, masked):
    rng = np.random.default_rng(sum(shape) + sum(out))
    x = distinct_x(rng, shape) + (3.0 if kind == "gem" else 0.0)
    mask = rng.random((shape[0], *shape[2:])) > 0.3 if masked else None
    params = {"p": 2.5} if kind == "gem" else {"r": 1.5} if kind == "lse" else {}
    if kind == "attention":
        params["weights"] = rng.random((shape[0], *shape[2:])) + 0.1
    if layout == "channels_last":
        x = to_last(x)
    y = adaptive_forward(x, out, kind, layout=layout, mask=mask, **params)
    g = rng.normal(size=y.shape)

    def loss(a):
        return float(np.sum(g * adaptive_forward(a, out, kind, layout=layout, mask=mask, **params)))

    got = adaptive_backward(x, g, out, kind, layout=layout, mask=mask, **params)
    np.testing.assert_allclose(got["x"], fd(loss, x), rtol=1e-6, atol=1e-8)
    if kind == "attention":

        def loss_w(w):
            return float(np.sum(g * adaptive_forward(x, out, kind, layout=layout, mask=mask,
                                                     weights=w)))

        np.testing.assert_allclose(got["weights"], fd(loss_w, params["weights"]), rtol=1e-6,
                                   atol=1e-8)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 5), min_size=1, max_size=3),
    st.lists(st.integers(1, 6), min_size=3, max_size=3),
    st.integers(0, 2**32 - 1),
    st.sampled_from(LAYOUTS),
    st.booleans(),
)
def test_adaptive_max_shares_each_bin_among_its_maxima(spatial, out, seed, layout, ties):
    rng = np.random.default_rng(seed)
    rank = len(spatial)
    out = tuple(out[:rank])
    x = rng.normal(size=(2, 2, *spatial))
    if ties:  # few distinct values, many ties
        x = np.round(x)
    g = rng.normal(size=(2, 2, *out))
    xin, gin = (to_last(x), to_last(g)) if layout == "channels_last" else (x, g)
    got = adaptive_backward(xin, gin, out, "max", layout=layout)["x"]
    if layout == "channels_last":
        got = np.moveaxis(got, -1, 1)
    # independent routing with explicit loops over every position of every bin
    expected = np.zeros_like(x)
    per_dim = [bins(s, o) for s, o in zip(spatial, out, strict=True)]
    for n in range(2):
        for c in range(2):
            for index in np.ndindex(*out):
                ranges = [range(*per_dim[d][j]) for d, j in enumerate(index)]
                box = [tuple(p) for p in itertools.product(*ranges)]
                best = max(x[(n, c, *src)] for src in box)
                winners = [src for src in box if x[(n, c, *src)] == best]
                for src in winners:
                    expected[(n, c, *src)] += g[(n, c, *index)] / len(winners)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    np.testing.assert_allclose(
        got.sum(axis=tuple(range(2, x.ndim))), g.sum(axis=tuple(range(2, g.ndim))), atol=1e-10
    )


def test_adaptive_max_ties_share_equally():
    x = np.array([[[[1.0, 5.0], [5.0, 1.0]]]])
    np.testing.assert_array_equal(
        adaptive_backward(x, np.ones((1, 1, 1, 1)), 1, "max")["x"], [[[[0.0, 0.5], [0.5, 0.0]]]]
    )


def test_adaptive_empty_bin_and_kind_parameters():
    x = np.array([[[1.0, 2.0, np.nan, np.inf, 4.0, 8.0]]])
    mask = np.array([[True, True, False, False, True, True]])
    y = adaptive_forward(x, 3, "gem", mask=mask, p=1.0)
    np.testing.assert_allclose(y, [[[1.5, 0.0, 6.0]]])
    g = adaptive_backward(x, np.ones((1, 1, 3)), 3, "gem", mask=mask, p=1.0)
    np.testing.assert_allclose(g["x"], [[[0.5, 0.5, 0.0, 0.0, 0.5, 0.5]]])
    w = np.array([[1.0, 3.0, 5.0, 5.0, 0.0, 0.0]])
    y = adaptive_forward(x, 3, "attention", mask=mask, weights=w)
    np.testing.assert_allclose(y, [[[1.75, 0.0, 0.0]]])  # the third bin's weights sum to 0


def test_docstring_examples_run():
    result = doctest.testmod(ref, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
