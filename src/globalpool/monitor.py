"""``gp.monitor(model)``: statistics of what every pooling module of a model outputs.

A context manager: while the block runs, a forward hook on each pooling module folds its output
into running statistics; every hook is removed when the block exits, also when it raises.

>>> import torch, globalpool as gp
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), gp.GeM(), torch.nn.Linear(8, 2))
>>> with gp.monitor(net) as stats:
...     _ = net(torch.rand(4, 3, 9, 9))
...     _ = net(torch.rand(4, 3, 9, 9))
>>> s = stats["1"]
>>> s["type"], s["calls"], s["output_shape"], s["values"], round(s["p"], 4)
('GeM', 2, [4, 8], 64, 3.0)
>>> len(net[1]._forward_hooks)
0

What is recorded, per module (keyed by its qualified name from ``model.named_modules()``; a
module registered under several names is recorded once, under its first name):

- ``calls``, and ``input_shape`` / ``output_shape`` of the last call;
- ``values``: pooled values seen (samples x channels x output bins, over every call), and
  ``mean``, ``std`` (population, ``correction=0``), ``min``, ``max`` of the finite ones
  (``None`` before any finite value); ``nan`` and ``inf`` count the others;
- ``channels`` and ``dead_channels`` / ``dead_fraction``: a channel (a feature of the pooled
  output, so ``catavgmax`` has ``2C``) is **dead** when none of its pooled values seen in the
  block, over every sample, bin and call, was ``> 0`` (NaN is not ``> 0``). After a ReLU such a
  feature is 0 for every input: it carries nothing. GeM clamps its input at ``eps``, so a dead
  GeM channel pools to ``eps``: for GeM the bound is ``eps`` (plus 0.1% for rounding), not 0,
  also for the gem block of a tuple of kinds (``GlobalPool(("avg", "gem"))``: 0 for the avg
  features, ``eps`` for the gem ones). ``None`` if the width changed between calls;
- ``empty_samples``: with a ``mask`` passed to the module, samples (for :class:`AdaptivePool`:
  output bins) without a real position; they pool to 0 by contract and are left out of every
  statistic above, so they neither fake dead channels nor pull the mean to 0;
- ``p`` for :class:`GeM` (and a ``GlobalPool`` or ``AdaptivePool`` whose kind is ``gem`` or a
  tuple holding it: its fixed ``p``), ``r`` for :class:`LSEPool`,
  read when the block exits (or when viewed inside it): a float, or ``{"mean", "min", "max"}``
  for one value per channel;
- ``attention_entropy`` for :class:`AttentionPool`: per sample, the entropy of the normalised
  attention ``a = w / sum(w)`` over its real positions divided by ``log(real positions)`` (1 =
  uniform, 0 = one position), averaged over the samples with more than one real position.
  It comes from a hook on the module's scorer (``score``), whose output ``z`` gives the weights
  ``w = sigmoid(z)``: nothing is recomputed and ``AttentionPool`` stores nothing.
- for the query-based attention pools (:class:`LatentAttentionPool`, :class:`SimPool`,
  :class:`CLIPAttentionPool`), the normalised entropy of each query's attention distribution
  ``a = softmax(q kᵀ / √d)`` over the keys it may attend to: ``-sum a log a / log n`` with ``n``
  the sample's real positions (plus CLIP's mean token, which is a key too; 1 = uniform, 0 = one
  position), for each head and each latent query, averaged over the samples (and calls) with a
  real position and ``n > 1``. ``attention_entropy_heads`` lists one value per head (averaged
  over the latent queries), ``attention_entropy`` is their mean (the table's column), and a
  :class:`LatentAttentionPool` with ``latent_len > 1`` adds ``attention_entropy_latents``, one
  list of per-head values per latent query. The probabilities are those of the pool's own
  forward (:func:`globalpool.attention.query.recording_attention`, open only during a
  monitored call): nothing is recomputed outside the pool, and the forward's result is unchanged.

Recognised modules (:data:`POOL_TYPES`): globalpool's :class:`GlobalPool` (every kind,
``lse`` included), :class:`GeM`, :class:`AttentionPool`, :class:`AdaptivePool`,
:class:`NiNHead` (whose output is the global average of its class maps) and the query-based
attention pools (a ``(N, latent_len, C)`` output counts ``C`` channels), and torch's
``nn.AdaptiveAvgPool1/2/3d`` and ``nn.AdaptiveMaxPool1/2/3d``. A model with none of them
(after ``include``) is refused with a ``ValueError``: monitoring nothing is a mistake.

``torch.compile``: code compiled before the hooks were added skips them (dynamo does not guard
on hooks). A compiled module inside the monitored model (``gp.monitor(torch.compile(net))``, or a
model compiled in place with ``model.compile()``) therefore runs eagerly inside the block, so
every call is recorded; its compiled code is put back, not recompiled, when the block exits.
Compiled code the monitor cannot see (``gp.monitor(net)`` while calling ``torch.compile(net)``)
records nothing: a block in which no call was recorded ends with a ``UserWarning`` saying so.

The statistics are computed on detached tensors and never change the forward's result or
gradient. To cost one cheap copy per call rather than a handful of reductions, a hook copies the
call's pooled output (``N x C`` values for a global pool) into a buffer of :data:`FLUSH_BYTES`
on the module's device, allocated once per record and reused; the rows kept are reduced together
(one contiguous view, no ``cat``, no fresh allocation), and their few results moved to the CPU
in one transfer, when the buffer is full, every :data:`FLUSH_CALLS` calls, when the output's
shape (or whether a mask came) changes, when a view is read and when the block exits. Memory
stays bounded; an output larger than the buffer is reduced at once without a copy. A failure
inside a hook never breaks the forward: it is counted in ``errors`` (with the last message in
``error``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from globalpool import registry
from globalpool.attention import QUERY_POOLS, LatentAttentionPool
from globalpool.attention.query import start_recording, stop_recording
from globalpool.contract import kinds_of, spatial_shape
from globalpool.heads import TORCH_ADAPTIVE_POOLS, NiNHead
from globalpool.layers import AdaptivePool, AttentionPool, GeM, GlobalPool, LSEPool
from globalpool.learned_pools import LEARNED_POOLS

#: Module types :func:`monitor` records.
POOL_TYPES: tuple[type[nn.Module], ...] = (
    GlobalPool,
    GeM,
    LSEPool,
    AttentionPool,
    AdaptivePool,
    NiNHead,
    *QUERY_POOLS,
    *TORCH_ADAPTIVE_POOLS,
)
#: The name of each query-based attention pool (its ``kind`` in a record).
_QUERY_NAMES = {cls: name for name, cls in LEARNED_POOLS.items()}
#: At most this many calls' pooled outputs are kept before they are reduced ...
FLUSH_CALLS = 256
#: ... and at most this many bytes of them: the size of each record's buffer, made once and
#: reused (2 MiB of float64: a flush's fixed cost, ~10 small ops, is shared by enough calls;
#: measured in benchmarks/results/monitor). An output larger than this is reduced at once and
#: not copied.
FLUSH_BYTES = 2**21

_SPATIAL_RANK = {
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}


def _kind(module: nn.Module) -> str:
    if isinstance(module, (GlobalPool, AdaptivePool)):
        return module.kind
    if isinstance(module, GeM):
        return "gem"
    if isinstance(module, LSEPool):
        return "lse"
    if isinstance(module, AttentionPool):
        return "attention"
    if isinstance(module, NiNHead):
        return "avg"
    if isinstance(module, QUERY_POOLS):
        return _QUERY_NAMES[type(module)]
    return "avg" if "Avg" in type(module).__name__ else "max"


def _fixed_gem(module: nn.Module) -> dict[str, Any] | None:
    """``p`` and ``eps`` of the ``gem`` of a :class:`GlobalPool` or :class:`AdaptivePool` whose
    kind is ``gem`` or a tuple holding it (its defaults where not given); None otherwise."""
    if isinstance(module, (GlobalPool, AdaptivePool)) and "gem" in kinds_of(module.kind):
        return {**registry.spec("gem").defaults, **module.params}
    return None


def _dead_floor(module: nn.Module) -> float | tuple[tuple[int, float], ...]:
    """The largest pooled value of a dead channel: 0, or GeM's clamp floor ``eps`` (a channel
    whose inputs are all <= eps pools to eps; 0.1% above it for rounding).

    Returns:
        A float for one kind; for a tuple of kinds holding ``gem``, one ``(width, floor)`` per
        kind in output order (``width`` output features per input channel): the floor of each
        block of the concatenated output.
    """
    if isinstance(module, GeM):
        return float(module.eps) * 1.001
    gem = _fixed_gem(module)
    if gem is None:
        return 0.0
    floor = float(gem["eps"]) * 1.001
    if isinstance(module.kind, str):
        return floor
    return tuple((registry.spec(k).width, floor if k == "gem" else 0.0) for k in module.kind)


def _check_include(include: Any) -> tuple[str, ...] | None:
    if include is None:
        return None
    names = (include,) if isinstance(include, str) else include
    try:
        names = tuple(names)
    except TypeError:
        names = None
    if names is None or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"include must be None, a module name or a sequence of module names, got {include!r}"
        )
    return names


def _selected(name: str, include: tuple[str, ...] | None) -> bool:
    if include is None:
        return True
    return any(name == n or n == "" or name.startswith(n + ".") for n in include)


def find_pools(
    model: nn.Module, include: str | Iterable[str] | None = None
) -> dict[str, nn.Module]:
    """The pooling modules of ``model`` :func:`monitor` would record, by qualified name.

    ``include`` keeps only the modules named so or lying under one of the names (``"head"``
    keeps ``head.pool``); each of its names must name a module of ``model``.

    >>> import torch, globalpool as gp
    >>> list(find_pools(gp.make_head("gem", 8, 2)))
    ['pool']
    >>> find_pools(torch.nn.Linear(2, 2))
    {}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = _check_include(include)
    known = dict(model.named_modules())
    for n in names or ():
        if n not in known:
            raise ValueError(f"include names {n!r}, which is not a module of the model")
    return {
        name: m
        for name, m in known.items()
        if isinstance(m, POOL_TYPES) and _selected(name, names)
    }


# --- per-call statistics -----------------------------------------------------------------------


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def call_stats(
    y: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    floor: float | torch.Tensor = 0.0,
    fast: bool = True,
    channels: bool | torch.Tensor = True,
) -> tuple[Any, ...]:
    """Reductions of pooled outputs ``y`` of shape ``(N, C, *bins)`` (channels first).

    Returns ``(n, sum, sumsq, min, max, nan, inf, alive)`` over the finite values where
    ``valid`` (broadcastable to ``y``, True = counted) holds; ``alive`` (``(C,)``) is, per
    channel, how far its largest value (NaN left out) lies above ``floor`` (a number, or one per
    channel: a ``(C,)`` tensor), or 0: 0 for a dead channel; only of the channels indexed by
    ``channels`` when it is a tensor, and None when it is False (the channel maxima are one of
    the dearer passes). Items are numbers or tensors;
    sums are float64. With ``fast`` an all-finite ``y`` without ``valid`` takes one pass per
    statistic (sum, sum of squares, min and max together, the channel maxima), allocates
    nothing of ``y``'s size (a float64 ``y`` is not copied) and brings its four numbers back in
    one transfer (one sync); when their sum is not finite (a NaN or inf somewhere), and in
    every other case, the general path masks every statistic.

    >>> [float(v) for v in call_stats(torch.tensor([[1.0, -2.0], [3.0, float("nan")]]))[:7]]
    [3.0, 2.0, 14.0, -2.0, 3.0, 1.0, 0.0]
    """
    dims = [d for d in range(y.ndim) if d != 1]
    if y.numel() == 0:
        return 0, 0.0, 0.0, math.inf, -math.inf, 0, 0, None
    acc = _acc_dtype(y.device)
    if fast and valid is None:
        wide = y if y.dtype == acc else y.to(acc)
        flat = wide.reshape(-1)
        sums = torch.stack([flat.sum(), torch.dot(flat, flat), *torch.aminmax(flat)])
        s, q, lo, hi = sums.tolist()  # one transfer
        if math.isfinite(s):  # a finite sum: no NaN or inf anywhere
            alive = None if channels is False else _alive(wide, dims, floor, channels)
            return flat.numel(), s, q, lo, hi, 0, 0, alive
    yd = y.to(acc)
    nan = torch.isnan(yd)
    ok = torch.isfinite(yd)
    if valid is not None:
        valid = valid.expand_as(yd)
        nan, ok = nan & valid, ok & valid
        inf = (~torch.isfinite(yd) & valid).sum() - nan.sum()
        seen = valid & ~torch.isnan(yd)
    else:
        inf = yd.numel() - ok.sum() - nan.sum()
        seen = ~torch.isnan(yd)
    z = torch.where(ok, yd, 0.0).reshape(-1)
    inf_ = torch.tensor(math.inf, dtype=yd.dtype, device=yd.device)
    lowest = torch.where(ok, yd, inf_).amin()
    highest = torch.where(ok, yd, -inf_).amax()
    alive = None
    if channels is not False:
        alive = _alive(torch.where(seen, yd, -inf_), dims, floor, channels)
    return ok.sum(), z.sum(), torch.dot(z, z), lowest, highest, nan.sum(), inf, alive


def _alive(
    y: torch.Tensor, dims: list[int], floor: float | torch.Tensor, channels: bool | torch.Tensor
) -> torch.Tensor:
    """How far the largest value of each channel of ``y`` (of those indexed by ``channels``
    when a tensor) lies above ``floor`` (a number or one per channel); 0 when not above (for
    two floats, ``a - b > 0`` exactly when ``a > b``)."""
    if isinstance(channels, torch.Tensor):
        y = y.index_select(1, channels)
        if isinstance(floor, torch.Tensor):
            floor = floor.index_select(0, channels)
    return torch.clamp_min(y.amax(dims) - floor, 0.0)


def attention_terms(
    scores: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
    """Per sample ``(W, WL, n)``: ``W = sum w``, ``WL = sum w log w`` over the real positions
    (``w = sigmoid(scores)``, scores ``(N, *S)``, or ``(N, *S, 1)`` as the scorer gives them)
    and their number ``n``; the normalised entropy is ``(log W - WL / W) / log n``
    (:func:`entropy_from_terms`).

    >>> w, wl, n = attention_terms(torch.zeros(1, 4), None)
    >>> round(float(entropy_from_terms(w, wl, n)[0]), 6)
    1.0
    """
    z = scores.reshape(scores.shape[0], -1).to(_acc_dtype(scores.device))
    w = torch.sigmoid(z)
    if mask is None:
        return w.sum(1), torch.linalg.vecdot(w, F.logsigmoid(z)), z.shape[1]
    m = mask.reshape(mask.shape[0], -1)
    w = torch.where(m, w, 0.0)
    return w.sum(1), torch.linalg.vecdot(w, torch.where(m, F.logsigmoid(z), 0.0)), m.sum(1)


def entropy_from_terms(
    w: torch.Tensor, wl: torch.Tensor, n: torch.Tensor | int
) -> torch.Tensor:
    """Normalised entropy per sample from :func:`attention_terms`; NaN where ``n <= 1``."""
    n = torch.as_tensor(n, dtype=w.dtype, device=w.device)
    h = (torch.log(w) - wl / w) / torch.log(n)
    return torch.where(n > 1, h, math.nan)


# --- the rows kept until a flush ---------------------------------------------------------------


class _Rows:
    """The blocks of the calls kept until a flush, all of one shape ``(n, *tail)`` (and, with
    masks, theirs), in a flat buffer of :data:`FLUSH_BYTES` made once and reused.

    The buffer is cut into one slot per call (a view made at the first use of each slot for a
    shape, at most :data:`FLUSH_CALLS`), so keeping a call's output is a single ``copy_`` (to
    float64 on the CPU) that allocates nothing, and a flush reduces one contiguous view: no
    ``cat``, and no fresh megabytes for the allocator to map and the kernel to fault in at every
    flush (what a flush of 4 MiB of copies cost: ~50 us per kept call on the 1-d CNN, more than
    the rest of the monitor together).
    """

    def __init__(self) -> None:
        self.values: torch.Tensor | None = None  # flat; ``masks`` made at the first mask
        self.masks: torch.Tensor | None = None
        self.shape: torch.Size | None = None  # of each call's block, and of its mask
        self.mask_shape: torch.Size | None = None
        self.slots: list[torch.Tensor] = []
        self.mask_slots: list[torch.Tensor] = []
        self.room = 0  # slots for blocks of ``shape``
        self.calls = 0

    def fits(self, t: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """Whether ``t`` (with ``mask``) can follow the blocks kept: shaped as they are, on
        their device, with a slot left; with none kept, whether ``t`` fits in the buffer."""
        if self.calls:
            return self.calls < self.room and self._cut_for(t, mask)
        return t.numel() <= _capacity(t.device)

    def append(self, t: torch.Tensor) -> bool:
        """Copy ``t`` (no mask) into the next slot when it is shaped as the blocks the slots
        are cut for, on their device, and that slot is already made; else False, and nothing
        is done. The whole of the common call's keeping."""
        i = self.calls
        if (
            i < len(self.slots)
            and t.shape == self.shape
            and self.mask_shape is None
            and t.device == self.values.device
        ):
            self.slots[i].copy_(t)
            self.calls = i + 1
            return True
        return False

    def add(self, t: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Copy ``t`` (and ``mask``) into the next slot; only where :meth:`fits` holds."""
        if not self.calls and not self._cut_for(t, mask):
            self._cut(t, mask)
        i = self.calls
        if i == len(self.slots):
            self.slots.append(self._slot(self.values, self.shape, i))
            if mask is not None:
                self.mask_slots.append(self._slot(self.masks, self.mask_shape, i))
        self.slots[i].copy_(t)
        if mask is not None:
            self.mask_slots[i].copy_(mask)
        self.calls += 1

    def take(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The blocks kept, as one ``(calls * n, *tail)`` view of the buffer (valid until the
        next :meth:`add`), and their masks; or None. The slots are free afterwards."""
        if not self.calls:
            return None
        calls, self.calls = self.calls, 0
        values = self._joined(self.values, self.shape, calls)
        masks = None if self.mask_shape is None else self._joined(
            self.masks, self.mask_shape, calls
        )
        return values, masks

    def _cut_for(self, t: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """Whether the slots are cut for blocks shaped as ``t`` and ``mask``, on ``t``'s
        device."""
        return (
            t.shape == self.shape
            and (None if mask is None else mask.shape) == self.mask_shape
            and t.device == self.values.device
        )

    def _cut(self, t: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Slots for blocks shaped as ``t`` (and ``mask``); the buffers are made once a device."""
        size = _capacity(t.device)
        if self.values is None or self.values.device != t.device:
            self.values = torch.empty(size, dtype=_acc_dtype(t.device), device=t.device)
            self.masks = None
        if mask is not None and self.masks is None:
            self.masks = torch.empty(size, dtype=torch.bool, device=t.device)
        self.shape = t.shape
        self.mask_shape = None if mask is None else mask.shape
        self.slots, self.mask_slots = [], []
        self.room = min(FLUSH_CALLS, size // max(t.numel(), 1))

    @staticmethod
    def _slot(flat: torch.Tensor, shape: torch.Size, i: int) -> torch.Tensor:
        n = shape.numel()
        return flat[i * n:(i + 1) * n].view(shape)

    @staticmethod
    def _joined(flat: torch.Tensor, shape: torch.Size, calls: int) -> torch.Tensor:
        return flat[:calls * shape.numel()].view(calls * shape[0], *shape[1:])


def _capacity(device: torch.device) -> int:
    """Values a buffer of :data:`FLUSH_BYTES` holds on ``device``."""
    return FLUSH_BYTES // _acc_dtype(device).itemsize


# --- the record of one module ------------------------------------------------------------------


class _Record:
    """Running statistics of one module; per-call outputs wait in ``kept`` (attention scores
    in ``scored``) until a flush."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module
        self.calls = 0
        self.input_shape: torch.Size | None = None
        self.output_shape: torch.Size | None = None
        self.kept, self.scored = _Rows(), _Rows()
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf
        self.nan = self.inf = self.empty = 0
        self.channels: int | None = None
        self.width_changed = False
        self.alive: torch.Tensor | None = None  # per channel: > 0 once a value was > floor
        self.unseen: torch.Tensor | None = None  # the channels not alive yet (None: unknown)
        self.entropy_sum, self.entropy_count = 0.0, 0
        self.scores: torch.Tensor | None = None  # the scorer's output, until the pool's hook
        # query pools: per (latent query, head) the sum of the samples' normalised entropies,
        # and how many samples were counted (device tensors, read when viewed)
        self.query_entropy: torch.Tensor | None = None
        self.query_count: torch.Tensor | None = None
        self.recording: list[torch.Tensor] | None = None  # attend's probabilities, in a call
        self.probs: torch.Tensor | None = None  # the call's probabilities, until its hook
        self.errors, self.error = 0, None
        self.p: Any = None
        self.floor = _dead_floor(module)
        self._floors: dict[tuple[int, torch.device], float | torch.Tensor] = {}
        self.tail: torch.Size | None = None  # output shape (less N) taken as it came
        self.rank = _SPATIAL_RANK.get(type(module))
        self.channels_last = (  # a query pool gives (N, C) or (N, latent_len, C)
            isinstance(module, QUERY_POOLS)
            or getattr(module, "layout", "channels_first") == "channels_last"
        )

    # -- in the hook -----------------------------------------------------------------------------

    def observe(self, args: tuple, kwargs: dict, output: Any) -> None:
        """One call: keep a copy of its (small) pooled output until the next flush."""
        self.calls += 1
        x = args[0] if args else kwargs.get("x", kwargs.get("input"))
        if isinstance(x, torch.Tensor):
            self.input_shape = x.shape
        y = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(y, torch.Tensor):
            return
        shape = self.output_shape = y.shape
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        if mask is None and shape[1:] == self.tail:
            # the common call: as the last one, nothing to reshape or check
            if y.requires_grad:  # (under no_grad no detached alias is made: an op fewer)
                y = y.detach()
            if not self.kept.append(y):
                self._keep(self.kept, y, None, self._reduce_outputs)
        else:
            self._observe_other(y, mask)
        if self.scores is not None:
            scores, self.scores = self.scores, None
            self._keep_scores(scores, mask)
        if self.probs is not None:
            probs, self.probs = self.probs, None
            self._fold_query_entropy(probs, x, mask if isinstance(mask, torch.Tensor) else None)

    def _fold_query_entropy(
        self, probs: torch.Tensor, x: Any, mask: torch.Tensor | None
    ) -> None:
        """Add the normalised entropy of each query's attention ``probs`` ``(N, H, Lq, K)``
        per (query, head), over the samples with a real position and more than one key to
        attend to. The keys are the input's ``L`` positions and, first, any the pool adds (CLIP's
        mean): ``K - L`` of them, always attended to."""
        n, _, _, keys = probs.shape
        p = probs.to(_acc_dtype(probs.device))
        entropy = -torch.special.xlogy(p, p).sum(-1)  # (N, H, Lq); 0 log 0 = 0 at padding
        if mask is None:
            real = torch.full((n,), keys, dtype=p.dtype, device=p.device)
            keep = real > 1
        else:
            positions = math.prod(spatial_shape(x, self.module.layout))
            flat = mask.detach().reshape(n, -1).to(p.device)
            real = (flat.sum(1) + (keys - positions)).to(p.dtype)
            keep = flat.any(1) & (real > 1)
        normalised = entropy / torch.log(real.clamp_min(2)).reshape(n, 1, 1)
        total = torch.where(keep.reshape(n, 1, 1), normalised, 0.0).sum(0).T  # (Lq, H)
        count = keep.sum()
        if self.query_entropy is None or self.query_entropy.shape != total.shape:
            self.query_entropy, self.query_count = total, count
        else:
            self.query_entropy = self.query_entropy + total
            self.query_count = self.query_count + count

    def query_entropies(self) -> dict[str, Any]:
        """The attention entropy of a query pool: overall, per head, and (for more than one
        latent query) per latent query and head; None where no sample was counted."""
        out: dict[str, Any] = {"attention_entropy": None, "attention_entropy_heads": None}
        many = isinstance(self.module, LatentAttentionPool) and self.module.latent_len > 1
        if many:
            out["attention_entropy_latents"] = None
        if self.query_entropy is None or int(self.query_count) == 0:
            return out
        mean = (self.query_entropy / self.query_count).cpu()  # (Lq, H)
        out["attention_entropy"] = float(mean.mean())
        out["attention_entropy_heads"] = mean.mean(0).tolist()
        if many:
            out["attention_entropy_latents"] = mean.tolist()
        return out

    def _keep_scores(self, scores: torch.Tensor, mask: Any) -> None:
        """Keep the scorer's output of the call (``(N, *S, 1)``), with the call's mask, for the
        attention entropy of the next flush."""
        if scores.requires_grad:
            scores = scores.detach()
        if isinstance(mask, torch.Tensor):
            self._keep(self.scored, scores, mask.detach(), self._reduce_scores)
        elif not self.scored.append(scores):
            self._keep(self.scored, scores, None, self._reduce_scores)

    def _observe_other(self, y: torch.Tensor, mask: Any) -> None:
        """A call with a mask, or whose output is shaped unlike the last one's: bring the output
        to ``(N, C, *bins)`` (float), find where it is counted, track the channels."""
        shape = y.shape
        self.tail = None
        y = y.detach()
        if self.rank is not None and y.ndim == self.rank + 1:  # torch's pools: unbatched
            y = y.unsqueeze(0)
        elif y.ndim == 1:
            y = y.unsqueeze(1)
        if self.channels_last and y.ndim > 2:
            y = y.movedim(-1, 1)
        if not y.is_floating_point():
            y = y.float()
        elif y.shape == shape and mask is None:  # taken as it came: the next call of this
            self.tail = shape[1:]  # shape can skip the checks
        valid = self._valid(mask, y) if isinstance(mask, torch.Tensor) else None
        if self.channels is None:
            self.channels = y.shape[1]
        elif y.shape[1] != self.channels:
            self.width_changed = True
        if valid is not None:
            valid = valid.expand(y.shape[0], 1, *y.shape[2:])
        self._keep(self.kept, y, valid, self._reduce_outputs)

    def _valid(self, mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Where the output is counted: samples (bins) with a real position, ``(N, 1, ...)``."""
        if isinstance(self.module, AdaptivePool):
            from globalpool.functional import adaptive_pool

            m = mask.detach().unsqueeze(1).to(torch.float32)
            return adaptive_pool(m, self.module.output_size, "max") > 0  # (N, 1, *bins)
        real = mask.detach().reshape(mask.shape[0], -1).any(1)
        return real.reshape(-1, *([1] * (y.ndim - 1)))

    @staticmethod
    def _keep(
        rows: _Rows,
        t: torch.Tensor,
        mask: torch.Tensor | None,
        reduce: Callable[[torch.Tensor, torch.Tensor | None], None],
    ) -> None:
        """Copy ``t`` (with ``mask``) into ``rows``; ``reduce`` what they hold first when it
        cannot follow, and ``t`` itself at once when it is larger than the buffer."""
        if rows.fits(t, mask):
            rows.add(t, mask)
            return
        held = rows.take()
        if held is not None:
            reduce(*held)
        if rows.fits(t, mask):
            rows.add(t, mask)
        else:  # a large output: reduced at once, nothing copied
            reduce(t, mask)

    # -- folding ---------------------------------------------------------------------------------

    def flush(self) -> None:
        """Reduce the outputs (and scores) kept since the last flush, fold them into the totals."""
        for rows, reduce in ((self.kept, self._reduce_outputs), (self.scored, self._reduce_scores)):
            held = rows.take()
            if held is not None:
                reduce(*held)

    def _reduce_outputs(self, y: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Reduce outputs ``y`` and fold them into the totals; the channel maxima are taken only
        of the channels not seen alive yet (a channel once alive stays so)."""
        which = self.unseen
        channels: bool | torch.Tensor = True if which is None else which
        if self.width_changed or (which is not None and not len(which)):
            channels = False
        floor = self._floor(y)
        *cells, alive = call_stats(y, valid, floor=floor, channels=channels)
        self._fold(cells, valid)
        if alive is not None:
            self._note_alive(alive, which)

    def _floor(self, y: torch.Tensor) -> float | torch.Tensor:
        """The dead-channel floor for outputs ``y`` ``(N, C, ...)``: :attr:`floor`, or for a
        tuple of kinds with ``gem`` a ``(C,)`` tensor (``eps`` on the gem's block, 0 elsewhere;
        made once per width and device)."""
        if not isinstance(self.floor, tuple):
            return self.floor
        width, unit = y.shape[1], sum(w for w, _ in self.floor)
        key = (width, y.device)
        if key not in self._floors:
            channels, rest = divmod(width, unit)
            self._floors[key] = 0.0 if rest else torch.cat([
                torch.full((w * channels,), f, dtype=_acc_dtype(y.device), device=y.device)
                for w, f in self.floor
            ])
        return self._floors[key]

    def _note_alive(self, alive: torch.Tensor, which: torch.Tensor | None) -> None:
        """Fold ``alive`` of the channels ``which`` (None: every channel) into the record."""
        if which is None:
            self.alive = alive if self.alive is None else torch.maximum(self.alive, alive)
        else:
            self.alive[which] = torch.maximum(self.alive[which], alive)
        self.unseen = torch.nonzero(self.alive <= 0).flatten()

    def _reduce_scores(self, z: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add the normalised attention entropy of each sample with scores ``z``."""
        h = entropy_from_terms(*attention_terms(z, mask))
        h = h[torch.isfinite(h)].cpu()
        self.entropy_sum += float(h.sum())
        self.entropy_count += int(h.numel())

    def _fold(self, cells: list[Any], valid: torch.Tensor | None) -> None:
        """Chan et al.'s pairwise update of (count, mean, M2), in float64 on the CPU, from the
        first seven items of :func:`call_stats`."""
        if valid is not None:
            cells.append((~valid).sum())
        where = [i for i, v in enumerate(cells) if isinstance(v, torch.Tensor)]
        if where:  # one transfer to the CPU
            parts = [cells[i] for i in where]
            if any(t.dtype != torch.float64 for t in parts):
                parts = [t.double() for t in parts]
            moved = torch.stack(parts).tolist()  # one transfer to the CPU
            for i, v in zip(where, moved, strict=True):
                cells[i] = v
        n, s, q, lo, hi, nan, inf, *empty = cells
        self.nan += int(nan)
        self.inf += int(inf)
        self.empty += int(empty[0]) if empty else 0
        n = int(n)
        if n:
            mean = s / n
            total = self.n + n
            delta = mean - self.mean
            self.m2 += max(q - s * mean, 0.0) + delta * delta * self.n * n / total
            self.mean += delta * n / total
            self.n = total
            self.min, self.max = min(self.min, lo), max(self.max, hi)

    def read_p(self) -> None:
        """GeM's ``p`` (or a learnable lse's temperature ``r``, kept in the same slot and
        reported as ``r``): a number, or mean/min/max when there is one per channel."""
        p = None
        if isinstance(self.module, GeM):
            p = self.module.p.detach()
        elif isinstance(self.module, LSEPool):
            p = self.module.r.detach()
        elif (gem := _fixed_gem(self.module)) is not None:
            p = gem["p"]
        if isinstance(p, torch.Tensor):
            p = p.float().cpu()
            p = float(p) if p.numel() == 1 else {
                "mean": float(p.mean()), "min": float(p.min()), "max": float(p.max())
            }
        if p is not None:
            self.p = float(p) if isinstance(p, (int, float)) else p

    def as_dict(self) -> dict[str, Any]:
        self.flush()
        finite = self.n > 0
        dead = None
        if self.alive is not None and not self.width_changed:
            dead = int((self.alive <= 0).sum().cpu())
        out: dict[str, Any] = {
            "type": type(self.module).__name__,
            "kind": _kind(self.module),
            "calls": self.calls,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "output_shape": None if self.output_shape is None else list(self.output_shape),
            "values": self.n,
            "mean": self.mean if finite else None,
            "std": math.sqrt(self.m2 / self.n) if finite else None,
            "min": self.min if finite else None,
            "max": self.max if finite else None,
            "nan": self.nan,
            "inf": self.inf,
            "channels": self.channels,
            "dead_channels": dead,
            "dead_fraction": dead / self.channels if dead is not None and self.channels else None,
            "empty_samples": self.empty,
            "errors": self.errors,
        }
        if self.error is not None:
            out["error"] = self.error
        if self.p is not None:
            out["r" if isinstance(self.module, LSEPool) else "p"] = self.p
        if isinstance(self.module, AttentionPool):
            out["attention_entropy"] = (
                self.entropy_sum / self.entropy_count if self.entropy_count else None
            )
        if isinstance(self.module, QUERY_POOLS):
            out.update(self.query_entropies())
        return out


# --- the context manager and its views ---------------------------------------------------------


class MonitorStats:
    """Pooled-feature statistics of a model's pooling modules; made by :func:`monitor`.

    A context manager (hooks on while inside) and the result: ``stats[name]`` (one module's
    record as a dict), :meth:`as_dict`, :meth:`to_json`, :meth:`table` (``rich``) and ``str``.
    Entering it again adds to the same statistics.

    >>> import torch, globalpool as gp
    >>> head = gp.make_head("avg", 4, 2)
    >>> with gp.monitor(head) as stats:
    ...     _ = head(torch.ones(3, 4, 5))
    >>> stats["pool"]["mean"], stats["pool"]["dead_fraction"], list(stats.as_dict())
    (1.0, 0.0, ['pool'])
    """

    def __init__(self, model: nn.Module, include: str | Iterable[str] | None = None) -> None:
        pools = find_pools(model, include)
        if not pools:
            where = "" if include is None else f" under include={include!r}"
            raise ValueError(
                f"model ({type(model).__name__}) has no pooling module{where} to monitor; "
                f"expected one of {', '.join(t.__name__ for t in POOL_TYPES)}"
            )
        self.records = {name: _Record(name, m) for name, m in pools.items()}
        self._model = model
        self._handles: list[Any] = []
        self._undo: list[Callable[[], None]] = []  # puts compiled forwards back
        self._calls_at_enter = 0

    @property
    def active(self) -> bool:
        """True while the hooks are on (inside the ``with`` block)."""
        return bool(self._handles)

    def __enter__(self) -> MonitorStats:
        if self.active:
            raise RuntimeError("this monitor is already active; nested use is not supported")
        try:
            for record in self.records.values():
                self._hook(record)
            _run_compiled_eagerly(self._model, self._undo)
        except BaseException:
            self._remove()
            raise
        self._calls_at_enter = sum(r.calls for r in self.records.values())
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()
        for record in self.records.values():
            record.scores = record.probs = None
            if record.recording is not None:
                stop_recording(record.recording)
                record.recording = None
            _guard(record, record.read_p)
            _guard(record, record.flush)
        if exc[0] is None and sum(r.calls for r in self.records.values()) == self._calls_at_enter:
            warnings.warn(_NO_CALL.format(names=list(self.records)), stacklevel=2)

    def _remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        undo, self._undo = self._undo, []
        for put_back in reversed(undo):
            put_back()

    def _hook(self, record: _Record) -> None:
        def on_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            try:  # detached tensors only: nothing reaches autograd
                record.observe(args, kwargs, output)
            except Exception as err:  # noqa: BLE001 - a monitor must never break the forward
                record.errors += 1
                record.error = f"{type(err).__name__}: {err}"

        self._handles.append(record.module.register_forward_hook(on_output, with_kwargs=True))
        if isinstance(record.module, AttentionPool):

            def on_scores(module: nn.Module, args: tuple, output: Any) -> None:
                if isinstance(output, torch.Tensor):  # detached when kept, if need be
                    record.scores = output

            self._handles.append(record.module.score.register_forward_hook(on_scores))
        if isinstance(record.module, QUERY_POOLS):
            self._hook_attention(record)

    def _hook_attention(self, record: _Record) -> None:
        """Record, during each call of a query pool, the attention probabilities its own
        forward computes (see :func:`globalpool.attention.query.recording_attention`); the
        recording closes when the call ends, also when it raises."""

        def open_recording(module: nn.Module, args: tuple) -> None:
            if record.recording is not None:
                stop_recording(record.recording)
            record.recording, record.probs = start_recording(), None

        def close_recording(module: nn.Module, args: tuple, output: Any) -> None:
            recorded, record.recording = record.recording, None
            if recorded is not None:
                stop_recording(recorded)
                record.probs = recorded[-1] if recorded else None

        self._handles.append(record.module.register_forward_pre_hook(open_recording))
        self._handles.append(
            record.module.register_forward_hook(close_recording, always_call=True, prepend=True)
        )

    # -- views -----------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in self.records:
            raise KeyError(f"no monitored module {name!r}; monitored: {list(self.records)}")
        return self._record(self.records[name])

    def _record(self, record: _Record) -> dict[str, Any]:
        if self.active:
            _guard(record, record.read_p)
        return record.as_dict()

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """``{module name: record}``, plain JSON-ready values (see the module docstring)."""
        return {name: self._record(r) for name, r in self.records.items()}

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """:meth:`as_dict` as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.as_dict(), indent=2, allow_nan=False) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def rows(self) -> list[list[str]]:
        """The table's cells, header first (what :meth:`table` and ``str`` show)."""
        header = ["module", "type", "calls", "output", "mean", "std", "min", "max", "nan/inf",
                  "dead", "p / r", "entropy"]
        out = [header]
        for name, rec in self.as_dict().items():
            p = rec.get("p", rec.get("r"))
            if isinstance(p, dict):
                p = f"{p['mean']:.3g} [{p['min']:.3g}, {p['max']:.3g}]"
            dead = rec["dead_fraction"]
            out.append([
                name or "(model)",
                rec["type"],
                str(rec["calls"]),
                "x".join(map(str, rec["output_shape"])) if rec["output_shape"] else "-",
                *(_num(rec[k]) for k in ("mean", "std", "min", "max")),
                f"{rec['nan']}/{rec['inf']}",
                "-" if dead is None else f"{rec['dead_channels']}/{rec['channels']} "
                f"({100 * dead:.0f}%)",
                _num(p) if not isinstance(p, str) else p,
                _num(rec.get("attention_entropy")),
            ])
        return out

    def table(self) -> Any:
        """A ``rich.table.Table`` of every monitored module."""
        from rich.table import Table

        header, *body = self.rows()
        table = Table(title="pooled features")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i < 2 else "right")
        for row in body:
            table.add_row(*row)
        return table

    def __str__(self) -> str:
        rows = self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(line.rstrip() for line in lines)

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        return f"MonitorStats({list(self.records)}, {state})"


_NO_CALL = (
    "gp.monitor recorded no call of {names} inside the block: the model did not run there, or "
    "it ran as code compiled by torch.compile from a module outside the one monitored (compiled "
    "code skips hooks added after it was compiled, so nothing can be recorded); monitor the "
    "compiled module itself, gp.monitor(compiled), which runs it eagerly inside the block, or "
    "call the uncompiled model there"
)


def _run_compiled_eagerly(model: nn.Module, undo: list[Callable[[], None]]) -> None:
    """Make the ``torch.compile``d modules of ``model`` run eagerly, so that the monitor's hooks
    run: code compiled before the hooks were added would skip them (dynamo does not guard on
    hooks). Covers ``torch.compile(module)`` (an ``OptimizedModule``: its compiled ``forward``)
    and ``module.compile()`` (its ``_compiled_call_impl``); nothing is recompiled.

    Args:
        model: the monitored model.
        undo: receives, as each change is made, the call that puts that compiled forward back
            (run them in reverse order).
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing compiled
    optimized = getattr(eval_frame, "OptimizedModule", None)
    for module in model.modules():
        state = module.__dict__
        if optimized is not None and isinstance(module, optimized) and "forward" in state:
            undo.append(functools.partial(state.__setitem__, "forward", state["forward"]))
            state["forward"] = module._orig_mod.__call__  # what the compiled forward traced
        if state.get("_compiled_call_impl") is not None:
            undo.append(functools.partial(
                state.__setitem__, "_compiled_call_impl", state["_compiled_call_impl"]
            ))
            state["_compiled_call_impl"] = None


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def _guard(record: _Record, fn: Any, *args: Any) -> None:
    """Run ``fn``; a failure is counted on ``record``, never raised into the model's forward."""
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - a monitor must never break the forward
        record.errors += 1
        record.error = f"{type(err).__name__}: {err}"


def monitor(model: nn.Module, *, include: str | Iterable[str] | None = None) -> MonitorStats:
    """Record pooled-feature statistics of ``model``'s pooling modules inside a ``with`` block.

    ``include``: a module name or names; only pooling modules with that name or under it are
    recorded (``include="head"``). See :mod:`globalpool.monitor` for what is recorded.

    >>> import torch, globalpool as gp
    >>> net = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.ReLU(),
    ...                           torch.nn.AdaptiveAvgPool1d(1))
    >>> with gp.monitor(net) as stats:
    ...     y = net(torch.randn(8, 2, 10))
    >>> stats["2"]["values"], stats["2"]["min"] >= 0.0
    (32, True)
    >>> gp.monitor(torch.nn.Linear(2, 2))
    Traceback (most recent call last):
    ...
    ValueError: model (Linear) has no pooling module to monitor; expected one of GlobalPool, ...
    """
    return MonitorStats(model, include)
