"""The fused kernels keep float32 results accurate on long rows: every running float32 sum covers
a bounded span and the spans are added up afterwards (two-level summation), so the error does not
grow with the row length. Checked at 2**20 positions against float64, forward and backward, for
both layouts of the grid kernels and for packed sequences."""

from __future__ import annotations

import pytest
import torch

import globalpool as gp
from globalpool import kernels

pytestmark = pytest.mark.skipif(not kernels.cpu_kernels_load(), reason="numba kernels unavailable")

L = 1 << 20
N, C = 8, 1  # 8 samples: the channels-last kernels then run each row as one task
TOL = 1e-5  # relative to the largest magnitude of the float64 result (torch's own path: ~1e-7)
CASES = [("avg", {}), ("avgmax", {}), ("lse", {"r": 1.0}), ("gem", {"p": 2.5}), ("attention", {})]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max() / b.abs().max())


def _data(layout: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    shape = (N, C, L) if layout == "channels_first" else (N, L, C)
    # a mean far from 0: a sequential float32 sum of 2**20 such values drifts by ~1e-4
    x = 1.0 + 0.5 * torch.rand(shape, generator=g)
    return x.double()  # float32 values: both paths see the same maxima (and ties)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize(("kind", "params"), CASES, ids=[k for k, _ in CASES])
def test_grid_kernels_stay_accurate_on_long_rows(layout, kind, params):
    x64 = _data(layout)
    extra64 = {}
    if kind == "attention":
        extra64["weights"] = torch.rand(N, L, generator=torch.Generator().manual_seed(1),
                                        dtype=torch.float64)
    if kind == "gem":
        extra64["p"] = torch.tensor(params["p"], dtype=torch.float64, requires_grad=True)
        params = {}
    xr = x64.clone().requires_grad_()
    ref = gp.pool(xr, kind, layout=layout, backend="torch", **params, **extra64)
    g = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64).reshape(ref.shape)
    ref.backward(g)
    x = x64.float().requires_grad_()
    extra = {k: v.detach().float().requires_grad_(k == "p") for k, v in extra64.items()}
    y = gp.pool(x, kind, layout=layout, backend="fused", **params, **extra)
    y.backward(g.float())
    assert _rel(y.detach(), ref.detach()) < TOL
    assert _rel(x.grad, xr.grad) < TOL
    if kind == "gem":
        assert _rel(extra["p"].grad, extra64["p"].grad) < TOL


@pytest.mark.parametrize(("kind", "params"), [c for c in CASES if c[0] != "attention"],
                         ids=[k for k, _ in CASES if k != "attention"])
def test_packed_kernels_stay_accurate_on_long_sequences(kind, params):
    x64 = _data("channels_last")[0]
    cu = torch.tensor([0, 7, L], dtype=torch.int64)
    xr = x64.clone().requires_grad_()
    ref = gp.pool_packed(xr, cu, kind, backend="torch", **params)
    g = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64).reshape(ref.shape)
    ref.backward(g)
    x = x64.float().requires_grad_()
    y = gp.pool_packed(x, cu, kind, backend="fused", **params)
    y.backward(g.float())
    assert _rel(y.detach(), ref.detach()) < TOL
    assert _rel(x.grad, xr.grad) < TOL
