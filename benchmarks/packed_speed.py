"""Packed variable-length pooling speed: ``gp.pool_packed`` (fused) against padding + mask.

256 sequences with log-normal lengths around 128 (log-mean ln 128, sigma 0.6, seeded, clipped to
[1, 512]), C = 768, float32, eager CPU. Per kind and pass (forward without grad; forward +
backward), interleaved in one run on the same tensors:

- ``packed fused``: ``gp.pool_packed(x, cu, kind, backend="fused")`` on the packed ``(T, C)``;
- ``padded fused`` / ``padded torch``: ``gp.pool(x_padded, kind, layout="channels_last",
  mask=mask, backend=...)`` on the prebuilt ``(N, Lmax, C)`` tensor;
- ``build padded``: building that tensor and its mask from the packed one
  (``globalpool.packed.padded``; with backward: its gather of the gradient), a row of its own,
  to be added to the padded rows when the sequences arrive packed;
- ``x.sum()`` on the packed x: the forward's bandwidth ceiling.

Medians with min-max over the repeats (3 interleaved rounds by default: the whole run must stay
under 3 minutes, and the padded torch composition of gem and lse takes seconds per call; the fast
methods run 5 times per round). Throughput ratios are
padded time / packed time (> 1: the packed kernel is faster); the bytes-read ratio is
``N * Lmax * C / (T * C)``.

    python benchmarks/packed_speed.py benchmarks/results/packed
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import globalpool as gp
from globalpool import packed
from globalpool.lab.bench.report import machine_info
from globalpool.warmup import FUSED_KINDS

N, C, LMAX_CLIP = 256, 768, 512
KINDS = ("avg", "max", "gem", "lse", "first")
# the methods taking up to seconds per call run once per round; the others FAST_INNER times
# (their forward times are ~10 ms, where one sample per round is mostly the machine's noise)
SLOW = frozenset({"padded torch", "build padded"})
FAST_INNER = 5


def lengths(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = np.round(rng.lognormal(np.log(128.0), 0.6, N))
    return np.clip(raw, 1, LMAX_CLIP).astype(np.int64)


def _run(fn, backward: bool, x: torch.Tensor):
    def step():
        if backward:
            xg = x.detach().requires_grad_()
            fn(xg).sum().backward()
        else:
            with torch.no_grad():
                fn(x)

    return step


def _build_step(x, cu, backward: bool):
    def step():
        if backward:
            xg = x.detach().requires_grad_()
            xp, _, _ = packed.padded(xg, cu)
            xp.backward(torch.ones_like(xp))
        else:
            with torch.no_grad():
                packed.padded(x, cu)

    return step


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _methods(kind, x, cu, xp, mask, backward):
    def fused(t):
        return gp.pool_packed(t, cu, kind, backend="fused")

    methods = {"packed fused": _run(fused, backward, x)}
    # the padded fused column only for kinds with a grid kernel (first / last have none: n/a)
    for be in ("fused", "torch") if kind in FUSED_KINDS else ("torch",):
        methods[f"padded {be}"] = _run(
            lambda t, be=be: gp.pool(t, kind, layout="channels_last", mask=mask, backend=be),
            backward, xp)
    return methods


def main(out_dir: str, repeats: int = 3) -> None:
    torch.manual_seed(0)
    lens = lengths()
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]))
    t_total, lmax = int(lens.sum()), int(lens.max())
    x = torch.randn(t_total, C)
    with torch.no_grad():
        xp, mask, _ = packed.padded(x, cu)
    bytes_ratio = N * lmax / t_total
    start = time.perf_counter()
    rows = []
    for backward in (False, True):
        pass_name = "forward+backward" if backward else "forward"
        # kind-independent rows: the padded tensor's cost and (forward) the read ceiling
        shared = {"build padded": _build_step(x, cu, backward)}
        if not backward:
            shared["x.sum() (packed)"] = lambda: x.sum()
        cases = [(None, shared)] + [
            (kind, _methods(kind, x, cu, xp, mask, backward)) for kind in KINDS
        ]
        for kind, methods in cases:
            times = {name: [] for name in methods}
            for fn in methods.values():  # warm up (and compile)
                fn()
            for _ in range(repeats):  # interleaved: the same cache state and machine load
                for name, fn in methods.items():
                    for _ in range(1 if name in SLOW else FAST_INNER):
                        times[name].append(_time(fn))
            med = {name: statistics.median(t) for name, t in times.items()}
            row = {"kind": kind, "pass": pass_name}
            for name, t in times.items():
                row[f"{name} ms"] = [1e3 * med[name], 1e3 * min(t), 1e3 * max(t)]
            if "packed fused" in med:
                for be in ("fused", "torch"):
                    if f"padded {be}" in med:
                        row[f"padded {be} / packed"] = med[f"padded {be}"] / med["packed fused"]
            rows.append(row)
            print(f"{pass_name} {kind}: " + ", ".join(
                f"{k} {v[0]:.1f} ms" for k, v in row.items() if k.endswith(" ms")), flush=True)
    elapsed = time.perf_counter() - start
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    meta = {
        "machine": f"{machine_info()['name']}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "repeats": repeats, "load_at_end": load,
        "N": N, "C": C, "T": t_total, "Lmax": lmax, "mean_length": float(lens.mean()),
        "dtype": "float32", "bytes_read_ratio_padded_over_packed": bytes_ratio,
        "seconds": elapsed,
    }
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (path / "speed.md").write_text(_markdown(meta, rows))


def _markdown(meta: dict, rows: list[dict]) -> str:
    def cell(r, name):
        t = r.get(f"{name} ms")
        return "n/a" if t is None else f"{t[0]:.1f} ({t[1]:.1f}-{t[2]:.1f})"

    def ratio(r, name):
        v = r.get(f"{name} / packed")
        return "n/a" if v is None else f"{v:.2f}"

    lines = [
        "# Packed sequences: gp.pool_packed vs padding + mask through gp.pool (eager CPU)", "",
        f"{meta['machine']}; torch {meta['torch']}; N = {meta['N']} sequences, log-normal "
        f"lengths (mean {meta['mean_length']:.1f}, max {meta['Lmax']}), C = {meta['C']}, "
        f"float32: packed T x C = {meta['T']} x {meta['C']}, padded N x Lmax x C = "
        f"{meta['N']} x {meta['Lmax']} x {meta['C']}, so padding reads "
        f"{meta['bytes_read_ratio_padded_over_packed']:.2f}x the bytes. Median (min-max) ms of "
        f"{meta['repeats']} interleaved rounds (the packed, padded fused and x.sum() rows "
        f"{FAST_INNER} samples per round); load average {meta['load_at_end']} at the end "
        "(other jobs inflate absolute times; ratios within a row are measured "
        f"together). Whole run {meta['seconds']:.0f} s.", "",
        "Ratios: padded time / packed time (> 1: the packed kernel is faster), without the cost "
        "of building the padded tensor (its own row; add it when the sequences arrive packed). "
        "The padded bytes are what a dense pass reads (the torch composition reads them all, "
        "several times); the masked fused kernel of gp.pool skips the rows of padded positions, "
        "so its reads are close to the packed ones.",
        "",
        "| kind | pass | packed fused | padded fused | padded torch | padded fused / packed "
        "| padded torch / packed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] is None:
            continue
        lines.append(
            f"| {r['kind']} | {r['pass']} | {cell(r, 'packed fused')} | {cell(r, 'padded fused')}"
            f" | {cell(r, 'padded torch')} | {ratio(r, 'padded fused')} | "
            f"{ratio(r, 'padded torch')} |"
        )
    lines += ["", "| row | pass | ms |", "|---|---|---|"]
    for r in rows:
        if r["kind"] is None:
            for name in ("build padded", "x.sum() (packed)"):
                if f"{name} ms" in r:
                    lines.append(f"| {name} | {r['pass']} | {cell(r, name)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/packed")
