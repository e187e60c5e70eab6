"""Multi-scale descriptor extraction: run a model on resized copies of the images and combine the
descriptors with a generalised mean over the scales, as image retrieval does at test time.

>>> import torch, globalpool as gp
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), gp.EmbeddingHead(8, "gem"))
>>> gp.extract_multiscale(model, torch.rand(2, 3, 32, 32)).shape
torch.Size([2, 8])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from globalpool.contract import check_input
from globalpool.functional import pool

#: The default scales: the image, and copies resized by 1/sqrt(2) and 1/2.
SCALES: tuple[float, ...] = (1.0, 2**-0.5, 0.5)

_LINEAR_MODES = {3: "linear", 4: "bilinear", 5: "trilinear"}

# the F.interpolate modes for images of each rank (1, 2 or 3 spatial dims)
_RESIZE_MODES = {
    rank: ("nearest", "nearest-exact", "area", linear, *(("bicubic",) if rank == 4 else ()))
    for rank, linear in _LINEAR_MODES.items()
}


def _check_scales(scales: Any) -> tuple[float, ...]:
    expected = "a non-empty sequence of positive finite numbers, such as (1, 2**-0.5, 0.5)"
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):
        raise TypeError(f"scales must be {expected}, got {scales!r}")
    if not scales:
        raise ValueError(f"scales must be {expected}, got an empty {type(scales).__name__}")
    for s in scales:
        if not isinstance(s, numbers.Real) or isinstance(s, bool):
            raise TypeError(f"scales must be {expected}, got {scales!r} (holding {s!r})")
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"scales must be {expected}, got {scales!r} (holding {s!r})")
    return tuple(float(s) for s in scales)


def _check_power(p: Any) -> float:
    if not isinstance(p, numbers.Real) or isinstance(p, bool):
        raise TypeError(f"p must be a real number >= 1 (1: the mean), got {p!r}")
    if not (math.isfinite(p) and p >= 1):
        raise ValueError(f"p must be a finite real number >= 1 (1: the mean), got {p!r}")
    return float(p)


def _descriptor(out: Any, images: torch.Tensor, scale: float, width: int | None) -> torch.Tensor:
    """The model's output at one scale, checked: a floating ``(N, D)`` tensor, ``D`` the same at
    every scale."""
    n = images.shape[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"model must return a tensor of descriptors (N, D), got {type(out).__name__} at "
            f"scale {scale:g} (a head with a BN-neck returns a pair in training mode only; "
            "extract_multiscale runs the model in eval mode)"
        )
    if out.ndim != 2 or out.shape[0] != n or not out.is_floating_point():
        raise ValueError(
            f"model must return floating descriptors of shape ({n}, D) for {n} images, got "
            f"{tuple(out.shape)} ({out.dtype}) at scale {scale:g}"
        )
    if width is not None and out.shape[1] != width:
        raise ValueError(
            f"model must return descriptors of one width at every scale, got {width} and "
            f"{out.shape[1]} at scale {scale:g}"
        )
    return out


def _train_modes(model: Any) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []


def extract_multiscale(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    scales: Sequence[float] = SCALES,
    *,
    p: float = 1.0,
    mode: str | None = None,
    normalize: bool = True,
    grad: bool = False,
) -> torch.Tensor:
    """Descriptors of ``images`` combined over several scales: the model runs on each resized
    copy (scale 1: the images themselves), and the descriptors ``v_s`` are combined by the
    generalised mean ``(mean_s v_s^p)^(1/p)`` (:func:`~globalpool.pool` of kind ``avg`` for
    ``p = 1``, ``gem`` above, so values below gem's ``eps`` count as ``eps``), then
    L2-normalised.

    The model runs in eval mode (each of its modules is put back in the mode it was in), and
    without gradients unless ``grad=True``.

    Args:
        model: a module (or function) from images to descriptors ``(N, D)``, such as a
            backbone followed by an :class:`~globalpool.EmbeddingHead`.
        images: ``(N, C, *S)`` with 1 to 3 spatial dims.
        scales: the positive resize factors (each spatial size becomes ``floor(size *
            scale)``).
        p: the power of the mean over scales, ``>= 1``; ``p > 1`` needs non-negative
            descriptors (use ``p = 1`` for whitened ones, which have negative values).
        mode: the ``F.interpolate`` mode: ``nearest``, ``nearest-exact``, ``area``, or the
            linear one of the images' rank (``linear``, ``bilinear`` or ``bicubic``,
            ``trilinear``); None: the linear one.
        normalize: L2-normalise the combined descriptor.
        grad: keep the autograd graph (for fine-tuning through the extraction).

    Returns:
        ``(N, D)`` descriptors.

    >>> import torch, globalpool as gp
    >>> head = gp.EmbeddingHead(3, "avg")
    >>> images = torch.rand(2, 3, 1, 1).expand(2, 3, 16, 16)  # every scale has the same mean
    >>> torch.allclose(gp.extract_multiscale(head, images), head(images))
    True
    """
    if not callable(model):
        raise TypeError(f"model must be a torch.nn.Module or a callable, got {model!r}")
    check_input(images, "images")
    scales = _check_scales(scales)
    p = _check_power(p)
    if mode is None:
        mode = _LINEAR_MODES[images.ndim]
    if not isinstance(mode, str):
        raise TypeError(f"mode must be an F.interpolate mode string or None, got {mode!r}")
    if mode not in _RESIZE_MODES[images.ndim]:
        raise ValueError(
            f"mode must be one of {_RESIZE_MODES[images.ndim]} (or None) for images with "
            f"{images.ndim - 2} spatial dim(s), got {mode!r}"
        )
    if not isinstance(normalize, bool) or not isinstance(grad, bool):
        raise TypeError(
            f"normalize and grad must be bools (True or False), got {normalize!r} and {grad!r}"
        )
    modes = _train_modes(model)
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            outs: list[torch.Tensor] = []
            for scale in scales:
                x = images if scale == 1 else _resize(images, scale, mode)
                width = outs[0].shape[1] if outs else None
                outs.append(_descriptor(model(x), images, scale, width))
            return _combine(torch.stack(outs, dim=-1), p, normalize)
    finally:
        for module, training in modes:
            module.training = training


def _resize(images: torch.Tensor, scale: float, mode: str) -> torch.Tensor:
    small = [s for s in images.shape[2:] if math.floor(s * scale) < 1]
    if small:
        raise ValueError(
            f"scales holds {scale:g}, which resizes the images' spatial size "
            f"{tuple(images.shape[2:])} below 1 pixel; use larger scales or images"
        )
    linear = mode in ("linear", "bilinear", "bicubic", "trilinear")
    return F.interpolate(
        images, scale_factor=scale, mode=mode, align_corners=False if linear else None
    )


def _combine(stacked: torch.Tensor, p: float, normalize: bool) -> torch.Tensor:
    """``(N, D, S)`` descriptors per scale -> ``(N, D)``: their generalised mean over the scales."""
    if p == 1:
        combined = pool(stacked, "avg")
    else:
        lowest = float(stacked.min())
        if lowest < 0:
            raise ValueError(
                f"p={p:g} needs non-negative descriptors (a generalised mean of negative values "
                f"is not defined), got a value of {lowest:.4g}; use p=1 (the mean), as for "
                "whitened descriptors"
            )
        combined = pool(stacked, "gem", p=p)
    return F.normalize(combined, dim=1) if normalize else combined
