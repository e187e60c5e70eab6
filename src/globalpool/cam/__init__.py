"""Class activation maps: exact for heads whose logit is linear in the positions, gradient
methods (Grad-CAM, Grad-CAM++, LayerCAM) for any head.

>>> import torch, globalpool as gp
>>> head = gp.ClassifierHead(8, 4, pool="catavgmax")
>>> gp.cam.class_activation_maps(head, torch.randn(2, 8, 5, 5), targets=3).shape
torch.Size([2, 5, 5])
"""

from globalpool.cam.gradient import GRADIENT_METHODS
from globalpool.cam.maps import METHODS, auto_method, class_activation_maps
from globalpool.cam.resize import normalize_maps, upsample_maps

__all__ = [
    "GRADIENT_METHODS",
    "METHODS",
    "auto_method",
    "class_activation_maps",
    "normalize_maps",
    "upsample_maps",
]
