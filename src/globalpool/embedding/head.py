"""An embedding head for retrieval and metric learning: pool, project, BN-neck, whiten,
L2-normalise.

>>> import torch, globalpool as gp
>>> head = gp.EmbeddingHead(64, "gem", dim=32)
>>> head(torch.randn(4, 64, 7, 7)).norm(dim=1).allclose(torch.ones(4))
True
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from globalpool.contract import check_input, check_layout
from globalpool.embedding.whitening import Whitening, fit_whitening
from globalpool.layers import check_channel_count, check_channels, make_pool
from globalpool.learned_pools import LEARNED_POOLS, make_learned_pool


class BNNeckOutput(NamedTuple):
    """What an :class:`EmbeddingHead` with ``bnneck=True`` returns in training mode.

    Attributes:
        pre_bn: ``(N, D)`` the feature before the BN-neck: for a metric loss (triplet).
        post_bn: ``(N, D)`` the same feature batch-normalised: for the identity classifier
            (a bias-free ``nn.Linear``), whose softmax loss it keeps apart from the metric loss.

    >>> import torch, globalpool as gp
    >>> head = gp.EmbeddingHead(16, "avg", bnneck=True).train()
    >>> out = head(torch.randn(4, 16, 5, 5))
    >>> out.pre_bn.shape, out.post_bn.shape
    (torch.Size([4, 16]), torch.Size([4, 16]))
    """

    pre_bn: torch.Tensor
    post_bn: torch.Tensor


def _check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")


def _bnneck(width: int) -> nn.BatchNorm1d:
    """A ``BatchNorm1d`` whose shift stays 0 (its bias frozen): the BN-neck of re-identification
    models, which only rescales the feature."""
    bn = nn.BatchNorm1d(width)
    bn.bias.requires_grad_(False)
    return bn


class EmbeddingHead(nn.Module):
    """Global pooling to a descriptor for retrieval: ``pool -> projection -> BN-neck ->
    L2 normalisation -> whitening -> L2 normalisation``, the optional steps skipped when not
    asked for.

    - ``pool``: any kind or tuple of kinds (``"gem"`` by default, its ``p`` learnable, as in
      image retrieval), or a learned pool (``"map"``, ``"simpool"``, ``"clip"``);
      ``pool_params`` go to it as in :class:`~globalpool.ClassifierHead`.
    - ``dim``: a ``Linear`` from the pooled width to ``dim`` (no bias before a BN-neck, whose
      mean removal would cancel it).
    - ``bnneck``: a ``BatchNorm1d`` with its bias frozen at 0 (the "BNNeck" of re-identification
      models). In training mode the head then returns a :class:`BNNeckOutput`
      ``(pre_bn, post_bn)``: ``pre_bn`` for the triplet loss, ``post_bn`` for the identity
      classifier; in eval mode it returns the post-BN descriptor, normalised and whitened.
    - ``normalize``: L2-normalise the descriptor (before and after whitening).
    - ``whitening``: a whitening stage, fitted with :meth:`fit_whitening` after training (or
      loaded from a state dict). A head built without it gets one from :meth:`fit_whitening`;
      build it with ``whitening=True`` to load a saved whitened head. Until fitted, a head
      with ``whitening=True`` refuses to run.

    Args:
        in_channels: channels ``C`` of the feature map.
        pool: the pooling kind(s) or learned pool.
        dim: width of the projection, or None for none.
        bnneck: add a BN-neck.
        whitening: reserve a whitening stage (to load a fitted one).
        normalize: L2-normalise the output.
        layout: ``"channels_first"`` (``(N, C, *S)``) or ``"channels_last"`` (``(N, *S, C)``).

    Shape:
        ``x``: ``(N, C, *S)`` with 1 to 3 spatial dims (or channels last), ``mask``: ``(N, *S)``
        bool (True: a real position) as :func:`~globalpool.pool`. Output ``(N,
        embedding_width)`` in x's dtype; after the pool, the head computes in the wider of x's
        dtype and its own (a float32 head given float16 features computes in float32).

    >>> import torch, globalpool as gp
    >>> head = gp.EmbeddingHead(64, "gem", p=3.0, bnneck=True).eval()
    >>> x, mask = torch.randn(2, 64, 7, 7), torch.rand(2, 7, 7) > 0.2
    >>> head(x, mask).shape, head.embedding_width
    (torch.Size([2, 64]), 64)
    >>> _ = head.fit_whitening(head.descriptors(torch.randn(200, 64, 3, 3)).detach(), dim=16)
    >>> head(x, mask).shape
    torch.Size([2, 16])
    """

    def __init__(
        self,
        in_channels: int,
        pool: str | tuple[str, ...] = "gem",
        *,
        dim: int | None = None,
        bnneck: bool = False,
        whitening: bool = False,
        normalize: bool = True,
        layout: str = "channels_first",
        **pool_params: Any,
    ) -> None:
        super().__init__()
        check_channels(in_channels, "in_channels")
        if dim is not None:
            check_channels(dim, "dim")
        _check_bool(bnneck, "bnneck")
        _check_bool(whitening, "whitening")
        _check_bool(normalize, "normalize")
        check_layout(layout)
        self.in_channels, self.layout, self.normalize = in_channels, layout, normalize
        self.pool_kind = pool
        # moves with the head, so a fitted whitening takes its device and dtype even when the
        # head holds no parameter (an avg pool); not saved in the state dict
        self.register_buffer("_like", torch.empty(0), persistent=False)
        self.pool = self._make_pool(pool, pool_params)
        width = self.pooled_width
        self.projection = nn.Linear(width, dim, bias=not bnneck) if dim is not None else None
        self.bnneck = _bnneck(self.feature_width) if bnneck else None
        self.whitening = (
            Whitening(self.feature_width, normalize=normalize) if whitening else None
        )

    def _make_pool(self, pool: Any, pool_params: dict[str, Any]) -> nn.Module:
        for name in ("channels", "keepdim"):
            if name in pool_params:
                raise TypeError(
                    f"EmbeddingHead got {name}={pool_params[name]!r} for its pool: a head pools "
                    f"its in_channels={self.in_channels} channels to (N, features); pass "
                    "per_channel=True for one p (gem) or r (lse) per channel"
                )
        if isinstance(pool, str) and pool in LEARNED_POOLS:
            return make_learned_pool(pool, self.in_channels, self.layout, pool_params)
        return make_pool(pool, self.in_channels, layout=self.layout, **pool_params)

    @property
    def pooled_width(self) -> int:
        """Width of the pool's output (``2 * in_channels`` for ``catavgmax``)."""
        return self.pool.output_width(self.in_channels)

    @property
    def feature_width(self) -> int:
        """Width of the descriptor before whitening: ``dim`` when set, else
        :attr:`pooled_width`."""
        return self.projection.out_features if self.projection is not None else self.pooled_width

    @property
    def embedding_width(self) -> int:
        """Width of the output: the whitening's kept directions once fitted, else
        :attr:`feature_width`."""
        if self.whitening is not None and self.whitening.fitted:
            return self.whitening.out_features
        return self.feature_width

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The wider of x's dtype and the head's (its parameters', or its buffer's when it has
        none): the projection, BN-neck and whitening take the pooled features in it."""
        like = next((t for t in self.parameters() if t.is_floating_point()), self._like)
        return torch.promote_types(x.dtype, like.dtype)

    def _features(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Pooled and projected, in :meth:`_compute_dtype`: the BN-neck's input."""
        check_input(x)
        check_channel_count(x, self.layout, self.in_channels, "EmbeddingHead")
        features = self.pool(x, mask=mask).to(self._compute_dtype(x))
        return self.projection(features) if self.projection is not None else features

    def descriptors(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The descriptors the whitening takes, ``(N, feature_width)``: pooled, projected,
        through the BN-neck and L2-normalised (when ``normalize``), not whitened. Fit the
        whitening on these (in eval mode, so a BN-neck uses its running statistics).

        >>> import torch, globalpool as gp
        >>> head = gp.EmbeddingHead(8, "avg", dim=4).eval()
        >>> head.descriptors(torch.randn(3, 8, 5)).shape
        torch.Size([3, 4])
        """
        return self._descriptors(x, mask).to(x.dtype)

    def _descriptors(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """:meth:`descriptors` in :meth:`_compute_dtype`."""
        features = self._features(x, mask)
        if self.bnneck is not None:
            features = self.bnneck(features)
        return F.normalize(features, dim=1) if self.normalize else features

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor | BNNeckOutput:
        """The embedding ``(N, embedding_width)``; a :class:`BNNeckOutput` in training mode
        with a BN-neck."""
        if self.bnneck is not None and self.training:
            features = self._features(x, mask)
            return BNNeckOutput(features.to(x.dtype), self.bnneck(features).to(x.dtype))
        descriptors = self._descriptors(x, mask)
        if self.whitening is not None:
            descriptors = self.whitening(descriptors)
        return descriptors.to(x.dtype)

    @torch.no_grad()
    def fit_whitening(
        self,
        features: torch.Tensor,
        dim: int | None = None,
        *,
        shrinkage: float | str = 0.0,
        eps: float = 1e-9,
    ) -> EmbeddingHead:
        """Fit the head's whitening to ``features`` (what :meth:`descriptors` returns for a
        training set: ``(N, feature_width)``), replacing any fitted before; see
        :func:`~globalpool.fit_whitening` for ``dim``, ``shrinkage`` and ``eps``. The whitened
        output is L2-normalised when ``normalize``. The whitening takes the head's device and
        dtype; nothing changes when an argument is refused.

        Returns:
            The head.

        >>> import torch, globalpool as gp
        >>> head = gp.EmbeddingHead(8, "avg").eval()
        >>> head.fit_whitening(torch.randn(40, 8), dim=3).embedding_width
        3
        >>> head.fit_whitening(torch.randn(40, 5))
        Traceback (most recent call last):
        ...
        ValueError: features must have shape (N, 8) (the head's feature_width), got (40, 5)
        """
        if isinstance(features, torch.Tensor) and features.ndim == 2 and (
            features.shape[1] != self.feature_width
        ):
            raise ValueError(
                f"features must have shape (N, {self.feature_width}) (the head's "
                f"feature_width), got {tuple(features.shape)}"
            )
        white = fit_whitening(features, dim, shrinkage=shrinkage, eps=eps, normalize=self.normalize)
        like = next((t for t in self.parameters() if t.is_floating_point()), self._like)
        self.whitening = white.to(device=like.device, dtype=like.dtype)
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        saved = any(k.startswith(prefix + "whitening.") for k in state_dict)
        if strict and saved and self.whitening is None:
            errors.append(
                "the state dict holds a fitted whitening: build the head with whitening=True "
                "to load it"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, layout={self.layout!r}, normalize={self.normalize}"

