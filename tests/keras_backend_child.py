"""Run globalpool.keras layers on the Keras backend named by KERAS_BACKEND (a child process of
tests/test_keras_backends.py): read the cases, write each output and input gradient; then train, save and reload a small
masked model.

    KERAS_BACKEND=jax python tests/keras_backend_child.py cases.json inputs.npz out.npz
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import keras
import numpy as np

import globalpool.keras as gpk


def _run_jax(layers, xs, masks, gs):
    """All cases in one compiled function: one XLA compilation instead of one per op and shape
    (every loss depends on its own input only, so the gradient of their sum is each one's)."""
    import jax
    import jax.numpy as jnp

    def total(xs):
        ys = [layer(x, mask=m) for layer, x, m in zip(layers, xs, masks, strict=True)]
        loss = sum(jnp.sum(y.astype(jnp.float32) * g) for y, g in zip(ys, gs, strict=True))
        return loss, ys

    (_, ys), gxs = jax.jit(jax.value_and_grad(total, has_aux=True))([jnp.asarray(x) for x in xs])
    return ys, gxs


def _run_tensorflow(layers, xs, masks, gs):
    import tensorflow as tf

    ys, gxs = [], []
    for layer, x, m, g in zip(layers, xs, masks, gs, strict=True):
        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, mask=m)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * g)
        ys.append(y)
        gxs.append(tape.gradient(loss, x))
    return ys, gxs


def _run_torch(layers, xs, masks, gs):
    import torch

    ys, gxs = [], []
    for layer, x, m, g in zip(layers, xs, masks, gs, strict=True):
        x = torch.as_tensor(x).requires_grad_()
        y = layer(x, mask=None if m is None else torch.as_tensor(m))
        (y.float() * torch.as_tensor(g)).sum().backward()
        ys.append(y)
        gxs.append(x.grad)
    return ys, gxs


def fit_and_reload(folder: str) -> None:
    """Train a small masked model with every layer class for two epochs, save it to a .keras
    file and load it back: the predictions must be the same."""
    tokens = np.random.default_rng(0).integers(0, 5, size=(16, 6))
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.ReLU()(keras.layers.Embedding(5, 4, mask_zero=True)(inputs))
    pooled = [gpk.GeMPooling1D()(h), gpk.AttentionPooling1D()(h), gpk.GlobalPooling1D("lse")(h)]
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Concatenate()(pooled)))
    model.compile("sgd", "mse")
    model.fit(tokens, np.ones((16, 1)), batch_size=8, epochs=2, verbose=0)
    model.save(f"{folder}/model.keras")
    again = keras.saving.load_model(f"{folder}/model.keras")
    expected = model.predict(tokens, verbose=0)
    np.testing.assert_allclose(again.predict(tokens, verbose=0), expected, rtol=1e-5)
    assert np.isfinite(expected).all()
    print("fit and reload: ok")


RUN = {"jax": _run_jax, "tensorflow": _run_tensorflow, "torch": _run_torch}


def main(cases_path: str, inputs_path: str, out_path: str) -> None:
    start = time.perf_counter()
    with open(cases_path) as f:
        cases = json.load(f)
    arrays = np.load(inputs_path)
    layers, xs, masks, gs = [], [], [], []
    for case in cases:
        key = case["id"]
        x = arrays[f"{key}.x"]
        layer = getattr(gpk, case["layer"])(**case["kwargs"])
        layer.build(x.shape)
        for name in case.get("weights", ()):
            getattr(layer, name).assign(arrays[f"{key}.{name}"])
        layers.append(layer)
        xs.append(x)
        masks.append(arrays[f"{key}.mask"] if f"{key}.mask" in arrays.files else None)
        gs.append(arrays[f"{key}.g"])
    ys, gxs = RUN[keras.backend.backend()](layers, xs, masks, gs)
    out = {}
    for case, y, gx in zip(cases, ys, gxs, strict=True):
        key = case["id"]
        out[f"{key}.y"] = keras.ops.convert_to_numpy(keras.ops.cast(y, "float64"))
        out[f"{key}.gx"] = keras.ops.convert_to_numpy(keras.ops.cast(gx, "float64"))
        out[f"{key}.dtype"] = np.array(keras.backend.standardize_dtype(y.dtype))
    np.savez(out_path, **out)
    print(f"{keras.backend.backend()}: {len(cases)} cases")
    print(f"{time.perf_counter() - start:.1f} s for the cases", file=sys.stderr)
    fit_and_reload(str(Path(out_path).parent))


if __name__ == "__main__":
    main(*sys.argv[1:4])
