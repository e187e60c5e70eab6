"""Exact class activation maps of heads whose logit is linear in the positions.

For a head whose logit is ``z_k = sum_c W_kc pooled_c + b_k`` the map ``M_k(s)`` is defined so
that its mean over the real positions is exactly ``z_k - b_k`` (for a NiN head, ``z_k`` itself).
It is ``M_k(s) = sum_j W_kj credit_j(s)`` with the pool kind's credit from its registry entry
(the contribution of each position, whose mean over real positions is the pooled value); every
kind with a credit has exact maps, a tuple of such kinds too. The built-in credits:

- ``avg``: ``M_k(s) = sum_c W_kc x_cs`` (Zhou et al., 2016, "Learning Deep Features for
  Discriminative Localization");
- ``max``: ``M_k(s) = n sum_c W_kc max_c [s is an arg-max of channel c] / (number of arg-maxes)``
  with ``n`` the number of real positions: the max is credited to the position(s) it came from;
- ``avgmax``: half the ``avg`` map plus half the ``max`` map;
- ``catavgmax``: the ``avg`` map of the first ``C`` weight columns plus the ``max`` map of the last;
- ``attention``: ``M_k(s) = n w_s / (sum_t w_t) * sum_c W_kc x_cs`` with the pool's weights ``w``;
- ``sum``: ``n`` times the ``avg`` map; ``first`` / ``last``: ``n`` times the chosen position's;
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

from globalpool import registry
from globalpool.contract import kinds_of
from globalpool.heads import ClassifierHead, NiNHead
from globalpool.layers import AttentionPool, GlobalPool


def head_kind(head: nn.Module | None) -> str | tuple[str, ...] | None:
    """``"nin"``, the pool kind of a :class:`~globalpool.ClassifierHead` (a name or a tuple of
    names; ``"gem"`` for GeM), or None for anything else."""
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


def _has_credit(kind: str | tuple[str, ...] | None) -> bool:
    if kind is None:
        return False
    return all(registry.spec(k).credit is not None for k in kinds_of(kind))


def is_exact(head: nn.Module | None) -> bool:
    """True when :func:`exact_maps` applies to ``head``: a NiN head, or a ClassifierHead whose
    logits are one Linear of the pooled features (:attr:`~globalpool.ClassifierHead.is_linear`)
    and whose pool kind(s) have a credit in the registry."""
    kind = head_kind(head)
    if isinstance(head, ClassifierHead) and not head.is_linear:
        return False
    if kind == "nin":
        return True
    return _has_credit(kind) and (
        not isinstance(head.pool, GlobalPool) or not _learned(head.pool)
    )


def _learned(pool: nn.Module) -> bool:
    """A pool with learned parameters has no credit of its own kind (GeM, a learnable lse)."""
    return any(True for _ in pool.parameters())


def _pool_params(head: ClassifierHead, x: torch.Tensor, mask: torch.Tensor | None,
                 kind: str) -> dict:
    """The parameters of ``kind`` as the head's pool uses them, per-position ones flattened
    to ``(N, L)``."""
    pool = head.pool
    if isinstance(pool, AttentionPool):
        return {"weights": pool.weights(x, mask).flatten(1)}
    given = getattr(pool, "params", {})
    full = {**registry.spec(kind).defaults, **given}
    return {q.name: full[q.name] for q in registry.spec(kind).params}


def exact_maps(
    head: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    targets: torch.Tensor,
) -> torch.Tensor:
    """Exact maps ``(N, *S)`` of ``head`` (a NiN head or a :class:`ClassifierHead` whose kind
    has a credit: :func:`is_exact`) for class ``targets[i]`` of sample ``i``; ``x`` is the
    head's input in its layout, ``mask`` ``(N, *S)`` or None. Padded positions are exactly 0."""
    kind = head_kind(head)
    first = head.layout == "channels_first"
    rows = torch.arange(x.shape[0], device=x.device)
    if kind == "nin":
        maps = head.class_maps(x, mask)
        maps = maps if first else maps.movedim(-1, 1)
        out = maps[rows, targets]
        return out if mask is None else torch.where(mask, out, 0.0)
    if not is_exact(head):
        raise ValueError(
            f"no exact map for a head pooling with {kind!r}"
            + ("" if head.is_linear else " and a norm, a hidden layer or no classifier")
        )
    xf = x if first else x.movedim(-1, 1)  # (N, C, *S)
    spatial = xf.shape[2:]
    view = xf.flatten(2) if xf.ndim > 3 else xf  # the canonical (N, C, L)
    flat_mask = None if mask is None else mask.flatten(1)
    credits = [
        registry.run_credit(k, view, flat_mask, _pool_params(head, x, mask, k))
        for k in kinds_of(kind)
    ]
    credit = torch.cat(credits, dim=1) if len(credits) > 1 else credits[0]  # (N, F, L)
    weight = head.fc.weight[targets].to(credit.dtype)  # (N, F)
    out = (weight.unsqueeze(-1) * credit).sum(1).reshape(xf.shape[0], *spatial)
    return out if mask is None else torch.where(mask, out, 0.0)
