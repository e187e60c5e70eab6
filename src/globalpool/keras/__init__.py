"""Keras 3 layers for globalpool's kinds, written in ``keras.ops`` only: globalpool's numbers and
mask rules on any Keras backend (tested on PyTorch and JAX, and TensorFlow where installed). On
the torch backend they call :func:`globalpool.pool` itself, so its fused kernels are used.

Install the ``keras`` extra (``pip install ".[keras]"``); the core package never imports Keras.

>>> import numpy as np
>>> from globalpool.keras import GlobalPooling2D
>>> tuple(GlobalPooling2D("catavgmax")(np.ones((2, 7, 7, 16), dtype="float32")).shape)
(2, 32)
"""

try:
    import keras  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without keras
    raise ImportError(
        "globalpool.keras needs Keras 3: pip install keras (the 'keras' extra of globalpool)"
    ) from exc

from globalpool.keras._checks import KINDS
from globalpool.keras.attention import AttentionPooling1D, AttentionPooling2D, AttentionPooling3D
from globalpool.keras.gem import GeMPooling1D, GeMPooling2D, GeMPooling3D
from globalpool.keras.pooling import GlobalPooling1D, GlobalPooling2D, GlobalPooling3D

__all__ = [
    "KINDS",
    "AttentionPooling1D",
    "AttentionPooling2D",
    "AttentionPooling3D",
    "GeMPooling1D",
    "GeMPooling2D",
    "GeMPooling3D",
    "GlobalPooling1D",
    "GlobalPooling2D",
    "GlobalPooling3D",
]
