"""One backend decision per pooling call: a :class:`Plan` that the executors carry out.

:func:`plan` serves global pooling (``gp.pool``, each kind of a tuple, the shared avg/max pass of
a tuple, ``adaptive_pool``'s one-bin case); :func:`plan_packed` serves ``gp.pool_packed`` and
nested tensors. Everything that decides between a fused kernel and the torch composition is
here: the backend argument, the deploy check (an exporter or tracer records the composition),
kernel support (asked of :func:`globalpool.kernels.unsupported`: kind, device, dtype,
per-channel parameters), the autograd modes the kernels cannot serve, the size threshold
(:data:`FUSED_MIN_ELEMENTS`) and the CUDA rule (:data:`CUDA_VERIFIED`). The executors
(``kernels.fused_pool``, ``packed.fused_packed``) run ``plan.path`` in ``plan.mode`` and decide
nothing again.

``backend="fused"`` raises a ValueError where ``auto`` would take the composition because no
kernel can serve the call (a kind without a kernel of that family among them: ``first`` and
``last`` on a grid, a kind a user registered); the message gives the plan's reason and names the
alternatives. Two compositions are not refusals: ``backend="torch"`` and a recording exporter or
tracer (the deployed graph holds standard ops whatever the backend).

>>> import torch
>>> plan("auto", torch.ones(2, 3, 4, 4), "gem").path
'compose'
>>> p = plan("auto", torch.ones(4, 64, 32, 32), "gem")
>>> p.path, p.mode
('cpu', 'inference')
>>> plan("fused", torch.ones(4, 64, 32, 32), "first")
Traceback (most recent call last):
...
ValueError: backend='fused' cannot pool this call with a kernel: kind 'first' has no CPU kernel; ...
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from globalpool import kernels as _kernels
from globalpool.kernels import plan as _plan
from globalpool.kernels.plan import CUDA_VERIFIED, Plan, direct, needs_grad, warn_unverified

__all__ = [
    "BACKENDS",
    "CUDA_VERIFIED",
    "FUSED_MIN_ELEMENTS",
    "Plan",
    "deploying",
    "direct",
    "plan",
    "plan_packed",
]

BACKENDS = ("auto", "fused", "torch")

#: Below this many elements the fused kernel's fixed cost (about 25 us forward on the 2-core CPU,
#: ten times that when a preceding op has flushed the caches) exceeds the few small torch ops it
#: replaces, so ``auto`` keeps the composition.
FUSED_MIN_ELEMENTS = 1 << 16

# the reasons (module constants: one Plan object each, no allocation on the hot path)
TORCH = Plan("compose", "backend='torch' asks for the torch composition")
DEPLOY = Plan(
    "compose",
    "an exporter or tracer is recording: deployed graphs hold the torch composition (standard "
    "ops only), whatever the backend",
)
SMALL = Plan(
    "compose",
    f"x has fewer than FUSED_MIN_ELEMENTS = {FUSED_MIN_ELEMENTS} elements: the composition's few "
    "small ops cost less than a kernel call",
)
NATIVE_MEAN = Plan(
    "compose",
    "an unmasked avg or sum that needs no gradient, its spatial dims innermost in memory: "
    "torch's own mean is one native pass, as fast as the kernel",
)
CUDA_UNVERIFIED = Plan(
    "compose",
    "the CUDA kernels have not yet run on GPU hardware (benchmarks/gpu_check.py): auto keeps "
    "the torch composition on CUDA; backend='fused' runs them",
)
PACKED_IN_GRAPH = Plan(
    "compose",
    "inside torch.compile the packed kernel would run outside the graph (a graph break): auto "
    "keeps the composition in the graph; backend='fused' runs the kernel",
)
GRAPH_PARAM_GRAD = (
    "inside torch.compile the kernels give no gradient for a tensor eps or r that requires grad"
)
FORWARD_AD = "forward-mode AD (a dual tensor) reaches no kernel: the kernels read memory directly"
FUNC_TRANSFORM = (
    "a torch.func transform (grad, vmap, jvp, ...) reaches no kernel: the kernels read memory "
    "directly"
)

_MODES = ("graph", "grad", "inference")
_AUTO = {
    (path, mode): Plan(path, f"backend='auto': the {path} kernel serves this call", mode)
    for path in ("cpu", "cuda")
    for mode in _MODES
}
_FUSED = {
    (path, mode): Plan(path, "backend='fused' asks for the kernel", mode)
    for path in ("cpu", "cuda")
    for mode in _MODES
}
_PACKED_AUTO = {m: Plan("cpu", "backend='auto': the packed CPU kernel serves this call", m)
                for m in _MODES}
_PACKED_FUSED = {m: Plan("cpu", "backend='fused' asks for the packed kernel", m) for m in _MODES}
_NO_PARAMS: dict[str, Any] = {}
_MEAN_KINDS = frozenset({"avg", "sum"})
_NO_KERNEL_GRAD = ("eps", "r")  # the kernels give gradients for x, p and the weights only


def deploying() -> bool:
    """Whether an exporter or tracer is recording the call: ``torch.export`` (and the ONNX dynamo
    exporter built on it), the TorchScript ONNX exporter, or ``torch.jit.trace``.

    The plan is then the torch composition whatever the backend, so that the recorded graph
    holds standard ops only and runs where globalpool is not installed; ``torch.compile`` (not
    exporting) keeps the fused kernel.

    >>> deploying()
    False
    """
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        return True
    # no ONNX export runs before torch.onnx is imported; is_in_onnx_export costs ~1.6 us
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def unsupported_mode(x: Tensor, mask: Tensor | None, params: dict[str, Any]) -> str | None:
    """The reason no kernel can serve this autograd mode, or None: functorch's wrapped tensors
    (``torch.func.grad``, ``vmap``, ``jvp``) and forward-mode dual tensors have no memory that
    the kernels could read. (A backward taken with ``is_grads_batched`` is served by the kernels'
    autograd Function itself, through torch ops.)

    >>> unsupported_mode(torch.ones(2), None, {}) is None
    True
    """
    forward_ad = _forward_ad._current_level >= 0
    for t in (x, mask, *params.values()):
        if isinstance(t, Tensor):
            if torch._C._functorch.is_functorch_wrapped_tensor(t):
                return FUNC_TRANSFORM
            if forward_ad and _forward_ad.unpack_dual(t).tangent is not None:
                return FORWARD_AD
    return None


def _param_grad_in_graph(params: dict[str, Any]) -> bool:
    for name in _NO_KERNEL_GRAD:
        v = params.get(name)
        if isinstance(v, Tensor) and v.requires_grad:
            return True
    return False


def _refuse(reason: str) -> ValueError:
    return ValueError(
        f"backend='fused' cannot pool this call with a kernel: {reason}; use backend='auto' "
        "(which takes the torch composition here) or backend='torch'"
    )


def _no_kernel(fused: bool, reason: str) -> Plan:
    """The composition for ``reason``; under ``backend="fused"`` a refusal that says why."""
    if fused:
        raise _refuse(reason)
    return Plan("compose", reason)


def _before_kernels(backend: Any, x: Tensor) -> tuple[bool, Plan | None]:
    """What every plan settles before asking the kernels: whether ``backend`` is ``"fused"``,
    and the composition's plan where it needs no kernel question (``"torch"``, a recording
    exporter, an input below the size threshold under ``auto``), else None."""
    if backend == "torch":
        return False, TORCH
    fused = _parse(backend)
    if deploying():
        return fused, DEPLOY
    if not fused and x.numel() < FUSED_MIN_ELEMENTS:
        return fused, SMALL
    return fused, None


def _parse(backend: Any) -> bool:
    """True for ``"fused"``, False for ``"auto"``; raises for an unknown backend."""
    if backend == "auto":
        return False
    if backend == "fused":
        return True
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def plan(
    backend: str,
    x: Tensor,
    kind: str,
    mask: Tensor | None = None,
    params: dict[str, Any] = _NO_PARAMS,
    layout: str = "channels_first",
) -> Plan:
    """The plan for global pooling of a checked ``x`` (``(N, C, *S)`` / ``(N, *S, C)``) with
    one ``kind``; ``params`` are the kind's (``p``, ``eps``, ``r``, ``weights``).

    ``auto`` takes a kernel for inputs of at least :data:`FUSED_MIN_ELEMENTS` elements on the
    CPU, except an unmasked avg or sum that needs no gradient whose spatial dims are innermost in
    memory (``x.mean`` is one native pass there), and the composition on CUDA until
    :data:`CUDA_VERIFIED`. Raises ValueError for an unknown backend, and under ``fused`` where
    no kernel can serve the call (see the module docstring).
    """
    fused, early = _before_kernels(backend, x)
    if early is not None:
        return early
    why = _kernels.unsupported(x, kind, params)
    if why is not None:
        return _no_kernel(fused, why)
    if torch.compiler.is_compiling():
        if _param_grad_in_graph(params):
            return _no_kernel(fused, GRAPH_PARAM_GRAD)
        mode = "graph"
    else:
        why = unsupported_mode(x, mask, params)
        if why is not None:
            return _no_kernel(fused, why)
        mode = "grad" if needs_grad(x, params) else "inference"
    if x.is_cpu:  # not x.device: building a device object costs ~20 us with cold caches
        if fused:
            return _FUSED["cpu", mode]
        if (
            mode == "inference"
            and mask is None
            and kind in _MEAN_KINDS
            and not _kernels.stored_channels_last(x, layout)
        ):
            # inference average on CPU: where the spatial dims are innermost in memory torch's
            # mean is one native pass as fast as the kernel (benchmarks/results/cpu: 0.94-0.98 of
            # x.sum() vs 0.90-0.98); stored channels-last it reads 0.39-0.98 against 0.81-0.92
            return NATIVE_MEAN
        return _AUTO["cpu", mode]
    if fused:
        if mode != "graph":  # inside torch.compile the kernel's entry warns, untraced
            warn_unverified()
        return _FUSED["cuda", mode]
    if not _plan.CUDA_VERIFIED:
        return CUDA_UNVERIFIED
    return _AUTO["cuda", mode]


def plan_packed(backend: str, x: Tensor, kind: str, params: dict[str, Any] = _NO_PARAMS) -> Plan:
    """The plan for packed pooling of a checked ``(T, C)`` ``x`` with one ``kind``: the packed
    CPU kernel (path ``"cpu"``) or the padded composition.

    As :func:`plan`, and: inside ``torch.compile`` ``auto`` keeps the composition (the kernel
    would run outside the graph) while ``fused`` runs the kernel there, eagerly.
    """
    fused, early = _before_kernels(backend, x)
    if early is not None:
        return early
    why = _kernels.unsupported(x, kind, params, family="packed")
    if why is not None:
        return _no_kernel(fused, why)
    if torch.compiler.is_compiling():
        if not fused:
            return PACKED_IN_GRAPH
    else:
        why = unsupported_mode(x, None, params)
        if why is not None:
            return _no_kernel(fused, why)
    mode = "grad" if needs_grad(x, params) else "inference"
    return (_PACKED_FUSED if fused else _PACKED_AUTO)[mode]
