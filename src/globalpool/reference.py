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

from globalpool import registry

__all__ = [
    "LAYOUTS",
    "GlobalPool",
    "adaptive_backward",
    "adaptive_forward",
    "bins",
    "pool_backward",
    "pool_forward",
]

LAYOUTS: tuple[str, ...] = ("channels_first", "channels_last")


# --------------------------------------------------------------------------------------------
# argument handling: everything is brought to channels_first, spatial dims flattened to one


def _check_kind(kind: Any) -> None:
    if isinstance(kind, (tuple, list)):
        if not kind or len(set(kind)) != len(kind):
            raise ValueError(f"a tuple of kinds must be non-empty without repeats, got {kind!r}")
        for k in kind:
            _check_kind(k)
        return
    entry = registry.spec(kind)  # a ValueError naming the kinds if unknown
    if entry.reference is None:
        raise ValueError(f"kind {kind!r} was registered without a NumPy reference")


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
    arr = np.asarray(arr.detach().cpu() if hasattr(arr, "detach") else arr, dtype=dtype)
    if arr.shape != (n, *spatial):
        raise ValueError(f"{name} must have shape (N, *S) = {(n, *spatial)}, got {arr.shape}")
    return arr.reshape(n, -1)


def _out_channels(kind: Any, c: int) -> int:
    return sum(registry.spec(k).width * c for k in _kinds(kind))


def _params_of(kind: Any) -> dict[str, registry.Param]:
    """Every parameter the kind (or tuple of kinds) takes, by name."""
    return {q.name: q for k in _kinds(kind) for q in registry.spec(k).params}


# --------------------------------------------------------------------------------------------
# one sample: xs is (C, k) over its k real positions; per-position parameters are (k,)


def _sample_args(params: dict[str, Any], k: str, i: int, real: np.ndarray) -> dict[str, Any]:
    """Kind ``k``'s parameters for sample ``i``: a per-position array cut to its real positions."""
    out = {}
    for q in registry.spec(k).params:
        v = params[q.name]
        out[q.name] = v[i, real] if q.per_position else v
    return out


def _forward_one(xs: np.ndarray, k: str, args: dict[str, Any]) -> np.ndarray:
    if xs.shape[1] == 0:  # no real position: 0
        return np.zeros(registry.spec(k).width * xs.shape[0])
    return np.asarray(registry.spec(k).reference(xs, **args), dtype=np.float64)


def _backward_one(
    xs: np.ndarray, g: np.ndarray, k: str, args: dict[str, Any]
) -> tuple[np.ndarray, dict[str, Any]]:
    entry = registry.spec(k)
    if xs.shape[1] == 0:
        return np.zeros(xs.shape), {}
    if entry.reference_grad is None:
        raise ValueError(f"kind {k!r} was registered without a reference gradient")
    gx, grads = entry.reference_grad(xs, g, **args)
    return np.asarray(gx, dtype=np.float64), grads


def _prepare(x: Any, kind: Any, layout: str, mask: Any, params: dict[str, Any]):
    _check_kind(kind)
    wanted = _params_of(kind)
    # the oracle takes one set of parameters for every kind (each uses its own); a name that no
    # registered kind takes is a mistake
    known = {name for k in registry.kinds() for name in registry.spec(k).defaults}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"kind {kind!r} got unknown parameter(s) {unknown}")
    xc = _to_channels_first(x, layout)
    n, c, spatial = xc.shape[0], xc.shape[1], xc.shape[2:]
    flat = xc.reshape(n, c, -1)
    if mask is None:
        m = np.ones((n, flat.shape[2]), dtype=bool)
    else:
        m = _per_position(mask, "mask", n, spatial, bool)
    full: dict[str, Any] = {}
    for name, q in wanted.items():
        value = params.get(name, q.default)
        if q.per_position:
            if value is None:
                raise ValueError(f"{name} must be given for kind {kind!r}, got None")
            value = _per_position(value, name, n, spatial, np.float64)
            if np.any(value[m] < 0):
                raise ValueError(
                    f"{name} must be >= 0 at every real position, got a negative value"
                )
        else:
            value = _scalar_or_channels(value, name, c)
            if q.minimum is not None and q.minimum >= 0 and not np.all(np.asarray(value) > 0):
                raise ValueError(f"{name} must be > 0 for kind {kind!r}, got {value}")
        full[name] = value
    return xc, flat, m, full


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
    **params: Any,
) -> np.ndarray:
    """Global pooling of ``x`` over its spatial dims, in float64.

    ``kind`` is any registered kind with a reference, or a tuple of them: their outputs
    concatenated along channels, in that order (each takes the parameters it uses; omitted ones
    take the kind's defaults: ``p=3.0``, ``eps=1e-6`` for gem, ``r=1.0`` for lse; attention needs
    ``weights`` of shape ``(N, *S)``). ``first`` / ``last`` take the value at a sample's first /
    last real position in row-major order.

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
    xc, flat, m, full = _prepare(x, kind, layout, mask, params)
    n, c = flat.shape[:2]
    out = np.zeros((n, _out_channels(kind, c)))
    for i in range(n):
        real = m[i]
        out[i] = np.concatenate(
            [_forward_one(flat[i][:, real], k, _sample_args(full, k, i, real))
             for k in _kinds(kind)]
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
    **params: Any,
) -> dict[str, Any]:
    """Gradients of ``sum(grad_out * pool_forward(x, ...))``, in float64.

    ``grad_out`` may have the ``keepdim=False`` or the ``keepdim=True`` output shape (only its
    size is checked). Returns ``{"x": grad_x, "p": grad_p, "r": grad_r, "weights":
    grad_weights, ...}``: ``grad_x`` has the shape and layout of ``x``; then one entry per
    parameter that the kind's reference differentiates (``p`` of gem: a float, or a ``(C,)``
    array for a per-channel ``p``; ``r`` of lse likewise; ``weights`` of attention ``(N, *S)``);
    ``p``, ``r`` and ``weights`` are ``None`` for kinds without them. Padded positions and empty
    samples get exactly zero gradient; tied maxima share it equally.

    >>> import numpy as np
    >>> x = np.array([[[1.0, 3.0, 3.0, 2.0]]])
    >>> pool_backward(x, np.array([[1.0]]), "max")["x"]
    array([[[0. , 0.5, 0.5, 0. ]]])
    >>> pool_backward(x, np.array([[1.0]]), "avg", mask=np.array([[1, 1, 0, 0]]))["x"]
    array([[[0.5, 0.5, 0. , 0. ]]])
    """
    xc, flat, m, full = _prepare(x, kind, layout, mask, params)
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
    grads: dict[str, Any] = {"p": None, "r": None, "weights": None}
    for name, q in _params_of(kind).items():
        if q.per_position:
            grads[name] = np.zeros((n, length))
        else:
            grads[name] = np.zeros(c) if np.ndim(full[name]) else 0.0
    touched: set[str] = set()
    for i in range(n):
        real = m[i]
        start = 0
        for k in _kinds(kind):  # a tuple of kinds: each its block of grad_out, summed
            width = _out_channels(k, c)
            gxi, gparams = _backward_one(
                flat[i][:, real], g[i, start : start + width], k, _sample_args(full, k, i, real)
            )
            start += width
            gx[i][:, real] += gxi
            for name, value in gparams.items():
                touched.add(name)
                if np.ndim(grads[name]) == 2:  # per position
                    grads[name][i, real] += value
                else:
                    grads[name] = grads[name] + value
    for name, q in _params_of(kind).items():
        if q.per_position:
            grads[name] = grads[name].reshape((n, *xc.shape[2:]))
        elif name not in touched and registry.spec(_owner(kind, name)).reference_grad is None:
            grads[name] = None
    return {"x": _from_channels_first(gx.reshape(xc.shape), layout), **grads}


def _owner(kind: Any, name: str) -> str:
    return next(k for k in _kinds(kind) if name in registry.spec(k).defaults)


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
        known = set(_params_of(kind))
        unknown = set(params) - known
        if unknown:
            raise ValueError(f"params must be among {sorted(known)}, got {sorted(unknown)}")
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


def _box_args(box: tuple[slice, ...], mask: Any, params: dict[str, Any], kind: Any
              ) -> dict[str, Any]:
    """The bin's slice of the mask and of the per-position parameters (``(N, *S)``); the other
    parameters as they are."""
    sel = (slice(None), *box)
    per_position = {name for name, q in _params_of(kind).items() if q.per_position}
    out = {"mask": None if mask is None else np.asarray(mask)[sel]}
    for name, value in params.items():
        if name in per_position and value is not None:
            value = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value,
                               dtype=np.float64)[sel]
        out[name] = value
    return out


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
    y = np.zeros((n, _out_channels(kind, c), *out))
    for index, box in _boxes(spatial, out):
        region = xc[(slice(None), slice(None), *box)]
        y[(slice(None), slice(None), *index)] = pool_forward(
            region, kind, **_box_args(box, mask, params, kind)
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
    gx = np.zeros_like(xc)
    total: dict[str, Any] = {}
    for index, box in _boxes(spatial, out):
        region = xc[(slice(None), slice(None), *box)]
        grads = pool_backward(
            region, g[(slice(None), slice(None), *index)], kind,
            **_box_args(box, mask, params, kind),
        )
        gx[(slice(None), slice(None), *box)] += grads.pop("x")
        for name, value in grads.items():
            if value is None:
                total.setdefault(name, None)
            elif _params_of(kind)[name].per_position:
                total.setdefault(name, np.zeros((n, *spatial)))[(slice(None), *box)] += value
            else:
                total[name] = value if total.get(name) is None else total[name] + value
    return {"x": _from_channels_first(gx, layout), **total}
