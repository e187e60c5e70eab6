"""Every pooling kind in ``keras.ops``: the same numerics as ``globalpool.compose``, any backend.

Padded positions are replaced before any non-linear op and empty samples go through a "double
where", so a NaN or inf held at a padded position never reaches the output or the gradient, and a
sample with no real position pools to 0 with zero gradient. Half inputs accumulate in float32.

>>> import keras, numpy as np
>>> x = np.arange(8.0, dtype="float32").reshape(1, 4, 2)        # (N, S, C), channels_last
>>> keras.ops.convert_to_numpy(pool(x, "catavgmax", axes=(1,), channel_axis=2)).tolist()
[[3.0, 4.0, 6.0, 7.0]]
"""

from __future__ import annotations

from typing import Any

from keras import backend, ops

from globalpool import registry

_HALF = ("float16", "bfloat16")


def _count(mask: Any, axes: tuple[int, ...], dtype: str) -> Any:
    return ops.maximum(ops.sum(ops.cast(mask, dtype), axis=axes, keepdims=True), 1.0)


def _mean_of(values: Any, mask: Any, axes: tuple[int, ...]) -> Any:
    """Mean over real positions of values already zeroed where padded; empty samples give 0."""
    if mask is None:
        return ops.mean(values, axis=axes, keepdims=True)
    return ops.sum(values, axis=axes, keepdims=True) / _count(mask, axes, values.dtype)


def _nonempty(mask: Any, axes: tuple[int, ...]) -> Any:
    return None if mask is None else ops.any(mask, axis=axes, keepdims=True)


def _where_nonempty(nonempty: Any, y: Any, fill: float = 0.0) -> Any:
    return y if nonempty is None else ops.where(nonempty, y, fill)


def avg(x: Any, mask: Any, axes: tuple[int, ...]) -> Any:
    if mask is not None:
        x = ops.where(mask, x, 0.0)
    return _mean_of(x, mask, axes)


def max_(x: Any, mask: Any, axes: tuple[int, ...]) -> Any:
    if mask is None:
        return ops.max(x, axis=axes, keepdims=True)
    y = ops.max(ops.where(mask, x, -float("inf")), axis=axes, keepdims=True)
    return _where_nonempty(_nonempty(mask, axes), y)


def gem(x: Any, mask: Any, axes: tuple[int, ...], p: Any, eps: float) -> Any:
    if mask is not None:  # padded slots at the clamp floor: the scale is a real position's
        x = ops.where(mask, x, eps)
    clamped = ops.where(x < eps, eps, x)  # torch's clamp(min=eps): gradient 1 where x >= eps
    # 1-homogeneous: scaling by the (constant) max keeps clamp(x)^p from underflowing to 0
    top = ops.stop_gradient(ops.max(clamped, axis=axes, keepdims=True))
    powered = ops.power(clamped / top, p)
    if mask is not None:
        powered = ops.where(mask, powered, 0.0)
    mean = _mean_of(powered, mask, axes)
    nonempty = _nonempty(mask, axes)
    if nonempty is not None:
        mean = ops.where(nonempty, mean, 1.0)
    return _where_nonempty(nonempty, top * ops.power(mean, 1.0 / p))


def lse(x: Any, mask: Any, axes: tuple[int, ...], r: float) -> Any:
    if mask is not None:
        x = ops.where(mask, x, -float("inf"))
    top = ops.stop_gradient(ops.max(x, axis=axes, keepdims=True))
    top = ops.where(ops.isfinite(top), top, 0.0)
    mean = _mean_of(ops.exp(r * (x - top)), mask, axes)
    nonempty = _nonempty(mask, axes)
    if nonempty is not None:
        mean = ops.where(nonempty, mean, 1.0)
    return _where_nonempty(nonempty, top + ops.log(mean) / r)


def attention(x: Any, mask: Any, axes: tuple[int, ...], weights: Any) -> Any:
    """``weights`` is already broadcastable to ``x`` (channel axis of size 1), non-negative."""
    weights = ops.cast(weights, x.dtype)
    if mask is not None:
        x = ops.where(mask, x, 0.0)
        weights = ops.where(mask, weights, 0.0)
    total = ops.sum(weights, axis=axes, keepdims=True)
    positive = total > 0
    y = ops.sum(x * weights, axis=axes, keepdims=True) / ops.where(positive, total, 1.0)
    return ops.where(positive, y, 0.0)


def sum_(x: Any, mask: Any, axes: tuple[int, ...]) -> Any:
    if mask is not None:
        x = ops.where(mask, x, 0.0)
    return ops.sum(x, axis=axes, keepdims=True)


def mean_sqrt_len(x: Any, mask: Any, axes: tuple[int, ...]) -> Any:
    """The sum over real positions over the square root of their number (0 if none)."""
    if mask is None:
        shape = ops.shape(x)
        count = 1
        for a in axes:
            count = count * shape[a]
        return sum_(x, None, axes) / ops.sqrt(ops.cast(count, x.dtype))
    count = ops.sum(ops.cast(mask, x.dtype), axis=axes, keepdims=True)
    # (not _count: its ops.maximum may give float32, and the root would keep that rounding)
    return sum_(x, mask, axes) / ops.sqrt(ops.where(count > 0, count, 1.0))


def weightedmean(x: Any, mask: Any) -> Any:
    """The rank-weighted mean over the canonical view (``x`` ``(N, C, L)``, ``mask``
    ``(N, 1, L)`` or None): the j-th real position weighs j."""
    if mask is None:
        mask = ops.ones_like(x[:1, :1, :], dtype="bool")
    weights = ops.where(mask, ops.cumsum(ops.cast(mask, x.dtype), axis=-1), 0.0)
    total = ops.sum(weights, axis=-1)
    weighted = ops.sum(ops.where(mask, x, 0.0) * weights, axis=-1)
    return weighted / ops.where(total > 0, total, 1.0)  # (ops.maximum may give float32)


def _row_major_positions(x: Any, axes: tuple[int, ...]) -> tuple[Any, Any]:
    """Each position's index in row-major order over ``axes`` (broadcastable to x), and the
    number of positions."""
    shape = ops.shape(x)
    pos, stride = None, 1
    for a in sorted(axes, reverse=True):
        size = shape[a]
        index = ops.reshape(ops.arange(size, dtype="int32"),
                            [size if i == a else 1 for i in range(len(shape))])
        pos = index * stride if pos is None else pos + index * stride
        stride = stride * size
    return pos, stride


def at_end(x: Any, mask: Any, axes: tuple[int, ...], last: bool) -> Any:
    """The value at the first (``last=False``) or last real position in row-major order: a
    one-hot selection, so the gradient is 1 there and exactly 0 elsewhere (padding included)."""
    pos, length = _row_major_positions(x, axes)
    if mask is None:
        selected = pos == (length - 1 if last else 0)
    else:
        if last:
            target = ops.max(ops.where(mask, pos, -1), axis=axes, keepdims=True)
        else:
            target = ops.min(ops.where(mask, pos, length), axis=axes, keepdims=True)
        selected = ops.logical_and(mask, pos == target)
    return ops.sum(ops.where(selected, x, 0.0), axis=axes, keepdims=True)


def pool(
    x: Any,
    kind: str,
    *,
    axes: tuple[int, ...],
    channel_axis: int,
    keepdims: bool = False,
    mask: Any = None,
    **params: Any,
) -> Any:
    """Pool ``x`` over ``axes``; ``mask`` is ``(N, *S)`` bool (or None), ``params`` the kind's
    (already checked: ``p``, ``eps``, ``r`` or ``weights`` of shape ``(N, *S)``)."""
    x = ops.convert_to_tensor(x)
    dtype = backend.standardize_dtype(x.dtype)
    acc = ops.cast(x, "float32") if dtype in _HALF else x
    if mask is not None:
        mask = ops.expand_dims(ops.cast(mask, "bool"), channel_axis)
    builtin = _BUILTIN.get(kind)
    if builtin is not None:
        y = builtin(acc, mask, axes, channel_axis, params)
    else:
        y = _registered(acc, kind, mask, axes, channel_axis, params)
    y = ops.cast(y, dtype)
    return y if keepdims else ops.squeeze(y, axis=axes)


def _registered(x: Any, kind: str, mask: Any, axes: tuple[int, ...], channel_axis: int,
                params: dict) -> Any:
    """A user's kind through its ``keras=`` composition over the canonical view ``(N, C, L)``
    (a kind registered without one runs on the torch backend only, through ``gp.pool``)."""
    composition = registry.spec(kind).keras
    if composition is None:
        raise ValueError(
            f"kind {kind!r} has no keras.ops composition: register it with keras=... to use it on "
            f"the {backend.backend()} backend (the torch backend runs its torch composition)"
        )
    return _on_canonical_view(composition, x, mask, axes, channel_axis, params)


def _on_canonical_view(composition: Any, x: Any, mask: Any, axes: tuple[int, ...],
                       channel_axis: int, params: dict) -> Any:
    """``composition(view, mask, **params)`` over the canonical view ``(N, C, L)`` (the pooled
    axes flattened in row-major order), its ``(N, W)`` result shaped with the axes kept."""
    rank = len(ops.shape(x))
    order = [0, channel_axis, *axes]
    shape = ops.shape(x)
    view = ops.reshape(ops.transpose(x, order), (shape[0], shape[channel_axis], -1))
    m = None if mask is None else ops.reshape(ops.transpose(mask, order), (shape[0], 1, -1))
    y = composition(view, m, **params)
    kept = [1] * rank
    kept[0] = shape[0]
    kept[channel_axis] = ops.shape(y)[1]
    return ops.reshape(y, kept)


_BUILTIN = {  # the built-in kinds' keras.ops compositions (a test holds them to the registry)
    "avg": lambda x, m, axes, c, p: avg(x, m, axes),
    "max": lambda x, m, axes, c, p: max_(x, m, axes),
    "avgmax": lambda x, m, axes, c, p: (avg(x, m, axes) + max_(x, m, axes)) / 2,
    "catavgmax": lambda x, m, axes, c, p: ops.concatenate([avg(x, m, axes), max_(x, m, axes)],
                                                          axis=c),
    "gem": lambda x, m, axes, c, p: gem(x, m, axes, _as(p["p"], x), p["eps"]),
    "lse": lambda x, m, axes, c, p: lse(x, m, axes, p["r"]),
    "attention": lambda x, m, axes, c, p: attention(x, m, axes, ops.expand_dims(p["weights"], c)),
    "sum": lambda x, m, axes, c, p: sum_(x, m, axes),
    "first": lambda x, m, axes, c, p: at_end(x, m, axes, last=False),
    "last": lambda x, m, axes, c, p: at_end(x, m, axes, last=True),
    "mean_sqrt_len": lambda x, m, axes, c, p: mean_sqrt_len(x, m, axes),
    "weightedmean": lambda x, m, axes, c, p: _on_canonical_view(weightedmean, x, m, axes, c, {}),
}


def _as(value: Any, like: Any) -> Any:
    """``p`` (a number or GeM's learned 0-dim tensor) as a tensor of the accumulation dtype:
    ``ops.power`` would otherwise take a number as float32, and ``1 / p`` with it."""
    return ops.cast(ops.convert_to_tensor(value), like.dtype)
