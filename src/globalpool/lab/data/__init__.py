"""Datasets for ``globalpool compare``: one :class:`Dataset` type, one ``load_dataset`` entry point.

>>> from globalpool.lab.data import load_dataset
>>> ds = load_dataset("digits-shifted")
>>> ds.input_shape, ds.num_classes
((1, 24, 24), 10)
"""

from .cifar10 import load_cifar10, write_cifar10_fixture
from .dataset import Dataset, default_cache_dir, subsample_indices
from .digits_shifted import load_digits_shifted
from .errors import DatasetError
from .folder import load_folder
from .mnist1d import load_mnist1d
from .registry import DATASET_NAMES, load_dataset

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "DatasetError",
    "default_cache_dir",
    "load_cifar10",
    "load_dataset",
    "load_digits_shifted",
    "load_folder",
    "load_mnist1d",
    "subsample_indices",
    "write_cifar10_fixture",
]
