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

from globalpool import HEADS, LEARNED_POOLS, make_head

#: Heads the lab's models build: :data:`globalpool.HEADS` (``compare``'s default list), then the
#: learned attention pools of :data:`globalpool.LEARNED_POOLS` (``map``,
#: ``simpool``, ``clip``), which ``compare`` runs only when named in ``--heads``.
LAB_HEADS: tuple[str, ...] = (*HEADS, *LEARNED_POOLS)


def check_head(head: Any) -> str:
    """Return ``head`` if it names a head in :data:`LAB_HEADS`, else raise ``ValueError``.

    >>> check_head("simpool")
    'simpool'
    """
    if not isinstance(head, str) or head not in LAB_HEADS:
        raise ValueError(f"head must be one of {', '.join(LAB_HEADS)}; got {head!r}")
    return head


#: Learned pools that split channels over attention heads (``num_heads`` must divide ``C``).
_MULTIHEAD_POOLS = ("map", "clip")


def learned_pool_kwargs(head: str, channels: int, head_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``head_kwargs`` with a ``num_heads`` that divides ``channels`` for ``map``/``clip`` when
    none is given: the largest divisor of ``channels`` up to 8 (the pools' default of 8 does not
    divide the widths of every lab backbone, e.g. the MNIST-1D CNN's 25 channels).

    >>> learned_pool_kwargs("map", 25, {})
    {'num_heads': 5}
    >>> learned_pool_kwargs("clip", 64, {}), learned_pool_kwargs("avg", 25, {})
    ({'num_heads': 8}, {})
    """
    if head not in _MULTIHEAD_POOLS or "num_heads" in head_kwargs:
        return dict(head_kwargs)
    heads = max(d for d in range(1, 9) if channels % d == 0)
    return {**head_kwargs, "num_heads": heads}


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
    ``make_head`` (``hidden``, ``dropout``, pool parameters, ``backend``). ``logit_scale``
    multiplies the head's output (1, the default, leaves it alone): a fixed scale below 1 keeps
    a high learning rate from blowing up the classifier's first steps, whatever the head.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: str,
        num_classes: int,
        *,
        in_channels: int,
        spatial_size: tuple[int, ...],
        logit_scale: float = 1.0,
        **head_kwargs: Any,
    ) -> None:
        super().__init__()
        self.head_name = check_head(head)
        if isinstance(logit_scale, bool) or not (
            isinstance(logit_scale, (int, float)) and 0 < logit_scale < float("inf")
        ):
            raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
        self.logit_scale = float(logit_scale)
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
            **learned_pool_kwargs(head, self.feature_shape[0], head_kwargs),
        )

    @property
    def fixed_input_size(self) -> bool:
        """True when the head only accepts the spatial size the model was built for: ``fc``
        (flatten) and ``clip`` (a positional table learned at the feature map's size)."""
        return self.head_name in ("fc", "clip")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map ``(N, C, *S)``."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        if torch.is_autocast_enabled(features.device.type):
            # Under mixed precision only the backbone runs in low precision: the head (pooling
            # and classifier) always computes in float32.
            with torch.autocast(features.device.type, enabled=False):
                return self._scaled(self.head(features.float()))
        return self._scaled(self.head(features))

    def _scaled(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.logit_scale == 1.0 else logits * self.logit_scale
