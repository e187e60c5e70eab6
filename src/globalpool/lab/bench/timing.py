"""Median-of-repeats timing with warm-up, forward and backward measured separately.

Forward: ``fn()`` is timed under ``torch.no_grad()`` (the inference forward: no graph, nothing
saved). On CUDA each sample runs ``fn`` ``number`` times between two ``torch.cuda.synchronize()``
calls, ``number`` chosen so that one sample lasts at least ``min_sample_s``; on CPU a
DRAM-sized pass already lasts milliseconds, so ``number`` is 1 there.

Backward: before every sample an *untimed* forward with autograd on builds a fresh graph; the
timed region is only ``torch.autograd.grad(y, inputs, g)``. ``autograd.grad`` returns fresh
gradient tensors instead of accumulating into ``.grad`` (an accumulation would add a read and a
write of the input's size), and building a new graph each time avoids ``retain_graph=True``,
which compiled graphs and custom ops need not support. The freeing of the returned gradient
happens after the clock stops, as the freeing of the ceiling's ``empty_like(x).fill_(1.0)``.

Paired ceilings: ``references`` (name -> callable) are timed in the same loop, one sample of each
right after every sample of the method, so a ratio compares measurements taken seconds apart on a
machine whose memory bandwidth drifts (a shared VM host can move it by 2x between cases).

Cache state: with ``flush`` (see :mod:`globalpool.lab.bench.cache`) the caches are evicted before
every sample of the method and of each reference, outside the clock; without it each sample
finds the caches as the previous one left them.

The number of samples is ``repeats``, cut to what fits into ``budget_s`` (never below
``min_repeats``; the untimed forward and the reference samples count against the budget); the
median is reported.

>>> t = time_forward(lambda: sum(range(100)), device="cpu", repeats=5, warmup=1,
...                  references={"ref": lambda: sum(range(10))})
>>> t.repeats, t.min_s <= t.median_s <= t.max_s, sorted(t.refs["ref"])
(5, True, ['max_s', 'median_s', 'min_s'])
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

References = Mapping[str, Callable[[], Any]]


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median, min and max over ``repeats`` samples of ``number`` calls.

    ``refs`` holds the median, min and max of each paired reference, sampled in the same loop:
    a ratio to a reference is ``refs[name]["median_s"] / median_s``.
    """

    median_s: float
    min_s: float
    max_s: float
    repeats: int
    number: int
    refs: dict[str, dict[str, float]] = field(default_factory=dict)

    def gbps(self, nbytes: int) -> float:
        """Throughput in GB/s (1e9 bytes) for ``nbytes`` moved per call."""
        return nbytes / self.median_s / 1e9

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _summary(
    samples: list[float], number: int, refs: dict[str, list[float]] | None = None
) -> Timing:
    per_call = [s / number for s in samples]
    return Timing(
        median_s=statistics.median(per_call),
        min_s=min(per_call),
        max_s=max(per_call),
        repeats=len(per_call),
        number=number,
        refs={
            name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)}
            for name, v in (refs or {}).items()
        },
    )


def _n_repeats(estimate_s: float, repeats: int, min_repeats: int, budget_s: float | None) -> int:
    if budget_s is None or estimate_s <= 0:
        return repeats
    return max(min(repeats, min_repeats), min(repeats, math.floor(budget_s / estimate_s)))


Flush = Callable[[], None] | None


def _timed(fn: Callable[[], Any], number: int, device: str, flush: Flush = None) -> float:
    """Seconds for ``number`` calls of ``fn`` (after ``flush``, untimed); results are freed
    after the clock stops."""
    if flush is not None:
        flush()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(number):
        out = fn()
    synchronize(device)
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


def _calls_per_sample(estimate: float, device: str, min_sample_s: float) -> int:
    if str(device).startswith("cuda") and estimate < min_sample_s:
        return max(1, math.ceil(min_sample_s / max(estimate, 1e-7)))
    return 1


class _Paired:
    """Reference callables sampled once after every method sample, each with its own count."""

    def __init__(
        self, references: References | None, device: str, min_sample_s: float, flush: Flush
    ) -> None:
        self.device = device
        self.flush = flush
        self.refs = dict(references or {})
        self.number = {
            name: _calls_per_sample(
                min(_timed(f, 1, device, flush) for _ in range(2)), device, min_sample_s
            )
            for name, f in self.refs.items()
        }
        self.samples: dict[str, list[float]] = {name: [] for name in self.refs}

    def sample(self) -> float:
        """Take one sample of every reference; returns the wall time spent."""
        start = time.perf_counter()
        for name, f in self.refs.items():
            n = self.number[name]
            self.samples[name].append(_timed(f, n, self.device, self.flush) / n)
        return time.perf_counter() - start


def time_forward(
    fn: Callable[[], Any],
    *,
    device: str,
    repeats: int = 10,
    warmup: int = 1,
    min_repeats: int = 3,
    budget_s: float | None = None,
    min_sample_s: float = 1e-3,
    references: References | None = None,
    flush: Flush = None,
) -> Timing:
    """Time ``fn()`` under ``torch.no_grad()``; see the module docstring."""
    with torch.no_grad():
        estimate = min(_timed(fn, 1, device, flush) for _ in range(max(warmup, 1)))
        number = _calls_per_sample(estimate, device, min_sample_s)
        paired = _Paired(references, device, min_sample_s, flush)
        ref_cost = paired.sample()
        paired.samples = {name: [] for name in paired.refs}
        n = _n_repeats(estimate * number + ref_cost, repeats, min_repeats, budget_s)
        samples = []
        for _ in range(n):
            samples.append(_timed(fn, number, device, flush))
            paired.sample()
    return _summary(samples, number, paired.samples)


def time_backward(
    forward: Callable[[], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_out: torch.Tensor,
    *,
    device: str,
    repeats: int = 10,
    warmup: int = 1,
    min_repeats: int = 3,
    budget_s: float | None = None,
    min_sample_s: float = 1e-3,
    references: References | None = None,
    flush: Flush = None,
) -> Timing:
    """Time ``torch.autograd.grad(forward(), inputs, grad_out)``, the forward untimed.

    ``grad_out`` is reshaped to the output's shape (same number of elements). ``references``
    are timed under ``no_grad`` after every sample.
    """
    inputs = list(inputs)

    def sample() -> tuple[float, float]:
        start = time.perf_counter()
        with torch.enable_grad():
            y = forward()
        g = grad_out.reshape(y.shape)
        if flush is not None:
            flush()
        synchronize(device)
        t0 = time.perf_counter()
        grads = torch.autograd.grad(y, inputs, g, allow_unused=True)
        synchronize(device)
        t1 = time.perf_counter()
        del grads, y
        return t1 - t0, time.perf_counter() - start

    estimate = min(sample()[1] for _ in range(max(warmup, 1)))
    with torch.no_grad():
        paired = _Paired(references, device, min_sample_s, flush)
        ref_cost = paired.sample()
        paired.samples = {name: [] for name in paired.refs}
    n = _n_repeats(estimate + ref_cost, repeats, min_repeats, budget_s)
    samples = []
    for _ in range(n):
        samples.append(sample()[0])
        with torch.no_grad():
            paired.sample()
    return _summary(samples, 1, paired.samples)
