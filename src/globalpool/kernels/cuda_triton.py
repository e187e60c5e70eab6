"""Triton backend of the fused global-pooling kernels (CUDA; CPU through Triton's interpreter).

Implements the fused-kernel interface shared with the numba CPU backend::

    forward(x, channels_last, kind, mask, p, eps, r, weights) -> (out, aux)
    backward(grad_out, x, out, aux, channels_last, kind, mask, p, eps, r, weights)
        -> (grad_x, grad_p or None, grad_weights or None)

``x`` is 3-D and contiguous: ``(N, C, L)`` or, with ``channels_last``, ``(N, L, C)``. ``triton`` is
imported only when a kernel first runs, so importing this module never needs it. CUDA tensors run
the compiled kernels; CPU tensors are accepted only when ``TRITON_INTERPRET=1`` is set, and then
run under Triton's interpreter (slow, for tests). Kernel structure (see
``cuda_triton_kernels.py``):

- forward, one read of x: channels first, one program per ``BR`` rows ``(n, c)`` looping over L
  in ``BL`` tiles; channels last, one program per ``(n, BC channels)`` looping over L in
  ``[BL, BC]`` tiles read along C. When those programs would not fill the GPU (few rows, long
  L) the L axis is split into ``SPLIT`` ranges (a second grid axis): each writes a partial state
  (sum, count, running max with arg-max and ties, or the lse running max) and a small combine
  kernel merges them — a deterministic two-stage reduction, chosen over atomics because the max
  kinds need (max, first arg-max, tie count) merged together.
- backward, one write of grad_x: avg never reads x; the max kinds scatter to the saved arg-max
  and read x only for rows whose maximum is tied; gem and lse read x and use the saved output
  (gem also reduces per-row partial sums for the gradient with respect to p, finished in
  torch); attention loops over channels per (n, L block), writing grad_x and, when grad
  weights is wanted (the only reason to read x), reducing it over channels.

Accumulation is float32 (float64 for float64 inputs); float parameters reach the kernels as
float32 (hi, lo) pairs so float64 runs keep their precision. Reductions are deterministic (no
atomics).

>>> import os, torch
>>> from globalpool.kernels import cuda_triton
>>> x = torch.arange(6.0).reshape(1, 2, 3)
>>> if os.environ.get("TRITON_INTERPRET") == "1":          # doctest: +SKIP
...     out, aux = cuda_triton.forward(x, False, "max", None, 3.0, 1e-6, 1.0, None)
...     out, aux[..., 0]
(tensor([[2., 5.]]), tensor([[2, 2]], dtype=torch.int32))
"""

from __future__ import annotations

import importlib.util
import math
import os
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["KIND_CODES", "backward", "forward", "is_available"]

KIND_CODES: dict[str, int] = {
    "avg": 0,
    "max": 1,
    "avgmax": 2,
    "catavgmax": 3,
    "gem": 4,
    "lse": 5,
    "attention": 6,
}
_MAX_KINDS = frozenset({"max", "avgmax", "catavgmax"})
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Launch tuning, untuned on hardware so far (benchmarks/gpu_check.py sweeps both): elements
# per tile, and warps per program (None: 8 for tiles of 4096 elements or more, else 4).
_TILE = 4096
_WARPS: int | None = None
_LN2 = math.log(2.0)

_LOADED: dict[bool, ModuleType] = {}
_SM_COUNT: dict[int, int] = {}


def is_available() -> bool:
    """True when ``triton`` can be imported (a GPU is still needed unless interpreting).

    >>> isinstance(is_available(), bool)
    True
    """
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        return False


# --------------------------------------------------------------------------------------------
# loading the kernels: one module copy per mode (compiled / interpreted)


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def _kernels(interpret: bool) -> ModuleType:
    """Load ``cuda_triton_kernels.py`` with Triton's interpreter on or off.

    ``@triton.jit`` picks interpreter or compiler when the decorator runs, so each mode gets its
    own copy of the module, loaded with ``TRITON_INTERPRET`` set accordingly.
    """
    mod = _LOADED.get(interpret)
    if mod is not None:
        return mod
    if not is_available():
        raise ModuleNotFoundError(
            "the Triton backend needs the optional dependency triton "
            "(pip install 'globalpool[cuda]')"
        )
    name = f"globalpool.kernels._cuda_triton_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).with_name("cuda_triton_kernels.py")
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    import triton  # noqa: F401 - first import under the process's own TRITON_INTERPRET

    with _env("TRITON_INTERPRET", "1" if interpret else "0"):
        spec.loader.exec_module(mod)
    _LOADED[interpret] = mod
    return mod


def _mode(x: torch.Tensor) -> bool:
    """Whether to interpret: CUDA tensors compile unless TRITON_INTERPRET=1; CPU must interpret."""
    if x.device.type == "cuda":
        return _interpret_requested()
    if _interpret_requested():
        return True
    raise ValueError(
        f"x must be a CUDA tensor for the Triton backend, got device {x.device} "
        "(set TRITON_INTERPRET=1 to run the kernels on CPU tensors with Triton's interpreter)"
    )


def _sm_count(x: torch.Tensor) -> int:
    if x.device.type != "cuda":
        return 1
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


# --------------------------------------------------------------------------------------------
# launch configuration


def _np2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class _Config:
    """Tile sizes, L split and warps for one launch (BR rows or BC channels by BL positions)."""

    br: int
    bl: int
    bc: int
    programs: int
    split: int
    l_per: int
    warps: int


def _config(
    n: int,
    c: int,
    length: int,
    channels_last: bool,
    itemsize: int,
    sm: int,
    split: int | None = None,
    block_l: int | None = None,
) -> _Config:
    """Pick tiles of about ``_TILE`` elements, then split L when there would be fewer than 2
    programs per SM (aiming at 4 per SM: below that a long-L reduction cannot keep enough loads
    in flight; above it the partial states and the combine launch cost more than they bring).
    ``split`` forces the number of L ranges and ``block_l`` caps the tile length (tests, tuning).

    >>> cfg = _config(2, 3, 700, False, 4, 1, split=3, block_l=64)
    >>> cfg.split, cfg.l_per, cfg.bl, cfg.br
    (3, 256, 64, 8)
    """
    cap = _np2(length) if block_l is None else _np2(block_l)
    if split is not None:
        cap = min(cap, _np2(_cdiv(length, max(1, int(split)))))
    if channels_last:
        bc = min(_np2(c), max(16, 512 // itemsize))  # 512-byte rows along C
        bl = min(cap, max(1, _TILE // bc))
        br = 1
        programs = n * _cdiv(c, bc)
    else:
        bl = min(cap, 1024)
        br = min(_np2(n * c), max(1, _TILE // bl))
        bc = 1
        programs = _cdiv(n * c, br)
    if split is None:
        split = min(_cdiv(4 * sm, programs), _cdiv(length, bl)) if programs < 2 * sm else 1
    split = max(1, min(int(split), length))
    l_per = _cdiv(_cdiv(length, split), bl) * bl
    split = _cdiv(length, l_per)
    return _Config(br, bl, bc, programs, split, l_per, _warps(br * bl * bc))


def _warps(elements: int) -> int:
    return _WARPS if _WARPS is not None else (8 if elements >= 4096 else 4)


# --------------------------------------------------------------------------------------------
# arguments


def _pair(v: float) -> tuple[float, float]:
    """Split a float into float32 (hi, lo) so kernels can rebuild it in float64 (~48 bits)."""
    v = float(v)
    if not math.isfinite(v) or abs(v) > 3.0e38:
        return v, 0.0
    hi = struct.unpack("f", struct.pack("f", v))[0]
    lo = struct.unpack("f", struct.pack("f", v - hi))[0]
    return hi, lo


def _p_int(kind: str, p: float) -> int:
    """Exponent as a compile-time integer when it is one of 1..4 (gem), else 0 (general pow)."""
    return int(p) if kind == "gem" and p in (1.0, 2.0, 3.0, 4.0) else 0


def _check(
    x: torch.Tensor,
    channels_last: bool,
    kind: str,
    mask: torch.Tensor | None,
    weights: torch.Tensor | None,
    contiguous: bool = True,
) -> tuple[int, int, int]:
    if kind not in KIND_CODES:
        raise ValueError(f"kind must be one of {tuple(KIND_CODES)}, got {kind!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 3-D tensor (N, C, L) or (N, L, C), got {shape}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must have dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"x must be contiguous, got strides {x.stride()}")
    if channels_last:
        n, length, c = x.shape
    else:
        n, c, length = x.shape
    if mask is not None:
        if mask.dtype != torch.bool or tuple(mask.shape) != (n, length):
            raise ValueError(
                f"mask must be a bool tensor of shape (N, L) = {(n, length)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        if mask.device != x.device or not mask.is_contiguous():
            raise ValueError(f"mask must be contiguous on {x.device}, got {mask.device}")
    if kind == "attention":
        if weights is None:
            raise ValueError("weights must be given for kind='attention', got None")
        # the weights keep (at least) the accumulation dtype's precision: float32 weights of
        # a float16 x are read as they are, as the composition reads them
        dtypes = (x.dtype, _acc_dtype(x))
        if tuple(weights.shape) != (n, length) or weights.dtype not in dtypes:
            raise ValueError(
                f"weights must have shape (N, L) = {(n, length)} and dtype {x.dtype} or "
                f"{_acc_dtype(x)}, got {weights.dtype} {tuple(weights.shape)}"
            )
        if weights.device != x.device or not weights.is_contiguous():
            raise ValueError(f"weights must be contiguous on {x.device}, got {weights.device}")
    return n, c, length


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tl_acc(k: ModuleType, x: torch.Tensor):  # -> tl.dtype
    return k.tl.float64 if x.dtype == torch.float64 else k.tl.float32


def _exponent(
    p: float | torch.Tensor | None, kind: str, x: torch.Tensor
) -> tuple[float, torch.Tensor | None]:
    """gem's p as (float, None), or as (nan, 0-dim tensor) when it is a one-element tensor on
    x's device: the kernels then read it themselves, so a learnable p costs no host sync."""
    if kind == "gem" and isinstance(p, torch.Tensor) and p.numel() == 1 and p.device == x.device:
        return math.nan, p.detach().reshape(())
    return _as_float(p, 3.0), None


def _as_float(v: float | torch.Tensor | None, default: float) -> float:
    if v is None:
        return default
    return float(v.detach().item()) if isinstance(v, torch.Tensor) else float(v)


# --------------------------------------------------------------------------------------------
# forward


def forward(
    x: torch.Tensor,
    channels_last: bool,
    kind: str,
    mask: torch.Tensor | None,
    p: float = 3.0,
    eps: float = 1e-6,
    r: float = 1.0,
    weights: torch.Tensor | None = None,
    *,
    acc_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool ``x`` over L in one pass; returns ``(out, aux)``.

    ``out`` is ``(N, C)`` (``(N, 2C)`` for catavgmax) in x's dtype (``acc_out``: in the
    accumulation dtype, float32 for half inputs); ``aux`` is int32
    ``(N, C, 2)`` = (first arg-max along L, tie count; -1 and 0 for an empty sample) for the
    max kinds; ``(N, C, 2)`` in the accumulation dtype = (maximum of x, log2 of the mean of
    2**(r log2(e) (x - maximum))) for lse, which its backward reads instead of the rounded output;
    else an empty float32 tensor (``torch.empty(0)``).

    >>> import os, torch
    >>> x = torch.tensor([[[1.0, 3.0, 3.0]]])
    >>> if os.environ.get("TRITON_INTERPRET") == "1":      # doctest: +SKIP
    ...     forward(x, False, "max", None)[1]
    tensor([[[1, 2]]], dtype=torch.int32)
    """
    out_dtype = _acc_dtype(x) if acc_out else None
    return _forward(x, channels_last, kind, mask, p, eps, r, weights, out_dtype=out_dtype)


def _forward(
    x: torch.Tensor,
    channels_last: bool,
    kind: str,
    mask: torch.Tensor | None,
    p: float | torch.Tensor | None,
    eps: float | None,
    r: float | None,
    weights: torch.Tensor | None,
    *,
    split: int | None = None,
    block_l: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, length = _check(x, channels_last, kind, mask, weights)
    (p, p_t), eps, r = _exponent(p, kind, x), _as_float(eps, 1e-6), _as_float(r, 1.0)
    oc = 2 * c if kind == "catavgmax" else c
    out = torch.empty((n, oc), dtype=out_dtype or x.dtype, device=x.device)  # stores cast to it
    if kind in _MAX_KINDS:
        aux = torch.empty((n, c, 2), dtype=torch.int32, device=x.device)
    elif kind == "lse":  # (max, log2 mean) per row, for an accurate backward
        aux = torch.zeros((n, c, 2), dtype=_acc_dtype(x), device=x.device)
    else:
        aux = torch.empty(0, device=x.device)  # float32, like the other backend and the fake op
    if out.numel() == 0 or length == 0:
        out.zero_()
        if kind in _MAX_KINDS:
            aux[..., 0] = -1
            aux[..., 1] = 0
        return out, aux
    k = _kernels(_mode(x))
    cfg = _config(n, c, length, channels_last, x.element_size(), _sm_count(x), split, block_l)
    acc_t = _acc_dtype(x)
    tl_acc = _tl_acc(k, x)
    code = KIND_CODES[kind]
    zs = r / _LN2
    scalars = (*_pair(p), *_pair(eps), *_pair(zs), *_pair(1.0 / zs), *_pair(1.0 / p))

    m8 = None if mask is None else mask.view(torch.uint8)
    w = weights if kind == "attention" else None
    consts = dict(
        KIND=code,
        CL=bool(channels_last),
        HAS_MASK=mask is not None,
        P_PTR=p_t is not None,
        P_INT=_p_int(kind, p),
        ACC=tl_acc,
        BR=cfg.br,
        BL=cfg.bl,
        BC=cfg.bc,
        num_warps=cfg.warps,
    )
    grid = (cfg.programs, cfg.split)
    if cfg.split == 1:
        k._pool_fwd[grid](
            x, m8, w, out, aux, None, None, None, None, None, None, p_t,
            n, c, length, cfg.l_per, 1, *scalars, FINAL=True, **consts,
        )  # fmt: skip
        return out, aux
    rows = n * c

    def buf(dtype: torch.dtype, needed: bool) -> torch.Tensor | None:
        return torch.empty((rows, cfg.split), dtype=dtype, device=x.device) if needed else None

    with_max = kind in _MAX_KINDS or kind in ("lse", "gem")
    part = [buf(acc_t, True), buf(acc_t, True), buf(acc_t, with_max)]
    ipart = [buf(torch.int32, kind in _MAX_KINDS) for _ in range(3)]
    k._pool_fwd[grid](
        x, m8, w, out, aux, *part, *ipart, p_t,
        n, c, length, cfg.l_per, cfg.split, *scalars, FINAL=False, **consts,
    )  # fmt: skip
    bs = _np2(cfg.split)
    br = min(_np2(rows), max(1, 1024 // bs))
    k._pool_combine[(_cdiv(rows, br),)](
        out, aux, *part, *ipart, p_t, n, c, cfg.split, *scalars[4:],
        KIND=code, P_PTR=p_t is not None, ACC=tl_acc, BR=br, BS=bs, num_warps=4,
    )  # fmt: skip
    return out, aux


# --------------------------------------------------------------------------------------------
# backward


def backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor | None,
    aux: torch.Tensor | None,
    channels_last: bool,
    kind: str,
    mask: torch.Tensor | None,
    p: float = 3.0,
    eps: float = 1e-6,
    r: float = 1.0,
    weights: torch.Tensor | None = None,
    *,
    need_p: bool = True,
    need_weights: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients from ``grad_out`` (shaped like ``out``), x, out and aux in one write of grad_x.

    Returns ``(grad_x, grad_p, grad_weights)``: grad_p is a 0-dim float32 tensor for gem (else
    None), grad_weights is ``(N, L)`` in the weights' dtype for attention (else None). Padded
    positions and empty samples get exactly 0. x is read by gem, lse, attention (only for
    grad_weights) and the max kinds' tied rows; for avg it may be a placeholder of the right
    shape and dtype (e.g. an expanded scalar), and ``out``/``aux`` may be None where unused (out
    is read by gem and lse only; aux by the max kinds). ``need_p=False`` /
    ``need_weights=False`` skip grad p / grad weights (returned as None); without grad weights
    the attention backward does not read x at all.

    >>> import os, torch
    >>> x = torch.tensor([[[1.0, 3.0, 3.0]]])
    >>> if os.environ.get("TRITON_INTERPRET") == "1":      # doctest: +SKIP
    ...     out, aux = forward(x, False, "max", None)
    ...     backward(torch.ones(1, 1), x, out, aux, False, "max", None)[0]
    tensor([[[0.0000, 0.5000, 0.5000]]])
    """
    return _backward(
        grad_out, x, out, aux, channels_last, kind, mask, p, eps, r, weights,
        need_p=need_p, need_weights=need_weights,
    )  # fmt: skip


def _counts(mask: torch.Tensor | None, n: int, length: int, acc_t: torch.dtype, device):
    if mask is None:
        return torch.full((n,), float(length), dtype=acc_t, device=device)
    return mask.sum(1, dtype=acc_t)


def _inverse(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v > 0, 1.0 / torch.where(v > 0, v, 1.0), 0.0)


def _backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor | None,
    aux: torch.Tensor | None,
    channels_last: bool,
    kind: str,
    mask: torch.Tensor | None,
    p: float | torch.Tensor | None,
    eps: float | None,
    r: float | None,
    weights: torch.Tensor | None,
    *,
    need_p: bool = True,
    need_weights: bool = True,
    split: int | None = None,
    block_l: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    n, c, length = _check(x, channels_last, kind, mask, weights, contiguous=kind != "avg")
    (p, p_t), eps, r = _exponent(p, kind, x), _as_float(eps, 1e-6), _as_float(r, 1.0)
    oc = 2 * c if kind == "catavgmax" else c
    if grad_out.numel() != n * oc:
        raise ValueError(
            f"grad_out must have {n * oc} elements (output shape ({n}, {oc})), "
            f"got shape {tuple(grad_out.shape)}"
        )
    g = grad_out.reshape(n, oc).contiguous()
    if kind in ("gem", "lse"):
        if out is None or out.numel() != n * oc:
            raise ValueError(f"out must be the forward output ({n}, {oc}) for kind={kind!r}")
        out = out.reshape(n, oc).contiguous()
        lse_aux = aux is not None and tuple(aux.shape) == (n, c, 2) and aux.is_floating_point()
        if kind == "lse" and not lse_aux:  # its (max, log-mean), taken again
            aux = _forward(x, channels_last, kind, mask, None, None, r, None)[1]
        if kind == "gem" and x.dtype in (torch.float16, torch.bfloat16):
            # (x / out)^(p - 1) with out rounded to x's dtype is off by up to (p - 1) 2**-9 in
            # bfloat16: take the output again in float32 (one more read of x, half inputs only)
            out = _forward(x, channels_last, kind, mask, p if p_t is None else p_t, eps, r, None,
                           out_dtype=torch.float32)[0]  # fmt: skip
    else:
        out = None
    if kind in _MAX_KINDS:
        if aux is None or tuple(aux.shape) != (n, c, 2) or aux.dtype != torch.int32:
            raise ValueError(
                f"aux must be the forward's int32 (N, C, 2) = {(n, c, 2)} tensor for "
                f"kind={kind!r}, got {None if aux is None else (aux.dtype, tuple(aux.shape))}"
            )
        aux = aux.contiguous()
    elif kind == "lse":
        aux = aux.contiguous()
    else:
        aux = None
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    acc_t = _acc_dtype(x)
    need_p = need_p and kind == "gem"
    need_w = need_weights and kind == "attention"
    grad_p = torch.zeros((), dtype=torch.float32, device=x.device) if need_p else None
    grad_w = torch.zeros_like(weights) if need_w else None
    if x.numel() == 0:
        return grad_x.zero_(), grad_p, grad_w
    k = _kernels(_mode(x))
    tl_acc = _tl_acc(k, x)
    m8 = None if mask is None else mask.view(torch.uint8)
    sm = _sm_count(x)
    if kind == "attention":
        w = weights.to(acc_t)
        w_real = w if mask is None else torch.where(mask, w, 0.0)
        isw = _inverse(w_real.sum(1))
        bl, bc, c_per, csplit, warps = _attn_config(
            n, c, length, channels_last, x.element_size(), sm, split, block_l
        )
        pgw = torch.empty((csplit, n, length), dtype=acc_t, device=x.device) if need_w else None
        k._attn_bwd[(n, _cdiv(length, bl), csplit)](
            g, x, m8, weights, isw, grad_x, pgw, n, c, length, c_per,
            CL=bool(channels_last), HAS_MASK=mask is not None, NEED_W=need_w, ACC=tl_acc,
            BL=bl, BC=bc, num_warps=warps,
        )  # fmt: skip
        if need_w:  # d_l = sum_c g_c x_cl / S; grad_w = d - sum_l w_l d_l / S (real positions)
            d = pgw[0] if csplit == 1 else pgw.sum(0)
            d = d - ((w_real * d).sum(1) * isw)[:, None]
            grad_w = (d if mask is None else torch.where(mask, d, 0.0)).to(weights.dtype)
        return grad_x, None, grad_w
    cnt = _counts(mask, n, length, acc_t, x.device)
    icnt = _inverse(cnt)
    cfg = _config(n, c, length, channels_last, x.element_size(), sm, split, block_l)
    zs = r / _LN2
    ps = pt = None
    if need_p:
        ps = torch.empty((n * c, cfg.split), dtype=acc_t, device=x.device)
        pt = torch.empty_like(ps)
    k._pool_bwd[(cfg.programs, cfg.split)](
        g, x, out, aux, m8, icnt, grad_x, ps, pt, p_t,
        n, c, length, cfg.l_per, cfg.split, *_pair(p), *_pair(eps), *_pair(zs),
        KIND=KIND_CODES[kind], CL=bool(channels_last), HAS_MASK=mask is not None,
        NEED_P=need_p, P_PTR=p_t is not None, P_INT=_p_int(kind, p), ACC=tl_acc, BR=cfg.br,
        BL=cfg.bl, BC=cfg.bc,
        num_warps=cfg.warps,
    )  # fmt: skip
    if need_p:
        grad_p = _gem_grad_p(g, ps, pt, cnt, out, p if p_t is None else p_t.double(), n, c)
    return grad_x, grad_p, None


def _gem_grad_p(
    g: torch.Tensor,
    ps: torch.Tensor,
    pt: torch.Tensor,
    cnt: torch.Tensor,
    y: torch.Tensor,
    p: float | torch.Tensor,
    n: int,
    c: int,
) -> torch.Tensor:
    """d/dp of sum(g * y), y = m^(1/p), m = mean max(x, eps)^p: with z = max(x, eps) / y (so
    mean z^p = 1), y * T / (p S) per row, S = sum z^p and T = sum z^p ln z over the real
    positions (kernel partials, log base 2)."""
    s = ps.double().sum(1).view(n, c)
    t = pt.double().sum(1).view(n, c) * _LN2
    y = y.double().view(n, c)
    real = (cnt.double().view(n, 1) > 0) & (s > 0) & torch.isfinite(y)
    dydp = torch.where(real, y * t / (p * torch.where(real, s, 1.0)), 0.0)
    return (g.double() * dydp).sum().float()


def _attn_config(
    n: int,
    c: int,
    length: int,
    channels_last: bool,
    itemsize: int,
    sm: int,
    split: int | None = None,
    block_l: int | None = None,
) -> tuple[int, int, int, int, int]:
    """(BL, BC, channels per split, C splits, warps) for the attention backward, which splits
    C (not L) when (N, L-block) programs would not fill the device.

    >>> _attn_config(2, 40, 9, True, 4, 1, split=3)
    (16, 16, 16, 3, 4)
    """
    cap = _np2(c) if split is None else _np2(_cdiv(c, max(1, int(split))))
    lcap = _np2(length) if block_l is None else min(_np2(length), _np2(block_l))
    if channels_last:
        bc = min(cap, max(16, 512 // itemsize))
        bl = min(lcap, max(1, _TILE // bc))
    else:
        bl = min(lcap, 256)
        bc = min(cap, max(1, _TILE // bl))
    programs = n * _cdiv(length, bl)
    if split is None:
        split = min(_cdiv(4 * sm, programs), _cdiv(c, bc)) if programs < 2 * sm else 1
    split = max(1, min(int(split), c))
    c_per = _cdiv(_cdiv(c, split), bc) * bc
    split = _cdiv(c, c_per)
    return bl, bc, c_per, split, _warps(bl * bc)
