"""``class_activation_maps``: where in the feature map a model finds each class.

>>> import torch, globalpool as gp
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), gp.ClassifierHead(8, 5, pool="avg"))
>>> maps = gp.class_activation_maps(net.eval(), torch.randn(2, 3, 9, 9))
>>> maps.shape
torch.Size([2, 7, 7])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from globalpool import registry
from globalpool.cam.attention import REDUCTIONS, attention_maps, query_pool_of, recording
from globalpool.cam.capture import Seen, Site, capture, find_site
from globalpool.cam.exact import exact_maps, head_kind, is_exact
from globalpool.cam.gradient import GRADIENT_METHODS, gradient_maps
from globalpool.cam.resize import upsample_maps
from globalpool.contract import LAYOUTS

METHODS: tuple[str, ...] = ("auto", "cam", "attention", *GRADIENT_METHODS)


def auto_method(model: nn.Module) -> str:
    """The method :func:`class_activation_maps` uses for ``model`` by default (``method="auto"``,
    ``layer=None``): ``"attention"`` where the model's last globalpool head or pool is (or pools
    with) a query-based attention pool, ``"cam"`` where the exact maps apply to it, else
    ``"gradcam"``.

    Args:
        model: a ``torch.nn.Module`` holding a globalpool head or pool.

    Returns:
        ``"attention"``, ``"cam"`` or ``"gradcam"``.

    Raises:
        ValueError: ``model`` has no globalpool head or pool to take the feature map from (for
            such a model, :func:`class_activation_maps` needs ``layer=``).

    >>> import globalpool as gp
    >>> gp.cam.auto_method(gp.ClassifierHead(8, 3, pool="avg"))
    'cam'
    >>> gp.cam.auto_method(gp.ClassifierHead(8, 3, pool="gem"))
    'gradcam'
    >>> gp.cam.auto_method(gp.ClassifierHead(8, 3, pool="simpool"))
    'attention'
    """
    head = find_site(model, None).head
    if query_pool_of(head) is not None:
        return "attention"
    return "cam" if is_exact(head) else "gradcam"


def class_activation_maps(
    model: nn.Module,
    x: Any,
    targets: int | torch.Tensor | None = None,
    *,
    layer: nn.Module | str | None = None,
    method: str = "auto",
    mask: torch.Tensor | None = None,
    upsample: int | tuple[int, ...] | None = None,
    layout: str | None = None,
    reduce: str | None = None,
) -> torch.Tensor:
    """Class activation maps ``(N, *S)`` of ``model`` on ``x`` for the class ``targets``.

    ``model(x)`` must return logits ``(N, num_classes)``. The feature map ``(N, C, *S)`` is the
    output of ``layer`` (a module of ``model`` or its dotted name) or, by default, the input of
    the model's last globalpool head or pool (a :class:`~globalpool.ClassifierHead`, a
    :class:`~globalpool.NiNHead`, or a ``GlobalPool``/``GeM``/``AttentionPool`` as
    :func:`~globalpool.swap_pool` puts in). ``layout`` declares where that map keeps its channels
    (default: the head's layout where the map is the head's input, else ``"channels_first"``).

    ``targets``: None (each sample's predicted class), an int, or an ``(N,)`` integer tensor.

    ``method``:

    - ``"cam"``: exact maps for a ``ClassifierHead`` pooling with ``avg``, ``max``, ``avgmax``,
      ``catavgmax`` or ``attention`` and for a ``NiNHead``: the map's mean over the real
      positions equals the head's logit minus the classifier's bias (for ``NiNHead``, the logit);
      a max is credited to its arg-max position(s), ties shared equally.
    - ``"gradcam"``, ``"gradcam++"``, ``"layercam"``: from the gradient of the target logit, for
      any head and any model (see :mod:`globalpool.cam.gradient` for the formulas).
    - ``"attention"``: for a query-based attention pool (:class:`~globalpool.LatentAttentionPool`,
      :class:`~globalpool.SimPool`, :class:`~globalpool.CLIPAttentionPool`, alone or as a
      ``ClassifierHead``'s ``pool="map"``/``"simpool"``/``"clip"``): the attention its forward
      gave each position, ``(N, latent_len, num_heads, *S)`` (see
      :mod:`globalpool.cam.attention`), or their mean ``(N, *S)`` with ``reduce="mean"``. The
      same for every class: ``targets`` does not change it. Only with ``layer=None``.
    - ``"auto"``: ``"attention"`` (averaged: ``(N, *S)``) for a query-based attention pool,
      ``"cam"`` where it is exact, else ``"gradcam"``.

    ``reduce``: None, or ``"mean"`` to average the attention maps over the latent queries and
    heads; the other methods' maps are ``(N, *S)`` already (``"mean"`` leaves them as they are).

    ``mask`` ``(N, *S)`` (bool, True = real) marks the real positions of the feature map; by
    default the mask the head was called with, if any. When ``model`` is itself the head, it is
    called as ``model(x, mask=mask)``. Padded positions are exactly 0 and take no part in any
    mean or sum. ``upsample`` (an int or a size per spatial dim) resizes the maps with
    :func:`~globalpool.cam.upsample_maps`.

    The maps are of ``layer``'s own output, as the layer returned it: the rest of the model goes
    on with a copy, so an in-place op after the layer (``nn.ReLU(inplace=True)`` after a ResNet
    block's last batch norm) changes the copy, not the map, and ``"gradcam"`` equals captum's
    ``LayerGradCam(model, layer)`` there too. ``method="cam"`` applies only where the head
    received that output unchanged. A frozen model (``model.requires_grad_(False)``) gives the
    same maps. An empty batch (N = 0) gives empty maps ``(0, *S)``.

    Call ``model.eval()`` first: dropout or batch statistics in training mode change the maps.
    No hook stays on the model and no parameter's ``.grad`` changes, even under
    ``torch.no_grad()``.

    >>> import torch, globalpool as gp
    >>> head = gp.NiNHead(4, 3).double()
    >>> x = torch.randn(2, 4, 6, dtype=torch.float64)
    >>> maps = gp.class_activation_maps(head, x, targets=1)
    >>> torch.allclose(maps.mean(-1), head(x)[:, 1])
    True
    >>> gp.class_activation_maps(head, x, method="gradcam++", upsample=12).shape
    torch.Size([2, 12])
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or None, got {layout!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(
            f"reduce must be None (a map per latent query and head) or 'mean' (their mean), "
            f"got {reduce!r}"
        )
    site = find_site(model, layer)
    pool = query_pool_of(site.head) if site.pre else None
    if method == "attention" or (method == "auto" and pool is not None):
        reduce = "mean" if method == "auto" else reduce
        maps = _attention(model, x, site, pool, mask, layout, reduce)
        if upsample is None or reduce == "mean":
            return maps if upsample is None else upsample_maps(maps, upsample)
        out = upsample_maps(maps.flatten(0, 2), upsample)  # each query and head's map
        return out.reshape(*maps.shape[:3], *out.shape[1:])
    exact = is_exact(site.head)
    if method == "cam" and not exact:
        raise ValueError(_not_exact(site))
    no_grad = method == "cam" or (method == "auto" and exact and site.pre)
    if not no_grad and torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"method={method!r} needs gradients, which torch.inference_mode() forbids; call it "
            "outside inference_mode (torch.no_grad() is fine)"
        )
    call_mask = mask if model is site.head else None
    with torch.no_grad() if no_grad else torch.enable_grad():
        with capture(model, site) as seen:
            out = model(x) if call_mask is None else model(x, mask=call_mask)
        reads_head_input = site.pre or (seen.feature is not None and seen.reads_passed)
        layout = _layout(site, layout, reads_head_input)
        feature = _checked_feature(seen, site, out, layout)
        mask = _checked_mask(mask, seen, feature, layout)
        targets = _targets(targets, out)
        if method == "auto":
            method = "cam" if exact and reads_head_input else "gradcam"
        if method == "cam":
            if not reads_head_input:
                raise ValueError(
                    f"method='cam' maps the head's input, and layer {site.name!r}'s output is not "
                    f"what the head received; use layer=None or method='gradcam'"
                )
            with torch.no_grad():
                maps = exact_maps(site.head, feature.detach(), mask, targets)
        else:
            score = out[torch.arange(out.shape[0], device=out.device), targets].sum()
            (grad,) = torch.autograd.grad(score, feature, allow_unused=True)
            if grad is None:
                raise ValueError(
                    f"model's logits do not depend on layer {site.name!r}'s output; pick a layer "
                    f"the logits are computed from"
                )
            first = layout == "channels_first"
            A = feature.detach() if first else feature.detach().movedim(-1, 1)
            G = grad if first else grad.movedim(-1, 1)
            maps = gradient_maps(method, A, G, mask)
    maps = maps.detach()
    if not maps.is_floating_point() or maps.dtype in (torch.float16, torch.bfloat16):
        maps = maps.float()
    return maps if upsample is None else upsample_maps(maps, upsample)


def _attention(
    model: nn.Module,
    x: torch.Tensor,
    site: Site,
    pool: nn.Module | None,
    mask: torch.Tensor | None,
    layout: str | None,
    reduce: str | None,
) -> torch.Tensor:
    """``method="attention"``: the maps of the attention ``pool`` computed in ``model(x)``."""
    if pool is None:
        what = (
            f"layer={site.name!r}" if not site.pre
            else f"{type(site.head).__name__}" + (
                f" pooling with {head_kind(site.head)!r}" if head_kind(site.head) else ""
            )
        )
        raise ValueError(
            "method='attention' maps the attention of a query-based attention pool "
            "(LatentAttentionPool, SimPool, CLIPAttentionPool, or a ClassifierHead with "
            f"pool='map', 'simpool' or 'clip') over its input, with layer=None; got {what}: "
            "use method='gradcam' (or 'auto')"
        )
    call_mask = mask if model is site.head else None
    with torch.no_grad(), capture(model, site) as seen, recording(pool) as probs:
        model(x) if call_mask is None else model(x, mask=call_mask)
    layout = _layout(site, layout, True)
    feature = seen.feature
    if seen.calls != 1 or feature is None:
        raise ValueError(
            f"the attention pool {site.name or type(pool).__name__!r} ran {seen.calls} times in "
            "one forward; expected once"
        )
    spatial = tuple(feature.shape[2:] if layout == "channels_first" else feature.shape[1:-1])
    mask = _checked_mask(mask, seen, feature, layout)
    maps = attention_maps(probs, spatial, seen.mask, mask, reduce)
    return maps.float() if maps.dtype in (torch.float16, torch.bfloat16) else maps


def _not_exact(site: Site) -> str:
    kind = head_kind(site.head)
    plain = getattr(site.head, "is_linear", True)
    what = (
        f"a ClassifierHead pooling with {kind!r}"
        + ("" if plain else " with a norm, a hidden layer or no classifier (num_classes=0)")
        if kind is not None
        else f"{type(site.head).__name__ if site.head is not None else 'a model'} without a "
        "ClassifierHead or NiNHead"
    )
    return (
        f"method='cam' is exact only for a ClassifierHead pooling with a kind that has a credit "
        f"({exact_kinds()}, or a tuple of them) or a NiNHead; got {what}; use method='gradcam' "
        "(or 'auto')"
    )


def exact_kinds() -> tuple[str, ...]:
    """The registered kinds whose ClassifierHead has exact maps (those with a credit)."""
    return tuple(k for k in registry.kinds() if registry.spec(k).credit is not None)


def _layout(site: Site, layout: str | None, reads_head_input: bool) -> str:
    """The feature map's layout: the head's when the map is the head's input (a contradicting
    ``layout`` is refused), else ``layout`` or channels-first."""
    head_layout = getattr(site.head, "layout", None)
    if reads_head_input:
        if layout is not None and head_layout is not None and layout != head_layout:
            raise ValueError(
                f"layout={layout!r} contradicts the head's layout {head_layout!r}, whose input "
                "is the feature map; leave layout=None"
            )
        return head_layout or layout or "channels_first"
    return layout or "channels_first"


def _checked_feature(seen: Seen, site: Site, out: Any, layout: str) -> torch.Tensor:
    where = f"layer {site.name!r} ({type(site.module).__name__})" if site.name else "the model"
    what = "input" if site.pre else "output"
    if seen.calls == 0 or seen.feature is None:
        raise ValueError(f"{where} did not run during model(x); pick a layer that does")
    if seen.calls > 1:
        raise ValueError(
            f"{where} ran {seen.calls} times in one forward; expected once (pick a layer that "
            "makes one feature map)"
        )
    feature = seen.feature
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model(x) must return logits of shape (N, num_classes), got {got}")
    if not 3 <= feature.ndim <= 5 or feature.shape[0] != out.shape[0]:
        raise ValueError(
            f"{where} must produce an (N, C, *S) feature map with N = {out.shape[0]} and 1 to 3 "
            f"spatial dims ({layout}), got {what} of shape {tuple(feature.shape)}"
        )
    if not feature.is_floating_point():
        raise ValueError(f"{where} must produce a floating feature map, got {feature.dtype}")
    return feature


def _checked_mask(mask: Any, seen: Seen, feature: torch.Tensor, layout: str) -> torch.Tensor | None:
    spatial = tuple(feature.shape[2:] if layout == "channels_first" else feature.shape[1:-1])
    expected = (feature.shape[0], *spatial)
    if mask is None:
        got = seen.mask
        return got if got is not None and tuple(got.shape) == expected else None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor (True = real position), got {got}")
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask must have the feature map's shape (N, *S) = {expected}, got {tuple(mask.shape)}"
        )
    return mask.to(feature.device)


def _targets(targets: Any, out: torch.Tensor) -> torch.Tensor:
    n, classes = out.shape
    if targets is None:
        return out.detach().argmax(1)
    if isinstance(targets, int) and not isinstance(targets, bool):
        t = torch.full((n,), targets, dtype=torch.long, device=out.device)
    elif (
        isinstance(targets, torch.Tensor)
        and not targets.is_floating_point()
        and (targets.dtype != torch.bool)
    ):
        if tuple(targets.shape) != (n,):
            raise ValueError(f"targets must have shape (N,) = ({n},), got {tuple(targets.shape)}")
        t = targets.to(out.device, torch.long)
    else:
        raise TypeError(f"targets must be None, an int or an (N,) integer tensor, got {targets!r}")
    if n and (int(t.min()) < 0 or int(t.max()) >= classes):
        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
        raise ValueError(f"targets must be class indices in [0, {classes}), got {bad}")
    return t
