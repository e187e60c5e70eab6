"""The shape every model shares: a convolutional backbone, then a head chosen by name.

>>> import torch
>>> from torch import nn
>>> net = HeadedNet(nn.Conv1d(1, 4, 3), "avg", 3, in_channels=1, spatial_size=(10,))
>>> net(torch.randn(2, 1, 10)).shape, net.feature_shape
(torch.Size([2, 3]), (4, 8))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from globalpool import HEADS, make_head


def check_head(head: Any) -> str:
    """Return ``head`` if it names a head in :data:`globalpool.HEADS`, else raise ``ValueError``."""
    if not isinstance(head, str) or head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}; got {head!r}")
    return head


def check_spatial_size(spatial_size: Any, rank: int | None = None) -> tuple[int, ...]:
    """Normalise ``spatial_size`` to a tuple of positive ints (of length ``rank`` when given)."""
    size = (spatial_size,) if isinstance(spatial_size, int) else tuple(spatial_size)
    ok = all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    if not ok or not 1 <= len(size) <= 3 or (rank is not None and len(size) != rank):
        want = f"{rank} positive ints" if rank is not None else "1 to 3 positive ints"
        raise ValueError(f"spatial_size must be {want}, got {spatial_size!r}")
    return size


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars in ``module``.

    >>> count_parameters(nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@torch.no_grad()
def probe_features(
    backbone: nn.Module, in_channels: int, spatial_size: tuple[int, ...]
) -> torch.Tensor:
    """Run ``backbone`` once on zeros (in eval mode) to learn its output shape."""
    was_training = backbone.training
    backbone.eval()
    try:
        return backbone(torch.zeros(1, in_channels, *spatial_size))
    finally:
        backbone.train(was_training)


class HeadedNet(nn.Module):
    """``head(backbone(x))`` where ``head`` is built by :func:`globalpool.make_head`.

    The backbone is probed once at ``spatial_size`` so a flatten-FC head (``"fc"``) knows its
    input size; pooling heads accept any input size afterwards. ``head_kwargs`` go to
    ``make_head`` (``hidden``, ``dropout``, pool parameters, ``backend``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: str,
        num_classes: int,
        *,
        in_channels: int,
        spatial_size: tuple[int, ...],
        **head_kwargs: Any,
    ) -> None:
        super().__init__()
        self.head_name = check_head(head)
        self.backbone = backbone
        size = check_spatial_size(spatial_size)
        features = probe_features(backbone, in_channels, size)
        self.feature_shape = tuple(int(s) for s in features.shape[1:])
        self.input_size = size
        self.head = make_head(
            head,
            self.feature_shape[0],
            num_classes,
            spatial_size=self.feature_shape[1:],
            **head_kwargs,
        )

    @property
    def fixed_input_size(self) -> bool:
        """True when the head only accepts the spatial size the model was built for."""
        return self.head_name == "fc"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map ``(N, C, *S)``."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        if torch.is_autocast_enabled(features.device.type):
            # Under mixed precision only the backbone runs in low precision: the head (pooling
            # and classifier) always computes in float32.
            with torch.autocast(features.device.type, enabled=False):
                return self.head(features.float())
        return self.head(features)
