"""Pure-torch compositions of every pooling kind: the exportable path and the fallback.

Each function takes the input already cast to its accumulation dtype, a mask broadcastable to it
(or None), the reduced dims and the kind's parameters, and returns the pooled tensor with the
spatial dims kept (size 1). Padded positions are replaced *before* any non-linear op, so a NaN or
inf held there never reaches the output or the gradient; empty samples go through a "double
where" so that neither the value nor the gradient can become NaN.

>>> import torch
>>> x = torch.arange(8.0).reshape(1, 2, 4)
>>> avg(x, None, (2,)).flatten(1)
tensor([[1.5000, 5.5000]])
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Dims = tuple[int, ...]


def _count(mask: torch.Tensor, dims: Dims, dtype: torch.dtype) -> torch.Tensor:
    return mask.sum(dims, keepdim=True, dtype=dtype)


def _mean_of(values: torch.Tensor, mask: torch.Tensor | None, dims: Dims) -> torch.Tensor:
    """Mean over real positions of values already zeroed where padded; empty samples give 0."""
    if mask is None:
        return values.mean(dims, keepdim=True)
    return values.sum(dims, keepdim=True) / _count(mask, dims, values.dtype).clamp(min=1)


def _nonempty(mask: torch.Tensor | None, dims: Dims) -> torch.Tensor | None:
    return None if mask is None else mask.any(dim=dims, keepdim=True)


def _where_nonempty(
    nonempty: torch.Tensor | None, y: torch.Tensor, fill: float = 0.0
) -> torch.Tensor:
    return y if nonempty is None else torch.where(nonempty, y, full_rank(fill, y))


def full_rank(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """``value`` (a number or a 0-dim tensor) with ``like``'s rank while a graph is exported, as
    it is otherwise. onnxruntime's CPU provider broadcasts a value of rank 0 or 1 against a
    tensor whose last dim is 1 (a pooled ``(N, C, 1)``) one element at a time, some 30 times
    slower than the same value of full rank (docs/performance.md, "Exported graphs"); a tensor
    with more than one value is returned as it is.

    >>> full_rank(2.0, torch.zeros(3, 4, 1))
    2.0
    """
    if not torch.compiler.is_exporting():
        return value
    if isinstance(value, torch.Tensor):
        return value.reshape([1] * like.ndim) if value.numel() == 1 and value.ndim <= 1 else value
    return torch.full([1] * like.ndim, value, dtype=like.dtype, device=like.device)


def _compiled_exponent(value: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
    """``value`` (gem's ``p``, lse's ``r``) in x's dtype: a tensor as a tensor, a number as a
    0-dim tensor while ``torch.compile`` records the call (not an exporter), a number otherwise.
    With ``dynamic=True`` a number becomes a symbolic float, which inductor (torch 2.13) fails
    to lower in a training graph that divides by it (``KeyError: 'unbacked_bindings'``); a
    0-dim tensor is the same maths and lowers.

    >>> _compiled_exponent(3.0, torch.zeros(2))
    3.0
    """
    if isinstance(value, torch.Tensor):
        return value.to(x.dtype)
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return torch.full((), value, dtype=x.dtype, device=x.device)
    return value


def along_channels(
    value: float | torch.Tensor, ndim: int, channel_dim: int
) -> float | torch.Tensor:
    """A per-channel parameter (a ``(C,)`` tensor) shaped to broadcast along ``channel_dim`` of a
    rank-``ndim`` tensor; a number or a 0-dim tensor as it is.

    >>> along_channels(torch.ones(3), 4, 3).shape, along_channels(2.0, 4, 1)
    (torch.Size([1, 1, 1, 3]), 2.0)
    """
    if isinstance(value, torch.Tensor) and value.ndim == 1:
        shape = [1] * ndim
        shape[channel_dim] = value.shape[0]
        return value.reshape(shape)
    return value


def avg(x: torch.Tensor, mask: torch.Tensor | None, dims: Dims) -> torch.Tensor:
    if mask is not None:
        x = torch.where(mask, x, 0.0)
    return _mean_of(x, mask, dims)


def max_(x: torch.Tensor, mask: torch.Tensor | None, dims: Dims) -> torch.Tensor:
    if mask is None:
        return x.amax(dims, keepdim=True)
    y = torch.where(mask, x, -torch.inf).amax(dims, keepdim=True)
    # a row whose real values are all -inf ties with its padded slots (they hold -inf): its
    # gradient goes to its real positions alone, shared equally, as the ties of any other row
    ties = mask & (x == -torch.inf)
    count = ties.sum(dims, keepdim=True, dtype=x.dtype)
    count = count.clamp(min=full_rank(1.0, count))
    at_minus_inf = torch.where(ties, x, 0.0).sum(dims, keepdim=True) / count
    y = torch.where(y == full_rank(-torch.inf, y), at_minus_inf, y)
    return _where_nonempty(_nonempty(mask, dims), y)


def avgmax(x: torch.Tensor, mask: torch.Tensor | None, dims: Dims) -> torch.Tensor:
    both = avg(x, mask, dims) + max_(x, mask, dims)
    return both / full_rank(2.0, both)


def catavgmax(
    x: torch.Tensor, mask: torch.Tensor | None, dims: Dims, channel_dim: int
) -> torch.Tensor:
    return torch.cat([avg(x, mask, dims), max_(x, mask, dims)], dim=channel_dim)


# Under export (``torch.export``, ONNX) gem and lse first pool without their range guard (the
# row's maximum, by which gem divides and from which lse shifts) and take the guarded path only
# when a pooled row falls outside [_EXACT_LOW, _EXACT_HIGH]: one ``If`` on the pooled values
# instead of two more passes over x (a maximum, a division or difference), which an exported
# graph cannot fuse. Inside that range the unguarded mean is exact to float32 rounding: a term
# that underflowed is off by at most 2^-126, under 2^-24 of such a mean. Eager and compiled
# code always take the guarded path (it has the gradients: no term ever underflows there).
_EXACT_LOW, _EXACT_HIGH = 2.0**-100, float(torch.finfo(torch.float32).max)


def _unless_out_of_range(
    mean: torch.Tensor, value: torch.Tensor, guarded: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``value`` (pooled from ``mean``) if every row of ``mean`` lies in the exact range (NaN
    does not), else ``guarded()``, as one ``torch.cond``. Its operand and result are flat: a
    cond whose result keeps a dynamic batch dim is recorded with a runtime check that the batch
    is at least 2, which a batch of 1 would fail."""
    exact = (mean.min() >= _EXACT_LOW) & (mean.max() <= _EXACT_HIGH)
    flat = torch.cond(exact, lambda v: v.clone(), lambda v: guarded().flatten(),
                      (value.flatten(),))
    return flat.reshape(value.shape)


def _mean_or_one(
    values: torch.Tensor, mask: torch.Tensor | None, nonempty: torch.Tensor | None, dims: Dims
) -> torch.Tensor:
    """The mean of ``values`` over real positions (padded ones zeroed here); 1 for a row with
    none, so that its log is 0."""
    if mask is not None:
        values = torch.where(mask, values, 0.0)
    mean = _mean_of(values, mask, dims)
    return mean if nonempty is None else torch.where(nonempty, mean, full_rank(1.0, mean))


def _power(base: torch.Tensor, p: float | torch.Tensor, branch: bool = True) -> torch.Tensor:
    """``base ** p`` (``base`` positive). In an exported graph a p other than 2 or 3 becomes
    ``exp(p * log(base))``: onnxruntime's CPU provider takes any other power one element at a
    time, 1.7 times slower than its log and exp (docs/performance.md, "Exported graphs"). A
    tensor p (a learned one) takes the power where it holds one value, 2 or 3, when the graph
    runs, else the exp and log; with ``branch=False`` (inside another cond: torch 2.13 exports a
    cond nested in a cond with a dynamic size it cannot translate to ONNX) it takes the power."""
    if not torch.compiler.is_exporting():
        return base.pow(p)
    if not isinstance(p, torch.Tensor):
        return base.pow(p) if p in (2.0, 3.0) else torch.exp(p * torch.log(base))
    if p.numel() != 1:
        return torch.exp(p * torch.log(base))
    if not branch:
        return base.pow(p)
    fast = (p == 2.0) | (p == 3.0)
    # flat operands and result: a cond keeping a dynamic batch dim asks for a batch of 2 or more
    flat = torch.cond(fast.reshape(()), lambda b, q: b.pow(q),
                      lambda b, q: torch.exp(q * torch.log(b)), (base.flatten(), p.reshape(())))
    return flat.reshape(base.shape)


def gem(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    dims: Dims,
    p: float | torch.Tensor,
    eps: float | torch.Tensor,
) -> torch.Tensor:
    p = _compiled_exponent(p, x)
    if mask is not None:
        # padded slots take the clamp floor, the smallest value a real one can have: the scale
        # below (the row's maximum) is then a real position's, whatever the padding held
        x = torch.where(mask, x, eps)
    clamped = x.clamp(min=eps)
    nonempty = _nonempty(mask, dims)

    def root(mean: torch.Tensor) -> torch.Tensor:
        # exp(log(mean) / p), not mean^(1/p): onnxruntime takes a non-integer power one value
        # at a time, slower than an exp and a log (the same in eager torch)
        return torch.exp(torch.log(mean) / full_rank(p, mean))

    def guarded() -> torch.Tensor:
        # GeM is 1-homogeneous: scaling by the (detached) max keeps clamp(x)^p from underflowing
        # to 0 (eps^p is 0 in float32 once p > 7.5), which would give a wrong value and a NaN
        # gradient; the scaled mean lies in [1/n, 1]
        top = clamped.detach().amax(dims, keepdim=True)
        powered = _power(clamped / top, p, branch=False)  # under export: the rare branch
        return top * root(_mean_or_one(powered, mask, nonempty, dims))

    if torch.compiler.is_exporting():
        mean = _mean_or_one(_power(clamped, p), mask, nonempty, dims)
        y = _unless_out_of_range(mean, root(mean), guarded)
    else:
        y = guarded()
    return _where_nonempty(nonempty, y)


def lse(
    x: torch.Tensor, mask: torch.Tensor | None, dims: Dims, r: float | torch.Tensor
) -> torch.Tensor:
    r = _compiled_exponent(r, x)
    nonempty = _nonempty(mask, dims)

    def guarded() -> torch.Tensor:
        held = x if mask is None else torch.where(mask, x, -torch.inf)
        top = held.detach().amax(dims, keepdim=True)
        top = torch.where(torch.isfinite(top), top, full_rank(0.0, top))
        # padded positions are shifted to 0 (not -inf) before the product with r: d/dr of
        # exp(r * -inf) would be -inf * 0 = NaN, a NaN gradient for a learnable r
        shifted = x - top if mask is None else torch.where(mask, x - top, 0.0)
        mean = _mean_or_one(torch.exp(r * shifted), mask, nonempty, dims)
        return top + torch.log(mean) / full_rank(r, mean)

    if torch.compiler.is_exporting():
        held = x if mask is None else torch.where(mask, x, 0.0)
        mean = _mean_or_one(torch.exp(r * held), mask, nonempty, dims)
        y = _unless_out_of_range(mean, torch.log(mean) / full_rank(r, mean), guarded)
    else:
        y = guarded()
    return _where_nonempty(nonempty, y)


def attention(
    x: torch.Tensor,
    mask: torch.Tensor | None,
    dims: Dims,
    weights: torch.Tensor,
) -> torch.Tensor:
    """``weights`` is already broadcastable to ``x`` (channel dim of size 1)."""
    weights = weights.to(x.dtype)
    if mask is not None:
        x = torch.where(mask, x, 0.0)
        weights = torch.where(mask, weights, 0.0)
    total = weights.sum(dims, keepdim=True)
    positive = total > 0
    y = (x * weights).sum(dims, keepdim=True) / torch.where(positive, total, 1.0)
    return torch.where(positive, y, full_rank(0.0, y))


def sum_(x: torch.Tensor, mask: torch.Tensor | None, dims: Dims) -> torch.Tensor:
    if mask is not None:
        x = torch.where(mask, x, 0.0)
    return x.sum(dims, keepdim=True)


def mean_sqrt_len(x: torch.Tensor, mask: torch.Tensor | None, dims: Dims) -> torch.Tensor:
    """The sum over real positions divided by the square root of their number (0 if none)."""
    if mask is None:
        count = torch.full([1] * x.ndim, _size_of(x, dims), dtype=x.dtype, device=x.device)
        return x.sum(dims, keepdim=True) / count.sqrt()
    total = torch.where(mask, x, 0.0).sum(dims, keepdim=True)
    return total / _count(mask, dims, x.dtype).clamp(min=1).sqrt()


def weightedmean(x: torch.Tensor, mask: torch.Tensor | None, dims: Dims) -> torch.Tensor:
    """The mean weighted by rank: the j-th real position in row-major order over ``dims``
    weighs j (1 for the first real position, whatever padding comes before it)."""
    kept = [1 if d in {e % x.ndim for e in dims} else s for d, s in enumerate(x.shape)]
    flat = _positions_last(x, dims)
    if mask is None:
        weights = torch.arange(1, flat.shape[-1] + 1, device=x.device, dtype=x.dtype)
        total = (flat * weights).sum(-1, keepdim=True)
        return (total / full_rank(weights.sum(), total)).reshape(kept)
    real = _positions_last(mask, dims)
    weights = rank_weights(real, x.dtype)
    total = weights.sum(-1, keepdim=True)
    weighted = (torch.where(real, flat, 0.0) * weights).sum(-1, keepdim=True)
    return (weighted / total.clamp(min=1)).reshape(kept)


def rank_weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each real position's rank along the last dim (1, 2, ...), 0 at padded positions: the
    weights of :func:`weightedmean` over a bool mask whose last dim holds the positions.

    >>> rank_weights(torch.tensor([[False, True, False, True, True]]), torch.float32)
    tensor([[0., 1., 0., 2., 3.]])
    """
    return torch.where(mask, torch.cumsum(mask.to(dtype), -1), 0.0)


def _size_of(x: torch.Tensor, dims: Dims) -> int:
    n = 1
    for d in dims:
        n *= x.shape[d]
    return n


def first(x: torch.Tensor, mask: torch.Tensor | None, dims: Dims) -> torch.Tensor:
    """The value at each row's first real position, in row-major order over ``dims``."""
    return _at_end(x, mask, dims, last=False)


def last(x: torch.Tensor, mask: torch.Tensor | None, dims: Dims) -> torch.Tensor:
    """The value at each row's last real position, in row-major order over ``dims``."""
    return _at_end(x, mask, dims, last=True)


def _positions_last(t: torch.Tensor, dims: Dims) -> torch.Tensor:
    """``t`` with ``dims`` moved to the end (in ascending order) and flattened into one."""
    dims = tuple(sorted(d % t.ndim for d in dims))
    k = len(dims)
    return t.movedim(dims, tuple(range(t.ndim - k, t.ndim))).flatten(t.ndim - k)


def _at_end(x: torch.Tensor, mask: torch.Tensor | None, dims: Dims, last: bool) -> torch.Tensor:
    """One gather: the selected value's gradient is 1, every other position's exactly 0; a row
    with no real position gives 0 (its index points at a padded slot whose value is discarded by
    a where, so even NaN there reaches neither the output nor the gradient)."""
    kept = [1 if d in {e % x.ndim for e in dims} else s for d, s in enumerate(x.shape)]
    flat = _positions_last(x, dims)
    if mask is None:
        return (flat[..., -1:] if last else flat[..., :1]).reshape(kept)
    real = _positions_last(mask, dims)
    length = flat.shape[-1]
    pos = torch.arange(length, device=x.device)
    if last:
        index = torch.where(real, pos, 0).amax(-1, keepdim=True)
    else:
        index = torch.where(real, pos, length - 1).amin(-1, keepdim=True)
    picked = flat.gather(-1, index.expand(*flat.shape[:-1], 1))
    y = torch.where(real.any(-1, keepdim=True), picked, full_rank(0.0, picked))
    return y.reshape(kept)


# --------------------------------------------------------------------------------------------
# credits: what each real position contributes, for exact class activation maps
#
# Over the canonical view (x (N, C, L), mask (N, 1, L) or None), a kind's credit is a
# (N, width * C, L) tensor whose mean over a row's real positions is exactly its pooled value
# (0 at padded positions). A classifier's logit, linear in the pooled values, is then the mean of
# a map over positions: the exact class activation map.


def _real_count(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The number of real positions per row, ``(N, 1, 1)`` in x's dtype."""
    if mask is None:
        return torch.full((x.shape[0], 1, 1), x.shape[-1], dtype=x.dtype, device=x.device)
    return mask.sum(-1, keepdim=True, dtype=x.dtype)


def _zero_padded(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else torch.where(mask, x, 0.0)


def avg_credit(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Each real position credits its own value (Zhou et al.'s class activation map)."""
    return _zero_padded(x, mask)


def max_credit(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The maximum credited to the position(s) it came from, ``n * max / ties`` there."""
    real = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.expand_as(x)
    held = torch.where(real, x, -torch.inf)
    top = held.amax(-1, keepdim=True)
    ties = (held == top) & real
    count = ties.sum(-1, keepdim=True).clamp(min=1).to(x.dtype)
    top = torch.where(torch.isfinite(top), top, 0.0)
    return torch.where(ties, _real_count(x, mask) * top / count, 0.0)


def avgmax_credit(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return (avg_credit(x, mask) + max_credit(x, mask)) / 2


def catavgmax_credit(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.cat([avg_credit(x, mask), max_credit(x, mask)], dim=1)


def sum_credit(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return _real_count(x, mask) * _zero_padded(x, mask)


def attention_credit(
    x: torch.Tensor, mask: torch.Tensor | None, weights: torch.Tensor
) -> torch.Tensor:
    """``n * w_s / sum(w)`` times each value (``weights`` ``(N, 1, L)``); 0 where the weights
    sum to 0."""
    w = _zero_padded(weights.to(x.dtype), mask)
    total = w.sum(-1, keepdim=True)
    share = torch.where(total > 0, _real_count(x, mask) * w / torch.where(total > 0, total, 1.0),
                        0.0)
    return _zero_padded(x, mask) * share


def _end_credit(x: torch.Tensor, mask: torch.Tensor | None, last: bool) -> torch.Tensor:
    length = x.shape[-1]
    pos = torch.arange(length, device=x.device)
    if mask is None:
        chosen = pos == (length - 1 if last else 0)
        return torch.where(chosen, length * x, 0.0)
    real = mask.expand_as(x)
    if last:
        index = torch.where(real, pos, -1).amax(-1, keepdim=True)
    else:
        index = torch.where(real, pos, length).amin(-1, keepdim=True)
    return torch.where((pos == index) & real, _real_count(x, mask) * x, 0.0)


def first_credit(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return _end_credit(x, mask, last=False)


def last_credit(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return _end_credit(x, mask, last=True)


def mean_sqrt_len_credit(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``sqrt(n)`` times each real value (their mean is ``sum / sqrt(n)``)."""
    return _real_count(x, mask).sqrt() * _zero_padded(x, mask)


def weightedmean_credit(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``n * j / sum(1..n)`` times the j-th real value (0 in a row with no real position)."""
    real = torch.ones_like(x[:, :1], dtype=torch.bool) if mask is None else mask
    return attention_credit(x, mask, rank_weights(real, x.dtype))
