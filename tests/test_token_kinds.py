"""Token kinds (sum, first, last) and several kinds in one call, on every backend.

The shared suites (test_functional, test_parity, test_adaptive, ...) run these kinds through
every rank, layout, dtype and mask against the NumPy reference; this file holds what is special
to them: the cases users of sentence-embedding libraries report, padding on either side, the
one-hot gradient, and tuples of kinds (order, widths, one read of x on the fused path, errors).
"""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

import globalpool as gp
from globalpool import functional, kernels, reference
from helpers import (
    DTYPES,
    assert_close,
    check_against_reference,
    make_input,
    make_mask,
    make_weights,
)

BACKENDS = ("torch", "fused")
BIG = (2, 9, 64, 64)  # > 64K elements: backend="auto" takes the fused path here


def _tokens(values: list[list[float]]) -> torch.Tensor:
    """(N, L) values as a channels-last (N, L, 1) batch of one-channel tokens."""
    return torch.tensor(values, dtype=torch.float32).unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# the sentence-embedding cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_max_ignores_the_padded_token(backend):
    x = _tokens([[1.0, 3.0, 5.0, 10.0]])
    mask = torch.tensor([[True, True, True, False]])
    y = gp.pool(x, "max", layout="channels_last", mask=mask, backend=backend)
    assert y.item() == 5.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_mean_divides_by_the_real_count(backend):
    x = _tokens([[1.0, 3.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    assert gp.pool(x, "avg", layout="channels_last", mask=mask, backend=backend).item() == 2.0
    assert gp.pool(x, "sum", layout="channels_last", mask=mask, backend=backend).item() == 4.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_and_last_token_with_left_and_right_padding(backend):
    pad = float("nan")  # padding may hold anything
    left = _tokens([[pad, pad, 7.0, 8.0, 9.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    left_mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    right = _tokens([[7.0, 8.0, 9.0, pad, pad], [1.0, 2.0, 3.0, 4.0, 5.0]])
    right_mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    for x, mask in ((left, left_mask), (right, right_mask)):
        out = gp.pool(x, ("first", "last"), layout="channels_last", mask=mask, backend=backend)
        assert out.tolist() == [[7.0, 9.0], [1.0, 5.0]]


def test_prefix_tokens_are_excluded_with_the_mask():
    """timm's num_prefix_tokens: mask the CLS / register tokens out of the average."""
    x = torch.randn(2, 1 + 16, 8)  # (N, prefix + patches, C)
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[:, :1] = False
    y = gp.pool(x, "avg", layout="channels_last", mask=mask)
    torch.testing.assert_close(y, x[:, 1:].mean(1))
    torch.testing.assert_close(gp.pool(x, "first", layout="channels_last"), x[:, 0])


# --------------------------------------------------------------------------------------------
# first / last: row-major order, one-hot gradient, empty samples


@pytest.mark.parametrize("layout", ("channels_first", "channels_last"))
def test_first_and_last_follow_row_major_order_in_2d(layout):
    mask = torch.tensor([[[False, False, True], [True, True, False]]])  # (1, 2, 3)
    x = torch.arange(6.0).reshape(1, 1, 2, 3)
    if layout == "channels_last":
        x = x.permute(0, 2, 3, 1)
    y = gp.pool(x, ("first", "last"), layout=layout, mask=mask)
    assert y.tolist() == [[2.0, 4.0]]


@pytest.mark.parametrize("kind", ("first", "last"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_is_one_hot_and_empty_samples_give_zero(kind, dtype):
    x = torch.full((3, 2, 5), float("nan"), dtype=dtype)
    x[0, :, 1:4] = torch.tensor([1.0, 2.0, 3.0], dtype=dtype)
    x[1] = torch.arange(10.0, dtype=dtype).reshape(2, 5)
    x.requires_grad_()
    mask = torch.tensor([[False, True, True, True, False], [True] * 5, [False] * 5])
    y = gp.pool(x, kind, mask=mask)
    y.sum().backward()
    at = {"first": (1, 0), "last": (3, 4)}[kind]
    assert y[0].tolist() == [float(at[0])] * 2
    assert y[1].tolist() == ([0.0, 5.0] if kind == "first" else [4.0, 9.0])
    assert y[2].tolist() == [0.0, 0.0]
    expected = torch.zeros(3, 2, 5, dtype=dtype)
    expected[0, :, at[0]] = 1
    expected[1, :, at[1] if kind == "last" else 0] = 1
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("kind", ("sum", "first", "last"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_kinds_gradcheck_float64(kind, backend):
    if backend == "fused" and kind != "sum":
        pytest.skip("first / last have no grid kernel: backend='fused' refuses them")
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    mask = make_mask(3, (6,), "empty", 0)
    torch.autograd.gradcheck(lambda t: gp.pool(t, kind, mask=mask, backend=backend), (x,))
    torch.autograd.gradgradcheck(lambda t: gp.pool(t, kind, mask=mask, backend="torch"), (x,))


@pytest.mark.parametrize("kind", ("sum", "first", "last"))
@pytest.mark.parametrize("layout", ("channels_first", "channels_last"))
def test_token_kinds_on_the_fused_side_of_the_threshold(kind, layout):
    """backend='auto' on an input above the size threshold equals the reference."""
    x = make_input(*BIG[:2], BIG[2:], layout, torch.float32, seed=1)
    mask = make_mask(BIG[0], BIG[2:], "empty", 1)

    def run(t, k, lay, m, keepdim):
        return gp.pool(t, k, layout=lay, mask=m, keepdim=keepdim)

    check_against_reference(run, x, kind, layout, mask, {})


@pytest.mark.parametrize("kind", ("first", "last", "sum"))
def test_token_kinds_refuse_parameters(kind):
    with pytest.raises(TypeError, match=rf"kind '{kind}' got unexpected parameter\(s\) \['p'\]"):
        gp.pool(torch.randn(2, 3, 4), kind, p=3.0)
    with pytest.raises(TypeError, match="unexpected parameter"):
        gp.GlobalPool(kind, r=1.0)


def test_sum_has_no_cuda_kernel_and_first_last_no_kernel_at_all():
    x = torch.randn(2, 3, 4)
    assert kernels.supports(x, "sum")
    assert not kernels.supports(x, "first") and not kernels.supports(x, "last")


# --------------------------------------------------------------------------------------------
# several kinds in one call

TUPLES = (("avg", "max", "last"), ("sum", "catavgmax", "gem"), ("lse", "first", "attention"))


@pytest.mark.parametrize("kinds", TUPLES, ids="-".join)
@pytest.mark.parametrize("backend", ("auto", "torch", "fused"))
@pytest.mark.parametrize("layout", ("channels_first", "channels_last"))
def test_tuple_is_the_concatenation_of_its_kinds(kinds, backend, layout):
    shape = (2, 9, 64, 64) if backend == "auto" else (3, 4, 5, 6)
    x = make_input(shape[0], shape[1], shape[2:], layout, torch.float32, seed=2)
    mask = make_mask(shape[0], shape[2:], "empty", 2)
    params = {"p": 2.5, "r": 1.5} if "gem" in kinds or "lse" in kinds else {}
    params = {k: v for k, v in params.items() if k in gp.contract.kind_defaults(kinds)}
    if "attention" in kinds:
        params["weights"] = make_weights(x, layout, 2).requires_grad_()

    def run(t, k, lay, m, keepdim, **kw):
        return gp.pool(t, k, layout=lay, mask=m, keepdim=keepdim, backend=backend, **kw)

    y, _ = check_against_reference(run, x, kinds, layout, mask, params)
    parts = [
        gp.pool(x, k, layout=layout, mask=mask, backend="torch",
                **{n: v for n, v in params.items() if n in gp.contract.kind_defaults(k)})
        for k in kinds
    ]
    torch.testing.assert_close(y, torch.cat(parts, 1), rtol=2e-5, atol=2e-5)
    assert y.shape[1] == gp.output_width(kinds, shape[1])


@pytest.mark.parametrize("keepdim", (False, True))
@pytest.mark.parametrize("layout", ("channels_first", "channels_last"))
def test_tuple_keepdim_puts_channels_in_the_layouts_place(keepdim, layout):
    x = torch.randn(2, 3, 4, 5)
    y = gp.pool(x, ("avg", "catavgmax"), layout=layout, keepdim=keepdim)
    width = 9 if layout == "channels_first" else 15
    if not keepdim:
        assert y.shape == (2, width)
    elif layout == "channels_first":
        assert y.shape == (2, width, 1, 1)
    else:
        assert y.shape == (2, 1, 1, width)


def test_the_avg_max_family_shares_one_read_on_the_fused_path(monkeypatch):
    calls = []
    real = kernels.fused_pool

    def counting(x, kind, *args, **kwargs):
        calls.append(kind)
        return real(x, kind, *args, **kwargs)

    monkeypatch.setattr(kernels, "fused_pool", counting)
    x = torch.randn(*BIG, requires_grad=True)
    mask = make_mask(BIG[0], BIG[2:], "random", 3)
    y = gp.pool(x, ("avg", "max", "sum", "avgmax", "catavgmax", "gem"), mask=mask)
    assert calls == ["catavgmax", "gem"]
    expected = reference.pool_forward(
        x.detach().double().numpy(),
        ("avg", "max", "sum", "avgmax", "catavgmax", "gem"),
        mask=mask.numpy(),
    )
    assert_close(y, expected, torch.float32, "one pass")
    y.sum().backward()
    grads = reference.pool_backward(
        x.detach().double().numpy(), np.ones(y.shape),
        ("avg", "max", "sum", "avgmax", "catavgmax", "gem"), mask=mask.numpy(),
    )
    np.testing.assert_allclose(x.grad.double().numpy(), grads["x"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float64))
def test_one_pass_keeps_each_dtypes_tolerance(dtype):
    x = make_input(*BIG[:2], BIG[2:], "channels_first", dtype, seed=4)
    kinds = ("sum", "avgmax", "max")
    y = gp.pool(x, kinds, backend="fused")
    assert y.dtype == dtype
    expected = reference.pool_forward(x.double().numpy(), kinds)
    # sum is avg x count here: a half result is rounded twice (avg, then the product)
    tol = {torch.float16: 8e-3, torch.bfloat16: 4e-2, torch.float64: 1e-10}[dtype]
    np.testing.assert_allclose(y.double().numpy(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tuple_gradients_reach_every_parameter(backend):
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    p = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    r = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 5, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda a, b, c, d: gp.pool(
            a, ("gem", "lse", "attention", "last"), p=b, r=c, weights=d, backend=backend
        ),
        (x, p, r, w),
    )


def test_tuple_in_layers_heads_and_adaptive_pooling():
    layer = gp.GlobalPool(("avg", "max", "last"))
    assert layer.output_width(8) == 24 and "('avg', 'max', 'last')" in repr(layer)
    head = gp.ClassifierHead(8, 5, pool=("avg", "catavgmax"))
    assert head.feature_width == 24
    assert head(torch.randn(2, 8, 4, 4)).shape == (2, 5)
    x = torch.randn(2, 3, 7, 5)
    mask = make_mask(2, (7, 5), "empty", 5)
    y = gp.adaptive_pool(x, (3, 2), ("max", "first", "sum"), mask=mask)
    expected = reference.adaptive_forward(
        x.double().numpy(), (3, 2), ("max", "first", "sum"), mask=mask.numpy()
    )
    assert_close(y, expected, torch.float32, "adaptive tuple")
    assert gp.AdaptivePool(2, ("avg", "max"))(x).shape == (2, 6, 2, 2)


@pytest.mark.parametrize("kind", ("sum", "first", "last"))
def test_token_kinds_in_adaptive_pooling_with_masks(kind):
    x = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    mask = make_mask(2, (9,), "random", 6)
    mask[1, 3:6] = False  # an empty bin
    y = gp.adaptive_pool(x, 3, kind, mask=mask)
    g = torch.randn_like(y)
    y.backward(g)
    np.testing.assert_allclose(
        y.detach().numpy(), reference.adaptive_forward(x.detach().numpy(), 3, kind,
                                                       mask=mask.numpy()), rtol=1e-12)
    np.testing.assert_allclose(
        x.grad.numpy(),
        reference.adaptive_backward(x.detach().numpy(), g.numpy(), 3, kind,
                                    mask=mask.numpy())["x"],
        rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(gp.KINDS), min_size=2, max_size=4, unique=True),
    n=st.integers(1, 3),
    length=st.integers(1, 9),
    layout=st.sampled_from(("channels_first", "channels_last")),
    backend=st.sampled_from(("torch", "fused")),
    seed=st.integers(0, 1000),
)
def test_random_tuples_match_the_reference(kinds, n, length, layout, backend, seed):
    kinds = tuple(kinds)
    x = make_input(n, 3, (length,), layout, torch.float64, seed)
    mask = make_mask(n, (length,), "random", seed)
    params = {"weights": make_weights(x, layout, seed)} if "attention" in kinds else {}
    y = gp.pool(x, kinds, layout=layout, mask=mask, backend=backend, **params)
    np_params = {k: v.numpy() for k, v in params.items()}
    expected = reference.pool_forward(
        x.numpy(), kinds, layout=layout, mask=mask.numpy(), **np_params
    )
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ((), r"kind must be one of .* or a non-empty tuple of them, got \(\)"),
        (("avg", "mean"), r"'mean' is not a kind"),
        (("avg", "max", "avg"), r"must not repeat a kind, .*'avg' is given twice"),
        (("avg", 3), r"3 is not a kind"),
        ({"avg"}, r"or a non-empty tuple of them, got \{'avg'\}"),
    ],
)
def test_bad_tuples_are_refused_everywhere(kind, message):
    x = torch.randn(2, 3, 4)
    for call in (
        lambda: gp.pool(x, kind),
        lambda: gp.adaptive_pool(x, 2, kind),
        lambda: gp.GlobalPool(kind),
        lambda: gp.output_width(kind, 3),
    ):
        with pytest.raises(ValueError, match=message):
            call()


def test_every_kind_at_once_takes_gp_kinds_as_it_is():
    """``gp.KINDS`` (a live view that prints as a tuple) is a tuple of kinds to ``pool`` and
    ``GlobalPool``, the same as ``tuple(gp.KINDS)``."""
    x, weights = torch.randn(2, 3, 4, 5), torch.rand(2, 4, 5)
    expected = gp.pool(x, tuple(gp.KINDS), weights=weights)
    torch.testing.assert_close(gp.pool(x, gp.KINDS, weights=weights), expected)
    torch.testing.assert_close(gp.GlobalPool(gp.KINDS)(x, weights=weights), expected)
    assert gp.output_width(gp.KINDS, 3) == expected.shape[1]


def test_a_parameter_no_kind_of_the_tuple_takes_is_refused():
    with pytest.raises(TypeError, match=r"got unexpected parameter\(s\) \['r'\]; they take p, eps"):
        gp.pool(torch.randn(2, 3, 4), ("avg", "gem"), r=2.0)
    with pytest.raises(ValueError, match="p for kind 'gem' must be >= 1"):
        gp.pool(torch.randn(2, 3, 4), ("first", "gem"), p=0.5)
    with pytest.raises(TypeError, match="requires weights"):
        gp.pool(torch.randn(2, 3, 4), ("avg", "attention"))


def test_one_kind_tuple_is_that_kind():
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(gp.pool(x, ("gem",), p=2.0), gp.pool(x, "gem", p=2.0))
    assert functional.output_width(["avg"], 3) == 3
