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

**Graphs** (export, ONNX, ``torch.compile``, ``jit.trace``) take the cheapest form that is still
exact for every size the graph can meet (:func:`graph_form`):

* a dim whose size is *fixed* in the graph (a plain int under ``torch.export`` / the ONNX dynamo
  exporter / ``torch.compile``, never under ``jit.trace`` or the TorchScript ONNX exporter, whose
  sizes are only examples) and divisible by its output size is viewed as equal, disjoint windows
  ``(Out, In / Out)``, as in eager mode; when every pooled dim is so and there is no mask,
  ``avg`` / ``max`` / ``avgmax`` / ``catavgmax`` record torch's own adaptive ops (ONNX
  ``AveragePool`` / ``MaxPool``);
* otherwise (a dynamic or non-divisible size) ``avg``, ``sum`` and ``attention`` are sums over
  bins: each pooled dim is contracted with a small 0/1 bin-membership matrix ``(In, Out)`` (one
  ``MatMul`` per dim). A non-finite value would poison every bin of its row there (``inf * 0`` is
  NaN), so the values are summed with their non-finite entries zeroed and the non-finite ones are
  counted apart (a bin holding ``+inf`` only gives ``+inf``, ``-inf`` only ``-inf``, NaN or both
  NaN), exactly what the windowed sum gives;
* every other kind (the max kinds, ``gem`` and ``lse``, which scale each bin by its own maximum,
  ``first`` / ``last`` and user kinds) gathers the bin windows as above.

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


def fixed(size: Any) -> bool:
    """Whether a size is fixed in the graph being recorded (or run): a plain int, outside
    ``jit.trace`` and the TorchScript ONNX exporter (their ints are one example's sizes, the
    recorded graph must serve others). ``torch.export`` makes a dynamic dim a ``SymInt``;
    ``torch.compile`` guards on a plain int, so a graph specialised on it is recompiled when it
    changes.

    >>> fixed(7), fixed(torch.tensor(7))
    (True, False)
    """
    return isinstance(size, int) and not torch.jit.is_tracing()


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
    if _in_graph():
        form = graph_form(x, sizes, kind, layout, mask, params)
        if form == "torch":
            return torch_adaptive(x, sizes, kind, layout)
        if form == "binned":
            return binned_compose(x, sizes, kind, layout, mask, params)
    # the mask and the per-position parameter (attention's weights) follow x's windows
    named = [q.name for q in registry.spec(kind).params if q.per_position]
    per_position = {"mask": mask, "weights": params[named[0]] if named else None}
    real = None  # the real-slot masks of the windows so far, aligned to x's trailing dims
    reduce: list[int] = []
    # a fixed size (always in eager mode, see :func:`fixed`) may pick a cheaper but equal form;
    # a dynamic size takes the one form that serves every size
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
        elif fixed(x.shape[d]) and x.shape[d] % out == 0:
            # equal, disjoint bins: a view, no padded slot
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
    out_shape = [x.shape[d] for d in (0, *bin_dims)]
    rows = x.shape[0]
    for d in bin_dims:
        rows = rows * x.shape[d]
    window = 1
    for d in reduce:
        window = window * x.shape[d]
    dims = ([0, *bin_dims], channel_dim, sorted(reduce))
    view = _rows_view(x, *dims, rows, window)
    one_channel = list(x.shape)
    one_channel[channel_dim] = 1

    def as_rows(t: torch.Tensor) -> torch.Tensor:  # aligned with x, one channel -> (rows, window)
        return _rows_view(t.expand(one_channel), *dims, rows, window)[:, 0]

    full = dict(params)
    for q in registry.spec(kind).params:
        if q.per_position:
            full[q.name] = as_rows(per_position["weights"].unsqueeze(channel_dim))
    y = registry.run_composition(kind, view, None if keep is None else as_rows(keep), full)
    y = y.reshape(*out_shape, y.shape[1])
    return y.movedim(-1, 1) if first else y


def _rows_view(
    t: torch.Tensor,
    row_dims: list[int],
    channel_dim: int,
    window_dims: list[int],
    rows: Any,
    window: Any,
) -> torch.Tensor:
    """``t`` as ``(rows, C, window)``: ``row_dims`` (the batch, then the bins) merged into the
    rows, ``window_dims`` into the window.

    In eager mode one ``reshape``. In a graph with dynamic sizes a window length is an integer
    division of a spatial size (``ceil(In / Out) + 1``), which the exporters' symbolic sizes
    cannot factor: merging two dims whose strides are both multiples of it gives a stride that
    is the symbolic minimum of the two, and splitting a size ``C * length`` by the length asks
    whether it divides; ``torch.export`` turns both into guards on the spatial size that it
    cannot prove for every size and refuses the dynamic dim. So a graph lays ``t`` out as
    ``(rows, C, window)`` in one flat copy (``reshape`` copies the gathered windows too) and
    splits it, the window last: every stride is a product of sizes, every split exact.
    """
    ordered = t.permute([*row_dims, channel_dim, *window_dims])
    channels = t.shape[channel_dim]
    if not _in_graph():
        return ordered.reshape(rows, channels, window)
    return ordered.reshape(-1).view(rows, channels, window)


#: kinds whose bins are sums (or ratios of sums) of per-position values: a graph with a dynamic
#: or non-divisible size contracts each pooled dim with a 0/1 bin-membership matrix
BINNED_KINDS = frozenset({"avg", "sum", "attention"})


def graph_form(
    x: torch.Tensor,
    sizes: tuple[int | None, ...],
    kind: str,
    layout: str,
    mask: torch.Tensor | None,
    params: dict[str, Any],
) -> str:
    """The form a graph records (see the module docstring): ``"torch"`` (torch's adaptive ops:
    every pooled dim fixed and divisible, no mask, a kind they give exactly), ``"binned"``
    (bin-membership matmuls: :data:`BINNED_KINDS` with a dynamic or non-divisible size) or
    ``"windows"`` (views of equal bins where sizes are fixed and divisible, gathered windows
    elsewhere).

    >>> x = torch.zeros(2, 3, 7, 7)
    >>> graph_form(x, (3, 3), "avg", "channels_first", None, {})
    'binned'
    >>> graph_form(x, (7, 1), "avg", "channels_first", None, {}), graph_form(
    ...     x, (7, 1), "gem", "channels_first", None, {})
    ('torch', 'windows')
    """
    spatial = x.shape[2:] if layout == "channels_first" else x.shape[1:-1]
    if all(fixed(i) and (o is None or i % o == 0) for o, i in zip(sizes, spatial, strict=True)):
        return "torch" if mask is None and _torch_ops_exact(x, kind) else "windows"
    return "binned" if kind in BINNED_KINDS else "windows"


def bin_matrix(in_size: Any, out_size: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """The ``(In, Out)`` 0/1 matrix of one dim: 1 where position ``i`` lies in bin ``b``
    (PyTorch's bins, written without a branch on ``In``).

    >>> bin_matrix(5, 3, torch.float32, torch.device("cpu")).T
    tensor([[1., 1., 0., 0., 0.],
            [0., 1., 1., 1., 0.],
            [0., 0., 0., 1., 1.]])
    """
    i = torch.arange(in_size, device=device)[:, None]
    b = torch.arange(out_size, device=device)
    start = (b * in_size) // out_size
    end = ((b + 1) * in_size + out_size - 1) // out_size
    return ((i >= start) & (i < end)).to(dtype)


def _contract(t: torch.Tensor, dim: int, matrix: torch.Tensor, left: bool) -> torch.Tensor:
    """``t`` with ``dim`` (size In) summed into bins (size Out) by ``matrix`` ``(In, Out)``, one
    matmul, never a transpose of ``t`` (onnxruntime's transposes of such shapes cost 10-30x the
    matmul).

    ``left`` (channels-last: the trailing dims, channels among them, are the long side):
    ``matrix.T @ t.flatten(dim + 1)``. Else (channels-first) the last dim is multiplied on the
    right, and an earlier dim, once the dims after it (``K`` values, all of fixed size) are
    contracted, with ``kron(matrix, eye(K))`` ``(In * K, Out * K)`` on the right: one GEMM over
    the already reduced tensor. A dynamic kept (``None``) dim after it takes the left product."""
    if dim == t.ndim - 1:
        return t @ matrix
    rest = t.shape[dim + 1:]
    if left or not all(fixed(s) for s in rest):
        return (matrix.transpose(0, 1) @ t.flatten(dim + 1)).unflatten(-1, rest)
    k = 1
    for s in rest:
        k *= s
    eye = torch.eye(k, dtype=matrix.dtype, device=matrix.device)
    kron = (matrix[:, None, :, None] * eye[None, :, None, :]).flatten(2).flatten(0, 1)
    return (t.flatten(dim) @ kron).unflatten(-1, (matrix.shape[1], *rest))


def binned_compose(
    x: torch.Tensor,
    sizes: tuple[int | None, ...],
    kind: str,
    layout: str,
    mask: torch.Tensor | None,
    params: dict[str, Any],
) -> torch.Tensor:
    """``avg`` / ``sum`` / ``attention`` adaptive pooling as sums over bins (one matmul per
    pooled dim, no gather), with the same arguments and result as :func:`adaptive_compose`.

    Exactly the windowed sums of ``compose.py``: padded positions are zeroed before any
    product, an empty bin gives 0, and a non-finite value only reaches its own bins (see
    :func:`_exact_bin_sum`)."""
    first = layout == "channels_first"
    spatial = range(2, x.ndim) if first else range(1, x.ndim - 1)
    matrices = [
        (d, bin_matrix(x.shape[d], out, x.dtype, x.device))
        for d, out in zip(spatial, sizes, strict=True) if out is not None
    ]

    def bins(t: torch.Tensor) -> torch.Tensor:  # aligned with x (any channel count)
        for d, matrix in reversed(matrices):
            t = _contract(t, d, matrix, left=not first)
        return t

    channel_dim = 1 if first else x.ndim - 1
    keep = None if mask is None else mask.unsqueeze(channel_dim)
    values = x if keep is None else torch.where(keep, x, 0.0)
    if kind == "attention":
        named = [q.name for q in registry.spec(kind).params if q.per_position]
        weights = params[named[0]].to(x.dtype).unsqueeze(channel_dim)
        if keep is not None:
            weights = torch.where(keep, weights, 0.0)
        total = _exact_bin_sum(weights, bins)
        positive = total > 0
        y = _exact_bin_sum(values * weights, bins) / torch.where(positive, total, 1.0)
        return torch.where(positive, y, 0.0)
    total = _exact_bin_sum(values, bins)
    if kind == "sum":
        return total
    if keep is None:
        one_channel = list(x.shape)
        one_channel[channel_dim] = 1
        count = bins(x.new_ones(one_channel))
    else:
        count = bins(keep.to(x.dtype))
    return total / count.clamp(min=1)


def _exact_bin_sum(values: torch.Tensor, bins: Any) -> torch.Tensor:
    """``bins(values)`` as the windowed sum gives it when values hold inf or NaN.

    A matmul multiplies them by the matrix's zeros, NaN in every bin of their row; but then the
    plain matmul's result is non-finite exactly where a bin's rows held one, so a finite result
    is exact. Only when some bin came out non-finite (checked on the small result, inside the
    graph: ``torch.cond``, an ONNX ``If``) are the sums redone exactly: the finite values with
    the others zeroed, the non-finite ones counted apart (all of them, and +inf minus -inf), so
    that a bin holding only +inf (-inf) among them gives +inf (-inf), any NaN or both
    infinities NaN. ``jit.trace`` records no ``cond``: there the exact sums always run.

    Both branches of the ``cond`` return a tensor of ``plain``'s shape, the exact one reshaped
    to it (a no-op at run time): ``torch.export`` traces each operand of a ``cond`` with sizes of
    its own, so an exact result shaped after ``values`` would not be provably the size of
    ``plain``, and the ``cond``'s output would get an unbacked size (asserted >= 2, the export
    then fails at batch 1)."""
    plain = bins(values)
    if torch.jit.is_tracing():
        return _exact_sums(values, plain, bins)
    if not torch.compiler.is_compiling():  # not recorded (tests): the same choice, in Python
        return plain if bool(torch.isfinite(plain).all()) else _exact_sums(values, plain, bins)
    return torch.cond(
        torch.isfinite(plain).all(),
        lambda v, y: y.clone(),
        lambda v, y: _exact_sums(v, y, bins).reshape(y.shape),
        (values, plain),
    )


def _exact_sums(values: torch.Tensor, plain: torch.Tensor, bins: Any) -> torch.Tensor:
    finite = torch.isfinite(values)
    total = bins(torch.where(finite, values, 0.0))
    bad = bins((~finite).to(values.dtype))
    net = bins((values == torch.inf).to(values.dtype) - (values == -torch.inf).to(values.dtype))
    special = torch.where(net == bad, torch.inf, torch.where(net == -bad, -torch.inf, torch.nan))
    return torch.where(bad > 0, special, total)


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
    return not _in_graph() and _torch_ops_exact(x, kind)


def _torch_ops_exact(x: torch.Tensor, kind: str) -> bool:
    """Whether torch's adaptive ops give ``kind`` exactly on ``x``, value and gradient."""
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
