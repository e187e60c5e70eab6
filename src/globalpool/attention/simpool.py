"""SimPool: attention pooling whose query is the global average (Psomas et al., "Keep It SimPool:
Who Said Supervised Transformers Suffer from Attention Deficit?", ICCV 2023)."""

from __future__ import annotations

import math

import torch
from torch import nn

from globalpool.attention.query import (
    Tokens,
    as_tokens,
    attend,
    check_bool,
    check_num_heads,
    masked_mean,
    merge_heads,
    param_dtype,
    pool_input,
    split_heads,
    zero_empty,
)
from globalpool.contract import check_layout
from globalpool.layers import check_channels


def _check_gamma(gamma: object) -> float | None:
    if gamma is None:
        return None
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not 0 < gamma < math.inf:
        raise ValueError(f"gamma must be None or a finite real number > 0, got {gamma!r}")
    return float(gamma)


class SimPool(nn.Module):
    """Attention pooling with the global average as its one query.

    The query is ``wq(mean x)`` over the real positions; keys are ``wk(LN(x))`` and values
    ``LN(x)`` (``norm_patches``, a LayerNorm with eps 1e-6); one head (or ``num_heads``) gives
    weights ``a = softmax(q kᵀ / √d)`` over the positions. Without ``gamma`` the output is
    ``Σ a v``; with ``gamma`` it is the power mean ``(Σ a (v - m + eps)^gamma)^(1/gamma)``,
    ``m`` the sample's smallest value over its real positions and channels, ``eps`` 1e-6
    (the paper's ``gamma``; the reference code takes ``m`` over the whole batch, which makes one
    sample's output depend on the others: here it is per sample). Parameter names are the
    reference code's (``norm_patches``, ``wq``, ``wk``), so its state dicts load.

    Args:
        channels: ``C``; divisible by ``num_heads``.
        num_heads: attention heads (the paper uses 1).
        qkv_bias: biases in ``wq`` and ``wk``.
        gamma: None (a weighted mean) or the power > 0 (larger: closer to max pooling).
        layout: ``"channels_first"`` or ``"channels_last"``.

    Shape:
        - x: ``(N, C, *S)`` (``(N, *S, C)`` channels-last), 1 to 3 spatial dims.
        - mask: ``(N, *S)`` bool, True at real positions, or None.
        - cu_seqlens: ``(N + 1,)`` offsets with ``x`` packed rows ``(T, C)``: N token
          sequences of any lengths (as :func:`globalpool.pool_packed` takes them; channels last
          whatever ``layout``). ``x`` may also be a jagged nested tensor ``(N, j, C)``. Either
          gives what padding the sequences and masking the padding gives; an empty sequence
          pools to 0.
        - output: ``(N, C)``.

    Returns:
        The pooled features in ``x``'s dtype; padded positions get zero attention, a sample with
        no real position pools to 0.

    >>> import torch, globalpool as gp
    >>> gp.SimPool(32)(torch.randn(2, 32, 7, 7)).shape
    torch.Size([2, 32])
    >>> gp.SimPool(32, gamma=2.0, layout="channels_last")(torch.randn(2, 9, 32)).shape
    torch.Size([2, 32])
    >>> nt = torch.nested.nested_tensor([torch.randn(3, 32), torch.randn(8, 32)],
    ...                                 layout=torch.jagged)
    >>> gp.SimPool(32)(nt).shape
    torch.Size([2, 32])
    """

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int = 1,
        qkv_bias: bool = False,
        gamma: float | None = None,
        layout: str = "channels_first",
    ) -> None:
        super().__init__()
        check_channels(channels)
        check_num_heads(num_heads, channels)
        check_bool(qkv_bias, "qkv_bias")
        self.gamma = _check_gamma(gamma)
        check_layout(layout)
        self.channels, self.num_heads, self.layout = channels, num_heads, layout
        self.eps = 1e-6
        self.norm_patches = nn.LayerNorm(channels, eps=1e-6)
        self.wq = nn.Linear(channels, channels, bias=qkv_bias)
        self.wk = nn.Linear(channels, channels, bias=qkv_bias)

    def output_width(self, channels: int) -> int:
        """``channels``: one pooled vector of the input's width."""
        return channels

    def _values(self, tokens: Tokens, v: torch.Tensor) -> torch.Tensor:
        """``(v - m + eps)^gamma`` with ``m`` the sample's minimum over the attendable
        positions; other positions hold ``eps^gamma`` (finite, and never attended to)."""
        if tokens.key_mask is not None:
            keep = tokens.key_mask.unsqueeze(-1)
            low = torch.where(keep, v, torch.inf).amin(dim=(1, 2), keepdim=True)
            v = torch.where(keep, v, low)
        else:
            low = v.amin(dim=(1, 2), keepdim=True)
        return (v - low + self.eps).pow(self.gamma)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, mask, layout, _ = pool_input(x, mask, cu_seqlens, self.layout, self.channels,
                                        "SimPool")
        tokens = as_tokens(x.to(param_dtype(self)), mask, layout)
        q = split_heads(self.wq(masked_mean(tokens)).unsqueeze(1), self.num_heads)
        v = self.norm_patches(tokens.values)
        k = split_heads(self.wk(v), self.num_heads)
        if self.gamma is not None:
            work = torch.promote_types(v.dtype, torch.float32)
            v = self._values(tokens, v.to(work))
            y = attend(q.to(work), k, split_heads(v, self.num_heads), tokens.key_mask)
            y = y.pow(1.0 / self.gamma)
        else:
            y = attend(q, k, split_heads(v, self.num_heads), tokens.key_mask)
        return zero_empty(merge_heads(y)[:, 0], tokens.has_real).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_heads={self.num_heads}, gamma={self.gamma}, "
            f"layout={self.layout!r}"
        )
