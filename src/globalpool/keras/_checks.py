"""Argument checks of the Keras layers: plain Python, no tensor library.

Each error names the argument, the value received and what was expected, as the core's do; the
kinds, their parameters and ranges come from the registry.

>>> check_data_format("NHWC")
Traceback (most recent call last):
...
ValueError: data_format must be one of ('channels_first', 'channels_last'), got 'NHWC'
>>> check_params("gem", {"p": 2.0})
{'p': 2.0, 'eps': 1e-06}
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

from globalpool import registry

DATA_FORMATS = ("channels_first", "channels_last")

def _pooling_kind(entry: registry.KindSpec) -> bool:
    """A kind the GlobalPooling layers take: every registered kind but those with learned
    per-position weights (attention has layers of its own)."""
    return not any(q.per_position for q in entry.params)


#: The kinds of the GlobalPooling layers: a live view of the registry (a kind registered later
#: appears in it).
KINDS = registry.KindNames(_pooling_kind)


def check_kind(kind: Any) -> None:
    if isinstance(kind, str) and kind in registry.kinds() and kind not in KINDS:
        raise ValueError(
            f"kind must be one of {KINDS}, got {kind!r} (its weights are learned: use "
            "AttentionPooling1D/2D/3D)"
        )
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def check_data_format(data_format: Any) -> None:
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")


def check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(
            f"{name} must be a bool (True or False), got {value!r} of type {type(value).__name__}"
        )


def check_number(kind: str, name: str, value: Any) -> float:
    """A finite real number in the parameter's range, returned as a float."""
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"{name} for kind {kind!r} must be a real number, got {value!r}")
    try:
        v = float(value)
    except OverflowError:
        v = math.inf
    q = registry.spec(kind).param(name)
    if not math.isfinite(v):
        raise ValueError(f"{name} for kind {kind!r} must be finite, got {v}")
    if not q.in_range(v):
        raise ValueError(f"{name} for kind {kind!r} must be {q.expected}, got {v}")
    return v


def check_params(kind: str, params: dict[str, Any]) -> dict[str, float]:
    """Check the names and values of ``kind``'s parameters; return them with defaults filled."""
    defaults = registry.spec(kind).defaults
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        takes = ", ".join(defaults) or "no parameters"
        raise TypeError(f"kind {kind!r} got unexpected parameter(s) {unknown}; it takes {takes}")
    full = {**defaults, **params}
    return {name: check_number(kind, name, value) for name, value in full.items()}


def expected_shape(rank: int, data_format: str) -> str:
    """How a layer of ``rank`` spatial dims names its input, e.g. ``(N, H, W, C)``."""
    spatial = {1: "S", 2: "H, W", 3: "D, H, W"}[rank]
    return f"(N, C, {spatial})" if data_format == "channels_first" else f"(N, {spatial}, C)"


def check_rank(shape: tuple, rank: int, data_format: str, owner: str) -> None:
    """``shape`` must have ``rank + 2`` dims."""
    if len(shape) != rank + 2:
        raise ValueError(
            f"{owner} expects a {rank + 2}-D input {expected_shape(rank, data_format)} for "
            f"data_format={data_format!r}, got shape {tuple(shape)} ({len(shape)}-D)"
        )


def spatial_axes(rank: int, data_format: str) -> tuple[int, ...]:
    return (
        tuple(range(2, rank + 2)) if data_format == "channels_first" else tuple(range(1, rank + 1))
    )


def channel_axis(rank: int, data_format: str) -> int:
    return 1 if data_format == "channels_first" else rank + 1


def check_mask_shape(mask_shape: tuple, x_shape: tuple, rank: int, data_format: str) -> None:
    """The mask must be ``(N, *S)``; a dim unknown (None) on either side is not compared."""
    expected = (x_shape[0], *(x_shape[a] for a in spatial_axes(rank, data_format)))
    same = len(mask_shape) == len(expected) and all(
        m is None or e is None or m == e for m, e in zip(mask_shape, expected, strict=True)
    )
    if not same:
        raise ValueError(f"mask must have shape (N, *S) = {expected}, got {tuple(mask_shape)}")


def output_shape(
    shape: tuple, rank: int, data_format: str, keepdims: bool, width: int = 1
) -> tuple:
    """The pooled shape of an input ``shape``: ``(N, width * C)`` or with singleton spatial dims."""
    c_axis = channel_axis(rank, data_format)
    c = shape[c_axis]
    out_c = None if c is None else width * c
    if not keepdims:
        return (shape[0], out_c)
    out = [1] * len(shape)
    out[0], out[c_axis] = shape[0], out_c
    return tuple(out)


def softplus_inverse(y: float) -> float:
    """``log(exp(y) - 1)``, stably: the raw value whose softplus is ``y > 0``.

    >>> round(math.log1p(math.exp(softplus_inverse(2.0))), 12)
    2.0
    """
    return y + math.log(-math.expm1(-y))
