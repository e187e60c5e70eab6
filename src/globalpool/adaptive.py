"""Adaptive pooling as one exportable composition: every kind, per bin, PyTorch's bins.

Each pooled spatial dim of size ``In`` is split into ``Out`` bins, bin ``i`` covering
``[floor(i*In/Out), ceil((i+1)*In/Out))`` (neighbouring bins may overlap, ``Out`` may exceed
``In``). The bins of one dim are gathered into a ``(Out, L)`` window with ``index_select``, ``L``
being the longest bin; the slots past a bin's end are marked padded. The windows of every dim
together hold each bin's box, and the kind's own global composition (``compose.py``) pools each box
over its real positions, with the user's mask gathered the same way. So an adaptive bin keeps every
promise of global pooling (a padded position never reaches the output or the gradient, an empty
bin gives 0), and global pooling is the one-bin case.

The bin edges and ``L`` are arithmetic on the input's sizes (``arange``, integer division), never
Python branches on them, so the same graph serves every input size under ``torch.export``, the
ONNX exporter and ``torch.jit.trace``.

>>> import torch
>>> x = torch.arange(5.0).reshape(1, 1, 5)
>>> bin_windows(5, 3, x.device)
(tensor([0, 1, 1, 1, 2, 3, 3, 4, 4]), tensor([[ True,  True, False],
        [ True,  True,  True],
        [ True,  True, False]]))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from globalpool import registry
from globalpool.dispatch import deploying


def window_length(in_size: Any, out_size: int) -> Any:
    """Slots per bin window: the longest bin, exactly, for a concrete size; inside a graph
    (``torch.export``, ONNX, ``torch.compile``, ``jit.trace``) ``ceil(In / Out) + 1``, a bound on
    it that is written without a branch on the size and is provably >= 2, so the exporters need no
    guard on the input size (a longer window only adds padded slots).

    >>> window_length(14, 7), window_length(5, 3), window_length(7, 3), window_length(2, 4)
    (2, 3, 3, 1)
    """
    if isinstance(in_size, int) and not _in_graph():
        return max(
            ((i + 1) * in_size + out_size - 1) // out_size - (i * in_size) // out_size
            for i in range(out_size)
        )
    return (in_size + out_size - 1) // out_size + 1


def _in_graph() -> bool:
    """torch.compile is compiling, or an exporter or tracer is recording (:func:`deploying`)."""
    return torch.compiler.is_compiling() or deploying()


def bin_windows(
    in_size: Any, out_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat gather index ``(Out * L,)`` and the real-slot mask ``(Out, L)`` of one dim.

    Slots past a bin's end repeat the bin's last position (any real index would do: they are
    masked out before any arithmetic touches them).
    """
    length = window_length(in_size, out_size)
    i = torch.arange(out_size, device=device)
    start = (i * in_size) // out_size
    end = ((i + 1) * in_size + out_size - 1) // out_size
    index = start[:, None] + torch.arange(length, device=device)
    real = index < end[:, None]
    index = torch.minimum(index, end[:, None] - 1)
    return index.flatten(), real


def _gather(t: torch.Tensor, dim: int, index: torch.Tensor, out_size: int) -> torch.Tensor:
    """``t`` with ``dim`` replaced by ``(Out, L)`` bin windows: ``index_select`` in a graph (it
    maps to one ONNX ``Gather``), indexing in eager mode (2-4x faster on the CPU)."""
    if _in_graph():
        return t.index_select(dim, index).unflatten(dim, (out_size, -1))
    return t[(slice(None),) * dim + (index.view(out_size, -1),)]


def adaptive_compose(
    x: torch.Tensor,
    sizes: tuple[int | None, ...],
    kind: str,
    layout: str,
    mask: torch.Tensor | None,
    params: dict[str, Any],
) -> torch.Tensor:
    """Adaptive pooling of ``x`` (already in its accumulation dtype) to ``sizes``; ``None``
    keeps that dim. ``params`` are the kind's full, checked parameters; ``weights`` and ``mask``
    are ``(N, *S)`` at the input's resolution."""
    first = layout == "channels_first"
    spatial = list(range(2, x.ndim) if first else range(1, x.ndim - 1))
    # the mask and the per-position parameter (attention's weights) follow x's windows
    named = [q.name for q in registry.spec(kind).params if q.per_position]
    per_position = {"mask": mask, "weights": params[named[0]] if named else None}
    real = None  # the real-slot masks of the windows so far, aligned to x's trailing dims
    reduce: list[int] = []
    # in eager mode the sizes are plain ints and may pick a cheaper but equal form; a graph
    # (export, ONNX, compile, trace) always takes the one form that serves every size
    eager = not _in_graph()
    # last dim first: a window inserted at d never moves the dims still to come
    for d in reversed(spatial):
        out = sizes[d - spatial[0]]
        pos_dim = d - 1 if first else d  # the same dim in a per-position (N, *S) tensor
        if out is None:  # keep the dim: every position is a bin of its own
            x, window = x.unsqueeze(d + 1), d + 1
            per_position = {k: _unsqueeze(t, pos_dim + 1) for k, t in per_position.items()}
        elif out == 1:  # one bin over the whole dim: the dim itself is the window
            x, window = x.unsqueeze(d), d + 1
            per_position = {k: _unsqueeze(t, pos_dim) for k, t in per_position.items()}
        elif eager and x.shape[d] % out == 0:  # equal, disjoint bins: a view, no padded slot
            x, window = x.unflatten(d, (out, -1)), d + 1
            per_position = {k: _split(t, pos_dim, out) for k, t in per_position.items()}
        else:
            index, slots = bin_windows(x.shape[d], out, x.device)
            x, window = _gather(x, d, index, out), d + 1
            per_position = {k: _window(t, pos_dim, index, out) for k, t in per_position.items()}
            slots = slots.reshape(slots.shape + (1,) * (x.ndim - d - 2))
            real = slots if real is None else slots & real
        reduce = [r + 1 for r in reduce] + [window]
    channel_dim = 1 if first else x.ndim - 1
    keep = None if real is None else real.reshape((1,) * (x.ndim - real.ndim) + real.shape)
    if per_position["mask"] is not None:
        user = per_position["mask"].unsqueeze(channel_dim)
        keep = user if keep is None else user & keep
    # the canonical view: every bin a row (N * bins, C, window), the window flattened
    bin_dims = [d for d in range(1, x.ndim) if d != channel_dim and d not in reduce]
    order = [0, *bin_dims, channel_dim, *sorted(reduce)]
    out_shape = [x.shape[d] for d in (0, *bin_dims)]
    rows = x.shape[0]
    for d in bin_dims:
        rows = rows * x.shape[d]
    window = 1
    for d in reduce:
        window = window * x.shape[d]
    view = x.permute(order).reshape(rows, x.shape[channel_dim], window)
    one_channel = list(x.shape)
    one_channel[channel_dim] = 1

    def as_rows(t: torch.Tensor) -> torch.Tensor:  # aligned with x, one channel -> (rows, window)
        return t.expand(one_channel).permute(order).reshape(rows, window)

    full = dict(params)
    for q in registry.spec(kind).params:
        if q.per_position:
            full[q.name] = as_rows(per_position["weights"].unsqueeze(channel_dim))
    y = registry.run_composition(kind, view, None if keep is None else as_rows(keep), full)
    y = y.reshape(*out_shape, y.shape[1])
    return y.movedim(-1, 1) if first else y


_TORCH_OPS = {
    ("avg", 1): F.adaptive_avg_pool1d,
    ("avg", 2): F.adaptive_avg_pool2d,
    ("avg", 3): F.adaptive_avg_pool3d,
    ("max", 1): F.adaptive_max_pool1d,
    ("max", 2): F.adaptive_max_pool2d,
    ("max", 3): F.adaptive_max_pool3d,
}


def torch_adaptive_applies(x: torch.Tensor, kind: str) -> bool:
    """Whether torch's own adaptive ops give exactly this function, in one pass: eager mode,
    no mask (checked by the caller), ``avg`` always (the same bins, mean and gradient), and the
    max kinds only when no gradient is taken (torch sends a tied maximum's gradient to the first
    position, globalpool shares it)."""
    if _in_graph():
        return False
    if kind == "avg":
        return True
    if kind not in ("max", "avgmax", "catavgmax"):
        return False
    grad = torch.is_grad_enabled() and x.requires_grad
    return not grad and forward_ad.unpack_dual(x).tangent is None


def torch_adaptive(
    x: torch.Tensor, sizes: tuple[int | None, ...], kind: str, layout: str
) -> torch.Tensor:
    """Adaptive ``avg``/``max``/``avgmax``/``catavgmax`` with torch's ops (see
    :func:`torch_adaptive_applies`)."""
    first = layout == "channels_first"
    spatial = x.shape[2:] if first else x.shape[1:-1]
    out = tuple(i if s is None else s for s, i in zip(sizes, spatial, strict=True))
    acc = x.to(torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
    acc = acc if first else acc.movedim(-1, 1)
    rank = len(out)
    parts = [
        _TORCH_OPS[(k, rank)](acc, out)
        for k in {"avg": ("avg",), "max": ("max",)}.get(kind, ("avg", "max"))
    ]
    y = (parts[0] + parts[1]) / 2 if kind == "avgmax" else torch.cat(parts, dim=1)
    y = y if first else y.movedim(1, -1)
    return y.to(x.dtype)


def _unsqueeze(t: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    return None if t is None else t.unsqueeze(dim)


def _split(t: torch.Tensor | None, dim: int, out: int) -> torch.Tensor | None:
    return None if t is None else t.unflatten(dim, (out, -1))


def _window(
    t: torch.Tensor | None, dim: int, index: torch.Tensor, out: int
) -> torch.Tensor | None:
    return None if t is None else _gather(t, dim, index, out)
