"""The benchmarked ways of pooling, and the two bandwidth ceilings they are measured against.

A :class:`Method` builds, for one :class:`~globalpool.lab.bench.shapes.Case`, a callable
``fn(x, params) -> Tensor`` that pools ``x`` (in the case's layout) with ``kind``. Families:

- ``seed``: the everyday PyTorch spellings of global average / max pooling
  (``F.avg_pool2d(x, x.shape[2:])``, ``F.adaptive_avg_pool2d(x, 1)``, ``x.mean((2, 3))``,
  ``x.view(N, C, -1).mean(2)``, ``x.amax((2, 3))``, ``F.adaptive_max_pool2d(x, 1)``). For 1d and
  3d shapes the ``1d``/``3d`` functional ops are used; for ``channels_last`` the ``F`` ops get the
  channels-first *view* ``x.movedim(-1, 1)`` (PyTorch's channels_last memory format, no copy) and
  the tensor methods reduce the equivalent dims.
- ``torch``: ``gp.pool(..., backend="torch")``, the composed pure-torch version of every kind.
- ``compile``: ``torch.compile`` of that composition (static shapes, compiled on first call).
- ``fused``: ``gp.pool(..., backend="fused")``, the single-pass kernel.

The ceilings are not pooling methods: ``x.sum()`` reads the input once (forward ceiling) and
``torch.empty_like(x).fill_(1.0)`` writes one new input-sized tensor (backward ceiling); the
informational ``buf.fill_(1.0)`` writes into a buffer allocated once (no page faults).

>>> [m.id for m in default_methods(("avg",), compile=False)][:3]
['seed:avg_pool', 'seed:adaptive_avg_pool', 'seed:mean']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from globalpool.lab.bench.shapes import Case

PoolFn = Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]
FAMILIES: tuple[str, ...] = ("seed", "torch", "compile", "fused")


def _always(case: Case) -> bool:
    return True


@dataclass(frozen=True)
class Method:
    """One benchmarked method.

    ``build(case)`` returns ``fn(x, params)``; ``kind`` is what it computes (checked against the
    NumPy reference); ``grad_rule`` is ``"shared"`` (tied maxima share the gradient, the
    contract) or ``"first"`` (the first arg-max takes it all, as ``adaptive_max_pool``).
    """

    id: str
    family: str
    kind: str
    build: Callable[[Case], PoolFn]
    label: Callable[[Case], str]
    applies: Callable[[Case], bool] = field(default=_always)
    grad_rule: str = "shared"


# ------------------------------------------------------------------------------------------
# seed methods


def _channels_first_view(x: torch.Tensor, case: Case) -> torch.Tensor:
    return x if case.layout == "channels_first" else x.movedim(-1, 1)


def _f_op(name: str, case: Case) -> Callable[..., torch.Tensor]:
    return getattr(F, f"{name}{case.shape.rank}d")


def _avg_pool(case: Case) -> PoolFn:
    op = _f_op("avg_pool", case)
    size = case.shape.dims[2:]
    return lambda x, params: op(_channels_first_view(x, case), size)


def _adaptive(name: str) -> Callable[[Case], PoolFn]:
    def build(case: Case) -> PoolFn:
        op = _f_op(name, case)
        return lambda x, params: op(_channels_first_view(x, case), 1)

    return build


def _reduce(op: str) -> Callable[[Case], PoolFn]:
    def build(case: Case) -> PoolFn:
        dims = case.spatial_dims
        return lambda x, params: getattr(x, op)(dims)

    return build


def _view_mean(case: Case) -> PoolFn:
    if case.layout == "channels_first":
        return lambda x, params: x.view(x.shape[0], x.shape[1], -1).mean(2)
    return lambda x, params: x.view(x.shape[0], -1, x.shape[-1]).mean(1)


def _spatial_text(case: Case) -> str:
    return str(case.spatial_dims) if case.shape.rank > 1 else str(case.spatial_dims[0])


def _f_label(name: str, arg: str) -> Callable[[Case], str]:
    def label(case: Case) -> str:
        x = "x" if case.layout == "channels_first" else "x.movedim(-1, 1)"
        return f"F.{name}{case.shape.rank}d({x}, {arg})"

    return label


SEED_METHODS: tuple[Method, ...] = (
    Method("seed:avg_pool", "seed", "avg", _avg_pool, _f_label("avg_pool", "S")),
    Method(
        "seed:adaptive_avg_pool",
        "seed",
        "avg",
        _adaptive("adaptive_avg_pool"),
        _f_label("adaptive_avg_pool", "1"),
    ),
    Method("seed:mean", "seed", "avg", _reduce("mean"), lambda c: f"x.mean({_spatial_text(c)})"),
    Method(
        "seed:view_mean",
        "seed",
        "avg",
        _view_mean,
        lambda c: (
            "x.view(N, C, -1).mean(2)"
            if c.layout == "channels_first"
            else "x.view(N, -1, C).mean(1)"
        ),
    ),
    Method("seed:amax", "seed", "max", _reduce("amax"), lambda c: f"x.amax({_spatial_text(c)})"),
    Method(
        "seed:adaptive_max_pool",
        "seed",
        "max",
        _adaptive("adaptive_max_pool"),
        _f_label("adaptive_max_pool", "1"),
        grad_rule="first",
    ),
)


# ------------------------------------------------------------------------------------------
# globalpool's two backends and torch.compile of the composition


def _gp_pool(kind: str, backend: str) -> Callable[[Case], PoolFn]:
    def build(case: Case) -> PoolFn:
        import globalpool as gp

        layout = case.layout
        return lambda x, params: gp.pool(x, kind, layout=layout, backend=backend, **params)

    return build


def _compiled(kind: str) -> Callable[[Case], PoolFn]:
    def build(case: Case) -> PoolFn:
        import globalpool as gp

        layout = case.layout

        def composed(x: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
            return gp.pool(x, kind, layout=layout, backend="torch", **params)

        # static shapes: one specialised graph per shape, compiled on the first (untimed) call
        return torch.compile(composed, dynamic=False)

    return build


def kind_methods(kind: str, *, compile: bool = True) -> list[Method]:
    """The composed, compiled (optional) and fused methods of one kind."""
    out = [
        Method(
            f"torch:{kind}",
            "torch",
            kind,
            _gp_pool(kind, "torch"),
            lambda c: f"gp.pool(x, {kind!r}, backend='torch')",
        ),
    ]
    if compile:
        out.append(
            Method(
                f"compile:{kind}",
                "compile",
                kind,
                _compiled(kind),
                lambda c: f"torch.compile(gp.pool(x, {kind!r}, backend='torch'))",
            )
        )
    out.append(
        Method(
            f"fused:{kind}",
            "fused",
            kind,
            _gp_pool(kind, "fused"),
            lambda c: f"gp.pool(x, {kind!r}, backend='fused')",
        )
    )
    return out


def default_methods(kinds: Sequence[str], *, compile: bool = True) -> list[Method]:
    """Seed methods for the kinds they compute, then every kind's torch/compile/fused methods."""
    seeds = [m for m in SEED_METHODS if m.kind in kinds]
    return seeds + [m for kind in kinds for m in kind_methods(kind, compile=compile)]


# ------------------------------------------------------------------------------------------
# ceilings


def ceiling_forward(x: torch.Tensor) -> torch.Tensor:
    """One read of ``x``: the forward bandwidth ceiling."""
    return x.sum()


def ceiling_backward(x: torch.Tensor) -> torch.Tensor:
    """One write of an ``x``-sized tensor: the backward bandwidth ceiling."""
    return torch.empty_like(x).fill_(1.0)


def ceiling_write(buf: torch.Tensor) -> torch.Tensor:
    """One write into an already allocated buffer: pure write bandwidth, no page faults."""
    return buf.fill_(1.0)


CEILING_LABELS = {
    "forward": "x.sum()",
    "backward": "torch.empty_like(x).fill_(1.0)",
    "write": "buf.fill_(1.0) (buf allocated once)",
}
