"""NumPy reference for every pooling kind: the definition and the test oracle.

Everything here is computed in float64 whatever the input dtype, written directly from the
definitions in the contract, one sample at a time over its real positions. Clarity beats speed:
the fused kernels and the torch path are checked against these functions, never the reverse.

Shapes: ``x`` is ``(N, C, *S)`` for ``layout="channels_first"`` and ``(N, *S, C)`` for
``"channels_last"``, with ``len(S)`` in ``{1, 2, 3}``. ``mask`` is a bool ``(N, *S)`` array,
``True`` marking a real position; padded positions are never read, so they may hold NaN or inf.

>>> import numpy as np
>>> x = np.array([[[1.0, 2.0, 6.0]]])          # N=1, C=1, S=(3,)
>>> pool_forward(x, "avg"), pool_forward(x, "max")
(array([[3.]]), array([[6.]]))
>>> pool_forward(x, "avg", mask=np.array([[True, True, False]]))
array([[1.5]])
>>> pool_backward(x, np.ones((1, 1)), "max")["x"]
array([[[0., 0., 1.]]])
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

__all__ = [
    "KINDS",
    "LAYOUTS",
    "GlobalPool",
    "adaptive_backward",
    "adaptive_forward",
    "bins",
    "pool_backward",
    "pool_forward",
]

KINDS: tuple[str, ...] = (
    "avg", "max", "avgmax", "catavgmax", "gem", "lse", "attention", "sum", "first", "last",
)
LAYOUTS: tuple[str, ...] = ("channels_first", "channels_last")


# --------------------------------------------------------------------------------------------
# argument handling: everything is brought to channels_first, spatial dims flattened to one


def _check_kind(kind: Any, allowed: tuple[str, ...] = KINDS) -> None:
    if isinstance(kind, (tuple, list)):
        if not kind or len(set(kind)) != len(kind):
            raise ValueError(f"a tuple of kinds must be non-empty without repeats, got {kind!r}")
        for k in kind:
            _check_kind(k, allowed)
        return
    if kind not in allowed:
        raise ValueError(f"kind must be one of {allowed}, got {kind!r}")


def _kinds(kind: Any) -> tuple[str, ...]:
    return tuple(kind) if isinstance(kind, (tuple, list)) else (kind,)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _to_channels_first(x: Any, layout: str) -> np.ndarray:
    """Return ``x`` as a float64 ``(N, C, *S)`` array."""
    _check_layout(layout)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim not in (3, 4, 5):
        raise ValueError(
            f"x must have 3, 4 or 5 dims ((N, C, *S) or (N, *S, C) with len(S) in 1..3), "
            f"got shape {x.shape}"
        )
    return np.moveaxis(x, -1, 1) if layout == "channels_last" else x


def _from_channels_first(a: np.ndarray, layout: str) -> np.ndarray:
    return np.moveaxis(a, 1, -1) if layout == "channels_last" else a


def _per_position(arr: Any, name: str, n: int, spatial: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Check a ``(N, *S)`` array (mask or weights) and flatten it to ``(N, L)``."""
    arr = np.asarray(arr, dtype=dtype)
    if arr.shape != (n, *spatial):
        raise ValueError(f"{name} must have shape (N, *S) = {(n, *spatial)}, got {arr.shape}")
    return arr.reshape(n, -1)


def _out_channels(kind: Any, c: int) -> int:
    return sum(2 * c if k == "catavgmax" else c for k in _kinds(kind))


# --------------------------------------------------------------------------------------------
# one sample: xs is (C, k) over its k real positions, w is (k,) (attention only)


def _forward_one(xs: np.ndarray, kind: str, p: float, eps: float, r: float, w: np.ndarray | None):
    c, k = xs.shape
    if k == 0:
        return np.zeros(_out_channels(kind, c))
    if kind == "avg":
        return xs.mean(axis=1)
    if kind == "max":
        return xs.max(axis=1)
    if kind == "avgmax":
        return 0.5 * (xs.mean(axis=1) + xs.max(axis=1))
    if kind == "catavgmax":
        return np.concatenate([xs.mean(axis=1), xs.max(axis=1)])
    if kind == "gem":  # scaled by the row maximum: no power over- or underflows float64
        clamped = np.maximum(xs, eps)
        top = clamped.max(axis=1)
        return top * np.mean((clamped / top[:, None]) ** _col(p), axis=1) ** (1.0 / p)
    if kind == "lse":  # shifted by the maximum where it is finite (a row with +inf is +inf)
        top = xs.max(axis=1)
        top = np.where(np.isfinite(top), top, 0.0)
        return top + np.log(np.mean(np.exp(_col(r) * (xs - top[:, None])), axis=1)) / r
    if kind == "sum":
        return xs.sum(axis=1)
    if kind == "first":  # the real positions are in row-major order
        return xs[:, 0].copy()
    if kind == "last":
        return xs[:, -1].copy()
    # attention
    total = w.sum()
    if total == 0:
        return np.zeros(c)
    return xs @ w / total


def _col(v: float | np.ndarray) -> float | np.ndarray:
    """A per-channel parameter ``(C,)`` as a column ``(C, 1)`` against ``(C, k)``; a float as
    it is."""
    return v[:, None] if np.ndim(v) else v


def _max_share(xs: np.ndarray) -> np.ndarray:
    """d max / d x with ties sharing equally: (C, k), each row sums to 1."""
    ties = (xs == xs.max(axis=1, keepdims=True)).astype(np.float64)
    return ties / ties.sum(axis=1, keepdims=True)


def _backward_one(
    xs: np.ndarray,
    g: np.ndarray,
    kind: str,
    p: float,
    eps: float,
    r: float,
    w: np.ndarray | None,
):
    """Return (grad xs (C, k), grad p, grad r, grad w (k,)) for one sample; grad p and grad r
    are floats, or (C,) arrays for a per-channel p or r."""
    c, k = xs.shape
    gx = np.zeros((c, k))
    gp = gr = 0.0
    gw = np.zeros(k)
    if k == 0:
        return gx, gp, gr, gw
    if kind == "avg":
        gx = np.repeat(g[:, None] / k, k, axis=1)
    elif kind == "max":
        gx = g[:, None] * _max_share(xs)
    elif kind == "avgmax":
        gx = 0.5 * g[:, None] / k + 0.5 * g[:, None] * _max_share(xs)
    elif kind == "catavgmax":
        g_avg, g_max = g[:c], g[c:]
        gx = g_avg[:, None] / k + g_max[:, None] * _max_share(xs)
    elif kind == "gem":
        # y = m^(1/p), m = mean(z^p), z = clamp(x, eps); with u = z / y (so mean(u^p) = 1 up to
        # rounding, and no power of an unscaled z): dy/dz = u^(p-1) / k and
        # dy/dp = y * (-log(mean u^p) / p^2 + mean(u^p log u) / (p mean u^p))
        z = np.maximum(xs, eps)
        top = z.max(axis=1, keepdims=True)
        pc = _col(p)
        y = top[:, 0] * np.mean((z / top) ** pc, axis=1) ** (1.0 / p)
        u = z / y[:, None]
        mu = np.mean(u**pc, axis=1)
        gx = g[:, None] * u ** (pc - 1.0) / k * (xs >= eps)
        dy_dp = y * (-np.log(mu) / p**2 + np.mean(u**pc * np.log(u), axis=1) / (p * mu))
        gp = g * dy_dp if np.ndim(p) else float(np.sum(g * dy_dp))
    elif kind == "lse":
        # with s = softmax(r x) over the row: dy/dx = s and dy/dr = (sum(s x) - y) / r
        e = np.exp(_col(r) * (xs - xs.max(axis=1, keepdims=True)))
        s = e / e.sum(axis=1, keepdims=True)
        gx = g[:, None] * s
        y = _forward_one(xs, "lse", p, eps, r, w)
        sx = np.sum(np.where(s > 0, s * xs, 0.0), axis=1)  # -inf at weight 0 adds nothing
        dy_dr = (sx - y) / r
        gr = g * dy_dr if np.ndim(r) else float(np.sum(g * dy_dr))
    elif kind == "sum":
        gx = np.repeat(g[:, None], k, axis=1)
    elif kind in ("first", "last"):
        gx[:, 0 if kind == "first" else k - 1] = g
    else:  # attention
        total = w.sum()
        if total == 0:
            return gx, gp, gr, gw
        y = xs @ w / total
        gx = g[:, None] * w[None, :] / total
        gw = g @ (xs - y[:, None]) / total
    return gx, gp, gr, gw


def _prepare(x, kind, layout, mask, weights, p, eps, r):
    _check_kind(kind)
    xc = _to_channels_first(x, layout)
    n, c, spatial = xc.shape[0], xc.shape[1], xc.shape[2:]
    flat = xc.reshape(n, c, -1)
    if mask is None:
        m = np.ones((n, flat.shape[2]), dtype=bool)
    else:
        m = _per_position(mask, "mask", n, spatial, bool)
    w = None
    if "attention" in _kinds(kind):
        if weights is None:
            raise ValueError("weights must be given for kind='attention', got None")
        w = _per_position(weights, "weights", n, spatial, np.float64)
        if np.any(w[m] < 0):
            raise ValueError("weights must be >= 0 at every real position, got a negative value")
    p, r = _scalar_or_channels(p, "p", c), _scalar_or_channels(r, "r", c)
    if "gem" in _kinds(kind) and not np.all(p > 0):
        raise ValueError(f"p must be > 0 for kind='gem', got {p}")
    if "lse" in _kinds(kind) and not np.all(r > 0):
        raise ValueError(f"r must be > 0 for kind='lse', got {r}")
    return xc, flat, m, w, p, float(eps), r


def _scalar_or_channels(v: Any, name: str, c: int) -> float | np.ndarray:
    """A float, or a float64 ``(C,)`` array for a per-channel parameter."""
    a = np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, dtype=np.float64)
    if a.ndim == 0:
        return float(a)
    if a.shape != (c,):
        raise ValueError(f"{name} must be a number or of shape (C,) = ({c},), got {a.shape}")
    return a


# --------------------------------------------------------------------------------------------
# global pooling


def pool_forward(
    x: Any,
    kind: str,
    *,
    layout: str = "channels_first",
    keepdim: bool = False,
    mask: Any = None,
    p: float = 3.0,
    eps: float = 1e-6,
    r: float = 1.0,
    weights: Any = None,
) -> np.ndarray:
    """Global pooling of ``x`` over its spatial dims, in float64.

    ``kind`` may be a tuple of kinds: their outputs concatenated along channels, in that order
    (each takes the parameters it uses). ``first`` / ``last`` take the value at a sample's
    first / last real position in row-major order.

    Returns ``(N, C)`` (``(N, 2C)`` for ``"catavgmax"``, avg block first). With ``keepdim=True``
    the singleton spatial dims sit in the layout's positions: ``(N, C, 1, 1)`` or
    ``(N, 1, 1, C)``. A sample whose mask has no real position pools to 0. ``p`` (gem) and
    ``r`` (lse) are numbers, or arrays of shape ``(C,)``: one value per channel.

    >>> import numpy as np
    >>> x = np.array([[[[1.0, 3.0], [3.0, 1.0]]]])            # (1, 1, 2, 2)
    >>> pool_forward(x, "catavgmax", keepdim=True).shape
    (1, 2, 1, 1)
    >>> pool_forward(x, "gem", p=1.0)
    array([[2.]])
    >>> pool_forward(x, "attention", weights=np.array([[[1.0, 0.0], [0.0, 0.0]]]))
    array([[1.]])
    >>> pool_forward(x, ("sum", "first", "last"), mask=np.array([[[False, True], [True, False]]]))
    array([[6., 3., 3.]])
    >>> pool_forward(np.concatenate([x, x], axis=1), "gem", p=np.array([1.0, 2.0]))  # per channel
    array([[2.        , 2.23606798]])
    """
    xc, flat, m, w, p, eps, r = _prepare(x, kind, layout, mask, weights, p, eps, r)
    n, c = flat.shape[:2]
    out = np.zeros((n, _out_channels(kind, c)))
    for i in range(n):
        real = m[i]
        wi = None if w is None else w[i, real]
        out[i] = np.concatenate(
            [_forward_one(flat[i][:, real], k, p, eps, r, wi) for k in _kinds(kind)]
        )
    if keepdim:
        out = _from_channels_first(out.reshape(out.shape + (1,) * (xc.ndim - 2)), layout)
    return out


def pool_backward(
    x: Any,
    grad_out: Any,
    kind: str,
    *,
    layout: str = "channels_first",
    mask: Any = None,
    p: float = 3.0,
    eps: float = 1e-6,
    r: float = 1.0,
    weights: Any = None,
) -> dict[str, Any]:
    """Gradients of ``sum(grad_out * pool_forward(x, ...))``, in float64.

    ``grad_out`` may have the ``keepdim=False`` or the ``keepdim=True`` output shape (only its
    size is checked). Returns ``{"x": grad_x, "p": grad_p, "r": grad_r, "weights":
    grad_weights}`` where ``grad_x`` has the shape and layout of ``x``, ``grad_p`` is a float for
    ``"gem"`` (a ``(C,)`` array for a per-channel ``p``; else ``None``), ``grad_r`` likewise for
    ``"lse"`` and ``r``, and ``grad_weights`` is ``(N, *S)``
    for ``"attention"`` (else ``None``). Padded positions and empty samples get exactly zero
    gradient; tied maxima share it equally.

    >>> import numpy as np
    >>> x = np.array([[[1.0, 3.0, 3.0, 2.0]]])
    >>> pool_backward(x, np.array([[1.0]]), "max")["x"]
    array([[[0. , 0.5, 0.5, 0. ]]])
    >>> pool_backward(x, np.array([[1.0]]), "avg", mask=np.array([[1, 1, 0, 0]]))["x"]
    array([[[0.5, 0.5, 0. , 0. ]]])
    """
    xc, flat, m, w, p, eps, r = _prepare(x, kind, layout, mask, weights, p, eps, r)
    n, c, length = flat.shape
    c_out = _out_channels(kind, c)
    g = np.asarray(grad_out, dtype=np.float64)
    if g.size != n * c_out:
        raise ValueError(
            f"grad_out must have {n * c_out} elements (output shape ({n}, {c_out}) with or "
            f"without keepdim), got shape {g.shape}"
        )
    g = g.reshape(n, c_out)
    gx = np.zeros((n, c, length))
    gw = np.zeros((n, length))
    gp = np.zeros(c) if np.ndim(p) else 0.0
    gr = np.zeros(c) if np.ndim(r) else 0.0
    for i in range(n):
        real = m[i]
        wi = None if w is None else w[i, real]
        start = 0
        for k in _kinds(kind):  # a tuple of kinds: each its block of grad_out, summed
            width = _out_channels(k, c)
            gxi, gpi, gri, gwi = _backward_one(
                flat[i][:, real], g[i, start : start + width], k, p, eps, r, wi
            )
            start += width
            gx[i][:, real] += gxi
            gw[i, real] += gwi
            gp += gpi
            gr += gri
    grad_x = _from_channels_first(gx.reshape(xc.shape), layout)
    return {
        "x": grad_x,
        "p": gp if "gem" in _kinds(kind) else None,
        "r": gr if "lse" in _kinds(kind) else None,
        "weights": gw.reshape((n, *xc.shape[2:])) if "attention" in _kinds(kind) else None,
    }


class GlobalPool:
    """Stateful wrapper: ``forward`` caches its inputs, ``backward`` returns their gradients.

    ``params`` are the kind's keyword parameters (``p``, ``eps``, ``r``, ``weights``); the
    attention ``weights`` may also be passed per call to ``forward``.

    >>> import numpy as np
    >>> layer = GlobalPool("lse", r=2.0)
    >>> x = np.zeros((2, 3, 4, 4))
    >>> layer.forward(x).shape
    (2, 3)
    >>> float(layer.backward(np.ones((2, 3)))["x"].sum())
    6.0
    """

    def __init__(
        self,
        kind: str,
        layout: str = "channels_first",
        keepdim: bool = False,
        **params: Any,
    ) -> None:
        _check_kind(kind)
        _check_layout(layout)
        unknown = set(params) - {"p", "eps", "r", "weights"}
        if unknown:
            raise ValueError(
                f"params must be among ('p', 'eps', 'r', 'weights'), got {sorted(unknown)}"
            )
        self.kind = kind
        self.layout = layout
        self.keepdim = keepdim
        self.params = dict(params)
        self._cache: dict[str, Any] | None = None

    def forward(self, x: Any, mask: Any = None, weights: Any = None) -> np.ndarray:
        params = dict(self.params)
        if weights is not None:
            params["weights"] = weights
        self._cache = {"x": np.asarray(x), "mask": mask, "params": params}
        return pool_forward(
            x, self.kind, layout=self.layout, keepdim=self.keepdim, mask=mask, **params
        )

    __call__ = forward

    def backward(self, grad_out: Any) -> dict[str, Any]:
        if self._cache is None:
            raise RuntimeError("backward called before forward")
        cache = self._cache
        return pool_backward(
            cache["x"],
            grad_out,
            self.kind,
            layout=self.layout,
            mask=cache["mask"],
            **cache["params"],
        )

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items() if k != "weights")
        return f"GlobalPool({self.kind!r}, layout={self.layout!r}{extra})"


# --------------------------------------------------------------------------------------------
# adaptive pooling


def bins(in_size: int, out_size: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive bins ``[start, end)``: ``floor(i*In/Out)`` to ``ceil((i+1)*In/Out)``.

    >>> bins(5, 3)
    [(0, 2), (1, 4), (3, 5)]
    >>> bins(2, 4)
    [(0, 1), (0, 1), (1, 2), (1, 2)]
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"in_size and out_size must be >= 1, got {in_size} and {out_size}")
    # ceil(a / b) == -((-a) // b) for integers, so no float rounding can creep in
    return [(i * in_size // out_size, -(-(i + 1) * in_size // out_size)) for i in range(out_size)]


def _output_size(output_size: Any, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Per-dim output sizes; ``None`` keeps that dim's input size."""
    rank = len(spatial)
    if output_size is None or isinstance(output_size, (int, np.integer)):
        sizes = (output_size,) * rank
    else:
        sizes = tuple(output_size)
    if len(sizes) != rank or any(s is not None and int(s) < 1 for s in sizes):
        raise ValueError(
            f"output_size must be a positive int or a tuple of {rank} positive ints or None, "
            f"got {output_size!r}"
        )
    return tuple(i if s is None else int(s) for s, i in zip(sizes, spatial, strict=True))


def _boxes(spatial: tuple[int, ...], out: tuple[int, ...]):
    """Yield (output index, tuple of slices) for every adaptive bin."""
    per_dim = [bins(i, o) for i, o in zip(spatial, out, strict=True)]
    for index in itertools.product(*(range(o) for o in out)):
        box = tuple(slice(*per_dim[d][j]) for d, j in enumerate(index))
        yield index, box


def _box_args(box: tuple[slice, ...], mask: Any, weights: Any) -> dict[str, Any]:
    """The bin's slice of the per-position arrays (``(N, *S)``)."""
    sel = (slice(None), *box)
    return {
        "mask": None if mask is None else np.asarray(mask)[sel],
        "weights": None if weights is None else np.asarray(weights, dtype=np.float64)[sel],
    }


def adaptive_forward(
    x: Any,
    output_size: Any,
    kind: str = "avg",
    *,
    layout: str = "channels_first",
    mask: Any = None,
    **params: Any,
) -> np.ndarray:
    """Adaptive pooling with PyTorch's bins, in float64: each bin is pooled with
    :func:`pool_forward` over its real positions (an empty bin gives 0).

    Output ``(N, C', *out)`` or ``(N, *out, C')`` with ``C'`` the kind's output width;
    ``None`` in ``output_size`` keeps that dim.

    >>> import numpy as np
    >>> x = np.arange(5.0).reshape(1, 1, 5)
    >>> adaptive_forward(x, 3)
    array([[[0.5, 2. , 3.5]]])
    >>> adaptive_forward(x, 3, "max")
    array([[[1., 3., 4.]]])
    >>> adaptive_forward(x, 2, "avg", mask=np.array([[True, False, False, True, True]]))
    array([[[0. , 3.5]]])
    """
    _check_kind(kind)
    xc = _to_channels_first(x, layout)
    n, c, spatial = xc.shape[0], xc.shape[1], xc.shape[2:]
    out = _output_size(output_size, spatial)
    weights = params.get("weights")
    scalars = {k: v for k, v in params.items() if k != "weights"}
    y = np.zeros((n, _out_channels(kind, c), *out))
    for index, box in _boxes(spatial, out):
        region = xc[(slice(None), slice(None), *box)]
        y[(slice(None), slice(None), *index)] = pool_forward(
            region, kind, **_box_args(box, mask, weights), **scalars
        )
    return _from_channels_first(y, layout)


def adaptive_backward(
    x: Any,
    grad_out: Any,
    output_size: Any,
    kind: str = "avg",
    *,
    layout: str = "channels_first",
    mask: Any = None,
    **params: Any,
) -> dict[str, Any]:
    """Gradients of ``sum(grad_out * adaptive_forward(x, ...))``: each bin's
    :func:`pool_backward`, summed where bins overlap.

    Returns ``{"x": ..., "p": ..., "r": ..., "weights": ...}`` as :func:`pool_backward`. Tied
    maxima in a bin share its gradient equally, as in global pooling (``F.adaptive_max_pool*d``
    gives it all to the first).

    >>> import numpy as np
    >>> x = np.array([[[5.0, 5.0, 1.0, 2.0]]])
    >>> adaptive_backward(x, np.ones((1, 1, 1)), 1, "max")["x"]
    array([[[0.5, 0.5, 0. , 0. ]]])
    >>> adaptive_backward(x, np.ones((1, 1, 2)), 2, "avg")["x"]
    array([[[0.5, 0.5, 0.5, 0.5]]])
    """
    _check_kind(kind)
    xc = _to_channels_first(x, layout)
    n, c, spatial = xc.shape[0], xc.shape[1], xc.shape[2:]
    out = _output_size(output_size, spatial)
    g = _to_channels_first(grad_out, layout)
    expected = (n, _out_channels(kind, c), *out)
    if g.shape != expected:
        shown = expected if layout == "channels_first" else (n, *out, expected[1])
        raise ValueError(f"grad_out must have shape {shown}, got {np.shape(grad_out)}")
    weights = params.get("weights")
    scalars = {k: v for k, v in params.items() if k != "weights"}
    gx = np.zeros_like(xc)
    gw = np.zeros((n, *spatial))
    gp = gr = 0.0
    for index, box in _boxes(spatial, out):
        region = xc[(slice(None), slice(None), *box)]
        grads = pool_backward(
            region, g[(slice(None), slice(None), *index)], kind,
            **_box_args(box, mask, weights), **scalars,
        )
        gx[(slice(None), slice(None), *box)] += grads["x"]
        if grads["weights"] is not None:
            gw[(slice(None), *box)] += grads["weights"]
        if grads["p"] is not None:
            gp += grads["p"]
        if grads["r"] is not None:
            gr += grads["r"]
    return {
        "x": _from_channels_first(gx, layout),
        "p": gp if "gem" in _kinds(kind) else None,
        "r": gr if "lse" in _kinds(kind) else None,
        "weights": gw if "attention" in _kinds(kind) else None,
    }
