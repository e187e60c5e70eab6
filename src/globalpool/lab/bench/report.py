"""Write benchmark results: JSON (everything), Markdown (tables and targets), PNG (ratio bars).

Ratios are ``ceiling time / method time`` on the same tensor in the same run (forward ceiling
``x.sum()``, backward ceiling ``torch.empty_like(x).fill_(1.0)``), so 1.0 means "as fast as one
read (write) of the input"; each is stored with the medians it comes from and their min–max
(:mod:`globalpool.lab.bench.runner`). The targets (:mod:`globalpool.lab.bench.targets`) are
evaluated from the results themselves; :mod:`globalpool.lab.bench.markdown` and
:mod:`globalpool.lab.bench.plot` render them.

>>> info = machine_info()
>>> sorted(k for k in info if k in ("cpu_model", "torch", "logical_cores"))
['cpu_model', 'logical_cores', 'torch']
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from globalpool.lab.bench.cache import cache_bytes
from globalpool.lab.bench.markdown import markdown
from globalpool.lab.bench.plot import plot
from globalpool.lab.bench.targets import evaluate_targets

# ------------------------------------------------------------------------------------------
# machine


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "cpu family", "model", "flags", "cpu MHz") and key not in out:
            out[key] = value.strip()
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, caches, library versions and GPU (if any) of this machine."""
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    info: dict[str, Any] = {
        "cpu_model": cpu.get("model name", platform.processor() or "unknown"),
        "cpu_family": cpu.get("cpu family"),
        "cpu_model_number": cpu.get("model"),
        "cpu_mhz": cpu.get("cpu MHz"),
        "simd": simd,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": sys.modules["numba"].get_num_threads() if "numba" in sys.modules else None,
        "l2_bytes": cache_bytes(2),
        "l3_bytes": cache_bytes(3),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "numba": _version("numba"),
        "triton": _version("triton"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        from globalpool.warmup import kernel_target  # imports numba

        info["kernel_target"] = kernel_target()
    except ImportError:
        info["kernel_target"] = None
    name = cpu_name(info) + f", {info['logical_cores']} cores"
    if info["l3_bytes"]:
        name += f", L3 {info['l3_bytes'] // 2**20} MiB"
    if info["kernel_target"]:
        t = info["kernel_target"]
        name += (f"; CPU kernels compiled for {t['cpu']} ({t['register_bits']}-bit registers, "
                 f"{t['lane_bits']}-bit lanes)")
    if info["gpu"]:
        name += f"; GPU {info['gpu']}"
    info["name"] = name
    return info


def cpu_name(info: dict[str, Any]) -> str:
    """The CPU of a :func:`machine_info` record, with its family and model where known.

    >>> cpu_name({"cpu_model": "AMD EPYC", "cpu_family": "25", "cpu_model_number": "17"})
    'AMD EPYC (family 25 model 17)'
    """
    name = f"{info['cpu_model']}"
    if info.get("cpu_family"):
        name += f" (family {info['cpu_family']} model {info['cpu_model_number']})"
    return name


def write_report(data: dict[str, Any], out_dir: Path, stem: str = "bench") -> dict[str, Any]:
    """Write ``{stem}.json``, ``{stem}.md`` and ``{stem}_{device}_{dtype}.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data.setdefault("targets", evaluate_targets(data["cases"], data["machine"]))
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(data, indent=1, default=str))
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown(data))
    pngs = plot(data, out_dir / f"{stem}.png")
    return {"json": json_path, "markdown": md_path, "png": pngs}
