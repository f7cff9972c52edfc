"""An image index as a read-only inode tree: the whole filesystem logic, with no FUSE in it.

``swarm.fs.fuse`` is a thin adapter that turns kernel requests into calls on a
:class:`Tree` and its answers into replies; everything that can be wrong about a
filesystem (inode numbers, link counts, directory offsets, what a read returns) lives here
and is unit-tested without a mount (borg's ``vfs``/``fuse`` split).

Inodes: the root is 1; every other entry gets the next number in index order, except that
the entries of one hard-link group share the inode of the group's first entry. ``nlink``
is the size of the group for non-directories and ``2 + subdirectories`` for directories.
Directory offsets are positions in a fixed listing (``.``, ``..``, then the children in
index order), so they are stable for the life of the tree: the image never changes.

Errors are ``OSError`` with the errno a filesystem would return (``ENOENT``, ``ENOTDIR``,
``EINVAL``, ``ENODATA``...); store and fetch failures are ``SwarmError``. The adapter maps
both at its boundary.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

from swarm.digest import to_hex
from swarm.errors import BlobMissing
from swarm.fs.index import Entry, Index
from swarm.fs.source import Fetcher
from swarm.store import Store

log = logging.getLogger(__name__)

ROOT_INO = 1
# Offsets of the two synthetic entries in every listing; children follow.
_DOT_OFFSETS = 2


class Attrs(NamedTuple):
    """What ``stat`` reports for an inode (atime and ctime are the mtime: the image is
    immutable)."""

    ino: int
    mode: int  # st_mode, file-type bits included
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int


def _err(code: int, what: str) -> OSError:
    return OSError(code, os.strerror(code), what)


class ContentReader:
    """Reads file contents from the local store and, on a miss, through a fetcher.

    ``on_read`` is called with the digest of every read (the hot-set recorder dedups).
    Corrupt local blobs are not repaired here: the store raises CorruptBlob (with
    ``verify_on_read``), and the adapter answers EIO, never the bytes.
    """

    def __init__(self, store: Store, fetcher: Fetcher | None = None,
                 on_read: Callable[[bytes], None] | None = None) -> None:
        self.store = store
        self.fetcher = fetcher
        self.on_read = on_read
        self.misses = 0  # reads that had to wait for the fetcher

    async def read(self, digest: bytes, offset: int, length: int,
                   size: int | None = None) -> bytes:
        """``size``: the file's size, when known (a small file is then fetched in one
        request)."""
        if self.on_read is not None:
            self.on_read(digest)
        fetcher = self.fetcher
        if fetcher is None:
            return self.store.read(digest, offset, length)
        data = fetcher.peek(digest, offset, length)  # fetched, not committed yet
        if data is not None:
            return data
        try:
            return self.store.read(digest, offset, length)
        except BlobMissing:
            pass
        self.misses += 1
        return await fetcher.read(digest, offset, length, size=size)


class Tree:
    """The inodes of one image index; see the module docstring for the numbering rules."""

    def __init__(self, index: Index, reader: ContentReader | None = None) -> None:
        self.index = index
        self.reader = reader
        # Per inode (slot 0 unused): the entry that defines it, its link count, its parent
        # directory (the first path's, for hard links).
        entries: list[Entry | None] = [None]
        nlink: list[int] = [0]
        parent: list[int] = [0]
        children: dict[int, dict[bytes, int]] = {}
        dir_ino: dict[bytes, int] = {}
        link_ino: dict[int, int] = {}
        has_xattrs = False
        for e in index.entries:
            if e.xattrs:
                has_xattrs = True
            if e.path == b"/":
                entries.append(e)
                nlink.append(2)
                parent.append(ROOT_INO)
                children[ROOT_INO] = {}
                dir_ino[b"/"] = ROOT_INO
                continue
            pino = dir_ino[e.parent]  # Index validation guarantees the parent is a dir
            if e.kind != "dir" and e.link is not None and e.link in link_ino:
                ino = link_ino[e.link]
                nlink[ino] += 1
            else:
                ino = len(entries)
                entries.append(e)
                parent.append(pino)
                if e.kind == "dir":
                    nlink.append(2)
                    nlink[pino] += 1
                    children[ino] = {}
                    dir_ino[e.path] = ino
                else:
                    nlink.append(1)
                    if e.link is not None:
                        link_ino[e.link] = ino
            children[pino][e.name] = ino
        self._entries = entries
        self._nlink = nlink
        self._parent = parent
        self._children = children
        self._listing: dict[int, list[tuple[bytes, int]]] = {}
        self._attrs: list[Attrs | None] = [None] * len(entries)
        self.has_xattrs = has_xattrs

    # ------------------------------------------------------------------ metadata
    @property
    def inode_count(self) -> int:
        return len(self._entries) - 1

    def entry(self, ino: int) -> Entry:
        """The index entry that defines ``ino`` (the first path of a hard-link group)."""
        if ino <= 0 or ino >= len(self._entries):
            raise _err(errno.ENOENT, f"inode {ino}")
        e = self._entries[ino]
        assert e is not None
        return e

    def getattr(self, ino: int) -> Attrs:
        if 0 < ino < len(self._attrs):
            a = self._attrs[ino]
            if a is not None:
                return a
        e = self.entry(ino)
        a = Attrs(ino, e.st_mode, self._nlink[ino], e.uid, e.gid, e.size, e.mtime_ns, e.rdev)
        self._attrs[ino] = a
        return a

    def _dir(self, ino: int) -> dict[bytes, int]:
        kids = self._children.get(ino)
        if kids is None:
            self.entry(ino)  # ENOENT for an unknown inode
            raise _err(errno.ENOTDIR, f"inode {ino}")
        return kids

    def lookup(self, parent_ino: int, name: bytes) -> Attrs | None:
        """The attributes of ``name`` in directory ``parent_ino``; None if there is no such
        entry (the adapter turns that into a cached negative entry)."""
        kids = self._dir(parent_ino)
        if name == b".":
            return self.getattr(parent_ino)
        if name == b"..":
            return self.getattr(self._parent[parent_ino])
        ino = kids.get(name)
        return None if ino is None else self.getattr(ino)

    def readdir(self, ino: int, offset: int = 0) -> Iterator[tuple[bytes, Attrs, int]]:
        """(name, attrs, next offset) from position ``offset`` on; ``.`` and ``..`` first.
        Passing a yielded next offset back resumes right after that entry."""
        listing = self._listing.get(ino)
        if listing is None:
            kids = self._dir(ino)
            listing = [(b".", ino), (b"..", self._parent[ino]), *kids.items()]
            self._listing[ino] = listing
        for pos in range(max(0, offset), len(listing)):
            name, child = listing[pos]
            yield name, self.getattr(child), pos + 1

    def readlink(self, ino: int) -> bytes:
        e = self.entry(ino)
        if e.kind != "symlink" or e.target is None:
            raise _err(errno.EINVAL, e.path.decode(errors="replace"))
        return e.target

    def listxattr(self, ino: int) -> list[bytes]:
        xattrs = self.entry(ino).xattrs
        return [k.encode("utf-8", "surrogateescape") for k in xattrs] if xattrs else []

    def getxattr(self, ino: int, name: bytes) -> bytes:
        xattrs = self.entry(ino).xattrs
        value = None
        if xattrs:
            value = xattrs.get(name.decode("utf-8", "surrogateescape"))
        if value is None:
            raise _err(errno.ENODATA, name.decode(errors="replace"))
        return value

    def digest(self, ino: int) -> bytes | None:
        return self.entry(ino).digest

    # ------------------------------------------------------------------ contents
    async def read(self, ino: int, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of file ``ino`` from ``offset`` (short only at the end)."""
        e = self.entry(ino)
        if e.kind != "file" or e.digest is None:
            raise _err(errno.EISDIR if e.kind == "dir" else errno.EINVAL,
                       e.path.decode(errors="replace"))
        if offset < 0 or size < 0:
            raise _err(errno.EINVAL, e.path.decode(errors="replace"))
        length = min(size, e.size - offset)
        if length <= 0:
            return b""
        if self.reader is None:
            raise _err(errno.EIO, "tree has no content reader")
        data = await self.reader.read(e.digest, offset, length, e.size)
        if len(data) != length:
            # The index says the file is longer (or shorter) than the content its digest
            # names: the index is wrong, and padding or truncating would invent bytes.
            log.error("%s: index size %d disagrees with blob %s (read %d of %d at %d)",
                      e.path.decode(errors="replace"), e.size, to_hex(e.digest), len(data),
                      length, offset)
            raise _err(errno.EIO, e.path.decode(errors="replace"))
        return data
