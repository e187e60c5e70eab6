"""Gradient-based class activation maps from a feature map ``A`` and the gradient ``G`` of the
target logit with respect to it (both ``(N, C, *S)``, channels first).

With ``R`` the real positions of a sample (all of them without a mask) and ``relu(t) = max(t, 0)``:

- ``gradcam`` (Selvaraju et al., 2017, "Grad-CAM: Visual Explanations from Deep Networks via
  Gradient-based Localization"): ``a_c = mean_{s in R} G_cs``,
  ``M(s) = relu(sum_c a_c A_cs)``; without a mask this is captum's
  ``LayerGradCam(relu_attributions=True)``.
- ``gradcam++`` (Chattopadhay et al., 2018, "Grad-CAM++: Generalized Gradient-based Visual
  Explanations for Deep Convolutional Networks"), in its usual closed form (the exponential of the
  logit, whose higher derivatives are powers of ``G``):
  ``alpha_cs = G_cs^2 / (2 G_cs^2 + (sum_{t in R} A_ct) G_cs^3)`` (0 where ``G_cs = 0``),
  ``a_c = sum_{s in R} alpha_cs relu(G_cs)``, ``M(s) = relu(sum_c a_c A_cs)``.
- ``layercam`` (Jiang et al., 2021, "LayerCAM: Exploring Hierarchical Class Activation Maps for
  Localization"): ``M(s) = relu(sum_c relu(G_cs) A_cs)``.

Padded positions are 0 in every map and enter no sum or mean.

>>> import torch
>>> A = torch.tensor([[[1.0, 2.0, 3.0]]]); G = torch.tensor([[[1.0, 1.0, -1.0]]])
>>> gradient_maps("gradcam", A, G, None), gradient_maps("layercam", A, G, None)
(tensor([[0.3333, 0.6667, 1.0000]]), tensor([[1., 2., 0.]]))
"""

from __future__ import annotations

import math

import torch

GRADIENT_METHODS = ("gradcam", "gradcam++", "layercam")


def gradient_maps(
    method: str, A: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """The ``method`` map ``(N, *S)`` of feature map ``A`` and gradient ``G`` (see the module)."""
    dims = tuple(range(2, A.ndim))
    if mask is not None:
        real = mask.unsqueeze(1)
        A = torch.where(real, A, 0.0)
        G = torch.where(real, G, 0.0)
        n = mask.sum(tuple(range(1, mask.ndim)), dtype=A.dtype).clamp(min=1)
        n = n.reshape(-1, 1, *([1] * len(dims)))
    else:
        n = torch.tensor(float(math.prod(A.shape[2:])), dtype=A.dtype, device=A.device)
    if method == "gradcam":
        weights = G.sum(dims, keepdim=True) / n
        out = torch.relu((weights * A).sum(1))
    elif method == "gradcam++":
        g2 = G * G
        denom = 2 * g2 + A.sum(dims, keepdim=True) * g2 * G
        alpha = torch.where(G != 0, g2 / torch.where(denom != 0, denom, 1.0), 0.0)
        weights = (alpha * torch.relu(G)).sum(dims, keepdim=True)
        out = torch.relu((weights * A).sum(1))
    elif method == "layercam":
        out = torch.relu((torch.relu(G) * A).sum(1))
    else:
        raise ValueError(f"method must be one of {GRADIENT_METHODS}, got {method!r}")
    return out if mask is None else torch.where(mask, out, 0.0)
