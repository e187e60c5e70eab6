"""A multi-scale feature extractor: pool the feature maps of several stages, concatenate, classify.

Each stage halves the spatial size (after the first) and doubles the channels. The head named by
``head`` is applied per stage and joined:

- a pooling kind (``avg`` ... ``attention``): one pooling module per stage, the pooled vectors
  concatenated (width ``sum`` of each stage's pool width), dropout, then one ``Linear``;
- ``fc``: every stage flattened and concatenated, then a hidden FC layer and the class layer;
- ``nin``: a 1x1 class-map convolution per stage, averaged globally, the logits summed;
- a learned attention pool (``map``, ``simpool``, ``clip``): one per stage, joined as a
  pooling kind (``clip`` learns its positional table at each stage's size).

Works for 1, 2 or 3 spatial dims (the rank of ``spatial_size``).

>>> import torch
>>> net = MultiScaleNet("catavgmax", 10, in_channels=1, spatial_size=(24, 24), width=4)
>>> net(torch.randn(2, 1, 24, 24)).shape, net.head.feature_width
(torch.Size([2, 10]), 56)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from globalpool import KINDS, LEARNED_POOLS, NiNHead, make_learned_pool, make_pool
from globalpool.lab.models.base import check_head, check_spatial_size, learned_pool_kwargs

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _stage(rank: int, c_in: int, c_out: int, stride: int) -> nn.Sequential:
    conv, norm = _CONV[rank], _NORM[rank]
    return nn.Sequential(
        conv(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        norm(c_out),
        nn.ReLU(),
        conv(c_out, c_out, 3, padding=1, bias=False),
        norm(c_out),
        nn.ReLU(),
    )


class MultiScaleHead(nn.Module):
    """Joins per-stage feature maps ``[(N, C_i, *S_i)]`` into logits ``(N, num_classes)``."""

    def __init__(
        self,
        head: str,
        shapes: list[tuple[int, ...]],
        num_classes: int,
        *,
        hidden: int = 256,
        dropout: float = 0.0,
        **pool_params: Any,
    ) -> None:
        super().__init__()
        self.name = check_head(head)
        self.shapes = [tuple(s) for s in shapes]
        channels = [s[0] for s in self.shapes]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if head in KINDS or head in LEARNED_POOLS:
            if head in KINDS:
                pools = [make_pool(head, c, **pool_params) for c in channels]
            else:  # learned modules take no backend (they have no fused kernels)
                params = {k: v for k, v in pool_params.items() if k != "backend"}
                pools = [
                    make_learned_pool(
                        head, s[0], "channels_first",
                        {**learned_pool_kwargs(head, s[0], params),
                         **({"spatial_size": s[1:]} if head == "clip" else {})},
                    )
                    for s in self.shapes
                ]
            self.pools = nn.ModuleList(pools)
            self.feature_width = sum(
                p.output_width(c) for p, c in zip(self.pools, channels, strict=True)
            )
            self.fc: nn.Module = nn.Linear(self.feature_width, num_classes)
        elif head == "fc":
            self.feature_width = sum(math.prod(s) for s in self.shapes)
            self.hidden = nn.Linear(self.feature_width, hidden)
            self.fc = nn.Linear(hidden, num_classes)
        else:  # nin
            self.feature_width = sum(channels)
            backend = pool_params.get("backend", "auto")
            self.nin = nn.ModuleList(NiNHead(c, num_classes, backend=backend) for c in channels)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        if self.name in KINDS or self.name in LEARNED_POOLS:
            pooled = torch.cat([pool(f) for pool, f in zip(self.pools, maps, strict=True)], dim=1)
            return self.fc(self.dropout(pooled))
        if self.name == "fc":
            got = [tuple(f.shape[1:]) for f in maps]
            if got != self.shapes:
                raise ValueError(
                    f"feature maps must have shapes {self.shapes} for a flatten+FC head, "
                    f"got {got}; use a pooling head for other input sizes"
                )
            flat = torch.cat([f.flatten(1) for f in maps], dim=1)
            return self.fc(self.dropout(torch.relu(self.hidden(flat))))
        logits = [head(f) for head, f in zip(self.nin, maps, strict=True)]
        return torch.stack(logits).sum(0)


class MultiScaleNet(nn.Module):
    """Stem plus ``stages`` conv stages; every stage's output feeds the multi-scale head."""

    def __init__(
        self,
        head: str = "avg",
        num_classes: int = 10,
        *,
        in_channels: int = 1,
        spatial_size: int | tuple[int, ...] = 40,
        width: int = 16,
        stages: int = 3,
        hidden: int = 256,
        **head_kwargs: Any,
    ) -> None:
        super().__init__()
        self.head_name = check_head(head)
        size = check_spatial_size(spatial_size)
        rank = len(size)
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        self.input_size = size
        self.stem = nn.Sequential(
            _CONV[rank](in_channels, width, 3, padding=1, bias=False), _NORM[rank](width), nn.ReLU()
        )
        self.stages = nn.ModuleList(
            _stage(rank, width * 2 ** max(i - 1, 0), width * 2**i, 1 if i == 0 else 2)
            for i in range(stages)
        )
        with torch.no_grad():
            was_training = self.training
            self.eval()
            maps = self.features(torch.zeros(1, in_channels, *size))
            self.train(was_training)
        self.feature_shapes = [tuple(int(s) for s in f.shape[1:]) for f in maps]
        self.head = MultiScaleHead(
            head, self.feature_shapes, num_classes, hidden=hidden, **head_kwargs
        )

    @property
    def fixed_input_size(self) -> bool:
        """True when the head only accepts the spatial size the model was built for: ``fc`` and
        ``clip`` (positional tables learned at each stage's size)."""
        return self.head_name in ("fc", "clip")

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature map after each stage, finest first."""
        maps, h = [], self.stem(x)
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
