"""Activation memory: bytes saved for backward by each kind, fused kernel vs composed torch.

The forward runs inside ``torch.autograd.graph.saved_tensors_hooks``; the pack hook sees every
tensor autograd keeps for backward (``save_for_backward`` of custom ops and compiled graphs
included). Tensors are counted by **unique storage** (``untyped_storage().data_ptr()``), each
storage with its full ``nbytes``: several views of one buffer cost its memory once, and a view of
a larger buffer keeps all of it alive. Storages are classified as the input ``x`` itself, the
pooled output, the kind's parameters (``p``, ``weights``) or ``other`` (intermediates the forward
allocated only to keep them). Tensors held as plain attributes of an autograd context escape the
hook, which is why the kernels save through ``save_for_backward``.

The ratio ``total / input`` counts the input when it is saved: in a network the pooled tensor is
freed after the forward unless someone saves it, so saving it costs its full size.

>>> import torch
>>> rec = saved_bytes(lambda x, params: x.sum((2, 3)), torch.randn(2, 3, 4, 4), {})
>>> rec["total_bytes"]
0
>>> saved_bytes(lambda x, params: x.amax((2, 3)), torch.randn(2, 3, 4, 4), {})["input_bytes_saved"]
384
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from globalpool.lab.bench.methods import Method, kind_methods
from globalpool.lab.bench.runner import kind_params, reset_compiler
from globalpool.lab.bench.shapes import Case, Shape, dtype_name

MEMORY_SHAPE = Shape("r50-head-7", (32, 2048, 7, 7), "ResNet-50 head, 224 px input")


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def saved_bytes(fn: Any, x: torch.Tensor, params: dict[str, Any]) -> dict[str, Any]:
    """Run ``fn(x, params)`` with autograd on and count what it saves for backward."""
    xg = x.detach().requires_grad_(True)
    packed: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t)
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(xg, params)
    param_ptrs = {
        _storage(v)[0] for v in params.values() if isinstance(v, torch.Tensor) and v.numel()
    }
    x_ptr, y_ptr = _storage(xg)[0], _storage(y)[0]
    unique: dict[int, tuple[int, str]] = {}
    tensors = []
    for t in packed:
        if t.layout != torch.strided:
            continue
        ptr, nbytes = _storage(t)
        tensors.append(f"{tuple(t.shape)} {dtype_name(t.dtype)}")
        if nbytes == 0 or ptr in unique:
            continue
        role = (
            "input"
            if ptr == x_ptr
            else "output"
            if ptr == y_ptr
            else "param"
            if ptr in param_ptrs
            else "other"
        )
        unique[ptr] = (nbytes, role)
    by_role = {role: 0 for role in ("input", "output", "param", "other")}
    for nbytes, role in unique.values():
        by_role[role] += nbytes
    input_bytes = x.numel() * x.element_size()
    total = sum(by_role.values())
    return {
        "input_bytes": input_bytes,
        "output_bytes": y.numel() * y.element_size(),
        "total_bytes": total,
        "input_bytes_saved": by_role["input"],
        "output_bytes_saved": by_role["output"],
        "param_bytes_saved": by_role["param"],
        "other_bytes_saved": by_role["other"],
        "ratio_to_input": total / input_bytes,
        "saved_tensors": tensors,
    }


def run_memory(
    kinds: Sequence[str],
    *,
    shape: Shape = MEMORY_SHAPE,
    layouts: Sequence[str] = ("channels_first", "channels_last"),
    dtypes: Sequence[torch.dtype] = (torch.float32,),
    device: str = "cpu",
    families: Sequence[str] = ("torch", "fused"),
) -> list[dict[str, Any]]:
    """Saved-for-backward bytes of every (kind, layout, dtype, family)."""
    rows = []
    for dtype in dtypes:
        for layout in layouts:
            case = Case(shape, layout, dtype, device)
            if "compile" in families:
                reset_compiler()  # one specialised graph per kind, no recompile-limit fallback
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(case.tensor_shape, generator=g, device=device).to(dtype)
            for kind in kinds:
                methods: list[Method] = [
                    m
                    for m in kind_methods(kind, compile="compile" in families)
                    if m.family in families
                ]
                params = kind_params(kind, x, case)
                for m in methods:
                    row: dict[str, Any] = {
                        "kind": kind,
                        "family": m.family,
                        "layout": layout,
                        "dtype": dtype_name(dtype),
                        "device": device,
                        "shape": list(case.tensor_shape),
                        "params": {
                            k: ("tensor" if isinstance(v, torch.Tensor) else v)
                            for k, v in params.items()
                        },
                    }
                    try:
                        row.update(saved_bytes(m.build(case), x, params))
                        row["status"] = "ok"
                    except Exception as exc:  # report, never crash
                        row["status"] = "ERROR"
                        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    rows.append(row)
    return rows


def memory_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """avg fused saves 0; max and gem fused save no more than input + output.

    Parameters (GeM's ``p``) are not activations and are left out of the comparison.
    """
    out = []
    for r in rows:
        if r["family"] != "fused" or r["kind"] not in ("avg", "max", "gem"):
            continue
        limit = 0 if r["kind"] == "avg" else r.get("input_bytes", 0) + r.get("output_bytes", 0)
        value = None
        if r["status"] == "ok":
            value = r["total_bytes"] - r["param_bytes_saved"]
        out.append(
            {
                "kind": r["kind"],
                "layout": r["layout"],
                "dtype": r["dtype"],
                "limit_bytes": limit,
                "saved_bytes": value,
                "met": value is not None and value <= limit,
            }
        )
    return out


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.3f}"


def memory_markdown(data: dict[str, Any]) -> str:
    rows = data["rows"]
    lines = [
        "# globalpool bench-memory: bytes saved for backward",
        "",
        f"Machine: **{data['machine']['name']}**; torch {data['machine']['torch']}.",
        "",
        "Counted with `torch.autograd.graph.saved_tensors_hooks`, by unique storage (full "
        "storage nbytes, each buffer once). `ratio` = saved bytes / input bytes; the input "
        "counts when it is saved. GeM's `p` is a 0-dim tensor requiring grad (as in the `GeM` "
        "module), attention weights require grad.",
        "",
        "| kind | layout | dtype | method | status | input MiB | saved MiB | ratio | "
        "of which input / output / params / other MiB | saved tensors |",
        "|---" * 10 + "|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['kind']} | {r['layout']} | {r['dtype']} | {r['family']} | ERROR "
                f"| | | | | {r.get('error', '')} |"
            )
            continue
        parts = " / ".join(
            _mib(r[f"{k}_bytes_saved"]) for k in ("input", "output", "param", "other")
        )
        tensors = ", ".join(r["saved_tensors"][:6]) + (" …" if len(r["saved_tensors"]) > 6 else "")
        lines.append(
            f"| {r['kind']} | {r['layout']} | {r['dtype']} | {r['family']} | ok | "
            f"{_mib(r['input_bytes'])} | {_mib(r['total_bytes'])} | {r['ratio_to_input']:.3f} | "
            f"{parts} | {tensors} |"
        )
    lines += [
        "",
        "## Targets",
        "",
        "| kind | layout | dtype | limit MiB | saved (without params) MiB | excess bytes | met |",
        "|---" * 7 + "|",
    ]
    for t in data["targets"]:
        excess = "—" if t["saved_bytes"] is None else max(0, t["saved_bytes"] - t["limit_bytes"])
        lines.append(
            f"| {t['kind']} | {t['layout']} | {t['dtype']} | {_mib(t['limit_bytes'])} | "
            f"{_mib(t['saved_bytes'])} | {excess} | {'yes' if t['met'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def write_memory_report(data: dict[str, Any], out_dir: Path, stem: str = "memory") -> dict:
    """Write ``{stem}.json`` and ``{stem}.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data.setdefault("targets", memory_targets(data["rows"]))
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    (out_dir / f"{stem}.md").write_text(memory_markdown(data))
    return {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
