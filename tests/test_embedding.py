"""Embedding heads: PCA whitening against a NumPy float64 reference, the head's stages (pool,
projection, BN-neck, normalisation), multi-scale extraction, export, and refused input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import globalpool as gp
from globalpool.embedding.whitening import ledoit_wolf_shrinkage

F64 = torch.float64


def correlated(n: int, d: int, seed: int = 0, dtype=F64) -> torch.Tensor:
    """``n`` samples of a ``d``-dim Gaussian with a non-trivial covariance and mean."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=F64) + 2 * torch.eye(d, dtype=F64)
    x = torch.randn(n, d, generator=g, dtype=F64) @ mix + torch.randn(d, generator=g, dtype=F64)
    return x.to(dtype)


def numpy_whitening(x: np.ndarray, k: int, shrinkage: float = 0.0) -> tuple[np.ndarray, ...]:
    """Reference: NumPy's covariance and eigh; the top ``k`` eigenpairs (descending)."""
    cov = np.cov(x, rowvar=False)
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / d * np.eye(d)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:k]
    return cov, values[order], vectors[:, order]


# ------------------------------------------------------------------------------------------------
# whitening


@pytest.mark.parametrize("dim", [None, 12, 5, 1])
def test_whitening_gives_the_identity_covariance(dim):
    x = correlated(400, 12)
    white = gp.fit_whitening(x, dim, eps=0.0, normalize=False)
    y = white(x)
    k = 12 if dim is None else dim
    assert y.shape == (400, k) and white.out_features == k and white.projection.dtype == F64
    cov = np.atleast_2d(np.cov(y.numpy(), rowvar=False))
    np.testing.assert_allclose(cov, np.eye(k), rtol=0, atol=1e-6)
    torch.testing.assert_close(y.mean(0), torch.zeros(k, dtype=F64), rtol=0, atol=1e-10)
    # the kept directions are the top-k principal directions (sign-free comparison)
    _, values, vectors = numpy_whitening(x.numpy(), k)
    want = vectors @ np.diag(1 / values) @ vectors.T
    got = (white.projection.T @ white.projection).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


def test_whitening_normalises_its_output_and_eps_damps_the_small_directions():
    x = correlated(300, 6)
    white = gp.fit_whitening(x, eps=0.0)
    raw = gp.fit_whitening(x, eps=0.0, normalize=False)
    torch.testing.assert_close(white(x), F.normalize(raw(x), dim=1))
    torch.testing.assert_close(white(x).norm(dim=1), torch.ones(300, dtype=F64))
    eps = 1e-2
    damped = gp.fit_whitening(x, eps=eps, normalize=False)
    _, values, _ = numpy_whitening(x.numpy(), 6)
    variances = torch.cov(damped(x).T).diagonal().numpy()
    np.testing.assert_allclose(variances, values / (values + eps * values[0]), rtol=1e-8)


def test_shrinkage_whitens_the_shrunk_covariance():
    x = correlated(40, 10)
    white = gp.fit_whitening(x, shrinkage=0.3, eps=0.0, normalize=False)
    cov, _, _ = numpy_whitening(x.numpy(), 10, shrinkage=0.3)
    p = white.projection.numpy()
    np.testing.assert_allclose(p @ cov @ p.T, np.eye(10), atol=1e-9)


def test_ledoit_wolf_shrinkage_matches_its_definition():
    x = correlated(15, 8, seed=3)
    c = (x - x.mean(0)).numpy()
    n, d = c.shape
    s = c.T @ c / n
    mu = np.trace(s) / d
    delta = np.sum((s - mu * np.eye(d)) ** 2) / d
    beta = sum(np.sum((np.outer(r, r) - s) ** 2) for r in c) / (n * n * d)
    assert ledoit_wolf_shrinkage(torch.from_numpy(c)) == pytest.approx(min(1, beta / delta))
    sklearn_cov = pytest.importorskip("sklearn.covariance")
    assert ledoit_wolf_shrinkage(torch.from_numpy(c)) == pytest.approx(
        sklearn_cov.ledoit_wolf_shrinkage(c, assume_centered=True)
    )


def test_fewer_samples_than_dims_needs_shrinkage_or_a_smaller_dim():
    x = correlated(8, 16)
    with pytest.raises(ValueError, match=r"features has 8 samples: whitening to dim=16 .*shrinkage"):
        gp.fit_whitening(x)
    assert gp.fit_whitening(x, dim=7).out_features == 7  # 7 directions from 8 samples
    white = gp.fit_whitening(x, shrinkage="auto")
    assert white.out_features == 16 and torch.isfinite(white(x)).all()


def test_rank_deficient_features_are_refused_naming_their_rank():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 3, generator=g, dtype=F64) @ torch.randn(3, 9, generator=g, dtype=F64)
    for features in (x, x.float()):
        with pytest.raises(ValueError, match=r"span only 3 direction\(s\) of their 9.*dim <= 3"):
            gp.fit_whitening(features)
    assert gp.fit_whitening(x, dim=3).out_features == 3
    assert gp.fit_whitening(x, shrinkage=0.1).out_features == 9
    # shrinkage given but too small: the advice is a larger one, not "shrinkage > 0"
    with pytest.raises(ValueError, match=r"dim <= 3, or a shrinkage larger than 1e-30 to"):
        gp.fit_whitening(x, shrinkage=1e-30)


@pytest.mark.parametrize("shrinkage", [0.0, 0.5, "auto"])
def test_constant_features_are_refused_without_impossible_advice(shrinkage):
    with pytest.raises(ValueError, match=r"100 copies of one descriptor .* no direction to "
                                         r"whiten, whatever dim or shrinkage") as info:
        gp.fit_whitening(torch.ones(100, 8), shrinkage=shrinkage)
    assert "dim <=" not in str(info.value)


def test_whitening_keeps_the_features_dtype_and_runs_other_dtypes():
    x = correlated(100, 4, dtype=torch.float32)
    white = gp.fit_whitening(x)
    assert white.mean.dtype == white.projection.dtype == torch.float32
    out = white(x.double())
    assert out.dtype == F64
    torch.testing.assert_close(out.float(), white(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_whitening_computes_in_float32_and_returns_half(dtype):
    """Whitening scales small directions up by 1/sqrt(their variance): a product in half
    precision would lose them. Against the same half buffers and input in float64."""
    g = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=F64))[0]
    scales = torch.cat([torch.tensor([30.0, 20.0, 10.0], dtype=F64), torch.full((13,), 0.05,
                                                                               dtype=F64)])
    feats = (torch.randn(400, 16, generator=g, dtype=F64) * scales) @ basis.T + 5.0
    white = gp.fit_whitening(feats, normalize=False).to(dtype)
    x = feats.to(dtype)
    want = (x.double() - white.mean.double()) @ white.projection.double().T
    got = white(x)
    assert got.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=2 * eps,
                               atol=2 * eps * float(want.abs().max()))


@pytest.mark.parametrize(
    ("features", "kwargs", "error", "match"),
    [
        ([[1.0, 2.0]], {}, TypeError, "features must be a torch.Tensor"),
        (torch.ones(4, 3, dtype=torch.int64), {}, TypeError, "floating dtype"),
        (torch.randn(10), {}, ValueError, r"shape \(N, D\)"),
        ("nan", {}, ValueError, r"finite, got 1 NaN or infinite value\(s\) in 1 row\(s\) \(first: row 3\)"),
        ("inf", {}, ValueError, "must be finite"),
        (None, {"dim": 0}, ValueError, "dim must be between 1 and the descriptor width 5"),
        (None, {"dim": 6}, ValueError, "dim must be between 1 and the descriptor width 5 .*got 6"),
        (None, {"dim": 2.0}, TypeError, "dim must be a positive int or None"),
        (None, {"dim": True}, TypeError, "dim must be a positive int or None"),
        (None, {"shrinkage": -0.1}, ValueError, r"shrinkage must be a real number in \[0, 1\]"),
        (None, {"shrinkage": 1.5}, ValueError, "shrinkage must be"),
        (None, {"shrinkage": float("nan")}, ValueError, "shrinkage must be"),
        (None, {"shrinkage": "ledoit"}, TypeError, "shrinkage must be"),
        (None, {"eps": -1e-3}, ValueError, "eps must be a finite real number >= 0"),
        (None, {"normalize": 1}, TypeError, "normalize must be a bool"),
        ("one", {}, ValueError, "features has 1 sample"),
    ],
)
def test_fit_whitening_refuses_bad_input(features, kwargs, error, match):
    good = correlated(30, 5)
    if features is None:
        features = good
    elif features == "one":
        features = good[:1]
    elif features in ("nan", "inf"):
        bad = math.nan if features == "nan" else -math.inf
        features = good.clone()
        features[3, 2] = bad
    with pytest.raises(error, match=match):
        gp.fit_whitening(features, **kwargs)


def test_whitening_state_dict_roundtrip_and_refusals():
    white = gp.fit_whitening(correlated(50, 6), dim=4)
    fresh = gp.Whitening(6)
    assert not fresh.fitted
    with pytest.raises(RuntimeError, match="the whitening is not fitted"):
        fresh(torch.randn(2, 6))
    fresh.load_state_dict(white.state_dict())
    assert fresh.fitted and fresh.out_features == 4
    x = correlated(5, 6, seed=9)
    torch.testing.assert_close(fresh(x.float()), white(x).float())
    with pytest.raises(RuntimeError, match=r"projection of shape \(k, 8\), got \(4, 6\)"):
        gp.Whitening(8).load_state_dict(white.state_dict())
    with pytest.raises(ValueError, match=r"takes x of shape \(N, 6\), got \(2, 5\)"):
        white(torch.randn(2, 5, dtype=F64))


# ------------------------------------------------------------------------------------------------
# the head


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference average over the real positions of a (N, C, H, W) map, float64."""
    m = mask[:, None].to(F64)
    return (torch.where(mask[:, None], x.double(), 0.0)).sum((2, 3)) / m.sum((2, 3))


def test_head_outputs_unit_norm_descriptors_of_any_pool():
    x = torch.randn(3, 8, 5, 5)
    for pool, width in [("gem", 8), ("catavgmax", 16), (("avg", "max", "lse"), 24), ("simpool", 8)]:
        head = gp.EmbeddingHead(8, pool).eval()
        out = head(x)
        assert out.shape == (3, width) == (3, head.embedding_width)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    last = gp.EmbeddingHead(8, "avg", layout="channels_last").eval()
    torch.testing.assert_close(last(x.movedim(1, -1)), F.normalize(x.mean((2, 3)), dim=1))


def test_head_with_a_mask_and_projection_matches_a_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, 7, generator=g, dtype=F64)
    mask = torch.rand(4, 5, 7, generator=g) > 0.4
    x = torch.where(mask[:, None], x, torch.nan)  # padded positions hold NaN: they must not leak
    head = gp.EmbeddingHead(6, "avg", dim=3).double().eval()
    want = F.normalize(masked_mean(x, mask) @ head.projection.weight.T + head.projection.bias, dim=1)
    torch.testing.assert_close(head(x, mask), want)
    raw = gp.EmbeddingHead(6, "avg", normalize=False).double()
    torch.testing.assert_close(raw(x, mask), masked_mean(x, mask))


def test_bnneck_returns_both_features_in_training_and_the_normalised_post_bn_in_eval():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 4, 4, generator=g, dtype=F64)
    head = gp.EmbeddingHead(5, "avg", dim=4, bnneck=True).double().train()
    assert head.projection.bias is None and not head.bnneck.bias.requires_grad
    with torch.no_grad():
        head.bnneck.weight.copy_(torch.linspace(0.5, 2.0, 4))
    out = head(x)
    assert isinstance(out, gp.BNNeckOutput)
    f = x.mean((2, 3)) @ head.projection.weight.T
    torch.testing.assert_close(out.pre_bn, f)
    batch = (f - f.mean(0)) / (f.var(0, unbiased=False) + head.bnneck.eps).sqrt()
    torch.testing.assert_close(out.post_bn, batch * head.bnneck.weight)
    # the frozen bias stays 0 through a step; the running statistics moved
    opt = torch.optim.SGD([q for q in head.parameters() if q.requires_grad], lr=0.1)
    (out.post_bn.sum() + out.pre_bn.pow(2).sum()).backward()
    opt.step()
    assert torch.equal(head.bnneck.bias, torch.zeros(4, dtype=F64))
    assert not torch.equal(head.bnneck.running_mean, torch.zeros(4, dtype=F64))
    head.eval()
    f = x.mean((2, 3)) @ head.projection.weight.T
    bn = head.bnneck
    post = (f - bn.running_mean) / (bn.running_var + bn.eps).sqrt() * bn.weight
    torch.testing.assert_close(head(x), F.normalize(post, dim=1))


def test_gradcheck_through_the_whole_head():
    g = torch.Generator().manual_seed(0)
    head = gp.EmbeddingHead(4, "gem", p=2.5, dim=3, bnneck=True).double()
    head.fit_whitening(torch.randn(30, 3, generator=g, dtype=F64))
    x = (torch.rand(3, 4, 2, 3, generator=g, dtype=F64) + 0.2).requires_grad_()
    mask = torch.rand(3, 2, 3, generator=g) > 0.3
    mask[:, 0, 0] = True
    head.eval()
    assert torch.autograd.gradcheck(lambda t: head(t, mask), (x,), fast_mode=True)
    head.train()
    assert torch.autograd.gradcheck(lambda t: head(t, mask).post_bn, (x,), fast_mode=True)


def test_head_fit_whitening_and_state_dict_roundtrip(tmp_path):
    head = gp.EmbeddingHead(8, "gem", dim=6, bnneck=True).eval()
    features = head.descriptors(torch.rand(64, 8, 4, 4)).detach()
    assert head.fit_whitening(features, dim=4) is head and head.embedding_width == 4
    y = head(torch.rand(2, 8, 4, 4))
    assert y.shape == (2, 4)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(2))
    path = tmp_path / "head.pt"
    torch.save(head.state_dict(), path)
    loaded = gp.EmbeddingHead(8, "gem", dim=6, bnneck=True, whitening=True).eval()
    with pytest.raises(RuntimeError, match="the whitening is not fitted"):
        loaded(torch.rand(2, 8, 4, 4))
    loaded.load_state_dict(torch.load(path))
    x = torch.rand(3, 8, 4, 4)
    torch.testing.assert_close(loaded(x), head(x))
    with pytest.raises(RuntimeError, match="build the head with whitening=True"):
        gp.EmbeddingHead(8, "gem", dim=6, bnneck=True).load_state_dict(head.state_dict())


def test_head_takes_features_of_another_dtype():
    """A float32 head given float16 features (and a float64 head given float32 ones) computes
    in its own dtype after the pool and returns x's dtype."""
    g = torch.Generator().manual_seed(6)
    x = torch.rand(3, 8, 4, 4, generator=g, dtype=F64) + 0.1
    for head_dtype, x_dtype in ((torch.float32, torch.float16), (F64, torch.float32)):
        head = gp.EmbeddingHead(8, "gem", dim=4, bnneck=True).to(head_dtype).eval()
        head.fit_whitening(head.descriptors(torch.rand(40, 8, 2, 2, generator=g,
                                                       dtype=head_dtype)), dim=3)
        got = head(x.to(x_dtype))
        want = head(x.to(x_dtype).to(head_dtype))
        assert got.dtype == x_dtype and head.descriptors(x.to(x_dtype)).dtype == x_dtype
        # the pool returns x's dtype: its float16 rounding, scaled up by the whitening
        tol = 1e-2 if x_dtype == torch.float16 else 1e-5
        torch.testing.assert_close(got, want.to(x_dtype), rtol=tol, atol=tol)
        head.train()
        out = head(x.to(x_dtype))
        assert out.pre_bn.dtype == out.post_bn.dtype == x_dtype


def test_head_whitening_follows_the_head_dtype_and_refusals_change_nothing():
    head = gp.EmbeddingHead(4, "avg").double().eval()
    head.fit_whitening(torch.randn(20, 4))
    assert head.whitening.projection.dtype == F64
    before = head.whitening
    with pytest.raises(ValueError, match=r"features must have shape \(N, 4\) \(the head's feature_width\), got \(20, 3\)"):
        head.fit_whitening(torch.randn(20, 3))
    with pytest.raises(ValueError, match="dim must be between 1 and the descriptor width 4 .*got 5"):
        head.fit_whitening(torch.randn(20, 4), dim=5)
    assert head.whitening is before


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((0,), {}, ValueError, "in_channels must be a positive int, got 0"),
        ((8,), {"dim": 0}, ValueError, "dim must be a positive int, got 0"),
        ((8,), {"dim": -2}, ValueError, "dim must be a positive int, got -2"),
        ((8,), {"dim": 2.5}, ValueError, "dim must be a positive int, got 2.5"),
        ((8,), {"bnneck": "yes"}, TypeError, "bnneck must be a bool"),
        ((8,), {"whitening": 1}, TypeError, "whitening must be a bool"),
        ((8,), {"normalize": None}, TypeError, "normalize must be a bool"),
        ((8, "median"), {}, ValueError, "kind must be one of"),
        ((8,), {"keepdim": True}, TypeError, "EmbeddingHead got keepdim=True"),
        ((8,), {"channels": 8}, TypeError, "EmbeddingHead got channels=8"),
        ((8, "avg"), {"p": 3.0}, TypeError, "unexpected"),
    ],
)
def test_head_refuses_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        gp.EmbeddingHead(*args, **kwargs)


def test_head_refuses_bad_input():
    head = gp.EmbeddingHead(8, "gem").eval()
    with pytest.raises(ValueError, match=r"EmbeddingHead\(in_channels=8\) got input with 5 channels"):
        head(torch.randn(2, 5, 3, 3))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        head([[1.0]])


def test_exported_head_with_whitening_matches_eager():
    head = gp.EmbeddingHead(8, "gem", dim=6, bnneck=True).eval()
    head.fit_whitening(head.descriptors(torch.rand(64, 8, 4, 4)).detach(), dim=4)
    x = torch.rand(2, 8, 5, 5)
    batch = torch.export.Dim("N", min=1, max=1024)
    program = torch.export.export(head, (x,), dynamic_shapes={"x": {0: batch}})
    for n in (2, 5):
        xs = torch.rand(n, 8, 5, 5)
        torch.testing.assert_close(program.module()(xs), head(xs))


def test_head_with_whitening_exports_to_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    head = gp.EmbeddingHead(8, "gem", dim=6, bnneck=True).eval()
    head.fit_whitening(head.descriptors(torch.rand(64, 8, 4, 4)).detach(), dim=4)
    x = torch.rand(2, 8, 5, 5)
    batch = torch.export.Dim("N", min=1, max=1024)
    path = tmp_path / "embedding.onnx"
    torch.onnx.export(head, (x,), str(path), dynamo=True, dynamic_shapes={"x": {0: batch}})
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xs = torch.rand(3, 8, 5, 5)
    (got,) = session.run(None, {session.get_inputs()[0].name: xs.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), head(xs), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# multi-scale extraction


class MaxDescriptor(torch.nn.Module):
    """A scale-dependent model: 1x1 convolution, ReLU, global max (non-negative descriptors)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 1)
        self.bn = torch.nn.BatchNorm2d(5)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(F.relu(self.bn(self.conv(x)))).amax((2, 3))


def test_multiscale_of_a_scale_invariant_model_equals_one_scale():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 1), torch.nn.ReLU(), gp.EmbeddingHead(6, "gem", p=2.0)
    ).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 1, 1, generator=g).expand(2, 3, 24, 24)  # constant per channel
    want = model(images)
    for p in (1.0, 3.0):
        got = gp.extract_multiscale(model, images, p=p)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_multiscale_is_the_generalised_mean_over_scales(p):
    torch.manual_seed(0)
    model = MaxDescriptor().double().eval()
    images = torch.rand(3, 3, 20, 20, dtype=F64)
    scales = (1.0, 0.75, 0.5)
    per_scale = []
    with torch.no_grad():
        for s in scales:
            size = [math.floor(20 * s)] * 2
            resized = images if s == 1 else F.interpolate(images, size=size, mode="bilinear")
            per_scale.append(model(resized).clamp_min(1e-6 if p > 1 else -math.inf))
    v = torch.stack(per_scale)
    want = F.normalize(v.pow(p).mean(0).pow(1 / p), dim=1)
    got = gp.extract_multiscale(model, images, scales, p=p)
    torch.testing.assert_close(got, want)
    if p == 1:
        torch.testing.assert_close(got, F.normalize(v.mean(0), dim=1))
        raw = gp.extract_multiscale(model, images, scales, normalize=False)
        torch.testing.assert_close(raw, v.mean(0))


def test_multiscale_runs_in_eval_mode_and_restores_every_module_mode():
    torch.manual_seed(0)
    model = MaxDescriptor().train()
    model.bn.eval()  # a frozen BN stays frozen
    images = torch.rand(4, 3, 16, 16)
    got = gp.extract_multiscale(model, images, (1.0,))
    assert model.training and model.drop.training and not model.bn.training
    assert not got.requires_grad
    model.eval()
    torch.testing.assert_close(got, F.normalize(model(images), dim=1))
    model.train()
    with_grad = gp.extract_multiscale(model, images, (1.0, 0.5), grad=True)
    with_grad.sum().backward()
    assert model.conv.weight.grad is not None


def test_multiscale_on_signals_and_volumes():
    head = gp.EmbeddingHead(2, "avg")
    for images in (torch.rand(2, 2, 1).expand(2, 2, 32), torch.rand(2, 2, 1, 1, 1).expand(2, 2, 8, 8, 8)):
        torch.testing.assert_close(gp.extract_multiscale(head, images), head(images))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scales": ()}, ValueError, "scales must be a non-empty sequence .* got an empty tuple"),
        ({"scales": []}, ValueError, "got an empty list"),
        ({"scales": (1.0, 0.0)}, ValueError, r"scales must be .*holding 0.0"),
        ({"scales": (-0.5,)}, ValueError, r"holding -0.5"),
        ({"scales": (float("nan"),)}, ValueError, r"holding nan"),
        ({"scales": 0.5}, TypeError, "scales must be a non-empty sequence"),
        ({"scales": ("1",)}, TypeError, "holding '1'"),
        ({"scales": (0.01,)}, ValueError, "resizes the images' spatial size .* below 1 pixel"),
        ({"p": 0.5}, ValueError, "p must be a finite real number >= 1"),
        ({"p": "3"}, TypeError, "p must be a real number"),
        ({"grad": 1}, TypeError, "normalize and grad must be bools"),
        ({"mode": "cubic"}, ValueError, r"mode must be one of \('nearest', 'nearest-exact', "
         r"'area', 'bilinear', 'bicubic'\) \(or None\) for images with 2 spatial dim\(s\), "
         r"got 'cubic'"),
        ({"mode": "linear"}, ValueError, "for images with 2 spatial dim"),
    ],
)
def test_multiscale_refuses_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        gp.extract_multiscale(gp.EmbeddingHead(3, "avg"), torch.rand(2, 3, 16, 16), **kwargs)


def test_multiscale_refuses_bad_model_output():
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="p=3 needs non-negative descriptors"):
        gp.extract_multiscale(lambda x: x.mean((2, 3)) - 1, images, p=3.0)
    with pytest.raises(TypeError, match="model must return a tensor of descriptors"):
        gp.extract_multiscale(lambda x: (x.mean((2, 3)),), images)
    with pytest.raises(ValueError, match=r"model must return floating descriptors of shape \(2, D\)"):
        gp.extract_multiscale(lambda x: x.mean(2), images)
    with pytest.raises(ValueError, match="one width at every scale, got 16 and 8"):
        gp.extract_multiscale(lambda x: x.mean((0, 1, 2))[None].expand(2, -1), images, (1.0, 0.5))
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        gp.extract_multiscale(gp.EmbeddingHead(3, "avg"), [[1.0]])
