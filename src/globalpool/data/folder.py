"""folder:PATH — an ImageFolder-style directory of images, read with Pillow.

Accepted layouts (class = sub-directory name, classes sorted by name):

- ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (``val/`` is accepted for ``test/``);
- ``PATH/<class>/*``: split per class, deterministically, 80/20 into train and test.

Images (png, jpg, jpeg, bmp, gif, webp, tif, tiff; hidden files skipped) are converted to RGB,
resized to ``image_size`` x ``image_size`` (bilinear), scaled to [0, 1] and standardised per
channel with the training set's mean and std.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .dataset import Dataset, check_seed, subsample_indices
from .errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEST_DIR_NAMES = ("test", "val")


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(class_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in class_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _scan(split_dir: Path) -> dict[str, list[Path]]:
    classes = {d.name: _images(d) for d in _visible_dirs(split_dir)}
    if not classes:
        raise DatasetError(f"folder: no class sub-directories in {split_dir}")
    for name, files in classes.items():
        if not files:
            raise DatasetError(
                f"folder: class directory {split_dir / name} has no images "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
    return classes


def _read_image(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        reason = f"{type(err).__name__}: {err}"
        raise DatasetError(f"folder: cannot read image {path} ({reason})") from err


def _read(files: list[Path], size: int) -> torch.Tensor:
    arrays = np.stack([_read_image(p, size) for p in files])  # (N, H, W, 3)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous().to(torch.float32) / 255.0


def load_folder(
    path: str | os.PathLike[str],
    *,
    image_size: int = 32,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> Dataset:
    """Load an image folder: x ``(N, 3, image_size, image_size)`` float32, classes by dir name.

    >>> ds = load_folder("path/to/images")  # doctest: +SKIP
    >>> ds.class_names  # doctest: +SKIP
    ('cat', 'dog')
    """
    root = Path(path).expanduser()
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DatasetError(f"folder: image_size must be a positive int, got {image_size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"folder: test_fraction must be in (0, 1), got {test_fraction}")
    split_seed = check_seed(split_seed)
    if not root.is_dir():
        raise DatasetError(f"folder: {root} is not a directory")

    train_dir = root / "train"
    test_dir = next((root / n for n in TEST_DIR_NAMES if (root / n).is_dir()), None)
    if train_dir.is_dir() or test_dir is not None:
        if not train_dir.is_dir() or test_dir is None:
            raise DatasetError(
                f"folder: {root} needs both train/ and test/ (or val/) sub-directories, "
                f"or neither (then it is split {1 - test_fraction:.0%}/{test_fraction:.0%})"
            )
        train_classes = _scan(train_dir)
        test_classes = _scan(test_dir)
        unknown = sorted(set(test_classes) - set(train_classes))
        if unknown:
            raise DatasetError(f"folder: classes {unknown} in {test_dir} are not in {train_dir}")
        names = sorted(train_classes)
        index = {n: i for i, n in enumerate(names)}
        train = [(p, index[c]) for c in names for p in train_classes[c]]
        test = [(p, index[c]) for c in sorted(test_classes) for p in test_classes[c]]
        layout = "train/test"
    else:
        classes = _scan(root)
        names = sorted(classes)
        every = [(p, i) for i, c in enumerate(names) for p in classes[c]]
        if len(every) < 2:
            raise DatasetError(f"folder: {root} needs at least 2 images to split, got {len(every)}")
        labels = np.array([label for _, label in every])
        n_test = min(max(1, round(len(every) * test_fraction)), len(every) - 1)
        test_idx = set(subsample_indices(labels, n_test, split_seed).tolist())
        train = [item for i, item in enumerate(every) if i not in test_idx]
        test = [item for i, item in enumerate(every) if i in test_idx]
        layout = "split"
    if len(names) < 2:
        raise DatasetError(f"folder: {root} has {len(names)} class; need at least 2")

    x_train = _read([p for p, _ in train], image_size)
    x_test = _read([p for p, _ in test], image_size)
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = (
        x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        if len(train) > 1
        else torch.ones_like(mean)
    )
    return Dataset(
        name=f"folder:{root}",
        x_train=(x_train - mean) / std,
        y_train=torch.tensor([label for _, label in train], dtype=torch.int64),
        x_test=(x_test - mean) / std,
        y_test=torch.tensor([label for _, label in test], dtype=torch.int64),
        num_classes=len(names),
        spatial_rank=2,
        class_names=tuple(names),
        info={
            "root": str(root),
            "layout": layout,
            "image_size": image_size,
            "mean": mean.flatten().tolist(),
            "std": std.flatten().tolist(),
        },
    )
