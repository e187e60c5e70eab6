"""Bad input gets a clear error naming the argument, the value and what was expected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import globalpool as gp

X = torch.randn(2, 3, 4, 5)


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"kind must be one of .*got 'mean'"):
        gp.pool(X, "mean")


def test_unknown_layout():
    with pytest.raises(ValueError, match=r"layout must be one of .*got 'NHWC'"):
        gp.pool(X, "avg", layout="NHWC")


def test_rank_too_small():
    with pytest.raises(ValueError, match=r"x must have rank 3, 4 or 5.*got rank 2"):
        gp.pool(torch.randn(2, 3), "avg")


def test_rank_too_large():
    with pytest.raises(ValueError, match=r"x must have rank 3, 4 or 5.*got rank 6"):
        gp.pool(torch.randn(1, 2, 2, 2, 2, 2), "avg")


def test_zero_spatial_size():
    with pytest.raises(ValueError, match=r"x must have every spatial size > 0.*\(4, 0\)"):
        gp.pool(torch.randn(2, 3, 4, 0), "avg")


def test_zero_spatial_size_channels_last():
    with pytest.raises(ValueError, match=r"spatial size > 0.*\(0,\)"):
        gp.pool(torch.randn(2, 0, 3), "avg", layout="channels_last")


def test_integer_input():
    with pytest.raises(TypeError, match=r"x must have a floating dtype.*torch.int64"):
        gp.pool(torch.ones(2, 3, 4, dtype=torch.int64), "avg")


def test_bool_input():
    with pytest.raises(TypeError, match=r"x must have a floating dtype.*torch.bool"):
        gp.pool(torch.ones(2, 3, 4, dtype=torch.bool), "max")


def test_non_tensor_input():
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        gp.pool([[1.0]], "avg")


def test_mask_wrong_shape():
    with pytest.raises(ValueError, match=r"mask must have shape \(N, \*S\) = \(2, 4, 5\), got \(2, 20\)"):
        gp.pool(X, "avg", mask=torch.ones(2, 20, dtype=torch.bool))


def test_mask_not_bool():
    with pytest.raises(TypeError, match=r"mask must have dtype torch.bool.*torch.float32"):
        gp.pool(X, "avg", mask=torch.ones(2, 4, 5))


def test_gem_p_below_one():
    with pytest.raises(ValueError, match=r"p for kind 'gem' must be >= 1, got 0.5"):
        gp.pool(X, "gem", p=0.5)


def test_gem_tensor_p_below_one():
    with pytest.raises(ValueError, match=r"p for kind 'gem' must be >= 1, got 0.5"):
        gp.pool(X, "gem", p=torch.tensor(0.5))


def test_gem_eps_not_positive():
    with pytest.raises(ValueError, match=r"eps for kind 'gem' must be >= 1.17549e-38, got 0.0"):
        gp.pool(X, "gem", eps=0.0)


def test_lse_r_not_positive():
    with pytest.raises(ValueError, match=r"r for kind 'lse' must be > 0, got 0.0"):
        gp.pool(X, "lse", r=0.0)


def test_lse_r_negative():
    with pytest.raises(ValueError, match=r"r for kind 'lse' must be > 0, got -1.0"):
        gp.pool(X, "lse", r=-1.0)


def test_param_wrong_type():
    with pytest.raises(TypeError, match=r"p for kind 'gem' must be a real number.*'3'"):
        gp.pool(X, "gem", p="3")


def test_attention_negative_weights():
    w = torch.rand(2, 4, 5)
    w[0, 0, 0] = -0.5
    with pytest.raises(ValueError, match=r"weights must be non-negative, got a minimum of -0.5"):
        gp.pool(X, "attention", weights=w)


def test_attention_negative_weights_next_to_nan():
    """A NaN weight (e.g. poison at a padded position) must not hide a negative one."""
    w = torch.rand(2, 4, 5)
    w[0, 0, 0] = float("nan")
    w[1, 2, 3] = -0.25
    with pytest.raises(ValueError, match=r"weights must be non-negative, got a minimum of -0.25"):
        gp.pool(X, "attention", weights=w)


def test_attention_weights_wrong_shape():
    with pytest.raises(ValueError, match=r"weights must have shape \(N, \*S\) = \(2, 4, 5\), got \(2, 3, 4, 5\)"):
        gp.pool(X, "attention", weights=torch.rand(2, 3, 4, 5))


def test_attention_weights_missing():
    with pytest.raises(TypeError, match=r"kind 'attention' requires weights"):
        gp.pool(X, "attention")


def test_param_given_to_kind_without_params():
    with pytest.raises(TypeError, match=r"kind 'avg' got unexpected parameter\(s\) \['p'\]"):
        gp.pool(X, "avg", p=3.0)


def test_param_of_another_kind():
    with pytest.raises(TypeError, match=r"kind 'gem' got unexpected parameter\(s\) \['r'\]; it takes p, eps"):
        gp.pool(X, "gem", r=2.0)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'cuda'"):
        gp.pool(X, "avg", backend="cuda")


def test_adaptive_unknown_kind():
    with pytest.raises(ValueError, match=r"kind must be one of \('avg', 'max', .*got 'median'"):
        gp.adaptive_pool(X, 2, "median")


def test_adaptive_bad_output_size():
    with pytest.raises(ValueError, match=r"output_size must be a positive int, None, or a tuple of 2"):
        gp.adaptive_pool(X, (2, 0))


def test_adaptive_output_size_wrong_length():
    with pytest.raises(ValueError, match=r"output_size .* got \(2, 2, 2\)"):
        gp.adaptive_pool(X, (2, 2, 2))


def test_layer_unknown_kind():
    with pytest.raises(ValueError, match=r"kind must be one of .*got 'median'"):
        gp.GlobalPool("median")


def test_gem_layer_p_below_one():
    with pytest.raises(ValueError, match=r"p must be a number >= 1, got 0.5"):
        gp.GeM(p=0.5)


def test_head_unknown_name():
    with pytest.raises(ValueError, match=r"head must be one of .*got 'svm'"):
        gp.make_head("svm", 8, 10)


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
@pytest.mark.parametrize(
    ("kind", "name", "value"),
    [("gem", "p", INF), ("gem", "p", NAN), ("gem", "eps", INF), ("gem", "eps", NAN),
     ("lse", "r", INF), ("lse", "r", NAN)],
)
def test_non_finite_param_refused(kind, name, value, as_tensor):
    v = torch.tensor(value) if as_tensor else value
    with pytest.raises(ValueError, match=rf"{name} for kind '{kind}' must be finite, got {value}"):
        gp.pool(X, kind, **{name: v})


def test_huge_int_param_refused_as_infinite():
    with pytest.raises(ValueError, match=r"r for kind 'lse' must be finite, got inf"):
        gp.pool(X, "lse", r=10**400)


@pytest.mark.parametrize("keepdim", ["False", 0, 1, None, torch.tensor(True)], ids=repr)
def test_keepdim_not_bool_refused(keepdim):
    with pytest.raises(TypeError, match=r"keepdim must be a bool \(True or False\), got"):
        gp.pool(X, "avg", keepdim=keepdim)


def test_attention_with_no_sample_returns_empty():
    x = torch.randn(0, 3, 4, 5)
    w = torch.rand(0, 4, 5)
    for backend in ("auto", "torch"):
        assert gp.pool(x, "attention", weights=w, backend=backend).shape == (0, 3)
    assert gp.pool(x, "attention", weights=w, keepdim=True).shape == (0, 3, 1, 1)


def test_attention_negative_weight_at_padded_position_ignored():
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[0, 0, 0] = False
    w = torch.rand(2, 4, 5)
    w[0, 0, 0] = -3.0
    y = gp.pool(X, "attention", weights=w, mask=mask, backend="torch")
    assert torch.isfinite(y).all()


def test_attention_negative_weight_at_real_position_still_refused_with_mask():
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[0, 0, 0] = False
    w = torch.rand(2, 4, 5)
    w[0, 0, 0] = float("nan")
    w[1, 1, 1] = -0.5
    with pytest.raises(ValueError, match=r"non-negative, got a minimum of -0.5 at a real position"):
        gp.pool(X, "attention", weights=w, mask=mask)


@pytest.mark.parametrize("bad", [-2.0, NAN, INF, -INF])
def test_reference_torch_and_fused_agree_on_bad_weight_at_padded_position(bad):
    from helpers import reference_forward

    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    mask = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, 0, 0] = True
    mask[0, 1, 1] = False
    w = torch.rand(2, 4, 5, dtype=torch.float64)
    w[0, 1, 1] = bad
    expected = reference_forward(x, "attention", "channels_first", mask, weights=w)
    for backend in ("torch", "fused"):
        wg = w.clone().requires_grad_()
        xg = x.clone().requires_grad_()
        y = gp.pool(xg, "attention", weights=wg, mask=mask, backend=backend)
        np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-10, atol=1e-12,
                                   err_msg=backend)
        y.sum().backward()
        assert torch.isfinite(xg.grad).all() and torch.isfinite(wg.grad).all(), backend
        assert wg.grad[0, 1, 1] == 0, backend


def _compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


# the fused kernel's compiled op takes eps and r as Python floats only, so tensor eps / r go
# through the torch backend here
@pytest.mark.parametrize(
    ("kind", "name", "bad", "backend"),
    [("gem", "p", 0.5, "torch"), ("gem", "p", INF, "torch"), ("gem", "p", NAN, "torch"),
     ("gem", "p", 0.5, "fused"), ("gem", "p", NAN, "fused"), ("gem", "eps", 0.0, "torch"),
     ("gem", "eps", INF, "torch"), ("lse", "r", 0.0, "torch"), ("lse", "r", -1.0, "torch"),
     ("lse", "r", NAN, "torch")],
)
def test_compiled_tensor_param_out_of_range_raises(kind, name, bad, backend):
    f = _compiled(lambda x, v: gp.pool(x, kind, backend=backend, **{name: v}))
    good = torch.tensor(2.0)
    assert torch.isfinite(f(X, good)).all()
    with pytest.raises(Exception, match=rf"{name} for kind '{kind}' must be finite and"):
        f(X, torch.tensor(bad))


def test_compiled_gem_tensor_p_below_one_raises():
    f = torch.compile(lambda x, p: gp.pool(x, "gem", p=p, backend="torch"), fullgraph=True,
                      backend="eager")
    with pytest.raises(Exception, match=r"p for kind 'gem' must be finite and >= 1"):
        f(X, torch.tensor(0.5))


def test_compiled_negative_weight_raises_and_padded_one_is_ignored():
    f = _compiled(lambda x, w, m: gp.pool(x, "attention", weights=w, mask=m, backend="torch"))
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[0, 0, 0] = False
    w = torch.rand(2, 4, 5)
    w[0, 0, 0] = -1.0
    assert torch.isfinite(f(X, w, mask)).all()
    w[1, 0, 0] = -1.0
    with pytest.raises(Exception, match=r"weights must be non-negative at real positions"):
        f(X, w, mask)


def test_compiled_check_reads_back_on_accelerators(monkeypatch):
    """The accelerator form (a read-back instead of a device-side assert) also raises."""
    from globalpool import contract

    monkeypatch.setattr(contract, "_check_traced", contract._check_read_back)
    torch._dynamo.reset()
    try:
        f = _compiled(lambda x, p: gp.pool(x, "gem", p=p, backend="torch"))
        assert torch.isfinite(f(X, torch.tensor(2.0))).all()
        with pytest.raises(Exception):  # noqa: B017 - torch words this one itself
            f(X, torch.tensor(0.5))
    finally:
        torch._dynamo.reset()


def test_gem_eps_below_the_smallest_normal_float32_is_refused():
    # 1e-50 underflows to 0 in float32: NaN on the composition, 0 on the kernel; refused instead
    with pytest.raises(ValueError, match=r"eps for kind 'gem' must be >= 1.17549e-38, got 1e-50"):
        gp.pool(torch.rand(2, 3, 4), "gem", eps=1e-50)


def test_fraction_and_numpy_scalars_are_taken_as_floats():
    from fractions import Fraction

    import numpy as np

    x = torch.rand(2, 3, 5) + 0.1
    expected = gp.pool(x, "lse", r=0.5)
    torch.testing.assert_close(gp.pool(x, "lse", r=Fraction(1, 2)), expected)
    torch.testing.assert_close(gp.pool(x, "lse", r=np.float64(0.5)), expected)
    torch.testing.assert_close(gp.pool(x, "gem", p=Fraction(3)), gp.pool(x, "gem", p=3.0))


def test_a_sparse_x_is_refused_naming_the_layout():
    with pytest.raises(TypeError, match=r"x must be a dense \(strided\) tensor, got layout "
                                        r"torch.sparse_coo; convert it with x.to_dense\(\)"):
        gp.pool(torch.rand(2, 3, 6).to_sparse(), "avg")


@pytest.mark.parametrize("kind", ["max", "avgmax", "catavgmax"])
def test_masked_max_at_minus_inf_shares_its_gradient_among_real_positions(kind):
    from globalpool import reference

    inf = float("inf")
    x = torch.tensor([[[-inf, -inf, 5.0, 7.0], [1.0, -inf, 9.0, 9.0]]], dtype=torch.float64,
                     requires_grad=True)
    mask = torch.tensor([[True, True, False, False]])
    y = gp.pool(x, kind, mask=mask, backend="torch")
    y.sum().backward()
    g = reference.pool_backward(x.detach().numpy(), torch.ones_like(y).numpy(), kind,
                                mask=mask.numpy())["x"]
    torch.testing.assert_close(x.grad, torch.from_numpy(g))


def test_vmap_over_weights_p_and_r_equals_a_loop():
    from torch.func import vmap

    x = torch.rand(2, 3, 4, 5) + 0.1
    w = torch.rand(4, 2, 4, 5)
    cases = [
        (lambda wi: gp.pool(x, "attention", weights=wi), w),
        (lambda pi: gp.pool(x, "gem", p=pi), torch.tensor([1.5, 3.0, 5.0])),
        (lambda ri: gp.pool(x, "lse", r=ri), torch.tensor([0.5, 1.0, 2.0])),
        (lambda mi: gp.pool(x, "attention", weights=w[0], mask=mi), torch.rand(3, 2, 4, 5) > 0.3),
    ]
    for fn, batch in cases:
        torch.testing.assert_close(vmap(fn)(batch), torch.stack([fn(b) for b in batch]))
    with pytest.raises(ValueError, match=r"p for kind 'gem' must be finite and >= 1, got 0.5 in "
                                         r"the batch of values vmap passes"):
        vmap(lambda pi: gp.pool(x, "gem", p=pi))(torch.tensor([3.0, 0.5]))
