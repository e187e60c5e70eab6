"""Run the benchmark: for every case, ceilings, then check-and-time every applicable method.

Per case (a shape in one layout, dtype and device):

1. make ``x`` (``randn``, seed 0) and the kinds' parameters: GeM's ``p`` is a 0-dim tensor that
   requires grad (as in the ``GeM`` module), ``lse`` uses ``r=1``, ``attention`` gets
   ``rand`` weights of shape ``(N, *S)`` that require grad;
2. time the ceilings ``x.sum()`` and ``empty_like(x).fill_(1.0)``;
3. for every method: build it, check it against the NumPy reference (a wrong result is
   ``FAILED``, an exception — e.g. a compile error or no fused kernel for this dtype — is
   ``ERROR``; neither is timed), then time its forward and its backward, each sample followed by
   one sample of the ceilings (see :mod:`globalpool.lab.bench.timing`);
4. time the ceilings again; the case's reported ceiling GB/s is the faster of the two runs.

With ``cache="cold"`` (the default) the caches are flushed before every timed sample, of the
methods and of the ceilings alike (:mod:`globalpool.lab.bench.cache`); ``"warm"`` leaves them as
the previous sample left them.

Ratios are ``median ceiling time / median method time`` (= GB/s ratio) over the ceiling samples
paired with the method's own samples: forward against ``x.sum()``, backward against
``empty_like(x).fill_(1.0)``. That backward ceiling allocates, like every backward that
returns a fresh gradient, so it includes the first-touch page faults of a new buffer (on a VM
they can cost more than the write itself); backward records also carry ``ratio_write``, against
``buf.fill_(1.0)`` into a buffer allocated once (the pure write bandwidth).

``torch._dynamo`` is reset at the start of every case, so every compiled method
is compiled once for its own shape; the first calls (compile included) are reported separately
as ``first_call_s`` and never timed.

>>> from globalpool.lab.bench.shapes import Case, Shape
>>> import torch
>>> case = Case(Shape("tiny", (2, 3, 4, 4)), "channels_first", torch.float32, "cpu")
>>> sorted(kind_params("gem", torch.zeros(2, 3, 4, 4), case))
['p']
"""

from __future__ import annotations

import gc
import os
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from globalpool.lab.bench.cache import cache_flusher
from globalpool.lab.bench.check import ReferenceCache, check_method
from globalpool.lab.bench.methods import (
    CEILING_LABELS,
    Method,
    ceiling_backward,
    ceiling_forward,
    ceiling_write,
)
from globalpool.lab.bench.shapes import Case, dtype_name
from globalpool.lab.bench.timing import Flush, Timing, time_backward, time_forward

Progress = Callable[[str], None]


def kind_params(kind: str, x: torch.Tensor, case: Case) -> dict[str, Any]:
    """The parameters every method of ``kind`` gets for ``x``."""
    if kind == "gem":
        return {"p": torch.tensor(3.0, device=x.device, requires_grad=True)}
    if kind == "lse":
        return {"r": 1.0}
    if kind == "attention":
        n, spatial = case.shape.dims[0], case.shape.dims[2:]
        g = torch.Generator(device=x.device).manual_seed(1)
        w = torch.rand((n, *spatial), generator=g, device=x.device, dtype=torch.float32)
        return {"weights": w.to(x.dtype).requires_grad_(True)}
    return {}


def out_width(kind: str) -> int:
    return 2 if kind == "catavgmax" else 1


def make_input(case: Case, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=case.device).manual_seed(seed)
    x = torch.randn(case.tensor_shape, generator=g, device=case.device, dtype=torch.float32)
    return x.to(case.dtype)


def reset_compiler() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    cfg = torch._dynamo.config
    # every kind of a case reuses the same compiled function body; let all of them specialise
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:400]


def _timing_entry(t: Timing, nbytes: int, direction: str) -> dict[str, Any]:
    """Throughput and ratios against the ceilings sampled alongside the method.

    Every ratio is stored with the medians it is computed from: ``ratio`` is
    ``ceiling_median_s / median_s`` (the paired ceiling's samples, not the case's separate
    ceiling runs), ``ratio_write`` is ``write_median_s / median_s``; the spread of each figure is
    its ``min_s`` .. ``max_s`` over the samples.

    >>> t = Timing(2e-3, 1e-3, 4e-3, 5, 1, {"forward": {"median_s": 1e-3, "min_s": 1e-3,
    ...                                                 "max_s": 2e-3}})
    >>> e = _timing_entry(t, 10**6, "forward")
    >>> e["ratio"] == e["ceiling_median_s"] / e["median_s"], e["ceiling_max_s"]
    (True, 0.002)
    """
    ceiling = t.refs[direction]
    entry = {
        **t.as_dict(),
        "gbps": t.gbps(nbytes),
        "ceiling_median_s": ceiling["median_s"],
        "ceiling_min_s": ceiling["min_s"],
        "ceiling_max_s": ceiling["max_s"],
        "ceiling_gbps": nbytes / ceiling["median_s"] / 1e9,
        "ratio": ceiling["median_s"] / t.median_s,
        # best sample against best sample: less sensitive to other processes on the machine
        "ratio_min": ceiling["min_s"] / t.min_s,
    }
    if "write" in t.refs:
        write = t.refs["write"]
        entry["write_median_s"] = write["median_s"]
        entry["write_min_s"] = write["min_s"]
        entry["write_max_s"] = write["max_s"]
        entry["ratio_write"] = write["median_s"] / t.median_s
    return entry


def run_method(
    method: Method,
    case: Case,
    x: torch.Tensor,
    params: dict[str, Any],
    grad_out: torch.Tensor,
    refs: ReferenceCache,
    *,
    repeats: int,
    warmup: int,
    budget_s: float | None,
    flush: Flush = None,
) -> dict[str, Any]:
    """Check then time one method; returns its result record (ratios added by the caller)."""
    entry: dict[str, Any] = {
        "id": method.id,
        "family": method.family,
        "kind": method.kind,
        "label": method.label(case),
        "status": "ok",
    }
    xg = x.detach().requires_grad_(True)
    try:
        fn = method.build(case)
        t0 = time.perf_counter()
        result = check_method(fn, method.kind, method.grad_rule, xg, params, grad_out, refs)
        entry["first_call_s"] = time.perf_counter() - t0
        entry["check"] = result.as_dict()
        if not result.ok:
            entry["status"] = "FAILED"
            entry["error"] = result.message
            return entry
        inputs = [xg] + [v for v in params.values() if isinstance(v, torch.Tensor)]
        kw = {
            "device": case.device,
            "repeats": repeats,
            "warmup": warmup,
            "budget_s": budget_s,
            "flush": flush,
        }
        buf = torch.empty_like(x)
        nbytes = case.input_bytes
        fwd = time_forward(
            lambda: fn(x, params), references={"forward": lambda: ceiling_forward(x)}, **kw
        )
        entry["forward"] = _timing_entry(fwd, nbytes, "forward")
        bwd = time_backward(
            lambda: fn(xg, params),
            inputs,
            grad_out,
            references={
                "backward": lambda: ceiling_backward(x),
                "write": lambda: ceiling_write(buf),
            },
            **kw,
        )
        entry["backward"] = _timing_entry(bwd, nbytes, "backward")
    except Exception as exc:  # a broken method is reported, never fatal
        entry["status"] = "ERROR"
        entry["error"] = _error_text(exc)
        entry["traceback"] = traceback.format_exc(limit=6)
        entry.pop("forward", None)
        entry.pop("backward", None)
    return entry


def _time_ceilings(
    x: torch.Tensor, case: Case, repeats: int, warmup: int, flush: Flush
) -> dict[str, Timing]:
    kw = {"device": case.device, "repeats": repeats, "warmup": warmup, "flush": flush}
    buf = torch.empty_like(x)
    return {
        "forward": time_forward(lambda: ceiling_forward(x), **kw),
        "backward": time_forward(lambda: ceiling_backward(x), **kw),
        "write": time_forward(lambda: ceiling_write(buf), **kw),
    }


def run_case(
    case: Case,
    methods: Sequence[Method],
    *,
    repeats: int = 10,
    warmup: int = 1,
    budget_s: float | None = 3.0,
    check_samples: int = 2,
    cache: str = "cold",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Benchmark every applicable method on one case; see the module docstring."""
    say = progress or (lambda text: None)
    methods = [m for m in methods if m.applies(case)]
    if any(m.family == "compile" for m in methods):
        reset_compiler()
    flush = cache_flusher(case.device, cache)
    x = make_input(case)
    nbytes = case.input_bytes
    say(f"{case.label}: ceilings")
    before = _time_ceilings(x, case, max(repeats, 5), warmup, flush)
    refs = ReferenceCache(case, x, check_samples)
    grads: dict[str, torch.Tensor] = {}
    params: dict[str, dict[str, Any]] = {}
    records = []
    for method in methods:
        say(f"{case.label}: {method.id}")
        kind = method.kind
        if kind not in params:
            params[kind] = kind_params(kind, x, case)
            g = torch.Generator(device=case.device).manual_seed(2)
            shape = (case.shape.dims[0], out_width(kind) * case.shape.dims[1])
            grads[kind] = torch.randn(shape, generator=g, device=case.device).to(case.dtype)
        records.append(
            run_method(
                method,
                case,
                x,
                params[kind],
                grads[kind],
                refs,
                repeats=repeats,
                warmup=warmup,
                budget_s=budget_s,
                flush=flush,
            )
        )
    after = _time_ceilings(x, case, max(repeats, 5), warmup, flush)
    ceiling = {d: min(before[d], after[d], key=lambda t: t.median_s) for d in before}
    del x, refs, params, grads, flush
    gc.collect()
    return {
        "device": case.device,
        "dtype": dtype_name(case.dtype),
        "layout": case.layout,
        "shape_name": case.shape.name,
        "shape": list(case.tensor_shape),
        "channels_first_shape": list(case.shape.dims),
        "spatial_rank": case.shape.rank,
        "input_bytes": nbytes,
        "cache": cache,
        # 1-minute load average when the case ended: other processes distort timings
        "load_average_1m": os.getloadavg()[0],
        "ceiling": {
            d: {
                "label": CEILING_LABELS[d],
                **ceiling[d].as_dict(),
                "gbps": ceiling[d].gbps(nbytes),
                "runs_median_s": [before[d].median_s, after[d].median_s],
            }
            for d in ceiling
        },
        "methods": records,
    }


def count_steps(cases: Sequence[Case], methods: Sequence[Method]) -> int:
    """Progress steps of :func:`run_all`: one per applicable method plus the ceilings, per case."""
    return sum(1 + sum(m.applies(c) for m in methods) for c in cases)


def run_all(
    cases: Sequence[Case],
    methods: Sequence[Method],
    *,
    progress: Progress | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`run_case` for every case, in order."""
    return [run_case(c, methods, progress=progress, **kwargs) for c in cases]
