"""Multi-head attention pooling with learned latent queries (MAP, as SigLIP's and timm's
``AttentionPoolLatent``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from globalpool.attention.query import (
    as_tokens,
    attend,
    check_bool,
    check_non_negative,
    check_num_heads,
    merge_heads,
    param_dtype,
    pool_input,
    split_heads,
    zero_empty,
)
from globalpool.contract import check_layout
from globalpool.layers import check_channels

#: How the latents are reduced: the first one, their mean, or none (all kept).
LATENT_POOLS: tuple[str, ...] = ("token", "avg", "")

#: The MLP's activation: exact GELU, or its tanh approximation (SigLIP's).
LATENT_ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_tanh")


class _Mlp(nn.Module):
    """``fc2(act(fc1(x)))``, named as timm's ``Mlp`` (``fc1``, ``fc2``)."""

    def __init__(self, channels: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.approximate = "tanh" if act == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


def _check_latent_pool(pool: Any) -> str:
    pool = "" if pool is None else pool
    if pool not in LATENT_POOLS:
        raise ValueError(
            f"pool must be one of {LATENT_POOLS} or None ('token': the first latent, 'avg': their "
            f"mean, '' or None: every latent, (N, latent_len, C)), got {pool!r}"
        )
    return pool


class LatentAttentionPool(nn.Module):
    """Attention pooling with ``latent_len`` learned queries attending over every position.

    ``latent`` ``(1, latent_len, C)`` goes through ``q``; the positions through ``kv`` (keys
    and values); each of ``num_heads`` heads computes ``softmax(q kᵀ / √d) v`` (after
    ``q_norm`` / ``k_norm``, LayerNorms of ``d = C / num_heads`` when ``qk_norm``), then
    ``proj``, then the residual ``y + mlp(norm(y))`` (``mlp``: ``fc1`` to ``mlp_ratio * C``,
    GELU, ``fc2``), then the latents are reduced (``pool``).

    The module is timm's ``AttentionPoolLatent`` (the ``global_pool="map"`` head of its
    ViTs) with the same parameter names and shapes, so its ``state_dict`` loads as it is:

    ======================  ======================================  ==========================
    timm                    here                                    shape
    ======================  ======================================  ==========================
    ``latent``              ``latent``                              ``(1, latent_len, C)``
    ``q.weight/.bias``      ``q.weight/.bias``                      ``(C, C)`` / ``(C,)``
    ``kv.weight/.bias``     ``kv.weight/.bias`` (keys, then values) ``(2C, C)`` / ``(2C,)``
    ``q_norm``, ``k_norm``  same (``qk_norm=True``; else Identity)  ``(C / num_heads,)``
    ``proj.weight/.bias``   ``proj.weight/.bias``                   ``(C, C)`` / ``(C,)``
    ``norm``                ``norm`` (``mlp_norm``; else Identity)  ``(C,)``
    ``mlp.fc1``/``.fc2``    ``mlp.fc1``/``.fc2``                    ``(hidden, C)``/``(C, hidden)``
    ======================  ======================================  ==========================

    timm's arguments map as: ``in_features`` = ``channels`` (its ``embed_dim`` and
    ``out_features`` default to that, the only case supported here), ``num_heads``,
    ``mlp_ratio``, ``qkv_bias``, ``qk_norm``, ``latent_len``, ``pool_type`` = ``pool``,
    ``norm_layer=LayerNorm(eps=1e-6)`` = ``mlp_norm=True`` (the ViT head; timm's standalone
    default ``norm_layer=None`` is ``mlp_norm=False``), ``act_layer`` = ``mlp_act``
    (``"gelu_tanh"`` for SigLIP). Not supported: ``pos_embed="abs"``, ``latent_dim`` or
    ``embed_dim`` other than ``in_features``, dropout. Also ``mlp_ratio=0`` drops the MLP
    residual (and ``norm``). In a head (``ClassifierHead(C, K, pool="map")``) the reduction is
    given as ``latent_pool``.

    Args:
        channels: ``C``, the input (and output) width; divisible by ``num_heads``.
        num_heads: attention heads.
        latent_len: learned queries (>= 1).
        mlp_ratio: MLP hidden width over ``C`` (0: no MLP residual).
        qkv_bias: biases in ``q`` and ``kv``.
        qk_norm: LayerNorm of each head's queries and keys.
        mlp_norm: LayerNorm (eps 1e-6, the module ``norm``) before the MLP.
        mlp_act: the MLP's activation, ``"gelu"`` or ``"gelu_tanh"``.
        pool: ``"token"`` (first latent), ``"avg"`` (mean of the latents), ``""`` or None (all).
        layout: ``"channels_first"`` or ``"channels_last"``.

    Shape:
        - x: ``(N, C, *S)`` (``(N, *S, C)`` channels-last), 1 to 3 spatial dims.
        - mask: ``(N, *S)`` bool, True at real positions, or None.
        - cu_seqlens: ``(N + 1,)`` offsets with ``x`` packed rows ``(T, C)``: N token
          sequences of any lengths (as :func:`globalpool.pool_packed` takes them; channels last
          whatever ``layout``). ``x`` may also be a jagged nested tensor ``(N, j, C)``. Either
          gives what padding the sequences and masking the padding gives; an empty sequence
          pools to 0.
        - output: ``(N, C)``; ``(N, latent_len, C)`` when ``pool`` is ``""``/None.

    Returns:
        The pooled features in ``x``'s dtype (half inputs compute in the module's dtype, the
        softmax in float32). Padded positions get zero attention; a sample with no real position
        pools to 0.

    >>> import torch, globalpool as gp
    >>> map_pool = gp.LatentAttentionPool(64, num_heads=4)
    >>> map_pool(torch.randn(2, 64, 7, 7)).shape
    torch.Size([2, 64])
    >>> tokens, mask = torch.randn(2, 10, 64), torch.arange(10) < torch.tensor([[10], [4]])
    >>> gp.LatentAttentionPool(64, num_heads=4, latent_len=3, pool=None,
    ...                        layout="channels_last")(tokens, mask).shape
    torch.Size([2, 3, 64])
    >>> rows, cu = torch.randn(7, 64), torch.tensor([0, 5, 5, 7])  # lengths 5, 0 and 2
    >>> map_pool(rows, cu_seqlens=cu).shape
    torch.Size([3, 64])
    """

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int = 8,
        latent_len: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        mlp_norm: bool = True,
        mlp_act: str = "gelu",
        pool: str | None = "token",
        layout: str = "channels_first",
    ) -> None:
        super().__init__()
        check_channels(channels)
        check_num_heads(num_heads, channels)
        if not isinstance(latent_len, int) or isinstance(latent_len, bool) or latent_len < 1:
            raise ValueError(
                f"latent_len must be an int >= 1 (learned queries), got {latent_len!r}"
            )
        mlp_ratio = check_non_negative(mlp_ratio, "mlp_ratio")
        for name, value in (
            ("qkv_bias", qkv_bias), ("qk_norm", qk_norm), ("mlp_norm", mlp_norm)
        ):
            check_bool(value, name)
        if mlp_act not in LATENT_ACTIVATIONS:
            raise ValueError(f"mlp_act must be one of {LATENT_ACTIVATIONS}, got {mlp_act!r}")
        self.pool = _check_latent_pool(pool)
        check_layout(layout)
        self.channels, self.num_heads, self.latent_len = channels, num_heads, latent_len
        self.layout, self.mlp_ratio = layout, mlp_ratio
        head_dim = channels // num_heads
        self.latent = nn.Parameter(torch.empty(1, latent_len, channels))
        nn.init.trunc_normal_(self.latent, std=channels**-0.5, a=-2 * channels**-0.5,
                              b=2 * channels**-0.5)
        self.q = nn.Linear(channels, channels, bias=qkv_bias)
        self.kv = nn.Linear(channels, 2 * channels, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(channels, channels)
        hidden = int(channels * mlp_ratio)
        self.norm = nn.LayerNorm(channels, eps=1e-6) if mlp_norm and hidden else nn.Identity()
        self.mlp = _Mlp(channels, hidden, mlp_act) if hidden else None

    def output_width(self, channels: int) -> int:
        """Features per latent: ``channels`` (a head's pooled width)."""
        return channels

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, mask, layout, _ = pool_input(x, mask, cu_seqlens, self.layout, self.channels,
                                        "LatentAttentionPool")
        tokens = as_tokens(x.to(param_dtype(self)), mask, layout)
        n = tokens.values.shape[0]
        q = split_heads(self.q(self.latent).expand(n, -1, -1), self.num_heads)
        k, v = self.kv(tokens.values).chunk(2, dim=-1)
        k, v = split_heads(k, self.num_heads), split_heads(v, self.num_heads)
        y = attend(self.q_norm(q), self.k_norm(k), v, tokens.key_mask)
        y = self.proj(merge_heads(y))
        if self.mlp is not None:
            y = y + self.mlp(self.norm(y))
        if self.pool == "token":
            y = y[:, 0]
        elif self.pool == "avg":
            y = y.mean(1)
        return zero_empty(y, tokens.has_real).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_heads={self.num_heads}, "
            f"latent_len={self.latent_len}, pool={self.pool!r}, layout={self.layout!r}"
        )
