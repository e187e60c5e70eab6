"""Check and time the Triton backend of globalpool on a CUDA GPU, in one run of a few minutes.

    python benchmarks/gpu_check.py OUT_DIR [--workers 8] [--budget 280] [--quick]

1. Correctness: every kind x layout x dtype (float16, bfloat16, float32, float64), with a mask
   that has NaN at padded positions and an all-padded sample, with and without a forced split of
   L, plus tie-heavy integer inputs: forward, grad x, grad p (gem) and grad weights (attention)
   of ``kernels/cuda_triton.py`` against a float64 torch composition differentiated by autograd.
   These cases run in a pool of worker processes, which also compiles every kernel variant the
   timing needs into Triton's on-disk cache, so compilation runs in parallel.
2. Timing (``triton.testing.do_bench``, median, L2 flushed between runs): forward and backward
   of each kind against ``x.sum()`` (the forward ceiling: one read of x) and ``fill_`` of an
   x-sized tensor (the backward ceiling: one write), against the composed torch op (float32
   accumulation) and (float32 inputs, unless ``--no-compile``) its ``torch.compile``, forward
   and backward, on (32, 2048, 7, 7), (32, 2048, 14, 14),
   (8, 64, 224, 224) and tokens (32, 196, 768), both layouts, float32 and bfloat16.
3. If time is left: a sweep of the tile size for a few cases, to tune ``cuda_triton._TILE``.

Writes ``gpu_check.json`` and ``gpu_check.md`` to OUT_DIR; exits 1 if a correctness case fails.
Ratios are measured in the same run; absolute times are for the GPU named in the report.

>>> 1 + 1  # the script needs a GPU; see the usage line above
2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from types import ModuleType

import torch

KINDS = ("avg", "max", "avgmax", "catavgmax", "gem", "lse", "attention")
MAX_KINDS = ("max", "avgmax", "catavgmax")
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
TOL = {"float64": 1e-9, "float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
PARAMS = {"p": 2.5, "eps": 1e-6, "r": 1.7}
# (name, N, C, L) as (N, C, *S) images / (N, L, C) tokens, flattened to one spatial dim
SHAPES = [
    ("resnet50-head-7x7", 32, 2048, 49),
    ("resnet50-head-14x14", 32, 2048, 196),
    ("early-stage-224x224", 8, 64, 224 * 224),
    ("tokens-196x768", 32, 768, 196),
]
TIMING_DTYPES = ("float32", "bfloat16")


def load_backend() -> ModuleType:
    """globalpool.kernels.cuda_triton, or the file alone if the package's deps are missing."""
    src = Path(__file__).resolve().parents[1] / "src"
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    try:
        from globalpool.kernels import cuda_triton
    except Exception:  # noqa: BLE001 - the package __init__ may need optional dependencies
        path = src / "globalpool" / "kernels" / "cuda_triton.py"
        spec = importlib.util.spec_from_file_location("gp_cuda_triton", path)
        cuda_triton = importlib.util.module_from_spec(spec)
        sys.modules["gp_cuda_triton"] = cuda_triton
        spec.loader.exec_module(cuda_triton)
    return cuda_triton


# --------------------------------------------------------------------------------------------
# torch composition: the oracle (float64) and the composed baseline (float32 accumulation)


def composed(x, channels_last, kind, mask, p, eps, r, w, acc=torch.float32):
    """Pool x (N, C, L) / (N, L, C) over L with torch ops in ``acc``; returns (N, C or 2C)."""
    ldim = 1 if channels_last else 2
    xa = x.to(acc)
    if mask is None:
        if kind == "avg":
            return xa.mean(ldim)
        if kind == "max":
            return xa.amax(ldim)
        if kind == "avgmax":
            return (xa.mean(ldim) + xa.amax(ldim)) / 2
        if kind == "catavgmax":
            return torch.cat([xa.mean(ldim), xa.amax(ldim)], 1)
        if kind == "gem":
            return xa.clamp(min=eps).pow(p).mean(ldim).pow(1.0 / p)
        if kind == "lse":
            return (torch.logsumexp(r * xa, ldim) - math.log(xa.shape[ldim])) / r
        wa = w.to(acc).unsqueeze(-1 if channels_last else 1)
        sw = wa.sum(ldim)
        return torch.where(sw > 0, (xa * wa).sum(ldim) / torch.where(sw > 0, sw, 1.0), 0.0)
    m = mask.unsqueeze(-1 if channels_last else 1)
    cnt = mask.sum(1, keepdim=True).to(acc)
    nonempty = cnt > 0
    safe = torch.where(nonempty, cnt, 1.0)
    mean = torch.where(m, xa, 0.0).sum(ldim) / safe
    if kind == "avg":
        return mean
    top = torch.where(nonempty, torch.where(m, xa, -torch.inf).amax(ldim), 0.0)
    if kind == "max":
        return top
    if kind == "avgmax":
        return (mean + top) / 2
    if kind == "catavgmax":
        return torch.cat([mean, top], 1)
    if kind == "gem":
        z = torch.where(m, xa, 1.0).clamp(min=eps).pow(p)
        s = torch.where(m, z, 0.0).sum(ldim) / safe
        return torch.where(nonempty, torch.where(nonempty, s, 1.0).pow(1.0 / p), 0.0)
    if kind == "lse":
        fill = torch.where(nonempty.unsqueeze(-1 if channels_last else 1), -torch.inf, 0.0)
        xm = torch.where(m, xa, fill.to(acc))
        y = (torch.logsumexp(r * xm, ldim) - torch.log(safe)) / r
        return torch.where(nonempty, y, 0.0)
    wm = torch.where(mask, w.to(acc), 0.0)
    sw = wm.sum(1, keepdim=True)
    y = (torch.where(m, xa, 0.0) * wm.unsqueeze(-1 if channels_last else 1)).sum(ldim)
    return torch.where(sw > 0, y / torch.where(sw > 0, sw, 1.0), 0.0)


def oracle(x, channels_last, kind, mask, w, g, p, eps, r):
    """float64 forward and autograd gradients (x, p, weights) of the composition."""
    xd = x.detach().double().requires_grad_(True)
    pd = torch.tensor(float(p), dtype=torch.float64, device=x.device, requires_grad=True)
    wd = None if w is None else w.detach().double().requires_grad_(True)
    out = composed(xd, channels_last, kind, mask, pd, eps, r, wd, acc=torch.float64)
    inputs = [xd] + ([pd] if kind == "gem" else []) + ([wd] if kind == "attention" else [])
    grads = torch.autograd.grad(out, inputs, g.double(), allow_unused=True)
    gx = grads[0]
    gp = grads[1] if kind == "gem" else None
    gw = grads[-1] if kind == "attention" else None
    return out.detach(), gx, gp, gw


# --------------------------------------------------------------------------------------------
# correctness (runs in worker processes)


def make_inputs(shape, channels_last, dtype, masked, integer, seed, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    n, c, length = shape
    if integer:
        x = torch.randint(0, 3, (n, c, length), generator=gen, device=device).double()
    else:
        x = torch.randn(n, c, length, generator=gen, device=device, dtype=torch.float64)
    w = torch.rand(n, length, generator=gen, device=device, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(n, length, generator=gen, device=device) < 0.7
        mask[0, 0] = True
        if n > 1:
            mask[1] = False
        x = x.masked_fill(~mask[:, None, :], float("nan"))
        w = w.masked_fill(~mask, float("nan"))
    if channels_last:
        x = x.transpose(1, 2)
    return x.to(dtype).contiguous(), mask, w.to(dtype).contiguous()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    bad = torch.isnan(a) != torch.isnan(b)
    if bool(bad.any()):
        return float("inf")
    a, b = torch.nan_to_num(a), torch.nan_to_num(b)
    return float((a - b).abs().max() / (1.0 + b.abs().max()))


def _use_device(device: str) -> None:
    if device == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)
    else:  # --smoke: Triton's interpreter on CPU tensors
        os.environ["TRITON_INTERPRET"] = "1"


def correctness_job(dtype_name: str, kind: str, channels_last: bool, device: str) -> list[dict]:
    ct = load_backend()
    _use_device(device)
    dtype = DTYPES[dtype_name]
    tol = TOL[dtype_name]
    cases = [
        ("masked", (4, 64, 196), True, False, None),
        ("masked-split3", (4, 64, 196), True, False, 3),
        ("unmasked", (8, 256, 49), False, False, None),
        ("long-L-masked", (2, 8, 5000), True, False, None),
        ("ties-masked", (4, 16, 300), True, True, None),
        ("ties-split4", (4, 16, 300), True, True, 4),
    ]
    if dtype_name in ("float16", "float64"):  # fewer variants for the less common dtypes
        cases = [cs for cs in cases if cs[4] is None]
    if kind == "gem":  # p as a device tensor, read by the kernels
        cases.append(("masked-split2-tensor-p", (4, 64, 196), True, False, 2))
    rows = []
    for name, shape, masked, integer, split in cases:
        row = {"dtype": dtype_name, "kind": kind, "channels_last": channels_last, "case": name,
               "shape": list(shape)}  # fmt: skip
        try:
            x, mask, w = make_inputs(
                shape, channels_last, dtype, masked, integer, seed=len(rows), device=device
            )
            p = PARAMS["p"]
            if name.endswith("tensor-p"):
                p = torch.tensor(p, device=device)
            args = (channels_last, kind, mask, p, PARAMS["eps"], PARAMS["r"], w)
            out, aux = ct._forward(x, *args, split=split)
            g = torch.randn(out.shape, device=device).to(dtype)
            gx, gp, gw = ct._backward(g, x, out, aux, *args, split=split)
            ro, rgx, rgp, rgw = oracle(x, channels_last, kind, mask,
                                       w if kind == "attention" else None, g,
                                       PARAMS["p"], PARAMS["eps"], PARAMS["r"])  # fmt: skip
            errs = {"out": rel_err(out, ro), "grad_x": rel_err(gx, rgx)}
            if kind == "gem":
                errs["grad_p"] = rel_err(gp, rgp)
            if kind == "attention":
                errs["grad_w"] = rel_err(gw, rgw)
            if mask is not None:
                pad = (~mask).unsqueeze(-1 if channels_last else 1).expand_as(gx)
                errs["pad_nonzero"] = float(bool((gx[pad] != 0).any()))
            row["errors"] = errs
            # grad_p is a float32 scalar whatever the dtype
            row["ok"] = all(
                v <= (max(10 * tol, 1e-6) if k == "grad_p" else tol) for k, v in errs.items()
            )
        except Exception as err:  # noqa: BLE001 - report and go on
            row["ok"] = False
            row["error"] = f"{type(err).__name__}: {err}"[:2000]
            row["traceback"] = traceback.format_exc()[-3000:]
        rows.append(row)
    return rows


def warmup_job(
    dtype_name: str, kind: str, channels_last: bool, shape: tuple, device: str, tune=None
) -> str:
    """Compile (into the on-disk cache) the variants the timing of this case will launch;
    ``tune`` = (tile, warps) for the sweep."""
    ct = load_backend()
    _use_device(device)
    if tune is not None:
        ct._TILE, ct._WARPS = tune
    _, n, c, length = shape
    dims = (n, length, c) if channels_last else (n, c, length)
    x = torch.randn(dims, device=device).to(DTYPES[dtype_name])
    w = torch.rand(n, length, device=device).to(x.dtype)
    out, aux = ct.forward(x, channels_last, kind, None, 3.0, 1e-6, 1.0, w)
    if tune is None:  # the sweep times the forward only
        g = torch.ones_like(out)
        ct.backward(g, x, out, aux, channels_last, kind, None, 3.0, 1e-6, 1.0, w)
        if kind == "attention":
            ct.backward(g, x, out, aux, channels_last, kind, None, 3.0, 1e-6, 1.0, w,
                        need_weights=False)  # fmt: skip
    if device == "cuda":
        torch.cuda.synchronize()
    return f"{dtype_name} {kind} {'cl' if channels_last else 'cf'} {shape[0]}"


# --------------------------------------------------------------------------------------------
# timing (main process)


SMOKE = False  # --smoke: CPU + interpreter, wall-clock timing of tiny shapes (tests the script)


def bench(fn) -> float:
    """Median milliseconds per call."""
    if SMOKE:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[1]
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def compiled_composition(cache: dict, kind: str, channels_last: bool):
    """``torch.compile`` of the torch composition of ``kind`` (dynamic shapes: one compile per
    kind and layout serves every shape), made on first use."""
    key = (kind, channels_last)
    if key not in cache:
        def composition(x, w):
            return composed(x, channels_last, kind, None, 3.0, 1e-6, 1.0, w)

        # one code object for every kind and layout: room for all their guarded variants
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # the backward is timed by repeating it on one graph (retain_graph=True), which a
        # compiled backward that donates its saved buffers refuses
        torch._functorch.config.donated_buffer = False
        cache[key] = torch.compile(composition, dynamic=True)
    return cache[key]


def _time_compiled(row, compiled, kind, channels_last, x, w, gy) -> None:
    """Adds ``torch.compile``'s forward and backward times (and our speed-ups over them)."""
    fn = compiled_composition(compiled, kind, channels_last)
    fn(x, w)  # compiles (not timed)
    row["compile_fwd_ms"] = bench(lambda: fn(x, w))
    xc = x.detach().requires_grad_(True)
    yc = fn(xc, w)
    row["compile_bwd_ms"] = bench(
        lambda: torch.autograd.grad(yc, xc, gy.to(yc.dtype), retain_graph=True)
    )
    row["fwd_speedup_vs_compile"] = row["compile_fwd_ms"] / row["fwd_ms"]
    row["bwd_speedup_vs_compile"] = row["compile_bwd_ms"] / row["bwd_ms"]


def time_case(ct, shape, channels_last, dtype_name, device="cuda", compiled=None) -> list[dict]:
    """Times every kind on one shape, layout and dtype; with ``compiled`` (a dict, the cache of
    :func:`compiled_composition`) also ``torch.compile`` of the composition, forward and
    backward."""
    name, n, c, length = shape
    dtype = DTYPES[dtype_name]
    dims = (n, length, c) if channels_last else (n, c, length)
    x = torch.randn(dims, device=device).to(dtype)
    w = torch.rand(n, length, device=device).to(dtype)
    buf = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    t_sum = bench(lambda: x.sum())
    t_fill = bench(lambda: buf.fill_(1.0))
    base = {"shape": name, "dims": list(dims), "layout": "channels_last" if channels_last else
            "channels_first", "dtype": dtype_name, "bytes": nbytes, "sum_ms": t_sum,
            "fill_ms": t_fill}  # fmt: skip
    rows = []
    for kind in KINDS:
        row = dict(base, kind=kind)
        p = dict(p=3.0, eps=1e-6, r=1.0)
        try:
            out, aux = ct.forward(x, channels_last, kind, None, p["p"], p["eps"], p["r"], w)
            g = torch.randn_like(out)
            ref = composed(x, channels_last, kind, None, p["p"], p["eps"], p["r"], w)
            row["check_err"] = rel_err(out, ref)
            row["fwd_ms"] = bench(
                lambda kind=kind: ct.forward(x, channels_last, kind, None, 3.0, 1e-6, 1.0, w)
            )
            row["bwd_ms"] = bench(
                lambda kind=kind, out=out, aux=aux, g=g: ct.backward(
                    g, x, out, aux, channels_last, kind, None, 3.0, 1e-6, 1.0, w
                )
            )
            if kind == "attention":
                row["bwd_no_grad_w_ms"] = bench(
                    lambda out=out, g=g: ct.backward(
                        g, x, out, None, channels_last, "attention", None, 3.0, 1e-6, 1.0, w,
                        need_weights=False,
                    )
                )  # fmt: skip
            row["composed_fwd_ms"] = bench(
                lambda kind=kind: composed(x, channels_last, kind, None, 3.0, 1e-6, 1.0, w)
            )
            xg = x.detach().requires_grad_(True)
            y = composed(xg, channels_last, kind, None, 3.0, 1e-6, 1.0, w).to(x.dtype)
            gy = torch.randn_like(y)
            row["composed_bwd_ms"] = bench(
                lambda y=y, xg=xg, gy=gy: torch.autograd.grad(y, xg, gy, retain_graph=True)
            )
            row["fwd_vs_sum"] = t_sum / row["fwd_ms"]
            row["bwd_vs_fill"] = t_fill / row["bwd_ms"]
            row["fwd_speedup_vs_composed"] = row["composed_fwd_ms"] / row["fwd_ms"]
            row["bwd_speedup_vs_composed"] = row["composed_bwd_ms"] / row["bwd_ms"]
            row["fwd_GBps"] = nbytes / row["fwd_ms"] / 1e6
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {err}"[:2000]
        if compiled is not None and "fwd_GBps" in row:
            try:
                _time_compiled(row, compiled, kind, channels_last, x, w, gy)
            except Exception as err:  # noqa: BLE001
                row["compile_error"] = f"{type(err).__name__}: {err}"[:2000]
        rows.append(row)
    return rows


SWEEP_TUNES = [(tile, warps) for tile in (1024, 2048, 4096, 8192) for warps in (4, 8)]


def sweep_cases(shapes) -> list[tuple]:
    """(shape, channels_last, kind) swept over SWEEP_TUNES, float32 forward."""
    return [
        (s, cl, kind)
        for s in shapes
        for cl in ((False, True) if s[3] < 1000 else (False,))
        for kind in ("avg", "max", "gem")
    ]


def tile_sweep(ct, shapes, deadline: float, device: str = "cuda") -> list[dict]:
    rows = []
    default = (ct._TILE, ct._WARPS)
    try:
        for shape, cl, kind in sweep_cases(shapes):
            name, n, c, length = shape
            x = torch.randn((n, length, c) if cl else (n, c, length), device=device)
            t_sum = bench(lambda x=x: x.sum())
            for tile, warps in SWEEP_TUNES:
                if time.time() > deadline:
                    return rows
                ct._TILE, ct._WARPS = tile, warps

                def fwd(x=x, cl=cl, kind=kind):
                    return ct.forward(x, cl, kind, None, 3.0, 1e-6, 1.0, None)

                t = bench(fwd)
                cfg = ct._config(n, c, length, cl, 4, ct._sm_count(x))
                rows.append(
                    {"shape": name, "channels_last": cl, "kind": kind, "tile": tile,
                     "warps": warps, "config": cfg.__dict__, "fwd_ms": t, "fwd_vs_sum": t_sum / t}
                )  # fmt: skip
    finally:
        ct._TILE, ct._WARPS = default
    return rows


# --------------------------------------------------------------------------------------------
# report


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# globalpool Triton backend: GPU check",
        "",
        f"Device: **{env['device']}** ({env['sm_count']} SMs), torch {env['torch']}, "
        f"triton {env['triton']}, CUDA {env['cuda']}. Total run {report['elapsed_s']:.0f} s.",
        "",
        "## Correctness against a float64 torch composition (autograd)",
        "",
    ]
    corr = report["correctness"]
    failed = [r for r in corr if not r.get("ok")]
    lines.append(f"{len(corr) - len(failed)} / {len(corr)} cases pass "
                 "(kinds x layouts x dtypes x {masked + NaN padding + empty sample, forced split, "
                 "unmasked, long L, ties}).")  # fmt: skip
    lines += ["", "| dtype | worst relative error (out, grad_x, grad_p, grad_w) |", "|---|---|"]
    for dt in DTYPES:
        worst = {}
        for r in corr:
            if r["dtype"] == dt and "errors" in r:
                for k, v in r["errors"].items():
                    worst[k] = max(worst.get(k, 0.0), v)
        lines.append(f"| {dt} | " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + " |")
    if failed:
        lines += ["", "### Failures", ""]
        for r in failed:
            what = r.get("error") or r.get("errors")
            lines.append(f"- {r['dtype']} {r['kind']} cl={r['channels_last']} {r['case']}: {what}")
    lines += [
        "",
        "## Timing (median, L2 flushed; ratios measured in the same run)",
        "",
        "`fwd/sum` = time of `x.sum()` / time of our forward (target >= 0.9); `bwd/fill` = time "
        "of an x-sized `fill_` / our backward; `x composed` = speed-up over the torch composition "
        "(float32 accumulation); `x compile` = speed-up over `torch.compile` of that composition "
        "(float32 inputs; n/a for the others).",
        "",
        "| shape | layout | dtype | kind | fwd us | fwd GB/s | fwd/sum | bwd us | bwd/fill "
        "| fwd x composed | bwd x composed | fwd x compile | bwd x compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["timing"]:
        if "fwd_ms" not in r:
            lines.append(f"| {r['shape']} | {r['layout']} | {r['dtype']} | {r['kind']} | "
                         f"error: {r.get('error', '?')} |||||||")  # fmt: skip
            continue
        nw = ""
        if "bwd_no_grad_w_ms" in r:
            nw = f" ({r['bwd_no_grad_w_ms'] * 1e3:.1f} w/o grad_w)"
        lines.append(
            f"| {r['shape']} | {r['layout']} | {r['dtype']} | {r['kind']} | "
            f"{r['fwd_ms'] * 1e3:.1f} | {r['fwd_GBps']:.0f} | {r['fwd_vs_sum']:.2f} | "
            f"{r['bwd_ms'] * 1e3:.1f}{nw} | {r['bwd_vs_fill']:.2f} | "
            f"{r['fwd_speedup_vs_composed']:.2f} | {r['bwd_speedup_vs_composed']:.2f} | "
            + (f"{r['fwd_speedup_vs_compile']:.2f} | {r['bwd_speedup_vs_compile']:.2f} |"
               if "fwd_speedup_vs_compile" in r else "n/a | n/a |")
        )
    for r in report["timing"]:
        if "compile_error" in r:
            lines.append(f"\n`torch.compile` failed on {r['shape']} {r['layout']} {r['dtype']} "
                         f"{r['kind']}: {r['compile_error'][:300]}")  # fmt: skip
    ceil = {}
    for r in report["timing"]:
        ceil[(r["shape"], r["layout"], r["dtype"])] = (r["sum_ms"], r["fill_ms"], r["bytes"])
    lines += ["", "Ceilings:", "", "| shape | layout | dtype | sum us | sum GB/s | fill us |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for (s, lay, dt), (ts, tf, nb) in ceil.items():
        lines.append(f"| {s} | {lay} | {dt} | {ts * 1e3:.1f} | {nb / ts / 1e6:.0f} | "
                     f"{tf * 1e3:.1f} |")  # fmt: skip
    timed = [r for r in report["timing"] if "fwd_vs_sum" in r]
    if timed:
        hit = sum(r["fwd_vs_sum"] >= 0.9 for r in timed)
        lines += ["", f"Forward >= 0.9x `x.sum()`: {hit} / {len(timed)} cases."]
    if report.get("tile_sweep"):
        lines += [
            "",
            "## Tile sweep (forward, float32)",
            "",
            "| shape | layout | kind | tile | warps | fwd us | fwd/sum |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["tile_sweep"]:
            lay = "cl" if r["channels_last"] else "cf"
            lines.append(f"| {r['shape']} | {lay} | {r['kind']} | {r['tile']} | {r['warps']} | "
                         f"{r['fwd_ms'] * 1e3:.1f} | {r['fwd_vs_sum']:.2f} |")  # fmt: skip
    if report.get("skipped"):
        lines += ["", "Skipped for time: " + ", ".join(report["skipped"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--budget", type=float, default=280.0, help="seconds for the whole run")
    ap.add_argument("--quick", action="store_true", help="float32 only, first two shapes")
    ap.add_argument("--no-compile", action="store_true",
                    help="leave out torch.compile of the composition (float32 cases)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="no GPU: Triton's interpreter on CPU with tiny shapes (checks this script only)",
    )
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.smoke
    device = "cpu" if args.smoke else "cuda"
    start = time.time()
    deadline = start + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device (use --smoke to check the script on CPU)", file=sys.stderr)
        return 2
    _use_device(device)
    ct = load_backend()
    import triton

    if args.smoke:
        name, sms = "CPU (Triton interpreter, --smoke: timings meaningless)", 0
    else:
        props = torch.cuda.get_device_properties(0)
        name, sms = props.name, props.multi_processor_count
    report = {
        "environment": {
            "device": name,
            "sm_count": sms,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "correctness": [],
        "timing": [],
        "tile_sweep": [],
        "skipped": [],
    }
    shapes = SHAPES[:2] if args.quick else SHAPES
    if args.smoke:
        shapes = [("tiny-3x3", 2, 16, 9), ("tiny-tokens", 2, 8, 40)]
    sweep_shapes = shapes[:1] if args.smoke else [SHAPES[0], SHAPES[2]]
    tdtypes = ("float32",) if args.quick else TIMING_DTYPES
    out_json = args.out / "gpu_check.json"

    def save() -> None:
        report["elapsed_s"] = time.time() - start
        out_json.write_text(json.dumps(report, indent=1))
        (args.out / "gpu_check.md").write_text(markdown(report))

    # 1. correctness + compile warm-up in parallel worker processes
    ctx = __import__("multiprocessing").get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        futs = {}
        for dt in DTYPES:
            for kind in KINDS:
                for cl in (False, True):
                    futs[pool.submit(correctness_job, dt, kind, cl, device)] = "correctness"
        for dt in tdtypes:
            for kind in KINDS:
                for cl in (False, True):
                    for shape in shapes:
                        futs[pool.submit(warmup_job, dt, kind, cl, shape, device)] = "warmup"
        for shape, cl, kind in sweep_cases(sweep_shapes):
            for tune in SWEEP_TUNES:
                fut = pool.submit(warmup_job, "float32", kind, cl, shape, device, tune)
                futs[fut] = "warmup"
        for fut in as_completed(futs):
            try:
                res = fut.result()
            except Exception as err:  # noqa: BLE001
                report["correctness"].append({"ok": False, "dtype": "?", "kind": futs[fut],
                                              "channels_last": None, "case": "worker",
                                              "error": f"{type(err).__name__}: {err}"})  # fmt: skip
                continue
            if futs[fut] == "correctness":
                report["correctness"].extend(res)
    n_bad = sum(not r.get("ok") for r in report["correctness"])
    print(f"correctness: {len(report['correctness']) - n_bad} / {len(report['correctness'])} ok "
          f"({time.time() - start:.0f} s)", flush=True)  # fmt: skip
    save()

    # 2. timing (torch.compile of the composition beside ours, float32: one compile per kind
    # and layout, dynamic shapes)
    compiled: dict = {}
    for shape in shapes:
        for cl in (False, True):
            for dt in tdtypes:
                tag = f"{shape[0]} {'cl' if cl else 'cf'} {dt}"
                if time.time() > deadline - 20:
                    report["skipped"].append(tag)
                    continue
                with_compile = None if args.no_compile or dt != "float32" else compiled
                report["timing"].extend(time_case(ct, shape, cl, dt, device, with_compile))
                print(f"timed {tag} ({time.time() - start:.0f} s)", flush=True)
                save()

    # 3. tile sweep with what is left
    if time.time() < deadline - 30:
        report["tile_sweep"] = tile_sweep(ct, sweep_shapes, deadline - 10, device)
    else:
        report["skipped"].append("tile sweep")
    save()
    print((args.out / "gpu_check.md").read_text())
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
