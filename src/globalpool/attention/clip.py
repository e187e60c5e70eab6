"""CLIP's attention pooling: the mean position, with a learned positional embedding, as the query
over every position (``AttentionPool2d`` of CLIP's ModifiedResNet, Radford et al. 2021)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from globalpool.attention.query import (
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
from globalpool.contract import check_layout, spatial_shape
from globalpool.dispatch import deploying
from globalpool.layers import check_channels

#: How a positional table is resized, per spatial rank.
_RESIZE_MODES = {1: "linear", 2: "bicubic", 3: "trilinear"}


def _check_table_size(spatial_size: Any) -> tuple[int, ...]:
    expected = "a tuple of 1 to 3 positive ints, one per spatial dim, such as (7, 7)"
    if not isinstance(spatial_size, (tuple, list)) or not 1 <= len(spatial_size) <= 3:
        raise ValueError(f"spatial_size must be {expected}, got {spatial_size!r}")
    if not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0
        for s in spatial_size
    ):
        raise ValueError(f"spatial_size must be {expected}, got {spatial_size!r}")
    return tuple(int(s) for s in spatial_size)


def resize_positions(
    table: torch.Tensor, size: tuple[int, ...], to: tuple[int, ...]
) -> torch.Tensor:
    """A positional table ``(1 + prod(size), C)`` (the mean's row first) resized to ``to``:
    the grid rows interpolated (linear in 1-d, bicubic in 2-d, trilinear in 3-d,
    ``align_corners=False``), the mean's row kept.

    >>> resize_positions(torch.randn(1 + 7 * 7, 8), (7, 7), (5, 9)).shape
    torch.Size([46, 8])
    """
    channels = table.shape[-1]
    grid = table[1:].reshape(1, *size, channels).movedim(-1, 1)
    work = torch.promote_types(grid.dtype, torch.float32)
    grid = F.interpolate(grid.to(work), size=to, mode=_RESIZE_MODES[len(size)],
                         align_corners=False)
    return torch.cat([table[:1], grid.movedim(1, -1).reshape(-1, channels).to(table.dtype)])


class CLIPAttentionPool(nn.Module):
    """Multi-head attention pooling whose query is the mean position plus a learned positional
    embedding, attending over the mean and every position (each with its embedding).

    Positions ``x_1..x_L`` (``L = prod(S)``) are prefixed by their mean ``x_0``; row ``i`` of
    ``positional_embedding`` (``(1 + L, C)``) is added to each; the query is ``q_proj`` of the
    first, keys and values ``k_proj`` / ``v_proj`` of all; ``num_heads`` heads attend
    (``softmax(q kᵀ / √d) v``) and ``c_proj`` maps the result to ``output_dim``. The names and
    shapes are CLIP's (``positional_embedding``, ``q_proj``, ``k_proj``, ``v_proj``,
    ``c_proj``), so its ``attnpool`` state dict loads as it is (CLIP's ``spacial_dim`` = 7 is
    ``spatial_size=(7, 7)``). With a mask the mean is over the real positions, padded
    positions get zero attention, and a sample with none pools to 0.

    The table is learned at ``spatial_size``; another input size is refused unless
    ``interpolate=True``, which resizes it (see :func:`resize_positions`) at every call.

    Token sequences (``cu_seqlens=`` or a nested tensor) need a 1-d table
    (``spatial_size=(L,)``): token ``i`` of each sequence takes row ``1 + i``, as if the
    sequence were padded at the end to ``L`` positions and masked, so no sequence may be longer
    than ``L``. A 2-d or 3-d table is refused for them (sequences carry no grid).

    Args:
        channels: ``C``; divisible by ``num_heads``.
        spatial_size: the size the positional table is learned at, 1 to 3 ints.
        num_heads: attention heads.
        output_dim: width of ``c_proj`` (default ``C``).
        interpolate: accept other spatial sizes by resizing the table.
        layout: ``"channels_first"`` or ``"channels_last"``.

    Shape:
        - x: ``(N, C, *S)`` (``(N, *S, C)`` channels-last), ``S == spatial_size`` unless
          ``interpolate``.
        - mask: ``(N, *S)`` bool, True at real positions, or None.
        - cu_seqlens: ``(N + 1,)`` offsets with ``x`` packed rows ``(T, C)``: N token
          sequences of any lengths (as :func:`globalpool.pool_packed` takes them; channels last
          whatever ``layout``). ``x`` may also be a jagged nested tensor ``(N, j, C)``. Either
          gives what padding the sequences and masking the padding gives; an empty sequence
          pools to 0.
        - output: ``(N, output_dim)``.

    Returns:
        The pooled features in ``x``'s dtype (softmax in float32 for half inputs).

    >>> import torch, globalpool as gp
    >>> clip = gp.CLIPAttentionPool(64, (7, 7), num_heads=4, output_dim=32)
    >>> clip(torch.randn(2, 64, 7, 7)).shape
    torch.Size([2, 32])
    >>> gp.CLIPAttentionPool(64, (7, 7), num_heads=4, interpolate=True)(
    ...     torch.randn(2, 64, 9, 5)).shape
    torch.Size([2, 64])
    >>> rows, cu = torch.randn(9, 64), torch.tensor([0, 4, 9])  # sequences of 4 and 5 tokens
    >>> gp.CLIPAttentionPool(64, (16,), num_heads=4)(rows, cu_seqlens=cu).shape
    torch.Size([2, 64])
    """

    def __init__(
        self,
        channels: int,
        spatial_size: tuple[int, ...],
        *,
        num_heads: int = 8,
        output_dim: int | None = None,
        interpolate: bool = False,
        layout: str = "channels_first",
    ) -> None:
        super().__init__()
        check_channels(channels)
        self.spatial_size = _check_table_size(spatial_size)
        check_num_heads(num_heads, channels)
        if output_dim is not None:
            check_channels(output_dim, "output_dim")
        check_bool(interpolate, "interpolate")
        check_layout(layout)
        self.channels, self.num_heads, self.layout = channels, num_heads, layout
        self.output_dim, self.interpolate = output_dim or channels, interpolate
        rows = 1 + math.prod(self.spatial_size)
        self.positional_embedding = nn.Parameter(torch.randn(rows, channels) / channels**0.5)
        self.k_proj = nn.Linear(channels, channels)
        self.q_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.c_proj = nn.Linear(channels, self.output_dim)

    def output_width(self, channels: int) -> int:
        """``output_dim`` (``channels`` unless set)."""
        return self.output_dim

    def positions(self, size: tuple[int, ...]) -> torch.Tensor:
        """The positional table for spatial size ``size``, ``(1 + prod(size), C)``.

        An exporter or tracer records the resizing for every size when ``interpolate`` (resizing
        to the table's own size gives it back exactly), so the sizes stay dynamic.
        """
        same_rank = len(size) == len(self.spatial_size)
        if same_rank and not (self.interpolate and deploying()) and size == self.spatial_size:
            return self.positional_embedding
        if not self.interpolate or not same_rank:
            how = (
                "pass interpolate=True to resize the table"
                if len(size) == len(self.spatial_size)
                else "a table of another rank cannot be resized"
            )
            raise ValueError(
                f"CLIPAttentionPool(spatial_size={self.spatial_size}) got input of spatial size "
                f"{size}; its positional table is learned at {self.spatial_size}: {how}"
            )
        return resize_positions(self.positional_embedding, self.spatial_size, size)

    def _check_sequence_table(self) -> None:
        if len(self.spatial_size) != 1:
            raise ValueError(
                f"CLIPAttentionPool(spatial_size={self.spatial_size}) got packed sequences "
                "(cu_seqlens= or a nested tensor); its positional table is laid out over a "
                f"{len(self.spatial_size)}-d grid, which token sequences do not carry: build it "
                "with a 1-d spatial_size such as (196,) for sequences, or pad the maps to the "
                "grid and pass a mask"
            )

    def _on_table(
        self, tokens: torch.Tensor, real: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded sequences ``(N, Lmax, C)`` and their mask padded on to the table's length:
        token ``i`` of each sequence takes position ``i``, whatever the other sequences."""
        length, longest = self.spatial_size[0], tokens.shape[1]
        if longest > length:
            raise ValueError(
                f"CLIPAttentionPool(spatial_size={self.spatial_size}) got a sequence of "
                f"{longest} tokens; token i of a packed sequence takes position i of the "
                f"table's {length}, so no sequence may be longer (interpolate resizes the table "
                "for feature maps only)"
            )
        more = length - longest
        tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], more, tokens.shape[2])], 1)
        return tokens, torch.cat([real, real.new_zeros(real.shape[0], more)], 1)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if cu_seqlens is not None or (isinstance(x, torch.Tensor) and x.is_nested):
            self._check_sequence_table()
        x, mask, layout, packed = pool_input(x, mask, cu_seqlens, self.layout, self.channels,
                                             "CLIPAttentionPool")
        if packed:
            x, mask = self._on_table(x, mask)
        table = self.positions(spatial_shape(x, layout))
        tokens = as_tokens(x.to(param_dtype(self)), mask, layout)
        seq = torch.cat([masked_mean(tokens).unsqueeze(1), tokens.values], 1) + table
        key_mask = tokens.key_mask
        if key_mask is not None:
            key_mask = torch.cat([torch.ones_like(key_mask[:, :1]), key_mask], 1)
        q = split_heads(self.q_proj(seq[:, :1]), self.num_heads)
        k = split_heads(self.k_proj(seq), self.num_heads)
        v = split_heads(self.v_proj(seq), self.num_heads)
        y = self.c_proj(merge_heads(attend(q, k, v, key_mask))[:, 0])
        return zero_empty(y, tokens.has_real).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, spatial_size={self.spatial_size}, "
            f"num_heads={self.num_heads}, output_dim={self.output_dim}, "
            f"interpolate={self.interpolate}, layout={self.layout!r}"
        )
