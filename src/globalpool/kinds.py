"""Registry of pooling kinds: name -> parameters, output width and torch composition.

Adding a kind means adding one entry here, its composition in ``compose.py`` and its definition in
``reference.py``; the shared tests iterate over :data:`KINDS` and pick it up by themselves.

>>> from globalpool.kinds import KIND_DEFS
>>> KIND_DEFS["catavgmax"].width, KIND_DEFS["gem"].defaults
(2, {'p': 3.0, 'eps': 1e-06})
>>> TOKEN_KINDS
('sum', 'first', 'last')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from globalpool import compose

Composition = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class KindDef:
    """One pooling kind.

    ``compose(x, mask, dims, channel_dim, params)`` returns the pooled tensor with spatial dims
    kept; ``width`` multiplies the channel count of the output.
    """

    name: str
    defaults: dict[str, Any]
    width: int
    compose: Composition
    summary: str


def _no_params(fn: Callable) -> Composition:
    return lambda x, mask, dims, channel_dim, params: fn(x, mask, dims)


KIND_DEFS: dict[str, KindDef] = {
    d.name: d
    for d in (
        KindDef("avg", {}, 1, _no_params(compose.avg), "mean over positions"),
        KindDef("max", {}, 1, _no_params(compose.max_), "max over positions"),
        KindDef("avgmax", {}, 1, _no_params(compose.avgmax), "(avg + max) / 2"),
        KindDef(
            "catavgmax",
            {},
            2,
            lambda x, mask, dims, channel_dim, params: compose.catavgmax(
                x, mask, dims, channel_dim
            ),
            "concat([avg, max]) along channels",
        ),
        KindDef(
            "gem",
            {"p": 3.0, "eps": 1e-6},
            1,
            lambda x, mask, dims, channel_dim, params: compose.gem(
                x,
                mask,
                dims,
                compose.along_channels(params["p"], x.ndim, channel_dim),
                params["eps"],
            ),
            "generalised mean (mean clamp(x, eps)^p)^(1/p)",
        ),
        KindDef(
            "lse",
            {"r": 1.0},
            1,
            lambda x, mask, dims, channel_dim, params: compose.lse(
                x, mask, dims, compose.along_channels(params["r"], x.ndim, channel_dim)
            ),
            "log-sum-exp (1/r) log mean exp(r x)",
        ),
        KindDef(
            "attention",
            {"weights": None},
            1,
            lambda x, mask, dims, channel_dim, params: compose.attention(
                x, mask, dims, params["weights"].unsqueeze(channel_dim)
            ),
            "weighted mean sum(w x) / sum(w)",
        ),
        KindDef("sum", {}, 1, _no_params(compose.sum_), "sum over positions"),
        KindDef(
            "first",
            {},
            1,
            _no_params(compose.first),
            "the value at the first real position (row-major order)",
        ),
        KindDef(
            "last",
            {},
            1,
            _no_params(compose.last),
            "the value at the last real position (row-major order)",
        ),
    )
}

KINDS: tuple[str, ...] = tuple(KIND_DEFS)

#: Kinds made for token sequences (a CLS / last token, a sum): not among the CNN heads of
#: ``globalpool compare``, but pooling like every other kind.
TOKEN_KINDS: tuple[str, ...] = ("sum", "first", "last")

#: Kinds that read one position per (sample, channel): every backend runs the same gather.
GATHER_KINDS: frozenset[str] = frozenset({"first", "last"})

#: Kinds with a fused CPU kernel (all but the gathers).
FUSED_KINDS: tuple[str, ...] = tuple(k for k in KINDS if k not in GATHER_KINDS)
