"""Classifier heads over a feature map, and swapping the pooling of an existing model.

Every head takes a ``(N, C, *S)`` feature map with 1 to 3 spatial dims and returns logits
``(N, num_classes)``.

>>> import torch, globalpool as gp
>>> head = gp.make_head("catavgmax", 64, 10)
>>> head(torch.randn(2, 64, 7, 7)).shape, head.feature_width
(torch.Size([2, 10]), 128)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from globalpool import registry
from globalpool.attention import QUERY_POOLS
from globalpool.class_map_norm import ClassMapNorm
from globalpool.contract import (
    check_input,
    check_kind,
    check_kinds,
    check_layout,
    check_mask,
    kinds_of,
    spatial_shape,
)
from globalpool.functional import output_width, pool
from globalpool.layers import (
    AttentionPool,
    GeM,
    GlobalPool,
    LSEPool,
    check_backend,
    check_channel_count,
    check_channels,
    make_pool,
)
from globalpool.learned_pools import LEARNED_POOLS, make_learned_pool

#: The image / signal heads that ``globalpool compare`` trains by default. :func:`make_head`
#: builds a head of every registered kind (``sum``, ``first``, ``last``, a kind of your own) and
#: of a tuple of kinds besides.
HEADS: tuple[str, ...] = (
    "fc", "avg", "max", "avgmax", "catavgmax", "gem", "lse", "attention", "nin"
)

#: Activations of the :class:`NiNHead` class maps.
NIN_ACTIVATIONS: tuple[str, ...] = ("softplus", "relu")


#: Normalisations of a :class:`ClassifierHead`'s pooled features (None: none).
HEAD_NORMS: tuple[str | None, ...] = (None, "layer", "batch")

#: Activations of a :class:`ClassifierHead`'s hidden layer.
HEAD_ACTIVATIONS: tuple[str, ...] = ("gelu", "tanh", "relu")

_ACTIVATIONS = {"gelu": nn.GELU, "tanh": nn.Tanh, "relu": nn.ReLU}


def _check_dropout(dropout: Any) -> None:
    """``dropout`` must be a real number in ``[0, 1)`` (NaN, a negative value, 1 and a string are
    refused, never taken as "no dropout")."""
    if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool):
        raise TypeError(
            f"dropout must be a real number in [0, 1) (the probability of zeroing a feature), "
            f"got {dropout!r} ({type(dropout).__name__})"
        )
    if not 0 <= dropout < 1:  # False for NaN too
        raise ValueError(
            f"dropout must be a real number in [0, 1) (the probability of zeroing a feature), "
            f"got {dropout!r}"
        )


def _check_spatial_size(spatial_size: Any) -> tuple[int, ...]:
    """``spatial_size`` as a tuple: 1 to 3 positive ints, given as a tuple (or list). A bare int
    is refused: ``7`` could mean ``(7,)`` or ``(7, 7)``."""
    expected = "a tuple of 1 to 3 positive ints, one per spatial dim, such as (7, 7)"
    if isinstance(spatial_size, numbers.Integral) and not isinstance(spatial_size, bool):
        raise TypeError(
            f"spatial_size must be {expected}, got the int {spatial_size!r}; pass "
            f"({spatial_size},) for one spatial dim or ({spatial_size}, {spatial_size}) for a "
            f"{spatial_size}x{spatial_size} map"
        )
    if not isinstance(spatial_size, (tuple, list)):
        raise TypeError(f"spatial_size must be {expected}, got {spatial_size!r}")
    size = tuple(spatial_size)
    if not 1 <= len(size) <= 3 or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in size
    ):
        raise ValueError(f"spatial_size must be {expected}, got {spatial_size!r}")
    return tuple(int(s) for s in size)


def _check_pool_keepdim(pool_params: dict[str, Any]) -> None:
    """A head always returns ``(N, num_classes)`` logits (or ``(N, features)``): its pool must
    flatten, so ``keepdim=True`` is refused (``keepdim=False`` is accepted)."""
    keepdim = pool_params.get("keepdim", False)
    if keepdim is not False:
        raise ValueError(
            f"keepdim must be False for a ClassifierHead, got {keepdim!r}: a head always pools "
            "to (N, features) and returns (N, num_classes) logits; for a pool that keeps the "
            "spatial dims use gp.make_pool(kind, channels, keepdim=True)"
        )


def _check_class_count(num_classes: Any) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(
            f"num_classes must be an int >= 0 (0: no classifier, the head returns its features), "
            f"got {num_classes!r}"
        )


class ClassifierHead(nn.Module):
    """Global pooling, then optionally a norm and a hidden layer, dropout, and one ``Linear``
    sized to the features it receives.

    ``x`` (``(N, C, *S)``, or ``(N, *S, C)`` with ``layout="channels_last"``) goes through
    ``pool -> norm -> Linear(hidden) + act -> dropout -> fc``, the optional steps skipped when
    not asked for (timm's "NormMlp" head with ``norm="layer"`` and ``hidden`` set; the modules
    ``norm`` and ``hidden`` are None then):

    - ``norm``: None, ``"layer"`` (``LayerNorm``) or ``"batch"`` (``BatchNorm1d``) of the pooled
      features;
    - ``hidden``: None or the width of a hidden ``Linear``, followed by ``act`` (``"gelu"``,
      ``"tanh"`` or ``"relu"``);
    - ``num_classes=0``: no classifier (``fc`` is an ``Identity``); the head returns the
      features, as timm's ``reset_classifier(0)``.

    Widths: ``pooled_width`` is the pool's output (``2 * in_channels`` for ``catavgmax``),
    ``feature_width`` what ``fc`` receives (``hidden`` when set, else ``pooled_width``).
    ``forward(x, pre_logits=True)`` returns those features ``(N, feature_width)``;
    :meth:`reset` swaps the classifier (and the pool) in place. ``pool_params`` go to the pool
    (:func:`~globalpool.make_pool`); ``keepdim=True`` is refused, since a head always pools to
    ``(N, features)``. ``dropout`` is a real number in ``[0, 1)`` (0: none).

    >>> import torch, globalpool as gp
    >>> head = gp.ClassifierHead(32, 5, pool="gem", dropout=0.1)
    >>> head(torch.randn(3, 32, 4, 4)).shape, head.feature_width
    (torch.Size([3, 5]), 32)
    >>> head = gp.ClassifierHead(32, 5, pool="catavgmax", norm="layer", hidden=16, act="tanh")
    >>> head.pooled_width, head.feature_width, head(torch.randn(3, 32, 4, 4), pre_logits=True).shape
    (64, 16, torch.Size([3, 16]))
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pool: str = "avg",
        *,
        dropout: float = 0.0,
        layout: str = "channels_first",
        norm: str | None = None,
        hidden: int | None = None,
        act: str = "gelu",
        **pool_params: Any,
    ) -> None:
        super().__init__()
        check_channels(in_channels, "in_channels")
        _check_class_count(num_classes)
        check_layout(layout)
        check_kind(norm, HEAD_NORMS, name="norm")
        if hidden is not None:
            check_channels(hidden, "hidden")
        check_kind(act, HEAD_ACTIVATIONS, name="act")
        _check_dropout(dropout)
        self.in_channels, self.layout = in_channels, layout
        self.norm_kind, self.hidden_size, self.act = norm, hidden, act
        # moves with the head: new modules of reset() take its device and dtype even when the
        # head holds no parameter (an avg pool and num_classes=0); not saved in the state dict
        self.register_buffer("_like", torch.empty(0), persistent=False)
        self.pool = self._make_pool(pool, pool_params)
        self.pool_kind = pool
        self._build_neck()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = self._classifier(num_classes)

    @property
    def pooled_width(self) -> int:
        """Width of the pool's output (``2 * in_channels`` for ``catavgmax``)."""
        return self.pool.output_width(self.in_channels)

    @property
    def feature_width(self) -> int:
        """Width of the features ``fc`` receives (and ``pre_logits=True`` returns): ``hidden``
        when set, else :attr:`pooled_width`."""
        return self.hidden_size if self.hidden_size is not None else self.pooled_width

    @property
    def num_classes(self) -> int:
        """Number of logits; 0 when there is no classifier (the head returns its features)."""
        return self.fc.out_features if isinstance(self.fc, nn.Linear) else 0

    @property
    def is_linear(self) -> bool:
        """Whether the logits are one ``Linear`` of the pooled features (no norm, no hidden
        layer, a classifier): what exact class activation maps need."""
        return (
            self.norm_kind is None and self.hidden_size is None and isinstance(self.fc, nn.Linear)
        )

    def _make_pool(self, pool: str, pool_params: dict[str, Any]) -> nn.Module:
        if "channels" in pool_params:
            raise TypeError(
                f"ClassifierHead got channels={pool_params['channels']!r} for its pool, whose "
                f"channels are in_channels={self.in_channels}; pass per_channel=True for one p "
                "(gem) or r (lse) per channel"
            )
        _check_pool_keepdim(pool_params)
        if isinstance(pool, str) and pool in LEARNED_POOLS:  # a query-based attention pool
            return make_learned_pool(pool, self.in_channels, self.layout, pool_params)
        return make_pool(pool, self.in_channels, layout=self.layout, **pool_params)

    def _build_neck(self) -> None:
        """``norm`` and ``hidden`` for the pooled width; None when not asked for (a plain head
        keeps its modules: pool, dropout, fc)."""
        width = self.pooled_width
        norms = {"layer": nn.LayerNorm, "batch": nn.BatchNorm1d}
        self.norm = norms[self.norm_kind](width) if self.norm_kind is not None else None
        self.hidden = (
            nn.Sequential(nn.Linear(width, self.hidden_size), _ACTIVATIONS[self.act]())
            if self.hidden_size is not None
            else None
        )

    def _classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.feature_width, num_classes) if num_classes else nn.Identity()

    def _factory(self) -> dict[str, Any]:
        """Device and dtype of the head's parameters (of ``fc`` first), else of its buffer."""
        like = next(
            (t for t in (*self.fc.parameters(), *self.parameters()) if t.is_floating_point()),
            self._like,
        )
        return {"device": like.device, "dtype": like.dtype}

    def reset(self, num_classes: int, pool: str | None = None, **pool_params: Any) -> None:
        """Replace the classifier by a new (newly initialised) one with ``num_classes`` outputs,
        and, with ``pool`` (a kind; ``pool_params`` as in the constructor), the pool too.

        The new modules are on the device and in the dtype of the head's parameters. The
        classifier always gets the right input width: when the new pool's width differs
        (``"avg"`` to ``"catavgmax"``), the norm and hidden layer are rebuilt too (newly
        initialised); when it is the same they are kept, trained. ``num_classes=0`` leaves no
        classifier (``fc`` an ``Identity``: the head returns its features). Every argument is
        checked before anything changes.

        >>> import torch, globalpool as gp
        >>> head = gp.ClassifierHead(8, 10).double()
        >>> head.reset(3, pool="catavgmax")
        >>> head.fc, head.fc.weight.dtype
        (Linear(in_features=16, out_features=3, bias=True), torch.float64)
        >>> head.reset(0)
        >>> head(torch.randn(2, 8, 5, dtype=torch.float64)).shape
        torch.Size([2, 16])
        """
        _check_class_count(num_classes)
        if pool is None and pool_params:
            raise TypeError(
                f"reset got pool parameter(s) {sorted(pool_params)} without pool=; pass the "
                "kind as pool= with them"
            )
        factory = self._factory()
        if pool is not None:
            new = self._make_pool(pool, pool_params).to(**factory)
            width = self.pooled_width
            self.pool, self.pool_kind = new, pool
            if self.pooled_width != width:
                self._build_neck()
                for module in (self.norm, self.hidden):
                    if module is not None:
                        module.to(**factory)
        self.fc = self._classifier(num_classes).to(**factory)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, pre_logits: bool = False
    ) -> torch.Tensor:
        """Logits ``(N, num_classes)``; with ``pre_logits=True`` the features ``fc`` would
        receive, ``(N, feature_width)`` (pooled, normalised, hidden layer, dropout)."""
        check_input(x)
        check_channel_count(x, self.layout, self.in_channels, "ClassifierHead")
        if not isinstance(pre_logits, bool):
            raise TypeError(f"pre_logits must be a bool (True or False), got {pre_logits!r}")
        features = self.pool(x, mask=mask)
        if self.norm is not None:
            features = self.norm(features)
        if self.hidden is not None:
            features = self.hidden(features)
        features = self.dropout(features)
        return features if pre_logits else self.fc(features)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, layout={self.layout!r}"


class FlattenFCHead(nn.Module):
    """The "traditional" head: flatten the whole feature map, a hidden FC layer, then classes.

    Its parameter count grows with the spatial size, and it only accepts that size:
    ``spatial_size`` is a tuple of 1 to 3 positive ints, one per spatial dim (a bare int is
    refused, since ``7`` could mean ``(7,)`` or ``(7, 7)``). ``dropout`` is a real number in
    ``[0, 1)`` (0: none), before the last layer. ``x`` is
    ``(N, C, *S)``, or ``(N, *S, C)`` with ``layout="channels_last"``. With a mask, padded
    positions are replaced by 0 before the first layer, so what they hold (NaN, inf) never
    reaches the logits or a gradient.

    >>> import torch, globalpool as gp
    >>> head = gp.FlattenFCHead(8, (4, 4), 10, hidden=32)
    >>> head(torch.randn(2, 8, 4, 4)).shape
    torch.Size([2, 10])
    >>> gp.FlattenFCHead(8, (4,), 10, layout="channels_last")(torch.randn(2, 4, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int,
        spatial_size: tuple[int, ...],
        num_classes: int,
        *,
        hidden: int = 256,
        dropout: float = 0.0,
        layout: str = "channels_first",
    ) -> None:
        super().__init__()
        check_channels(in_channels, "in_channels")
        check_channels(num_classes, "num_classes")
        check_channels(hidden, "hidden")
        check_layout(layout)
        _check_dropout(dropout)
        self.in_channels, self.layout = in_channels, layout
        self.spatial_size = _check_spatial_size(spatial_size)
        self.feature_width = in_channels * math.prod(self.spatial_size)
        self.hidden = nn.Linear(self.feature_width, hidden)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x)
        if spatial_shape(x, self.layout) != self.spatial_size:
            raise ValueError(
                f"x must have spatial size {self.spatial_size} for a flatten+FC head, "
                f"got {spatial_shape(x, self.layout)}; use a pooling head for other input sizes"
            )
        check_channel_count(x, self.layout, self.in_channels, "FlattenFCHead")
        check_mask(mask, x, self.layout)
        channel_dim = 1 if self.layout == "channels_first" else x.ndim - 1
        if mask is not None:  # select, not multiply: 0 * NaN is NaN
            x = torch.where(mask.unsqueeze(channel_dim), x, 0.0)
        return self.fc(self.dropout(torch.relu(self.hidden(x.flatten(1)))))


class NiNHead(nn.Module):
    """Network-in-Network head: a 1x1 convolution to class maps, softplus, then global average.

    There is no fully connected layer; the class maps double as class activation maps. ``x`` is
    ``(N, C, *S)``, or ``(N, *S, C)`` with ``layout="channels_last"`` (where the 1x1 convolution
    is a ``Linear`` on the last dim). With a mask, padded positions are replaced by 0 before the
    convolution, so what they hold never reaches the logits or a gradient.

    The original NiN head (Lin et al., 2014) puts a ReLU on the class maps
    (``activation="relu"``): a class whose map turns negative everywhere gets no gradient again
    and is never predicted, which left some MNIST-1D seeds near 20% accuracy. The default
    ``activation="softplus"`` (a smooth ReLU, ``log(1 + e^z)``) keeps the maps non-negative
    but never stops their gradient, so every class keeps learning. ``norm=True`` adds a batch
    norm of each class map (over the batch and the real positions,
    :class:`~globalpool.class_map_norm.ClassMapNorm`) before the activation: more accurate on
    MNIST-1D, but its maps spread far beyond the object.

    >>> import torch, globalpool as gp
    >>> gp.NiNHead(16, 10)(torch.randn(2, 16, 6)).shape
    torch.Size([2, 10])
    >>> gp.NiNHead(16, 10, layout="channels_last")(torch.randn(2, 6, 16)).shape
    torch.Size([2, 10])
    >>> gp.NiNHead(16, 10, activation="relu")
    NiNHead(
      layout='channels_first', activation='relu', norm=False
      (conv): Linear(in_features=16, out_features=10, bias=True)
    )
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        layout: str = "channels_first",
        backend: str = "auto",
        activation: str = "softplus",
        norm: bool = False,
    ) -> None:
        super().__init__()
        check_channels(in_channels, "in_channels")
        check_channels(num_classes, "num_classes")
        check_layout(layout)
        check_backend(backend)
        check_kind(activation, NIN_ACTIVATIONS, name="activation")
        if not isinstance(norm, bool):
            raise TypeError(f"norm must be a bool (True or False), got {norm!r}")
        self.feature_width = in_channels
        self.layout, self.backend, self.activation = layout, backend, activation
        self.conv = nn.Linear(in_channels, num_classes)  # a 1x1 conv of any spatial rank
        self.norm = ClassMapNorm(num_classes) if norm else None

    def class_maps(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class maps before the global average, in the head's layout: ``(N, num_classes, *S)``
        (or ``(N, *S, num_classes)`` channels-last); 0 input at padded positions."""
        self._check(x, mask)
        return self._class_maps(x, mask)

    def _check(self, x: Any, mask: Any) -> None:
        check_input(x)
        check_channel_count(x, self.layout, self.conv.in_features, "NiNHead")
        check_mask(mask, x, self.layout)

    def _class_maps(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        first = self.layout == "channels_first"
        if mask is not None:  # select, not multiply: 0 * NaN is NaN
            x = torch.where(mask.unsqueeze(1 if first else -1), x, 0.0)
        z = self.conv(x.movedim(1, -1) if first else x)  # (N, *S, num_classes)
        if self.norm is not None:
            z = self.norm(z, mask)
        maps = F.softplus(z) if self.activation == "softplus" else torch.relu(z)
        return maps.movedim(-1, 1) if first else maps

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x, mask)
        maps = self._class_maps(x, mask)
        return pool(maps, "avg", layout=self.layout, mask=mask, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"layout={self.layout!r}, activation={self.activation!r}, "
            f"norm={self.norm is not None}"
        )


def make_head(
    name: str | tuple[str, ...],
    in_channels: int,
    num_classes: int,
    *,
    spatial_size: tuple[int, ...] | None = None,
    dropout: float = 0.0,
    hidden: int = 256,
    layout: str = "channels_first",
    backend: str = "auto",
    norm: str | None = None,
    mlp_hidden: int | None = None,
    act: str = "gelu",
    **pool_params: Any,
) -> nn.Module:
    """Build the head called ``name`` (one of :data:`HEADS`, a token kind ``sum``/``first``/
    ``last``, or a tuple of kinds: a :class:`ClassifierHead` pooling with them; or a learned
    attention pool of :data:`~globalpool.learned_pools.LEARNED_POOLS`, ``map``, ``simpool`` or
    ``clip``, whose ``spatial_size`` is the size of its positional table).

    Every head takes ``layout`` and ``backend`` (``fc`` does no pooling and only checks it).
    ``fc`` needs ``spatial_size`` and uses ``hidden``; pooling heads accept any spatial size, so
    one call can build any head and ``spatial_size``/``hidden`` are ignored by the others.
    ``dropout`` (before the last layer) is for ``fc`` and the pooling heads; ``nin`` has no layer
    to drop out before and refuses a non-zero one; it is a real number in ``[0, 1)``.
    ``pool_params`` (``p``, ``eps``, ``learnable``, ``per_channel``, ``r`` ...) go to the pool
    of a pooling head (``keepdim=True`` is refused: a head always flattens); ``fc`` and ``nin``
    refuse them.

    ``norm``, ``mlp_hidden`` and ``act`` build a pooling head's norm and hidden layer
    (:class:`ClassifierHead`'s ``norm``, ``hidden`` and ``act``: ``hidden`` here stays the
    flatten-FC width, which every model passes to every head); ``fc`` and ``nin`` refuse them.

    >>> import globalpool as gp
    >>> sorted(gp.HEADS)[:3]
    ['attention', 'avg', 'avgmax']
    >>> gp.make_head("fc", 8, 10, spatial_size=(5,), hidden=16).feature_width
    40
    >>> gp.make_head("lse", 8, 10, norm="layer", mlp_hidden=32, learnable=True).feature_width
    32
    >>> gp.make_head("nin", 8, 10, p=3.0)
    Traceback (most recent call last):
    ...
    TypeError: head 'nin' got unexpected argument(s) ['p']; it takes layout, backend
    """
    if not isinstance(name, (tuple, list)):
        check_kind(name, ("fc", "nin", *registry.kinds(), *LEARNED_POOLS), name="head")
    check_layout(layout)
    check_backend(backend)
    _check_dropout(dropout)
    if name in ("fc", "nin"):
        extra = sorted(pool_params)
        neck = {"norm": norm is not None, "mlp_hidden": mlp_hidden is not None}
        extra = [k for k, given in {**neck, "act": act != "gelu"}.items() if given] + extra
        if name == "nin" and dropout != 0:
            extra = ["dropout", *extra]
        if extra:
            takes = "spatial_size, hidden, dropout, layout, backend" if name == "fc" else (
                "layout, backend"
            )
            raise TypeError(f"head {name!r} got unexpected argument(s) {extra}; it takes {takes}")
    if name == "fc":
        if spatial_size is None:
            raise ValueError("spatial_size is required for head 'fc' (flatten + FC), got None")
        return FlattenFCHead(
            in_channels, spatial_size, num_classes, hidden=hidden, dropout=dropout, layout=layout
        )
    if name == "nin":
        return NiNHead(in_channels, num_classes, layout=layout, backend=backend)
    if isinstance(name, str) and name in LEARNED_POOLS:  # no fused backend: learned modules
        if name == "clip":
            pool_params["spatial_size"] = spatial_size
        return ClassifierHead(
            in_channels, num_classes, name, dropout=dropout, layout=layout, norm=norm,
            hidden=mlp_hidden, act=act, **pool_params,
        )
    return ClassifierHead(
        in_channels,
        num_classes,
        name,
        dropout=dropout,
        layout=layout,
        norm=norm,
        hidden=mlp_hidden,
        act=act,
        backend=backend,
        **pool_params,
    )


#: torch's adaptive pools (global when their output size is 1): what swap_pool replaces and
#: gp.monitor records besides globalpool's modules.
TORCH_ADAPTIVE_POOLS = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


#: globalpool's own global pools: swap_pool replaces one that keeps singleton spatial dims
#: (``keepdim=True``, as swap_pool builds them), so a model can be swapped again, and a
#: timm-style wrapper built on them (``globalpool.compat.timm``) is recognised.
GLOBALPOOL_POOLS = (GlobalPool, GeM, LSEPool, AttentionPool)


def _is_global(module: nn.Module) -> bool:
    if isinstance(module, GLOBALPOOL_POOLS):
        return module.keepdim is True
    if not isinstance(module, TORCH_ADAPTIVE_POOLS):
        return False
    size = module.output_size
    sizes = size if isinstance(size, tuple) else (size,)
    return all(s == 1 for s in sizes)


#: Names swap_pool looks for the classifier under when ``classifier=`` is not given (timm's and
#: torchvision's conventions).
CLASSIFIER_NAMES: tuple[str, ...] = ("fc", "head", "classifier", "head.fc")


_POOL_WORDS = "AdaptiveAvgPool*d(1)/AdaptiveMaxPool*d(1) or globalpool pool (keepdim=True)"

#: globalpool's own global pools: named (``name=``, or timm's ``global_pool``), such a module is
#: replaced itself, in its own layout.
_OWN_POOLS: tuple[type[nn.Module], ...] = (GlobalPool, GeM, LSEPool, AttentionPool, *QUERY_POOLS)


def _check_names(name: Any) -> tuple[str, ...] | None:
    """``name`` as a tuple of dotted names (None: not given)."""
    if name is None:
        return None
    names = (name,) if isinstance(name, str) else name
    if isinstance(names, (tuple, list)) and names and all(isinstance(n, str) for n in names):
        return tuple(names)
    raise TypeError(
        f"name must be None, the dotted name of a global pool or a list of such names, got "
        f"{name!r}"
    )


def _pools_to_swap(
    model: nn.Module, name: Any = None, layout: str | None = None
) -> list[tuple[str, nn.Module]]:
    """Every registration ``(name, module)`` of the global pools to replace.

    Args:
        model: the model.
        name: None, or the dotted name(s) of the pool(s) to replace (each a global adaptive pool
            or a module holding exactly one, as timm's ``global_pool``).
        layout: the ``layout=`` given to :func:`swap_pool`: with it, a named module (or timm's
            ``global_pool``) that holds no global adaptive pool is replaced itself (a token pool
            of the model's own); globalpool's pools are so replaced without it.

    Returns:
        Every registration of the chosen pools (a module shared by two attributes is listed
        under both paths): those named by ``name``; else the one inside the modules named
        ``global_pool`` when the model has one (timm's convention); else the model's only one.
        Several distinct pools and no ``name`` (a squeeze-excitation's beside the final one)
        are refused, listing them.
    """
    names = _check_names(name)
    every = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if _is_global(m)]
    if names is not None:
        known = dict(model.named_modules())
        for n in names:
            if n not in known:
                raise ValueError(
                    f"name {n!r} is not a module of the model; expected the dotted name of one "
                    f"of its global pools {_distinct_names(every)}"
                )
        roots, what = list(names), "name"
    else:
        roots = [n for n, _ in model.named_modules() if n.rpartition(".")[2] == "global_pool"]
        what = "global_pool"
        if not roots:
            if not every:
                raise ValueError(f"model has no {_POOL_WORDS} to swap")
            found = _distinct_names(every)
            if len(found) > 1:
                raise ValueError(
                    f"model has {len(found)} global pools {found}; swap_pool replaces the "
                    "one(s) you name, so that a pool elsewhere (a squeeze-excitation block's) "
                    f"does not change what its block computes: pass name= (e.g. "
                    f"name={found[-1]!r}), or a list of names; nothing was changed"
                )
            return every
    chosen: set[int] = set()
    for root in roots:
        inside = {
            id(m): n for n, m in every if root == "" or n == root or n.startswith(root + ".")
        }
        held_module = model.get_submodule(root)
        if not inside and root and (layout is not None or isinstance(held_module, _OWN_POOLS)):
            chosen.add(id(held_module))  # replaced itself: a token pool, or globalpool's own
            continue
        if len(inside) != 1:
            held = type(held_module).__name__
            found = "no" if not inside else f"{len(inside)} ({sorted(inside.values())})"
            label = f"model's global_pool ({root}: {held})" if what == "global_pool" else (
                f"name={root!r} ({held})"
            )
            hint = (
                "(a pool computed by a function, such as timm's 'fast', 'avgmax' or "
                "'catavgmax', has none): build the model with an 'avg' or 'max' global pool"
                if what == "global_pool"
                else f"; name a global pool: {_distinct_names(every)}"
            ) + (
                ", or pass layout= ('channels_last' for (N, L, C) tokens) to replace the module "
                "itself"
                if not inside and root
                else ""
            )
            raise ValueError(
                f"{label} holds {found} {_POOL_WORDS}; swap_pool replaces exactly one such "
                f"module there {hint}"
            )
        chosen.update(inside)
    # every registration of a chosen pool, so that one shared under several names stays shared
    return [
        (n, m) for n, m in model.named_modules(remove_duplicate=False) if id(m) in chosen
    ]


def _swap_layout(found: list[tuple[str, nn.Module]], layout: str | None) -> str:
    """The layout of the new pool: a torch adaptive pool's input is channels-first, globalpool's
    pool has its own ``layout``, any other module the ``layout`` given; a contradiction is
    refused."""
    if layout is not None:
        check_layout(layout)
    layouts = {}
    for where, module in found:
        own = module.layout if isinstance(module, _OWN_POOLS) else (
            "channels_first" if _is_global(module) else None
        )
        if own is not None and layout is not None and own != layout:
            why = (
                f"it is a {type(module).__name__} with layout={own!r}"
                if isinstance(module, _OWN_POOLS)
                else f"{type(module).__name__} pools (N, C, *S) maps"
            )
            raise ValueError(
                f"layout={layout!r} contradicts the pool {where!r} it replaces: {why}; leave "
                "layout=None"
            )
        layouts[own or layout] = where
    if len(layouts) > 1:
        raise ValueError(
            f"the pools to replace take different layouts {sorted(layouts)}; swap them one at a "
            "time with name="
        )
    return next(iter(layouts))


def _distinct_names(found: list[tuple[str, nn.Module]]) -> list[str]:
    """The first name of each distinct module of ``found``, in order."""
    first: dict[int, str] = {}
    for n, m in found:
        first.setdefault(id(m), n)
    return list(first.values())


_CLASSIFIER_WORDS = "an nn.Linear, a 1x1 nn.Conv2d or an nn.Identity (no classifier)"


def _is_classifier(module: nn.Module) -> bool:
    """An ``nn.Linear``, a 1x1 ``nn.Conv2d`` (timm's ``use_conv=True``) or an ``nn.Identity``
    (timm's ``num_classes=0``)."""
    return isinstance(module, (nn.Linear, nn.Identity)) or _is_conv_classifier(module)


def _is_conv_classifier(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and tuple(module.kernel_size) == (1, 1)
            and module.groups == 1)


def _classifier_width(fc: nn.Module | None) -> int | None:
    """The width the classifier takes; None for an ``nn.Identity`` (any width)."""
    if isinstance(fc, nn.Linear):
        return fc.in_features
    if isinstance(fc, nn.Conv2d):
        return fc.in_channels
    return None


def _find_classifier(model: nn.Module, kind: Any) -> str:
    """The one ``nn.Linear`` among :data:`CLASSIFIER_NAMES` (else the one 1x1 ``nn.Conv2d`` or
    ``nn.Identity``), or a ValueError saying to pass ``classifier=``."""
    linear: dict[int, str] = {}
    other: dict[int, str] = {}
    for name in CLASSIFIER_NAMES:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            linear.setdefault(id(module), name)
        elif _is_classifier(module):
            other.setdefault(id(module), name)
    found = linear or other
    if len(found) == 1:
        return next(iter(found.values()))
    what = "none" if not found else f"several: {sorted(found.values())}"
    raise ValueError(
        f"kind {kind!r} needs classifier= (the dotted name of the module after the pool: "
        f"{_CLASSIFIER_WORDS}), got None, and the model has {what} under the names "
        f"{list(CLASSIFIER_NAMES)}; pass classifier="
    )


def _needs_channels(kind: Any, params: dict[str, Any]) -> bool:
    """Whether the new pool learns per-channel weights (attention, per-channel GeM / lse, a
    query-based attention pool), so that it must know the channel count."""
    if kind in LEARNED_POOLS:
        return True
    per_position = any(q.per_position for k in kinds_of(kind) for q in registry.spec(k).params)
    return per_position or params.get("per_channel") is True


def _needs_classifier(kind: Any, params: dict[str, Any]) -> bool:
    """Whether the new pool needs the classifier: its width differs, or it learns per-channel
    weights."""
    return _needs_channels(kind, params) or (
        kind not in LEARNED_POOLS and output_width(kind, 1) != 1
    )


#: Module types whose input width is fixed, and that width.
_WIDTHS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Linear, "in_features"),
    (nn.modules.conv._ConvNd, "in_channels"),
    (nn.LayerNorm, "normalized_shape"),
    (nn.RMSNorm, "normalized_shape"),
    (nn.GroupNorm, "num_channels"),
    (nn.modules.batchnorm._NormBase, "num_features"),
    (nn.PReLU, "num_parameters"),
)


def _input_width(module: nn.Module) -> tuple[str, int | None] | None:
    """``(attribute, width)`` of a module that only takes inputs of one width (``width`` None
    when the module holds its own parameters or buffers but its type is unknown here); None
    for a module that takes any width (Flatten, Dropout, an activation, a container)."""
    for kind, attr in _WIDTHS:
        if isinstance(module, kind):
            value = getattr(module, attr)
            width = math.prod(value) if isinstance(value, tuple) else int(value)
            if kind is nn.PReLU and width == 1:
                return None  # one slope for every channel
            own = any(True for _ in module.parameters(recurse=False)) or any(
                True for _ in module.buffers(recurse=False)
            )
            if kind in (nn.GroupNorm, nn.modules.batchnorm._NormBase) and not own:
                return None  # no affine parameters nor running statistics: any width
            return attr, width
    own = any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )
    return ("parameters", None) if own else None


def _between(
    model: nn.Module, pools: list[tuple[str, nn.Module]], classifier: str
) -> list[tuple[str, nn.Module, str, int | None]]:
    """The fixed-width modules registered after the pool(s) and before the classifier, in the
    model's registration order (the forward's order in timm's and torchvision's models):
    ``(name, module, attribute, width)``. Ancestors of the classifier, the pools and what they
    hold are left out; a classifier registered before the pool leaves none."""
    order = [n for n, _ in model.named_modules(remove_duplicate=False)]
    pool_names = {n for n, _ in pools}
    after = max(i for i, n in enumerate(order) if n in pool_names)
    try:
        before = order.index(classifier)
    except ValueError:
        return []
    out = []
    modules = dict(model.named_modules(remove_duplicate=False))
    for n in order[after + 1:before]:
        if classifier.startswith(n + ".") or any(n.startswith(p + ".") for p in pool_names):
            continue
        width = _input_width(modules[n])
        if width is not None:
            out.append((n, modules[n], *width))
    return out


def _like(model: nn.Module, fc: nn.Module | None) -> dict[str, Any]:
    """Device and dtype for new modules: the classifier's, else the model's first floating
    parameter or buffer (default when it has none)."""
    tensors = (*(fc.parameters() if fc is not None else ()), *model.parameters(), *model.buffers())
    like = next((t for t in tensors if t.is_floating_point()), None)
    return {} if like is None else {"device": like.device, "dtype": like.dtype}


def swap_pool(
    model: nn.Module,
    kind: str | tuple[str, ...],
    *,
    name: str | list[str] | tuple[str, ...] | None = None,
    classifier: str | None = None,
    layout: str | None = None,
    **params: Any,
) -> nn.Module:
    """Replace the ``AdaptiveAvg/MaxPool*d(1)`` global pool(s) of ``model`` (or a token pool, see
    ``layout``) by globalpool's ``kind``, in place; the new modules get the model's device and
    dtype. Every check is made,
    and every new module built, before anything changes: a refused call leaves the model as it
    was.

    Args:
        model: the model (or a lone ``AdaptiveAvg/MaxPool*d(1)``: then the new pool is
            returned, as there is nothing to replace it in).
        kind: a kind or a tuple of kinds, or a query-based attention pool: ``"map"``
            (:class:`~globalpool.LatentAttentionPool`), ``"simpool"``, ``"clip"`` (which needs
            ``spatial_size``), built by :func:`~globalpool.make_learned_pool`.
        name: which pool(s): the dotted name of a global adaptive pool (or of a module holding
            exactly one, such as timm's ``global_pool`` wrapper), or a list of them. By default:
            in a model with a module named ``global_pool`` (timm's convention, possibly a
            wrapper such as ``SelectAdaptivePool2d``), the one pool inside it (a
            ``global_pool`` holding none or several is refused); else the model's only global
            pool. A model with several (a squeeze-excitation block's beside the final one) and
            no ``name`` is refused, listing them: replacing a squeeze-excitation pool changes
            what its block computes.
        classifier: the dotted name of the classifier that takes the pooled features, for
            the kinds that need it (below): an ``nn.Linear``, a 1x1 ``nn.Conv2d`` (timm's
            ``use_conv=True``; resized as a ``Linear`` is) or an ``nn.Identity`` (timm's
            ``num_classes=0``: the features just get wider, nothing is resized; kinds with
            per-channel weights are refused there, as nothing tells their channel count).
            Default: the one ``nn.Linear`` named ``fc``, ``head``, ``classifier`` or ``head.fc``
            (:data:`CLASSIFIER_NAMES`), else the one 1x1 ``nn.Conv2d`` or ``nn.Identity`` there
            (none or several is an error asking for ``classifier=``).
        layout: where the new pool's input keeps its channels. None (default): found out from
            the pool replaced: a torch adaptive pool takes ``(N, C, *S)`` (channels-first),
            globalpool's own pools (``GlobalPool``, ``GeM``, ``LSEPool``, ``AttentionPool``
            and the query-based ones) have their ``layout``. Given, it also lets ``name`` (or
            the module named ``global_pool``) be a module of the model's own that holds no
            adaptive pool, such as a ViT's class-token pool over ``(N, L, C)`` tokens
            (``layout="channels_last"``): that module is replaced itself. A layout that
            contradicts the pool replaced is refused.
        params: go to :func:`~globalpool.make_pool` (``p``, ``learnable``, ``per_channel``
            ...), or to the query-based pool (``num_heads``, ``latent_pool``, ``spatial_size``
            ...).

    Returns:
        ``model``, changed in place; or the new pool when ``model`` is itself the pool.

    The new pool keeps singleton spatial dims (and a globalpool pool's ``keepdim``), so whatever
    flattening the model does still works; a query-based pool returns ``(N, C)``, which a
    ``flatten(1)`` leaves as it is. A globalpool pool that keeps singleton dims (``GlobalPool``,
    ``GeM``, ``LSEPool`` or ``AttentionPool`` with ``keepdim=True``: what an earlier swap put in,
    or the pool inside ``globalpool.compat.timm.SelectAdaptivePool``) is a global pool too, so a
    model can be swapped again. A pool registered under several names (one module shared by
    several attributes) is replaced under every name by one new module, so they stay shared.
    ``AdaptiveMaxPool*d(1, return_indices=True)`` is refused: its (values, indices) output has
    no globalpool equivalent.

    Kinds whose width differs (``catavgmax``, a tuple) or that learn per-channel weights
    (``attention``, ``per_channel=True``, the query-based pools) swap one pool and need the
    classifier. The pooled
    width is the input width of the first fixed-width module (a ``Linear``, convolution, norm,
    or a module with its own parameters) registered after the pool, the classifier at the
    latest. A kind of another width rebuilds the classifier (newly initialised) at the new
    width, and is refused when such a module sits between the pool and the classifier (a
    ConvNeXt head's ``LayerNorm`` of the channels, a MobileNetV3 ``conv_head``), naming it: it
    would receive twice the features it takes. "Between" is the order in which the model
    registers its modules, which is the forward's order in timm's and torchvision's models.

    >>> import torch, globalpool as gp
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1),
    ...                           torch.nn.Flatten(), torch.nn.Linear(8, 2))
    >>> net = gp.swap_pool(net, "catavgmax", classifier="3")
    >>> net(torch.randn(1, 3, 9, 9)).shape, net[3].in_features
    (torch.Size([1, 2]), 16)
    >>> class Net(torch.nn.Module):  # timm's names: global_pool, fc
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = torch.nn.Conv2d(3, 8, 3)
    ...         self.global_pool = torch.nn.AdaptiveAvgPool2d(1)
    ...         self.fc = torch.nn.Linear(8, 2)
    ...     def forward(self, x):
    ...         return self.fc(self.global_pool(self.conv(x)).flatten(1))
    >>> gp.swap_pool(Net(), "catavgmax").fc.in_features
    16
    >>> gp.swap_pool(torch.nn.AdaptiveAvgPool2d(1), "max")  # a lone pool: the new one
    GlobalPool(kind='max', layout='channels_first', keepdim=True)
    >>> class Tokens(torch.nn.Module):  # a ViT's end: (N, L, C) tokens, the class token pooled
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.global_pool = gp.GlobalPool("first", layout="channels_last")
    ...         self.head = torch.nn.Linear(8, 2)
    ...     def forward(self, tokens):
    ...         return self.head(self.global_pool(tokens))
    >>> vit = gp.swap_pool(Tokens(), "map", num_heads=2)  # its layout: the pool's own
    >>> vit.global_pool.layout, vit(torch.randn(3, 5, 8)).shape
    ('channels_last', torch.Size([3, 2]))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    learned = isinstance(kind, str) and kind in LEARNED_POOLS
    if not learned:
        kind = check_kinds(kind)
    if layout is not None:
        check_layout(layout)
    found = _pools_to_swap(model, name, layout)
    layout = _swap_layout(found, layout)
    for where, module in found:
        if getattr(module, "return_indices", False):
            raise ValueError(
                f"cannot swap {where!r}: {type(module).__name__}(return_indices=True) returns "
                f"(values, indices) and globalpool's pools return values only; expected "
                f"return_indices=False"
            )
    # an earlier swap may have put in a pool of another width (catavgmax: 2 features a channel)
    mult = max(_features_per_channel(m) for _, m in found)
    needs = _needs_classifier(kind, params) or mult != 1
    if found[0][0] == "":  # the model is the pool: nothing to put the new one in, or size it by
        return _lone_pool(model, kind, classifier, needs, params, layout)
    if classifier is None and needs:
        classifier = _find_classifier(model, kind)
    fc = _classifier_module(model, classifier) if classifier is not None else None
    pooled = _classifier_width(fc) if fc is not None else 0  # the width the classifier takes
    if fc is not None and _is_conv_classifier(fc) and learned:
        raise ValueError(
            f"kind {kind!r} returns (N, C) features, but the classifier {classifier!r} is a 1x1 "
            "nn.Conv2d that takes the pooled map (N, C, 1, 1); use a kind (avg, gem, "
            "catavgmax, ...) or give the model an nn.Linear classifier; nothing was changed"
        )
    if needs:
        distinct = _distinct_names(found)
        if len(distinct) > 1:
            raise ValueError(
                f"kind {kind!r} needs the width of the features the pool gives the classifier, "
                f"which swap_pool takes from one pool; got {len(distinct)} pools {distinct}: "
                "swap them with a kind of the same width and no per-channel weights, or one "
                "at a time with name="
            )
        between = _between(model, found, classifier)
        if between and between[0][3] is not None:
            pooled = between[0][3]
        if pooled is None:  # an nn.Identity classifier: features of any width go out
            if _needs_channels(kind, params):
                raise ValueError(
                    f"cannot swap {distinct[0]!r} for kind {kind!r}: its per-channel weights "
                    f"need the channel count, and the classifier {classifier!r} is an "
                    "nn.Identity (no classifier, as with num_classes=0), which does not tell it; "
                    "use a kind without per-channel weights (avg, max, gem, catavgmax, ...) or "
                    "give the model a classifier first; nothing was changed"
                )
            pooled = 0  # unknown, and not needed: no module takes the pooled width
        width = _swapped_width(kind, pooled // mult, layout, params)
        if width != pooled and between:
            raise ValueError(_blocked(distinct[0], kind, classifier, between[0], width, pooled))
        if between and between[0][3] is None:
            raise ValueError(
                f"cannot tell the channel count of {distinct[0]!r} for kind {kind!r}: "
                f"{between[0][0]!r} ({type(between[0][1]).__name__}), a module with its own "
                f"parameters of unknown input width, sits between it and the classifier "
                f"{classifier!r}; nothing was changed"
            )
        if pooled % mult:
            raise ValueError(
                f"cannot swap {distinct[0]!r}: it gives {mult} features per channel, but the "
                f"classifier {classifier!r} takes {pooled} features, not a multiple of {mult}; "
                "nothing was changed"
            )
    channels = pooled // mult
    like = _like(model, fc)
    replacements: dict[int, nn.Module] = {}  # id(old pool) -> its one replacement
    for _, module in found:
        if id(module) not in replacements:
            if learned:
                new = make_learned_pool(kind, channels, layout, params)
            else:  # a torch pool's singleton dims are kept; globalpool's own keep its keepdim
                keepdim = _is_global(module) or bool(getattr(module, "keepdim", False))
                new = make_pool(kind, channels, keepdim=keepdim, layout=layout, **params)
            replacements[id(module)] = new.to(**like)
    resized = None
    width = next(iter(replacements.values())).output_width(channels) if learned else (
        output_width(kind, channels)
    )
    if fc is not None and needs and width != pooled and not isinstance(fc, nn.Identity):
        resized = _resized_classifier(fc, width)  # one pool, nothing between it and fc
    for where, module in found:  # every check passed, every module is built: change the model
        _set_submodule(model, where, replacements[id(module)])
    if resized is not None:
        _set_submodule(model, classifier, resized)
    return model


def _resized_classifier(fc: nn.Module, width: int) -> nn.Module:
    """A new (freshly initialised) classifier like ``fc`` that takes ``width`` features."""
    bias = fc.bias is not None
    if isinstance(fc, nn.Conv2d):
        new: nn.Module = nn.Conv2d(width, fc.out_channels, 1, stride=fc.stride, padding=fc.padding,
                                   dilation=fc.dilation, bias=bias, padding_mode=fc.padding_mode)
    else:
        new = nn.Linear(width, fc.out_features, bias=bias)
    return new.to(fc.weight.device, fc.weight.dtype)


def _classifier_module(model: nn.Module, classifier: Any) -> nn.Module:
    if not isinstance(classifier, str):
        raise TypeError(
            f"classifier must be the dotted name of {_CLASSIFIER_WORDS}, or None; got "
            f"{classifier!r}"
        )
    try:
        fc = model.get_submodule(classifier)
    except AttributeError:
        raise ValueError(
            f"classifier {classifier!r} is not a module of the model; expected the dotted name "
            f"of the nn.Linear after the pool, such as "
            f"{[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]}"
        ) from None
    if not _is_classifier(fc):
        raise TypeError(
            f"classifier must name {_CLASSIFIER_WORDS}, got {classifier!r}: {fc!r}"
        )
    return fc


def _swapped_width(kind: Any, channels: int, layout: str, params: dict[str, Any]) -> int:
    """The width of the features the new pool gives, from ``channels`` channels."""
    if kind not in LEARNED_POOLS:
        return output_width(kind, channels)
    if kind == "clip" and params.get("output_dim") is not None:
        return params["output_dim"]  # make_learned_pool checks it, before anything changes
    return channels


def _blocked(
    pool_name: str,
    kind: Any,
    classifier: str,
    blocker: tuple[str, nn.Module, str, int | None],
    width: int,
    channels: int,
) -> str:
    """The refusal of a kind of another width whose output would reach ``blocker``."""
    name, module, attr, takes = blocker
    what = f"{attr}={takes}" if takes is not None else "its own parameters"
    hint = (
        f", or pass classifier={name!r} if it is the nn.Linear that takes the pooled features "
        "(it is rebuilt at the new width)"
        if isinstance(module, nn.Linear)
        else ""
    )
    gives = (
        f"{width} features from {channels} channels" if kind in LEARNED_POOLS
        else f"{output_width(kind, 1)} features per channel"
    )
    return (
        f"cannot swap {pool_name!r} for kind {kind!r}, which gives {gives}: {name!r} "
        f"({type(module).__name__}, {what}) sits between the pool and the "
        f"classifier {classifier!r} and takes the pooled features at their present width, so "
        f"the model would no longer run; nothing was changed. Use a kind of the same width "
        f"(avg, max, avgmax, gem, lse, attention){hint}"
    )


def _lone_pool(
    model: nn.Module,
    kind: Any,
    classifier: Any,
    needs: bool,
    params: dict[str, Any],
    layout: str,
) -> nn.Module:
    """The new pool for a model that is itself the pool."""
    if classifier is not None:
        raise ValueError(
            f"model is itself the pool ({type(model).__name__}) and has no classifier; got "
            f"classifier={classifier!r}"
        )
    if needs and (kind in ("attention", *LEARNED_POOLS) or params.get("per_channel") is True):
        raise ValueError(
            f"model is itself the pool ({type(model).__name__}): nothing gives the channel "
            f"count that kind {kind!r} with its per-channel weights needs; build it with "
            f"gp.make_pool({kind!r}, channels, keepdim=True, ...)"
        )
    keepdim = _is_global(model) or bool(getattr(model, "keepdim", False))
    return make_pool(kind, 0, keepdim=keepdim, layout=layout, **params).to(**_like(model, None))


def _features_per_channel(pool: nn.Module) -> int:
    """How many features a pool gives per channel: 1 for torch's, 2 for a catavgmax ..."""
    return pool.output_width(1) if isinstance(pool, GLOBALPOOL_POOLS) else 1


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
