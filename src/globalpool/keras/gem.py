"""``GeMPooling1D/2D/3D``: generalised-mean pooling with a learned exponent ``p >= 1``."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from globalpool.keras._base import Pooling
from globalpool.keras._checks import check_bool, check_number, softplus_inverse


class _GeMPooling(Pooling):
    def __init__(
        self,
        p: float = 3.0,
        trainable: bool = True,
        eps: float = 1e-6,
        data_format: str | None = None,
        keepdims: bool = False,
        **kwargs: Any,
    ) -> None:
        p = check_number("gem", "p", p)
        check_bool(trainable, "trainable")
        if trainable and p == 1.0:
            raise ValueError(
                "p must be > 1 for a trainable GeM pooling (p = 1 + softplus(raw)), got 1.0; "
                "pass trainable=False for a fixed p = 1"
            )
        self.initial_p, self.eps = p, check_number("gem", "eps", eps)
        super().__init__(data_format, keepdims, trainable=trainable, **kwargs)

    def build(self, input_shape: Any) -> None:
        super().build(input_shape)
        raw = softplus_inverse(self.initial_p - 1.0) if self.initial_p > 1.0 else -30.0
        self.raw_p = self.add_weight(
            name="raw_p",
            shape=(),
            initializer=keras.initializers.Constant(raw),
            trainable=True,
            autocast=False,  # p stays in the variable's dtype under mixed precision
        )

    @property
    def p(self) -> Any:
        """The exponent ``1 + softplus(raw_p)`` (a 0-dim tensor; >= 1 by construction)."""
        return 1.0 + ops.softplus(self.raw_p)

    def call(self, inputs: Any, mask: Any = None) -> Any:
        return self._pool(inputs, "gem", mask, {"p": self.p, "eps": self.eps})

    def get_config(self) -> dict:
        return {**super().get_config(), "p": self.initial_p, "eps": self.eps}


@keras.saving.register_keras_serializable(package="globalpool")
class GeMPooling1D(_GeMPooling):
    """GeM pooling of ``(N, S, C)`` sequences with a learned ``p = 1 + softplus(raw_p)``.

    ``trainable=False`` keeps ``p`` fixed; ``p`` is always >= 1, so training cannot leave the
    range where GeM lies between the average (``p = 1``) and the maximum (``p`` large). Masks are
    honoured as by :class:`GlobalPooling1D`.

    >>> import keras, numpy as np
    >>> layer = GeMPooling1D(p=3.0)
    >>> y = keras.ops.convert_to_numpy(layer(np.full((2, 5, 4), 2.0, dtype="float32")))
    >>> round(float(keras.ops.convert_to_numpy(layer.p)), 4), round(float(y[0, 0]), 4)
    (3.0, 2.0)
    """

    rank = 1


@keras.saving.register_keras_serializable(package="globalpool")
class GeMPooling2D(_GeMPooling):
    """GeM pooling of ``(N, H, W, C)`` images (``(N, C, H, W)`` with ``"channels_first"``).

    >>> import numpy as np
    >>> layer = GeMPooling2D(p=2.0, trainable=False)
    >>> layer(np.ones((1, 7, 7, 8), dtype="float32")).shape[-1], layer.trainable_weights
    (8, [])
    """

    rank = 2


@keras.saving.register_keras_serializable(package="globalpool")
class GeMPooling3D(_GeMPooling):
    """GeM pooling of ``(N, D, H, W, C)`` volumes.

    >>> import numpy as np
    >>> tuple(GeMPooling3D(keepdims=True)(np.ones((1, 2, 2, 2, 3), dtype="float32")).shape)[1:4]
    (1, 1, 1)
    """

    rank = 3
