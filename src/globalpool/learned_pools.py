"""Named pools that are modules of their own rather than registry kinds: the query-based attention
pools a :class:`~globalpool.ClassifierHead` builds from ``pool="map"``, ``"simpool"`` or
``"clip"``.

Their names are reserved in the registry, so no kind can take one (and a kind registered before
this module is imported under such a name is an error here).

>>> pool = make_learned_pool("simpool", 16, "channels_first", {"gamma": 2.0})
>>> type(pool).__name__, pool.gamma, pool.output_width(16)
('SimPool', 2.0, 16)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from globalpool import registry
from globalpool.attention.clip import CLIPAttentionPool
from globalpool.attention.latent import LatentAttentionPool
from globalpool.attention.simpool import SimPool

#: Pool name -> module class, called as ``cls(channels, layout=..., **params)``.
LEARNED_POOLS: dict[str, Callable[..., nn.Module]] = {
    "map": LatentAttentionPool,
    "simpool": SimPool,
    "clip": CLIPAttentionPool,
}

for _name in LEARNED_POOLS:
    registry.reserve_name(_name, "a learned attention pool of globalpool.ClassifierHead")


def _arguments(cls: Callable[..., nn.Module]) -> tuple[str, ...]:
    names = list(inspect.signature(cls).parameters)[1:]  # after channels
    return tuple(n for n in names if n != "layout")


def make_learned_pool(
    name: str, channels: int, layout: str, params: dict[str, Any]
) -> nn.Module:
    """The learned pool ``name`` (a key of :data:`LEARNED_POOLS`) over ``channels`` channels.

    Args:
        name: ``"map"`` (:class:`~globalpool.LatentAttentionPool`, reduced to ``(N, C)``:
            its ``pool`` is given as ``latent_pool``, ``"token"`` or ``"avg"``), ``"simpool"``
            or ``"clip"`` (which needs ``spatial_size``).
        channels: input channels.
        layout: ``"channels_first"`` or ``"channels_last"``.
        params: the module's keyword arguments; unknown ones are refused, naming the known.

    Returns:
        The module; ``module.output_width(channels)`` is its pooled width.

    >>> import torch, globalpool as gp
    >>> pool = gp.make_learned_pool("simpool", 16, "channels_first", {})
    >>> pool(torch.randn(2, 16, 5, 5)).shape
    torch.Size([2, 16])
    """
    cls = LEARNED_POOLS[name]
    takes = _arguments(cls)
    if name == "map":  # a head's own argument is called pool: the reduction is latent_pool
        takes = tuple("latent_pool" if t == "pool" else t for t in takes)
    unknown = sorted(set(params) - set(takes))
    if unknown:
        raise TypeError(
            f"pool {name!r} got unexpected argument(s) {unknown}; it takes {', '.join(takes)}"
        )
    if name == "map":
        params = {("pool" if k == "latent_pool" else k): v for k, v in params.items()}
    if name == "clip" and params.get("spatial_size") is None:
        raise ValueError(
            "pool 'clip' needs spatial_size (the size its positional table is learned at, "
            "such as (7, 7)), got None"
        )
    if name == "map" and params.get("pool", "token") in ("", None):
        raise ValueError(
            f"pool 'map' in a head must reduce its latents to (N, C): latent_pool must be "
            f"'token' or 'avg', got {params['pool']!r}"
        )
    return cls(channels, layout=layout, **params)
