"""``AttentionPooling1D/2D/3D``: a weighted average whose weights a learned scorer gives."""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from globalpool.keras._base import Pooling


class _AttentionPooling(Pooling):
    def build(self, input_shape: Any) -> None:
        super().build(input_shape)
        channels = input_shape[self._channel_axis]
        if channels is None:
            raise ValueError(
                f"{type(self).__name__} needs a known channel count (axis {self._channel_axis} "
                f"for data_format={self.data_format!r}), got input shape {tuple(input_shape)}"
            )
        bound = 1.0 / math.sqrt(channels)  # torch.nn.Linear's default initialisation
        init = keras.initializers.RandomUniform(-bound, bound)
        self.kernel = self.add_weight(
            name="kernel", shape=(channels, 1), initializer=init, autocast=False
        )
        self.bias = self.add_weight(name="bias", shape=(1,), initializer=init, autocast=False)

    def scores(self, inputs: Any, mask: Any = None) -> Any:
        """The non-negative weights ``sigmoid(x_s . kernel + bias)`` of shape ``(N, *S)``;
        padded positions are scored as zeros, so what they hold never reaches the scorer."""
        x = ops.convert_to_tensor(inputs)
        self._check_shape(x.shape)
        if not self.built:
            self.build(tuple(x.shape))
        return self._scores(x, self._mask(x, mask))

    def _scores(self, x: Any, mask: Any) -> Any:
        if mask is not None:  # select, not multiply: 0 * NaN is NaN
            x = ops.where(ops.expand_dims(mask, self._channel_axis), x, 0.0)
        if self._channel_axis != len(x.shape) - 1:
            x = ops.moveaxis(x, self._channel_axis, -1)
        x = ops.cast(x, self.kernel.dtype)
        return ops.sigmoid(ops.squeeze(ops.matmul(x, self.kernel), -1) + self.bias[0])

    def call(self, inputs: Any, mask: Any = None) -> Any:
        self._check_shape(inputs.shape)
        checked = self._mask(inputs, mask)
        return self._pool(inputs, "attention", checked, {"weights": self._scores(inputs, checked)})


@keras.saving.register_keras_serializable(package="globalpool")
class AttentionPooling1D(_AttentionPooling):
    """Attention pooling of ``(N, S, C)`` sequences: ``sum_s w_s x_s / sum_s w_s`` with
    ``w_s = sigmoid(x_s . kernel + bias)`` learned (``globalpool.AttentionPool``'s scorer).

    Masks are honoured as by :class:`GlobalPooling1D`: padded positions are scored as zeros and
    left out of the average, so NaN there reaches neither the output nor any gradient.

    >>> import numpy as np
    >>> layer = AttentionPooling1D()
    >>> x = np.random.rand(2, 6, 4).astype("float32")
    >>> tuple(layer(x).shape), tuple(layer.scores(x).shape)
    ((2, 4), (2, 6))
    """

    rank = 1


@keras.saving.register_keras_serializable(package="globalpool")
class AttentionPooling2D(_AttentionPooling):
    """Attention pooling of ``(N, H, W, C)`` images (``(N, C, H, W)`` with ``"channels_first"``).

    >>> import numpy as np
    >>> tuple(AttentionPooling2D()(np.random.rand(2, 5, 5, 8).astype("float32")).shape)
    (2, 8)
    """

    rank = 2


@keras.saving.register_keras_serializable(package="globalpool")
class AttentionPooling3D(_AttentionPooling):
    """Attention pooling of ``(N, D, H, W, C)`` volumes.

    >>> import numpy as np
    >>> tuple(AttentionPooling3D()(np.random.rand(1, 2, 3, 3, 4).astype("float32")).shape)
    (1, 4)
    """

    rank = 3
