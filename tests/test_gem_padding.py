"""GeM's padding never reaches its value: small inputs with a large p, masked, in uneven adaptive
bins and packed, pool to the reference with finite gradients (the composition once filled padded
slots with 1.0 and scaled every row by it: 0 and NaN gradients at x ~ 1e-3, p = 20)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import globalpool as gp
from globalpool import reference


def _small(n=2, c=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    # float32, as the bug was: (1e-3)^20 = 1e-60 underflows there, not in float64
    return (torch.rand((n, c, length), generator=g) + 0.5) * 1e-3


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_masked_gem_of_small_values_with_large_p(backend):
    x = _small()
    mask = torch.tensor([[True, True, True, False, False, False, False],
                         [True, False, True, True, False, True, False]])
    xr = x.clone().requires_grad_()
    y = gp.pool(xr, "gem", p=20.0, mask=mask, backend=backend)
    expected = reference.pool_forward(x.numpy(), "gem", p=20.0, mask=mask.numpy())
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5)
    assert (y >= 5e-4).all()  # every input is >= 5e-4: never 0
    y.sum().backward()
    grad = reference.pool_backward(x.numpy(), np.ones(expected.shape), "gem", p=20.0,
                                   mask=mask.numpy())["x"]
    np.testing.assert_allclose(xr.grad.numpy(), grad, rtol=1e-4, atol=1e-9)


def test_uneven_adaptive_bins_of_gem_without_a_mask():
    x = _small(length=7).requires_grad_()
    y = gp.adaptive_pool(x, 3, "gem", p=20.0)  # bins of 3, 3 and 3 over 7: windows padded
    expected = reference.adaptive_forward(x.detach().numpy(), 3, "gem", p=20.0)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad != 0).any()


def test_packed_gem_below_the_size_threshold():
    x = _small(n=1, c=5, length=6)[0].T.contiguous().requires_grad_()  # (T, C)
    cu = torch.tensor([0, 2, 6])
    y = gp.pool_packed(x, cu, "gem", p=20.0)
    want = torch.stack([gp.pool(x[a:b].T[None], "gem", p=20.0, backend="torch")[0]
                        for a, b in ((0, 2), (2, 6))])
    torch.testing.assert_close(y, want, rtol=1e-6, atol=0)
    assert (y >= 5e-4).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
