"""A small 2d CNN: conv-BN-ReLU blocks with two 2x downsamplings, then a head chosen by name.

With a pooling head this is the classic "CNN with global average pooling": no layer depends on
the input size, so one trained model runs on any canvas at least 4 pixels wide.

>>> import torch
>>> net = CNN2D("avg", 10, in_channels=1, spatial_size=(24, 24), width=8)
>>> net(torch.randn(2, 1, 24, 24)).shape, net(torch.randn(2, 1, 40, 32)).shape
(torch.Size([2, 10]), torch.Size([2, 10]))
"""

from __future__ import annotations

from typing import Any

from torch import nn

from globalpool.lab.models.base import HeadedNet, check_spatial_size


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    """3x3 convolution (same padding, no bias), batch norm, ReLU."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def small_cnn_backbone(in_channels: int, width: int = 32) -> nn.Sequential:
    """``width`` -> 2 ``width`` -> 4 ``width`` channels; spatial size divided by 4."""
    w1, w2, w3 = width, 2 * width, 4 * width
    return nn.Sequential(
        *conv_bn_relu(in_channels, w1),
        *conv_bn_relu(w1, w1),
        nn.MaxPool2d(2),
        *conv_bn_relu(w1, w2),
        *conv_bn_relu(w2, w2),
        nn.MaxPool2d(2),
        *conv_bn_relu(w2, w3),
    )


class CNN2D(HeadedNet):
    """Small 2d CNN for ``(N, C, H, W)`` images (digits-shifted, image folders)."""

    def __init__(
        self,
        head: str = "avg",
        num_classes: int = 10,
        *,
        in_channels: int = 1,
        spatial_size: tuple[int, int] = (24, 24),
        width: int = 32,
        hidden: int = 256,
        **head_kwargs: Any,
    ) -> None:
        size = check_spatial_size(spatial_size, rank=2)
        if min(size) < 4:
            raise ValueError(f"spatial_size must be at least (4, 4) for CNN2D, got {size}")
        super().__init__(
            small_cnn_backbone(in_channels, width),
            head,
            num_classes,
            in_channels=in_channels,
            spatial_size=size,
            hidden=hidden,
            **head_kwargs,
        )
