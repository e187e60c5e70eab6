"""The one backend decision per call (``globalpool.dispatch``): both sides of the size threshold,
every reason a plan gives, the refusals of ``backend="fused"``; then regression tests for the
divergences between the fused paths and the torch composition that one dispatch and one
autograd Function removed (each failed on the code before them)."""

from __future__ import annotations

import ast
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils.checkpoint import checkpoint

import globalpool as gp
from globalpool import dispatch, kernels, reference
from globalpool.kernels import _HAS_NUMBA
from globalpool.kernels import plan as kernel_plan
from globalpool.registry import spec

pytestmark = pytest.mark.skipif(not _HAS_NUMBA, reason="numba is not installed")

LIMIT = dispatch.FUSED_MIN_ELEMENTS
CF = "channels_first"


class _FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: the plan reads only ``is_cpu`` / ``is_cuda``, the
    dtype, the shape and the autograd state (no GPU here)."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return False


def _big(*, grad=False, dtype=torch.float32):
    x = torch.rand(4, 64, 16, 16, dtype=dtype) + 0.1  # exactly FUSED_MIN_ELEMENTS
    assert x.numel() == LIMIT
    return x.requires_grad_(grad)


def _cuda(x):
    return x.as_subclass(_FakeCuda)


# --------------------------------------------------------------------------------------------
# the plan


@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_both_sides_of_the_size_threshold(backend):
    below = torch.rand(3, 5, 4369) + 0.1  # FUSED_MIN_ELEMENTS - 1
    at = torch.rand(2, 8, 4096) + 0.1
    assert below.numel() == LIMIT - 1 and at.numel() == LIMIT
    for kind in ("gem", "max", "attention"):
        params = {"weights": torch.rand(2, 4096)} if kind == "attention" else {}
        small = {"weights": torch.rand(3, 4369)} if kind == "attention" else {}
        got = dispatch.plan(backend, below, kind, None, small)
        assert got == (dispatch.SMALL if backend == "auto" else ("cpu", got.reason, "inference"))
        assert dispatch.plan(backend, at, kind, None, params).path == "cpu"
    # the threshold is what pool runs by: below it the kernel is never called
    calls = []
    real = kernels.fused_pool

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "fused_pool", counting)
        gp.pool(below, "gem", backend=backend)
        assert calls == ([] if backend == "auto" else [1])
        gp.pool(at, "gem", backend=backend)
        assert len(calls) == (1 if backend == "auto" else 2)


def test_packed_sides_of_the_size_threshold():
    x = torch.randn(LIMIT // 64, 64)
    assert dispatch.plan_packed("auto", x, "max").path == "cpu"
    assert dispatch.plan_packed("auto", x[1:], "max") is dispatch.SMALL
    assert dispatch.plan_packed("fused", x[1:], "max").path == "cpu"


def test_modes():
    x = _big()
    assert dispatch.plan("auto", x, "gem").mode == "inference"
    assert dispatch.plan("auto", _big(grad=True), "gem").mode == "grad"
    with torch.no_grad():
        assert dispatch.plan("auto", _big(grad=True), "gem").mode == "inference"
    p = torch.tensor(3.0, requires_grad=True)
    assert dispatch.plan("auto", x, "gem", None, {"p": p}).mode == "grad"
    w = torch.rand(4, 16, 16, requires_grad=True)
    assert dispatch.plan("fused", x, "attention", None, {"weights": w}).mode == "grad"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.compiler, "is_compiling", lambda: True)
        assert dispatch.plan("auto", x, "gem") == ("cpu", dispatch.plan("auto", x, "gem").reason,
                                                   "graph")


def test_torch_and_unknown_backends():
    x = _big()
    assert dispatch.plan("torch", x, "gem") is dispatch.TORCH
    assert dispatch.plan_packed("torch", x.reshape(-1, 64), "gem") is dispatch.TORCH
    for fn, args in ((dispatch.plan, (x, "gem")), (dispatch.plan_packed, (x[0, 0], "gem"))):
        with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'fused', 'torch'\)"):
            fn("cuda", *args)


@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_a_tracer_records_the_composition(backend):
    seen = []

    def fn(t):
        seen.append(dispatch.plan(backend, t, "gem"))
        seen.append(dispatch.plan_packed(backend, t.reshape(-1, 64), "gem"))
        return t.sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(fn, _big(), check_trace=False)
    assert seen == [dispatch.DEPLOY, dispatch.DEPLOY]


@pytest.mark.parametrize("kind", ["first", "last"])
def test_a_kind_without_a_grid_kernel_composes_under_auto_and_is_refused_under_fused(kind):
    got = dispatch.plan("auto", _big(), kind)
    assert got.path == "compose" and "has no CPU kernel" in got.reason
    assert dispatch.plan("auto", _cuda(_big()), kind).path == "compose"
    with pytest.raises(ValueError, match="has no CPU kernel; use backend='auto'"):
        dispatch.plan("fused", _big(), kind)
    # the packed kernel serves them (their registry entry names it)
    assert dispatch.plan_packed("auto", _big().reshape(-1, 64), kind).path == "cpu"


def test_a_kind_registered_without_kernels_is_refused_under_fused():
    import globalpool as gp

    gp.register_kind("absmax_d", lambda x, mask: x.abs().amax(-1))
    try:
        assert dispatch.plan("auto", _big(), "absmax_d").path == "compose"
        with pytest.raises(ValueError, match="'absmax_d' has no kernel"):
            dispatch.plan("fused", _big(), "absmax_d")
        with pytest.raises(ValueError, match="'absmax_d' has no kernel"):
            dispatch.plan_packed("fused", _big().reshape(-1, 64), "absmax_d")
    finally:
        gp.unregister_kind("absmax_d")


def test_kernel_support_is_opt_in_from_the_registry(monkeypatch):
    """A kind is served by the kernel families its registry entry names, and by no other: no
    list of kinds elsewhere decides it (a kind registered without kernels never reaches one)."""
    from globalpool import registry

    def without_kernels(kind):
        s = spec(kind)
        return dataclasses.replace(s, kernels=frozenset()) if kind == "gem" else s

    monkeypatch.setattr(registry, "spec", without_kernels)
    monkeypatch.setattr(kernels, "spec", without_kernels)
    x = _big()
    assert dispatch.plan("auto", x, "gem").path == "compose"
    assert dispatch.plan_packed("auto", x.reshape(-1, 64), "gem").path == "compose"
    with pytest.raises(ValueError, match="'gem' has no kernel"):
        dispatch.plan("fused", x, "gem")
    assert not kernels.supports(x, "gem") and kernels.supports(x, "lse")
    calls = []
    monkeypatch.setattr(kernels, "fused_pool", lambda *a, **k: calls.append(1))
    y = gp.pool(x, "gem")
    assert calls == [] and torch.allclose(y, gp.pool(x, "gem", backend="torch"))


def _refused(match, *call):
    with pytest.raises(ValueError, match=f"backend='fused' .*{match}.*backend='auto'.*'torch'"):
        call[0](*call[1:])


def test_no_kernel_reasons(monkeypatch):
    x = _big()
    cases = [
        (x.to(torch.int32), "gem", {}, r"dtype torch.int32 has no kernel"),
        (x, "gem", {"p": torch.full((64,), 3.0)}, r"a per-channel p \(shape \(64,\)\)"),
        (x, "lse", {"r": torch.full((64,), 2.0)}, r"a per-channel r \(shape \(64,\)\)"),
        (_cuda(x), "sum", {}, r"kind 'sum' has no CUDA kernel"),
        (x.to("meta"), "gem", {}, r"device meta has no kernel"),
    ]
    for t, kind, params, reason in cases:
        got = dispatch.plan("auto", t, kind, None, params)
        assert got.path == "compose" and __import__("re").search(reason, got.reason), got
        _refused(reason, dispatch.plan, "fused", t, kind, None, params)
    _refused(r"the packed kernel runs on the CPU", dispatch.plan_packed, "fused",
             _cuda(x.reshape(-1, 64)), "gem")
    monkeypatch.setattr(kernels, "_HAS_NUMBA", False)
    assert "numba is not installed" in dispatch.plan("auto", x, "gem").reason
    _refused("numba is not installed", dispatch.plan, "fused", x, "gem")
    _refused("numba is not installed", dispatch.plan_packed, "fused", x.reshape(-1, 64), "gem")
    monkeypatch.setattr(kernels, "_HAS_TRITON", False)
    _refused("triton is not installed", dispatch.plan, "fused", _cuda(x), "gem")


def test_autograd_mode_reasons():
    x = _big()
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        assert dispatch.plan("auto", dual, "gem").reason == dispatch.FORWARD_AD
        _refused("forward-mode AD", dispatch.plan, "fused", dual, "gem")
        assert dispatch.plan_packed("auto", dual.reshape(-1, 64), "gem").reason == \
            dispatch.FORWARD_AD
    seen = []
    torch.func.vmap(lambda t: seen.append(dispatch.plan("auto", t, "gem")) or t.sum())(
        torch.stack([x, x]))
    torch.func.grad(lambda t: seen.append(dispatch.plan("auto", t, "max")) or t.sum())(x)
    assert [s.reason for s in seen] == [dispatch.FUNC_TRANSFORM] * 2
    mask = torch.ones(4, 16, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="torch.func transform"):  # a wrapped mask counts too
        torch.func.vmap(lambda m: dispatch.plan("fused", x, "avg", m))(torch.stack([mask, mask]))


def test_graph_reasons(monkeypatch):
    """Inside torch.compile: a tensor eps / r that needs a gradient has no kernel gradient
    there; the packed kernel would break the graph (auto composes, fused runs it)."""
    x = _big()
    r = torch.tensor(2.0, requires_grad=True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dispatch.plan("auto", x, "lse", None, {"r": r}).reason == dispatch.GRAPH_PARAM_GRAD
    _refused("no gradient for a tensor eps or r", dispatch.plan, "fused", x, "lse", None,
             {"r": r})
    assert dispatch.plan("auto", x, "lse", None, {"r": r.detach()}).mode == "graph"
    assert dispatch.plan_packed("auto", x.reshape(-1, 64), "gem") is dispatch.PACKED_IN_GRAPH
    assert dispatch.plan_packed("fused", x.reshape(-1, 64), "gem").path == "cpu"


def test_native_mean_reason():
    x = _big()
    assert dispatch.plan("auto", x, "avg") is dispatch.NATIVE_MEAN
    assert dispatch.plan("auto", x, "sum") is dispatch.NATIVE_MEAN
    stored_last = x.contiguous(memory_format=torch.channels_last)
    assert dispatch.plan("auto", stored_last, "avg").path == "cpu"
    assert dispatch.plan("auto", _big(grad=True), "avg").path == "cpu"
    assert dispatch.plan("fused", x, "avg").path == "cpu"


def test_cuda_auto_composes_until_verified_and_fused_warns_once(monkeypatch):
    """The Triton kernels have never run on a GPU: auto keeps the composition on CUDA; fused runs
    them with one warning per process."""
    x = _cuda(_big())
    assert not kernel_plan.CUDA_VERIFIED
    assert dispatch.plan("auto", x, "gem") is dispatch.CUDA_UNVERIFIED
    assert dispatch.plan("auto", x, "max", None, {}) is dispatch.CUDA_UNVERIFIED
    y = gp.pool(x, "gem")  # auto on "CUDA": the composition, never the kernels
    assert torch.allclose(y, gp.pool(x.as_subclass(torch.Tensor), "gem", backend="torch"))
    monkeypatch.setattr(kernel_plan, "_cuda_warned", False)
    with pytest.warns(UserWarning, match="not yet been verified on GPU hardware") as record:
        first = dispatch.plan("fused", x, "gem")
        second = dispatch.plan("fused", x, "max")
    assert len(record) == 1
    assert first.path == second.path == "cuda"
    # inside torch.compile the plan cannot warn (a traced warning breaks fullgraph): the
    # kernels' entry does, untraced, with the same one flag
    monkeypatch.setattr(kernel_plan, "_cuda_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.compiler, "is_compiling", lambda: True)
            assert dispatch.plan("fused", x, "gem").mode == "graph"
    from globalpool.kernels import ops

    with pytest.warns(UserWarning, match="not yet been verified") as record:
        ops.backend_for(x)
        ops.backend_for(x)
    assert len(record) == 1
    monkeypatch.setattr(kernel_plan, "CUDA_VERIFIED", True)
    assert dispatch.plan("auto", x, "gem").path == "cuda"


def test_packed_does_not_import_functional():
    """No import circle: packed.py reaches neither functional nor its threshold."""
    src = Path(__file__).resolve().parents[1] / "src" / "globalpool"
    for name in ("packed.py", "dispatch.py"):
        tree = ast.parse((src / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "globalpool.functional" not in imported, name


# --------------------------------------------------------------------------------------------
# regressions: the fused paths against the composition


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tuple_sum_is_an_exact_float32_sum(dtype, masked):
    """A tuple holding sum took the sum from the half-rounded average times the count on the
    fused path (off by up to an ulp and more); it is now the float32 sum, rounded once."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(4, 96, 9, 37, generator=gen) * 3).to(dtype)  # 333 positions: not 2^k
    mask = torch.rand(4, 9, 37, generator=gen) > 0.3 if masked else None
    y = gp.pool(x, ("avg", "sum", "avgmax"), mask=mask, backend="fused")
    real = torch.ones(4, 9, 37, dtype=torch.bool) if mask is None else mask
    exact = torch.where(real[:, None], x.float(), 0.0).sum((2, 3))
    c = x.shape[1]
    assert torch.equal(y[:, c:2 * c], exact.to(dtype))
    assert torch.equal(y, gp.pool(x, ("avg", "sum", "avgmax"), mask=mask, backend="torch"))


@pytest.mark.parametrize("scale", [1e5, 1e-8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_attention_keeps_float32_weights(dtype, scale):
    """fused attention cast float32 weights to float16 for a float16 x: NaN at weights of 1e5
    (their sum overflowed), 0 at 1e-8 (they underflowed). The kernel reads them in float32."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 8, 64, 64, generator=gen).to(dtype)
    w = (torch.rand(2, 64, 64, generator=gen) * scale).requires_grad_()
    xg = x.clone().requires_grad_()
    y = gp.pool(xg, "attention", weights=w, backend="fused")
    wt = w.detach().clone().requires_grad_()
    xt = x.clone().requires_grad_()
    want = gp.pool(xt, "attention", weights=wt, backend="torch")
    assert torch.isfinite(y).all() and (y > 0).all()
    torch.testing.assert_close(y, want)
    g = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(g)
    want.backward(g)
    torch.testing.assert_close(xg.grad, xt.grad)
    torch.testing.assert_close(w.grad, wt.grad, rtol=2e-2, atol=1e-3 / scale)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("kind", ["max", "avgmax", "catavgmax"])
def test_nan_max_gradient_is_one_rule_on_every_path(kind, layout):
    """A row whose maximum is NaN: torch.amax's gradient (and the NumPy reference) is NaN at
    every real position of the row, whatever grad_out; the grid kernel sent the gradient to one
    position and the packed kernel gave zeros. Padded positions keep 0."""
    gen = torch.Generator().manual_seed(2)
    n, c, h, w = 3, 4, 40, 40
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    x[0, 1, 3, 4] = float("nan")  # real: row (0, 1) has a NaN maximum
    x[1, 2, 0, 0] = float("nan")  # padded below: row (1, 2) is untouched
    x[2, 3, 5, 5] = float("inf")  # avgmax: +inf and -inf in a row give a NaN average, not max
    x[2, 3, 6, 6] = -float("inf")
    mask = torch.ones(n, h, w, dtype=torch.bool)
    mask[1, 0, 0] = False
    mask[0, 0, :] = False
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous()
    g = torch.randn(n, gp.output_width(kind, c), generator=gen, dtype=torch.float64)
    g[0] = 0.0  # the rule holds whatever the incoming gradient

    def grad(backend, m):
        xg = x.clone().requires_grad_()
        gp.pool(xg, kind, layout=layout, mask=m, backend=backend).backward(g)
        return xg.grad

    for m in (None, mask):
        want = grad("torch", m)
        with np.errstate(invalid="ignore"):  # the reference's 0 / 0 at a NaN maximum
            ref = reference.pool_backward(x.numpy(), g.numpy(), kind, layout=layout,
                                          mask=None if m is None else m.numpy())["x"]
        assert torch.equal(torch.isnan(want), torch.from_numpy(np.isnan(ref)))
        got = grad("fused", m)
        assert torch.equal(torch.isnan(got), torch.isnan(want)), (m is None)
        torch.testing.assert_close(got.nan_to_num(7.0), want.nan_to_num(7.0))
    # packed: the sequences of the masked grid input, channels last
    xl = x if layout == "channels_last" else x.movedim(1, -1)
    seqs = [xl[i][mask[i]] for i in range(n)]
    xp = torch.cat(seqs)
    cu = torch.tensor([0, *np.cumsum([len(s) for s in seqs])])
    grads = []
    for backend in ("torch", "fused"):
        xg = xp.clone().requires_grad_()
        gp.pool_packed(xg, cu, kind, backend=backend).backward(g)
        grads.append(xg.grad)
    assert torch.isnan(grads[0]).any()
    assert torch.equal(torch.isnan(grads[1]), torch.isnan(grads[0]))
    torch.testing.assert_close(grads[1].nan_to_num(7.0), grads[0].nan_to_num(7.0))


@pytest.mark.parametrize("kind", ["avg", "max", "catavgmax", "gem", "lse", "attention"])
def test_activation_checkpointing_on_the_fused_path(kind):
    """checkpoint(use_reentrant=False) unpacks each saved tensor once: the fused backward read
    ctx.saved_tensors several times and crashed."""
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(4, 16, 32, 32, generator=gen, dtype=torch.float64) + 0.1
    x[0, 0, :2, :2] = 2.0  # a tied maximum
    w = torch.rand(4, 32, 32, generator=gen, dtype=torch.float64)
    kw = {"weights": w} if kind == "attention" else {}
    xp = x.movedim(1, -1).reshape(-1, 16)
    cu = torch.tensor([0, 1000, 1000, 4096])
    kwp = {"weights": w.reshape(-1)} if kind == "attention" else {}
    for run, inp in (
        (lambda t, b: gp.pool(t.exp().log(), kind, backend=b, **kw), x),
        (lambda t, b: gp.pool_packed(t.exp().log(), cu, kind, backend=b, **kwp), xp),
    ):
        grads = []
        for backend, ckpt in (("fused", True), ("fused", False), ("torch", False)):
            xg = inp.clone().requires_grad_()
            y = checkpoint(run, xg, backend, use_reentrant=False) if ckpt else run(xg, backend)
            y.pow(2).sum().backward()
            grads.append(xg.grad)
        torch.testing.assert_close(grads[0], grads[1])
        torch.testing.assert_close(grads[0], grads[2])


@pytest.mark.parametrize("kind", ["avg", "sum", "max", "avgmax", "catavgmax", "gem", "lse",
                                  "attention"])
def test_batched_gradients_on_the_fused_path(kind):
    """is_grads_batched and vectorized jacobians give the fused backward a batch of grad_out
    (a batched tensor with no memory): it is served through torch ops, as the composition is."""
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(4, 16, 32, 32, generator=gen, dtype=torch.float64) + 0.1
    mask = torch.rand(4, 32, 32, generator=gen) > 0.3
    w = torch.rand(4, 32, 32, generator=gen, dtype=torch.float64)
    kw = {"weights": w} if kind == "attention" else {}
    for layout, xin in ((CF, x), ("channels_last", x.movedim(1, -1).contiguous())):
        xg = xin.clone().requires_grad_()
        y = gp.pool(xg, kind, layout=layout, mask=mask, backend="fused", **kw)
        g = torch.randn(3, *y.shape, generator=gen, dtype=torch.float64)
        (got,) = torch.autograd.grad(y, xg, g, is_grads_batched=True)
        yt = gp.pool(xg, kind, layout=layout, mask=mask, backend="torch", **kw)
        want = torch.stack([torch.autograd.grad(yt, xg, gi, retain_graph=True)[0] for gi in g])
        torch.testing.assert_close(got, want)
    small = x[:2, :3, :4, :4]
    kws = {"weights": w[:2, :4, :4]} if kind == "attention" else {}
    jac = torch.autograd.functional.jacobian(
        lambda t: gp.pool(t, kind, backend="fused", **kws), small, vectorize=True)
    want = torch.autograd.functional.jacobian(
        lambda t: gp.pool(t, kind, backend="torch", **kws), small)
    torch.testing.assert_close(jac, want)
    xp = x.movedim(1, -1).reshape(-1, 16).clone().requires_grad_()
    cu = torch.tensor([0, 1000, 1000, 4096])
    kwp = {"weights": w.reshape(-1)} if kind == "attention" else {}
    y = gp.pool_packed(xp, cu, kind, backend="fused", **kwp)
    g = torch.randn(3, *y.shape, generator=gen, dtype=torch.float64)
    (got,) = torch.autograd.grad(y, xp, g, is_grads_batched=True)
    yt = gp.pool_packed(xp, cu, kind, backend="torch", **kwp)
    want = torch.stack([torch.autograd.grad(yt, xp, gi, retain_graph=True)[0] for gi in g])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["avg", "max", "gem", "sum"])
def test_vmap_over_x_and_mask_is_served(kind):
    """torch.func.vmap over x or the mask takes the composition on every backend but fused,
    which says why."""
    x = _big()
    mask = torch.rand(4, 16, 16) > 0.3
    want = torch.stack([gp.pool(x, kind, backend="torch"), gp.pool(2 * x, kind, backend="torch")])
    got = torch.func.vmap(lambda t: gp.pool(t, kind))(torch.stack([x, 2 * x]))
    torch.testing.assert_close(got, want)
    got = torch.func.vmap(lambda m: gp.pool(x, kind, mask=m))(torch.stack([mask, ~mask]))
    want = torch.stack([gp.pool(x, kind, mask=m, backend="torch") for m in (mask, ~mask)])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="torch.func transform.*backend='auto'"):
        torch.func.vmap(lambda t: gp.pool(t, kind, backend="fused"))(torch.stack([x, x]))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("kind", ["avg", "max", "sum", "last", ("avg", "first")])
def test_non_contiguous_nested_tensor_pools_its_own_tokens(kind, backend):
    """torch.nested.narrow gives a jagged tensor whose values() hold every row, real or not:
    lengths() was ignored (padding pooled) or the call failed about cu_seqlens."""
    gen = torch.Generator().manual_seed(5)
    vals = torch.randn(4, 10, 8, generator=gen, dtype=torch.float64)
    starts, lengths = torch.tensor([1, 0, 2, 0]), torch.tensor([3, 5, 7, 1])
    zeros = torch.zeros(4, dtype=torch.int64)
    # the last sequence ending at the last row: offsets end at T, and the padding was pooled
    for s, ls in ((zeros, torch.tensor([3, 5, 7, 10])), (zeros, lengths), (starts, lengths)):
        nt = torch.nested.narrow(vals, 1, s, ls, layout=torch.jagged)
        y = gp.pool(nt, kind, layout="channels_last", backend=backend)
        want = torch.cat([
            gp.pool(vals[i, int(s[i]):int(s[i] + n)][None], kind, layout="channels_last",
                    backend="torch")
            for i, n in enumerate(ls)
        ])
        torch.testing.assert_close(y, want)
    w = torch.rand(4, 10, generator=gen, dtype=torch.float64)
    nt = torch.nested.narrow(vals, 1, starts, lengths, layout=torch.jagged)
    wn = torch.nested.narrow(w, 1, starts, lengths, layout=torch.jagged)
    y = gp.pool(nt, "attention", layout="channels_last", backend=backend, weights=wn)
    want = torch.cat([
        gp.pool(vals[i, int(starts[i]):int(starts[i] + n)][None], "attention",
                layout="channels_last", weights=w[i, int(starts[i]):int(starts[i] + n)][None])
        for i, n in enumerate(lengths)
    ])
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4)])
def test_tuple_with_sum_on_empty_input(shape, masked):
    """N = 0 or C = 0 with a tuple holding sum on the fused path raised a raw IndexError."""
    x = torch.randn(shape)
    mask = torch.ones(shape[0], 4, 4, dtype=torch.bool) if masked else None
    kinds = ("avg", "sum")
    width = gp.output_width(kinds, shape[1])
    for backend in ("fused", "auto", "torch"):
        y = gp.pool(x, kinds, mask=mask, backend=backend)
        assert y.shape == (shape[0], width)
    layer = gp.GlobalPool(kinds, backend="fused")
    assert layer(x).shape == (shape[0], width)


def test_kernels_that_cannot_load_fall_back_to_the_composition_with_one_warning():
    """A numba whose internals moved: the CPU kernels' module fails to import. The library
    warns once and every call runs the composition (same numbers)."""
    code = (
        "import sys, warnings, torch\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'globalpool.kernels.cpu_numba':\n"
        "            raise ImportError('numba internals moved')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import globalpool as gp\n"
        "x = torch.rand(4, 64, 32, 32) + 0.1\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    a = gp.pool(x, 'gem')\n"
        "    b = gp.pool(x, 'max')\n"
        "loads = [w for w in caught if 'could not load' in str(w.message)]\n"
        "assert len(loads) == 1, [str(w.message) for w in caught]\n"
        "assert 'numba internals moved' in str(loads[0].message)\n"
        "torch.testing.assert_close(a, gp.pool(x, 'gem', backend='torch'))\n"
        "torch.testing.assert_close(b, x.amax((2, 3)))\n"
        "try:\n"
        "    gp.pool(x, 'gem', backend='fused')\n"
        "except ValueError as e:\n"
        "    assert 'could not load' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('fused ran without kernels')\n"
    )
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
