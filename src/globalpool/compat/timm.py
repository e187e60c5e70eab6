"""timm's pooling conventions on globalpool's kinds: change one import, keep the model code.

``SelectAdaptivePool`` (and ``SelectAdaptivePool2d``, timm's name), ``create_classifier`` and
``global_pool_nlc`` take timm's arguments and give timm's shapes and values for timm's pool types
(``avg``, ``max``, ``avgmax`` = 0.5 * (avg + max), ``catavgmax`` = cat(avg, max), the ``fast``
spellings, ``""`` for no pooling, ``token`` for the class token), and besides accept every
registered kind (``gem``, ``lse``, a kind of your own) or a tuple of kinds, a padding ``mask``
and the kind's parameters. Every pool is :class:`globalpool.GlobalPool` (or
:class:`globalpool.AdaptivePool`) underneath: no parameters, so a timm checkpoint loads as before,
and :func:`globalpool.swap_pool` finds it.

>>> import torch
>>> from globalpool.compat.timm import SelectAdaptivePool2d
>>> pool = SelectAdaptivePool2d(pool_type="catavgmax", flatten=True)
>>> pool
SelectAdaptivePool2d(pool_type=catavgmax, flatten=Flatten(start_dim=1, end_dim=-1))
>>> pool(torch.randn(2, 8, 7, 7)).shape
torch.Size([2, 16])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from globalpool import registry
from globalpool.contract import check_input, check_kinds, check_mask, check_output_size
from globalpool.functional import pool
from globalpool.layers import AdaptivePool, AttentionPool, GlobalPool
from globalpool.learned_pools import LEARNED_POOLS, make_learned_pool

#: The ``input_fmt`` values: images channels-first or channels-last, token sequences (N, L, C).
INPUT_FORMATS: tuple[str, ...] = ("NCHW", "NHWC", "NLC")

#: timm's own pool types (``fast`` may also prefix any kind: ``fastavg``, ``fastgem``, ...).
TIMM_POOL_TYPES: tuple[str, ...] = ("", "avg", "max", "avgmax", "catavgmax", "fast", "token")

_LAYOUT = {"NCHW": "channels_first", "NHWC": "channels_last", "NLC": "channels_last"}
_SHAPE = {"NCHW": "(N, C, H, W)", "NHWC": "(N, H, W, C)", "NLC": "(N, L, C)"}
_TOKEN = "token"


def _pool_type_error(pool_type: Any) -> ValueError:
    if isinstance(pool_type, str) and pool_type in LEARNED_POOLS:
        return ValueError(
            f"pool_type={pool_type!r} is a learned pool with weights over the channels, which "
            "SelectAdaptivePool does not know: build it with create_classifier(num_features, "
            f"num_classes, pool_type={pool_type!r}) or put it in with gp.swap_pool(model, "
            f"{pool_type!r})"
        )
    return ValueError(
        f"pool_type must be '' (no pooling), 'token' (the class token, input_fmt='NLC'), 'fast' "
        f"or 'fast' + a kind, a kind of {registry.kinds()}, or a tuple of kinds; got "
        f"{pool_type!r}"
    )


def _as_kind(name: str) -> str | None:
    """``name`` as a registered kind (exactly, or lower-cased as timm reads it), else None."""
    for candidate in (name, name.lower()):
        if candidate in registry.kinds():
            return candidate
    return None


def resolve_pool_type(pool_type: Any, input_fmt: str) -> str | tuple[str, ...]:
    """The globalpool kind that a timm ``pool_type`` names: ``""`` for no pooling, ``"token"`` for
    the class token, else a kind or a tuple of kinds. ``None`` counts as ``""`` (as in timm);
    ``fast`` is ``avg`` and ``fast<kind>`` is ``<kind>`` (timm's fast path gives the same values).

    >>> resolve_pool_type("fastcatavgmax", "NCHW"), resolve_pool_type(("avg", "gem"), "NHWC")
    ('catavgmax', ('avg', 'gem'))
    >>> resolve_pool_type("mean", "NCHW")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: pool_type must be '' (no pooling), ... got 'mean'
    """
    if pool_type is None or (isinstance(pool_type, str) and not pool_type):
        return ""
    if isinstance(pool_type, (tuple, list)):
        return check_kinds(pool_type, "pool_type")
    if not isinstance(pool_type, str):
        raise _pool_type_error(pool_type)
    kind = _as_kind(pool_type)
    if kind is not None:
        return kind
    if pool_type.lower() == _TOKEN:
        if input_fmt != "NLC":
            raise ValueError(
                f"pool_type='token' (the class token) needs token sequences, input_fmt='NLC'; "
                f"got input_fmt={input_fmt!r}"
            )
        return _TOKEN
    if pool_type.lower().startswith("fast"):
        rest = pool_type[4:]
        kind = "avg" if not rest else _as_kind(rest)
        if kind is not None:
            return kind
    raise _pool_type_error(pool_type)


def _check_input_fmt(input_fmt: Any) -> str:
    if not isinstance(input_fmt, str) or input_fmt not in INPUT_FORMATS:
        raise ValueError(f"input_fmt must be one of {INPUT_FORMATS}, got {input_fmt!r}")
    return input_fmt


def _check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")


def _check_prefix(num_prefix_tokens: Any, reduce_include_prefix: Any) -> None:
    what = "an int >= 0 (the class and register tokens before the patch tokens)"
    if not isinstance(num_prefix_tokens, int) or isinstance(num_prefix_tokens, bool):
        raise TypeError(f"num_prefix_tokens must be {what}, got {num_prefix_tokens!r}")
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be {what}, got {num_prefix_tokens!r}")
    _check_bool(reduce_include_prefix, "reduce_include_prefix")


def _check_rank(x: Any, input_fmt: str) -> None:
    rank = 3 if input_fmt == "NLC" else 4
    if isinstance(x, torch.Tensor) and x.ndim != rank:
        raise ValueError(
            f"x must be {_SHAPE[input_fmt]} for input_fmt={input_fmt!r}, got shape "
            f"{tuple(x.shape)}"
        )
    check_input(x)
    if x.ndim != rank:
        raise ValueError(
            f"x must be {_SHAPE[input_fmt]} for input_fmt={input_fmt!r}, got shape "
            f"{tuple(x.shape)}"
        )


def _patch_tokens(
    x: torch.Tensor, mask: torch.Tensor | None, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens after the first ``num_prefix_tokens`` (and the mask's part for them); the mask
    is checked against all of ``x`` first, so its errors speak of the tokens the caller gave."""
    check_mask(mask, x, "channels_last")
    if num_prefix_tokens == 0:
        return x, mask
    if num_prefix_tokens >= x.shape[1]:
        raise ValueError(
            f"num_prefix_tokens={num_prefix_tokens} leaves no token to pool in x of shape "
            f"{tuple(x.shape)} (N, L, C); expected num_prefix_tokens < L = {x.shape[1]}"
        )
    return x[:, num_prefix_tokens:], None if mask is None else mask[:, num_prefix_tokens:]


def _no_mask_without_pooling(mask: Any) -> None:
    if mask is not None:
        raise ValueError(
            "mask must be None with pool_type='' (no pooling): nothing is pooled for it to leave "
            "out; the features are returned as they are"
        )


class _ClassToken(GlobalPool):
    """``pool_type='token'``: the token at index 0 (the class token), whatever the mask says."""

    def __init__(self) -> None:
        super().__init__("first", layout="channels_last", keepdim=True)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, **params: Any
    ) -> torch.Tensor:
        check_mask(mask, x, "channels_last")  # a bad mask is refused, a good one not needed
        return super().forward(x, **params)


def _kind_of(module: nn.Module) -> Any:
    """The pool type a (possibly swapped-in) pooling module computes."""
    if isinstance(module, nn.Identity):
        return ""
    if isinstance(module, _ClassToken):
        return _TOKEN
    if isinstance(module, AttentionPool):
        return "attention"
    for name, cls in LEARNED_POOLS.items():  # a query-based pool that gp.swap_pool put in
        if type(module) is cls:
            return name
    return getattr(module, "kind", type(module).__name__)


class SelectAdaptivePool(nn.Module):
    """timm's ``SelectAdaptivePool2d``: a global pool chosen by name, then an optional flatten.

    Args:
        output_size: 1 (global pooling), or the size of an adaptive pool's output per spatial
            dim (:class:`globalpool.AdaptivePool`; not with ``fast`` or ``token``).
        pool_type: timm's ``avg``, ``max``, ``avgmax`` (0.5 * (avg + max)), ``catavgmax``
            (cat(avg, max), twice the channels), ``fast`` (``avg``) or ``fast`` + a kind (the
            same values: the fast spelling only says the pool is global), ``""`` (no pooling:
            the input passes through, flattened if ``flatten``), ``token`` (the class token,
            index 0, for ``input_fmt="NLC"``); or any registered kind (``gem``, ``lse``, your
            own) or a tuple of kinds, side by side.
        flatten: return ``(N, C')`` instead of keeping singleton spatial dims.
        input_fmt: ``NCHW``, ``NHWC`` or ``NLC`` (token sequences ``(N, L, C)``).
        num_prefix_tokens: for ``NLC``: the class and register tokens before the patch tokens,
            left out of the pool (unless ``reduce_include_prefix``).
        reduce_include_prefix: pool the prefix tokens too.
        params: the kind's parameters (``p`` for ``gem``, ``r`` for ``lse``; fixed, not
            learned: :func:`globalpool.swap_pool` puts in a learnable GeM), and ``backend``.

    Shape:
        ``(N, C, H, W)`` / ``(N, H, W, C)`` / ``(N, L, C)`` in; ``(N, C')`` with ``flatten``, else
        the input's rank with singleton spatial dims (``(N, C', 1, 1)``, ``(N, 1, 1, C')``,
        ``(N, 1, C')``), where ``C' = C * feat_mult()``. ``forward(x, mask=None, **params)``
        takes a bool ``mask`` of shape ``(N, H, W)`` or ``(N, L)`` (True = real position; for
        ``NLC`` over all ``L`` tokens, prefix included) and per-call parameters (``weights``
        for ``attention``).

    >>> import torch
    >>> from globalpool.compat.timm import SelectAdaptivePool
    >>> x = torch.randn(2, 8, 7, 7)
    >>> SelectAdaptivePool(pool_type="avg", flatten=True)(x).shape
    torch.Size([2, 8])
    >>> gem = SelectAdaptivePool(pool_type="gem", flatten=True, p=4.0)
    >>> gem(x.abs()).shape, gem.feat_mult(), len(gem.state_dict())
    (torch.Size([2, 8]), 1, 0)
    >>> tokens = torch.randn(2, 1 + 196, 8)  # a class token, then 14 x 14 patch tokens
    >>> SelectAdaptivePool(pool_type="avg", input_fmt="NLC", num_prefix_tokens=1)(tokens).shape
    torch.Size([2, 1, 8])
    """

    def __init__(
        self,
        output_size: int | tuple[int, ...] = 1,
        pool_type: str | tuple[str, ...] | None = "fast",
        flatten: bool = False,
        input_fmt: str = "NCHW",
        *,
        num_prefix_tokens: int = 0,
        reduce_include_prefix: bool = False,
        **params: Any,
    ) -> None:
        super().__init__()
        input_fmt = _check_input_fmt(input_fmt)
        kind = resolve_pool_type(pool_type, input_fmt)
        _check_bool(flatten, "flatten")
        _check_prefix(num_prefix_tokens, reduce_include_prefix)
        if num_prefix_tokens and input_fmt != "NLC":
            raise ValueError(
                f"num_prefix_tokens must be 0 for input_fmt={input_fmt!r} (prefix tokens belong "
                f"to token sequences, input_fmt='NLC'), got {num_prefix_tokens}"
            )
        sizes = check_output_size(output_size, 1 if input_fmt == "NLC" else 2)
        is_global = all(s == 1 for s in sizes)
        fast = (
            isinstance(pool_type, str)
            and _as_kind(pool_type) is None
            and pool_type.lower().startswith("fast")
        )
        if not is_global and kind != "" and (fast or kind == _TOKEN):
            raise ValueError(
                f"output_size must be 1 for pool_type={pool_type!r} (a global pool), got "
                f"{output_size!r}"
            )
        self._pool_type = pool_type or ""
        self._kind = kind
        self.input_fmt, self.output_size = input_fmt, output_size
        self.num_prefix_tokens = num_prefix_tokens
        self.reduce_include_prefix = reduce_include_prefix
        self.params = params
        layout = _LAYOUT[input_fmt]
        if kind == "":
            if params:
                raise TypeError(
                    f"pool_type='' (no pooling) takes no pool parameters, got {sorted(params)}"
                )
            self.pool: nn.Module = nn.Identity()
        elif kind == _TOKEN:
            if params:
                raise TypeError(
                    f"pool_type='token' takes no pool parameters, got {sorted(params)}"
                )
            self.pool = _ClassToken()
        elif is_global:
            self.pool = GlobalPool(kind, layout=layout, keepdim=True, **params)
        else:
            self.pool = AdaptivePool(output_size, kind, layout=layout, **params)
        self.flatten = nn.Flatten(1) if flatten else nn.Identity()

    @property
    def pool_type(self) -> str | tuple[str, ...]:
        """The pool type as given, or the kind of the pool that :func:`globalpool.swap_pool` put
        in its place."""
        live = _kind_of(self.pool)
        return self._pool_type if live == self._kind else live

    def is_identity(self) -> bool:
        """Whether the input passes through unpooled (``pool_type=''``)."""
        return isinstance(self.pool, nn.Identity)

    def feat_mult(self) -> int:
        """The pooled width per input channel: 2 for ``catavgmax``, the sum of the kinds'
        widths for a tuple, else 1."""
        width = getattr(self.pool, "output_width", None)
        return 1 if width is None else int(width(1))

    def _drops_prefix(self) -> bool:
        return not self.reduce_include_prefix and not isinstance(self.pool, _ClassToken)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, **params: Any
    ) -> torch.Tensor:
        if self.is_identity():
            _no_mask_without_pooling(mask)
            return self.flatten(x)
        _check_rank(x, self.input_fmt)
        if self.input_fmt == "NLC" and self._drops_prefix():
            x, mask = _patch_tokens(x, mask, self.num_prefix_tokens)
        if mask is None and not params:
            return self.flatten(self.pool(x))
        return self.flatten(self.pool(x, mask=mask, **params))

    @classmethod
    def _learned(
        cls, name: str, channels: int, input_fmt: str, flatten: bool
    ) -> SelectAdaptivePool:
        """One holding the learned pool ``name`` (``"map"``, ...) over ``channels`` channels,
        as :func:`create_classifier` builds it (it returns ``(N, C)``)."""
        module = cls(pool_type="avg", flatten=flatten, input_fmt=input_fmt)
        module.pool = make_learned_pool(name, channels, _LAYOUT[input_fmt], {})
        module._pool_type = module._kind = name
        return module

    def __repr__(self) -> str:
        extras = ""
        if self.input_fmt != "NCHW":
            extras += f", input_fmt={self.input_fmt}"
        if self.output_size != 1:
            extras += f", output_size={self.output_size}"
        if self.num_prefix_tokens:
            extras += f", num_prefix_tokens={self.num_prefix_tokens}"
        if self.reduce_include_prefix:
            extras += ", reduce_include_prefix=True"
        extras += "".join(f", {k}={v}" for k, v in self.params.items())
        if _kind_of(self.pool) != self._kind:  # swapped: show what pools now
            extras += f", pool={self.pool!r}"
        return (
            f"{type(self).__name__}(pool_type={self.pool_type}, flatten={self.flatten}{extras})"
        )


class SelectAdaptivePool2d(SelectAdaptivePool):
    """timm's name for :class:`SelectAdaptivePool` (the same module; its ``repr`` shows this
    name, as timm's does).

    >>> SelectAdaptivePool2d(pool_type="avg", flatten=True)
    SelectAdaptivePool2d(pool_type=avg, flatten=Flatten(start_dim=1, end_dim=-1))
    """


def global_pool_nlc(
    x: torch.Tensor,
    pool_type: str | tuple[str, ...] = "token",
    num_prefix_tokens: int = 1,
    reduce_include_prefix: bool = False,
    *,
    mask: torch.Tensor | None = None,
    **params: Any,
) -> torch.Tensor:
    """timm's ``global_pool_nlc``: pool token sequences ``(N, L, C)`` into ``(N, C')``.

    Args:
        x: ``(N, L, C)``: ``num_prefix_tokens`` class / register tokens, then the patch tokens.
        pool_type: ``token`` (the class token, index 0), ``""`` (none: ``x`` is returned), a
            kind (``avg``, ``max``, ``avgmax``, ``gem``, ...) or a tuple of kinds, pooled over
            the patch tokens.
        num_prefix_tokens: the tokens before the patch tokens, left out of the pool.
        reduce_include_prefix: pool the prefix tokens too.
        mask: bool ``(N, L)`` over all tokens, True = real: padded tokens never reach the
            output or the gradient, even when they hold NaN (the class token is always read).
        params: the kind's parameters (``p`` for ``gem``, ``r`` for ``lse``, ...).

    Returns:
        ``(N, C)`` (``(N, C * width)`` for ``catavgmax`` or a tuple), or ``x`` for ``""``.

    >>> import torch
    >>> from globalpool.compat.timm import global_pool_nlc
    >>> x = torch.tensor([[[9.0], [1.0], [3.0], [float("nan")]]])  # class token, 3 patches
    >>> global_pool_nlc(x, "token"), global_pool_nlc(x[:, :3], "avg")
    (tensor([[9.]]), tensor([[2.]]))
    >>> global_pool_nlc(x, "max", mask=torch.tensor([[True, True, True, False]]))
    tensor([[3.]])
    """
    kind = resolve_pool_type(pool_type, "NLC")
    _check_prefix(num_prefix_tokens, reduce_include_prefix)
    if kind == "":
        _no_mask_without_pooling(mask)
        return x
    _check_rank(x, "NLC")
    if kind == _TOKEN:
        check_mask(mask, x, "channels_last")
        return pool(x, "first", layout="channels_last", **params)
    if not reduce_include_prefix:
        x, mask = _patch_tokens(x, mask, num_prefix_tokens)
    return pool(x, kind, layout="channels_last", mask=mask, **params)


def _check_count(value: Any, name: str, what: str, low: int) -> None:
    """``value`` must be an int (a TypeError names another type) ``>= low``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _check_drop_rate(drop_rate: Any) -> None:
    if drop_rate is None:
        return
    if (
        not isinstance(drop_rate, (int, float))
        or isinstance(drop_rate, bool)
        or not 0 <= drop_rate <= 1
    ):
        raise ValueError(f"drop_rate must be None or a number in [0, 1], got {drop_rate!r}")


def create_classifier(
    num_features: int,
    num_classes: int,
    pool_type: str | tuple[str, ...] = "avg",
    use_conv: bool = False,
    input_fmt: str = "NCHW",
    drop_rate: float | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, ...]:
    """timm's ``create_classifier``: the global pool and the classifier of a model's head.

    Args:
        num_features: channels of the feature map.
        num_classes: classes; 0 gives ``nn.Identity()`` as the classifier (pooled features out).
        pool_type: as :class:`SelectAdaptivePool` (``""``: no pooling, so nothing is
            flattened), or a learned pool (``"map"``, ``"simpool"``; what
            :func:`globalpool.swap_pool` may have put in, so that a model's
            ``reset_classifier(n, global_pool=model.global_pool.pool_type)`` rebuilds it; not
            with ``use_conv``).
        use_conv: a 1x1 ``nn.Conv2d`` classifier on the pooled map ``(N, C', 1, 1)`` (the pool
            keeps its spatial dims; flatten the logits after it, as timm's models do), instead
            of a ``nn.Linear`` on flattened features. Needs ``input_fmt="NCHW"``.
        input_fmt: ``NCHW``, ``NHWC`` or ``NLC``.
        drop_rate: None, or the rate of an ``nn.Dropout`` returned between the two.
        device, dtype: of the classifier's parameters.

    Returns:
        ``(global_pool, fc)``, or ``(global_pool, dropout, fc)`` when ``drop_rate`` is given;
        ``fc`` takes ``num_features * global_pool.feat_mult()`` features.

    >>> import torch
    >>> from globalpool.compat.timm import create_classifier
    >>> global_pool, fc = create_classifier(64, 10, pool_type="catavgmax")
    >>> fc, fc(global_pool(torch.randn(2, 64, 7, 7))).shape
    (Linear(in_features=128, out_features=10, bias=True), torch.Size([2, 10]))
    >>> global_pool, fc = create_classifier(64, 10, pool_type="gem", use_conv=True)
    >>> fc(global_pool(torch.rand(2, 64, 7, 7))).flatten(1).shape
    torch.Size([2, 10])
    """
    _check_count(num_features, "num_features", "a positive int", 1)
    _check_count(num_classes, "num_classes", "an int >= 0 (0: no classifier)", 0)
    _check_bool(use_conv, "use_conv")
    _check_drop_rate(drop_rate)
    input_fmt = _check_input_fmt(input_fmt)
    if use_conv and input_fmt != "NCHW":
        raise ValueError(
            f"use_conv=True needs input_fmt='NCHW' (a 1x1 nn.Conv2d takes the channels in dim "
            f"1), got input_fmt={input_fmt!r}"
        )
    like = {"device": device, "dtype": dtype}
    if isinstance(pool_type, str) and pool_type in LEARNED_POOLS:
        if use_conv:
            raise ValueError(
                f"use_conv=True needs a pool that keeps the spatial dims (N, C', 1, 1) for its "
                f"1x1 nn.Conv2d; pool_type={pool_type!r} returns (N, C'): use use_conv=False"
            )
        global_pool: SelectAdaptivePool = SelectAdaptivePool2d._learned(
            pool_type, num_features, input_fmt, flatten=True
        ).to(**like)
    else:
        pooling = bool(resolve_pool_type(pool_type, input_fmt))
        global_pool = SelectAdaptivePool2d(
            pool_type=pool_type, flatten=pooling and not use_conv, input_fmt=input_fmt
        )
    width = num_features * global_pool.feat_mult()
    if num_classes == 0:
        fc: nn.Module = nn.Identity()
    elif use_conv:
        fc = nn.Conv2d(width, num_classes, 1, bias=True, **like)
    else:
        fc = nn.Linear(width, num_classes, bias=True, **like)
    if drop_rate is not None:
        return global_pool, nn.Dropout(drop_rate), fc
    return global_pool, fc
