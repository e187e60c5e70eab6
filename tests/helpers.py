"""Shared test helpers: random inputs, masks, per-dtype tolerances, torch <-> NumPy reference."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from globalpool import reference

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASKS = ("none", "random", "empty")
KIND_PARAMS = {"gem": {"p": 2.5, "eps": 1e-6}, "lse": {"r": 1.5}}

# (forward rtol/atol, backward rtol/atol): half results are rounded to their own dtype once.
TOLERANCE = {
    torch.float16: dict(rtol=4e-3, atol=4e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
}


def spatial_of(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    return shape[2:] if layout == "channels_first" else shape[1:-1]


def make_input(
    n: int, c: int, spatial: tuple[int, ...], layout: str, dtype: torch.dtype, seed: int
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, c, *spatial) if layout == "channels_first" else (n, *spatial, c)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def make_mask(n: int, spatial: tuple[int, ...], mode: str, seed: int) -> torch.Tensor | None:
    """None, a random mask with >= 1 real position per sample, or one whose sample 0 is empty."""
    if mode == "none":
        return None
    gen = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand((n, *spatial), generator=gen) > 0.4
    flat = mask.view(n, -1)
    flat[:, 0] = True
    if mode == "empty":
        flat[0] = False
    return mask


def poison_padded(x: torch.Tensor, mask: torch.Tensor | None, layout: str) -> torch.Tensor:
    """A copy of x with NaN and inf at padded positions (keeping x's strides): they must never
    reach the output or the gradient."""
    if mask is None:
        return x.clone()
    channel_dim = 1 if layout == "channels_first" else x.ndim - 1
    padded = (~mask).unsqueeze(channel_dim).expand_as(x)
    values = torch.full((int(padded.sum()),), float("nan"), dtype=x.dtype)
    values[::2] = float("inf")
    out = x.clone()
    out[padded] = values
    return out


def make_weights(x: torch.Tensor, layout: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 2)
    n = x.shape[0]
    spatial = spatial_of(tuple(x.shape), layout)
    return torch.rand((n, *spatial), generator=gen, dtype=torch.float64).to(x.dtype)


def to_np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float64).numpy()


def reference_forward(x, kind, layout, mask, keepdim=False, **params) -> np.ndarray:
    params = {k: to_np(v) if isinstance(v, torch.Tensor) else v for k, v in params.items()}
    mask_np = None if mask is None else mask.numpy()
    return reference.pool_forward(
        to_np(x), kind, layout=layout, keepdim=keepdim, mask=mask_np, **params
    )


def reference_backward(x, grad_out, kind, layout, mask, **params) -> dict:
    params = {k: to_np(v) if isinstance(v, torch.Tensor) else v for k, v in params.items()}
    mask_np = None if mask is None else mask.numpy()
    return reference.pool_backward(
        to_np(x), to_np(grad_out), kind, layout=layout, mask=mask_np, **params
    )


def assert_close(actual: torch.Tensor, expected: np.ndarray, dtype: torch.dtype, what: str):
    got = actual.detach().to(torch.float64).numpy()
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    np.testing.assert_allclose(got, expected, err_msg=what, **TOLERANCE[dtype])


def check_against_reference(pool_fn, x, kind, layout, mask, params, *, keepdim=False,
                            grad_seed=3):
    """Run ``pool_fn(x_poisoned, kind, layout, mask, keepdim, **params)`` forward (with and
    without grad) and backward and compare output, grad x (and grad weights) with the NumPy
    reference.

    Returns the output and the input gradient."""
    dtype = x.dtype
    x_in = poison_padded(x, mask, layout).detach().requires_grad_()
    y = pool_fn(x_in, kind, layout, mask, keepdim, **params)
    assert y.dtype == dtype
    expected = reference_forward(x, kind, layout, mask, keepdim=keepdim, **params)
    assert_close(y, expected, dtype, f"forward {kind}")
    with torch.no_grad():  # inference path: the fused max kinds skip their arg-max table
        y_inference = pool_fn(x_in, kind, layout, mask, keepdim, **params)
    assert_close(y_inference, expected, dtype, f"forward {kind} under no_grad")
    gen = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    y.backward(grad_out)
    grads = reference_backward(x, grad_out, kind, layout, mask, **params)
    assert x_in.grad.dtype == dtype and x_in.grad.shape == x.shape
    assert torch.isfinite(x_in.grad).all(), "gradient holds NaN/inf"
    assert_close(x_in.grad, grads["x"], dtype, f"grad x {kind}")
    if kind == "attention":
        assert_close(params["weights"].grad, grads["weights"], dtype, "grad weights")
    return y, x_in.grad


def image_archive(tmp_path: Path, broken: bool = False) -> Path:
    """A tar.gz of PATH/train|test/<class>/*.png inside a wrapper directory, as CIFAR-10 JPEGs."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src" / "tiny"
    for split, n in [("train", 6), ("test", 2)]:
        for name in ("cat", "dog"):
            (src / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(src / split / name / f"{i}.png")
    if broken:
        (src / "train" / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="tiny")
    return archive
