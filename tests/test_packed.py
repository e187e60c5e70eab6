"""gp.pool_packed / gp.pool_nested: every kind x dtype x backend against the NumPy reference
applied per sequence, the fused kernel's sum/first/last against hand-computed values, equality
with padding + mask through gp.pool, isolation of sequences, autograd modes and errors."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

import globalpool as gp
from globalpool import packed, reference
from globalpool.kernels import _HAS_NUMBA
from globalpool.registry import kernels_of
from helpers import DTYPES, KIND_PARAMS, TOLERANCE

BACKENDS = ("torch", "fused")
LENGTHS = (3, 0, 5, 1, 4)  # an empty sequence in the middle
C = 4

needs_numba = pytest.mark.skipif(not _HAS_NUMBA, reason="numba is not installed")

# each kind with the packed kernel only where it has one (mean_sqrt_len and weightedmean have
# none: backend="fused" refuses them)
KERNEL_KINDS = tuple(k for k in gp.KINDS if "packed" in kernels_of(k))
KIND_BACKENDS = [(k, b) for k in gp.KINDS for b in BACKENDS if b == "torch" or k in KERNEL_KINDS]


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int64)


def _inputs(lengths, dtype, seed=0, c=C):
    gen = torch.Generator().manual_seed(seed)
    t = int(sum(lengths))
    x = torch.randn(t, c, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.rand(t, generator=gen, dtype=torch.float64).to(dtype)
    return x, w


def _reference(x, lengths, kind, grad_out=None, **params):
    """Per sequence: (forward (N, width*C), grad x (T, C), grad weights (T,), grad p)."""
    xs = x.detach().to(torch.float64).numpy()
    w = params.pop("weights", None)
    w = None if w is None else w.detach().to(torch.float64).numpy()
    params = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
              for k, v in params.items()}
    width = 2 if kind == "catavgmax" else 1
    outs, gxs, gws, gp_total = [], [], [], 0.0
    start = 0
    for n, k in enumerate(lengths):
        seq = xs[start:start + k][None]  # (1, k, C) channels last
        kw = dict(params)
        if w is not None:
            kw["weights"] = w[start:start + k][None]
        if k == 0:
            outs.append(np.zeros(width * xs.shape[1]))
            gxs.append(np.zeros((0, xs.shape[1])))
            gws.append(np.zeros(0))
        else:
            outs.append(reference.pool_forward(seq, kind, layout="channels_last", **kw)[0])
            if grad_out is not None:
                g = grad_out[n:n + 1].to(torch.float64).numpy()
                got = reference.pool_backward(seq, g, kind, layout="channels_last", **kw)
                gxs.append(got["x"][0])
                gws.append(got["weights"][0] if w is not None else np.zeros(k))
                gp_total += got["p"] or 0.0
        start += k
    grads = None
    if grad_out is not None:
        grads = (np.concatenate(gxs), np.concatenate(gws), gp_total)
    return np.stack(outs) if outs else np.zeros((0, width * xs.shape[1])), grads


def _close(actual, expected, dtype, what, scale=1.0):
    got = actual.detach().to(torch.float64).numpy() if isinstance(actual, torch.Tensor) else actual
    tol = {k: v * scale for k, v in TOLERANCE[dtype].items()}
    np.testing.assert_allclose(got, expected, err_msg=what, **tol)


def _params(kind, x, w, p_grad=True):
    params = dict(KIND_PARAMS.get(kind, {}))
    if kind == "gem":
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        params["p"] = torch.tensor(params["p"], dtype=acc, requires_grad=p_grad)
    if kind == "attention":
        params["weights"] = w.clone().requires_grad_()
    return params


# --------------------------------------------------------------------------------------------
# every kind x dtype x backend against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kind", "backend"), KIND_BACKENDS)
def test_matches_reference(kind, dtype, backend):
    if backend == "fused" and not _HAS_NUMBA:
        pytest.skip("numba is not installed")
    x, w = _inputs(LENGTHS, dtype)
    cu = _cu(LENGTHS)
    params = _params(kind, x, w)
    xg = x.clone().requires_grad_()
    y = gp.pool_packed(xg, cu, kind, backend=backend, **params)
    assert y.dtype == dtype and y.shape == (len(LENGTHS), gp.output_width(kind, C))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64).to(dtype)
    expected, (gx, gw, gp_ref) = _reference(x, LENGTHS, kind, g, **{
        k: v for k, v in params.items()})
    _close(y, expected, dtype, f"forward {kind}")
    with torch.no_grad():
        _close(gp.pool_packed(x, cu, kind, backend=backend, **params), expected, dtype,
               f"forward {kind} under no_grad")
    y.backward(g)
    assert xg.grad.dtype == dtype and torch.isfinite(xg.grad).all()
    _close(xg.grad, gx, dtype, f"grad x {kind}")
    if kind == "attention":
        _close(params["weights"].grad, gw, dtype, "grad weights", scale=2)
    if kind == "gem":
        _close(params["p"].grad, gp_ref, dtype, "grad p", scale=5)


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["sum", "first", "last"])
def test_kernel_sum_first_last(kind, dtype):
    """The fused kernel's kinds not yet in the registry, against hand-computed values."""
    x, _ = _inputs(LENGTHS, dtype)
    cu = _cu(LENGTHS)
    xs = x.to(torch.float64)
    rows, expected = [], []
    for n, k in enumerate(LENGTHS):
        start = int(cu[n])
        if k == 0:
            expected.append(torch.zeros(C, dtype=torch.float64))
            rows.append(None)
            continue
        row = {"sum": None, "first": start, "last": start + k - 1}[kind]
        rows.append(row)
        seg = xs[start:start + k]
        expected.append(seg.sum(0) if kind == "sum" else xs[row])
    xg = x.clone().requires_grad_()
    y = packed.fused_packed(xg, cu, kind)
    assert y.dtype == dtype
    _close(y, torch.stack(expected).numpy(), dtype, f"forward {kind}")
    g = torch.arange(1.0, 1.0 + y.numel()).reshape(y.shape).to(dtype)
    y.backward(g)
    want = torch.zeros(x.shape, dtype=torch.float64)
    for n, k in enumerate(LENGTHS):
        start = int(cu[n])
        if k == 0:
            continue
        if kind == "sum":
            want[start:start + k] = g[n].to(torch.float64)
        else:
            want[rows[n]] = g[n].to(torch.float64)
    _close(xg.grad, want.numpy(), dtype, f"grad x {kind}")


@needs_numba
def test_kernel_sum_first_last_all_empty():
    x = torch.zeros(0, 3, requires_grad=True)
    for kind in ("sum", "first", "last"):
        y = packed.fused_packed(x, torch.zeros(4, dtype=torch.int64), kind)
        assert torch.equal(y, torch.zeros(3, 3))


@pytest.mark.parametrize(("kind", "backend"), KIND_BACKENDS)
def test_empty_sequences_zero_output_and_gradient(kind, backend):
    if backend == "fused" and not _HAS_NUMBA:
        pytest.skip("numba is not installed")
    lengths = (0, 2, 0)
    x, w = _inputs(lengths, torch.float32, seed=1)
    params = _params(kind, x, w)
    xg = x.clone().requires_grad_()
    y = gp.pool_packed(xg, _cu(lengths), kind, backend=backend, **params)
    assert torch.equal(y[0], torch.zeros_like(y[0])) and torch.equal(y[2], torch.zeros_like(y[2]))
    y.sum().backward()
    assert torch.isfinite(xg.grad).all()
    # all sequences empty (T = 0)
    x0 = torch.zeros(0, C, requires_grad=True)
    p0 = {**params, "weights": torch.zeros(0)} if kind == "attention" else params
    y0 = gp.pool_packed(x0, torch.zeros(4, dtype=torch.int32), kind, backend=backend, **p0)
    assert torch.equal(y0, torch.zeros(3, gp.output_width(kind, C)))


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=6),
    kind_backend=st.sampled_from(
        KIND_BACKENDS if _HAS_NUMBA else [(k, "torch") for k in gp.KINDS]
    ),
    seed=st.integers(0, 1000),
)
def test_property_random_lengths(lengths, kind_backend, seed):
    kind, backend = kind_backend
    x, w = _inputs(lengths, torch.float64, seed=seed, c=3)
    params = _params(kind, x, w, p_grad=False)
    xg = x.clone().requires_grad_()
    y = gp.pool_packed(xg, _cu(lengths), kind, backend=backend, **params)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    expected, (gx, gw, _) = _reference(x, lengths, kind, g, **params)
    _close(y, expected, torch.float64, "forward")
    y.backward(g)
    _close(xg.grad, gx, torch.float64, "grad x")
    if kind == "attention":
        _close(params["weights"].grad, gw, torch.float64, "grad weights")


@pytest.mark.parametrize(("kind", "backend"), KIND_BACKENDS)
def test_gradcheck_float64(kind, backend):
    if backend == "fused" and not _HAS_NUMBA:
        pytest.skip("numba is not installed")
    lengths = (2, 0, 3)
    x, w = _inputs(lengths, torch.float64, seed=2, c=3)
    x = (x + 0.1 * torch.arange(x.numel(), dtype=torch.float64).reshape(x.shape)).requires_grad_()
    cu = _cu(lengths)
    if kind == "attention":
        def fn(x, w):
            return gp.pool_packed(x, cu, kind, backend=backend, weights=w)
        args = (x, w.requires_grad_())
    elif kind == "gem":
        def fn(x, p):
            return gp.pool_packed(x, cu, kind, backend=backend, p=p)
        args = (x, torch.tensor(2.5, dtype=torch.float64, requires_grad=True))
    else:
        def fn(x):
            return gp.pool_packed(x, cu, kind, backend=backend, **KIND_PARAMS.get(kind, {}))
        args = (x,)
    assert torch.autograd.gradcheck(fn, args)
    if backend == "fused":  # a recorded backward goes through the composition
        assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize(("kind", "backend"), KIND_BACKENDS)
def test_equals_padding_and_mask_through_pool(kind, backend):
    if backend == "fused" and not _HAS_NUMBA:
        pytest.skip("numba is not installed")
    x, w = _inputs(LENGTHS, torch.float32, seed=3)
    cu = _cu(LENGTHS)
    xp, mask, wp = packed.padded(x, cu, w)
    params = dict(KIND_PARAMS.get(kind, {}))
    grid = backend if "cpu" in kernels_of(kind) else "torch"  # first / last: no grid kernel
    want = gp.pool(xp, kind, layout="channels_last", mask=mask, backend=grid,
                   **({**params, "weights": wp} if kind == "attention" else params))
    got = gp.pool_packed(x, cu, kind, backend=backend,
                         **({**params, "weights": w} if kind == "attention" else params))
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


# --------------------------------------------------------------------------------------------
# promises: isolation, extremes, precision


@pytest.mark.parametrize(("kind", "backend"), KIND_BACKENDS)
def test_nan_inf_in_other_sequences_never_leak(kind, backend):
    if backend == "fused" and not _HAS_NUMBA:
        pytest.skip("numba is not installed")
    lengths = (3, 2, 4)
    x, w = _inputs(lengths, torch.float32, seed=4)
    clean = x.clone()
    x[0, 1], x[1, 2], x[4, 0] = float("nan"), float("inf"), float("-inf")  # sequences 0 and 1
    params = _params(kind, x, w, p_grad=False)
    xg = x.clone().requires_grad_()
    y = gp.pool_packed(xg, _cu(lengths), kind, backend=backend, **params)
    ref, (gx, _, _) = _reference(clean, lengths, kind, torch.ones(y.shape), **params)
    _close(y[2], ref[2], torch.float32, "sequence 2")
    y[2].sum().backward()
    _close(xg.grad[5:], gx[5:], torch.float32, "grad of sequence 2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gem_large_p_is_scaled(backend):
    if backend == "fused" and not _HAS_NUMBA:
        pytest.skip("numba is not installed")
    lengths = (3, 4)
    x = torch.tensor([[50.0], [100.0], [2.0], [1e-3], [3e-3], [2e-3], [1e-4]])
    xg = x.clone().requires_grad_()
    y = gp.pool_packed(xg, _cu(lengths), "gem", backend=backend, p=64.0)
    ref, (gx, _, _) = _reference(x, lengths, "gem", torch.ones(2, 1), p=64.0)
    assert torch.isfinite(y).all()
    _close(y, ref, torch.float32, "gem p=64")
    y.sum().backward()
    _close(xg.grad, gx, torch.float32, "gem p=64 grad", scale=10)


@needs_numba
def test_gem_sequences_outside_one_read_range_are_taken_scaled():
    """The fused gem sums z^p unscaled in one read; a sequence whose mean of z^p overflows
    float32 (1e6 at p = 8), falls below its normal range (z = eps = 1e-6 at p = 8), or holds
    +inf or NaN is read again with sums scaled by its maximum. The other sequences of the batch
    keep their one-read values; values and gradients equal the torch composition's."""
    lengths = (4, 3, 5, 2, 3)
    x = torch.rand(17, 3, generator=torch.Generator().manual_seed(3)) + 0.5
    x[4:7, 1] = torch.tensor([1e6, 3e6, 2e6])  # overflows
    x[7:12, 2] = 1e-9  # clamped to eps: 1e-48 underflows
    x[12, 0] = float("inf")
    x[15, 1] = float("nan")
    y = {}
    grads = {}
    for backend in BACKENDS:
        xg = x.clone().requires_grad_()
        y[backend] = gp.pool_packed(xg, _cu(lengths), "gem", backend=backend, p=8.0)
        finite = torch.isfinite(y[backend])
        y[backend][finite].sum().backward()
        grads[backend] = xg.grad
    torch.testing.assert_close(y["fused"], y["torch"], equal_nan=True)
    torch.testing.assert_close(grads["fused"], grads["torch"], equal_nan=True)
    assert torch.isnan(y["fused"][3, 0]) and torch.isnan(y["fused"][4, 1])
    assert torch.isfinite(y["fused"][1]).all() and torch.isfinite(y["fused"][2]).all()


@needs_numba
@pytest.mark.parametrize("kind", KERNEL_KINDS)
def test_long_sequences_span_kernel_chunks(kind):
    """gem and lse rescale their running sums when a later chunk of rows (128 KiB) holds a new
    maximum: sequences of hundreds of rows whose values grow, with a spike in the middle."""
    lengths = (130, 0, 170)
    x, w = _inputs(lengths, torch.float32, seed=6, c=512)
    x = x + torch.linspace(0.0, 4.0, x.shape[0])[:, None]
    x[200, :7] = 30.0
    params = _params(kind, x, w, p_grad=False)
    params.update({"p": 3.0} if kind == "gem" else {"r": 3.0} if kind == "lse" else {})
    xg = x.clone().requires_grad_()
    y = gp.pool_packed(xg, _cu(lengths), kind, backend="fused", **params)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    expected, (gx, _, _) = _reference(x, lengths, kind, g, **params)
    _close(y, expected, torch.float32, f"forward {kind}", scale=5)
    y.backward(g)
    _close(xg.grad, gx, torch.float32, f"grad x {kind}", scale=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_infinities(backend):
    if backend == "fused" and not _HAS_NUMBA:
        pytest.skip("numba is not installed")
    inf = float("inf")
    x = torch.tensor([[1.0], [inf], [2.0], [-inf], [-inf], [-inf], [3.0], [inf], [inf]])
    y = gp.pool_packed(x, _cu((3, 2, 2, 2)), "lse", backend=backend, r=2.0)
    expected = torch.tensor([[inf], [-inf], [3.0 + float(np.log(0.5)) / 2.0], [inf]])
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_ties_share_gradient(backend):
    if backend == "fused" and not _HAS_NUMBA:
        pytest.skip("numba is not installed")
    x = torch.tensor([[2.0, 1.0], [5.0, 1.0], [5.0, 0.0], [5.0, 1.0], [7.0, 7.0]],
                     requires_grad=True)
    y = gp.pool_packed(x, _cu((4, 1)), "max", backend=backend)
    y.sum().backward()
    third = 1 / 3
    want = torch.tensor([[0, third], [third, third], [third, 0], [third, third], [1, 1]])
    torch.testing.assert_close(x.grad, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_accumulates_in_float32(backend):
    if backend == "fused" and not _HAS_NUMBA:
        pytest.skip("numba is not installed")
    x = torch.ones(3000, 2, dtype=torch.float16)  # a float16 sum sticks at 2048
    y = gp.pool_packed(x, torch.tensor([0, 3000]), "avg", backend=backend)
    assert y.dtype == torch.float16 and torch.equal(y, torch.ones(1, 2, dtype=torch.float16))


@needs_numba
def test_float64_stays_float64():
    x = torch.full((3, 1), 1.0 + 2.0**-40, dtype=torch.float64)
    x[1] = 1.0 + 2.0**-39
    y = gp.pool_packed(x, torch.tensor([0, 3]), "gem", backend="fused", p=3.0)
    assert y.dtype == torch.float64
    assert abs(float(y) - (1.0 + 4 * 2.0**-40 / 3)) < 1e-15


# --------------------------------------------------------------------------------------------
# backends and autograd modes


@needs_numba
def test_auto_takes_the_kernel_for_large_cpu_inputs(monkeypatch):
    calls = []
    real = packed.fused_packed
    monkeypatch.setattr(packed, "fused_packed", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(1 << 10, 64)  # 64K elements
    cu = torch.tensor([0, 100, 1000, 1024])
    gp.pool_packed(x, cu, "avg")
    assert calls == [1]
    gp.pool_packed(x[:100], torch.tensor([0, 100]), "avg")  # small: the composition
    assert calls == [1]
    with torch.autograd.forward_ad.dual_level():  # forward AD: the composition, and it works
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        out = gp.pool_packed(dual, cu, "avg")
        tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
    assert calls == [1] and torch.allclose(tangent, torch.ones(3, 64))


@needs_numba
def test_fused_refuses_what_it_cannot_serve(monkeypatch):
    from globalpool import kernels

    x = torch.randn(4, 3)
    cu = torch.tensor([0, 4])
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(ValueError, match="forward-mode AD.*backend='auto'"):
            gp.pool_packed(dual, cu, "avg", backend="fused")
    monkeypatch.setattr(kernels, "_HAS_NUMBA", False)
    with pytest.raises(ValueError, match="numba is not installed.*'torch'"):
        gp.pool_packed(x, cu, "avg", backend="fused")
    assert torch.equal(gp.pool_packed(x, cu, "avg"), x.mean(0, keepdim=True))


@needs_numba
@pytest.mark.parametrize("backend", ("auto", "fused"))
def test_tensor_eps_and_r_get_their_gradient(backend):
    """The kernel gives no gradient for eps or r: the one autograd Function takes it from the
    composition in the backward (backend='fused' refused these calls before)."""
    x, _ = _inputs((300, 0, 500), torch.float64, seed=3)
    x = x.abs() + 0.1
    cu = _cu((300, 0, 500))
    for kind, name, value in (("gem", "eps", 0.5), ("lse", "r", 1.7)):
        v = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        xg = x.clone().requires_grad_()
        y = gp.pool_packed(xg, cu, kind, backend=backend, **{name: v})
        g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        got = torch.autograd.grad(y, (xg, v), g)
        vt = v.detach().requires_grad_()
        xt = x.clone().requires_grad_()
        want = torch.autograd.grad(gp.pool_packed(xt, cu, kind, backend="torch", **{name: vt}),
                                   (xt, vt), g)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)


@needs_numba
def test_torch_func_grad_takes_the_composition():
    x = torch.randn(5, 3, dtype=torch.float64)
    cu = torch.tensor([0, 2, 5])
    got = torch.func.grad(lambda t: gp.pool_packed(t, cu, "lse").sum())(x)
    xg = x.clone().requires_grad_()
    gp.pool_packed(xg, cu, "lse", backend="fused").sum().backward()
    torch.testing.assert_close(got, xg.grad)


# --------------------------------------------------------------------------------------------
# nested tensors


def test_nested_tensor_input():
    seqs = [torch.randn(k, C, dtype=torch.float64) for k in (3, 1, 5)]
    nt = torch.nested.nested_tensor(seqs, layout=torch.jagged, requires_grad=True)
    for kind in ("avg", "max", "gem"):
        y = gp.pool_nested(nt, kind)
        want = gp.pool_packed(torch.cat(seqs), _cu((3, 1, 5)), kind)
        torch.testing.assert_close(y, want)
    gp.pool_nested(nt, "avg").sum().backward()
    assert nt.grad is not None
    w = torch.nested.nested_tensor([torch.rand(k, dtype=torch.float64) for k in (3, 1, 5)],
                                   layout=torch.jagged)
    y = gp.pool_nested(nt, "attention", weights=w)
    want = gp.pool_packed(torch.cat(seqs), _cu((3, 1, 5)), "attention", weights=w.values())
    torch.testing.assert_close(y, want)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_tensor_errors():
    strided = torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(1, 3)])
    with pytest.raises(TypeError, match="layout=torch.jagged"):
        gp.pool_nested(strided, "avg")
    with pytest.raises(TypeError, match="nested tensor.*regular tensor"):
        gp.pool_nested(torch.ones(2, 3, 4), "avg")


# --------------------------------------------------------------------------------------------
# errors name the argument


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.ones(4), torch.tensor([0, 4]), {}), ValueError, r"x must be 2-D \(T, C\)"),
        (lambda: (torch.ones(4, 2).int(), torch.tensor([0, 4]), {}), TypeError,
         "x must have a floating dtype"),
        (lambda: ([[1.0]], torch.tensor([0, 1]), {}), TypeError, "x must be a torch.Tensor"),
        (lambda: (torch.ones(4, 2), torch.tensor([[0, 4]]), {}), ValueError,
         r"cu_seqlens must be 1-D .* got shape \(1, 2\)"),
        (lambda: (torch.ones(4, 2), torch.tensor([0.0, 4.0]), {}), TypeError,
         "cu_seqlens must have dtype torch.int32 or torch.int64, got torch.float32"),
        (lambda: (torch.ones(4, 2), [0, 4], {}), TypeError, "cu_seqlens must be a torch.Tensor"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 4], device="meta"), {}), ValueError,
         "cu_seqlens must be on x's device cpu, got meta"),
        (lambda: (torch.ones(4, 2), torch.tensor([1, 4]), {}), ValueError,
         r"cu_seqlens must start at 0, got cu_seqlens\[0\] = 1"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 3, 2, 4]), {}), ValueError,
         "must be non-decreasing"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 3]), {}), ValueError,
         r"cu_seqlens must end at T = x.shape\[0\] = 4, got cu_seqlens\[-1\] = 3"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 4]), {"kind": "median"}), ValueError,
         "kind must be one of"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 4]), {"kind": "gem", "q": 1}), TypeError,
         r"unexpected parameter\(s\) \['q'\]"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 4]), {"kind": "gem", "p": 0.5}), ValueError,
         "p for kind 'gem' must be >= 1, got 0.5"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 4]), {"kind": "lse", "r": -1.0}), ValueError,
         "r for kind 'lse' must be > 0"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 4]), {"kind": "gem", "eps": 0.0}),
         ValueError, "eps for kind 'gem' must be >= 1.17549e-38"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 4]), {"kind": "attention"}), TypeError,
         r"requires weights=Tensor of shape \(T,\)"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 4]),
                  {"kind": "attention", "weights": torch.ones(2, 2)}), ValueError,
         r"weights must have shape \(T,\) = \(4,\), got \(2, 2\)"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 4]),
                  {"kind": "attention", "weights": -torch.ones(4)}), ValueError,
         "weights must be non-negative"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 4]), {"backend": "numba"}), ValueError,
         "backend must be one of"),
    ],
)
def test_errors_name_the_argument(make, error, match):
    x, cu, kw = make()
    kind = kw.pop("kind", "avg")
    with pytest.raises(error, match=match):
        gp.pool_packed(x, cu, kind, **kw)


# --------------------------------------------------------------------------------------------
# tuples of kinds, per-channel parameters, nested tensors through gp.pool


def _padded_pool(x, lengths, kind, **params):
    """gp.pool on the padded (N, Lmax, C) batch with its mask (the definition of pool_packed)."""
    n, lmax = len(lengths), max(max(lengths), 1)
    padded = x.new_zeros(n, lmax, x.shape[1])
    mask = torch.zeros(n, lmax, dtype=torch.bool)
    start = 0
    for i, k in enumerate(lengths):
        padded[i, :k] = x[start:start + k]
        mask[i, :k] = True
        start += k
    return gp.pool(padded, kind, layout="channels_last", mask=mask, backend="torch", **params)


@pytest.mark.parametrize("backend", ("auto", *BACKENDS))
def test_tuple_of_kinds(backend):
    x, _ = _inputs(LENGTHS, torch.float64, seed=5)
    x.requires_grad_()
    kinds = ("first", "max", "sum", "last", "gem")
    y = gp.pool_packed(x, _cu(LENGTHS), kinds, backend=backend, p=2.0)
    want = _padded_pool(x, LENGTHS, kinds, p=2.0)
    torch.testing.assert_close(y, want)
    assert y.shape == (len(LENGTHS), gp.output_width(kinds, C))
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_want,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gx, gx_want)


@pytest.mark.parametrize("kind", ("gem", "lse"))
def test_per_channel_parameter_takes_the_composition(kind):
    x, _ = _inputs(LENGTHS, torch.float64, seed=6)
    x = (x.abs() + 0.1).requires_grad_()
    name = "p" if kind == "gem" else "r"
    v = torch.linspace(1.5, 4.0, C, dtype=torch.float64, requires_grad=True)
    y = gp.pool_packed(x, _cu(LENGTHS), kind, **{name: v})
    torch.testing.assert_close(y, _padded_pool(x, LENGTHS, kind, **{name: v}))
    torch.autograd.gradcheck(lambda a, b: gp.pool_packed(a, _cu(LENGTHS), kind, **{name: b}),
                             (x, v))
    with pytest.raises(ValueError, match=rf"a per-channel {name} \(shape \({C},\)\) has no kernel"):
        gp.pool_packed(x, _cu(LENGTHS), kind, backend="fused", **{name: v})
    with pytest.raises(ValueError, match=rf"{name} for kind '{kind}' must have shape \(C,\)"):
        gp.pool_packed(x, _cu(LENGTHS), kind, **{name: v[:2]})


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_tensor_through_pool():
    seqs = [torch.randn(k, C, dtype=torch.float64) for k in (3, 1, 5)]
    nt = torch.nested.nested_tensor(seqs, layout=torch.jagged)
    y = gp.pool(nt, ("avg", "last"), layout="channels_last")
    torch.testing.assert_close(y, gp.pool_packed(torch.cat(seqs), _cu((3, 1, 5)), ("avg", "last")))
    assert gp.pool(nt, "max", layout="channels_last", keepdim=True).shape == (3, 1, C)
    with pytest.raises(ValueError, match="layout must be 'channels_last' for a nested tensor"):
        gp.pool(nt, "avg")
    with pytest.raises(ValueError, match="mask must be None for a nested tensor"):
        gp.pool(nt, "avg", layout="channels_last", mask=torch.ones(3, 5, dtype=torch.bool))


def test_export_serves_new_lengths():
    """torch.export records the longest sequence as a size known only when the graph runs."""

    class Packed(torch.nn.Module):
        def forward(self, x, cu_seqlens):
            return gp.pool_packed(x, cu_seqlens, ("avg", "max", "last"))

    x = torch.randn(9, C)
    rows, n = torch.export.Dim("rows"), torch.export.Dim("n", min=3)  # N >= 2
    program = torch.export.export(Packed(), (x, _cu((3, 0, 6))),
                                  dynamic_shapes=({0: rows}, {0: n}))
    for lengths in ((3, 0, 6), (1, 1, 1, 1, 1), (0, 12)):
        x = torch.randn(sum(lengths), C)
        torch.testing.assert_close(program.module()(x, _cu(lengths)), Packed()(x, _cu(lengths)))


def test_inductor_compile_trains_through_a_tuple_of_kinds():
    """torch.compile with its default backend (inductor), forward and backward; the second
    call has the same shapes and other lengths (a longer longest sequence): the one graph reads
    it when it runs, in the forward and the backward."""
    fn = lambda x, cu: gp.pool_packed(x, cu, ("avg", "max"))  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    for lengths in ((7, 0, 12, 11), (3, 20, 0, 7)):
        x = torch.rand(sum(lengths), C, generator=torch.Generator().manual_seed(len(lengths)))
        xe, xc = (x.clone().requires_grad_() for _ in range(2))
        ye, yc = fn(xe, _cu(lengths)), compiled(xc, _cu(lengths))
        weights = torch.arange(1.0, ye.numel() + 1).reshape(ye.shape)
        (ye * weights).sum().backward()
        (yc * weights).sum().backward()
        torch.testing.assert_close(yc, ye)
        torch.testing.assert_close(xc.grad, xe.grad)
