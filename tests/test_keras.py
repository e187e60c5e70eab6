"""globalpool.keras on the torch backend, in this process: every kind, rank, data_format,
keepdims and mask against the NumPy reference (forward and gradient), through both the fast path
(``gp.pool``) and the ``keras.ops`` composition; masks, saving, training and bad input."""

from __future__ import annotations

import doctest
import importlib
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # keras was imported earlier with another backend
    pytest.skip(
        f"keras runs on {keras.backend.backend()!r} in this process; these tests need torch "
        "(tests/test_keras_backends.py covers the others)",
        allow_module_level=True,
    )

import torch  # noqa: E402

import globalpool as gp  # noqa: E402
import globalpool.functional  # noqa: E402
import globalpool.keras as gpk  # noqa: E402
from globalpool.keras import _base  # noqa: E402
from helpers import (  # noqa: E402
    KIND_PARAMS,
    TOLERANCE,
    check_against_reference,
    make_input,
    make_mask,
    poison_padded,
)

POOL_KINDS = ("avg", "max", "avgmax", "catavgmax", "gem", "lse", "sum", "first", "last",
              "mean_sqrt_len", "weightedmean")
GLOBAL = {1: gpk.GlobalPooling1D, 2: gpk.GlobalPooling2D, 3: gpk.GlobalPooling3D}
GEM = {1: gpk.GeMPooling1D, 2: gpk.GeMPooling2D, 3: gpk.GeMPooling3D}
ATTENTION = {1: gpk.AttentionPooling1D, 2: gpk.AttentionPooling2D, 3: gpk.AttentionPooling3D}
SPATIAL = {1: (9,), 2: (4, 5), 3: (2, 3, 4)}
DATA_FORMATS = ("channels_first", "channels_last")
DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["gp.pool", "keras.ops"])
def path(request, monkeypatch):
    """Run each test through the torch fast path and through the keras.ops composition."""
    if request.param == "keras.ops":
        monkeypatch.setattr(_base, "torch_pool", lambda *args: None)
    return request.param


def _keras_pool(rank, dtype):
    def pool_fn(x, kind, layout, mask, keepdim, **params):
        layer = GLOBAL[rank](kind, data_format=layout, keepdims=keepdim, dtype=dtype, **params)
        return layer(x) if mask is None else layer(x, mask=mask)

    return pool_fn


MODULES = [
    "globalpool.keras",
    "globalpool.keras._checks",
    "globalpool.keras._ops",
    "globalpool.keras.attention",
    "globalpool.keras.gem",
    "globalpool.keras.pooling",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests_pass(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


@pytest.mark.parametrize("mask_mode", ["none", "random", "empty"])
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("data_format", DATA_FORMATS)
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("kind", POOL_KINDS)
def test_every_kind_matches_the_reference(path, kind, rank, data_format, keepdims, mask_mode):
    seed = hash((kind, rank, data_format, mask_mode)) % 1000
    x = make_input(3, 4, SPATIAL[rank], data_format, torch.float32, seed)
    if kind == "gem":
        x = x.abs() + 0.1
    mask = make_mask(3, SPATIAL[rank], mask_mode, seed)
    y, grad = check_against_reference(
        _keras_pool(rank, "float32"),
        x,
        kind,
        data_format,
        mask,
        KIND_PARAMS.get(kind, {}),
        keepdim=keepdims,
    )
    if mask is not None:  # padded positions (holding NaN/inf) get exactly zero gradient
        channel = 1 if data_format == "channels_first" else x.ndim - 1
        assert (grad[(~mask).unsqueeze(channel).expand_as(x)] == 0).all()
    if mask_mode == "empty":
        assert (y[0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", POOL_KINDS)
def test_other_dtypes_match_the_reference_and_gp_pool(path, kind, dtype):
    x = make_input(2, 6, (4, 4), "channels_last", dtype, seed=11)
    if kind == "gem":
        x = x.abs() + 0.1
    mask = make_mask(2, (4, 4), "random", seed=11)
    params = KIND_PARAMS.get(kind, {})
    y, _ = check_against_reference(
        _keras_pool(2, DTYPE_NAMES[dtype]), x, kind, "channels_last", mask, params
    )
    expected = gp.pool(x, kind, layout="channels_last", mask=mask, backend="torch", **params)
    torch.testing.assert_close(y.detach(), expected, **TOLERANCE[dtype])


def test_torch_backend_calls_gp_pool(monkeypatch):
    calls = []
    real = globalpool.functional.pool

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(globalpool.functional, "pool", spy)
    x = torch.rand(2, 4, 4, 3)
    gpk.GlobalPooling2D("catavgmax")(x)
    gpk.GeMPooling2D()(x)
    gpk.AttentionPooling2D()(x)
    assert calls == ["catavgmax", "gem", "attention"]


def test_mixed_precision_accumulates_in_float32(path):
    layer = gpk.GlobalPooling2D("avg", dtype="mixed_float16")
    x = torch.full((1, 64, 64, 2), 1000.0)  # a float16 sum would overflow (65504)
    y = layer(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), torch.full((1, 2), 1000.0))


# --------------------------------------------------------------------------------------------
# GeM


@pytest.mark.parametrize("data_format", DATA_FORMATS)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_gem_layer_matches_gp_gem_with_its_gradients(path, rank, data_format):
    x = make_input(3, 4, SPATIAL[rank], data_format, torch.float32, seed=5).abs()
    mask = make_mask(3, SPATIAL[rank], "empty", seed=5)
    layer = GEM[rank](p=2.5, data_format=data_format)
    module = gp.GeM(p=2.5, layout=data_format, backend="torch")
    xk = poison_padded(x, mask, data_format).requires_grad_()
    xt = x.clone().requires_grad_()
    yk, yt = layer(xk, mask=mask), module(xt, mask=mask)
    torch.testing.assert_close(yk, yt, rtol=2e-5, atol=2e-5)
    g = torch.randn(yt.shape, generator=torch.Generator().manual_seed(1))
    (yk * g).sum().backward()
    (yt * g).sum().backward()
    torch.testing.assert_close(xk.grad, xt.grad, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(layer.raw_p.value.grad, module.raw_p.grad, rtol=1e-4, atol=1e-5)


def _p(layer) -> float:
    return float(keras.ops.convert_to_numpy(layer.p))


def test_gem_p_stays_at_least_one_and_learns():
    layer = gpk.GeMPooling1D(p=3.0)
    layer.build((None, 5, 2))
    assert math.isclose(_p(layer), 3.0, rel_tol=1e-6)
    layer.raw_p.assign(-80.0)  # however negative raw_p gets, p >= 1
    assert _p(layer) >= 1.0
    model = keras.Sequential([keras.Input((5, 2)), gpk.GeMPooling1D(p=2.0)])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    x = np.random.default_rng(0).random((8, 5, 2)).astype("float32")
    model.fit(x, np.zeros((8, 2), "float32"), epochs=3, verbose=0)
    p = _p(model.layers[0])
    assert 1.0 <= p < 2.0  # pulled towards the smaller mean, never below 1


def test_gem_trainable_false_keeps_p_fixed():
    layer = gpk.GeMPooling2D(p=1.0, trainable=False)
    y = layer(torch.rand(2, 3, 3, 4))
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) == 1
    assert _p(layer) == 1.0 and y.shape == (2, 4)


# --------------------------------------------------------------------------------------------
# attention


def _attention_pair(rank, data_format, channels):
    layer = ATTENTION[rank](data_format=data_format)
    shape = (
        (None, channels) + SPATIAL[rank]
        if data_format == "channels_first"
        else ((None, *SPATIAL[rank], channels))
    )
    layer.build(shape)
    module = gp.AttentionPool(channels, layout=data_format, backend="torch")
    layer.kernel.assign(module.score.weight.detach().T.numpy())
    layer.bias.assign(module.score.bias.detach().numpy())
    return layer, module


@pytest.mark.parametrize("mask_mode", ["none", "empty"])
@pytest.mark.parametrize("data_format", DATA_FORMATS)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_attention_layer_matches_gp_attention_pool(path, rank, data_format, mask_mode):
    torch.manual_seed(rank)
    layer, module = _attention_pair(rank, data_format, 4)
    x = make_input(3, 4, SPATIAL[rank], data_format, torch.float32, seed=rank)
    mask = make_mask(3, SPATIAL[rank], mask_mode, seed=rank)
    xk = poison_padded(x, mask, data_format).requires_grad_()
    xt = x.clone().requires_grad_()
    yk, yt = layer(xk, mask=mask), module(xt, mask=mask)
    torch.testing.assert_close(yk, yt, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(layer.scores(x, mask), module.weights(x, mask))
    g = torch.randn(yt.shape, generator=torch.Generator().manual_seed(2))
    (yk * g).sum().backward()
    (yt * g).sum().backward()
    torch.testing.assert_close(xk.grad, xt.grad, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(
        layer.kernel.value.grad, module.score.weight.grad.T, rtol=1e-4, atol=1e-6
    )
    if mask_mode == "empty":
        assert (yk[0] == 0).all()


# --------------------------------------------------------------------------------------------
# masks from Keras


def test_embedding_mask_reaches_every_kind(path):
    tokens = np.array([[3, 5, 2, 0, 0], [4, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    emb = keras.layers.Embedding(10, 4, mask_zero=True)
    vectors = emb(tokens)
    mask = torch.as_tensor(tokens != 0)
    for kind in POOL_KINDS:
        model = keras.Sequential([emb, gpk.GlobalPooling1D(kind, **KIND_PARAMS.get(kind, {}))])
        expected = gp.pool(
            vectors.detach(),
            kind,
            layout="channels_last",
            mask=mask,
            backend="torch",
            **KIND_PARAMS.get(kind, {}),
        )
        torch.testing.assert_close(model(tokens).detach(), expected, msg=kind)
        assert (expected[2] == 0).all()
    for cls in (gpk.GeMPooling1D, gpk.AttentionPooling1D):
        out = keras.Sequential([emb, cls()])(tokens)
        assert torch.isfinite(out).all() and (out[2] == 0).all()


def test_a_functional_model_carries_the_mask_to_the_layer(tmp_path):
    tokens = np.array([[3, 5, 0, 0], [0, 0, 0, 0]])
    inputs = keras.Input((4,), dtype="int32")
    h = keras.layers.Embedding(8, 3, mask_zero=True)(inputs)
    model = keras.Model(inputs, gpk.GlobalPooling1D("lse", r=2.0)(h))
    assert model.output_shape == (None, 3)
    vectors = model.layers[1](tokens).detach()
    expected = gp.pool(
        vectors,
        "lse",
        layout="channels_last",
        mask=torch.as_tensor(tokens != 0),
        backend="torch",
        r=2.0,
    )
    torch.testing.assert_close(model(tokens).detach(), expected)
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    torch.testing.assert_close(again(tokens).detach(), expected)


def test_attention_scores_build_the_layer_and_leave_padding_out_of_the_scorer():
    x = torch.rand(2, 5, 3)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    poisoned = x.clone()
    poisoned[1, 2:] = float("nan")
    layer = gpk.AttentionPooling1D()
    scores = layer.scores(poisoned, mask=mask)  # builds the layer
    assert scores.shape == (2, 5) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, layer.scores(torch.where(mask[..., None], x, 0.0)))


def test_the_layer_consumes_the_mask():
    x, mask = torch.rand(2, 5, 3), torch.ones(2, 5, dtype=torch.bool)
    for layer in (gpk.GlobalPooling1D("max"), gpk.GeMPooling1D(), gpk.AttentionPooling1D()):
        assert layer.supports_masking and layer.compute_mask(x, mask) is None


def test_an_integer_mask_is_read_as_real_positions():
    x = torch.tensor([[[1.0], [2.0], [9.0]]])
    y = gpk.GlobalPooling1D("max")(x, mask=np.array([[1, 1, 0]]))
    assert float(y) == 2.0


# --------------------------------------------------------------------------------------------
# shapes and saving


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("data_format", DATA_FORMATS)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_compute_output_shape_is_the_output_shape(rank, data_format, keepdims):
    shape = (2, 4, *SPATIAL[rank]) if data_format == "channels_first" else (2, *SPATIAL[rank], 4)
    x = torch.rand(shape)
    layers = [GLOBAL[rank](k, data_format=data_format, keepdims=keepdims) for k in POOL_KINDS]
    layers += [c[rank](data_format=data_format, keepdims=keepdims) for c in (GEM, ATTENTION)]
    for layer in layers:
        assert tuple(layer(x).shape) == layer.compute_output_shape(shape)
        symbolic = layer.compute_output_shape((None, *shape[1:]))
        assert symbolic[0] is None and symbolic[1:] == layer.compute_output_shape(shape)[1:]


def test_data_format_defaults_to_keras_image_data_format(monkeypatch):
    assert gpk.GlobalPooling2D().data_format == keras.config.image_data_format()
    monkeypatch.setattr(keras.config, "image_data_format", lambda: "channels_first")
    assert gpk.GeMPooling2D().data_format == "channels_first"


def test_get_config_round_trips():
    for layer in (
        gpk.GlobalPooling3D("gem", p=4.0, eps=1e-5, data_format="channels_first", keepdims=True),
        gpk.GlobalPooling1D("lse", r=0.5),
        gpk.GeMPooling2D(p=2.0, trainable=False, eps=1e-4),
        gpk.AttentionPooling1D(keepdims=True, name="att"),
    ):
        config = layer.get_config()
        again = type(layer).from_config(config)
        assert again.get_config() == config


def test_keras_file_round_trips(tmp_path):
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    pooled = [
        gpk.GlobalPooling2D("catavgmax")(h),
        gpk.GlobalPooling2D("lse", r=2.0)(h),
        gpk.GeMPooling2D(p=2.5)(keras.layers.ReLU()(h)),
        gpk.AttentionPooling2D()(h),
    ]
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Concatenate()(pooled)))
    gem = next(layer for layer in model.layers if isinstance(layer, gpk.GeMPooling2D))
    gem.raw_p.assign(0.3)  # a learned p, not the initial one
    x = np.random.default_rng(1).random((3, 6, 6, 3)).astype("float32")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)), rtol=1e-6
    )
    names = {type(layer).__name__ for layer in loaded.layers}
    assert {"GlobalPooling2D", "GeMPooling2D", "AttentionPooling2D"} <= names


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: gpk.GlobalPooling2D("mean"), ValueError, r"kind must be one of .* got 'mean'"),
        (lambda: gpk.GlobalPooling2D("attention"), ValueError, "AttentionPooling"),
        (lambda: gpk.GlobalPooling2D(data_format="NHWC"), ValueError, "data_format .* 'NHWC'"),
        (lambda: gpk.GeMPooling1D(data_format="nchw"), ValueError, "data_format .* 'nchw'"),
        (lambda: gpk.GlobalPooling2D("avg", p=3.0), TypeError, r"'avg' .* \['p'\]; it takes no"),
        (lambda: gpk.GlobalPooling2D("lse", p=3.0), TypeError, r"\['p'\]; it takes r"),
        (lambda: gpk.GlobalPooling2D("gem", p=0.5), ValueError, "p for kind 'gem' must be >= 1"),
        (lambda: gpk.GlobalPooling2D("gem", eps=0.0), ValueError, "eps .* must be >= 1.17549e-38, got 0.0"),
        (lambda: gpk.GlobalPooling2D("lse", r=math.inf), ValueError, "r .* finite, got inf"),
        (lambda: gpk.GlobalPooling2D("lse", r="2"), TypeError, "r for kind 'lse' .* got '2'"),
        (lambda: gpk.GlobalPooling2D(keepdims="yes"), TypeError, "keepdims must be a bool"),
        (lambda: gpk.GeMPooling2D(p=1.0), ValueError, "p must be > 1 for a trainable"),
        (lambda: gpk.GeMPooling2D(p=-2.0, trainable=False), ValueError, "p .* >= 1, got -2.0"),
        (lambda: gpk.GeMPooling2D(trainable=1), TypeError, "trainable must be a bool"),
    ],
)
def test_bad_arguments_are_refused_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize("cls", [gpk.GlobalPooling2D, gpk.GeMPooling2D, gpk.AttentionPooling2D])
def test_wrong_rank_is_refused_clearly(cls):
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{cls.__name__} expects a 4-D input (N, H, W, C) for data_format='channels_last', "
            "got shape (2, 7, 3) (3-D)"
        ),
    ):
        cls()(torch.rand(2, 7, 3))
    with pytest.raises(ValueError, match="expects a 4-D input"):
        keras.Sequential([keras.Input((7, 3)), cls()])


@pytest.mark.parametrize("cls", [gpk.GlobalPooling2D, gpk.GeMPooling2D, gpk.AttentionPooling2D])
def test_wrong_mask_shape_is_refused_clearly(path, cls):
    x = torch.rand(2, 4, 5, 3)
    with pytest.raises(
        ValueError, match=re.escape("mask must have shape (N, *S) = (2, 4, 5), got (2, 20)")
    ):
        cls()(x, mask=torch.ones(2, 20, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# the transfer example of docs/keras.md (too slow to run among the doc blocks)


def _doc_block(marker: str) -> str:
    text = (ROOT / "docs" / "keras.md").read_text()
    blocks = re.findall(r"^```python[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"docs/keras.md: {len(found)} python blocks hold {marker!r}"
    return found[0]


# 7 s on 2 quiet CPU cores, 15-27 s on busy ones (a full ResNet50, two steps, a 95 MB file)
def test_resnet50_transfer_example_of_the_docs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(_doc_block("ResNet50"), "docs/keras.md:ResNet50", "exec"), namespace)
    assert (tmp_path / "resnet50_gem.keras").exists()


def test_keras_kinds_follow_the_registry():
    from globalpool import registry
    from globalpool.keras import _ops
    from globalpool.keras._checks import KINDS as KERAS_KINDS

    builtin = {k for k in registry.kinds() if registry.spec(k).builtin}
    # every keras.ops composition is of a registered built-in kind (a new built-in kind without
    # one runs on the torch backend, through gp.pool, and says so elsewhere)
    assert set(_ops._BUILTIN) <= builtin
    assert set(KERAS_KINDS) == {k for k in registry.kinds()
                                if not any(q.per_position for q in registry.spec(k).params)}


def test_a_registered_kind_runs_in_the_keras_layers():
    import globalpool as gp

    def absmax(x, mask):
        return (x.abs() if mask is None else torch.where(mask, x.abs(), 0.0)).amax(-1)

    def absmax_keras(x, mask):
        a = keras.ops.abs(x)
        return keras.ops.max(a if mask is None else keras.ops.where(mask, a, 0.0), axis=-1)

    gp.register_kind("absmax_k", absmax, keras=absmax_keras)
    try:
        x = np.random.default_rng(0).normal(size=(2, 5, 4, 3)).astype("float32")
        y = gpk.GlobalPooling2D("absmax_k")(x)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(y), np.abs(x).max(axis=(1, 2)),
                                   rtol=1e-6)
        from globalpool.keras import _ops

        z = _ops.pool(x, "absmax_k", axes=(1, 2), channel_axis=3)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(z), np.abs(x).max(axis=(1, 2)),
                                   rtol=1e-6)
    finally:
        gp.unregister_kind("absmax_k")
