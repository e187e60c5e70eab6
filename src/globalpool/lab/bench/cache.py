"""Cache state before each timed sample: ``warm`` (as the previous sample left it) or ``cold``.

``cold`` evicts the input from the caches before every sample of a method *and* of its paired
ceiling, so both start from the same state and the ratio compares how well each streams the
tensor from memory. Without it, a tensor somewhat larger than the last-level cache is partly
served from what the previous call left there, and how much depends on the traversal order of
the previous call, not on the method timed (on a 32 MiB-L3 CPU the ``x.sum()`` ceiling of a
49 MiB tensor moved between 44 and 95 GB/s from one run to the next).

On CPU the flush *reads* a buffer four times the last-level cache (at least 128 MiB): reading
leaves clean lines, so the timed call never pays for writing the flush buffer back. Twice the
cache was not enough on an AMD Zen 4 (32 MiB L3, whose replacement keeps lines that were reused
over lines read once): after a 64 MiB read the ``x.sum()`` of a (32, 2048, 14, 14) float32
tensor still ran at 36 GB/s (samples up to 49), after 128 MiB at 28-29 GB/s (at most 33), the
same as after two different 64 MiB buffers or a write followed by a read. On CUDA it zeroes a
256 MiB buffer, as ``triton.testing.do_bench`` does to clear the L2.

>>> cache_flusher("cpu", "warm") is None
True
>>> flush = cache_flusher("cpu", "cold")
>>> flush()
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

CACHE_MODES = ("cold", "warm")


def cache_bytes(level: int) -> int | None:
    """Size in bytes of this machine's level-``level`` CPU cache (Linux sysfs), else None."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")) if base.exists() else []:
        try:
            if int((index / "level").read_text()) != level:
                continue
            size = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        factor = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(size[-1:], 1)
        return int(size.rstrip("KMG")) * factor
    return None


def cache_flusher(device: str, mode: str) -> Callable[[], None] | None:
    """A callable that evicts the caches of ``device`` (``mode="cold"``), or None (``"warm"``)."""
    if mode not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {mode!r}")
    if mode == "warm":
        return None
    cuda = str(device).startswith("cuda")
    if cuda:
        buf = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)
    else:
        llc = cache_bytes(3) or cache_bytes(2) or 32 * 2**20
        buf = torch.ones(max(4 * llc, 128 * 2**20) // 4, dtype=torch.float32)  # touched: resident

    def flush() -> None:
        if cuda:
            buf.zero_()
        else:
            buf.sum()

    return flush
