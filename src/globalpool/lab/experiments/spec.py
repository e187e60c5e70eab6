"""What one run is: dataset, model, head, seed, training-set size and the training settings.

>>> cfg = TrainConfig(epochs=2, batch_size=100, lr=0.01)
>>> spec = RunSpec("mnist1d", "cnn1d", "avg", 0, None, cfg)
>>> spec.label, len(spec.fingerprint)
('mnist1d/cnn1d/avg/seed0/nfull', 10)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

from globalpool.lab.experiments.provenance import RunEnv

OPTIMIZERS = ("adam", "sgd")
BACKENDS = ("torch", "auto", "fused")
AUGMENTATIONS = ("none", "crop-flip")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings shared by every run of one ``compare`` call.

    ``backend`` is the pooling backend of the heads (see :func:`globalpool.pool`): ``"torch"``
    by default, so every head is trained as the same plain PyTorch composition and no run pays
    numba's first-call compilation (tens of seconds per kernel variant in a fresh process); the
    fused kernels' speed is measured by ``globalpool bench``.

    ``augment="crop-flip"`` pads each training image by 4 pixels, crops it back at a random
    offset and flips it left-right with probability 1/2 (the usual CIFAR recipe); ``"none"``
    leaves the data alone, as digits-shifted must (moving digits would defeat its purpose).

    ``epochs`` counts passes over the *full* training set: a run on a smaller ``train_size``
    takes the same number of optimiser steps (``epochs * ceil(full_size / batch_size)``), so
    points of a training-set-size sweep differ in data, not in compute.

    ``monitor=True`` (``compare --monitor``) records :func:`globalpool.monitor` statistics of
    the head's pooling modules at the end of every epoch
    (:mod:`globalpool.lab.experiments.monitoring`); it does not change the training, but like every
    setting off its default it is part of the cache key, so monitored runs are kept apart from
    plain ones (whose records have no ``monitor`` entry).

    ``precision="bf16"`` runs the backbone under bfloat16 autocast (about twice as fast on
    CPUs with AVX-512 BF16, and on recent GPUs); the head always runs in float32, so the
    pooling heads are compared at full precision. ``channels_last=True`` stores images and
    convolution weights channels-last, the layout oneDNN and cuDNN convolve fastest.

    ``warmup`` is a linear learning-rate warm-up over that many optimiser steps (the factor
    ``(step + 1) / warmup`` times the schedule's, see
    :func:`~globalpool.lab.experiments.runner.lr_factor`); 0 (the default) is none.
    ``compare --tune lr,warmup`` and the ``cifar-gpu`` recipe set it. With
    ``schedule="linear"`` (a linear decay to 0) it makes a triangular schedule.

    ``label_smoothing`` is the cross-entropy's (:func:`torch.nn.functional.cross_entropy`);
    ``crop_padding`` is crop-flip's zero padding, the largest shift in pixels (4, the usual
    CIFAR recipe, by default); ``flip_tta=True`` classifies every evaluation image as the mean
    of the logits of the image and its left-right mirror image (test-time augmentation, on
    every test set alike).
    """

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "cosine"
    momentum: float = 0.9
    backend: str = "torch"
    augment: str = "none"
    monitor: bool = False
    precision: str = "fp32"
    channels_last: bool = False
    warmup: int = 0
    label_smoothing: float = 0.0
    crop_padding: int = 4
    flip_tta: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):  # nan, 0, -1 and inf refused
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if not isinstance(self.monitor, bool):
            raise TypeError(f"monitor must be a bool (True or False), got {self.monitor!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.channels_last, bool):
            raise TypeError(f"channels_last must be a bool, got {self.channels_last!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {self.warmup!r}")
        smoothing = self.label_smoothing
        if not isinstance(smoothing, (int, float)) or isinstance(smoothing, bool) or not (
            0.0 <= smoothing < 1.0
        ):
            raise ValueError(
                f"label_smoothing must be a number in [0, 1), got {self.label_smoothing!r}"
            )
        if (
            isinstance(self.crop_padding, bool)
            or not isinstance(self.crop_padding, int)
            or self.crop_padding < 0
        ):
            raise ValueError(f"crop_padding must be a non-negative int, got {self.crop_padding!r}")
        if not isinstance(self.flip_tta, bool):
            raise TypeError(f"flip_tta must be a bool (True or False), got {self.flip_tta!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


_CORE = ("epochs", "batch_size", "lr")  # always hashed


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One (dataset, model, head, seed, train_size) training run under ``config``.

    ``env`` (threads, processes, device, versions, dataset digest) says how the run is made;
    ``compare`` always sets it, so it is part of the cache key (:attr:`fingerprint`).
    """

    dataset: str
    model: str
    head: str
    seed: int
    train_size: int | None
    config: TrainConfig
    env: RunEnv | None = None

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``mnist1d/cnn1d/avg/seed0/nfull``."""
        size = "full" if self.train_size is None else str(self.train_size)
        return f"{self.dataset}/{self.model}/{self.head}/seed{self.seed}/n{size}"

    @property
    def fingerprint(self) -> str:
        """Hash of the model, training settings and :attr:`env`: runs that could differ never
        collide.

        Settings left at their field default are not hashed, so adding a new setting (with a
        default that keeps the old behaviour) does not orphan results already stored.
        """
        config = {
            f.name: getattr(self.config, f.name)
            for f in dataclasses.fields(self.config)
            if f.name in _CORE or getattr(self.config, f.name) != f.default
        }
        payload: dict[str, Any] = {"model": self.model, "config": config}
        if self.env is not None:
            payload["env"] = dataclasses.asdict(self.env)
        text = json.dumps(payload, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the config nested)."""
        return dataclasses.asdict(self)


#: Per-dataset defaults: model and training settings (``folder:PATH`` uses ``"folder"``).
DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist1d": {
        "model": "cnn1d",
        # The paper's CNN recipe is Adam, batch 100, lr 0.01 for 6000 steps; to fit 27 runs in
        # 3 minutes on 2 cores we take 2400 steps with a cosine decay from lr 0.02 instead.
        "config": TrainConfig(epochs=60, batch_size=100, lr=2e-2, optimizer="adam"),
    },
    "digits-shifted": {
        "model": "cnn2d",
        "config": TrainConfig(epochs=15, batch_size=64, lr=2e-3, optimizer="adam"),
    },
    "cifar10": {
        "model": "resnet18",
        "config": TrainConfig(
            epochs=30,
            batch_size=128,
            lr=0.1,
            weight_decay=5e-4,
            optimizer="sgd",
            augment="crop-flip",
        ),
    },
    "folder": {
        "model": "cnn2d",
        "config": TrainConfig(epochs=20, batch_size=32, lr=1e-3, optimizer="adam"),
    },
}


#: Named recipes (``compare --recipe NAME``): a model and training settings that replace the
#: dataset's defaults; ``--model``, ``--epochs``, ``--batch-size`` and ``--lr`` still override.
RECIPES: dict[str, dict[str, Any]] = {
    # CIFAR-10-sized images (32x32 RGB) on a CPU: ResNet-18 at a quarter of its width (0.70M
    # backbone parameters) for 8 epochs in bfloat16: 8-10 minutes per run on one thread of a
    # 2-core AVX-512 (Zen 4) machine, one run at a time (two side by side each run at half speed).
    "cifar-cpu": {
        "model": "resnet18-w16",
        "config": dataclasses.replace(
            DEFAULTS["cifar10"]["config"], epochs=8, precision="bf16", channels_last=True
        ),
    },
    # The usual CIFAR-10 ResNet-18 (11.2M backbone parameters, fc head 4096 wide): a GPU recipe.
    "cifar-resnet18": {
        "model": "resnet18",
        "config": dataclasses.replace(DEFAULTS["cifar10"]["config"], channels_last=True),
    },
    # A fast GPU recipe after the fastest published CIFAR-10 ones: FastNet (1.97M backbone
    # parameters, whitened 2x2 patches, logits x 1/8), 12 epochs of batch 1024 (588 steps),
    # Nesterov SGD on a triangular schedule (a linear rise over 120 steps, then a linear decay
    # to 0), label smoothing 0.2, 2-pixel shifts and flips, bfloat16, channels-last, flip TTA.
    "cifar-gpu": {
        "model": "fastnet",
        "config": TrainConfig(
            epochs=12,
            batch_size=1024,
            lr=0.8,
            weight_decay=5e-4,
            optimizer="sgd",
            schedule="linear",
            warmup=120,
            augment="crop-flip",
            crop_padding=2,
            label_smoothing=0.2,
            precision="bf16",
            channels_last=True,
            flip_tta=True,
        ),
    },
}


def dataset_base(dataset: str) -> str:
    """``"folder:/x"`` -> ``"folder"``; other names lower-cased with ``_`` read as ``-``.

    >>> dataset_base("Digits_Shifted"), dataset_base("folder:/data/pets")
    ('digits-shifted', 'folder')
    """
    return dataset.strip().partition(":")[0].strip().lower().replace("_", "-")
