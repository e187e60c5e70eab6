"""Batch normalisation of class maps that counts only real positions (for :class:`NiNHead`).

Each class map is standardised with the mean and variance of that class over the batch and the
real positions (``mask`` True), then scaled and shifted by a learned per-class affine; running
statistics (used in eval mode) are kept as :class:`torch.nn.BatchNorm1d` keeps them. Without a
mask it is exactly ``BatchNorm1d`` over every position. What padded positions hold never enters
the statistics.

>>> import torch
>>> norm = ClassMapNorm(3)
>>> z = torch.randn(4, 5, 3) * 7 + 2                  # (N, *S, classes), classes last
>>> y = norm(z).detach()
>>> bool(y.mean((0, 1)).abs().max() < 1e-5), bool((y.var((0, 1), False) - 1).abs().max() < 1e-3)
(True, True)
"""

from __future__ import annotations

import torch
from torch import nn


class ClassMapNorm(nn.Module):
    """Masked batch norm over ``(N, *S, K)`` class maps (classes last); see the module."""

    def __init__(self, num_classes: int, *, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_classes, self.eps, self.momentum = num_classes, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_classes))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.register_buffer("running_mean", torch.zeros(num_classes))
        self.register_buffer("running_var", torch.ones(num_classes))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            dims = tuple(range(z.ndim - 1))
            if mask is None:
                count = torch.tensor(float(z[..., 0].numel()), dtype=z.dtype, device=z.device)
                mean = z.mean(dims)
                var = ((z - mean) ** 2).mean(dims)
            else:
                real = mask.unsqueeze(-1)
                count = mask.sum(dtype=z.dtype)
                held = torch.where(real, z, 0.0)
                mean = held.sum(dims) / count.clamp(min=1)
                var = torch.where(real, (z - mean) ** 2, 0.0).sum(dims) / count.clamp(min=1)
            with torch.no_grad():  # a batch with under 2 real positions leaves them alone
                keep = count > 1
                unbiased = var * count / (count - 1).clamp(min=1)
                m = self.momentum
                new_mean = (1 - m) * self.running_mean + m * mean.to(self.running_mean)
                new_var = (1 - m) * self.running_var + m * unbiased.to(self.running_var)
                self.running_mean.copy_(torch.where(keep, new_mean, self.running_mean))
                self.running_var.copy_(torch.where(keep, new_var, self.running_var))
                self.num_batches_tracked.add_(keep.long())
        else:
            mean, var = self.running_mean.to(z.dtype), self.running_var.to(z.dtype)
        scale = self.weight.to(z.dtype) * torch.rsqrt(var + self.eps)
        return (z - mean) * scale + self.bias.to(z.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_classes}, eps={self.eps}, momentum={self.momentum}"
