"""``GlobalPooling1D/2D/3D``: one globalpool kind with fixed parameters, as a Keras layer."""

from __future__ import annotations

from typing import Any

import keras

from globalpool import registry
from globalpool.keras._base import LAYER_KWARGS, Pooling
from globalpool.keras._checks import check_kind, check_params


class _GlobalPooling(Pooling):
    def __init__(
        self,
        kind: str = "avg",
        data_format: str | None = None,
        keepdims: bool = False,
        **kwargs: Any,
    ) -> None:
        check_kind(kind)
        params = {k: v for k, v in kwargs.items() if k not in LAYER_KWARGS}
        self.params = check_params(kind, params)
        super().__init__(
            data_format, keepdims, **{k: v for k, v in kwargs.items() if k in LAYER_KWARGS}
        )
        self.kind = kind
        self.width = registry.spec(kind).width

    def call(self, inputs: Any, mask: Any = None) -> Any:
        return self._pool(inputs, self.kind, mask, self.params)

    def get_config(self) -> dict:
        return {**super().get_config(), "kind": self.kind, **self.params}


@keras.saving.register_keras_serializable(package="globalpool")
class GlobalPooling1D(_GlobalPooling):
    """Global pooling of ``(N, S, C)`` sequences (``(N, C, S)`` with ``"channels_first"``).

    ``kind`` is one of ``avg``, ``max``, ``avgmax``, ``catavgmax`` (width ``2C``: avg block, then
    max block), ``gem`` (``p``, ``eps``) or ``lse`` (``r``); the same numbers as
    ``globalpool.pool``. A mask from upstream (``Embedding(mask_zero=True)``) or given as
    ``layer(x, mask=m)`` with shape ``(N, S)``, True at real positions, is honoured: padded
    positions never reach the output or the gradient, an all-padded sample gives 0.

    >>> import keras, numpy as np
    >>> x = np.array([[[1.0], [3.0], [np.nan]]], dtype="float32")
    >>> mask = np.array([[True, True, False]])
    >>> keras.ops.convert_to_numpy(GlobalPooling1D("avg")(x, mask=mask)).tolist()
    [[2.0]]
    """

    rank = 1


@keras.saving.register_keras_serializable(package="globalpool")
class GlobalPooling2D(_GlobalPooling):
    """Global pooling of ``(N, H, W, C)`` images (``(N, C, H, W)`` with ``"channels_first"``).

    ``data_format`` defaults to ``keras.config.image_data_format()``; ``keepdims=True`` keeps the
    singleton spatial dims; masks are ``(N, H, W)``. Kinds as in :class:`GlobalPooling1D`.

    >>> import numpy as np
    >>> x = np.ones((2, 7, 7, 16), dtype="float32")
    >>> tuple(GlobalPooling2D("catavgmax")(x).shape)
    (2, 32)
    >>> GlobalPooling2D("gem", p=2.0).compute_output_shape((None, 7, 7, 16))
    (None, 16)
    """

    rank = 2


@keras.saving.register_keras_serializable(package="globalpool")
class GlobalPooling3D(_GlobalPooling):
    """Global pooling of ``(N, D, H, W, C)`` volumes; masks are ``(N, D, H, W)``.

    >>> import numpy as np
    >>> layer = GlobalPooling3D("lse", r=2.0, keepdims=True)
    >>> tuple(layer(np.zeros((1, 2, 2, 2, 3), "float32")).shape)
    (1, 1, 1, 1, 3)
    """

    rank = 3
