"""The NumPy definition of each built-in kind, one sample at a time: the test oracle.

Each forward takes ``xs``, a float64 ``(C, k)`` array of one sample's ``k >= 1`` real positions
(in row-major order), and the kind's parameters (a per-channel one as a ``(C,)`` array, else a
float; attention's ``weights`` as the ``(k,)`` weights of those positions), and returns the
``(width * C,)`` output. Each gradient takes the same and ``g`` (the output's gradient) and
returns ``(grad_xs, {parameter: grad})``. Written from the definitions, for clarity, never for
speed; :mod:`globalpool.reference` runs them over whole inputs, masks and layouts.

>>> import numpy as np
>>> FORWARD["gem"](np.array([[1.0, 3.0]]), p=1.0, eps=1e-6)
array([2.])
>>> GRAD["max"](np.array([[1.0, 3.0, 3.0]]), np.array([1.0]))[0]
array([[0. , 0.5, 0.5]])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Grads = tuple[np.ndarray, dict[str, Any]]


def _col(v: float | np.ndarray) -> float | np.ndarray:
    """A per-channel parameter ``(C,)`` as a column ``(C, 1)`` against ``(C, k)``."""
    return v[:, None] if np.ndim(v) else v


def _max_share(xs: np.ndarray) -> np.ndarray:
    """d max / d x with ties sharing equally: (C, k), each row sums to 1."""
    ties = (xs == xs.max(axis=1, keepdims=True)).astype(np.float64)
    return ties / ties.sum(axis=1, keepdims=True)


def _reduce(grad: np.ndarray, param: float | np.ndarray) -> float | np.ndarray:
    """A per-channel parameter's gradient per channel; a scalar's summed."""
    return grad if np.ndim(param) else float(np.sum(grad))


# -- forward ----------------------------------------------------------------------------------


def avg(xs: np.ndarray) -> np.ndarray:
    return xs.mean(axis=1)


def max_(xs: np.ndarray) -> np.ndarray:
    return xs.max(axis=1)


def avgmax(xs: np.ndarray) -> np.ndarray:
    return 0.5 * (xs.mean(axis=1) + xs.max(axis=1))


def catavgmax(xs: np.ndarray) -> np.ndarray:
    return np.concatenate([xs.mean(axis=1), xs.max(axis=1)])


def gem(xs: np.ndarray, p: float | np.ndarray, eps: float) -> np.ndarray:
    """Scaled by the row maximum: no power over- or underflows float64."""
    clamped = np.maximum(xs, eps)
    top = clamped.max(axis=1)
    return top * np.mean((clamped / top[:, None]) ** _col(p), axis=1) ** (1.0 / p)


def lse(xs: np.ndarray, r: float | np.ndarray) -> np.ndarray:
    """Shifted by the maximum where it is finite (a row holding +inf is +inf)."""
    top = xs.max(axis=1)
    top = np.where(np.isfinite(top), top, 0.0)
    return top + np.log(np.mean(np.exp(_col(r) * (xs - top[:, None])), axis=1)) / r


def attention(xs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    total = weights.sum()
    if total == 0:
        return np.zeros(xs.shape[0])
    return xs @ weights / total


def sum_(xs: np.ndarray) -> np.ndarray:
    return xs.sum(axis=1)


def mean_sqrt_len(xs: np.ndarray) -> np.ndarray:
    return xs.sum(axis=1) / np.sqrt(xs.shape[1])


def _ranks(k: int) -> np.ndarray:
    """The weights of weightedmean over k real positions: 1, 2, ..., k."""
    return np.arange(1.0, k + 1.0)


def weightedmean(xs: np.ndarray) -> np.ndarray:
    w = _ranks(xs.shape[1])
    return xs @ w / w.sum()


def first(xs: np.ndarray) -> np.ndarray:
    return xs[:, 0].copy()


def last(xs: np.ndarray) -> np.ndarray:
    return xs[:, -1].copy()


# -- gradients --------------------------------------------------------------------------------


def avg_grad(xs: np.ndarray, g: np.ndarray) -> Grads:
    k = xs.shape[1]
    return np.repeat(g[:, None] / k, k, axis=1), {}


def max_grad(xs: np.ndarray, g: np.ndarray) -> Grads:
    return g[:, None] * _max_share(xs), {}


def avgmax_grad(xs: np.ndarray, g: np.ndarray) -> Grads:
    k = xs.shape[1]
    return 0.5 * g[:, None] / k + 0.5 * g[:, None] * _max_share(xs), {}


def catavgmax_grad(xs: np.ndarray, g: np.ndarray) -> Grads:
    c, k = xs.shape
    return g[:c, None] / k + g[c:, None] * _max_share(xs), {}


def gem_grad(xs: np.ndarray, g: np.ndarray, p: float | np.ndarray, eps: float) -> Grads:
    """y = m^(1/p), m = mean(z^p), z = clamp(x, eps); with u = z / y (so mean(u^p) = 1 up to
    rounding, and no power of an unscaled z): dy/dz = u^(p-1) / k and
    dy/dp = y * (-log(mean u^p) / p^2 + mean(u^p log u) / (p mean u^p))."""
    k = xs.shape[1]
    z = np.maximum(xs, eps)
    pc = _col(p)
    y = gem(xs, p, eps)
    u = z / y[:, None]
    mu = np.mean(u**pc, axis=1)
    gx = g[:, None] * u ** (pc - 1.0) / k * (xs >= eps)
    dy_dp = y * (-np.log(mu) / p**2 + np.mean(u**pc * np.log(u), axis=1) / (p * mu))
    return gx, {"p": _reduce(g * dy_dp, p)}


def lse_grad(xs: np.ndarray, g: np.ndarray, r: float | np.ndarray) -> Grads:
    """With s = softmax(r x) over the row: dy/dx = s and dy/dr = (sum(s x) - y) / r."""
    e = np.exp(_col(r) * (xs - xs.max(axis=1, keepdims=True)))
    s = e / e.sum(axis=1, keepdims=True)
    y = lse(xs, r)
    sx = np.sum(np.where(s > 0, s * xs, 0.0), axis=1)  # -inf at weight 0 adds nothing
    return g[:, None] * s, {"r": _reduce(g * (sx - y) / r, r)}


def attention_grad(xs: np.ndarray, g: np.ndarray, weights: np.ndarray) -> Grads:
    total = weights.sum()
    if total == 0:
        return np.zeros_like(xs), {"weights": np.zeros_like(weights)}
    y = xs @ weights / total
    return g[:, None] * weights[None, :] / total, {"weights": g @ (xs - y[:, None]) / total}


def sum_grad(xs: np.ndarray, g: np.ndarray) -> Grads:
    return np.repeat(g[:, None], xs.shape[1], axis=1), {}


def mean_sqrt_len_grad(xs: np.ndarray, g: np.ndarray) -> Grads:
    k = xs.shape[1]
    return np.repeat(g[:, None] / np.sqrt(k), k, axis=1), {}


def weightedmean_grad(xs: np.ndarray, g: np.ndarray) -> Grads:
    w = _ranks(xs.shape[1])
    return g[:, None] * w[None, :] / w.sum(), {}


def first_grad(xs: np.ndarray, g: np.ndarray) -> Grads:
    gx = np.zeros_like(xs)
    gx[:, 0] = g
    return gx, {}


def last_grad(xs: np.ndarray, g: np.ndarray) -> Grads:
    gx = np.zeros_like(xs)
    gx[:, -1] = g
    return gx, {}


FORWARD: dict[str, Callable[..., np.ndarray]] = {
    "avg": avg, "max": max_, "avgmax": avgmax, "catavgmax": catavgmax, "gem": gem, "lse": lse,
    "attention": attention, "sum": sum_, "first": first, "last": last,
    "mean_sqrt_len": mean_sqrt_len, "weightedmean": weightedmean,
}
GRAD: dict[str, Callable[..., Grads]] = {
    "avg": avg_grad, "max": max_grad, "avgmax": avgmax_grad, "catavgmax": catavgmax_grad,
    "gem": gem_grad, "lse": lse_grad, "attention": attention_grad, "sum": sum_grad,
    "first": first_grad, "last": last_grad,
    "mean_sqrt_len": mean_sqrt_len_grad, "weightedmean": weightedmean_grad,
}
