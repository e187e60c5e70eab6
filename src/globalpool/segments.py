"""Pooling of rows grouped by an index: ``pool_segments(x, index, kind, num_segments)``.

The rows of ``x`` ``(T, C)`` belong to segments (graphs of a batch, sets, bags) named by an
integer ``index`` ``(T,)``, in any order: what graph libraries call global pooling with a
``batch`` vector. The rows are stably sorted by segment and pooled as packed sequences by
:func:`globalpool.pool_packed`, so every kind (and every kind a user registers) is the same
function here as everywhere else; an index that is already sorted skips the sort.

>>> import torch, globalpool as gp
>>> x = torch.tensor([[1.0], [9.0], [3.0], [5.0]])
>>> gp.pool_segments(x, torch.tensor([0, 2, 0, 2]), "avg")
tensor([[2.],
        [0.],
        [7.]])
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from globalpool import contract, registry
from globalpool.packed import check_packed_input, deploying, pool_packed

__all__ = ["pool_segments"]

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# --------------------------------------------------------------------------------------------
# argument checks


def _in_graph() -> bool:
    """True while torch.compile, torch.export or a tracer records the call: the index has no
    value then, so its value checks become graph nodes and the sort is always taken."""
    return torch.compiler.is_compiling() or deploying()


def check_index(index: Any, x: torch.Tensor) -> None:
    """``index`` must be an integer tensor of shape ``(T,)`` on x's device.

    >>> check_index(torch.tensor([0.0, 1.0]), torch.zeros(2, 3))
    Traceback (most recent call last):
    ...
    TypeError: index must have an integer dtype (torch.int64, torch.int32, torch.int16, \
torch.int8 or torch.uint8), got torch.float32
    """
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype not in _INDEX_DTYPES:
        names = ", ".join(str(d) for d in _INDEX_DTYPES[:-1])
        raise TypeError(
            f"index must have an integer dtype ({names} or {_INDEX_DTYPES[-1]}), got "
            f"{index.dtype}"
        )
    if tuple(index.shape) != (x.shape[0],):
        raise ValueError(
            f"index must have shape (T,) = ({x.shape[0]},): one segment per row of x, got shape "
            f"{tuple(index.shape)}"
        )
    if index.device != x.device:
        raise ValueError(f"index must be on x's device {x.device}, got {index.device}")


def check_num_segments(num_segments: Any) -> None:
    """``num_segments`` must be None or an int >= 0 (a symbolic int inside a graph).

    >>> check_num_segments(-1)
    Traceback (most recent call last):
    ...
    ValueError: num_segments must be >= 0, got -1
    """
    if num_segments is None or isinstance(num_segments, torch.SymInt):
        return
    if isinstance(num_segments, bool) or not isinstance(num_segments, numbers.Integral):
        raise TypeError(
            f"num_segments must be an int or None, got {type(num_segments).__name__} "
            f"{num_segments!r}"
        )
    if num_segments < 0:
        raise ValueError(f"num_segments must be >= 0, got {num_segments}")


def _check_index_values(index: torch.Tensor, num_segments: int | None) -> int:
    """Check that every index lies in ``[0, num_segments)`` and return the number of segments
    (``index.max() + 1`` for None, 0 for no rows). Outside graphs: one copy of the index to the
    host; inside a graph the range is a graph node that raises a RuntimeError when it runs."""
    if _in_graph():
        if num_segments is None and deploying():
            raise ValueError(
                "num_segments must be given (an int) when exporting or tracing: the number of "
                "segments would otherwise be read from the index's values, which a recorded "
                "graph does not have"
            )
        if num_segments is None:  # data-dependent: a graph break under torch.compile
            num_segments = int(index.max()) + 1 if index.shape[0] else 0
        if index.shape[0]:
            contract._check_traced(
                ((index >= 0) & (index < num_segments)).all(),
                f"index must lie in [0, num_segments) = [0, {num_segments})",
            )
        return num_segments
    if index.shape[0] == 0:
        return 0 if num_segments is None else int(num_segments)
    host = index.detach().cpu()
    low, high = int(host.min()), int(host.max())
    if low < 0:
        row = int((host < 0).nonzero()[0, 0])
        raise ValueError(f"index must be >= 0, got index[{row}] = {int(host[row])}")
    if num_segments is None:
        return high + 1
    if high >= num_segments:
        row = int((host >= num_segments).nonzero()[0, 0])
        raise ValueError(
            f"index must be < num_segments = {num_segments}, got index[{row}] = {int(host[row])}"
        )
    return int(num_segments)


def _is_sorted(index: torch.Tensor) -> bool:
    """Whether ``index`` is non-decreasing (then no permutation is needed); always False inside
    a graph, where the sort is recorded whatever the values."""
    if _in_graph():
        return False
    return bool((index[1:] >= index[:-1]).all())


# --------------------------------------------------------------------------------------------
# the public function


def pool_segments(
    x: torch.Tensor,
    index: torch.Tensor,
    kind: str | tuple[str, ...] = "avg",
    num_segments: int | None = None,
    *,
    backend: str = "auto",
    **params: Any,
) -> torch.Tensor:
    """Pool the rows of ``x`` that share a segment ``index`` with one of :data:`globalpool.KINDS`.

    Graph and set pooling: ``index`` (a graph batch's ``batch`` vector) names the segment of
    each row, in any order. The rows are stably sorted by segment and pooled as packed
    sequences by :func:`globalpool.pool_packed` (an index that is already sorted goes there
    directly), so each kind is the function it is in ``gp.pool``: ``first`` and ``last`` give
    the segment's first and last row in the original row order, ``attention``'s ``weights``
    have one weight per row of ``x`` (in x's row order).

    Args:
        x: ``(T, C)`` rows, floating dtype.
        index: ``(T,)`` integer tensor on x's device: the segment of each row, in
            ``[0, num_segments)``, sorted or not.
        kind: any kind of ``gp.pool`` or a tuple of kinds (concatenated along channels), with its
            keyword parameters as :func:`globalpool.pool_packed` takes them (``p``, ``eps``,
            ``r`` a number, a 0-dim tensor or for ``p``/``r`` a ``(C,)`` tensor; a per-row
            parameter such as attention's ``weights`` of shape ``(T,)``).
        num_segments: the number of segments (rows of the result); None takes
            ``index.max() + 1`` (0 when x has no rows), which reads the index on the host. Give
            it to keep segments after the last index, and under ``torch.export`` and
            ``torch.compile(fullgraph=True)``.
        backend: as for :func:`globalpool.pool_packed`.

    Shape:
        ``x (T, C)``, ``index (T,)`` -> ``(num_segments, width * C)``.

    Returns:
        One row per segment in x's dtype (half inputs accumulate in float32). A segment with no
        row pools to 0 for every kind (``max`` too), with zero gradient.

    Outside graphs the index is checked on the host (one copy, one sync on a GPU): a negative
    index or one >= ``num_segments`` raises a ValueError naming the row. Inside
    ``torch.compile`` and ``torch.export`` the range check is a graph node that raises a
    RuntimeError when the graph runs (CPU), and the sort is always recorded.

    >>> import torch, globalpool as gp
    >>> x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 8.0], [4.0, 4.0]])
    >>> index = torch.tensor([1, 0, 1, 1])
    >>> gp.pool_segments(x, index, "max", num_segments=3)
    tensor([[3., 2.],
            [4., 8.],
            [0., 0.]])
    >>> gp.pool_segments(x, index, ("first", "last"))
    tensor([[3., 2., 3., 2.],
            [1., 0., 4., 4.]])
    """
    kind = contract.check_kinds(kind)
    check_packed_input(x)
    check_index(index, x)
    check_num_segments(num_segments)
    n = _check_index_values(index, num_segments)
    index = index.to(torch.int64).contiguous()
    if not _is_sorted(index):
        order = torch.argsort(index, stable=True)
        index = index.index_select(0, order)
        x = x.index_select(0, order)
        params = _rows_permuted(kind, params, order, x.shape[0])
    # sequence s is the rows holding index s: cu_seqlens[s] = the number of rows below s
    bounds = torch.arange(n + 1, dtype=torch.int64, device=index.device)
    cu_seqlens = torch.searchsorted(index, bounds)
    return pool_packed(x, cu_seqlens, kind, backend=backend, **params)


def _rows_permuted(
    kind: str | tuple[str, ...], params: dict[str, Any], order: torch.Tensor, rows: int
) -> dict[str, Any]:
    """``params`` with each per-row parameter (attention's ``weights``, a registered kind's
    per-position parameter) taken in ``order``; one of another shape is left as it is, for
    :func:`globalpool.pool_packed` to refuse with its shape in the message."""
    names = {q.name for k in contract.kinds_of(kind) for q in registry.spec(k).params
             if q.per_position}
    out = dict(params)
    for name in names:
        value = out.get(name)
        if isinstance(value, torch.Tensor) and value.shape == (rows,):
            out[name] = value.index_select(0, order.to(value.device))
    return out
