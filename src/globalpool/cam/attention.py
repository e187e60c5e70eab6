"""Attention maps of the query-based attention pools: where each latent query and head of a
:class:`~globalpool.LatentAttentionPool`, :class:`~globalpool.SimPool` or
:class:`~globalpool.CLIPAttentionPool` looked, as the pool's own forward weighted the positions.

The probabilities are recorded from the pool's forward
(:func:`globalpool.attention.query.recording_attention`), not recomputed. A map is
``(N, latent_len, num_heads, *S)`` (one latent query for SimPool and CLIP); at each real
position it is the attention that query and head gave it, so a map sums to 1 over the real
positions (for CLIP: to 1 less the share its query gave the mean token, which is not a
position). Padded positions are exactly 0, and so is every map of a sample with no real
position.

>>> import torch, globalpool as gp
>>> pool = gp.LatentAttentionPool(8, num_heads=2, latent_len=3)
>>> maps = gp.class_activation_maps(pool, torch.randn(2, 8, 4, 5), method="attention")
>>> maps.shape, bool(torch.allclose(maps.sum((-2, -1)), torch.ones(2, 3, 2)))
(torch.Size([2, 3, 2, 4, 5]), True)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from globalpool.attention import QUERY_POOLS
from globalpool.attention.query import start_recording, stop_recording
from globalpool.heads import ClassifierHead

#: How the per-query, per-head maps may be reduced: None keeps them, ``"mean"`` averages them.
REDUCTIONS: tuple[str | None, ...] = (None, "mean")


def query_pool_of(head: nn.Module | None) -> nn.Module | None:
    """The query-based attention pool ``head`` is, or pools with (a
    :class:`~globalpool.ClassifierHead` with ``pool="map"``, ``"simpool"`` or ``"clip"``);
    None otherwise."""
    if isinstance(head, QUERY_POOLS):
        return head
    if isinstance(head, ClassifierHead) and isinstance(head.pool, QUERY_POOLS):
        return head.pool
    return None


@contextlib.contextmanager
def recording(pool: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The attention probabilities ``pool``'s own calls compute while the body runs (only
    its calls: another pool's attention is not recorded); its hooks are removed on exit."""
    probs: list[torch.Tensor] = []
    open_: list[list[torch.Tensor]] = []

    def pre_hook(module: nn.Module, args: tuple) -> None:
        open_.append(start_recording())

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        if open_:
            probs.extend(stop_recording(open_.pop()))

    handles = [
        pool.register_forward_pre_hook(pre_hook),
        pool.register_forward_hook(post_hook, always_call=True),
    ]
    try:
        yield probs
    finally:
        for handle in handles:
            handle.remove()
        for recorder in open_:
            stop_recording(recorder)


def attention_maps(
    probs: list[torch.Tensor],
    spatial: tuple[int, ...],
    pool_mask: torch.Tensor | None,
    mask: torch.Tensor | None,
    reduce: str | None,
) -> torch.Tensor:
    """The maps from the probabilities one call of the pool recorded.

    Args:
        probs: what :func:`~globalpool.attention.query.recording_attention` recorded during the
            call, one ``(N, H, Lq, K)`` tensor (``K`` the ``L = prod(S)`` positions, after any
            keys the pool adds first, such as CLIP's mean token).
        spatial: ``S``.
        pool_mask: the mask the pool was called with, ``(N, *S)``, or None.
        mask: the caller's mask ``(N, *S)`` (True = real) or None: positions outside it are 0.
        reduce: None or ``"mean"`` (over the latent queries and heads).

    Returns:
        ``(N, Lq, H, *S)``, or ``(N, *S)`` with ``reduce="mean"``.
    """
    if len(probs) != 1:
        raise ValueError(
            f"the attention pool computed its attention {len(probs)} times in one forward; "
            "expected once (a pool that runs once per forward)"
        )
    (p,) = probs
    n, heads, queries, keys = p.shape
    positions = math.prod(spatial)
    maps = p[..., keys - positions:].transpose(1, 2).reshape(n, queries, heads, *spatial)
    lead = (n, 1, 1, *spatial)
    for m in (pool_mask, mask):
        if m is not None:
            m = m.to(maps.device)
            real = m.reshape(n, -1).any(1).reshape(n, *([1] * (len(lead) - 1)))
            maps = torch.where(m.reshape(lead) & real, maps, 0.0)
    return maps.mean((1, 2)) if reduce == "mean" else maps
