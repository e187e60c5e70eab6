"""Fused single-pass global-pooling kernels: numba on CPU, Triton on CUDA.

:func:`unsupported` says why no fused kernel serves a kind on a tensor (kind, device, dtype,
per-channel parameters), :func:`supports` whether one does: a kind is served by the kernel
families its registry entry names (``globalpool.registry.spec(kind).kernels``), each family's own
mode table mapping it to a kernel mode. :func:`fused_pool` runs the kernel as the call's plan
(:mod:`globalpool.dispatch`) says: inside a graph through the ``globalpool::pool_forward`` custom
op, which ``torch.compile`` keeps as one node; eagerly through the kernels' one autograd Function
(:class:`globalpool.kernels.ops.FusedPool`) or the forward alone. ``globalpool.pool`` never calls
it while exporting or tracing (``torch.export``, ONNX, ``torch.jit.trace``): deployed graphs get
the torch composition, in standard ops. Both expect arguments already checked by
:mod:`globalpool.contract`; ``globalpool.pool(..., backend="auto"|"fused")`` is the public way in.

The input is handed to the kernel in its *physical* layout: a channels-first tensor stored in
``torch.channels_last`` memory format is pooled as ``(N, L, C)`` without a copy (and a declared
channels-last tensor stored channels-first as ``(N, C, L)``); any other strides are made
contiguous first.

>>> import torch
>>> from globalpool import kernels
>>> x = torch.arange(8.0).reshape(1, 2, 2, 2)
>>> kernels.supports(x, "gem")
True
>>> kernels.fused_pool(x, "avg", "channels_first")
tensor([[1.5000, 5.5000]])
>>> kernels.fused_pool(x, "max", "channels_first", keepdim=True).shape
torch.Size([1, 2, 1, 1])
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from typing import Any

import torch

from globalpool.kernels import ops
from globalpool.kernels.plan import direct
from globalpool.registry import KINDS, kinds, spec

__all__ = [
    "fused_pool", "served", "shared_pass", "stored_channels_last", "supports", "unsupported",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FAMILY_NAMES = {"cpu": "CPU", "cuda": "CUDA", "packed": "packed"}
#: the kinds one catavgmax pass gives (its kernel's sum and running max): a tuple of kinds reads
#: x once for those of them that the family serves
_FROM_AVG_MAX = frozenset({"avg", "max", "avgmax", "catavgmax", "sum"})


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# looked up once at import (find_spec does not import the package); plain constants keep
# supports() traceable by torch.compile
_HAS_NUMBA = _has("numba")
_HAS_TRITON = _has("triton")
_NO_PARAMS: dict[str, Any] = {}


def unsupported(
    x: torch.Tensor, kind: str, params: dict[str, Any] = _NO_PARAMS, family: str | None = None
) -> str | None:
    """Why no fused kernel serves ``kind`` on ``x``, in words, or None when one does.

    ``family``: ``"cpu"`` or ``"cuda"`` (the grid kernels; by default from x's device) or
    ``"packed"`` (the packed-sequence kernel, CPU only). A kind is served by the families in its
    registry entry (``spec(kind).kernels``); then the family must be installed (numba for the
    CPU and packed kernels, triton for CUDA), the dtype float16, bfloat16, float32 or float64,
    and ``p`` / ``r`` one number (a 0-dim tensor or a float), not one per channel.

    >>> import torch
    >>> unsupported(torch.ones(2, 3, 4), "lse") is None
    True
    >>> unsupported(torch.ones(2, 3, 4), "last")
    "kind 'last' has no CPU kernel"
    """
    served = spec(kind).kernels
    if family is None:
        if x.is_cpu:  # not x.device: building a device object costs ~20 us with cold caches
            family = "cpu"
        elif x.is_cuda:
            family = "cuda"
        else:
            return f"device {x.device} has no kernel (the kernels run on cpu and cuda)"
    elif family == "packed" and not x.is_cpu:
        return f"the packed kernel runs on the CPU, not on device {x.device}"
    if family not in served:
        if not served:
            return f"kind {kind!r} has no kernel (its torch composition runs on every path)"
        return f"kind {kind!r} has no {_FAMILY_NAMES[family]} kernel"
    if family == "cuda":
        if not _HAS_TRITON:
            return "triton is not installed (the CUDA kernels need it: pip install '.[cuda]')"
    elif not _HAS_NUMBA:
        return f"numba is not installed (the {_FAMILY_NAMES[family]} kernels need it)"
    elif not cpu_kernels_load():
        return f"the CPU kernels could not load ({_LOAD_ERROR[0]})"
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} has no kernel (float16, bfloat16, float32 and float64 have)"
    if family != "packed" and x.ndim not in (3, 4, 5):
        return f"x has {x.ndim} dims; the kernels take 1 to 3 spatial dims"
    name = per_channel_param(params)
    if name is not None:
        return (
            f"a per-channel {name} (shape {tuple(params[name].shape)}) has no kernel: the "
            f"kernels take one {name} for every channel"
        )
    return None


_LOAD_ERROR: list[str] = []
_LOADS: list[bool] = []  # the answer, once known


def cpu_kernels_load() -> bool:
    """Whether the numba CPU kernels import here (checked once per process). Their launcher
    uses some numba internals (see ``launch.py``); numba is pinned to the versions tested, but
    if an installed numba moved one, the kernels cannot load: globalpool then warns once and
    every call runs its torch composition.

    >>> cpu_kernels_load()
    True
    """
    if _LOADS:
        return _LOADS[0]
    if torch.compiler.is_compiling():  # no import inside a trace: the eager calls decide
        return True
    try:
        from globalpool.kernels import cpu_numba  # noqa: F401
    except Exception as error:  # any failure to build the kernels' module: fall back, say why
        _LOAD_ERROR.append(f"{type(error).__name__}: {error}")
        warnings.warn(
            f"globalpool's fused CPU kernels could not load with numba "
            f"{_numba_version()} ({_LOAD_ERROR[0]}); every call runs the torch composition "
            "(the same results, slower). Install a numba version globalpool supports "
            "(see its requirements) to get the kernels back.",
            RuntimeWarning,
            stacklevel=3,
        )
        _LOADS.append(False)
        return False
    _LOADS.append(True)
    return True


def _numba_version() -> str:
    try:
        from importlib.metadata import version

        return version("numba")
    except Exception:  # pragma: no cover - metadata missing
        return "(unknown version)"


def supports(x: torch.Tensor, kind: str, mask: torch.Tensor | None = None, **params: Any) -> bool:
    """True when a fused kernel exists for ``x``'s device and dtype and for ``kind`` (see
    :func:`unsupported`).

    >>> import torch
    >>> supports(torch.ones(2, 3, 4), "lse"), supports(torch.ones(2, 3, 4).int(), "avg")
    (True, False)
    >>> supports(torch.ones(2, 3, 4), "gem", p=torch.full((3,), 3.0))
    False
    """
    if not isinstance(x, torch.Tensor) or kind not in KINDS:
        return False
    return unsupported(x, kind, params) is None


def served(family: str = "cpu") -> tuple[str, ...]:
    """The registered kinds that ``family``'s kernels serve (``spec(kind).kernels``), in
    registration order.

    >>> served("cuda")[-1], "sum" in served("cpu"), "first" in served("cpu")
    ('attention', True, False)
    """
    return tuple(k for k in kinds() if family in spec(k).kernels)


def shared_pass(kinds: tuple[str, ...], family: str | None = None) -> tuple[str, ...]:
    """The kinds of ``kinds`` that one catavgmax pass of ``family``'s kernel gives (avg, max,
    avgmax, catavgmax and sum, where the family serves them; ``family=None``: the candidates,
    whatever the family); the caller reads x once for them when there are two or more.

    >>> shared_pass(("gem", "avg", "sum", "max"), "cpu"), shared_pass(("avg", "sum"), "cuda")
    (('avg', 'sum', 'max'), ('avg',))
    """
    if family is None:
        return tuple(k for k in kinds if k in _FROM_AVG_MAX)
    if family not in spec("catavgmax").kernels:
        return ()
    return tuple(k for k in kinds if k in _FROM_AVG_MAX and family in spec(k).kernels)


def per_channel_param(params: dict[str, Any]) -> str | None:
    """The name of the first per-channel parameter (``p`` or ``r`` given as a 1-D tensor) in
    ``params``, or None."""
    for name in ("p", "r"):
        value = params.get(name)
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return name
    return None


def _packed(sizes: list[int], strides: list[int]) -> bool:
    """Whether ``strides`` lay ``sizes`` out densely in this order (size-1 dims: any stride)."""
    expected = 1
    for size, stride in zip(reversed(sizes), reversed(strides), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _storage_plan(
    shape: tuple[int, ...], stride: tuple[int, ...], layout: str
) -> tuple[str, tuple[int, ...] | None, tuple[int, int, int], bool]:
    """How to take x's 3-D form in its memory order: ``(how, perm, shape3, channels_last)``.

    ``how`` is ``"view"`` (``x.reshape(shape3)``), ``"permuted"`` (``x.permute(perm)
    .reshape(shape3)``, still a view: x is stored in the other layout's order) or ``"copy"``
    (``x.permute(perm).contiguous().reshape(shape3)``). Cached per shape and strides: the
    analysis is pure Python and an eager call pays it with cold caches (:func:`_cached_plan`;
    torch.compile traces this uncached function).
    """
    ndim = len(shape)
    cdim = 1 if layout == "channels_first" else ndim - 1
    sdims = tuple(range(2, ndim)) if cdim == 1 else tuple(range(1, ndim - 1))
    n, c = shape[0], shape[cdim]
    length = math.prod([shape[d] for d in sdims])
    first_order = (0, cdim, *sdims)
    last_order = (0, *sdims, cdim)
    first = _packed([shape[d] for d in first_order], [stride[d] for d in first_order])
    last = _packed([shape[d] for d in last_order], [stride[d] for d in last_order])
    own, other = (first, last) if cdim == 1 else (last, first)
    own_order, other_order = (first_order, last_order) if cdim == 1 else (last_order, first_order)
    shape_first, shape_last = (n, c, length), (n, length, c)
    if own:
        return "view", None, shape_first if cdim == 1 else shape_last, cdim != 1
    if other:
        return "permuted", other_order, shape_last if cdim == 1 else shape_first, cdim == 1
    return "copy", own_order, shape_first if cdim == 1 else shape_last, cdim != 1


_cached_plan = functools.lru_cache(maxsize=1024)(_storage_plan)


def stored_channels_last(x: torch.Tensor, layout: str) -> bool:
    """Whether the fused kernel would read ``x`` as ``(N, L, C)`` (channels innermost in memory:
    a ``channels_last`` layout, or a channels-first tensor in ``torch.channels_last`` format).

    >>> import torch
    >>> x = torch.ones(2, 3, 4, 4)
    >>> stored_channels_last(x, "channels_first"), stored_channels_last(
    ...     x.contiguous(memory_format=torch.channels_last), "channels_first")
    (False, True)
    """
    return _cached_plan(x.shape, x.stride(), layout)[3]


def _view3(x: torch.Tensor, plan: tuple) -> torch.Tensor:
    how, perm, shape3, _ = plan
    if how == "view":  # a reshape: its gradient is a view too, unlike as_strided's
        return x.reshape(shape3)
    if how == "permuted":
        return x.permute(perm).reshape(shape3)
    return x.permute(perm).contiguous().reshape(shape3)


def _physical(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, bool]:
    """x as a contiguous 3-D tensor in its memory order: ((N, C, L), False) or ((N, L, C), True).

    Decided from x's strides (no ``is_contiguous`` probes of permuted views) and taken as a view
    when x is densely stored in either order (the layout's own first); otherwise copied into the
    layout's own order. Never ``as_strided``: its backward materialises a zero tensor of x's whole
    storage and scatters into it (measured: the fused backward fell to 0.2-0.6 of ``fill_``).
    """
    plan = _cached_plan(x.shape, x.stride(), layout)
    return _view3(x, plan), plan[3]


def _param(v: Any, default: float) -> float | torch.Tensor:
    return default if v is None else v


def fused_pool(
    x: torch.Tensor,
    kind: str,
    layout: str = "channels_first",
    mask: torch.Tensor | None = None,
    keepdim: bool = False,
    *,
    plan: Any = None,
    acc: bool = False,
    **params: Any,
) -> torch.Tensor:
    """Global pooling of ``x`` with the fused kernel; same meaning as ``globalpool.pool``.

    ``params``: ``p`` and ``eps`` for gem, ``r`` for lse (each a float or a 0-dim tensor; a
    tensor that requires grad gets a gradient), ``weights`` ``(N, *S)`` for attention (read in
    the accumulation dtype, float32 or float64, whatever their own dtype, as the composition
    reads them). ``plan``: the :class:`globalpool.dispatch.Plan` that chose this kernel (its
    ``mode`` says how to run it); a direct call without one runs the kernel as
    :func:`globalpool.dispatch.direct` says. ``acc``: the output in the accumulation dtype
    (float32 for half inputs) instead of x's, for callers that derive further results from it.

    >>> import torch
    >>> x = torch.tensor([[[1.0, 2.0, 4.0]]])
    >>> fused_pool(x, "gem", p=1.0), fused_pool(x, "catavgmax", "channels_first")
    (tensor([[2.3333]]), tensor([[2.3333, 4.0000]]))
    """
    if plan is None:
        plan = direct(x, params)
    mode = plan.mode
    n = x.shape[0]
    spatial_rank = x.ndim - 2
    graph = mode == "graph"
    st = (_storage_plan if graph else _cached_plan)(x.shape, x.stride(), layout)
    how, perm, shape3, channels_last = st
    length = shape3[2] if not channels_last else shape3[1]
    m = None if mask is None else mask.reshape(n, length).contiguous()
    p = _param(params.get("p"), 3.0)
    eps = _param(params.get("eps"), 1e-6)
    r = _param(params.get("r"), 1.0)
    w = params.get("weights") if kind == "attention" else None
    if w is not None:  # each skipped no-op call saves a dispatcher round trip (~20 us cold)
        wdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        w = (w if w.dtype == wdt else w.to(wdt)).reshape(n, length)
        w = w if w.is_contiguous() else w.contiguous()
    if graph:  # one custom op in the graph; its numbers are 0-dim tensors
        wdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        p, eps, r = (
            v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=wdt)
            for v in (p, eps, r)
        )
        out, _ = ops.pool_forward(_view3(x, st), channels_last, kind, m, p, eps, r, w, acc)
    elif mode == "inference":
        if x.is_cpu and how != "copy":  # the kernel takes x's 3-D view in NumPy (no torch op)
            out = ops.forward_only(x, channels_last, kind, m, p, eps, r, w, acc,
                                   view=(perm, shape3))
        else:
            out = ops.forward_only(_view3(x, st), channels_last, kind, m, p, eps, r, w, acc)
    else:
        out = ops.grid_pool(_view3(x, st), channels_last, kind, m, p, eps, r, w, acc)
    if not keepdim:
        return out
    width = out.shape[1]
    if layout == "channels_first":
        return out.reshape(n, width, *([1] * spatial_rank))
    return out.reshape(n, *([1] * spatial_rank), width)
