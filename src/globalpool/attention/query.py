"""The parts every query-based attention pool shares: feature maps as tokens under the mask
contract, multi-head splitting, and masked attention with a float32 (or wider) softmax.

The contract (as :func:`globalpool.pool`): ``x`` is ``(N, C, *S)`` or ``(N, *S, C)`` with 1 to
3 spatial dims; ``mask`` ``(N, *S)`` bool is True at real positions. Padded positions are
replaced by 0 *before* any projection (a select, so NaN or inf there never reach a value or a
gradient) and get zero attention (an additive ``-inf``). A sample with no real position attends
over its zeroed positions instead (so no softmax row is empty, and nothing is NaN) and its
output is then replaced by exactly 0, which also gives it zero gradient.

>>> import torch
>>> tokens = as_tokens(torch.randn(2, 4, 3, 5), None, "channels_first")
>>> tokens.values.shape, tokens.key_mask, tokens.has_real
(torch.Size([2, 15, 4]), None, None)
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from globalpool.contract import check_input, check_mask, layout_dims
from globalpool.layers import check_channel_count
from globalpool.packed import check_cu_seqlens, check_packed_input, nested_as_packed, padded


class Tokens(NamedTuple):
    """A feature map as a token sequence.

    Attributes:
        values: ``(N, L, C)`` with ``L = prod(S)``; 0 at padded positions.
        key_mask: ``(N, L)`` bool, True where a position may be attended to (the real positions;
            every position of a sample with none); None without a mask.
        has_real: ``(N,)`` bool, whether a sample has a real position; None without a mask.
    """

    values: torch.Tensor
    key_mask: torch.Tensor | None
    has_real: torch.Tensor | None


def check_pool_input(
    x: Any, mask: Any, layout: str, channels: int, owner: str, arg: str = "channels"
) -> None:
    """``x`` a floating ``(N, C, *S)`` / ``(N, *S, C)`` tensor with ``channels`` channels, ``mask``
    None or bool ``(N, *S)`` on x's device; the errors name the argument and what was expected."""
    check_input(x)
    check_channel_count(x, layout, channels, owner, arg)
    check_mask(mask, x, layout)


class PoolInput(NamedTuple):
    """An attention pool's input in the dense form the pools compute on.

    Attributes:
        x: ``(N, C, *S)`` / ``(N, *S, C)`` as given, or packed sequences padded to
            ``(N, Lmax, C)`` (``Lmax`` at least 1).
        mask: as given, or ``(N, Lmax)`` True at each sequence's own tokens.
        layout: the layout of ``x``: the pool's own, ``"channels_last"`` for sequences.
        packed: whether ``x`` came as packed rows or a nested tensor.
    """

    x: torch.Tensor
    mask: torch.Tensor | None
    layout: str
    packed: bool


def pool_input(
    x: Any, mask: Any, cu_seqlens: Any, layout: str, channels: int, owner: str
) -> PoolInput:
    """Check a pool's input and give it in dense form: a feature map as it is (with its mask),
    packed rows ``(T, C)`` with ``cu_seqlens`` (as :func:`globalpool.pool_packed` takes them) or
    a jagged nested tensor ``(N, j, C)`` padded into ``(N, Lmax, C)`` tokens with their mask (an
    empty sequence is all padding, so it pools to 0).

    >>> rows, cu = torch.randn(5, 4), torch.tensor([0, 2, 2, 5])
    >>> got = pool_input(rows, None, cu, "channels_first", 4, "Pool")
    >>> got.x.shape, got.mask.sum(1).tolist(), got.layout
    (torch.Size([3, 3, 4]), [2, 0, 3], 'channels_last')
    """
    if isinstance(x, torch.Tensor) and x.is_nested:
        if cu_seqlens is not None:
            raise ValueError(
                "cu_seqlens must be None for a nested tensor: its offsets and lengths say where "
                "each sequence lies"
            )
        if mask is not None:
            raise ValueError(
                "mask must be None for a nested tensor: each sequence's length says which "
                "tokens are real (leave padded tokens out of it)"
            )
        x, cu_seqlens = nested_as_packed(x)
    elif cu_seqlens is None:
        check_pool_input(x, mask, layout, channels, owner)
        return PoolInput(x, mask, layout, False)
    elif mask is not None:
        raise ValueError(
            "mask must be None with cu_seqlens: each sequence's rows are its real tokens"
        )
    check_packed_input(x)
    check_cu_seqlens(cu_seqlens, x)
    if x.shape[1] != channels:
        raise ValueError(
            f"{owner}(channels={channels}) got packed rows (T, C) with C = {x.shape[1]}"
        )
    tokens, real, _ = padded(x, cu_seqlens)
    return PoolInput(tokens, real, "channels_last", True)


def check_num_heads(num_heads: Any, channels: int, arg: str = "channels") -> None:
    """``num_heads`` a positive int that divides ``channels`` (each head gets ``C // num_heads``).

    >>> check_num_heads(3, 16)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: channels=16 must be divisible by num_heads=3 (each head attends over C // ...
    """
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if channels % num_heads:
        raise ValueError(
            f"{arg}={channels} must be divisible by num_heads={num_heads} (each head attends "
            "over C // num_heads channels)"
        )


def check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")


def check_non_negative(value: Any, name: str) -> float:
    """A finite real number >= 0 (a ratio, a power); bools and NaN are refused."""
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not value >= 0
        or value == float("inf")
    ):
        raise ValueError(f"{name} must be a finite real number >= 0, got {value!r}")
    return float(value)


def as_tokens(x: torch.Tensor, mask: torch.Tensor | None, layout: str) -> Tokens:
    """``x`` as ``(N, L, C)`` tokens, padding replaced by 0 (see the module docstring)."""
    channel_dim, _ = layout_dims(x.ndim, layout)
    last = x if channel_dim == x.ndim - 1 else x.movedim(channel_dim, -1)
    values = last.flatten(1, -2)
    if mask is None:
        return Tokens(values, None, None)
    real = mask.flatten(1)
    values = torch.where(real.unsqueeze(-1), values, 0.0)  # select, not multiply: 0 * NaN is NaN
    has_real = real.any(1)
    return Tokens(values, real | ~has_real.unsqueeze(1), has_real)


def masked_mean(tokens: Tokens) -> torch.Tensor:
    """Mean over the attendable positions, ``(N, C)`` (over every one of a sample with none)."""
    if tokens.key_mask is None:
        return tokens.values.mean(1)
    weight = tokens.key_mask.to(tokens.values.dtype).unsqueeze(-1)
    return (tokens.values * weight).sum(1) / weight.sum(1)


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(N, L, C)`` to ``(N, num_heads, L, C // num_heads)``."""
    n, length, c = t.shape
    return t.reshape(n, length, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """``(N, H, L, D)`` to ``(N, L, H * D)``."""
    return t.transpose(1, 2).flatten(2)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """``softmax(q kᵀ / √D) v`` per head through ``F.scaled_dot_product_attention``, computed in
    float32 for half inputs (float64 stays float64) and returned in ``q``'s dtype.

    Args:
        q: queries ``(N, H, Lq, D)``.
        k: keys ``(N, H, L, D)``.
        v: values ``(N, H, L, Dv)``.
        key_mask: ``(N, L)`` bool, True where a key may be attended to, or None; every row must
            hold a True (:func:`as_tokens` makes it so).

    Returns:
        ``(N, H, Lq, Dv)``.
    """
    out_dtype = q.dtype
    work = torch.promote_types(q.dtype, torch.float32)
    bias = None
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, dtype=work, device=q.device)
        bias = bias.masked_fill(~key_mask, float("-inf"))[:, None, None, :]
    out = F.scaled_dot_product_attention(q.to(work), k.to(work), v.to(work), attn_mask=bias)
    if _RECORDERS:  # only inside recording_attention(): a monitor or an attention map
        probs = _probabilities(q.to(work), k.to(work), bias)
        for recorder in _RECORDERS:
            recorder.append(probs)
    return out.to(out_dtype)


#: The lists :func:`attend` hands its attention probabilities to: one per open
#: :func:`recording_attention` (or :func:`start_recording`); empty otherwise.
_RECORDERS: list[list[torch.Tensor]] = []


def _probabilities(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``softmax(q kᵀ / √D + bias)``, the weights ``attend``'s attention gave each key,
    detached ``(N, H, Lq, L)``; exactly 0 at the keys it may not attend to."""
    with torch.no_grad():
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if bias is not None:
            scores = scores + bias
        return torch.softmax(scores, -1)


def start_recording() -> list[torch.Tensor]:
    """Open a recording: until :func:`stop_recording`, every :func:`attend` call appends its
    attention probabilities ``(N, H, Lq, L)`` (detached, in the softmax's dtype) to the list
    returned. The forward's result and gradient are unchanged."""
    recorder: list[torch.Tensor] = []
    _RECORDERS.append(recorder)
    return recorder


def stop_recording(recorder: list[torch.Tensor]) -> list[torch.Tensor]:
    """Close the recording ``recorder`` (a list from :func:`start_recording`; closing one twice
    is harmless) and return it."""
    for i in range(len(_RECORDERS) - 1, -1, -1):
        if _RECORDERS[i] is recorder:
            del _RECORDERS[i]
    return recorder


@contextlib.contextmanager
def recording_attention() -> Iterator[list[torch.Tensor]]:
    """The attention probabilities of every :func:`attend` call inside the block, in call order.

    Each is ``softmax(q kᵀ / √D)`` ``(N, H, Lq, L)`` with the very queries, keys and mask of
    that call (0 at padded keys), detached; nothing is recorded outside a block.

    >>> import torch, globalpool as gp
    >>> pool = gp.SimPool(8, num_heads=2)
    >>> with recording_attention() as probs:
    ...     _ = pool(torch.randn(3, 8, 5))
    >>> probs[0].shape, bool(torch.allclose(probs[0].sum(-1), torch.ones(3, 2, 1)))
    (torch.Size([3, 2, 1, 5]), True)
    """
    recorder = start_recording()
    try:
        yield recorder
    finally:
        stop_recording(recorder)


def zero_empty(out: torch.Tensor, has_real: torch.Tensor | None) -> torch.Tensor:
    """``out`` (``(N, ...)``) with the samples that have no real position replaced by 0."""
    if has_real is None:
        return out
    keep = has_real.reshape(-1, *([1] * (out.ndim - 1)))
    return torch.where(keep, out, 0.0)


def param_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype the pool computes in: its parameters' (float32 unless converted)."""
    return next(module.parameters()).dtype
