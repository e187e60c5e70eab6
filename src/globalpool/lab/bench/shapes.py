"""Benchmark shapes, dtypes, layouts and devices, and the cases they multiply into.

A :class:`Shape` is always written channels-first, ``(N, C, *S)``; the benchmark materialises it in
either layout (``(N, C, *S)`` or ``(N, *S, C)``, both contiguous) so both layouts pool the same
numbers of the same sizes.

>>> [s.name for s in DEFAULT_SHAPES][:2]
['r50-head-7', 'r50-head-14']
>>> parse_shapes("tokens,2x8x5x5")[1].dims
(2, 8, 5, 5)
>>> Shape("t", (32, 768, 196)).layout_shape("channels_last")
(32, 196, 768)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LAYOUTS: tuple[str, ...] = ("channels_first", "channels_last")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


@dataclass(frozen=True)
class Shape:
    """A named channels-first shape ``(N, C, *S)`` with 1 to 3 spatial dims."""

    name: str
    dims: tuple[int, ...]
    note: str = ""

    @property
    def rank(self) -> int:
        """Number of spatial dims."""
        return len(self.dims) - 2

    @property
    def numel(self) -> int:
        return math.prod(self.dims)

    def layout_shape(self, layout: str) -> tuple[int, ...]:
        """The tensor shape in ``layout``: ``(N, C, *S)`` or ``(N, *S, C)``."""
        if layout == "channels_first":
            return self.dims
        n, c, *spatial = self.dims
        return (n, *spatial, c)


DEFAULT_SHAPES: tuple[Shape, ...] = (
    Shape("r50-head-7", (32, 2048, 7, 7), "ResNet-50 head, 224 px input"),
    Shape("r50-head-14", (32, 2048, 14, 14), "ResNet-50 head, 448 px input"),
    Shape("early-224", (8, 64, 224, 224), "early stage, few channels, many positions"),
    Shape("tokens", (32, 768, 196), "ViT-B tokens as 1d: (N, L, C) channels_last / (N, C, L)"),
    Shape("volume", (2, 32, 64, 64, 64), "3d volume"),
)

QUICK_SHAPES: tuple[Shape, ...] = (
    Shape("r50-head-7", (32, 2048, 7, 7), "ResNet-50 head, 224 px input"),
    Shape("tokens-small", (8, 768, 196), "ViT-B tokens as 1d, batch 8"),
)

NAMED_SHAPES: dict[str, Shape] = {s.name: s for s in DEFAULT_SHAPES + QUICK_SHAPES}


def parse_shapes(text: str) -> tuple[Shape, ...]:
    """Comma-separated shape names or explicit channels-first sizes like ``8x64x56x56``."""
    shapes = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item in NAMED_SHAPES:
            shapes.append(NAMED_SHAPES[item])
            continue
        try:
            dims = tuple(int(d) for d in item.lower().split("x"))
        except ValueError:
            dims = ()
        if not 3 <= len(dims) <= 5 or any(d < 1 for d in dims):
            raise ValueError(
                f"shapes must be names from {sorted(NAMED_SHAPES)} or channels-first sizes "
                f"N x C x S1[xS2[xS3]] such as 8x64x56x56, got {item!r}"
            )
        shapes.append(Shape(item, dims))
    if not shapes:
        raise ValueError(f"shapes must name at least one shape, got {text!r}")
    return tuple(shapes)


def parse_dtypes(text: str) -> tuple[torch.dtype, ...]:
    """Comma-separated dtype names (``float32``/``fp32``, ``bfloat16``/``bf16``, ...)."""
    out = []
    for item in (t.strip().lower() for t in text.split(",")):
        name = DTYPE_ALIASES.get(item, item)
        if name not in DTYPES:
            raise ValueError(f"dtype must be among {sorted(DTYPES)}, got {item!r}")
        out.append(DTYPES[name])
    return tuple(out)


def parse_layouts(text: str) -> tuple[str, ...]:
    """Comma-separated layouts; ``all`` means both."""
    if text.strip() == "all":
        return LAYOUTS
    out = tuple(t.strip() for t in text.split(",") if t.strip())
    for layout in out:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be among {LAYOUTS} or 'all', got {layout!r}")
    return out


def parse_devices(text: str) -> tuple[str, ...]:
    """``cpu``, ``cuda`` or ``all`` (CPU, plus CUDA when a GPU is present)."""
    text = text.strip().lower()
    if text == "all":
        return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    if text not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'all', got {text!r}")
    if text == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but torch.cuda.is_available() is False")
    return (text,)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: a shape in one layout, dtype and device."""

    shape: Shape
    layout: str
    dtype: torch.dtype
    device: str

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        return self.shape.layout_shape(self.layout)

    @property
    def spatial_dims(self) -> tuple[int, ...]:
        """Indices of the spatial dims of the tensor in this layout."""
        r = self.shape.rank
        return tuple(range(2, 2 + r)) if self.layout == "channels_first" else tuple(range(1, 1 + r))

    @property
    def input_bytes(self) -> int:
        return self.shape.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def label(self) -> str:
        return f"{self.device} {dtype_name(self.dtype)} {self.layout} {self.shape.name}"


def cases(
    shapes: tuple[Shape, ...],
    layouts: tuple[str, ...],
    dtypes: tuple[torch.dtype, ...],
    devices: tuple[str, ...],
) -> list[Case]:
    """Every combination, device-major so one device's results sit together."""
    return [
        Case(s, layout, dtype, device)
        for device in devices
        for dtype in dtypes
        for layout in layouts
        for s in shapes
    ]
