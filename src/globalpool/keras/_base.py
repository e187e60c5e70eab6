"""What every globalpool Keras layer shares: data_format, keepdims, the rank and mask checks, the
consumed mask, and the fast path to :func:`globalpool.pool` on the torch backend."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from globalpool.keras import _ops
from globalpool.keras._checks import (
    channel_axis,
    check_bool,
    check_data_format,
    check_mask_shape,
    check_rank,
    output_shape,
    spatial_axes,
)

# keyword arguments that belong to keras.layers.Layer, not to a pooling kind
LAYER_KWARGS = frozenset(
    (
        "name",
        "dtype",
        "trainable",
        "autocast",
        "input_shape",
        "input_dim",
        "batch_input_shape",
        "batch_size",
        "activity_regularizer",
    )
)


def torch_pool(x: Any, kind: str, data_format: str, keepdims: bool, mask: Any, params: dict):
    """``globalpool.pool`` (fused kernels where they pay) when Keras runs on torch and ``x`` is a
    real torch tensor; None otherwise (another backend, or Keras' symbolic meta tensors)."""
    if keras.backend.backend() != "torch":
        return None
    import torch  # only here: the torch backend has imported it already

    if not isinstance(x, torch.Tensor) or x.device.type == "meta":
        return None
    from globalpool.functional import pool

    return pool(x, kind, layout=data_format, keepdim=keepdims, mask=mask, **params)


class Pooling(keras.layers.Layer):
    """Base of the layers: ``rank`` spatial dims, reduced over all of them."""

    rank: int = 2
    width: int = 1  # output channels per input channel

    def __init__(self, data_format: str | None = None, keepdims: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        if data_format is None:
            data_format = keras.config.image_data_format()
        check_data_format(data_format)
        check_bool(keepdims, "keepdims")
        self.data_format, self.keepdims = data_format, keepdims
        self.supports_masking = True

    @property
    def _axes(self) -> tuple[int, ...]:
        return spatial_axes(self.rank, self.data_format)

    @property
    def _channel_axis(self) -> int:
        return channel_axis(self.rank, self.data_format)

    def _check_shape(self, shape: Any) -> None:
        check_rank(tuple(shape), self.rank, self.data_format, type(self).__name__)

    def build(self, input_shape: Any) -> None:
        self._check_shape(input_shape)

    def _mask(self, x: Any, mask: Any) -> Any:
        """The mask as a bool tensor after checking its shape is ``(N, *S)``; None stays None."""
        if mask is None:
            return None
        mask = ops.convert_to_tensor(mask)
        check_mask_shape(tuple(mask.shape), tuple(x.shape), self.rank, self.data_format)
        return ops.cast(mask, "bool")

    def _pool(self, x: Any, kind: str, mask: Any, params: dict) -> Any:
        self._check_shape(x.shape)
        mask = self._mask(x, mask)
        y = torch_pool(x, kind, self.data_format, self.keepdims, mask, params)
        if y is not None:
            return y
        return _ops.pool(
            x,
            kind,
            axes=self._axes,
            channel_axis=self._channel_axis,
            keepdims=self.keepdims,
            mask=mask,
            **params,
        )

    def compute_output_shape(self, input_shape: Any) -> tuple:
        self._check_shape(input_shape)
        return output_shape(
            tuple(input_shape), self.rank, self.data_format, self.keepdims, self.width
        )

    def compute_mask(self, inputs: Any, mask: Any = None) -> None:
        return None  # the pool consumes the mask: there are no positions left to mask

    def get_config(self) -> dict:
        return {**super().get_config(), "data_format": self.data_format, "keepdims": self.keepdims}
