"""PCA whitening fitted from descriptors, as image retrieval applies it after the pooling.

:func:`fit_whitening` centres a set of descriptors, eigendecomposes their covariance in float64,
and returns a :class:`Whitening` module that maps a descriptor ``x`` to
``P (x - mean)`` (then L2-normalises it): the whitened training descriptors have the identity
covariance. The fitted ``mean`` and ``projection`` are buffers, so they are saved in the
state dict and exported with the model.

>>> import torch, globalpool as gp
>>> features = torch.randn(500, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
>>> white = gp.fit_whitening(features, dim=8, normalize=False)
>>> y = white(features)
>>> y.shape, torch.allclose(torch.cov(y.T), torch.eye(8, dtype=torch.float64), atol=1e-6)
(torch.Size([500, 8]), True)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: ``shrinkage="auto"``: the Ledoit-Wolf estimate of the shrinkage intensity.
AUTO = "auto"


def _check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")


def _check_features(features: Any, name: str = "features") -> None:
    """``features`` must be a finite floating ``(N, D)`` tensor."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (N, D) (one descriptor per row), got "
            f"{type(features).__name__}"
        )
    if not features.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {features.dtype}")
    if features.ndim != 2:
        raise ValueError(
            f"{name} must have shape (N, D) (one descriptor per row), got shape "
            f"{tuple(features.shape)}"
        )
    bad = ~torch.isfinite(features)
    if bool(bad.any()):
        rows = bad.any(dim=1).nonzero().flatten()
        raise ValueError(
            f"{name} must be finite, got {int(bad.sum())} NaN or infinite value(s) in "
            f"{rows.numel()} row(s) (first: row {int(rows[0])}); drop or fix those descriptors"
        )


def _check_dim(dim: Any, width: int, name: str = "dim") -> int:
    """``dim`` (None: every direction) as an int in ``[1, width]``."""
    if dim is None:
        return width
    if not isinstance(dim, numbers.Integral) or isinstance(dim, bool):
        raise TypeError(f"{name} must be a positive int or None, got {dim!r}")
    if not 1 <= dim <= width:
        raise ValueError(
            f"{name} must be between 1 and the descriptor width {width} (whitening can only "
            f"keep or drop directions), got {dim!r}"
        )
    return int(dim)


def _check_shrinkage(shrinkage: Any) -> float | str:
    if shrinkage == AUTO and isinstance(shrinkage, str):
        return AUTO
    if not isinstance(shrinkage, numbers.Real) or isinstance(shrinkage, bool):
        raise TypeError(
            f"shrinkage must be a real number in [0, 1] or 'auto' (Ledoit-Wolf), got "
            f"{shrinkage!r}"
        )
    if not 0 <= shrinkage <= 1:  # False for NaN too
        raise ValueError(
            f"shrinkage must be a real number in [0, 1] or 'auto' (Ledoit-Wolf), got "
            f"{shrinkage!r}"
        )
    return float(shrinkage)


def _check_eps(eps: Any) -> float:
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        raise TypeError(f"eps must be a real number >= 0, got {eps!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite real number >= 0, got {eps!r}")
    return float(eps)


def ledoit_wolf_shrinkage(centred: torch.Tensor) -> float:
    """The Ledoit-Wolf shrinkage intensity for the covariance of ``centred`` ``(N, D)`` rows
    (already centred), towards ``trace / D`` times the identity: a number in ``[0, 1]``.

    With ``S = X^T X / N`` and ``mu = tr(S) / D``, the intensity is
    ``min(1, b / d)`` where ``d = ||S - mu I||^2 / D`` and
    ``b = sum_k ||x_k x_k^T - S||^2 / (N^2 D)`` (Frobenius norms).

    >>> import torch
    >>> round(ledoit_wolf_shrinkage(torch.eye(3, dtype=torch.float64) - 1 / 3), 6)
    1.0
    """
    x = centred.to(torch.float64)
    n, d = x.shape
    cov = x.T @ x / n
    mu = torch.trace(cov) / d
    distance = ((cov - mu * torch.eye(d, dtype=x.dtype, device=x.device)) ** 2).sum() / d
    if float(distance) == 0.0:  # already a multiple of the identity: nothing to shrink
        return 0.0
    # sum_k ||x_k x_k^T - S||^2 = sum_k ||x_k||^4 - N ||S||^2
    spread = ((x * x).sum(dim=1) ** 2).sum() - n * (cov**2).sum()
    return float((spread / (n * n * d) / distance).clamp(0.0, 1.0))


class Whitening(nn.Module):
    """A fitted whitening: ``y = projection @ (x - mean)``, then L2 normalisation when
    ``normalize`` (as the retrieval literature does after whitening).

    Build one with :func:`fit_whitening`. ``Whitening(in_features)`` alone is an unfitted
    placeholder: it refuses to run, and takes the fitted buffers (of any kept width) from a
    state dict, so a saved whitening loads into a freshly built model.

    Args:
        in_features: descriptor width ``D``.
        normalize: L2-normalise the whitened descriptor.

    Shape:
        ``x``: ``(N, D)``; output ``(N, out_features)`` in x's dtype, computed in float32
        (float64 where x or the fitted buffers are float64).

    >>> import torch, globalpool as gp
    >>> white = gp.fit_whitening(torch.randn(100, 8), dim=4)
    >>> saved = white.state_dict()
    >>> fresh = gp.Whitening(8)
    >>> _ = fresh.load_state_dict(saved)
    >>> fresh.out_features, fresh(torch.randn(3, 8)).norm(dim=1).allclose(torch.ones(3))
    (4, True)
    """

    def __init__(self, in_features: int, *, normalize: bool = True) -> None:
        super().__init__()
        if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        _check_bool(normalize, "normalize")
        self.in_features, self.normalize = in_features, normalize
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("projection", torch.zeros(0, in_features))  # 0 rows: not fitted

    @property
    def fitted(self) -> bool:
        """Whether the whitening holds fitted buffers (from :func:`fit_whitening` or a state
        dict)."""
        return self.projection.shape[0] > 0

    @property
    def out_features(self) -> int | None:
        """Width of the whitened descriptor (None before fitting)."""
        return self.projection.shape[0] if self.fitted else None

    def set_fitted(self, mean: torch.Tensor, projection: torch.Tensor) -> None:
        """Store a fitted ``mean`` ``(D,)`` and ``projection`` ``(k, D)`` (in their dtype and on
        their device)."""
        if mean.shape != (self.in_features,) or projection.ndim != 2 or not (
            1 <= projection.shape[0] <= self.in_features
            and projection.shape[1] == self.in_features
        ):
            raise ValueError(
                f"Whitening({self.in_features}) takes a mean of shape ({self.in_features},) and "
                f"a projection of shape (k, {self.in_features}) with 1 <= k <= "
                f"{self.in_features}, got {tuple(mean.shape)} and {tuple(projection.shape)}"
            )
        self.mean = mean.detach().clone()
        self.projection = projection.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError(
                "the whitening is not fitted: fit it from descriptors with "
                "gp.fit_whitening(features) (or head.fit_whitening(features)), or load a "
                "state dict that holds a fitted one"
            )
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.in_features:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"Whitening(in_features={self.in_features}) takes x of shape (N, "
                f"{self.in_features}), got {got}"
            )
        # float32 at least (float64 where x or the buffers are): a float16 or bfloat16 product
        # would lose the small directions whitening scales up
        dtype = torch.promote_types(torch.promote_types(x.dtype, self.projection.dtype),
                                    torch.float32)
        y = (x.to(dtype) - self.mean.to(dtype)) @ self.projection.to(dtype).T
        if self.normalize:
            y = F.normalize(y, dim=1)
        return y.to(x.dtype)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        """Take the fitted buffers at their saved width (the kept dimensions ``k`` are known
        only once fitted): resize ``projection`` to the saved ``(k, D)`` before loading."""
        saved = state_dict.get(prefix + "projection")
        if isinstance(saved, torch.Tensor) and saved.shape != self.projection.shape:
            if saved.ndim == 2 and saved.shape[1] == self.in_features:
                self.projection = torch.empty(
                    saved.shape, dtype=self.projection.dtype, device=self.projection.device
                )
            else:
                errors.append(
                    f"{prefix}projection: Whitening(in_features={self.in_features}) takes a "
                    f"projection of shape (k, {self.in_features}), got {tuple(saved.shape)}"
                )
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"normalize={self.normalize}"
        )


def whitening_matrix(
    features: torch.Tensor, dim: int, shrinkage: float | str, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, projection)`` in float64 for checked arguments (see :func:`fit_whitening`)."""
    x = features.detach().to(torch.float64)
    n, width = x.shape
    mean = x.mean(dim=0)
    centred = x - mean
    cov = centred.T @ centred / (n - 1)
    cov = (cov + cov.T) / 2
    rho = ledoit_wolf_shrinkage(centred) if shrinkage == AUTO else shrinkage
    if rho > 0:
        target = torch.trace(cov) / width
        cov = (1 - rho) * cov + rho * target * torch.eye(width, dtype=cov.dtype, device=cov.device)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values, vectors = values.flip(0)[:dim], vectors.flip(1)[:, :dim]
    largest = float(values[0]) if width else 0.0
    # below this an eigenvalue is rounding noise: its direction is not in the data (a rank
    # deficiency) and whitening would blow that noise up
    # (the rounding of the features' own dtype, float32 at least, and of the decomposition)
    rounding = torch.finfo(torch.promote_types(features.dtype, torch.float32)).eps
    noise = largest * max((width * rounding) ** 2, width * torch.finfo(torch.float64).eps)
    if largest <= 0:
        raise ValueError(
            f"features are {n} copies of one descriptor (their covariance is 0): there is no "
            "direction to whiten, whatever dim or shrinkage; fit on varied descriptors"
        )
    if float(values[-1]) <= noise:
        rank = int((values > noise).sum())
        regularise = (
            "shrinkage > 0 (or 'auto')" if rho == 0 else f"a shrinkage larger than {rho:g}"
        )
        raise ValueError(
            f"features span only {rank} direction(s) of their {width} (the covariance is "
            f"singular), so whitening to dim={dim} would scale noise up; pass dim <= {rank}, "
            f"or {regularise} to regularise the covariance"
        )
    scale = (values + eps * largest).rsqrt()
    return mean, scale[:, None] * vectors.T


def fit_whitening(
    features: torch.Tensor,
    dim: int | None = None,
    *,
    shrinkage: float | str = 0.0,
    eps: float = 1e-9,
    normalize: bool = True,
) -> Whitening:
    """Fit a PCA whitening to ``features``: centre them, eigendecompose their covariance in
    float64, keep the ``dim`` largest directions and scale each by ``1 / sqrt(eigenvalue +
    eps * largest eigenvalue)``.

    Whitened with it (``normalize=False``), ``features`` have zero mean and the identity
    covariance (``torch.cov``'s, with ``N - 1``) over the kept directions.

    Args:
        features: ``(N, D)`` descriptors, one per row (finite; any floating dtype, computed
            in float64). In retrieval, the L2-normalised pooled descriptors of a training set.
        dim: how many directions to keep (PCA dimensionality reduction), ``1 <= dim <= D``;
            None keeps all ``D``.
        shrinkage: shrink the covariance towards ``trace / D`` times the identity,
            ``(1 - s) cov + s (trace / D) I``: a number in ``[0, 1]``, or ``"auto"`` for the
            Ledoit-Wolf estimate. Without shrinkage, ``dim`` directions need more than ``dim``
            samples (``N - 1 >= dim``), and features that span fewer directions than ``dim``
            are refused (the error says how many they span); shrinkage makes every direction
            usable.
        eps: regularisation added to every eigenvalue, relative to the largest one.
        normalize: the returned :class:`Whitening` L2-normalises its output.

    Returns:
        A :class:`Whitening` with ``mean`` ``(D,)`` and ``projection`` ``(dim, D)`` buffers in
        the dtype and on the device of ``features``.

    >>> import torch, globalpool as gp
    >>> features = torch.randn(50, 8)
    >>> gp.fit_whitening(features, dim=4)
    Whitening(in_features=8, out_features=4, normalize=True)
    >>> gp.fit_whitening(features[:4], dim=4)
    Traceback (most recent call last):
    ...
    ValueError: features has 4 samples: whitening to dim=4 directions needs at least 5 ...
    """
    _check_features(features)
    n, width = features.shape
    dim = _check_dim(dim, width)
    shrinkage = _check_shrinkage(shrinkage)
    eps = _check_eps(eps)
    _check_bool(normalize, "normalize")
    if n < 2:
        raise ValueError(f"features has {n} sample(s): fitting a whitening needs at least 2")
    if shrinkage == 0 and n - 1 < dim:
        raise ValueError(
            f"features has {n} samples: whitening to dim={dim} directions needs at least "
            f"{dim + 1} (centring takes one), or shrinkage > 0 (or 'auto') to regularise the "
            f"covariance, or a smaller dim"
        )
    mean, projection = whitening_matrix(features, dim, shrinkage, eps)
    white = Whitening(width, normalize=normalize)
    white.set_fitted(mean.to(features.dtype), projection.to(features.dtype))
    return white.to(features.device)
