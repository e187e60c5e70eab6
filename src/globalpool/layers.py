"""``nn.Module`` wrappers: thin holders of parameters that call :func:`globalpool.pool`."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from globalpool.contract import check_kind, check_layout, layout_dims
from globalpool.functional import adaptive_pool, output_width, pool
from globalpool.kinds import KINDS


class GlobalPool(nn.Module):
    """Global pooling of one kind with fixed parameters.

    >>> import torch, globalpool as gp
    >>> layer = gp.GlobalPool("catavgmax")
    >>> layer(torch.randn(2, 8, 5, 5)).shape, layer.output_width(8)
    (torch.Size([2, 16]), 16)
    """

    def __init__(
        self,
        kind: str = "avg",
        *,
        layout: str = "channels_first",
        keepdim: bool = False,
        backend: str = "auto",
        **params: Any,
    ) -> None:
        super().__init__()
        check_kind(kind)
        check_layout(layout)
        self.kind, self.layout, self.keepdim, self.backend = kind, layout, keepdim, backend
        self.params = params

    def output_width(self, channels: int) -> int:
        return output_width(self.kind, channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, **params: Any):
        return pool(
            x,
            self.kind,
            layout=self.layout,
            keepdim=self.keepdim,
            mask=mask,
            backend=self.backend,
            **{**self.params, **params},
        )

    def extra_repr(self) -> str:
        extras = "".join(f", {k}={v}" for k, v in self.params.items())
        return f"kind={self.kind!r}, layout={self.layout!r}, keepdim={self.keepdim}{extras}"


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent ``p = 1 + softplus(raw)`` (always >= 1).

    Computed in float32 for half inputs, so float16 activations up to 65504 do not overflow.

    >>> import torch, globalpool as gp
    >>> gem = gp.GeM(p=3.0)
    >>> round(float(gem.p.detach()), 4), gem(torch.rand(2, 4, 7, 7)).shape
    (3.0, torch.Size([2, 4]))
    """

    def __init__(
        self,
        p: float = 3.0,
        *,
        eps: float = 1e-6,
        learnable: bool = True,
        layout: str = "channels_first",
        keepdim: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(p, (int, float)) or isinstance(p, bool) or p < 1.0:
            raise ValueError(f"p must be a number >= 1, got {p!r}")
        if learnable and p == 1.0:
            raise ValueError("p must be > 1 for a learnable GeM (p = 1 + softplus(raw)), got 1.0")
        check_layout(layout)
        raw = torch.tensor(_softplus_inverse(p - 1.0) if p > 1.0 else -30.0)
        if learnable:
            self.raw_p = nn.Parameter(raw)
        else:
            self.register_buffer("raw_p", raw)
        self.eps, self.layout, self.keepdim, self.backend = eps, layout, keepdim, backend
        self.learnable = learnable

    @property
    def p(self) -> torch.Tensor:
        return 1.0 + F.softplus(self.raw_p)

    def output_width(self, channels: int) -> int:
        return channels

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return pool(
            x,
            "gem",
            layout=self.layout,
            keepdim=self.keepdim,
            mask=mask,
            backend=self.backend,
            p=self.p,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return (
            f"p={float(self.p.detach()):.4f}, eps={self.eps}, learnable={self.learnable}, "
            f"layout={self.layout!r}"
        )


class AttentionPool(nn.Module):
    """Attention-weighted average: a learned 1x1 scorer gives weights ``sigmoid(w . x_s + b)``.

    >>> import torch, globalpool as gp
    >>> att = gp.AttentionPool(8)
    >>> att(torch.randn(2, 8, 5, 5)).shape
    torch.Size([2, 8])
    """

    def __init__(
        self,
        channels: int,
        *,
        layout: str = "channels_first",
        keepdim: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_layout(layout)
        self.channels, self.layout, self.keepdim, self.backend = channels, layout, keepdim, backend
        self.score = nn.Linear(channels, 1)

    def output_width(self, channels: int) -> int:
        return channels

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Non-negative weights of shape ``(N, *S)``."""
        channel_dim, _ = layout_dims(x.ndim, self.layout)
        last = x if channel_dim == x.ndim - 1 else x.movedim(channel_dim, -1)
        return torch.sigmoid(self.score(last.to(self.score.weight.dtype))).squeeze(-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return pool(
            x,
            "attention",
            layout=self.layout,
            keepdim=self.keepdim,
            mask=mask,
            backend=self.backend,
            weights=self.weights(x),
        )

    def extra_repr(self) -> str:
        return f"channels={self.channels}, layout={self.layout!r}"


class AdaptivePool(nn.Module):
    """Adaptive ``avg``/``max`` pooling to a fixed output size, PyTorch's exact bins.

    >>> import torch, globalpool as gp
    >>> gp.AdaptivePool((2, 3), "max")(torch.randn(1, 4, 7, 7)).shape
    torch.Size([1, 4, 2, 3])
    """

    def __init__(
        self,
        output_size: int | tuple[int, ...],
        kind: str = "avg",
        *,
        layout: str = "channels_first",
    ) -> None:
        super().__init__()
        check_kind(kind, ("avg", "max"))
        check_layout(layout)
        self.output_size, self.kind, self.layout = output_size, kind, layout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            raise ValueError("mask is not supported by AdaptivePool; got a mask, expected None")
        return adaptive_pool(x, self.output_size, self.kind, layout=self.layout)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, kind={self.kind!r}, layout={self.layout!r}"


def make_pool(
    kind: str, channels: int, *, layout: str = "channels_first", **params: Any
) -> nn.Module:
    """The pooling module for ``kind``: learnable GeM, learned attention, else :class:`GlobalPool`.

    >>> make_pool("gem", 16)
    GeM(p=3.0000, eps=1e-06, learnable=True, layout='channels_first')
    """
    check_kind(kind, KINDS)
    if kind == "gem":
        return GeM(layout=layout, **params)
    if kind == "attention":
        return AttentionPool(channels, layout=layout, **params)
    return GlobalPool(kind, layout=layout, **params)
