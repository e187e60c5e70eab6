"""Argument checks for the one pooling contract, normalised into a small :class:`PoolSpec`.

Every public entry point (``pool``, ``adaptive_pool``, the layers) funnels its arguments through
:func:`pool_spec` or :func:`adaptive_spec`, so every kind gets the same checks and the same error
messages: each names the argument, the value received and what was expected.

>>> import torch
>>> spec = pool_spec(torch.zeros(2, 3, 4, 4), "gem", "channels_first", None, {"p": 2.0})
>>> spec.spatial_dims, spec.params["p"], spec.params["eps"]
((2, 3), 2.0, 1e-06)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from numbers import Real
from typing import Any, NamedTuple

import torch

from globalpool import registry
from globalpool.registry import Param

LAYOUTS = ("channels_first", "channels_last")


class PoolSpec(NamedTuple):
    """Validated, normalised arguments of one pooling call (a named tuple: every eager call
    builds one, and a tuple is several times cheaper to build than a frozen dataclass).
    ``kind`` is a name, or a tuple of names pooled side by side."""

    kind: str | tuple[str, ...]
    layout: str
    channel_dim: int
    spatial_dims: tuple[int, ...]
    params: dict[str, Any]

    @property
    def spatial_rank(self) -> int:
        return len(self.spatial_dims)


def _tracing() -> bool:
    """True under torch.compile / torch.export: tensor values are unknown while tracing, so their
    checks become graph nodes (:func:`_check_traced`)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def check_input(x: Any, name: str = "x") -> None:
    """Check that ``x`` is a floating tensor of rank 3 to 5 with no empty spatial dim."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(
            f"{name} must be a dense (strided) tensor, got layout {x.layout}; convert it with "
            f"{name}.to_dense() (a jagged nested tensor of token sequences goes to gp.pool or "
            "gp.pool_nested)"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}"
        )
    if not 3 <= x.ndim <= 5:
        raise ValueError(
            f"{name} must have rank 3, 4 or 5 ((N, C, *S) with 1 to 3 spatial dims), "
            f"got rank {x.ndim} with shape {tuple(x.shape)}"
        )


_FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def check_layout(layout: Any) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def layout_dims(ndim: int, layout: str) -> tuple[int, tuple[int, ...]]:
    """Channel dim and spatial dims of a rank-``ndim`` tensor in ``layout``."""
    dims = _LAYOUT_DIMS.get((ndim, layout))
    if dims is not None:
        return dims
    if layout == "channels_first":
        return 1, tuple(range(2, ndim))
    return ndim - 1, tuple(range(1, ndim - 1))


_LAYOUT_DIMS = {
    (ndim, "channels_first"): (1, tuple(range(2, ndim))) for ndim in range(3, 6)
} | {(ndim, "channels_last"): (ndim - 1, tuple(range(1, ndim - 1))) for ndim in range(3, 6)}


def spatial_shape(x: torch.Tensor, layout: str) -> tuple[int, ...]:
    _, dims = layout_dims(x.ndim, layout)
    return tuple(x.shape[d] for d in dims)


def _check_spatial_nonempty(x: torch.Tensor, layout: str) -> None:
    if x.numel():  # no dim is 0
        return
    sizes = x.shape[2:] if layout == "channels_first" else x.shape[1:-1]
    if 0 in sizes:
        sizes = tuple(sizes)
        raise ValueError(
            f"x must have every spatial size > 0 (layout={layout!r}), got spatial sizes {sizes} "
            f"in shape {tuple(x.shape)}"
        )


def check_mask(mask: Any, x: torch.Tensor, layout: str) -> None:
    """``mask`` must be a bool tensor of shape (N, *S) on x's device."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True = real position), got {mask.dtype}")
    _check_per_position("mask", mask, x, layout)


def _check_per_position(name: str, t: torch.Tensor, x: torch.Tensor, layout: str) -> None:
    """A per-position tensor (mask, weights) must be (N, *S) and on x's device."""
    expected = (x.shape[0], *spatial_shape(x, layout))
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape (N, *S) = {expected}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def _check_real(name: str, value: Any, kind: str) -> None:
    if isinstance(value, torch.Tensor):  # first: an ABC check (Real) on a tensor is slow cold
        ok = value.ndim == 0 and value.is_floating_point()
    else:
        ok = isinstance(value, Real) and not isinstance(value, bool)
    if not ok:
        also = " (or a (C,) tensor, one per channel)" if _param(kind, name).per_channel else ""
        raise TypeError(
            f"{name} for kind {kind!r} must be a real number or a 0-dim floating tensor{also}, "
            f"got {value!r}"
        )


def _as_float(v: Any) -> float:
    """A Python float for a number or an eager 0-dim tensor (an int too large for a float is
    infinite)."""
    try:
        return float(readable(v)) if isinstance(v, torch.Tensor) else float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def readable(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, with any ``torch.func`` wrapping (``vmap``'s batched tensors, ``grad``'s
    wrappers) taken off, so that its values can be read for a check: under ``vmap`` the check
    sees every batch member at once.

    >>> float(readable(torch.tensor(2.0, requires_grad=True)))
    2.0
    """
    t = t.detach()
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t


def _check_traced(cond: torch.Tensor, message: str) -> None:
    """Check a bool 0-dim tensor inside a graph (torch.compile / torch.export), where it has no
    value yet: it raises ``RuntimeError(message)`` when the graph runs.

    On the CPU this is an ``_assert_async`` node (no cost to speak of, kept by torch.export and
    dropped by the ONNX exporter). On an accelerator an ``_assert_async`` would be a device-side
    assert, which leaves the device unusable, so the graph reads the value back instead (one host
    sync, as the eager check takes) and raises a recoverable error; torch.export skips it there.
    """
    if cond.device.type == "cpu":
        torch._assert_async(cond, message)
    elif not torch.compiler.is_exporting():
        _check_read_back(cond, message)


def _check_read_back(cond: torch.Tensor, message: str) -> None:
    """The accelerator form of :func:`_check_traced`: the graph reads ``cond`` back and raises
    (torch reports the failed expression; ``message`` is shown where torch keeps it)."""
    torch._check(cond.item(), lambda: message)


def _param(kind: str, name: str) -> Param:
    return registry.spec(kind).param(name)


def check_param_value(kind: str, name: str, value: Any) -> None:
    """Check one scalar parameter of ``kind`` (such as ``p``/``eps`` of gem, ``r`` of lse): a real
    number or a 0-dim floating tensor, finite and in the range its registry entry gives. Inside
    a graph a tensor's value is checked when the graph runs (see :func:`_check_traced`).

    >>> check_param_value("gem", "p", float("inf"))
    Traceback (most recent call last):
    ...
    ValueError: p for kind 'gem' must be finite, got inf
    """
    _check_real(name, value, kind)
    q = _param(kind, name)
    if isinstance(value, torch.Tensor) and _tracing():
        v = value.detach()
        _check_traced(
            torch.isfinite(v) & q.tensor_in_range(v),
            f"{name} for kind {kind!r} must be finite and {q.expected} (checked in the graph)",
        )
        return
    if isinstance(value, torch.Tensor) and readable(value).ndim:  # a batch of values (vmap)
        _check_channel_values(kind, name, value, batched=True)
        return
    v = _as_float(value)
    if not abs(v) < math.inf:  # not math.isfinite: torch.compile(dynamic=True) makes v symbolic
        raise ValueError(f"{name} for kind {kind!r} must be finite, got {v}")
    if not q.in_range(v):
        raise ValueError(f"{name} for kind {kind!r} must be {q.expected}, got {v}")


def _check_weights(
    weights: Any, x: torch.Tensor, layout: str, mask: Any = None, kind: str = "attention",
    name: str = "weights",
) -> None:
    """A per-position parameter (attention's ``weights``) must be a floating ``(N, *S)`` tensor,
    non-negative at real positions; padded positions are never read, so they may hold anything
    (NaN at a real position propagates to the output, as a NaN in x does)."""
    if weights is None:
        raise TypeError(f"kind {kind!r} requires {name}=Tensor of shape (N, *S), got None")
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {weights.dtype}")
    _check_per_position(name, weights, x, layout)
    if _tracing():
        w = weights.detach()
        if mask is not None:
            w = torch.where(mask, w, 0.0)
        _check_traced(
            ~(w < 0).any(), f"{name} must be non-negative at real positions (checked in the graph)"
        )
        return
    w = readable(weights)
    if mask is not None:
        # under vmap with the batch in only one of them: every value is checked
        with contextlib.suppress(RuntimeError):
            w = torch.where(readable(mask), w, 0.0)
    if not w.numel():  # no sample: nothing to check (amin of nothing raises)
        return
    low = float(w.amin())  # one reduction: (w < 0).any() also writes a mask (~0.3 ms cold on 2 MB)
    if low != low:  # NaN hides the minimum: look at the rest
        low = float(torch.where(w.isnan(), 0.0, w).amin())
    if low < 0:
        where = " at a real position" if mask is not None else ""
        raise ValueError(f"{name} must be non-negative, got a minimum of {low}{where}")


def kinds_of(kind: str | tuple[str, ...]) -> tuple[str, ...]:
    """The kinds of a checked ``kind`` (a name or a tuple of names), as a tuple."""
    return kind if isinstance(kind, tuple) else (kind,)


def kind_defaults(kind: str | tuple[str, ...]) -> dict[str, Any]:
    """The parameters (with their defaults) that a checked ``kind`` or tuple of kinds takes.

    >>> kind_defaults(("avg", "gem", "lse"))
    {'p': 3.0, 'eps': 1e-06, 'r': 1.0}
    """
    if not isinstance(kind, tuple):
        return registry.spec(kind).defaults
    return {name: v for k in kind for name, v in registry.spec(k).defaults.items()}


def check_param_names(kind: str | tuple[str, ...], params: dict[str, Any]) -> None:
    """Every parameter name must be one of ``kind``'s (its registry entry's; for a
    tuple of kinds, one of theirs)."""
    if not params:
        return
    defaults = kind_defaults(kind)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        takes = ", ".join(defaults) or "no parameters"
        who = "it takes" if isinstance(kind, str) else "they take"
        raise TypeError(f"kind {kind!r} got unexpected parameter(s) {unknown}; {who} {takes}")


def check_fixed_params(kind: str, params: dict[str, Any]) -> None:
    """Check parameters given before any input (a layer's constructor): every name must be one of
    ``kind``'s and every scalar value (``p``, ``eps``, ``r``) must be valid; ``weights`` need the
    input and are checked at the call.

    >>> check_fixed_params("gem", {"P": 3})
    Traceback (most recent call last):
    ...
    TypeError: kind 'gem' got unexpected parameter(s) ['P']; it takes p, eps
    """
    check_param_names(kind, params)
    for k in kinds_of(kind):
        for q in registry.spec(k).params:
            if q.name not in params or q.per_position:
                continue
            value = params[q.name]
            if q.per_channel and is_per_channel(value):
                _check_channel_values(k, q.name, value)  # its size is checked against x's C
            else:
                check_param_value(k, q.name, value)


def is_per_channel(value: Any) -> bool:
    """Whether ``value`` is a per-channel parameter (a tensor with one dim), not a scalar."""
    return isinstance(value, torch.Tensor) and value.ndim == 1


def check_channel_param(
    kind: str, name: str, value: torch.Tensor, x: torch.Tensor, layout: str,
    packed: bool = False,
) -> None:
    """Check a per-channel parameter (``p`` of gem, ``r`` of lse): a floating 1-D tensor of
    shape ``(C,)`` with ``C`` x's channel count, on x's device, every value finite and in the
    scalar's range (inside a graph, checked when the graph runs). ``packed``: x is rows
    ``(T, C)`` of packed sequences or segments, and the message speaks of its rows.

    >>> x = torch.zeros(2, 3, 5)
    >>> check_channel_param("gem", "p", torch.full((4,), 3.0), x, "channels_first")
    Traceback (most recent call last):
    ...
    ValueError: p for kind 'gem' must have shape (C,) = (3,) (one value per channel ...), got ...
    """
    if not value.is_floating_point():
        raise TypeError(
            f"{name} for kind {kind!r} must be a floating tensor, got dtype {value.dtype}"
        )
    channel_dim, _ = layout_dims(x.ndim, layout)
    channels = x.shape[channel_dim]
    if value.shape[0] != channels:
        where = (f"one value per channel, the same for every row of x {tuple(x.shape)}; not "
                 "one per row" if packed else
                 f"one value per channel of x, dim {channel_dim} for layout={layout!r}")
        raise ValueError(
            f"{name} for kind {kind!r} must have shape (C,) = ({channels},) ({where}), got "
            f"shape {tuple(value.shape)}"
        )
    if value.device != x.device:
        raise ValueError(
            f"{name} for kind {kind!r} must be on x's device {x.device}, got {value.device}"
        )
    _check_channel_values(kind, name, value)


def _check_channel_values(
    kind: str, name: str, value: torch.Tensor, batched: bool = False
) -> None:
    """A per-channel tensor's dtype, and (eager) every value finite and in range. ``batched``:
    the values are the batch ``vmap`` passes for a scalar, said so in the error."""
    if not value.is_floating_point():
        raise TypeError(
            f"{name} for kind {kind!r} must be a floating tensor, got dtype {value.dtype}"
        )
    q = _param(kind, name)
    if _tracing():
        v = value.detach()
        _check_traced(
            (torch.isfinite(v) & q.tensor_in_range(v)).all(),
            f"{name} for kind {kind!r} must be finite and {q.expected} (checked in the graph)",
        )
        return
    v = readable(value).flatten()
    bad = ~(torch.isfinite(v) & q.tensor_in_range(v))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        where = "in the batch of values vmap passes" if batched else f"at channel {i}"
        every = "" if batched else " in every channel"
        raise ValueError(
            f"{name} for kind {kind!r} must be finite and {q.expected}{every}, got "
            f"{float(v[i])} {where}"
        )


def _check_scalar_or_channels(
    kind: str, name: str, value: Any, x: torch.Tensor, layout: str, packed: bool = False
) -> None:
    if _param(kind, name).per_channel and is_per_channel(value):
        check_channel_param(kind, name, value, x, layout, packed)
    else:
        check_param_value(kind, name, value)


def _plain(value: Any) -> Any:
    """A Python number (a ``Fraction``, a NumPy scalar) as a float; a tensor as it is."""
    if isinstance(value, Real) and not isinstance(value, (float, bool, torch.Tensor)):
        return float(value)
    return value


def check_params(
    kind: str, params: dict[str, Any], x: torch.Tensor, layout: str, mask: Any = None
) -> dict:
    """Fill defaults for ``kind`` and check each parameter's type and range (``weights`` only at
    the real positions of ``mask``; ``p`` of gem and ``r`` of lse may be a number, a 0-dim
    tensor or a ``(C,)`` tensor, one value per channel)."""
    check_param_names(kind, params)
    full = {**kind_defaults(kind), **params}
    for k in kinds_of(kind):
        for q in registry.spec(k).params:
            if q.per_position:
                _check_weights(full[q.name], x, layout, mask, k, q.name)
            else:
                _check_scalar_or_channels(k, q.name, full[q.name], x, layout)
                full[q.name] = _plain(full[q.name])
    return full


def check_keepdim(keepdim: Any) -> None:
    """``keepdim`` must be a bool (a string such as ``"False"`` would be truthy).

    >>> check_keepdim("False")
    Traceback (most recent call last):
    ...
    TypeError: keepdim must be a bool (True or False), got 'False' of type str
    """
    if not isinstance(keepdim, bool):
        raise TypeError(
            f"keepdim must be a bool (True or False), got {keepdim!r} of type "
            f"{type(keepdim).__name__}"
        )


def check_kind(kind: Any, allowed: tuple[str, ...] | None = None, name: str = "kind") -> None:
    """``kind`` must be one of ``allowed`` (by default, every registered kind)."""
    allowed = registry.kinds() if allowed is None else allowed
    try:
        known = kind in allowed
    except TypeError:  # an unhashable value
        known = False
    if not known:
        raise ValueError(f"{name} must be one of {allowed}, got {kind!r}")


def check_kinds(kind: Any, name: str = "kind") -> str | tuple[str, ...]:
    """A kind name, or a non-empty tuple (a list, ``gp.KINDS``, any sequence) of distinct kind
    names, pooled side by side (their outputs concatenated along channels, in that order).
    Returns the name, or the kinds as a tuple (a one-kind tuple gives its name).

    >>> check_kinds(["avg", "max"]), check_kinds(("gem",))
    (('avg', 'max'), 'gem')
    >>> check_kinds(("avg", "avg"))
    Traceback (most recent call last):
    ...
    ValueError: kind must not repeat a kind, got ('avg', 'avg'): 'avg' is given twice
    """
    known = registry.kinds()
    if isinstance(kind, str):
        check_kind(kind, known, name)
        return kind
    if not isinstance(kind, Sequence) or isinstance(kind, bytes) or not kind:
        raise ValueError(
            f"{name} must be one of {known} or a non-empty tuple of them, got {kind!r} of type "
            f"{type(kind).__name__}"
        )
    kinds = tuple(kind)
    for k in kinds:
        if not isinstance(k, str) or k not in known:
            raise ValueError(
                f"{name} must be one of {known} or a tuple of them, got {kinds!r}: {k!r} is not "
                "a kind"
            )
    repeated = [k for i, k in enumerate(kinds) if k in kinds[:i]]
    if repeated:
        raise ValueError(
            f"{name} must not repeat a kind, got {kinds!r}: {repeated[0]!r} is given twice"
        )
    return kinds if len(kinds) > 1 else kinds[0]


def pool_spec(
    x: Any, kind: Any, layout: Any, mask: Any, params: dict[str, Any]
) -> PoolSpec:
    """Check every argument of ``pool`` and return the normalised spec."""
    kind = check_kinds(kind)
    check_layout(layout)
    check_input(x)
    _check_spatial_nonempty(x, layout)
    check_mask(mask, x, layout)
    full = check_params(kind, params, x, layout, mask)
    channel_dim, spatial_dims = layout_dims(x.ndim, layout)
    return PoolSpec(kind, layout, channel_dim, spatial_dims, full)


def adaptive_spec(
    x: Any, output_size: Any, kind: Any, layout: Any, mask: Any, params: dict[str, Any]
) -> tuple[tuple[int | None, ...], dict[str, Any]]:
    """Check every argument of ``adaptive_pool``; return the per-dim output sizes (``None`` keeps
    a dim) and the kind's full parameters.

    >>> adaptive_spec(torch.zeros(1, 2, 7, 5), (3, None), "gem", "channels_first", None, {})
    ((3, None), {'p': 3.0, 'eps': 1e-06})
    """
    kind = check_kinds(kind)
    check_layout(layout)
    check_input(x)
    _check_spatial_nonempty(x, layout)
    check_mask(mask, x, layout)
    full = check_params(kind, params, x, layout, mask)
    return check_output_size(output_size, x.ndim - 2), full


def _is_size(s: Any) -> bool:
    return s is None or (isinstance(s, int) and not isinstance(s, bool) and s > 0)


def check_output_size(output_size: Any, rank: int | None) -> tuple[int | None, ...]:
    """``output_size``: a positive int, ``None``, or one positive int or ``None`` per spatial dim
    (``rank=None``, before the input is known: a tuple of 1 to 3).

    >>> check_output_size((7, None), 2)
    (7, None)
    >>> check_output_size((7, 0), 2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: output_size must be a positive int, None, or a tuple of 2 ... got (7, 0)
    """
    single = output_size is None or isinstance(output_size, int)
    sizes = (output_size,) * (rank or 1) if single else output_size
    ranks = (rank,) if rank is not None else (1, 2, 3)
    if not (isinstance(sizes, (tuple, list)) and len(sizes) in ranks and all(map(_is_size, sizes))):
        count = rank if rank is not None else "1 to 3"
        raise ValueError(
            f"output_size must be a positive int, None, or a tuple of {count} positive ints or "
            f"None (one per spatial dim), got {output_size!r}"
        )
    return tuple(sizes)


def check_packed_params(
    kind: str | tuple[str, ...], params: dict[str, Any], x: torch.Tensor
) -> dict[str, Any]:
    """:func:`check_params` for packed sequences (``x`` is ``(T, C)``): every name must be one of
    ``kind``'s, each scalar (``p``, ``eps``, ``r``) is checked as for ``pool``, and ``weights``
    must be a non-negative floating tensor of shape ``(T,)`` on x's device. Returns the full
    parameters (defaults filled in).

    >>> check_packed_params("attention", {"weights": torch.ones(3, 1)}, torch.zeros(3, 2))
    Traceback (most recent call last):
    ...
    ValueError: weights must have shape (T,) = (3,), got (3, 1)
    """
    check_param_names(kind, params)
    full = {**kind_defaults(kind), **params}
    for k in kinds_of(kind):
        for q in registry.spec(k).params:
            value = full[q.name]
            if not q.per_position:
                _check_scalar_or_channels(k, q.name, value, x, "channels_last", packed=True)
                full[q.name] = _plain(value)
                continue
            if value is None:
                raise TypeError(f"kind {k!r} requires {q.name}=Tensor of shape (T,), got None")
            if isinstance(value, torch.Tensor) and tuple(value.shape) != (x.shape[0],):
                raise ValueError(
                    f"{q.name} must have shape (T,) = ({x.shape[0]},), got {tuple(value.shape)}"
                )
            # type, dtype, device and sign as for pool: one sample of T positions
            _check_weights(value.unsqueeze(0) if isinstance(value, torch.Tensor) else value,
                           x.unsqueeze(0), "channels_last", None, k, q.name)
    return full
