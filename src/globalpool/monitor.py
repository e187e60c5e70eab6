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
  GeM channel pools to ``eps``: for GeM the bound is ``eps`` (plus 0.1% for rounding), not 0.
  ``None`` if the width changed between calls;
- ``empty_samples``: with a ``mask`` passed to the module, samples (for :class:`AdaptivePool`:
  output bins) without a real position; they pool to 0 by contract and are left out of every
  statistic above, so they neither fake dead channels nor pull the mean to 0;
- ``p`` for :class:`GeM` (and a ``GlobalPool("gem", p=...)``), ``r`` for :class:`LSEPool`,
  read when the block exits (or when viewed inside it): a float, or ``{"mean", "min", "max"}``
  for one value per channel;
- ``attention_entropy`` for :class:`AttentionPool`: per sample, the entropy of the normalised
  attention ``a = w / sum(w)`` over its real positions divided by ``log(real positions)`` (1 =
  uniform, 0 = one position), averaged over the samples with more than one real position.
  It comes from a hook on the module's scorer (``score``), whose output ``z`` gives the weights
  ``w = sigmoid(z)``: nothing is recomputed and ``AttentionPool`` stores nothing.

Recognised modules (:data:`POOL_TYPES`): globalpool's :class:`GlobalPool` (every kind,
``lse`` included), :class:`GeM`, :class:`AttentionPool`, :class:`AdaptivePool` and
:class:`NiNHead` (whose output is the global average of its class maps), and torch's
``nn.AdaptiveAvgPool1/2/3d`` and ``nn.AdaptiveMaxPool1/2/3d``. A model with none of them
(after ``include``) is refused with a ``ValueError``: monitoring nothing is a mistake.

The statistics are computed on detached tensors and never change the forward's result or
gradient. To cost one cheap copy per call rather than a handful of reductions, a hook keeps a
copy of the call's pooled output (``N x C`` values for a global pool) on the module's device;
the copies are reduced together, and their few results moved to the CPU in one transfer, every
:data:`FLUSH_CALLS` calls or :data:`FLUSH_BYTES` bytes, when a view is read and when the block
exits. Memory stays bounded; nothing is kept after the flush, and an output larger than
:data:`FLUSH_BYTES` is reduced at once without a copy. A failure inside a hook never breaks the
forward: it is counted in ``errors`` (with the last message in ``error``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from globalpool.heads import TORCH_ADAPTIVE_POOLS, NiNHead
from globalpool.layers import AdaptivePool, AttentionPool, GeM, GlobalPool, LSEPool

#: Module types :func:`monitor` records.
POOL_TYPES: tuple[type[nn.Module], ...] = (
    GlobalPool,
    GeM,
    LSEPool,
    AttentionPool,
    AdaptivePool,
    NiNHead,
    *TORCH_ADAPTIVE_POOLS,
)
#: At most this many calls' pooled outputs are kept (as copies) before they are reduced ...
FLUSH_CALLS = 256
#: ... or this many bytes of them (4 MiB: few flushes, whose fixed cost of ~10 small ops dominates
#: below that; measured in benchmarks/results/monitor); a larger output is reduced at once and
#: not copied.
FLUSH_BYTES = 2**22

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
    return "avg" if "Avg" in type(module).__name__ else "max"


def size_of(t: torch.Tensor) -> int:
    """Bytes of ``t``'s elements."""
    return t.numel() * t.element_size()


def _dead_floor(module: nn.Module) -> float:
    """The largest pooled value of a dead channel: 0, or GeM's clamp floor ``eps`` (a channel
    whose inputs are all <= eps pools to eps; 0.1% above it for rounding)."""
    eps = None
    if isinstance(module, GeM):
        eps = module.eps
    elif isinstance(module, (GlobalPool, AdaptivePool)) and module.kind == "gem":
        eps = module.params.get("eps", 1e-6)
    return 0.0 if eps is None else float(eps) * 1.001


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
    floor: float = 0.0,
    fast: bool = True,
) -> tuple[Any, ...]:
    """Reductions of pooled outputs ``y`` of shape ``(N, C, *bins)`` (channels first).

    Returns ``(n, sum, sumsq, min, max, nan, inf, alive)`` over the finite values where
    ``valid`` (broadcastable to ``y``, True = counted) holds; ``alive`` (``(C,)``) is, per
    channel, the sum of its values above ``floor`` (NaN left out): 0 for a dead channel. Items
    are ints or tensors; sums are float64. With ``fast`` an all-finite ``y`` without ``valid``
    takes one pass per statistic (sum, sum of squares, min and max together, the alive sums),
    found from a finite sum (one sync); else the general path masks every statistic.

    >>> [float(v) for v in call_stats(torch.tensor([[1.0, -2.0], [3.0, float("nan")]]))[:7]]
    [3.0, 2.0, 14.0, -2.0, 3.0, 1.0, 0.0]
    """
    dims = [d for d in range(y.ndim) if d != 1]
    if y.numel() == 0:
        return 0, 0.0, 0.0, math.inf, -math.inf, 0, 0, None
    acc = _acc_dtype(y.device)
    if fast and valid is None:
        flat = y.reshape(-1)
        wide = flat.to(acc)
        s = wide.sum()
        if math.isfinite(float(s)):  # a finite sum: no NaN or inf anywhere
            lo, hi = torch.aminmax(wide)
            alive = F.threshold(y, floor, 0.0).sum(dims)  # positive terms: float32 will do
            return flat.numel(), s, torch.dot(wide, wide), lo, hi, 0, 0, alive
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
    alive = F.threshold(torch.where(seen, yd, 0.0), floor, 0.0).sum(dims)
    return ok.sum(), z.sum(), torch.dot(z, z), lowest, highest, nan.sum(), inf, alive


def attention_terms(
    scores: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
    """Per sample ``(W, WL, n)``: ``W = sum w``, ``WL = sum w log w`` over the real positions
    (``w = sigmoid(scores)``, scores ``(N, *S)``) and their number ``n``; the normalised entropy
    is ``(log W - WL / W) / log n`` (:func:`entropy_from_terms`).

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


# --- the record of one module ------------------------------------------------------------------


class _Record:
    """Running statistics of one module; per-call results wait in ``pending`` until a flush."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module
        self.calls = 0
        self.input_shape: torch.Size | None = None
        self.output_shape: torch.Size | None = None
        self.pending: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.pending_bytes = 0
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf
        self.nan = self.inf = self.empty = 0
        self.channels: int | None = None
        self.width_changed = False
        self.alive: torch.Tensor | None = None  # per channel: > 0 once a value was > floor
        self.scored: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.entropy_sum, self.entropy_count = 0.0, 0
        self.scores: torch.Tensor | None = None  # the scorer's output, until the pool's hook
        self.errors, self.error = 0, None
        self.p: Any = None
        self.floor = _dead_floor(module)
        self.tail: torch.Size | None = None  # output shape (less N) of the fast path
        self.row_bytes = 0
        self.rank = _SPATIAL_RANK.get(type(module))
        self.channels_last = getattr(module, "layout", "channels_first") == "channels_last"

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
        if mask is None and self.scores is None and shape[1:] == self.tail:
            # the common call: as the last one, nothing to reshape or check
            self.pending.append((y.detach().clone(), None))
            self.pending_bytes += self.row_bytes * shape[0]
            if len(self.pending) >= FLUSH_CALLS or self.pending_bytes >= FLUSH_BYTES:
                self.flush()
            return
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
        elif y.shape == shape and size_of(y) < FLUSH_BYTES:  # taken as it came: the next
            self.tail = shape[1:]  # call of this shape can skip the checks
            self.row_bytes = size_of(y) // max(shape[0], 1)
        valid = self._valid(mask, y) if isinstance(mask, torch.Tensor) else None
        if self.channels is None:
            self.channels = y.shape[1]
        elif y.shape[1] != self.channels:
            self.width_changed = True
        if self.pending and self.pending[0][0].shape[1:] != y.shape[1:]:
            self.flush()
        size = size_of(y)
        if size >= FLUSH_BYTES:  # a large output: reduced at once, nothing copied
            self._fold(call_stats(y, valid, floor=self.floor), valid)
        else:  # a copy: the caller may change the output in place
            self.pending.append((y.clone(), valid))
            self.pending_bytes += size
        if self.scores is not None:
            scores, self.scores = self.scores, None
            kept = mask.detach().clone() if isinstance(mask, torch.Tensor) else None
            self.scored.append((scores.clone(), kept))
        if len(self.pending) >= FLUSH_CALLS or self.pending_bytes >= FLUSH_BYTES:
            self.flush()

    def _valid(self, mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Where the output is counted: samples (bins) with a real position, ``(N, 1, ...)``."""
        if isinstance(self.module, AdaptivePool):
            from globalpool.functional import adaptive_pool

            m = mask.detach().unsqueeze(1).to(torch.float32)
            return adaptive_pool(m, self.module.output_size, "max") > 0  # (N, 1, *bins)
        real = mask.detach().reshape(mask.shape[0], -1).any(1)
        return real.reshape(-1, *([1] * (y.ndim - 1)))

    # -- folding ---------------------------------------------------------------------------------

    def flush(self) -> None:
        """Reduce the outputs kept since the last flush at once, fold them into the totals."""
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        if pending:
            y = torch.cat([p[0] for p in pending]) if len(pending) > 1 else pending[0][0]
            valid = None
            if any(v is not None for _, v in pending):
                valid = torch.cat([
                    (v if v is not None else torch.ones((), dtype=torch.bool, device=yi.device))
                    .expand(yi.shape[0], 1, *yi.shape[2:])
                    for yi, v in pending
                ])
            self._fold(call_stats(y, valid, floor=self.floor), valid)
        scored, self.scored = self.scored, []
        same = len({tuple(z.shape[1:]) for z, _ in scored}) == 1
        groups = [scored] if same else [[item] for item in scored]
        for group in groups if scored else []:
            z = torch.cat([t[0] for t in group])
            mask = None
            if any(m is not None for _, m in group):
                mask = torch.cat([m if m is not None else torch.ones_like(zi, dtype=torch.bool)
                                  for zi, m in group])
            h = entropy_from_terms(*attention_terms(z, mask))
            h = h[torch.isfinite(h)].cpu()
            self.entropy_sum += float(h.sum())
            self.entropy_count += int(h.numel())

    def _fold(self, stats: tuple[Any, ...], valid: torch.Tensor | None) -> None:
        """Chan et al.'s pairwise update of (count, mean, M2), in float64 on the CPU."""
        *cells, alive = stats
        if valid is not None:
            cells.append((~valid).sum())
        where = [i for i, v in enumerate(cells) if isinstance(v, torch.Tensor)]
        if where:  # one transfer to the CPU
            parts = [cells[i] for i in where]
            if any(t.dtype != torch.float64 for t in parts):
                parts = [t.double() for t in parts]
            moved = torch.stack(parts).cpu().tolist()
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
        if alive is not None and not self.width_changed:  # kept on the device until read
            self.alive = alive if self.alive is None else torch.maximum(self.alive, alive)

    def read_p(self) -> None:
        """GeM's ``p`` (or a learnable lse's temperature ``r``, kept in the same slot and
        reported as ``r``): a number, or mean/min/max when there is one per channel."""
        p = None
        if isinstance(self.module, GeM):
            p = self.module.p.detach()
        elif isinstance(self.module, LSEPool):
            p = self.module.r.detach()
        elif isinstance(self.module, GlobalPool) and self.module.kind == "gem":
            p = self.module.params.get("p", 3.0)
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
        self._handles: list[Any] = []

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
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()
        for record in self.records.values():
            record.scores = None
            _guard(record, record.read_p)
            _guard(record, record.flush)

    def _remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

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
                if isinstance(output, torch.Tensor):
                    record.scores = output.detach().squeeze(-1)

            self._handles.append(record.module.score.register_forward_hook(on_scores))

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
