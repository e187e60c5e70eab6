"""The layout rules of ``folder:``, the same for a directory and for a tar archive's listing.

A tree answers two questions about a place below its root (given as path components): which
visible sub-directories it has, and which images. :func:`plan_layout` turns those answers into
the class names and the ordered list of images a dataset is made of:

- ``train/<class>/*`` and ``test/<class>/*`` (``val/`` is accepted for ``test/``): the classes
  of ``train/``, sorted; ``test/`` may not hold others;
- ``<class>/*``: every image is left to be split into train and test later.

In an archive, one top-level directory around the layout (``cifar10/train/...``) is looked
through, unless it is itself ``train/``, ``test/`` or ``val/``.

>>> files = {("cifar", c, f"{i}.png"): (0, 0) for c in ("cat", "dog") for i in range(2)}
>>> dirs = frozenset({("cifar",), ("cifar", "cat"), ("cifar", "dog")})
>>> tree = ArchiveTree(ArchiveListing(Path("pets.tar"), files, dirs))
>>> names, entries, layout = plan_layout(tree, test_fraction=0.2)
>>> names, layout, entries[0], tree.member(entries[0][0])
(['cat', 'dog'], 'split', (('cat', '0.png'), 0, 2), ('cifar', 'cat', '0.png'))
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Protocol

from .errors import DatasetError
from .folder_archive import ArchiveListing, Parts
from .folder_cache import TEST, TRAIN, UNSPLIT

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEST_DIR_NAMES = ("test", "val")
Entry = tuple[Parts, int, int]  # (path below the root, label, TRAIN / TEST / UNSPLIT)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


class Tree(Protocol):
    """What the layout rules look at: sub-directories and images below the root, by parts."""

    def subdirs(self, at: Parts) -> list[str]: ...
    def images(self, at: Parts) -> list[str]: ...
    def where(self, at: Parts) -> str: ...


class DirTree:
    """A directory on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def subdirs(self, at: Parts) -> list[str]:
        with os.scandir(self.root.joinpath(*at)) as found:
            return sorted(e.name for e in found if e.is_dir() and not e.name.startswith("."))

    def images(self, at: Parts) -> list[str]:
        with os.scandir(self.root.joinpath(*at)) as found:
            return sorted(e.name for e in found if _is_image(e.name) and e.is_file())

    def where(self, at: Parts) -> str:
        return str(self.root.joinpath(*at))


class ArchiveTree:
    """The listing of a tar archive, looking through one wrapper directory."""

    def __init__(self, listing: ArchiveListing) -> None:
        self.listing = listing
        self.path = listing.path
        self._dirs: dict[Parts, set[str]] = defaultdict(set)
        self._files: dict[Parts, set[str]] = defaultdict(set)
        for parts in listing.dirs:
            self._dirs[parts[:-1]].add(parts[-1])
        for parts in listing.files:
            self._files[parts[:-1]].add(parts[-1])
        self.prefix: Parts = ()
        top = self.subdirs(())
        if len(top) == 1 and top[0] not in ("train", *TEST_DIR_NAMES):
            self.prefix = (top[0],)  # one wrapper directory: the layout is inside it

    def member(self, at: Parts) -> Parts:
        return self.prefix + at

    def subdirs(self, at: Parts) -> list[str]:
        return sorted(n for n in self._dirs.get(self.member(at), ()) if not n.startswith("."))

    def images(self, at: Parts) -> list[str]:
        return sorted(n for n in self._files.get(self.member(at), ()) if _is_image(n))

    def where(self, at: Parts) -> str:
        inner = "/".join(self.member(at))
        return f"{self.path}:{inner}" if inner else str(self.path)


def _scan(tree: Tree, at: Parts) -> dict[str, list[str]]:
    classes = {name: tree.images((*at, name)) for name in tree.subdirs(at)}
    if not classes:
        raise DatasetError(f"folder: no class sub-directories in {tree.where(at)}")
    for name, files in classes.items():
        if not files:
            raise DatasetError(
                f"folder: class directory {tree.where((*at, name))} has no images "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
    return classes


def plan_layout(tree: Tree, test_fraction: float) -> tuple[list[str], list[Entry], str]:
    """Class names, every image the layout uses (in load order: path below the root, label,
    ``TRAIN``/``TEST``/``UNSPLIT``) and the layout's name, ``"train/test"`` or ``"split"``.

    ``test_fraction`` only shapes the message for a ``train/`` without ``test/``.
    """
    top = tree.subdirs(())
    test_name = next((n for n in TEST_DIR_NAMES if n in top), None)
    if "train" in top or test_name is not None:
        if "train" not in top or test_name is None:
            raise DatasetError(
                f"folder: {tree.where(())} needs both train/ and test/ (or val/) "
                f"sub-directories, or neither (then it is split "
                f"{1 - test_fraction:.0%}/{test_fraction:.0%})"
            )
        train_classes = _scan(tree, ("train",))
        test_classes = _scan(tree, (test_name,))
        unknown = sorted(set(test_classes) - set(train_classes))
        if unknown:
            raise DatasetError(
                f"folder: classes {unknown} in {tree.where((test_name,))} are not in "
                f"{tree.where(('train',))}"
            )
        names = sorted(train_classes)
        index = {n: i for i, n in enumerate(names)}
        entries = [(("train", c, f), index[c], TRAIN) for c in names for f in train_classes[c]]
        entries += [
            ((test_name, c, f), index[c], TEST)
            for c in sorted(test_classes)
            for f in test_classes[c]
        ]
        layout = "train/test"
    else:
        classes = _scan(tree, ())
        names = sorted(classes)
        entries = [((c, f), i, UNSPLIT) for i, c in enumerate(names) for f in classes[c]]
        if len(entries) < 2:
            raise DatasetError(
                f"folder: {tree.where(())} needs at least 2 images to split, got {len(entries)}"
            )
        layout = "split"
    if len(names) < 2:
        raise DatasetError(f"folder: {tree.where(())} has {len(names)} class; need at least 2")
    return names, entries, layout
