"""The Triton backend (``globalpool.kernels.cuda_triton``) against the NumPy reference.

Without a GPU the kernels run under Triton's CPU interpreter: each test sets
``TRITON_INTERPRET=1`` through ``monkeypatch`` (undone after the test) and the backend loads a
separate interpreted copy of its kernels for CPU tensors, so nothing leaks into other test
modules. The ``cuda`` tests run the compiled kernels on larger shapes when a GPU is present.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from globalpool.kernels import cuda_triton as ct  # noqa: E402
from globalpool.reference import pool_backward, pool_forward  # noqa: E402

KINDS = tuple(ct.KIND_CODES)
MAX_KINDS = ("max", "avgmax", "catavgmax")
LAYOUTS = (False, True)  # channels_last
TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}
PARAMS = {"p": 2.5, "eps": 1e-6, "r": 1.7}

pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # NumPy on the interpreter's idle lanes
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION"),  # triton 3.9 notice
]


@pytest.fixture
def interp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make(
    kind: str,
    shape: tuple[int, int, int],
    channels_last: bool,
    dtype: torch.dtype = torch.float32,
    masked: bool = True,
    seed: int = 0,
    device: str = "cpu",
    integer: bool = False,
):
    """x (N, C, L) or (N, L, C), mask (N, L) with one all-padded sample and NaN at padded
    positions of x and weights, weights (N, L) >= 0."""
    gen = torch.Generator().manual_seed(seed)
    n, c, length = shape
    if integer:
        x = torch.randint(0, 3, (n, c, length), generator=gen).double()
    else:
        x = torch.randn(n, c, length, generator=gen, dtype=torch.float64)
    w = torch.rand(n, length, generator=gen, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(n, length, generator=gen) < 0.7
        mask[0, 0] = True
        if n > 1:
            mask[1] = False
        x = x.masked_fill(~mask[:, None, :], float("nan"))
        w = w.masked_fill(~mask, float("nan"))
    if channels_last:
        x = x.transpose(1, 2)
    x = x.to(dtype).contiguous().to(device)
    w = w.to(dtype).to(device)
    if mask is not None:
        mask = mask.to(device)
    return x, mask, w


def reference(kind, x, mask, w, g, channels_last, **params):
    layout = "channels_last" if channels_last else "channels_first"
    kw = dict(params, layout=layout, mask=None if mask is None else mask.cpu().numpy())
    if kind == "attention":
        kw["weights"] = w.double().cpu().numpy()
    xn = x.double().cpu().numpy()
    out = pool_forward(xn, kind, **kw)
    grads = pool_backward(xn, g.double().cpu().numpy(), kind, **kw)
    return out, grads


def close(actual: torch.Tensor, expected: np.ndarray, tol: float, what: str) -> None:
    a = actual.double().cpu().numpy()
    scale = max(1.0, float(np.nanmax(np.abs(expected))) if expected.size else 1.0)
    np.testing.assert_allclose(a, expected, rtol=tol, atol=tol * scale, err_msg=what)


def check(kind, x, mask, w, channels_last, split=None, block_l=None, **params):
    """Run forward and backward, compare with the reference, check the padding guarantees."""
    params = {**PARAMS, **params}
    tol = TOL[x.dtype]
    args = (channels_last, kind, mask, params["p"], params["eps"], params["r"], w)
    out, aux = ct._forward(x, *args, split=split, block_l=block_l)
    assert out.dtype == x.dtype
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    g = g.to(x.device)
    gx, gp, gw = ct._backward(g, x, out, aux, *args, split=split, block_l=block_l)
    pf = {k: float(v) for k, v in params.items()}
    ref_out, ref = reference(kind, x, mask, w, g, channels_last, **pf)
    close(out, ref_out, tol, f"{kind} forward")
    close(gx, ref["x"], tol, f"{kind} grad x")
    assert gx.dtype == x.dtype and gx.shape == x.shape
    if mask is not None:
        pad = ~mask[:, :, None] if channels_last else ~mask[:, None, :]
        assert torch.all(gx.masked_select(pad.expand_as(gx)) == 0)
    if kind in MAX_KINDS:
        channels = x.shape[2] if channels_last else x.shape[1]
        assert aux.dtype == torch.int32 and aux.shape == (x.shape[0], channels, 2)
    elif kind == "lse":  # each row's maximum and log-mean, for the backward
        channels = x.shape[2] if channels_last else x.shape[1]
        assert aux.dtype == ct._acc_dtype(x) and aux.shape == (x.shape[0], channels, 2)
    else:
        assert aux.numel() == 0 and aux.dtype == torch.float32
    if kind == "gem":
        assert gp.dtype == torch.float32 and gp.dim() == 0
        np.testing.assert_allclose(float(gp), ref["p"], rtol=max(tol, 1e-6) * 10, atol=tol)
    else:
        assert gp is None
    if kind == "attention":
        assert gw.dtype == x.dtype and gw.shape == w.shape
        close(gw, ref["weights"], tol, "grad weights")
        if mask is not None:
            assert torch.all(gw[~mask] == 0)
    else:
        assert gw is None
    return out, aux


# --------------------------------------------------------------------------------------------
# interpreter


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["cf", "cl"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("dtype", "masked"),
    [
        (torch.float32, False),
        (torch.float32, True),
        (torch.float64, True),
        (torch.float16, True),
        (torch.bfloat16, True),
    ],
    ids=["f32", "f32-mask", "f64-mask", "f16-mask", "bf16-mask"],
)
def test_matches_reference(kind, channels_last, dtype, masked):
    x, mask, w = make(kind, (3, 5, 37), channels_last, dtype, masked)
    check(kind, x, mask, w, channels_last)


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["cf", "cl"])
@pytest.mark.parametrize("kind", KINDS)
def test_split_and_multi_tile(kind, channels_last):
    """L split into ranges (two-stage forward, split backward; C split for the attention
    backward) and several tiles per range."""
    x, mask, w = make(kind, (2, 3, 700), channels_last, seed=2)
    check(kind, x, mask, w, channels_last, split=3, block_l=64)
    check(kind, x, mask, w, channels_last, split=None, block_l=64)
    check(kind, x, mask, w, channels_last, split=5)


def test_config_honours_forced_split_and_fills_the_device():
    cfg = ct._config(2, 3, 700, False, 4, 1, split=3, block_l=64)
    assert (cfg.split, cfg.l_per, cfg.bl) == (3, 256, 64)
    big = ct._config(8, 64, 224 * 224, False, 4, 132)  # few rows, long L: split
    assert big.programs * big.split >= 4 * 132 and big.split > 1
    for cl in (False, True):  # ResNet head, many rows or channel blocks: no split
        assert ct._config(32, 2048, 49, cl, 4, 132).split == 1
    tokens = ct._config(32, 768, 196, True, 4, 132)  # 192 programs: split
    assert tokens.split > 1


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("split", [None, 4])
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["cf", "cl"])
@pytest.mark.parametrize("kind", MAX_KINDS)
def test_max_ties_and_aux(kind, channels_last, split):
    x, mask, w = make(kind, (3, 4, 40), channels_last, integer=True, seed=3)
    if channels_last:
        x[0, :, 1] = 5.0  # one channel entirely tied
    else:
        x[0, 1, :] = 5.0
    _, aux = check(kind, x, mask, w, channels_last, split=split)
    xf = x.double().transpose(1, 2) if channels_last else x.double()
    real = mask[:, None, :].expand_as(xf)
    key = torch.where(real, xf, -torch.inf)
    top = key.amax(2, keepdim=True)
    hits = real & (key == top)
    ties = hits.sum(2)
    first = torch.where(hits, torch.arange(xf.shape[2]), xf.shape[2]).amin(2)
    first = torch.where(ties > 0, first, -1)
    assert torch.equal(aux[..., 1], ties.int())
    assert torch.equal(aux[..., 0], first.int())
    assert int(aux[0, 1, 1]) == int(mask[0].sum())


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize(
    "p",
    [1.0, 2.0, 3.0, 4.0, 2.5, 1.3, torch.tensor(3.0), torch.tensor(2.5, dtype=torch.float64)],
    ids=str,
)
def test_gem_exponents(p):
    """Integer exponents use multiplications, others exp2/log2; a 0-dim tensor p on x's device
    is read by the kernels (no host sync)."""
    for channels_last, split in ((False, None), (True, 2)):
        x, mask, w = make("gem", (2, 4, 30), channels_last, seed=4)
        x = x.abs() + 0.1  # away from the clamp
        check("gem", x, mask, w, channels_last, p=p, split=split)


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["cf", "cl"])
def test_lse_is_stable_for_large_inputs(channels_last):
    x, mask, w = make("lse", (2, 3, 50), channels_last, seed=5)
    x = x * 200.0
    check("lse", x, mask, w, channels_last, r=3.0, split=2)


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["cf", "cl"])
def test_attention_weight_grad_in_bfloat16_avoids_the_rounded_output(channels_last):
    """grad_w = sum_c g_c (x_cl - out_c) / S loses its precision when taken from the output
    rounded to bfloat16 (2**-9 of |out|, 0.25 near 100): the kernel sums g x and the wrapper
    subtracts the weighted mean instead."""
    gen = torch.Generator().manual_seed(0)
    x = (100.0 + 4 * torch.rand(3, 5, 4, generator=gen)).to(torch.bfloat16)
    w = torch.rand(3, 4, generator=gen).to(torch.bfloat16)
    g = torch.randn(3, 5, generator=gen).to(torch.bfloat16)
    xk = x.transpose(1, 2).contiguous() if channels_last else x
    out, aux = ct.forward(xk, channels_last, "attention", None, weights=w)
    gw = ct.backward(g, xk, out, aux, channels_last, "attention", None, weights=w)[2]
    wd = w.double().requires_grad_(True)
    yd = (x.double() * wd[:, None, :]).sum(-1) / wd.sum(-1, keepdim=True)
    (expected,) = torch.autograd.grad(yd, wd, g.double())
    torch.testing.assert_close(gw.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("scale", [1e5, 1e-8])
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["cf", "cl"])
def test_attention_reads_float32_weights_of_a_half_x(channels_last, scale):
    """fused_pool hands the kernel float32 weights for a float16 x (the composition's
    precision): rounded to float16 their sum overflowed at 1e5 and they vanished at 1e-8."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 40, generator=gen).to(torch.float16)
    w = torch.rand(2, 40, generator=gen) * scale
    g = torch.randn(2, 3, generator=gen)
    xk = x.transpose(1, 2).contiguous() if channels_last else x
    out, aux = ct.forward(xk, channels_last, "attention", None, weights=w)
    wd = w.double().requires_grad_(True)
    yd = (x.double() * wd[:, None, :]).sum(-1) / wd.sum(-1, keepdim=True)
    torch.testing.assert_close(out, yd.detach().to(torch.float16))
    gw = ct.backward(g, xk, out, aux, channels_last, "attention", None, weights=w)[2]
    (expected,) = torch.autograd.grad(yd, wd, g.double())
    assert gw.dtype == torch.float32
    torch.testing.assert_close(gw.double(), expected, rtol=2e-2, atol=1e-3 / scale)


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["cf", "cl"])
def test_lse_grad_in_bfloat16_avoids_the_rounded_output(channels_last):
    """d lse / dx = exp(r (x - out)) / L: from the output rounded to bfloat16 near 100 (a step of
    0.5) the factor was off by up to exp(0.25 r); the backward takes lse again in float32."""
    gen = torch.Generator().manual_seed(0)
    x = (100.0 + 4 * torch.rand(3, 5, 40, generator=gen)).to(torch.bfloat16)
    g = torch.randn(3, 5, generator=gen).to(torch.bfloat16)
    xk = x.transpose(1, 2).contiguous() if channels_last else x
    out, aux = ct.forward(xk, channels_last, "lse", None, r=2.0)
    gx = ct.backward(g, xk, out, aux, channels_last, "lse", None, r=2.0)[0]
    xd = x.double().requires_grad_(True)
    yd = (torch.logsumexp(2.0 * xd, -1) - np.log(40)) / 2.0
    (expected,) = torch.autograd.grad(yd, xd, g.double())
    expected = expected.transpose(1, 2) if channels_last else expected
    torch.testing.assert_close(gx.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("split", [None, 3])
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["cf", "cl"])
@pytest.mark.parametrize(("low", "high", "p"), [(1.0, 101.0, 20.0), (1e-5, 1e-3, 20.0),
                                                (1e28, 1e30, 64.0), (1.0, 3.0, 7.5)])
def test_gem_forward_scaled_by_the_running_max(low, high, p, channels_last, split):
    """p = 20 on x in [1, 101] gave inf, on x < 1e-3 gave 0: the sum of clamp(x)^p is now taken
    relative to the running maximum (and each split's to its own)."""
    gen = torch.Generator().manual_seed(0)
    x = (low + (high - low) * torch.rand(2, 3, 50, generator=gen, dtype=torch.float64)).float()
    want = pool_forward(x.double().numpy(), "gem", p=p, eps=low * 1e-3)
    xk = x.transpose(1, 2).contiguous() if channels_last else x
    out = ct._forward(xk, channels_last, "gem", None, p, low * 1e-3, None, None, split=split,
                      block_l=16)[0]
    np.testing.assert_allclose(out.double().numpy(), want, rtol=2e-5)


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["cf", "cl"])
def test_gem_backward_scaled_by_the_output(channels_last):
    """grad x and grad p at p = 30 on x in [1, 101]: from y^(1-p) x^(p-1) the first factor
    underflowed float32 (85^-29) and the gradient was 0; the backward now takes (x / y)^(p-1)."""
    gen = torch.Generator().manual_seed(0)
    x = (1.0 + 100 * torch.rand(2, 3, 40, generator=gen, dtype=torch.float64))
    g = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    want = pool_backward(x.numpy(), g.numpy(), "gem", p=30.0)
    y = torch.from_numpy(pool_forward(x.numpy(), "gem", p=30.0)).float()
    xk = (x.transpose(1, 2).contiguous() if channels_last else x).float()
    gx, gp, _ = ct.backward(g.float(), xk, y, None, channels_last, "gem", None, p=30.0)
    gx = gx.transpose(1, 2) if channels_last else gx
    torch.testing.assert_close(gx.double(), torch.from_numpy(want["x"]), rtol=1e-4, atol=1e-6)
    assert abs(float(gp) - want["p"]) <= 1e-4 * abs(want["p"])


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["cf", "cl"])
def test_lse_grad_at_large_r_x_and_inf_rows(channels_last):
    """x ~ 1e4, r = 50 in float32: exp(r (x - out)) from the rounded output (a step of 1e-3,
    x 50) was off by 2.5%; the backward now reads the row's maximum and log-mean. A row holding
    +inf pools to +inf (it was NaN: inf - inf)."""
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + torch.randn(2, 3, 40, generator=gen, dtype=torch.float64)).float().double()
    g = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    want = pool_backward(x.numpy(), g.numpy(), "lse", r=50.0)["x"]
    xk = (x.transpose(1, 2).contiguous() if channels_last else x).float()
    out, aux = ct.forward(xk, channels_last, "lse", None, r=50.0)
    gx = ct.backward(g.float(), xk, out, aux, channels_last, "lse", None, r=50.0)[0]
    gx = gx.transpose(1, 2) if channels_last else gx
    torch.testing.assert_close(gx.double(), torch.from_numpy(want), rtol=1e-4, atol=1e-6)
    xi = torch.randn(2, 3, 40, generator=gen)
    xi[0, 1, 7] = float("inf")
    xik = xi.transpose(1, 2).contiguous() if channels_last else xi
    yi = ct.forward(xik, channels_last, "lse", None, r=1.0)[0]
    assert yi[0, 1] == float("inf") and torch.isfinite(yi[1]).all()


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["cf", "cl"])
def test_attention_zero_weights_pool_to_zero(channels_last):
    x, mask, w = make("attention", (3, 4, 20), channels_last, masked=False, seed=6)
    w[2] = 0.0
    out, _ = check("attention", x, mask, w, channels_last)
    assert torch.all(out[2] == 0)


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("kind", MAX_KINDS)
def test_nan_at_real_position_propagates_through_max(kind):
    x, _, _ = make(kind, (1, 2, 9), False, masked=False)
    x[0, 0, 4] = float("nan")
    out, _ = ct.forward(x, False, kind, None)
    c = x.shape[1]
    assert torch.isnan(out[0, c if kind == "catavgmax" else 0])
    assert not torch.isnan(out[0, -1])


@pytest.mark.usefixtures("interp")
def test_empty_tensors():
    x = torch.zeros(0, 3, 5)
    out, aux = ct.forward(x, False, "max", None)
    assert out.shape == (0, 3) and aux.shape == (0, 3, 2)
    x = torch.randn(2, 3, 0)
    out, _ = ct.forward(x, False, "gem", None)
    assert torch.equal(out, torch.zeros(2, 3))


@pytest.mark.usefixtures("interp")
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["cf", "cl"])
def test_backward_skips_unneeded_work(channels_last):
    """need_p / need_weights off: same grad_x, None for the skipped gradient; avg takes a
    placeholder x (an expanded scalar) and no out / aux; the max kinds need no out."""
    for kind, flag in (("gem", "need_p"), ("attention", "need_weights")):
        x, mask, w = make(kind, (2, 6, 30), channels_last, seed=7)
        out, aux = ct.forward(x, channels_last, kind, mask, 2.5, 1e-6, 1.0, w)
        g = torch.randn(out.shape)
        args = (x, out, aux, channels_last, kind, mask, 2.5, 1e-6, 1.0, w)
        full = ct.backward(g, *args)
        part = ct.backward(g, *args, **{flag: False})
        assert torch.equal(full[0], part[0]) and part[1] is None and part[2] is None
    x, mask, w = make("avg", (2, 6, 30), channels_last, seed=8)
    g = torch.randn(2, 6)
    placeholder = torch.zeros((), dtype=x.dtype).expand(x.shape)
    gx = ct.backward(g, placeholder, None, None, channels_last, "avg", mask)[0]
    out, aux = ct.forward(x, channels_last, "avg", mask)
    assert torch.equal(gx, ct.backward(g, x, out, aux, channels_last, "avg", mask)[0])
    out, aux = ct.forward(x, channels_last, "max", mask)
    gx = ct.backward(g, x, None, aux, channels_last, "max", mask)[0]
    assert torch.equal(gx, ct.backward(g, x, out, aux, channels_last, "max", mask)[0])


def test_cpu_tensor_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA tensor"):
        ct.forward(torch.randn(2, 3, 4), False, "avg", None)


@pytest.mark.usefixtures("interp")
def test_argument_errors():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="kind must be one of"):
        ct.forward(x, False, "median", None)
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        ct.forward(x, False, "avg", torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="weights must be given"):
        ct.forward(x, False, "attention", None)
    with pytest.raises(TypeError, match="dtype"):
        ct.forward(x.int(), False, "avg", None)


def test_import_does_not_need_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from globalpool.kernels import cuda_triton\n"
        "assert not cuda_triton.is_available()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# ahead-of-time compilation for sm_90: catches frontend errors the interpreter does not see
# (non-constexpr globals, loop-carried type changes, ...) without a GPU

_PTR = {"m_ptr": "*u8", "aux_ptr": "*i32", "pidx_ptr": "*i32", "pties_ptr": "*i32",
        "pnan_ptr": "*i32"}  # fmt: skip
_X_PTRS = ("x_ptr", "w_ptr", "out_ptr", "g_ptr", "gx_ptr")
_INTS = ("N", "C", "L", "L_PER", "SPLIT", "C_PER")


def _aot(fn_name: str, dtype: str, consts: dict, none: tuple[str, ...] = ()) -> None:
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton has no ASTSource / GPUTarget")
    k = ct._kernels(False)
    fn = getattr(k, fn_name)
    acc = "fp64" if dtype == "fp64" else "fp32"
    consts = dict(consts, ACC=k.tl.float64 if acc == "fp64" else k.tl.float32)
    consts.update(dict.fromkeys(none))
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in _INTS:
            sig[name] = "i32"
        elif name.endswith(("_hi", "_lo")):
            sig[name] = "fp32"
        elif name in _X_PTRS:
            sig[name] = "*" + dtype
        else:
            sig[name] = _PTR.get(name, "*" + acc)
    try:
        triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32))
    except FileNotFoundError as err:  # no ptxas bundled on this machine
        pytest.skip(f"cannot compile for sm_90 here: {err}")


_TILE_CF = {"CL": False, "BR": 32, "BL": 128, "BC": 1}
_TILE_CL = {"CL": True, "BR": 1, "BL": 32, "BC": 128}
_SPLIT_PTRS = ("pacc_ptr", "pcnt_ptr", "pmx_ptr", "pidx_ptr", "pties_ptr", "pnan_ptr")
_AOT_CASES = {
    "fwd-catavgmax-cf-mask-split-bf16": (
        "_pool_fwd", "bf16",
        dict(KIND=3, HAS_MASK=True, FINAL=False, P_PTR=False, P_INT=0, **_TILE_CF),
        ("w_ptr", "p_ptr"),
    ),
    "fwd-lse-cl-final-f32": (
        "_pool_fwd", "fp32",
        dict(KIND=5, HAS_MASK=False, FINAL=True, P_PTR=False, P_INT=0, **_TILE_CL),
        ("m_ptr", "w_ptr", "p_ptr", *_SPLIT_PTRS),
    ),
    "fwd-attention-cl-mask-final-f16": (
        "_pool_fwd", "fp16",
        dict(KIND=6, HAS_MASK=True, FINAL=True, P_PTR=False, P_INT=0, **_TILE_CL),
        ("p_ptr", *_SPLIT_PTRS),
    ),
    "fwd-gem-cf-ptr-p-split-f32": (
        "_pool_fwd", "fp32",
        dict(KIND=4, HAS_MASK=False, FINAL=False, P_PTR=True, P_INT=0, **_TILE_CF),
        ("m_ptr", "w_ptr", "pidx_ptr", "pties_ptr", "pnan_ptr"),
    ),
    "combine-max-f64": (
        "_pool_combine", "fp64", dict(KIND=1, P_PTR=False, BR=64, BS=16), ("p_ptr",),
    ),
    "combine-gem-ptr-p-f32": (
        "_pool_combine", "fp32", dict(KIND=4, P_PTR=True, BR=64, BS=16),
        ("pidx_ptr", "pties_ptr", "pnan_ptr"),
    ),
    "bwd-gem-cf-mask-f32": (
        "_pool_bwd", "fp32",
        dict(KIND=4, HAS_MASK=True, NEED_P=True, P_PTR=True, P_INT=0, **_TILE_CF), (),
    ),
    "bwd-avgmax-cl-bf16": (
        "_pool_bwd", "bf16",
        dict(KIND=2, HAS_MASK=False, NEED_P=False, P_PTR=False, P_INT=0, **_TILE_CL),
        ("m_ptr", "ps_ptr", "pt_ptr", "out_ptr", "p_ptr"),
    ),
    "bwd-avg-cf-mask-f16": (
        "_pool_bwd", "fp16",
        dict(KIND=0, HAS_MASK=True, NEED_P=False, P_PTR=False, P_INT=0, **_TILE_CF),
        ("ps_ptr", "pt_ptr", "out_ptr", "aux_ptr", "p_ptr"),
    ),
    "bwd-attention-cf-mask-f32": (
        "_attn_bwd", "fp32", dict(CL=False, HAS_MASK=True, NEED_W=True, BL=64, BC=64), (),
    ),
    "bwd-attention-cl-noweights-bf16": (
        "_attn_bwd", "bf16", dict(CL=True, HAS_MASK=False, NEED_W=False, BL=32, BC=128),
        ("m_ptr", "pgw_ptr"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_AOT_CASES))
def test_kernels_compile_for_sm90(case, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _aot(*_AOT_CASES[case])


# --------------------------------------------------------------------------------------------
# real GPU


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", LAYOUTS, ids=["cf", "cl"])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_reference(kind, channels_last, dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for shape, masked in (((4, 64, 196), True), ((8, 256, 49), False), ((2, 8, 5000), True)):
        x, mask, w = make(kind, shape, channels_last, dtype, masked, device="cuda")
        check(kind, x, mask, w, channels_last)
        check(kind, x, mask, w, channels_last, split=3)
    x, mask, w = make(kind, (4, 16, 300), channels_last, dtype, True, device="cuda", integer=True)
    check(kind, x, mask, w, channels_last)
    if kind == "gem":  # p read by the kernels from a device tensor
        check(kind, x, mask, w, channels_last, split=2, p=torch.tensor(2.5, device="cuda"))
