"""A small, fast CIFAR-10 network in the style of the fastest published recipes.

A fixed patch-whitening stem (a 2x2 convolution whose filters whiten the training images' 2x2
patches, each filter and its negative), then three stages of ``conv3x3 -> max-pool 2 ->
batch norm -> GELU`` followed by one residual unit ``y + GELU(BN(conv3x3(y)))``, with
``width`` x (1, 4, 4) channels. A 32x32 image leaves a ``(4 width, 3, 3)`` feature map, on which
any head plugs in. ``width=64`` (the default) has 1.97M backbone parameters; a smaller
``width`` makes quick tests. The logits are multiplied by ``logit_scale`` (1/8), which keeps
the recipe's high learning rate from blowing up the classifier's first steps.

The whitening filters are fitted to the training images once, before training
(:meth:`FastNet.fit_to_data`, called by the lab's runner); they are not trained. Unfitted, the
stem passes each patch pixel (and its negative) through unchanged.

>>> import torch
>>> net = FastNet("gem", 10, width=4)
>>> net.fit_to_data(torch.randn(16, 3, 32, 32))
>>> net(torch.randn(2, 3, 32, 32)).shape, net.feature_shape
(torch.Size([2, 10]), (16, 3, 3))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from globalpool.lab.models.base import HeadedNet, check_spatial_size


class PatchWhitening(nn.Module):
    """A fixed ``patch`` x ``patch`` convolution (no padding) whose ``d = C * patch**2`` filters
    whiten the input's patches, followed by their ``d`` negatives: ``2 d`` output channels.

    :meth:`fit` sets the filters to ``E^T / sqrt(lambda + eps)`` from the eigen-decomposition
    ``E diag(lambda) E^T`` of the patches' covariance (largest component first). The filters
    are a frozen parameter: saved in the ``state_dict``, never trained.

    >>> stem = PatchWhitening(3)
    >>> stem.fit(torch.randn(8, 3, 16, 16))
    >>> stem(torch.randn(1, 3, 16, 16)).shape
    torch.Size([1, 24, 15, 15])
    """

    def __init__(self, in_channels: int = 3, patch: int = 2, eps: float = 1e-2) -> None:
        super().__init__()
        self.patch = int(patch)
        self.eps = float(eps)
        dims = in_channels * self.patch**2
        self.conv = nn.Conv2d(in_channels, 2 * dims, self.patch, bias=False)
        eye = torch.eye(dims).reshape(dims, in_channels, self.patch, self.patch)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat([eye, -eye]))
        self.conv.weight.requires_grad_(False)

    @torch.no_grad()
    def fit(self, images: torch.Tensor, max_images: int = 5000, chunk: int = 500) -> None:
        """Fit the filters to the first ``max_images`` of ``images`` ``(N, C, H, W)``."""
        x = images[:max_images]
        dims = self.conv.weight.shape[0] // 2
        total = torch.zeros(dims, dtype=torch.float64, device=x.device)
        outer = torch.zeros(dims, dims, dtype=torch.float64, device=x.device)
        count = 0
        for start in range(0, len(x), chunk):
            cols = F.unfold(x[start : start + chunk].float(), self.patch)  # (n, dims, L)
            rows = cols.transpose(1, 2).reshape(-1, dims).double()
            total += rows.sum(0)
            outer += rows.T @ rows
            count += len(rows)
        if count < 2:
            raise ValueError(f"fit needs at least 2 patches, got {count} from {tuple(x.shape)}")
        mean = total / count
        cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
        values, vectors = torch.linalg.eigh(cov.cpu())  # ascending
        filters = (vectors.T / torch.sqrt(values.clamp_min(0) + self.eps)[:, None]).flip(0)
        filters = filters.reshape(self.conv.weight[:dims].shape).to(self.conv.weight)
        self.conv.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ResidualUnit(nn.Module):
    """``y + GELU(BN(conv3x3(y)))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.bn(self.conv(x)))


def fast_stage(c_in: int, c_out: int) -> nn.Sequential:
    """``conv3x3 -> max-pool 2 -> BN -> GELU``, then a :class:`ResidualUnit`."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(c_out),
        nn.GELU(),
        ResidualUnit(c_out),
    )


def fastnet_backbone(in_channels: int = 3, width: int = 64) -> nn.Sequential:
    """Whitening stem, GELU, three stages of ``width`` x (1, 4, 4) channels."""
    stem = PatchWhitening(in_channels)
    c0 = stem.conv.weight.shape[0]
    return nn.Sequential(
        stem,
        nn.GELU(),
        fast_stage(c0, width),
        fast_stage(width, 4 * width),
        fast_stage(4 * width, 4 * width),
    )


class FastNet(HeadedNet):
    """The fast CIFAR-10 network (see the module docstring) with a pluggable head.

    ``hidden`` is the flatten-FC head's width (1024, as for the quarter-width ResNet-18).
    """

    def __init__(
        self,
        head: str = "avg",
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        spatial_size: tuple[int, int] = (32, 32),
        width: int = 64,
        hidden: int = 1024,
        logit_scale: float = 0.125,
        **head_kwargs: Any,
    ) -> None:
        size = check_spatial_size(spatial_size, rank=2)
        if min(size) < 16:
            raise ValueError(f"spatial_size must be at least (16, 16) for FastNet, got {size}")
        super().__init__(
            fastnet_backbone(in_channels, width),
            head,
            num_classes,
            in_channels=in_channels,
            spatial_size=size,
            hidden=hidden,
            logit_scale=logit_scale,
            **head_kwargs,
        )

    def fit_to_data(self, images: torch.Tensor) -> None:
        """Fit the whitening stem to training ``images`` ``(N, C, H, W)`` (the first 5,000)."""
        self.backbone[0].fit(images)
