"""ResNet-18 in its CIFAR form (3x3 stem, no stem max-pool), with the head chosen by name.

Four stages of two basic residual blocks each, ``width`` x (1, 2, 4, 8) channels, strides
1, 2, 2, 2: a 32x32 image leaves a ``(8 width, 4, 4)`` feature map. ``width=64`` is the usual
ResNet-18 (11.2M backbone parameters); a smaller ``width`` makes quick tests. The flatten-FC
head defaults to a 4096-unit hidden layer, the "traditional" head of the claims being measured.

>>> import torch
>>> net = ResNet18("catavgmax", 10, width=4)
>>> net(torch.randn(2, 3, 32, 32)).shape, net.feature_shape
(torch.Size([2, 10]), (32, 4, 4))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from globalpool.lab.models.base import HeadedNet, check_spatial_size


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


def resnet18_backbone(in_channels: int = 3, width: int = 64) -> nn.Sequential:
    """Stem plus the four residual stages; output stride 8."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]
    c_in = width
    for i, stride in enumerate((1, 2, 2, 2)):
        c_out = width * 2**i
        layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    return nn.Sequential(*layers)


class ResNet18(HeadedNet):
    """CIFAR ResNet-18 for ``(N, C, H, W)`` images with a pluggable head."""

    def __init__(
        self,
        head: str = "avg",
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        spatial_size: tuple[int, int] = (32, 32),
        width: int = 64,
        hidden: int = 4096,
        **head_kwargs: Any,
    ) -> None:
        size = check_spatial_size(spatial_size, rank=2)
        if min(size) < 8:
            raise ValueError(f"spatial_size must be at least (8, 8) for ResNet18, got {size}")
        super().__init__(
            resnet18_backbone(in_channels, width),
            head,
            num_classes,
            in_channels=in_channels,
            spatial_size=size,
            hidden=hidden,
            **head_kwargs,
        )


class ResNet18W16(ResNet18):
    """ResNet-18 at a quarter of its width for CPUs: 16-32-64-128 channels (0.70M backbone
    parameters, 1/16 of the compute) and a flatten-FC head 1024 wide (a quarter of 4096).

    >>> import torch
    >>> ResNet18W16("fc", 10)(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        head: str = "avg",
        num_classes: int = 10,
        *,
        width: int = 16,
        hidden: int = 1024,
        **kwargs: Any,
    ) -> None:
        super().__init__(head, num_classes, width=width, hidden=hidden, **kwargs)
