"""An image folder inside a tar archive: list its members, then read the chosen ones' bytes.

Nothing is extracted to disk. The compression (gzip, xz, bzip2 or none) is recognised by the
file's first bytes, not by its name, and the archive is read as a forward stream through the
decompressor, twice: once by :mod:`tarfile` to list the members and where their bytes lie, then
once more to read the chosen members' bytes at those offsets (no header is parsed again, which
halves the time for an archive of many small images).

The listing pass reads the stream to its very end, so a truncated or corrupt archive fails the
decompressor's own end-of-stream check (gzip's CRC and length, xz's and bzip2's checksums)
before a single image is decoded; the members must also end at the tar end-of-archive block (a
plain ``.tar`` cut between members or with a damaged header would otherwise just look
shorter). Only regular members are listed: links, devices, absolute or ``..`` names are skipped
(their bytes are never read). A name stored twice is read from its later copy, as extracting
would leave it.

>>> import io, tarfile, tempfile
>>> path = Path(tempfile.mkdtemp()) / "tiny.tar.gz"
>>> with tarfile.open(path, "w:gz") as tar:
...     info = tarfile.TarInfo("top/cat/a.png"); info.size = 3
...     tar.addfile(info, io.BytesIO(b"abc"))
>>> listing = list_archive(path)
>>> listing.files, sorted(listing.dirs)
({('top', 'cat', 'a.png'): (512, 3)}, [('top',), ('top', 'cat')])
>>> list(read_members(listing, [("top", "cat", "a.png")]))
[(('top', 'cat', 'a.png'), b'abc')]
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import lzma
import os
import tarfile
import zlib
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import IO

from .errors import DatasetError

Parts = tuple[str, ...]

# First bytes of each compressed format that tarfile's own "r:*" mode also understands.
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2"))
# What a damaged archive raises, depending on where the damage is and how it is compressed.
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


@dataclasses.dataclass(frozen=True)
class ArchiveListing:
    """The regular members of an archive (``files``: path components -> offset of the bytes in
    the uncompressed tar stream and their size) and its directories (``dirs``, listed or implied
    by a member's path). Components never hold ``.``, ``..`` or empty parts."""

    path: Path
    files: Mapping[Parts, tuple[int, int]]
    dirs: frozenset[Parts]


def member_parts(name: str) -> Parts | None:
    """A member name as path components; ``None`` for names that leave the archive root.

    >>> member_parts("./train//cat/1.png"), member_parts("../etc/passwd"), member_parts("/")
    (('train', 'cat', '1.png'), None, None)
    """
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    return None if not parts or ".." in parts else parts


@contextlib.contextmanager
def _decompressed(path: Path) -> Iterator[IO[bytes]]:
    """The uncompressed bytes of the archive at ``path``, as a forward-seekable stream."""
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(open(path, "rb"))
        head = raw.read(6)
        raw.seek(0)
        kind = next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)
        if kind == "gzip":
            yield stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        elif kind == "xz":
            yield stack.enter_context(lzma.LZMAFile(raw, mode="rb"))
        elif kind == "bzip2":
            yield stack.enter_context(bz2.BZ2File(raw, mode="rb"))
        else:
            yield raw


@contextlib.contextmanager
def _damage_reported(path: Path, action: str, current: list[str]) -> Iterator[None]:
    """Any read failure inside becomes one :class:`DatasetError`; ``current`` holds the name of
    the member being read, if any (the message says where the damage was found)."""
    try:
        yield
    except DatasetError:
        raise
    except _READ_ERRORS as err:
        reason = f"{type(err).__name__}: {err}"
        if not current and isinstance(err, tarfile.ReadError):
            raise DatasetError(f"folder: {path} is not a tar archive ({reason})") from err
        near = f" near member {current[0]}" if current else ""
        raise DatasetError(
            f"folder: cannot {action} archive {path}: truncated or corrupt{near} ({reason})"
        ) from err


def list_archive(path: str | os.PathLike[str]) -> ArchiveListing:
    """Every regular member and directory of the tar archive at ``path``, read to its end."""
    path = Path(path)
    files: dict[Parts, tuple[int, int]] = {}
    dirs: set[Parts] = set()
    current: list[str] = []
    with (
        _damage_reported(path, "list", current),
        _decompressed(path) as stream,
        tarfile.open(fileobj=stream, mode="r|") as archive,
    ):
        for member in archive:
            current[:] = [member.name]
            parts = member_parts(member.name)
            if parts is None or not (member.isfile() or member.isdir()):
                continue
            if member.isfile():
                files[parts] = (member.offset_data, member.size)
            else:
                dirs.add(parts)
            dirs.update(parts[:i] for i in range(1, len(parts)))
        # tarfile also stops, silently, at a cut or a damaged header: make sure it stopped at
        # the end-of-archive block, with only zero padding after it. Reading that tail to its
        # end also makes the decompressor check its trailer.
        tail = archive.fileobj
        at_marker = tail.tell() - archive.offset == tarfile.BLOCKSIZE
        padding_only = True
        while block := tail.read(1 << 20):
            padding_only = padding_only and not block.strip(b"\0")
        if not (at_marker and padding_only):
            where = f" after member {current[0]}" if current else ""
            raise DatasetError(
                f"folder: cannot list archive {path}: truncated or corrupt{where} (the members "
                "end without the end-of-archive block, or something other than padding follows)"
            )
    return ArchiveListing(path, files, frozenset(dirs))


def read_members(listing: ArchiveListing, wanted: Collection[Parts]) -> Iterator[
    tuple[Parts, bytes]
]:
    """Yield ``(parts, bytes)`` of each regular member in ``wanted``, in archive order."""
    spans = sorted((*listing.files[parts], parts) for parts in set(wanted))
    current: list[str] = []
    with _damage_reported(listing.path, "read", current), _decompressed(listing.path) as stream:
        for offset, size, parts in spans:
            current[:] = ["/".join(parts)]
            stream.seek(offset)
            data = stream.read(size)
            if len(data) != size:
                raise EOFError(f"{len(data)} of its {size} bytes left")
            yield parts, data
