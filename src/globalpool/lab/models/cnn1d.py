"""The 1d CNN of the MNIST-1D paper (Greydanus, 2020), with the classifier head swappable.

Backbone as in the paper's ``ConvBase``: three ``Conv1d`` layers with 25 channels, kernel sizes
5, 3, 3, stride 2 and padding 1, each followed by ReLU. On the 40-sample signals this leaves a
``(25, 5)`` feature map. The paper flattens it into one ``Linear(125, 10)``; here the head is
chosen by name (``"fc"`` is flatten + hidden FC, see :class:`globalpool.FlattenFCHead`).

>>> import torch
>>> net = CNN1D("gem")
>>> net(torch.randn(4, 1, 40)).shape, net.feature_shape
(torch.Size([4, 10]), (25, 5))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from globalpool.lab.models.base import HeadedNet, check_spatial_size


def mnist1d_backbone(in_channels: int = 1, channels: int = 25) -> nn.Sequential:
    """The paper's three strided convolutions with ReLU: length 40 -> 19 -> 10 -> 5."""
    return nn.Sequential(
        nn.Conv1d(in_channels, channels, kernel_size=5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
    )


class CNN1D(HeadedNet):
    """MNIST-1D CNN; input ``(N, C, L)`` (or ``(N, L)`` for one channel), output logits.

    ``hidden`` is the width of the flatten-FC head's hidden layer (unused by other heads).
    """

    def __init__(
        self,
        head: str = "fc",
        num_classes: int = 10,
        *,
        in_channels: int = 1,
        spatial_size: int | tuple[int] = 40,
        channels: int = 25,
        hidden: int = 256,
        **head_kwargs: Any,
    ) -> None:
        size = check_spatial_size(spatial_size, rank=1)
        super().__init__(
            mnist1d_backbone(in_channels, channels),
            head,
            num_classes,
            in_channels=in_channels,
            spatial_size=size,
            hidden=hidden,
            **head_kwargs,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.unsqueeze(1) if x.dim() == 2 else x)
