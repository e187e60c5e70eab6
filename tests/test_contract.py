"""Bad input gets a clear error naming the argument, the value and what was expected."""

from __future__ import annotations

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
    with pytest.raises(ValueError, match=r"eps for kind 'gem' must be > 0, got 0.0"):
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
    with pytest.raises(ValueError, match=r"kind must be one of \('avg', 'max'\), got 'gem'"):
        gp.adaptive_pool(X, 2, "gem")


def test_adaptive_bad_output_size():
    with pytest.raises(ValueError, match=r"output_size must be a positive int or a tuple of 2"):
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
