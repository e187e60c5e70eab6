"""The modules of the export matrix, with their inputs and dynamic dims (private test helper).

A case builds one module for a backend and a spatial rank and makes its inputs at any batch and
spatial size: ``x`` ``(N, C, *S)``, a bool ``mask`` ``(N, *S)`` where the module takes one (the
last sample of a batch of 3 or more is all padding), and for ``GlobalPool("attention")`` the
``weights`` ``(N, *S)`` as a third input. Modules are built in ``eval`` mode.

>>> case = CASES_BY_NAME["ClassifierHead[gem]"]
>>> built = case.build("auto", 2)
>>> [tuple(t.shape) for t in built.inputs(3, (10, 9))]
[(3, 4, 10, 9), (3, 10, 9)]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import globalpool as gp
from globalpool.lab.models.multiscale import MultiScaleNet

CHANNELS = 4
CLASSES = 3
RANKS = (1, 2, 3)
BACKENDS = ("auto", "fused")
EXPORT_BATCH = 2
EXPORT_SIZE = {1: (7,), 2: (7, 5), 3: (5, 5, 3)}
# sizes other than the export size, a batch change among them; the batch of 1 is the one that
# torch.export and torch.compile treat specially
NEW_SIZES = {
    1: [(3, (10,)), (1, (13,))],
    2: [(3, (10, 9)), (1, (6, 11))],
    3: [(3, (6, 7, 5)), (1, (4, 9, 5))],
}
# non-divisible output sizes for every export and new size above
ADAPTIVE_OUTPUT = {1: (3,), 2: (3, 2), 3: (3, 2, 2)}


class _WeightsAsInput(nn.Module):
    """``GlobalPool("attention")`` / ``AdaptivePool(..., "attention")`` with its ``weights`` as
    a positional input."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.layer(x, mask, weights=weights)


def _swapped_cnn(rank: int, backend: str) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[rank]
    net = nn.Sequential(
        conv(CHANNELS, 8, 3, padding=1), nn.ReLU(), pool(1), nn.Flatten(), nn.Linear(8, CLASSES)
    )
    return gp.swap_pool(net, "catavgmax", classifier="4", backend=backend)


@dataclass
class Built:
    """A module ready to export, and how to make its inputs."""

    module: nn.Module
    names: tuple[str, ...]  # forward's positional inputs: x, then mask, then weights
    static_spatial: bool = False  # only the batch size may change
    spatial_min: int = 2
    notes: list[str] = field(default_factory=list)

    def inputs(self, n: int, spatial: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed + 1000 * n + sum(spatial))
        out = [torch.randn((n, CHANNELS, *spatial), generator=gen)]
        if "mask" in self.names:
            mask = torch.rand((n, *spatial), generator=gen) < 0.7
            mask.view(n, -1)[:, 0] = True
            if n >= 3:
                mask[-1] = False  # an all-padded sample pools to 0
            out.append(mask)
        if "weights" in self.names:
            out.append(torch.rand((n, *spatial), generator=gen))
        return out

    def dynamic_shapes(self, rank: int) -> tuple[dict[int, torch.export.Dim], ...]:
        """One shared ``Dim`` per batch and spatial dim, for every input."""
        batch = torch.export.Dim("N", min=1, max=1024)
        spatial = [torch.export.Dim(f"S{i}", min=self.spatial_min, max=4096) for i in range(rank)]
        x_dims = {0: batch} if self.static_spatial else {
            0: batch, **{2 + i: d for i, d in enumerate(spatial)}
        }
        per_position = {0: batch} if self.static_spatial else {
            0: batch, **{1 + i: d for i, d in enumerate(spatial)}
        }
        return (x_dims, *([per_position] * (len(self.names) - 1)))


class NotBuiltError(Exception):
    """The module does not exist for this kind, rank or backend (yet); the cell is n.a."""


@dataclass(frozen=True)
class Case:
    """One row of the matrix: a module family and its kind."""

    name: str
    family: str
    make: Callable[[str, int], Built]
    backends: tuple[str, ...] = BACKENDS  # those the module takes (the others are n.a.)

    def build(self, backend: str, rank: int) -> Built:
        try:
            built = self.make(backend, rank)
        except NotBuiltError:
            raise
        except (TypeError, ValueError) as err:
            raise NotBuiltError(f"not built: {str(err).splitlines()[0]}") from err
        built.module.eval()
        return built


def _no_fused_kernel(kind: str | tuple[str, ...], backend: str) -> None:
    """A kind with no kernel for a dense tensor on the CPU (``first`` and ``last`` have only the
    packed-sequence one; ``mean_sqrt_len`` and ``weightedmean`` none) refuses
    ``backend="fused"`` on its first call: its fused cells are n.a."""
    kinds = (kind,) if isinstance(kind, str) else kind
    if backend == "fused" and not any("cpu" in gp.registry.kernels_of(k) for k in kinds):
        raise NotBuiltError(f"n.a.: kind {kind!r} has no fused CPU kernel")


def _global_pool(kind: str | tuple[str, ...]) -> Callable[[str, int], Built]:
    def make(backend: str, rank: int) -> Built:
        _no_fused_kernel(kind, backend)
        layer = gp.GlobalPool(kind, backend=backend)
        if "attention" in ((kind,) if isinstance(kind, str) else kind):
            return Built(_WeightsAsInput(layer), ("x", "mask", "weights"))
        return Built(layer, ("x", "mask"))

    return make


def _adaptive(kind: str) -> Callable[[str, int], Built]:
    def make(backend: str, rank: int) -> Built:
        if backend != "auto":
            raise NotBuiltError("n.a.: AdaptivePool takes no backend argument")
        layer = gp.AdaptivePool(ADAPTIVE_OUTPUT[rank], kind)
        if kind == "attention":
            return Built(_WeightsAsInput(layer), ("x", "mask", "weights"))
        return Built(layer, ("x", "mask"))

    return make


def _head(kind: str) -> Callable[[str, int], Built]:
    def make(backend: str, rank: int) -> Built:
        _no_fused_kernel(kind, backend)
        return Built(gp.ClassifierHead(CHANNELS, CLASSES, pool=kind, backend=backend),
                     ("x", "mask"))

    return make


# the positional table of CLIPAttentionPool: another size than every export and new size, so
# the exported graph holds its resizing
CLIP_TABLE = {1: (5,), 2: (4, 4), 3: (3, 3, 3)}
ATTENTION_HEADS = 2


def _attention_pool(name: str) -> Callable[[str, int], Built]:
    def make(backend: str, rank: int) -> Built:
        if backend != "auto":
            raise NotBuiltError(f"n.a.: {name} takes no backend argument")
        if name == "LatentAttentionPool":
            module = gp.LatentAttentionPool(CHANNELS, num_heads=ATTENTION_HEADS)
        elif name == "SimPool":
            module = gp.SimPool(CHANNELS, num_heads=ATTENTION_HEADS, gamma=2.0)
        else:
            module = gp.CLIPAttentionPool(CHANNELS, CLIP_TABLE[rank], num_heads=ATTENTION_HEADS,
                                          interpolate=True)
        return Built(module, ("x", "mask"))

    return make


def _learned_head(pool: str) -> Callable[[str, int], Built]:
    def make(backend: str, rank: int) -> Built:
        if backend != "auto":
            raise NotBuiltError(f"n.a.: a head with pool={pool!r} takes no backend argument")
        extra = {"spatial_size": CLIP_TABLE[rank], "interpolate": True} if pool == "clip" else {}
        head = gp.ClassifierHead(CHANNELS, CLASSES, pool=pool, num_heads=ATTENTION_HEADS, **extra)
        return Built(head, ("x", "mask"))

    return make


def _flatten_fc(backend: str, rank: int) -> Built:
    if backend != "auto":
        raise NotBuiltError("n.a.: FlattenFCHead does no pooling (no backend argument)")
    head = gp.FlattenFCHead(CHANNELS, EXPORT_SIZE[rank], CLASSES, hidden=16)
    return Built(head, ("x", "mask"), static_spatial=True,
                 notes=["fixed input size by nature: exported with a static spatial size"])


def _multiscale(backend: str, rank: int) -> Built:
    net = MultiScaleNet("catavgmax", CLASSES, in_channels=CHANNELS, spatial_size=EXPORT_SIZE[rank],
                        width=4, stages=2, backend=backend)
    # a stride-2 stage must not reach size 1 (export specialises size-1 dims): spatial >= 3
    return Built(net, ("x",), spatial_min=3,
                 notes=["dynamic spatial dims from 3: a stride-2 stage must not reach size 1"])


CASES: tuple[Case, ...] = (
    *(Case(f"GlobalPool[{k}]", "GlobalPool", _global_pool(k)) for k in gp.KINDS),
    Case("GlobalPool[avg+max+last]", "GlobalPool", _global_pool(("avg", "max", "last"))),
    Case("GlobalPool[sum+gem+attention]", "GlobalPool",
         _global_pool(("sum", "gem", "attention"))),
    Case("GeM", "GeM", lambda b, r: Built(gp.GeM(backend=b), ("x", "mask"))),
    Case("AttentionPool", "AttentionPool",
         lambda b, r: Built(gp.AttentionPool(CHANNELS, backend=b), ("x", "mask"))),
    *(Case(f"AdaptivePool[{k}]", "AdaptivePool", _adaptive(k), ("auto",)) for k in gp.KINDS),
    *(Case(f"ClassifierHead[{k}]", "ClassifierHead", _head(k)) for k in gp.KINDS),
    *(Case(f"ClassifierHead[{k}]", "ClassifierHead", _learned_head(k), ("auto",))
      for k in gp.LEARNED_POOLS),
    Case("NiNHead", "NiNHead",
         lambda b, r: Built(gp.NiNHead(CHANNELS, CLASSES, backend=b), ("x", "mask"))),
    Case("FlattenFCHead", "FlattenFCHead", _flatten_fc, ("auto",)),
    Case("MultiScaleNet[catavgmax]", "MultiScaleNet", _multiscale),
    Case("swap_pool(CNN, catavgmax)", "swap_pool", lambda b, r: Built(_swapped_cnn(r, b), ("x",))),
    *(Case(name, "query attention pools", _attention_pool(name), ("auto",))
      for name in ("LatentAttentionPool", "SimPool", "CLIPAttentionPool")),
)
CASES_BY_NAME = {c.name: c for c in CASES}
FAMILIES = tuple(dict.fromkeys(c.family for c in CASES))


def new_sizes(built: Built, rank: int) -> list[tuple[int, tuple[int, ...]]]:
    """The sizes a cell is checked at: other batch and spatial sizes than the export's (only
    other batch sizes for a fixed-size module)."""
    if built.static_spatial:
        return [(3, EXPORT_SIZE[rank]), (1, EXPORT_SIZE[rank])]
    return NEW_SIZES[rank]


assert all(
    any(s % o for s, o in zip(size, ADAPTIVE_OUTPUT[r], strict=True))
    for r in RANKS for _, size in [(EXPORT_BATCH, EXPORT_SIZE[r]), *NEW_SIZES[r]]
)
assert math.prod(EXPORT_SIZE[3]) * CHANNELS * EXPORT_BATCH < gp.dispatch.FUSED_MIN_ELEMENTS
