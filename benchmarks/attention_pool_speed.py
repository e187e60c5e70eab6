"""Speed and saved-for-backward memory of the query-based attention pools against the same
attention written two plain ways (eager CPU, float32).

For each pool (``gp.LatentAttentionPool``, ``gp.SimPool``, ``gp.CLIPAttentionPool``), input
(ViT tokens ``(32, 196, 768)``, a ResNet-50 map ``(32, 2048, 7, 7)``) and layout (tokens as NLC
and NCL, the map as NCHW and NHWC), with a padding mask (each sample keeps its first 50 to 100%
of the positions, one sample all of them), three methods run on the same tensors and the same
module parameters:

- ``pool``: the module itself, ``pool(x, mask)``;
- ``composition``: the pool's projections written out in this script around
  ``softmax(q kᵀ / √d) v`` by hand (``masked_fill(-inf)``, ``torch.softmax``, two matmuls);
- ``sdpa``: the same projections around one masked ``F.scaled_dot_product_attention`` call
  (a bool ``attn_mask``).

The two baselines are checked against the module (values and the gradient of ``x``) before any
timing (that run is also the warm-up). Times are of forward + backward (``x`` and every
parameter require grad), medians over interleaved rounds (every method once per round, so each
sees the same machine load); the ratios are the module's median over each baseline's. The memory
column is what autograd saves for backward in one forward (``saved_tensors_hooks``: the sum of
the unique storages, the module's parameters counted apart).

    python benchmarks/attention_pool_speed.py          # full sizes: benchmarks/results/attention
                                                       # (about 1 min on an idle 2-core CPU)
    python benchmarks/attention_pool_speed.py --quick  # tiny sizes, a temporary folder
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import globalpool as gp
from globalpool.lab.bench.memory import saved_bytes
from globalpool.lab.bench.report import cpu_name, machine_info

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "attention"
POOLS = ("map", "simpool", "clip")
METHODS = ("pool", "composition", "sdpa")
# (name, shape in channels-first order (N, C, *S), layouts)
FULL_INPUTS = (("tokens", (32, 768, 196)), ("map", (32, 2048, 7, 7)))
QUICK_INPUTS = (("tokens", (3, 16, 10)), ("map", (3, 32, 3, 3)))
HEAD_DIM = 64


# --------------------------------------------------------------------------------------------
# the pools and their attention written out


def build(pool: str, channels: int, spatial: tuple[int, ...], layout: str) -> torch.nn.Module:
    """The module: ``channels // 64`` heads for MAP and CLIP (ViT-B: 12, CLIP RN50: 32), one
    for SimPool (the paper's); CLIP's table learned at the input's own size."""
    heads = max(1, channels // HEAD_DIM)
    if pool == "map":
        return gp.LatentAttentionPool(channels, num_heads=heads, layout=layout)
    if pool == "simpool":
        return gp.SimPool(channels, layout=layout)
    table = (math.prod(spatial),) if len(spatial) == 1 else spatial
    return gp.CLIPAttentionPool(channels, table, num_heads=heads, layout=layout)


def _tokens(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2) if layout == "channels_first" else x.flatten(1, -2)


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    n, length, c = t.shape
    return t.reshape(n, length, h, c // h).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).flatten(2)


def by_hand(q, k, v, real):
    """``softmax(q kᵀ / √d) v`` over the real keys (``real`` ``(N, L)``)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
    return torch.softmax(scores, -1) @ v


def sdpa(q, k, v, real):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=real[:, None, None, :])


def plain(pool: str, m: torch.nn.Module, layout: str, attend: Callable) -> Callable:
    """``f(x, real)``: the module's projections around ``attend``, written out for a mask whose
    samples all have a real position (so no zeroing of empty samples)."""

    def masked_mean(t, real):
        w = real.unsqueeze(-1).to(t.dtype)
        return (t * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)

    def latent(x, real):
        t, real = _tokens(x, layout), real.flatten(1)
        h = m.num_heads
        q = _heads(m.q(m.latent).expand(t.shape[0], -1, -1), h)
        k, v = m.kv(t).chunk(2, -1)
        y = m.proj(_merge(attend(q, _heads(k, h), _heads(v, h), real)))
        y = y + m.mlp(m.norm(y))
        return y[:, 0]

    def simpool(x, real):
        t, real = _tokens(x, layout), real.flatten(1)
        h = m.num_heads
        q = _heads(m.wq(masked_mean(t, real)), h)
        v = m.norm_patches(t)
        return _merge(attend(q, _heads(m.wk(v), h), _heads(v, h), real))[:, 0]

    def clip(x, real):
        t, real = _tokens(x, layout), real.flatten(1)
        h = m.num_heads
        seq = torch.cat([masked_mean(t, real), t], 1) + m.positional_embedding
        keys = torch.cat([real.new_ones(real.shape[0], 1), real], 1)
        q, k, v = m.q_proj(seq[:, :1]), m.k_proj(seq), m.v_proj(seq)
        return m.c_proj(_merge(attend(_heads(q, h), _heads(k, h), _heads(v, h), keys))[:, 0])

    return {"map": latent, "simpool": simpool, "clip": clip}[pool]


# --------------------------------------------------------------------------------------------
# inputs, checks, timing, memory


def inputs(shape: tuple[int, ...], layout: str, seed: int = 0):
    """``x`` in ``layout`` and the mask ``(N, *S)``: sample ``n`` keeps its first 50-100% of
    the positions in row-major order (the first sample all of them)."""
    gen = torch.Generator().manual_seed(seed)
    n, c, *spatial = shape
    x = torch.randn(shape, generator=gen)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous()
    positions = math.prod(spatial)
    keep = torch.randint(positions // 2 + 1, positions + 1, (n,), generator=gen)
    keep[0] = positions
    real = (torch.arange(positions) < keep[:, None]).reshape(n, *spatial)
    return x, real


def check(methods: dict[str, Callable], x: torch.Tensor, real: torch.Tensor) -> float:
    """The largest difference from the module of the baselines' values and x-gradients."""
    outs = {}
    for name, fn in methods.items():
        xg = x.detach().requires_grad_()
        y = fn(xg, real)
        (grad,) = torch.autograd.grad(y.sum(), xg)
        outs[name] = (y.detach(), grad)
    worst = 0.0
    for name in METHODS[1:]:
        for got, want in zip(outs[name], outs["pool"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            worst = max(worst, float((got - want).abs().max()))
    return worst


def _step(fn, module, x, real) -> Callable[[], None]:
    def run():
        module.zero_grad(set_to_none=True)
        xg = x.detach().requires_grad_()
        fn(xg, real).sum().backward()

    return run


def timings(methods, module, x, real, repeats: int) -> dict[str, list[float]]:
    """Seconds of each method's forward + backward, in interleaved rounds (the check before
    ran each once: the warm-up)."""
    steps = {n: _step(fn, module, x, real) for n, fn in methods.items()}
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(repeats):  # interleaved: each method once per round
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def memory(fn, module, x, real) -> dict[str, int]:
    params = dict(module.named_parameters())
    rec = saved_bytes(lambda t, _: fn(t, real), x, params)
    return {"total": rec["total_bytes"], "parameters": rec["param_bytes_saved"],
            "activations": rec["total_bytes"] - rec["param_bytes_saved"],
            "input": rec["input_bytes_saved"]}


def run(quick: bool, repeats: int) -> dict:
    torch.manual_seed(0)
    rows = []
    for input_name, shape in QUICK_INPUTS if quick else FULL_INPUTS:
        for layout in ("channels_last", "channels_first"):
            x, real = inputs(shape, layout)
            for pool in POOLS:
                module = build(pool, shape[1], tuple(shape[2:]), layout)
                methods = {"pool": lambda t, r, m=module: m(t, r),
                           "composition": plain(pool, module, layout, by_hand),
                           "sdpa": plain(pool, module, layout, sdpa)}
                worst = check(methods, x, real)
                times = timings(methods, module, x, real, repeats)
                med = {n: statistics.median(t) for n, t in times.items()}
                mem = {n: memory(fn, module, x, real) for n, fn in methods.items()}
                rows.append({
                    "pool": pool, "input": input_name, "shape": list(x.shape), "layout": layout,
                    "max_abs_difference": worst,
                    "ms": {n: [1e3 * med[n], 1e3 * min(t), 1e3 * max(t)] for n, t in times.items()},
                    "ratio": {f"pool / {n}": med["pool"] / med[n] for n in METHODS[1:]},
                    "saved_bytes": mem,
                })
                ms = rows[-1]["ms"]
                print(f"{pool} {input_name} {layout}: forward+backward " + ", ".join(
                    f"{n} {ms[n][0]:.1f} ms" for n in METHODS), flush=True)
    return {"rows": rows}


# --------------------------------------------------------------------------------------------
# report


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def markdown(record: dict) -> str:
    meta = record["meta"]
    lines = [
        "# Query-based attention pools: speed and saved memory (eager CPU, float32)",
        "",
        f"{meta['cpu']}, {meta['threads']} threads; torch {meta['torch']}. Load average "
        f"{meta['load_start'][0]:.1f} before and {meta['load_end'][0]:.1f} after the run: the "
        "machine was shared with other jobs, so absolute times are inflated and noisy; the "
        "ratios compare methods measured in the same interleaved rounds (median of "
        f"{meta['repeats']}, min-max beside it). Whole run {meta['seconds']:.0f} s.",
        "",
        "Methods, on the same tensors and parameters, with a padding mask (each sample keeps its "
        "first 50-100% of the positions): **pool** is the module; **composition** its "
        "projections written out around `softmax(q kᵀ/√d) v` by hand; **sdpa** the same "
        "projections around one masked `F.scaled_dot_product_attention`. The baselines agree "
        "with the module (values and the gradient of x) within "
        f"{max(r['max_abs_difference'] for r in record['rows']):.1e}. Heads: 64 channels each "
        "for MAP and CLIP, one for SimPool; CLIP's table at the input's size; MAP with its "
        "MLP (ratio 4). Forward + backward, median (min-max) ms; ratios: pool time / "
        "baseline time (< 1: the module is faster).",
        "",
        "| pool | input | layout | pool ms | composition ms | sdpa ms | pool / composition "
        "| pool / sdpa |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        shape = "×".join(str(s) for s in r["shape"])
        ms = r["ms"]
        cells = [f"{ms[n][0]:.0f} ({ms[n][1]:.0f}-{ms[n][2]:.0f})" for n in METHODS]
        lines.append(
            f"| {r['pool']} | {shape} | {r['layout']} | {' | '.join(cells)} | "
            f"{r['ratio']['pool / composition']:.2f} | {r['ratio']['pool / sdpa']:.2f} |"
        )
    lines += [
        "",
        "Saved for backward by one forward, MiB (unique storages; activations: everything but "
        "the module's parameters, the input x included where it is saved itself):",
        "",
        "| pool | input | layout | pool activations | composition activations | "
        "sdpa activations | pool / sdpa | parameters |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        shape = "×".join(str(s) for s in r["shape"])
        mem = r["saved_bytes"]
        act = {n: mem[n]["activations"] for n in METHODS}
        lines.append(
            f"| {r['pool']} | {shape} | {r['layout']} | "
            + " | ".join(_mib(act[n]) for n in METHODS)
            + f" | {act['pool'] / act['sdpa']:.2f} | {_mib(mem['pool']['parameters'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one round, into a temporary folder unless --out")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (3)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    out = args.out or (Path(tempfile.gettempdir()) / "attention-pool-speed-quick"
                       if args.quick else OUT)
    load_start, start = os.getloadavg(), time.perf_counter()
    record = run(args.quick, repeats)
    record["meta"] = {
        "cpu": cpu_name(machine_info()), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "repeats": repeats, "quick": args.quick,
        "load_start": list(load_start), "load_end": list(os.getloadavg()),
        "seconds": round(time.perf_counter() - start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "speed.md").write_text(markdown(record))
    print(f"wrote {out / 'speed.md'} and {out / 'speed.json'}")
    return record


if __name__ == "__main__":
    sys.exit(main() and None)
