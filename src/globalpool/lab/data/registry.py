"""``load_dataset(spec)``: one entry point from a dataset name to a :class:`Dataset`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .dataset import Dataset, check_seed, default_cache_dir
from .errors import DatasetError

DATASET_NAMES = ("mnist1d", "digits-shifted", "cifar10", "folder:PATH")


def _unknown(spec: Any) -> DatasetError:
    return DatasetError(f"unknown dataset {spec!r}; expected one of: {', '.join(DATASET_NAMES)}")


def absolute_spec(spec: str) -> str:
    """``folder:PATH`` with ``PATH`` made absolute (``~`` expanded, against the working
    directory), so a run record names the same images from any directory; other specs as given.

    >>> absolute_spec("mnist1d"), absolute_spec("folder:/data/../data/pets")
    ('mnist1d', 'folder:/data/pets')
    >>> absolute_spec("folder:pets") == "folder:" + os.path.join(os.getcwd(), "pets")
    True
    """
    head, sep, rest = spec.strip().partition(":")
    if not sep or head.strip().lower() != "folder" or not rest.strip():
        return spec
    return f"{head}:{os.path.abspath(Path(rest.strip()).expanduser())}"


def is_relative_spec(spec: str) -> bool:
    """Whether ``spec`` is ``folder:PATH`` with a relative ``PATH`` (read from the working
    directory; run records before globalpool recorded absolute paths hold such specs).

    >>> is_relative_spec("folder:pets"), is_relative_spec("folder:/data/pets")
    (True, False)
    """
    head, sep, rest = spec.strip().partition(":")
    relative = not Path(rest.strip()).expanduser().is_absolute()
    return bool(sep) and head.strip().lower() == "folder" and bool(rest.strip()) and relative


def load_dataset(
    spec: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    train_size: int | None = None,
    seed: int = 0,
    download: bool = True,
    image_size: int = 32,
) -> Dataset:
    """Load a dataset by name; every failure is a one-line :class:`DatasetError`.

    ``spec``: ``mnist1d``, ``digits-shifted``, ``cifar10`` or ``folder:PATH`` (names are
    case-insensitive; ``_`` may stand for ``-``). ``data_dir``: where CIFAR-10 lives or is
    downloaded to, and where MNIST-1D's generated arrays and the decoded images of ``folder:``
    are cached (default ``default_cache_dir()``). ``folder:PATH`` reads a directory or a tar
    archive of one (see :mod:`globalpool.lab.data.folder`). ``train_size``: keep a stratified,
    nested subset of this many training samples, chosen by ``seed`` (see
    ``subsample_indices``). ``seed`` also draws the digit placements of digits-shifted;
    MNIST-1D itself is always the published default data.
    ``image_size`` applies to ``folder:`` only; ``download`` to ``cifar10`` only. Image
    datasets (``cifar10``, ``folder:``) also get the ``shifted``, ``canvas`` and
    ``train-subset`` evaluation sets of :mod:`globalpool.lab.data.invariance`.

    >>> ds = load_dataset("digits-shifted", train_size=100, seed=1)
    >>> ds.x_train.shape, sorted(ds.test_sets())
    (torch.Size([100, 1, 24, 24]), ['everywhere', 'larger-canvas', 'right', 'test'])
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _unknown(spec)
    seed = check_seed(seed)
    head, sep, rest = spec.strip().partition(":")
    name = head.strip().lower().replace("_", "-")
    root = Path(data_dir).expanduser() if data_dir is not None else None

    if name == "folder":
        if not rest.strip():
            raise DatasetError("folder: spec needs a path, as in folder:PATH")
        from .folder import load_folder

        cache_dir = (root or default_cache_dir()) / "folder"
        dataset = load_folder(rest.strip(), image_size=image_size, cache_dir=cache_dir)
    elif sep:
        raise _unknown(spec)
    elif name == "mnist1d":
        from .mnist1d import load_mnist1d

        dataset = load_mnist1d(cache_dir=(root or default_cache_dir()) / "mnist1d")
    elif name == "digits-shifted":
        from .digits_shifted import load_digits_shifted

        dataset = load_digits_shifted(seed=seed)
    elif name == "cifar10":
        from .cifar10 import load_cifar10

        dataset = load_cifar10(root, download=download)
    else:
        raise _unknown(spec)

    if name in ("folder", "cifar10"):
        from .invariance import with_invariance_tests

        dataset = with_invariance_tests(dataset)
    if train_size is not None:
        dataset = dataset.subsample_train(train_size, seed)
    return dataset
