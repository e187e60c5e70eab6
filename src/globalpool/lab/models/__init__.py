"""Models for ``globalpool compare``; each takes ``head=`` by name (one of
``globalpool.HEADS`` or a learned attention pool, ``map``/``simpool``/``clip``: ``base.LAB_HEADS``).

>>> import torch
>>> from globalpool.lab.models import build_model
>>> build_model("cnn2d", "nin", 10, in_channels=1, spatial_size=(24, 24))(
...     torch.randn(1, 1, 24, 24)).shape
torch.Size([1, 10])
"""

from globalpool.lab.models.base import HeadedNet, count_parameters
from globalpool.lab.models.cnn1d import CNN1D
from globalpool.lab.models.cnn2d import CNN2D
from globalpool.lab.models.fastnet import FastNet
from globalpool.lab.models.multiscale import MultiScaleHead, MultiScaleNet
from globalpool.lab.models.registry import DATASET_MODELS, MODELS, build_model, resolve_model_name
from globalpool.lab.models.resnet_cifar import ResNet18

__all__ = [
    "CNN1D",
    "CNN2D",
    "DATASET_MODELS",
    "FastNet",
    "MODELS",
    "HeadedNet",
    "MultiScaleHead",
    "MultiScaleNet",
    "ResNet18",
    "build_model",
    "count_parameters",
    "resolve_model_name",
]
