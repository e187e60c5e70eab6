"""``build_model``: a model by name, or the default model of a dataset, with a head by name.

>>> import torch
>>> net = build_model("mnist1d", "avg", 10, in_channels=1, spatial_size=(40,))
>>> type(net).__name__, net(torch.randn(2, 1, 40)).shape
('CNN1D', torch.Size([2, 10]))
"""

from __future__ import annotations

from typing import Any

from torch import nn

from globalpool.lab.models.cnn1d import CNN1D
from globalpool.lab.models.cnn2d import CNN2D
from globalpool.lab.models.fastnet import FastNet
from globalpool.lab.models.multiscale import MultiScaleNet
from globalpool.lab.models.resnet_cifar import ResNet18, ResNet18W16

MODELS: dict[str, type[nn.Module]] = {
    "cnn1d": CNN1D,
    "cnn2d": CNN2D,
    "resnet18": ResNet18,
    "resnet18-w16": ResNet18W16,
    "multiscale": MultiScaleNet,
    "fastnet": FastNet,
}

#: The model each dataset uses unless told otherwise (``folder:PATH`` is looked up as ``folder``).
DATASET_MODELS: dict[str, str] = {
    "mnist1d": "cnn1d",
    "digits-shifted": "cnn2d",
    "cifar10": "resnet18",
    "folder": "cnn2d",
}


def resolve_model_name(name_or_dataset: str) -> str:
    """The model name for a model or dataset name; ``ValueError`` if it is neither.

    >>> resolve_model_name("cifar10"), resolve_model_name("folder:/data/pets")
    ('resnet18', 'cnn2d')
    """
    if isinstance(name_or_dataset, str):
        key = name_or_dataset.strip()
        base = key.partition(":")[0].lower().replace("_", "-")
        if key.lower() in MODELS:
            return key.lower()
        if base in DATASET_MODELS:
            return DATASET_MODELS[base]
    raise ValueError(
        f"model must be one of {', '.join(MODELS)} or a dataset name "
        f"({', '.join(DATASET_MODELS)}); got {name_or_dataset!r}"
    )


def build_model(
    name_or_dataset: str,
    head: str,
    num_classes: int,
    *,
    in_channels: int,
    spatial_size: int | tuple[int, ...],
    **kwargs: Any,
) -> nn.Module:
    """Build a model (``cnn1d``, ``cnn2d``, ``resnet18``, ``resnet18-w16``, ``multiscale``,
    ``fastnet``) or a dataset's default.

    ``head`` is one of :data:`~globalpool.lab.models.base.LAB_HEADS` (:data:`globalpool.HEADS`
    or a learned attention pool ``map``/``simpool``/``clip``); ``spatial_size`` is the training
    input size (the flatten-FC head is sized from it). ``kwargs`` go to the model (``width``,
    ``hidden``, ``dropout`` ...). Every model has ``head_name`` and ``fixed_input_size``.
    """
    cls = MODELS[resolve_model_name(name_or_dataset)]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    size = (spatial_size,) if isinstance(spatial_size, int) else tuple(spatial_size)
    return cls(head, num_classes, in_channels=in_channels, spatial_size=size, **kwargs)
