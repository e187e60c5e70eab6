"""What the dispatcher hands the kernels: the :class:`Plan` of a call, and the few facts the
kernels' entry points need about it (whether a gradient will be taken, whether the CUDA kernels
are verified). The dispatcher (:mod:`globalpool.dispatch`) decides; the kernels execute.

>>> direct(torch.ones(2, 3, 4), {}).mode
'inference'
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["CUDA_VERIFIED", "Plan", "direct", "needs_grad", "warn_unverified"]

#: Whether the Triton kernels have passed ``benchmarks/gpu_check.py`` on real GPU hardware. Until
#: then ``auto`` keeps the torch composition on CUDA, and ``backend="fused"`` runs the kernels
#: with a one-time warning. Set to True in the commit that records a passing run.
CUDA_VERIFIED = False


class Plan(NamedTuple):
    """How one call pools. ``path``: ``"compose"`` (the torch composition), ``"cpu"`` (numba: the
    grid kernels, or the packed kernel for packed sequences) or ``"cuda"`` (Triton). ``reason``:
    why, in words. ``mode`` (kernel paths only): ``"graph"`` (inside ``torch.compile``, through
    the ``globalpool::pool_forward`` custom op), ``"grad"`` (eager, a gradient will be taken:
    through the autograd Function) or ``"inference"`` (eager, no gradient: the forward only)."""

    path: str
    reason: str
    mode: str = ""


def needs_grad(x: Tensor, params: dict[str, Any]) -> bool:
    """Whether the call must record a graph (grad mode on and x or a parameter requires grad)."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad:
        return True
    for v in params.values():  # noqa: SIM110 - a loop: no generator object on the hot path
        if isinstance(v, Tensor) and v.requires_grad:
            return True
    return False


def direct(x: Tensor, params: dict[str, Any]) -> Plan:
    """The plan of a direct ``kernels.fused_pool`` call (no backend choice: the caller asked for
    the kernel): only how to run it. Inside ``torch.compile``, an exporter or ``torch.jit.trace``
    the custom op (so that the graph records one node), else the autograd Function or the
    forward alone."""
    path = "cpu" if x.is_cpu else "cuda"
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return Plan(path, "a direct kernel call inside a graph", "graph")
    mode = "grad" if needs_grad(x, params) else "inference"
    return Plan(path, "a direct kernel call", mode)


_cuda_warned = False


def warn_unverified() -> None:
    """Warn once per process that the CUDA kernels run unverified (until :data:`CUDA_VERIFIED`).

    The plan warns for eager ``backend="fused"`` calls; the kernels' own entry
    (``kernels.ops.backend_for``) warns for the rest (``torch.compile``, where a warning cannot
    be traced, and direct kernel calls). One flag: one warning in all."""
    global _cuda_warned
    if _cuda_warned or CUDA_VERIFIED:
        return
    _cuda_warned = True
    warnings.warn(
        "backend='fused' on CUDA runs globalpool's Triton kernels, which have not yet been "
        "verified on GPU hardware (benchmarks/gpu_check.py checks them); backend='auto' takes "
        "the torch composition on CUDA until they have",
        UserWarning,
        stacklevel=4,
    )
