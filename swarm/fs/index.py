"""The image index: path -> (type, stat, content digest). An image *is* its index.

Encoding (canonical, so equal trees give equal bytes and so equal image ids)::

    msgpack map {"config": {...}, "entries": [entry, ...], "v": 1}   (keys sorted)

Each entry is a msgpack array, in this order::

    [path, kind, mode, uid, gid, size, mtime_ns, digest, target, rdev, xattrs, link]

``path``     bin: absolute, "/" for the root, no trailing slash, never "." or "..".
``kind``     str: one of "dir", "file", "symlink", "char", "block", "fifo".
``mode``     int: permission bits including setuid, setgid and sticky (``mode & 0o7777``).
``uid/gid``  int.
``size``     int: content length of a file, target length of a symlink, 0 otherwise.
``mtime_ns`` int: nanoseconds since the epoch.
``digest``   bin(32) for files (the BLAKE3 of the whole content), nil otherwise.
``target``   bin for symlinks (as stored: absolute, relative or dangling), nil otherwise.
``rdev``     int: device number of char and block devices, 0 otherwise.
``xattrs``   map str -> bin with keys sorted, or nil when there are none.
``link``     int hard-link group (entries with equal group are one inode), nil when alone.

Entries are sorted by path components, which puts every directory right before its
subtree. ``config`` is the OCI-style image config (Env, Cmd, Entrypoint, WorkingDir, User,
...), with keys sorted. The image id is the BLAKE3 of these bytes; the bytes are a blob.
"""

from __future__ import annotations

import stat as statmod
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import msgpack

from swarm.digest import hash_bytes
from swarm.errors import SwarmError

INDEX_VERSION = 1
KINDS = ("dir", "file", "symlink", "char", "block", "fifo")
_S_IFMT = {
    "dir": statmod.S_IFDIR, "file": statmod.S_IFREG, "symlink": statmod.S_IFLNK,
    "char": statmod.S_IFCHR, "block": statmod.S_IFBLK, "fifo": statmod.S_IFIFO,
}
_KIND_OF_IFMT = {v: k for k, v in _S_IFMT.items()}


class IndexError_(SwarmError):
    """An index blob that does not decode, or an entry that breaks the format's rules."""

    exit_code = 4


class Entry(NamedTuple):
    path: bytes
    kind: str
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    digest: bytes | None = None
    target: bytes | None = None
    rdev: int = 0
    xattrs: dict[str, bytes] | None = None
    link: int | None = None

    @property
    def st_mode(self) -> int:
        """``mode`` with the file-type bits, as ``stat`` reports it."""
        return _S_IFMT[self.kind] | self.mode

    @property
    def name(self) -> bytes:
        return self.path.rsplit(b"/", 1)[1]

    @property
    def parent(self) -> bytes:
        head = self.path.rsplit(b"/", 1)[0]
        return head or b"/"


def kind_of(st_mode: int) -> str | None:
    """The index kind of an ``st_mode``; None for sockets (which images do not carry)."""
    return _KIND_OF_IFMT.get(statmod.S_IFMT(st_mode))


def sort_key(path: bytes) -> list[bytes]:
    return path.split(b"/")


def normalize_path(path: bytes | str) -> bytes:
    """Absolute, single slashes, no trailing slash, no "." components. Raises ValueError on
    ".." (callers that accept untrusted paths turn it into a message naming the entry)."""
    if isinstance(path, str):
        path = path.encode("utf-8", "surrogateescape")
    parts = [p for p in path.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise ValueError("path has a '..' component")
    if any(b"\0" in p for p in parts):
        raise ValueError("path has a NUL byte")
    return b"/" + b"/".join(parts)


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _canonical(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    return obj


class Index:
    """An immutable image index, with lookups by path and by directory."""

    def __init__(self, entries: Iterable[Entry], config: dict[str, Any] | None = None) -> None:
        items = sorted(entries, key=lambda e: sort_key(e.path))
        self.entries: tuple[Entry, ...] = tuple(items)
        self.config: dict[str, Any] = _canonical(dict(config or {}))
        self._by_path: dict[bytes, Entry] | None = None
        self._encoded: bytes | None = None
        self._validate()

    def _validate(self) -> None:
        if not self.entries or self.entries[0].path != b"/" or self.entries[0].kind != "dir":
            raise IndexError_("index has no root directory entry")
        seen: set[bytes] = set()
        dirs = {b"/"}
        for e in self.entries:
            if e.kind not in _S_IFMT:
                raise IndexError_(f"entry {e.path!r}: unknown kind {e.kind!r}")
            if e.path in seen:
                raise IndexError_(f"entry {e.path!r} appears twice")
            seen.add(e.path)
            if e.path != b"/" and e.parent not in dirs:
                raise IndexError_(f"entry {e.path!r}: parent is not a directory in the index")
            if e.kind == "dir":
                dirs.add(e.path)
            if e.kind == "file" and (e.digest is None or len(e.digest) != 32):
                raise IndexError_(f"entry {e.path!r}: file without a 32-byte digest")
            if e.kind == "symlink" and e.target is None:
                raise IndexError_(f"entry {e.path!r}: symlink without a target")

    # --------------------------------------------------------------- lookups
    @property
    def by_path(self) -> dict[bytes, Entry]:
        if self._by_path is None:
            self._by_path = {e.path: e for e in self.entries}
        return self._by_path

    def get(self, path: bytes | str) -> Entry | None:
        return self.by_path.get(normalize_path(path))

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def file_digests(self) -> list[bytes]:
        """Distinct content digests, in index order."""
        seen: dict[bytes, None] = {}
        for e in self.entries:
            if e.digest is not None:
                seen.setdefault(e.digest, None)
        return list(seen)

    def content_bytes(self) -> int:
        """Bytes of file content, each hard-linked inode counted once."""
        total = 0
        links: set[int] = set()
        for e in self.entries:
            if e.kind == "file":
                if e.link is not None:
                    if e.link in links:
                        continue
                    links.add(e.link)
                total += e.size
        return total

    # --------------------------------------------------------------- encoding
    def encode(self) -> bytes:
        if self._encoded is None:
            rows = [
                [e.path, e.kind, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.digest, e.target,
                 e.rdev, None if not e.xattrs else {k: e.xattrs[k] for k in sorted(e.xattrs)},
                 e.link]
                for e in self.entries
            ]
            doc = {"config": self.config, "entries": rows, "v": INDEX_VERSION}
            self._encoded = msgpack.packb(doc, use_bin_type=True)
        return self._encoded

    @property
    def image_id(self) -> bytes:
        return hash_bytes(self.encode())

    @classmethod
    def decode(cls, raw: bytes) -> Index:
        try:
            doc = msgpack.unpackb(raw, raw=False, use_list=False, strict_map_key=False)
            if not isinstance(doc, dict):
                raise ValueError("not a map")
            if doc.get("v") != INDEX_VERSION:
                raise ValueError(f"unsupported index version {doc.get('v')!r}")
            entries = [_checked(row) for row in doc["entries"]]
            config = _thaw(doc.get("config") or {})
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as err:
            raise IndexError_(f"malformed image index: {err}") from err
        idx = cls.__new__(cls)
        idx.entries = tuple(entries)  # already canonical: sorted when encoded
        idx.config = config
        idx._by_path = None
        idx._encoded = raw
        idx._validate()
        return idx


def _checked(row: Any) -> Entry:
    """An entry from a decoded row, with every field's type checked: a crafted index must
    not smuggle odd types into the filesystem. One expression, since it runs per entry."""
    if type(row) is not tuple or len(row) != len(Entry._fields):
        raise TypeError(f"entry {row!r:.60}: want {len(Entry._fields)} fields")
    path, kind, mode, uid, gid, size, mtime, digest, target, rdev, xattrs, link = row
    if not (type(path) is bytes and type(kind) is str and type(mode) is int
            and type(uid) is int and type(gid) is int and type(size) is int
            and type(mtime) is int and type(rdev) is int
            and (digest is None or type(digest) is bytes)
            and (target is None or type(target) is bytes)
            and (link is None or type(link) is int)):
        raise TypeError(f"entry {path!r:.60}: a field has the wrong type")
    if xattrs is not None and not (type(xattrs) is dict and all(
            type(k) is str and type(v) is bytes for k, v in xattrs.items())):
        raise TypeError(f"entry {path!r:.60}: xattrs must map names to bytes")
    return Entry._make(row)


def _thaw(obj: Any) -> Any:
    """msgpack with use_list=False gives tuples; configs are JSON-like, so give lists back."""
    if isinstance(obj, dict):
        return {k: _thaw(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [_thaw(v) for v in obj]
    return obj
