"""The registry of pooling kinds: one entry per kind, read by every other module.

A kind is a :class:`KindSpec`: its name, its parameters (:class:`Param`: default, range,
per-channel or per-position, learnable), its output width, its torch composition over one
canonical view, optionally its NumPy reference and its Keras composition, and the kernel families
that serve it (opt-in: a kind without one runs its composition everywhere). The contract checks,
the compositions' callers, the reference, the kernels, packed and adaptive pooling, the layers,
heads, monitor, CAM and Keras all read this registry; none keeps a list of kinds of its own.

**The canonical view.** A composition sees ``x`` as ``(N, C, L)`` (rows of ``L`` positions,
already in its accumulation dtype: float32 for half inputs) and ``mask`` as a bool ``(N, 1, L)``
(True = real position) or None. A per-channel parameter arrives shaped ``(1, C, 1)``, a scalar one
as a number or a 0-dim tensor, a per-position one (attention's ``weights``) as ``(N, 1, L)``. It
returns ``(N, width * C)``. Padded positions must never reach the output or the gradient (replace
them before any non-linear op), and a row with no real position must give 0.

>>> import torch
>>> import globalpool as gp
>>> def absmax(x, mask):
...     if mask is not None:
...         x = torch.where(mask, x, 0.0)
...     return x.abs().amax(-1)
>>> _ = gp.register_kind("absmax", absmax, summary="largest magnitude")
>>> gp.pool(torch.tensor([[[1.0, -3.0, 2.0]]]), "absmax")
tensor([[3.]])
>>> "absmax" in gp.KINDS
True
>>> gp.unregister_kind("absmax")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from globalpool import compose
from globalpool import reference_defs as ref

__all__ = [
    "KINDS",
    "KERNEL_FAMILIES",
    "KindNames",
    "KindSpec",
    "Param",
    "kernels_of",
    "kinds",
    "register_kind",
    "run_composition",
    "run_credit",
    "spec",
    "unregister_kind",
]

#: The kernel families a kind may name in ``kernels``: the numba CPU kernels over a grid, the
#: numba CPU kernels over packed sequences, the Triton CUDA kernels.
KERNEL_FAMILIES = frozenset({"cpu", "packed", "cuda"})

Composition = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Param:
    """One parameter of a kind.

    Args:
        name: the keyword it is passed as (``p``, ``eps``, ``r``, ``weights``).
        default: the value when the caller gives none (None: the caller must give it).
        minimum: the smallest value allowed (None: no lower bound).
        inclusive: whether ``minimum`` itself is allowed.
        per_channel: whether it may be a ``(C,)`` tensor, one value per channel.
        learnable: whether a layer may learn it (``gp.make_pool(..., learnable=True)``).
        per_position: a tensor ``(N, *S)`` given with each call (attention's ``weights``):
            floating, non-negative at real positions.

    >>> Param("p", 3.0, minimum=1.0).expected
    '>= 1'
    """

    name: str
    default: float | None = None
    minimum: float | None = None
    inclusive: bool = True
    per_channel: bool = False
    learnable: bool = False
    per_position: bool = False

    #: The allowed range in words, for error messages (a plain string, set once: checks inside
    #: a torch.compile graph read it as a constant).
    expected: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        words = ("a real number" if self.minimum is None
                 else f"{'>=' if self.inclusive else '>'} {self.minimum:g}")
        object.__setattr__(self, "expected", words)

    def in_range(self, value: float) -> bool:
        """Whether the number ``value`` is allowed (finiteness is checked by the caller)."""
        if self.minimum is None:
            return True
        return value >= self.minimum if self.inclusive else value > self.minimum

    def tensor_in_range(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise :meth:`in_range` of a tensor (a bool tensor)."""
        if self.minimum is None:
            return torch.ones_like(t, dtype=torch.bool)
        return t >= self.minimum if self.inclusive else t > self.minimum


@dataclass(frozen=True)
class KindSpec:
    """One pooling kind: everything the library knows about it.

    Args:
        name: the kind's name, as passed to ``gp.pool``.
        compose: the torch composition over the canonical view (see the module docstring):
            ``compose(x, mask, **params) -> (N, width * C)``.
        params: its parameters, in the order they are documented.
        width: output channels per input channel (2 for ``catavgmax``).
        reference: optional NumPy definition of one sample over its ``k >= 1`` real positions:
            ``reference(xs, **params) -> (width * C,)`` with ``xs`` a float64 ``(C, k)``
            array, a per-channel parameter a ``(C,)`` array (else a float), a per-position one
            a ``(k,)`` array.
        reference_grad: optional gradient of the same: ``reference_grad(xs, g, **params) ->
            (grad_xs, {name: grad})`` for ``g`` of shape ``(width * C,)``.
        keras: optional ``keras.ops`` composition of the same canonical view
            (``keras(x, mask, **params)`` with ``x`` ``(N, C, L)``), for the Keras layers.
        credit: optional exact decomposition over positions, for class activation maps:
            ``credit(x, mask, **params) -> (N, width * C, L)`` whose mean over a row's real
            positions is the pooled value (0 at padded positions). A classifier head on a kind
            with a credit has exact maps (``method="cam"``); the others take gradient maps.
        kernels: the kernel families that serve it, among :data:`KERNEL_FAMILIES`.
        summary: one line saying what it computes.
        builtin: whether globalpool registers it itself.

    >>> import globalpool as gp
    >>> entry = gp.registry.spec("gem")
    >>> entry.width, [q.name for q in entry.params], sorted(entry.kernels)
    (1, ['p', 'eps'], ['cpu', 'cuda', 'packed'])
    """

    name: str
    compose: Composition
    params: tuple[Param, ...] = ()
    width: int = 1
    reference: Callable[..., Any] | None = None
    reference_grad: Callable[..., Any] | None = None
    keras: Callable[..., Any] | None = None
    credit: Callable[..., Any] | None = None
    kernels: frozenset[str] = frozenset()
    summary: str = ""
    builtin: bool = False
    defaults: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", {q.name: q.default for q in self.params})

    def param(self, name: str) -> Param:
        """The parameter called ``name`` (KeyError if the kind has none)."""
        for q in self.params:
            if q.name == name:
                return q
        raise KeyError(name)


def run_composition(
    kind: str, x: torch.Tensor, mask: torch.Tensor | None, params: dict[str, Any]
) -> torch.Tensor:
    """Run ``kind``'s composition on the canonical view: ``x`` ``(N, C, L)``, ``mask``
    ``(N, L)`` bool or None, ``params`` the checked parameters as the caller gave them (a
    per-channel one ``(C,)``, a per-position one ``(N, L)``). Returns ``(N, width * C)``.

    >>> x = torch.arange(6.0).reshape(1, 2, 3)
    >>> run_composition("catavgmax", x, torch.tensor([[True, True, False]]), {})
    tensor([[0.5000, 3.5000, 1.0000, 4.0000]])
    """
    entry = spec(kind)
    args = _canonical_params(entry, x, params)
    return entry.compose(x, None if mask is None else mask.unsqueeze(1), **args)


def _canonical_params(entry: KindSpec, x: torch.Tensor, params: dict[str, Any]) -> dict:
    args = {}
    for q in entry.params:
        v = params[q.name]
        if isinstance(v, torch.Tensor):
            if q.per_position:
                v = v.reshape(x.shape[0], 1, x.shape[2])
            elif v.ndim == 1:  # one value per channel
                v = v.reshape(1, -1, 1)
        args[q.name] = v
    return args


def run_credit(
    kind: str, x: torch.Tensor, mask: torch.Tensor | None, params: dict[str, Any]
) -> torch.Tensor | None:
    """``kind``'s credit (see :class:`KindSpec`) on the canonical view, as
    :func:`run_composition` takes its arguments: ``(N, width * C, L)``, or None for a kind
    without one."""
    entry = spec(kind)
    if entry.credit is None:
        return None
    args = _canonical_params(entry, x, params)
    return entry.credit(x, None if mask is None else mask.unsqueeze(1), **args)


_REGISTRY: dict[str, KindSpec] = {}
_NAMES: list[tuple[str, ...]] = [()]  # the current names, rebuilt on each (un)registration


def spec(kind: str) -> KindSpec:
    """The registry entry of ``kind`` (a ``ValueError`` naming the kinds if there is none).

    >>> spec("catavgmax").width, spec("gem").defaults
    (2, {'p': 3.0, 'eps': 1e-06})
    """
    try:
        return _REGISTRY[kind]
    except (KeyError, TypeError):
        raise ValueError(f"kind must be one of {kinds()}, got {kind!r}") from None


def kernels_of(kind: str) -> frozenset[str]:
    """The kernel families that serve ``kind`` (empty for a kind without kernels or an unknown
    name): the one question the kernels ask of the registry, on every eager call.

    >>> sorted(kernels_of("sum")), sorted(kernels_of("first")), kernels_of("no such kind")
    (['cpu', 'packed'], ['packed'], frozenset())
    """
    entry = _REGISTRY.get(kind)
    return _NO_KERNELS if entry is None else entry.kernels


_NO_KERNELS: frozenset[str] = frozenset()


def kinds() -> tuple[str, ...]:
    """The names of every registered kind, built-in first, in registration order."""
    return _NAMES[0]


class KindNames(Sequence):
    """A live, read-only view of the registered kind names (those ``where(spec)`` accepts, if
    given): it compares, prints and iterates as the tuple of them at that moment."""

    def __init__(self, where: Callable[[KindSpec], bool] | None = None) -> None:
        self._where = where

    def _names(self) -> tuple[str, ...]:
        if self._where is None:
            return kinds()
        return tuple(k for k in kinds() if self._where(_REGISTRY[k]))

    def __getitem__(self, i: Any) -> Any:
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._names()

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, list, KindNames))
                               else other)

    def __hash__(self) -> int:
        return hash(self._names())

    def __add__(self, other: Any) -> tuple:
        return self._names() + tuple(other)

    def __repr__(self) -> str:
        return repr(self._names())


#: Every registered kind's name: a live view (a kind registered later appears in it).
KINDS: Sequence[str] = KindNames()

# keywords of gp.pool and the layers that a parameter may not shadow
_RESERVED = frozenset(
    {"x", "kind", "layout", "keepdim", "mask", "backend", "learnable", "per_channel", "channels",
     "output_size", "cu_seqlens"}
)


def register_kind(
    name: str,
    compose: Composition,
    *,
    params: Sequence[Param] | dict[str, float | None] = (),
    width: int = 1,
    reference: Callable[..., Any] | None = None,
    reference_grad: Callable[..., Any] | None = None,
    keras: Callable[..., Any] | None = None,
    credit: Callable[..., Any] | None = None,
    kernels: Sequence[str] = (),
    summary: str = "",
    replace: bool = False,
) -> KindSpec:
    """Define a pooling kind once; it then works wherever the built-in kinds do.

    ``gp.pool`` (every backend but a kernel the kind does not have), tuples of kinds, masks,
    ``gp.adaptive_pool``, ``gp.pool_packed`` and nested tensors, ``GlobalPool``,
    ``AdaptivePool``, ``ClassifierHead``, ``make_head``, ``swap_pool``, ``monitor``, the gradient
    CAM methods, ``torch.compile``, ``torch.export`` and ONNX export all run its composition.

    Args:
        name: the kind's name (not an existing kind unless ``replace``; a Python identifier).
        compose: ``compose(x, mask, **params) -> (N, width * C)`` over ``x`` of shape
            ``(N, C, L)`` and ``mask`` ``(N, 1, L)`` bool or None (see :mod:`globalpool.registry`
            for how parameters arrive). Padded positions must not reach the output; a row with
            no real position must give 0.
        params: its parameters: :class:`Param` objects, or a dict ``{name: default}`` of plain
            scalar parameters with no range.
        width: output channels per input channel (a positive int).
        reference: optional NumPy definition of one sample (see :class:`KindSpec`); the shared
            tests check the composition against it.
        reference_grad: optional gradient of ``reference``.
        keras: optional ``keras.ops`` composition, for the Keras layers.
        credit: optional exact decomposition over positions (see :class:`KindSpec`), for
            exact class activation maps.
        kernels: kernel families that serve it; only globalpool's own kinds have kernels.
        summary: one line saying what it computes.
        replace: allow replacing a kind registered earlier by the user (never a built-in).

    Returns:
        The new :class:`KindSpec`.

    >>> import torch, globalpool as gp
    >>> def softmax_pool(x, mask, t):
    ...     score = x * t if mask is None else torch.where(mask, x * t, -torch.inf)
    ...     w = torch.softmax(score, -1).nan_to_num()
    ...     return (w * (x if mask is None else torch.where(mask, x, 0.0))).sum(-1)
    >>> _ = gp.register_kind("softmax", softmax_pool, params={"t": 1.0})
    >>> gp.pool(torch.zeros(2, 3, 4, 4), "softmax", t=2.0).shape
    torch.Size([2, 3])
    >>> gp.unregister_kind("softmax")
    """
    if name in _HELD:
        raise ValueError(f"name {name!r} is reserved: it is {_HELD[name]}")
    entry = _build(name, compose, params, width, reference, reference_grad, keras, credit,
                   kernels, summary, builtin=False)
    old = _REGISTRY.get(name)
    if old is not None and (old.builtin or not replace):
        what = "a built-in kind" if old.builtin else "already registered (pass replace=True)"
        raise ValueError(f"name {name!r} is {what}")
    _add(entry)
    return entry


#: Names no kind may take, with what holds them (the learned pools of globalpool.learned_pools).
_HELD: dict[str, str] = {}


def reserve_name(name: str, holder: str) -> None:
    """Keep ``name`` from ever becoming a kind: ``holder`` (said in the error) uses it in the same
    namespace, such as ``ClassifierHead(pool=...)``. A kind of that name is an error here."""
    if name in _REGISTRY:
        raise ValueError(f"name {name!r} is a registered kind and cannot be reserved for {holder}")
    _HELD[name] = holder


def unregister_kind(name: str) -> None:
    """Remove a kind added with :func:`register_kind` (built-in kinds stay).

    Args:
        name: the kind's name.

    >>> import torch, globalpool as gp
    >>> _ = gp.register_kind("median", lambda x, mask: x.median(-1).values)
    >>> gp.unregister_kind("median")
    >>> "median" in gp.KINDS
    False
    """
    entry = spec(name)
    if entry.builtin:
        raise ValueError(f"name {name!r} is a built-in kind and cannot be unregistered")
    del _REGISTRY[name]
    _NAMES[0] = tuple(_REGISTRY)


def _add(entry: KindSpec) -> None:
    _REGISTRY[entry.name] = entry
    _NAMES[0] = tuple(_REGISTRY)


def _as_params(params: Sequence[Param] | dict[str, Any]) -> tuple[Param, ...]:
    if isinstance(params, dict):
        return tuple(Param(k, v) for k, v in params.items())
    if isinstance(params, Param):
        return (params,)
    return tuple(params)


def _build(
    name: Any, composition: Any, params: Any, width: Any, reference: Any, reference_grad: Any,
    keras: Any, credit: Any, kernels: Any, summary: Any, builtin: bool,
) -> KindSpec:
    """Check a registration's arguments (each error names the argument) and build its entry."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a Python identifier (a str), got {name!r}")
    if not callable(composition):
        raise TypeError(
            f"compose for kind {name!r} must be a callable compose(x, mask, **params), got "
            f"{composition!r}"
        )
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"width for kind {name!r} must be a positive int, got {width!r}")
    if not isinstance(params, (dict, Param, Sequence)) or isinstance(params, str):
        raise TypeError(
            f"params for kind {name!r} must be a sequence of Param or a dict {{name: default}}, "
            f"got {params!r}"
        )
    ps = _as_params(params)
    seen: set[str] = set()
    for q in ps:
        if not isinstance(q, Param):
            raise TypeError(f"params for kind {name!r} must be Param objects, got {q!r}")
        if not q.name.isidentifier() or q.name in _RESERVED:
            raise ValueError(
                f"parameter name {q.name!r} of kind {name!r} collides with an argument of "
                f"gp.pool or its layers ({sorted(_RESERVED)}) or is not an identifier"
            )
        if q.name in seen:
            raise ValueError(f"parameter {q.name!r} of kind {name!r} is given twice")
        seen.add(q.name)
        if q.default is not None and not q.per_position:
            d = q.default
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d):
                raise ValueError(
                    f"default of parameter {q.name!r} of kind {name!r} must be a finite number "
                    f"or None, got {d!r}"
                )
            if not q.in_range(float(d)):
                raise ValueError(
                    f"default of parameter {q.name!r} of kind {name!r} must be {q.expected}, "
                    f"got {d!r}"
                )
    if sum(q.per_position for q in ps) > 1:
        raise ValueError(
            f"params for kind {name!r}: at most one per-position parameter is supported, got "
            f"{[q.name for q in ps if q.per_position]}"
        )
    if name in _RESERVED or any(name in e.defaults for e in _REGISTRY.values()):
        raise ValueError(
            f"name {name!r} collides with a parameter or argument name; choose another name"
        )
    for arg, value in (("reference", reference), ("reference_grad", reference_grad),
                       ("keras", keras), ("credit", credit)):
        if value is not None and not callable(value):
            raise TypeError(f"{arg} for kind {name!r} must be callable or None, got {value!r}")
    families = frozenset(kernels)
    if not families <= KERNEL_FAMILIES:
        raise ValueError(
            f"kernels for kind {name!r} must be among {sorted(KERNEL_FAMILIES)}, got "
            f"{sorted(families)}"
        )
    if families and not builtin:
        raise ValueError(
            f"kernels for kind {name!r}: only globalpool's own kinds have fused kernels; leave "
            "kernels empty (the composition runs everywhere)"
        )
    return KindSpec(name, composition, ps, width, reference, reference_grad, keras, credit,
                    families, summary, builtin)


def _builtin(name: str, composition: Composition, *, params: tuple[Param, ...] = (),
             width: int = 1, kernels: str = "cpu packed cuda", credit: Callable | None = None,
             summary: str) -> None:
    _add(_build(name, composition, params, width, ref.FORWARD.get(name), ref.GRAD.get(name),
                None, credit, kernels.split(), summary, builtin=True))


# -- the built-in kinds -----------------------------------------------------------------------
# Each torch composition is written in ``compose.py`` for any reduced dims; here it is taken over
# the canonical view (the last dim reduced, channels at dim 1).

_L = (2,)


def _flat(y: torch.Tensor) -> torch.Tensor:
    return y.flatten(1)


_builtin("avg", lambda x, mask: _flat(compose.avg(x, mask, _L)), credit=compose.avg_credit,
         summary="mean over positions")
_builtin("max", lambda x, mask: _flat(compose.max_(x, mask, _L)), credit=compose.max_credit,
         summary="max over positions")
_builtin("avgmax", lambda x, mask: _flat(compose.avgmax(x, mask, _L)),
         credit=compose.avgmax_credit, summary="(avg + max) / 2")
_builtin(
    "catavgmax",
    lambda x, mask: _flat(compose.catavgmax(x, mask, _L, 1)),
    width=2,
    credit=compose.catavgmax_credit,
    summary="concat([avg, max]) along channels",
)
_builtin(
    "gem",
    lambda x, mask, p, eps: _flat(compose.gem(x, mask, _L, p, eps)),
    params=(
        Param("p", 3.0, minimum=1.0, per_channel=True, learnable=True),
        # the smallest normal float32: a smaller eps underflows in the accumulation dtype
        Param("eps", 1e-6, minimum=float(torch.finfo(torch.float32).tiny)),
    ),
    summary="generalised mean (mean clamp(x, eps)^p)^(1/p)",
)
_builtin(
    "lse",
    lambda x, mask, r: _flat(compose.lse(x, mask, _L, r)),
    params=(Param("r", 1.0, minimum=0.0, inclusive=False, per_channel=True, learnable=True),),
    summary="log-sum-exp (1/r) log mean exp(r x)",
)
_builtin(
    "attention",
    lambda x, mask, weights: _flat(compose.attention(x, mask, _L, weights)),
    params=(Param("weights", None, per_position=True),),
    credit=compose.attention_credit,
    summary="weighted mean sum(w x) / sum(w)",
)
_builtin("sum", lambda x, mask: _flat(compose.sum_(x, mask, _L)), kernels="cpu packed",
         credit=compose.sum_credit, summary="sum over positions")
_builtin("first", lambda x, mask: _flat(compose.first(x, mask, _L)), kernels="packed",
         credit=compose.first_credit,
         summary="the value at the first real position (row-major order)")
_builtin("last", lambda x, mask: _flat(compose.last(x, mask, _L)), kernels="packed",
         credit=compose.last_credit,
         summary="the value at the last real position (row-major order)")
_builtin("mean_sqrt_len", lambda x, mask: _flat(compose.mean_sqrt_len(x, mask, _L)), kernels="",
         credit=compose.mean_sqrt_len_credit,
         summary="sum over positions / sqrt(number of positions)")
_builtin("weightedmean", lambda x, mask: _flat(compose.weightedmean(x, mask, _L)), kernels="",
         credit=compose.weightedmean_credit,
         summary="mean weighted by rank: the j-th real position (row-major order) weighs j")
