"""Adaptive pooling: PyTorch's exact bins, both layouts, against F.adaptive_* and the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import globalpool as gp
from globalpool import reference
from helpers import assert_close, to_np

TORCH_OPS = {
    ("avg", 1): F.adaptive_avg_pool1d,
    ("avg", 2): F.adaptive_avg_pool2d,
    ("avg", 3): F.adaptive_avg_pool3d,
    ("max", 1): F.adaptive_max_pool1d,
    ("max", 2): F.adaptive_max_pool2d,
    ("max", 3): F.adaptive_max_pool3d,
}
CASES = {  # input spatial size, output size: divisible, non-divisible, larger than the input
    1: [((8,), 4), ((7,), 3), ((3,), 5)],
    2: [((8, 6), (4, 3)), ((7, 5), (3, 2)), ((3, 4), (5, 7))],
    3: [((4, 4, 4), 2), ((5, 3, 7), (2, 2, 3)), ((2, 3, 2), (3, 4, 5))],
}
PARAMS = [(kind, rank, i) for kind in ("avg", "max") for rank in (1, 2, 3) for i in range(3)]


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("kind,rank,case", PARAMS)
def test_matches_torch_and_reference(kind, rank, case, layout):
    spatial, out = CASES[rank][case]
    gen = torch.Generator().manual_seed(case)
    x_cf = torch.randn((2, 3, *spatial), generator=gen, dtype=torch.float64)
    expected_cf = TORCH_OPS[(kind, rank)](x_cf, out)
    x = x_cf if layout == "channels_first" else x_cf.movedim(1, -1).contiguous()
    x.requires_grad_()
    y = gp.adaptive_pool(x, out, kind, layout=layout)
    y_cf = y if layout == "channels_first" else y.movedim(-1, 1)
    torch.testing.assert_close(y_cf, expected_cf, rtol=0, atol=1e-12)
    assert_close(y, reference.adaptive_forward(to_np(x), out, kind, layout=layout),
                 torch.float64, "adaptive forward")
    grad_out = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(grad_out)
    expected_grad = reference.adaptive_backward(to_np(x), to_np(grad_out), out, kind,
                                                layout=layout)
    assert_close(x.grad, expected_grad, torch.float64, "adaptive backward")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_keep_dtype(dtype):
    x = torch.randn(2, 3, 7, 5).to(dtype)
    y = gp.adaptive_pool(x, (3, 2), "avg")
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), F.adaptive_avg_pool2d(x.float(), (3, 2)),
                               rtol=1e-2, atol=1e-2)


def test_output_one_equals_global_pool():
    x = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(gp.adaptive_pool(x, 1).flatten(1), gp.pool(x, "avg"))
    torch.testing.assert_close(gp.adaptive_pool(x, 1, "max").flatten(1), gp.pool(x, "max"))


def test_gradcheck_float64():
    x = torch.randn(1, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gp.adaptive_pool(t, (3, 4), "avg"), (x,))
    assert torch.autograd.gradcheck(lambda t: gp.adaptive_pool(t, (2, 3), "max"), (x,))
