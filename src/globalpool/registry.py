"""Stand-in for the kind registry (``spec``, ``kinds``, ``KINDS``), built from :mod:`kinds`.

Only the names the dispatch needs: ``spec(kind).kernels`` (the kernel families that serve a
kind, a subset of ``{"cpu", "cuda", "packed"}``; a kind with none runs its composition
everywhere) and ``spec(kind).width``. The registry being written replaces this module.

>>> sorted(spec("gem").kernels), sorted(spec("sum").kernels), spec("first").kernels
(['cpu', 'cuda', 'packed'], ['cpu', 'packed'], frozenset())
>>> spec("catavgmax").width, kinds()[:2], "lse" in KINDS
(2, ('avg', 'max'), True)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

from globalpool.kinds import KIND_DEFS

__all__ = ["KINDS", "Spec", "kinds", "spec"]

_ALL = frozenset({"cpu", "cuda", "packed"})
_KERNELS = {"sum": frozenset({"cpu", "packed"}), "first": frozenset(), "last": frozenset()}


class Spec(NamedTuple):
    name: str
    width: int
    kernels: frozenset[str]


_SPECS: dict[str, Spec] = {
    name: Spec(name, d.width, _KERNELS.get(name, _ALL)) for name, d in KIND_DEFS.items()
}


def spec(kind: str) -> Spec:
    """The registry entry of ``kind`` (KeyError for an unknown name)."""
    return _SPECS[kind]


def kinds() -> tuple[str, ...]:
    """The registered kind names, in registration order."""
    return tuple(_SPECS)


class _Kinds(Sequence):
    """A live, read-only view of the registered names (compares equal to their tuple)."""

    def __getitem__(self, i):  # type: ignore[override]
        return kinds()[i]

    def __len__(self) -> int:
        return len(_SPECS)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_SPECS))

    def __contains__(self, kind: object) -> bool:
        return kind in _SPECS

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, Sequence) else other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))


KINDS: Sequence[str] = _Kinds()
