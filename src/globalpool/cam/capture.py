"""Find the layer whose output is the feature map, and capture that map during one forward.

Every hook registered here is removed in a ``finally``, so none is left on the model whether the
forward returns or raises.

>>> import torch, globalpool as gp
>>> net = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), gp.ClassifierHead(4, 3))
>>> site = find_site(net, None)
>>> site.name, type(site.head).__name__
('1', 'ClassifierHead')
>>> with capture(net, site) as seen:
...     _ = net(torch.randn(2, 1, 9))
>>> seen.feature.shape, [len(m._forward_pre_hooks) for m in net.modules()]
(torch.Size([2, 4, 7]), [0, 0, 0, 0, 0, 0])
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from globalpool.attention import QUERY_POOLS
from globalpool.heads import ClassifierHead, NiNHead
from globalpool.layers import AttentionPool, GeM, GlobalPool, LSEPool

#: Modules whose *input* is a feature map that is pooled globally.
POOL_MODULES = (GlobalPool, GeM, LSEPool, AttentionPool, *QUERY_POOLS)


@dataclasses.dataclass
class Site:
    """Where the feature map is taken.

    ``module`` is hooked; ``pre`` says whether its input (True) or its output (False) is the map;
    ``head`` is the globalpool head or pool that reads the map (None for a layer of the caller's
    choosing whose consumer is unknown); ``name`` is the module's dotted name in the model.
    """

    module: nn.Module
    name: str
    pre: bool
    head: nn.Module | None


@dataclasses.dataclass
class Seen:
    """What one forward showed: the feature map (a tensor that requires grad), the mask the
    head received (None if none) and how many times the hooked module ran.

    For a layer's output, ``feature`` is that output as the layer returned it, kept apart from
    the tensor the rest of the model goes on with (``passed``, a copy whose graph leads to
    ``feature``): an in-place op after the layer (``nn.ReLU(inplace=True)``) changes ``passed``,
    never ``feature``. ``reads_passed`` says whether the head's input was ``passed`` itself,
    unchanged by any in-place op (then the feature map is exactly what the head pooled).
    """

    feature: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    calls: int = 0
    head_input: torch.Tensor | None = None
    passed: torch.Tensor | None = None
    passed_version: int = -1
    reads_passed: bool = False


def _last_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The last (in registration order) globalpool head or pool of ``model``; a pool inside a
    :class:`~globalpool.ClassifierHead` stands for that head."""
    owner: dict[int, tuple[str, nn.Module]] = {}
    last: tuple[str, nn.Module] | None = None
    for name, module in model.named_modules():
        if isinstance(module, ClassifierHead):
            owner[id(module.pool)] = (name, module)
            last = (name, module)
        elif isinstance(module, NiNHead):
            last = (name, module)
        elif isinstance(module, POOL_MODULES):
            last = owner.get(id(module), (name, module))
    return last


def find_site(model: nn.Module, layer: nn.Module | str | None) -> Site:
    """The :class:`Site` for ``layer`` (a module of ``model``, its dotted name, or None for the
    input of the model's last globalpool head or pool)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    head = _last_head(model)
    if layer is None:
        if head is None:
            raise ValueError(
                "model has no globalpool head or pool (ClassifierHead, NiNHead, GlobalPool, GeM, "
                "LSEPool, AttentionPool, LatentAttentionPool, SimPool, CLIPAttentionPool) to take "
                "the feature map from; pass layer= (the module, or its dotted name, whose output "
                "is the (N, C, *S) feature map)"
            )
        return Site(head[1], head[0], pre=True, head=head[1])
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(layer, str):
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            known = [n for n in names.values() if n][:12]
            raise ValueError(
                f"layer {layer!r} is not a module of the model; expected a dotted name such as "
                f"{known}"
            ) from None
    elif isinstance(layer, nn.Module):
        if id(layer) not in names:
            raise ValueError(f"layer {type(layer).__name__} is not a module of the model")
        module = layer
    else:
        raise TypeError(
            f"layer must be an nn.Module, a dotted module name or None, got {type(layer).__name__}"
        )
    return Site(module, names[id(module)], pre=False, head=head[1] if head is not None else None)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is in the autograd graph, else a detached copy that requires grad."""
    return t if t.requires_grad else t.detach().requires_grad_(True)


@contextlib.contextmanager
def capture(model: nn.Module, site: Site, *, head_hook: bool = True) -> Iterator[Seen]:
    """Record the feature map at ``site`` while the body runs ``model``; hooks removed on exit.

    With ``head_hook`` (and a site of the caller's choosing) the head's input and mask are
    recorded too (``seen.head_input``), so that exact maps can check they read the same tensor.
    """
    seen = Seen()
    handles: list[Any] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        seen.calls += 1
        feature = _leaf(args[0])
        seen.feature = feature
        mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
        seen.mask = mask if isinstance(mask, torch.Tensor) else None
        return (feature, *args[1:]), kwargs

    def post_hook(module: nn.Module, args: tuple, output: Any) -> Any:
        seen.calls += 1
        if not isinstance(output, torch.Tensor):
            raise ValueError(
                f"layer {site.name!r} ({type(module).__name__}) must output a (N, C, *S) tensor, "
                f"got {type(output).__name__}"
            )
        feature = _leaf(output)
        seen.feature = feature
        # the model goes on with a copy, so that an in-place op after the layer (a ReLU with
        # inplace=True) changes that copy, not the layer's output the maps are made of; the
        # gradient reaches ``feature`` through the copy. A frozen model's output is a detached
        # leaf here, which an in-place op could not touch at all.
        passed = feature.clone()
        seen.passed, seen.passed_version = passed, passed._version
        return passed

    def head_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args and isinstance(args[0], torch.Tensor):
            seen.head_input = args[0]
            seen.reads_passed = (
                args[0] is seen.passed and args[0]._version == seen.passed_version
            )
            mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
            seen.mask = mask if isinstance(mask, torch.Tensor) else None

    try:
        if site.pre:
            handles.append(site.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            handles.append(site.module.register_forward_hook(post_hook))
            if head_hook and site.head is not None:
                handles.append(site.head.register_forward_pre_hook(head_pre_hook, with_kwargs=True))
        yield seen
    finally:
        for handle in handles:
            handle.remove()
