"""``nn.Module`` wrappers: thin holders of parameters that call :func:`globalpool.pool`."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from globalpool import registry
from globalpool.contract import (
    check_fixed_params,
    check_input,
    check_keepdim,
    check_kinds,
    check_layout,
    check_mask,
    check_output_size,
    check_param_value,
    layout_dims,
)
from globalpool.functional import BACKENDS, adaptive_pool, output_width, pool


def check_backend(backend: Any) -> None:
    """``backend`` must be one of :data:`globalpool.functional.BACKENDS`.

    >>> check_backend("cuda")
    Traceback (most recent call last):
    ...
    ValueError: backend must be one of ('auto', 'fused', 'torch'), got 'cuda'
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_channels(channels: Any, name: str = "channels") -> None:
    """A channel or class count must be a positive int."""
    if not isinstance(channels, int) or isinstance(channels, bool) or channels <= 0:
        raise ValueError(f"{name} must be a positive int, got {channels!r}")


def check_channel_count(
    x: torch.Tensor, layout: str, channels: int, owner: str, arg: str = "in_channels"
) -> None:
    """``x`` must have ``channels`` channels where ``layout`` puts them; the error names the
    module as ``owner(arg=channels)`` (built only when the check fails: this runs every call).

    A shape check only, so it is cheap and traceable: a static size is compared in Python (a
    ``ValueError``); a symbolic one (``torch.compile(dynamic=True)``, ``torch.export`` with a
    dynamic channel dim) is asserted with ``torch._check``.

    >>> check_channel_count(torch.zeros(2, 2, 3), "channels_first", 4, "Head")
    Traceback (most recent call last):
    ...
    ValueError: Head(in_channels=4) got input with 2 channels (dim 1 for layout='channels_first')
    """
    channel_dim, _ = layout_dims(x.ndim, layout)
    got = x.shape[channel_dim]

    def message() -> str:
        return (
            f"{owner}({arg}={channels}) got input with {got} channels (dim {channel_dim} for "
            f"layout={layout!r})"
        )

    if isinstance(got, torch.SymInt):
        torch._check(got == channels, message)
    elif got != channels:
        raise ValueError(message())


def _finite(v: float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")


class GlobalPool(nn.Module):
    """Global pooling of one kind (or a tuple of kinds, side by side) with fixed parameters.

    Every argument is checked here (kind, layout, keepdim, backend, the kind's parameter names
    and scalar values); ``weights`` for ``attention`` are given at the call.

    >>> import torch, globalpool as gp
    >>> layer = gp.GlobalPool("catavgmax")
    >>> layer(torch.randn(2, 8, 5, 5)).shape, layer.output_width(8)
    (torch.Size([2, 16]), 16)
    >>> gp.GlobalPool(("avg", "max", "last"), layout="channels_last").output_width(8)
    24
    """

    def __init__(
        self,
        kind: str = "avg",
        *,
        layout: str = "channels_first",
        keepdim: bool = False,
        backend: str = "auto",
        **params: Any,
    ) -> None:
        super().__init__()
        kind = check_kinds(kind)
        check_layout(layout)
        check_keepdim(keepdim)
        check_backend(backend)
        check_fixed_params(kind, params)
        self.kind, self.layout, self.keepdim, self.backend = kind, layout, keepdim, backend
        self.params = params

    def output_width(self, channels: int) -> int:
        return output_width(self.kind, channels)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, **params: Any
    ) -> torch.Tensor:
        return pool(
            x,
            self.kind,
            layout=self.layout,
            keepdim=self.keepdim,
            mask=mask,
            backend=self.backend,
            **{**self.params, **params},
        )

    def extra_repr(self) -> str:
        extras = "".join(f", {k}={v}" for k, v in self.params.items())
        return f"kind={self.kind!r}, layout={self.layout!r}, keepdim={self.keepdim}{extras}"


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _check_learnable_start(
    name: str, value: Any, low: float, strict: bool, learnable: bool, what: str
) -> float:
    """The starting value of a learnable parameter (GeM's ``p``, LSEPool's ``r``): a finite real
    number above ``low`` (or equal to it when not ``strict``); a learnable one strictly above
    (the softplus parametrisation reaches ``low`` only in the limit)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number (int or float), got {value!r}")
    op = ">" if strict else ">="
    if not _finite(value):
        raise ValueError(f"{name} must be a finite number {op} {low:g}, got {value!r}")
    if value < low or (strict and value == low):
        raise ValueError(f"{name} must be a number {op} {low:g}, got {value!r}")
    _check_bool(learnable, "learnable")
    if learnable and value == low:
        raise ValueError(
            f"{name} must be > {low:g} for a learnable {what} ({name} = {low:g} + softplus(raw)), "
            f"got {float(value)}"
        )
    return float(value)


def _raw_parameter(
    module: nn.Module, name: str, value: float, low: float, learnable: bool, channels: int | None
) -> None:
    """Register ``name`` with ``low + softplus(raw) == value`` (a parameter, or a buffer when not
    ``learnable``): one scalar, or ``(channels,)``."""
    raw = _softplus_inverse(value - low) if value > low else -30.0
    raw = torch.tensor(raw) if channels is None else torch.full((channels,), raw)
    if learnable:
        setattr(module, name, nn.Parameter(raw))
    else:
        module.register_buffer(name, raw)


def _show(value: torch.Tensor) -> str:
    """A scalar parameter as one number, a per-channel one as its range."""
    v = value.detach().float()
    if v.ndim == 0:
        return f"{float(v):.4f}"
    return f"[{float(v.min()):.4f}..{float(v.max()):.4f}] x {v.numel()}"


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent ``p = 1 + softplus(raw_p)`` (always >= 1).

    ``channels=C`` learns one ``p`` per channel (``p`` of shape ``(C,)``, every one >= 1; the
    fused kernels take one ``p``, so this pools with the torch composition). Computed in float32
    for half inputs, so float16 activations up to 65504 do not overflow.

    >>> import torch, globalpool as gp
    >>> gem = gp.GeM(p=3.0)
    >>> round(float(gem.p.detach()), 4), gem(torch.rand(2, 4, 7, 7)).shape
    (3.0, torch.Size([2, 4]))
    >>> per_channel = gp.GeM(p=2.0, channels=4)
    >>> per_channel.p.shape, per_channel(torch.rand(2, 4, 7, 7)).shape
    (torch.Size([4]), torch.Size([2, 4]))
    """

    kind = "gem"

    def __init__(
        self,
        p: float = 3.0,
        *,
        eps: float = 1e-6,
        learnable: bool = True,
        channels: int | None = None,
        layout: str = "channels_first",
        keepdim: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        p = _check_learnable_start("p", p, 1.0, False, learnable, "GeM")
        if channels is not None:
            check_channels(channels)
        check_param_value("gem", "eps", eps)
        check_layout(layout)
        check_keepdim(keepdim)
        check_backend(backend)
        _raw_parameter(self, "raw_p", p, 1.0, learnable, channels)
        self.eps, self.layout, self.keepdim, self.backend = eps, layout, keepdim, backend
        self.learnable, self.channels = learnable, channels

    @property
    def p(self) -> torch.Tensor:
        return 1.0 + F.softplus(self.raw_p)

    def output_width(self, channels: int) -> int:
        return channels

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.channels is not None:
            check_channel_count(x, self.layout, self.channels, "GeM", "channels")
        return pool(
            x,
            "gem",
            layout=self.layout,
            keepdim=self.keepdim,
            mask=mask,
            backend=self.backend,
            p=self.p,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return (
            f"p={_show(self.p)}, eps={self.eps}, learnable={self.learnable}, "
            f"layout={self.layout!r}"
        )


class LSEPool(nn.Module):
    """Log-sum-exp pooling ``(1/r) log mean exp(r x)`` with a learnable temperature
    ``r = r_min + softplus(raw)``, always > 0 (``r -> 0`` is the average, large ``r`` the max).

    ``channels=C`` learns one ``r`` per channel (``r`` of shape ``(C,)``; the fused kernels take
    one ``r``, so this pools with the torch composition); ``learnable=False`` keeps ``r`` fixed
    (a buffer). ``r_min`` (default 1e-3) keeps ``1/r`` finite.

    >>> import torch, globalpool as gp
    >>> lse = gp.LSEPool(r=2.0)
    >>> round(float(lse.r.detach()), 4), lse(torch.rand(2, 4, 7, 7)).shape
    (2.0, torch.Size([2, 4]))
    >>> gp.LSEPool(r=0.5, channels=4).r.shape
    torch.Size([4])
    """

    kind = "lse"

    def __init__(
        self,
        r: float = 1.0,
        *,
        learnable: bool = True,
        channels: int | None = None,
        r_min: float = 1e-3,
        layout: str = "channels_first",
        keepdim: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        r_min = _check_learnable_start("r_min", r_min, 0.0, True, False, "LSEPool")
        r = _check_learnable_start("r", r, r_min, False, learnable, "LSEPool")
        if channels is not None:
            check_channels(channels)
        check_layout(layout)
        check_keepdim(keepdim)
        check_backend(backend)
        _raw_parameter(self, "raw_r", r, r_min, learnable, channels)
        self.r_min, self.layout, self.keepdim, self.backend = r_min, layout, keepdim, backend
        self.learnable, self.channels = learnable, channels

    @property
    def r(self) -> torch.Tensor:
        return self.r_min + F.softplus(self.raw_r)

    def output_width(self, channels: int) -> int:
        return channels

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.channels is not None:
            check_channel_count(x, self.layout, self.channels, "LSEPool", "channels")
        return pool(
            x,
            "lse",
            layout=self.layout,
            keepdim=self.keepdim,
            mask=mask,
            backend=self.backend,
            r=self.r,
        )

    def extra_repr(self) -> str:
        return f"r={_show(self.r)}, learnable={self.learnable}, layout={self.layout!r}"


class ChannelScorer(nn.Linear):
    """``nn.Linear(C, 1)`` applied along x's channel dim where it lies: one score per position,
    ``(N, *S)``. Channels-first input takes a product over its channel dim (no transposed copy of
    x), and the scores come without a trailing unit dim, which an exported graph would otherwise
    broadcast the bias against one element at a time in onnxruntime. Its parameters are
    ``nn.Linear``'s (``weight`` ``(1, C)``, ``bias`` ``(1,)``), and hooks on it see the scores.

    >>> import torch
    >>> scorer = ChannelScorer(4)
    >>> x = torch.randn(2, 4, 3, 5)
    >>> scores = scorer(x, channel_dim=1)
    >>> scores.shape, torch.allclose(scores, nn.Linear.forward(scorer, x.movedim(1, -1))[..., 0])
    (torch.Size([2, 3, 5]), True)
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, 1)

    def forward(self, x: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
        w = self.weight.reshape(-1)
        if channel_dim % x.ndim == x.ndim - 1:
            logits = x @ w
        elif channel_dim == 1:  # channels first: (N, C, *S)
            logits = (w @ x.flatten(2)).reshape(x.shape[0], *x.shape[2:])
        else:
            raise ValueError(f"channel_dim must be 1 or the last dim, got {channel_dim}")
        return logits + self.bias


class AttentionPool(nn.Module):
    """Attention-weighted average: a learned 1x1 scorer gives weights ``sigmoid(w . x_s + b)``.

    With a mask, padded positions are replaced by 0 before the scorer, so whatever they hold
    (NaN, inf) reaches neither the output nor any gradient (x's or the scorer's).

    >>> import torch, globalpool as gp
    >>> att = gp.AttentionPool(8)
    >>> att(torch.randn(2, 8, 5, 5)).shape
    torch.Size([2, 8])
    >>> x, mask = torch.randn(1, 8, 4), torch.tensor([[True, True, False, False]])
    >>> x[..., 2:] = float("nan")
    >>> bool(att(x, mask=mask).isfinite().all())
    True
    """

    def __init__(
        self,
        channels: int,
        *,
        layout: str = "channels_first",
        keepdim: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_channels(channels)
        check_layout(layout)
        check_keepdim(keepdim)
        check_backend(backend)
        self.channels, self.layout, self.keepdim, self.backend = channels, layout, keepdim, backend
        self.score = ChannelScorer(channels)

    def output_width(self, channels: int) -> int:
        return channels

    def _check(self, x: Any, mask: Any) -> None:
        check_input(x)
        check_channel_count(x, self.layout, self.channels, "AttentionPool", "channels")
        check_mask(mask, x, self.layout)

    def weights(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Non-negative weights of shape ``(N, *S)``; padded positions (``mask`` False) are
        scored as zeros, so what they hold never reaches the scorer."""
        self._check(x, mask)
        return self._weights(x, mask)

    def _weights(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        channel_dim, _ = layout_dims(x.ndim, self.layout)
        if mask is not None:  # select, not multiply: 0 * NaN is NaN
            x = torch.where(mask.unsqueeze(channel_dim), x, 0.0)
        return torch.sigmoid(self.score(x.to(self.score.weight.dtype), channel_dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x, mask)
        return pool(
            x,
            "attention",
            layout=self.layout,
            keepdim=self.keepdim,
            mask=mask,
            backend=self.backend,
            weights=self._weights(x, mask),
        )

    def extra_repr(self) -> str:
        return f"channels={self.channels}, layout={self.layout!r}"


class AdaptivePool(nn.Module):
    """Adaptive pooling of one kind to a fixed output size, PyTorch's exact bins (see
    :func:`globalpool.adaptive_pool`); ``weights`` for ``attention`` are given at the call.

    >>> import torch, globalpool as gp
    >>> gp.AdaptivePool((2, 3), "max")(torch.randn(1, 4, 7, 7)).shape
    torch.Size([1, 4, 2, 3])
    >>> layer = gp.AdaptivePool(3, "catavgmax")
    >>> layer(torch.randn(2, 4, 10), mask=torch.rand(2, 10) > 0.5).shape, layer.output_width(4)
    (torch.Size([2, 8, 3]), 8)
    """

    def __init__(
        self,
        output_size: int | None | tuple[int | None, ...],
        kind: str = "avg",
        *,
        layout: str = "channels_first",
        **params: Any,
    ) -> None:
        super().__init__()
        kind = check_kinds(kind)
        check_layout(layout)
        check_output_size(output_size, None)
        check_fixed_params(kind, params)
        self.output_size, self.kind, self.layout = output_size, kind, layout
        self.params = params

    def output_width(self, channels: int) -> int:
        return output_width(self.kind, channels)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, **params: Any
    ) -> torch.Tensor:
        return adaptive_pool(
            x, self.output_size, self.kind, layout=self.layout, mask=mask,
            **{**self.params, **params},
        )

    def extra_repr(self) -> str:
        extras = "".join(f", {k}={v}" for k, v in self.params.items())
        return f"output_size={self.output_size}, kind={self.kind!r}, layout={self.layout!r}{extras}"


def make_pool(
    kind: str | tuple[str, ...],
    channels: int,
    *,
    layout: str = "channels_first",
    **params: Any,
) -> nn.Module:
    """The pooling module for ``kind``: learnable GeM, learned attention, a learnable-temperature
    :class:`LSEPool` for ``lse`` with ``learnable=True``, else :class:`GlobalPool`.

    ``params`` go to that module: ``keepdim`` and ``backend`` for every kind, ``p``, ``eps``,
    ``learnable`` (default True) and ``per_channel`` (one ``p`` per channel) for ``gem``, ``r``,
    ``learnable`` (default False: a fixed ``r``) and ``per_channel`` for ``lse``, the kind's
    parameters for the others; anything else is refused. A tuple of kinds gives a
    :class:`GlobalPool` with fixed parameters (a ``gem`` in it has a fixed ``p``; ``attention``,
    whose weights are learned, is refused in a tuple).

    >>> make_pool("gem", 16)
    GeM(p=3.0000, eps=1e-06, learnable=True, layout='channels_first')
    >>> make_pool("lse", 16, r=2.0, learnable=True, per_channel=True)
    LSEPool(r=[2.0000..2.0000] x 16, learnable=True, layout='channels_first')
    >>> make_pool("attention", 16, p=3.0)
    Traceback (most recent call last):
    ...
    TypeError: pool 'attention' got unexpected argument(s) ['p']; it takes keepdim, backend
    """
    kind = check_kinds(kind)
    if isinstance(kind, tuple) and any(
        q.per_position for k in kind for q in registry.spec(k).params
    ):
        raise ValueError(
            f"pool {kind!r}: a tuple of kinds pools with fixed parameters and cannot learn "
            "attention weights; pool attention with its own AttentionPool (kind 'attention')"
        )
    takes = _make_pool_args(kind)
    unknown = sorted(set(params) - set(takes)) if takes is not None else None
    if unknown:
        raise TypeError(
            f"pool {kind!r} got unexpected argument(s) {unknown}; it takes {', '.join(takes)}"
        )
    per_channel = params.pop("per_channel", False)
    _check_bool(per_channel, "per_channel")
    if per_channel:
        params["channels"] = channels
    if kind == "gem":
        return GeM(layout=layout, **params)
    if kind == "attention":
        return AttentionPool(channels, layout=layout, **params)
    if kind == "lse":
        learnable = params.pop("learnable", False)
        _check_bool(learnable, "learnable")
        if learnable or per_channel:
            return LSEPool(layout=layout, learnable=learnable, **params)
    return GlobalPool(kind, layout=layout, **params)


def _make_pool_args(kind: str | tuple[str, ...]) -> tuple[str, ...] | None:
    """The arguments make_pool takes for a kind that gets a module of its own (a learnable
    parameter, or learned per-position weights), from its registry entry; None for the others
    (GlobalPool checks its own: keepdim, backend and the kind's parameters)."""
    if isinstance(kind, tuple):
        return None
    params = registry.spec(kind).params
    if any(q.per_position for q in params):
        return ("keepdim", "backend")
    if any(q.learnable for q in params):
        return (*(q.name for q in params), "learnable", "per_channel", "keepdim", "backend")
    return None
