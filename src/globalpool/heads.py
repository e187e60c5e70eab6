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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from globalpool.class_map_norm import ClassMapNorm
from globalpool.contract import check_input, check_kind, check_layout, check_mask, spatial_shape
from globalpool.functional import pool
from globalpool.kinds import KINDS, TOKEN_KINDS
from globalpool.layers import (
    GlobalPool,
    check_backend,
    check_channel_count,
    check_channels,
    make_pool,
)

#: The image / signal heads (``globalpool compare`` compares them). :func:`make_head` also builds
#: a head of a token kind (``sum``, ``first``, ``last``) or of a tuple of kinds.
HEADS: tuple[str, ...] = ("fc", *(k for k in KINDS if k not in TOKEN_KINDS), "nin")

#: Activations of the :class:`NiNHead` class maps.
NIN_ACTIVATIONS: tuple[str, ...] = ("softplus", "relu")


class ClassifierHead(nn.Module):
    """Global pooling, optional dropout, then one ``Linear`` sized to the pool's feature width.

    >>> import torch, globalpool as gp
    >>> head = gp.ClassifierHead(32, 5, pool="gem", dropout=0.1)
    >>> head(torch.randn(3, 32, 4, 4)).shape, head.feature_width
    (torch.Size([3, 5]), 32)
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pool: str = "avg",
        *,
        dropout: float = 0.0,
        layout: str = "channels_first",
        **pool_params: Any,
    ) -> None:
        super().__init__()
        check_channels(in_channels, "in_channels")
        check_channels(num_classes, "num_classes")
        self.in_channels, self.layout = in_channels, layout
        self.pool = make_pool(pool, in_channels, layout=layout, **pool_params)
        self.feature_width = self.pool.output_width(in_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(self.feature_width, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x)
        check_channel_count(x, self.layout, self.in_channels, "ClassifierHead")
        return self.fc(self.dropout(self.pool(x, mask=mask)))


class FlattenFCHead(nn.Module):
    """The "traditional" head: flatten the whole feature map, a hidden FC layer, then classes.

    Its parameter count grows with the spatial size, and it only accepts that size. ``x`` is
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
        self.in_channels, self.layout = in_channels, layout
        self.spatial_size = tuple(spatial_size)
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
    **pool_params: Any,
) -> nn.Module:
    """Build the head called ``name`` (one of :data:`HEADS`, a token kind ``sum``/``first``/
    ``last``, or a tuple of kinds: a :class:`ClassifierHead` pooling with them).

    Every head takes ``layout`` and ``backend`` (``fc`` does no pooling and only checks it).
    ``fc`` needs ``spatial_size`` and uses ``hidden``; pooling heads accept any spatial size, so
    one call can build any head and ``spatial_size``/``hidden`` are ignored by the others.
    ``dropout`` (before the last layer) is for ``fc`` and the pooling heads; ``nin`` has no layer
    to drop out before and refuses a non-zero one. ``pool_params`` (``p``, ``eps``,
    ``learnable``, ``r``, ``keepdim`` ...) go to the pool of a pooling head; ``fc`` and ``nin``
    refuse them.

    >>> import globalpool as gp
    >>> sorted(gp.HEADS)[:3]
    ['attention', 'avg', 'avgmax']
    >>> gp.make_head("fc", 8, 10, spatial_size=(5,), hidden=16).feature_width
    40
    >>> gp.make_head("nin", 8, 10, p=3.0)
    Traceback (most recent call last):
    ...
    TypeError: head 'nin' got unexpected argument(s) ['p']; it takes layout, backend
    """
    if not isinstance(name, (tuple, list)):
        check_kind(name, (*HEADS, *TOKEN_KINDS), name="head")
    check_layout(layout)
    check_backend(backend)
    if name in ("fc", "nin"):
        extra = sorted(pool_params)
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
    return ClassifierHead(
        in_channels,
        num_classes,
        name,
        dropout=dropout,
        layout=layout,
        backend=backend,
        **pool_params,
    )


_GLOBAL_POOLS = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


def _is_global(module: nn.Module) -> bool:
    if not isinstance(module, _GLOBAL_POOLS):
        return False
    size = module.output_size
    sizes = size if isinstance(size, tuple) else (size,)
    return all(s == 1 for s in sizes)


def swap_pool(
    model: nn.Module, kind: str, *, classifier: str | None = None, **params: Any
) -> nn.Module:
    """Replace every ``AdaptiveAvg/MaxPool*d(1)`` in ``model`` by globalpool's ``kind``, in place.

    The new pool keeps singleton spatial dims, so whatever flattening the model does still works.
    A pool registered under several names (one module shared by several attributes) is replaced
    under every name by one new module, so they stay shared. ``AdaptiveMaxPool*d(1,
    return_indices=True)`` is refused: its (values, indices) output has no globalpool equivalent.
    Kinds whose width differs (``catavgmax``) or that learn per-channel weights (``attention``)
    need ``classifier``: the dotted name of the ``nn.Linear`` that follows, which is rebuilt (newly
    initialised) with the right input width.

    >>> import torch, globalpool as gp
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1),
    ...                           torch.nn.Flatten(), torch.nn.Linear(8, 2))
    >>> net = gp.swap_pool(net, "catavgmax", classifier="3")
    >>> net(torch.randn(1, 3, 9, 9)).shape, net[3].in_features
    (torch.Size([1, 2]), 16)
    """
    check_kind(kind)
    # every registration: a module shared by two attributes is listed under both paths
    found = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if _is_global(m)]
    if not found:
        raise ValueError("model has no AdaptiveAvgPool*d(1)/AdaptiveMaxPool*d(1) to swap")
    for name, module in found:
        if getattr(module, "return_indices", False):
            raise ValueError(
                f"cannot swap {name!r}: {type(module).__name__}(return_indices=True) returns "
                f"(values, indices) and globalpool's pools return values only; expected "
                f"return_indices=False"
            )
    fc = model.get_submodule(classifier) if classifier is not None else None
    if fc is not None and not isinstance(fc, nn.Linear):
        raise TypeError(f"classifier must name an nn.Linear, got {type(fc).__name__}")
    if kind in ("catavgmax", "attention") and fc is None:
        raise ValueError(f"kind {kind!r} needs classifier= (the Linear after the pool), got None")
    channels = fc.in_features if fc is not None else 0
    replacements: dict[int, nn.Module] = {}  # id(old module) -> its one replacement
    for name, module in found:
        new = replacements.get(id(module))
        if new is None:
            if kind == "attention" or kind == "gem":
                new = make_pool(kind, channels, keepdim=True, **params)
            else:
                new = GlobalPool(kind, keepdim=True, **params)
            replacements[id(module)] = new
        _set_submodule(model, name, new)
    if fc is not None and new.output_width(channels) != fc.in_features:
        linear = nn.Linear(new.output_width(channels), fc.out_features, bias=fc.bias is not None)
        _set_submodule(model, classifier, linear.to(fc.weight.device, fc.weight.dtype))
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
