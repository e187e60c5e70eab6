"""Exact class activation maps of heads whose logit is linear in the positions.

For a head whose logit is ``z_k = sum_c W_kc pooled_c + b_k`` the map ``M_k(s)`` is defined so
that its mean over the real positions is exactly ``z_k - b_k`` (for a NiN head, ``z_k`` itself):

- ``avg``: ``M_k(s) = sum_c W_kc x_cs`` (Zhou et al., 2016, "Learning Deep Features for
  Discriminative Localization");
- ``max``: ``M_k(s) = n sum_c W_kc max_c [s is an arg-max of channel c] / (number of arg-maxes)``
  with ``n`` the number of real positions: the max is credited to the position(s) it came from;
- ``avgmax``: half the ``avg`` map plus half the ``max`` map;
- ``catavgmax``: the ``avg`` map of the first ``C`` weight columns plus the ``max`` map of the last;
- ``attention``: ``M_k(s) = n w_s / (sum_t w_t) * sum_c W_kc x_cs`` with the pool's weights ``w``;
- NiN: the head's own class map (its logit is that map's global average).

>>> import torch, globalpool as gp
>>> head = gp.ClassifierHead(4, 3, pool="avgmax").double()
>>> x = torch.randn(2, 4, 5, dtype=torch.float64)
>>> maps = exact_maps(head, x, None, torch.tensor([0, 2]))
>>> logits = head(x) - head.fc.bias
>>> torch.allclose(maps.mean(-1), logits[[0, 1], [0, 2]])
True
"""

from __future__ import annotations

import torch
from torch import nn

from globalpool.heads import ClassifierHead, NiNHead
from globalpool.layers import AttentionPool, GlobalPool

#: Pool kinds of a :class:`~globalpool.ClassifierHead` with an exact map.
EXACT_KINDS = ("avg", "max", "avgmax", "catavgmax", "attention")


def head_kind(head: nn.Module | None) -> str | None:
    """``"nin"``, the pool kind of a :class:`~globalpool.ClassifierHead` (``"gem"`` for GeM), or
    None for anything else."""
    if isinstance(head, NiNHead):
        return "nin"
    if isinstance(head, ClassifierHead):
        pool = head.pool
        if isinstance(pool, AttentionPool):
            return "attention"
        if isinstance(pool, GlobalPool):
            return pool.kind
        return getattr(pool, "kind", "gem")
    return None


def is_exact(head: nn.Module | None) -> bool:
    """True when :func:`exact_maps` applies to ``head`` (a ClassifierHead whose logits are one
    Linear of the pooled features, :attr:`~globalpool.ClassifierHead.is_linear`)."""
    kind = head_kind(head)
    if isinstance(head, ClassifierHead) and not head.is_linear:
        return False
    return kind == "nin" or kind in EXACT_KINDS


def _max_credit(x: torch.Tensor, real: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``n * max_c * [s is an arg-max] / ties`` per channel, ``(N, C, *S)``; 0 where padded or
    the sample is empty. ``x`` channels-first, ``real`` ``(N, 1, *S)``, ``n`` ``(N, 1, 1..)``."""
    dims = tuple(range(2, x.ndim))
    held = torch.where(real, x, -torch.inf)
    top = held.amax(dims, keepdim=True)
    ties = (held == top) & real
    count = ties.sum(dims, keepdim=True).clamp(min=1).to(x.dtype)
    top = torch.where(torch.isfinite(top), top, 0.0)
    return torch.where(ties, n * top / count, 0.0)


def exact_maps(
    head: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    targets: torch.Tensor,
) -> torch.Tensor:
    """Exact maps ``(N, *S)`` of ``head`` (a NiN head or a :class:`ClassifierHead` with a kind in
    :data:`EXACT_KINDS`) for class ``targets[i]`` of sample ``i``; ``x`` is the head's input in
    its layout, ``mask`` ``(N, *S)`` or None. Padded positions are exactly 0."""
    kind = head_kind(head)
    first = head.layout == "channels_first"
    rows = torch.arange(x.shape[0], device=x.device)
    if kind == "nin":
        maps = head.class_maps(x, mask)
        maps = maps if first else maps.movedim(-1, 1)
        out = maps[rows, targets]
        return out if mask is None else torch.where(mask, out, 0.0)
    if kind not in EXACT_KINDS or not head.is_linear:
        raise ValueError(
            f"no exact map for a head pooling with {kind!r}"
            + ("" if head.is_linear else " and a norm, a hidden layer or no classifier")
        )
    xf = x if first else x.movedim(-1, 1)  # (N, C, *S)
    real = (
        torch.ones((1, 1, *xf.shape[2:]), dtype=torch.bool, device=x.device)
        if mask is None
        else mask.unsqueeze(1)
    )
    xf = torch.where(real, xf, 0.0)  # select, not multiply: what padding holds never counts
    dims = tuple(range(2, xf.ndim))
    n = real.expand(xf.shape[0], 1, *xf.shape[2:]).sum(dims, keepdim=True).to(xf.dtype)
    weight = head.fc.weight[targets].to(xf.dtype)  # (N, F)
    channels = xf.shape[1]
    # (N, C, 1, ..): C spelled out, since -1 cannot be inferred from an empty batch (N = 0)
    shape = (xf.shape[0], channels, *([1] * len(dims)))
    if kind == "avg":
        per_channel = weight.reshape(shape) * xf
    elif kind == "max":
        per_channel = weight.reshape(shape) * _max_credit(xf, real, n)
    elif kind == "avgmax":
        per_channel = weight.reshape(shape) * (xf + _max_credit(xf, real, n)) / 2
    elif kind == "catavgmax":
        w_avg, w_max = weight[:, :channels], weight[:, channels:]
        per_channel = w_avg.reshape(shape) * xf + w_max.reshape(shape) * _max_credit(xf, real, n)
    else:  # attention
        w = head.pool.weights(x, mask).to(xf.dtype).unsqueeze(1)  # (N, 1, *S)
        w = torch.where(real, w, 0.0)
        total = w.sum(dims, keepdim=True)
        share = torch.where(total > 0, n * w / torch.where(total > 0, total, 1.0), 0.0)
        per_channel = weight.reshape(shape) * xf * share
    out = per_channel.sum(1)
    return out if mask is None else torch.where(mask, out, 0.0)
