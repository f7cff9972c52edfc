"""Tar layers -> an image index: rootfs tarballs and OCI/Docker layer tars, applied in order.

An image is its index (see ``swarm.fs.index``), so importing an archive never unpacks it:
``TreeBuilder`` keeps the tree as ``Entry`` values keyed by path, streams every regular
file's bytes straight into the store, and applies each layer's changes to that map. Nothing
is ever written to the host filesystem, which removes the classic tar attacks on the host
(``../`` names, symlinked parents, hard links to ``/etc/shadow``); we still refuse those
archives, because an image that contains them is malformed and would misbehave when run.

Layer semantics follow the OCI image spec ("Representing Changes"):

- ``.wh.NAME`` deletes NAME, and its subtree, as it exists in the layers below.
- ``.wh..wh..opq`` in a directory hides every child that lower layers gave it; children
  the same layer adds stay, whatever the member order within the layer.
- An entry replaces the lower entry at its path; a directory over a directory only updates
  the directory's metadata (children merge), anything else hides the lower subtree.

To make that independent of member order, a layer is applied in three steps once all its
members have been read: first its deletions (whiteouts, opaque markers) against the lower
tree, then its entries in path order (parents before children), then its hard links in
member order (their targets are in place by then). Member order still matters for two
checks the archive formats define by order: a hard link must come after its target, and a
path may not appear twice with different types.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import IO, Any, BinaryIO, cast

import zstandard

from swarm.build.progress import Progress
from swarm.errors import ImportRefused
from swarm.fs import images
from swarm.fs.images import ImageRecord
from swarm.fs.index import Entry, Index, sort_key
from swarm.store import Store
from swarm.store.cas import Batch

# Linux's NAME_MAX: no filesystem (FUSE included) can hold a longer name component.
NAME_MAX_BYTES = 255
IMPLICIT_DIR_MODE = 0o755
NS_PER_S = 1_000_000_000
# Index integers are msgpack integers: signed 64-bit for times, unsigned 32-bit for ids.
MTIME_NS_MIN, MTIME_NS_MAX = -(1 << 63), (1 << 63) - 1
ID_MAX = (1 << 32) - 1
WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
# aufs kept its own bookkeeping under ".wh..wh." names; Docker skips those, so do we.
AUFS_META_PREFIX = b".wh..wh."
XATTR_PAX_PREFIX = "SCHILY.xattr."
# xattrs that describe how a tree was stored, not what it is: overlayfs would act on them.
SKIP_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
# Tar names and pax values are bytes; decoding with surrogateescape lets us recover them
# exactly with ``.encode(TAR_ENCODING, TAR_ERRORS)``.
TAR_ENCODING = "utf-8"
TAR_ERRORS = "surrogateescape"
MAGIC_PEEK_BYTES = 6
DRAIN_BLOCK_BYTES = 1 << 20

_COMPRESSION_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)
_KIND_OF_TYPE = {
    tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.CONTTYPE: "file",
    tarfile.GNUTYPE_SPARSE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


# --------------------------------------------------------------------------- opening streams
def sniff_compression(head: bytes) -> str:
    """"gzip", "zstd", "bzip2", "xz" or "none", from a stream's first bytes (never from a
    file name: layers and tarballs are often misnamed)."""
    for magic, kind in _COMPRESSION_MAGIC:
        if head.startswith(magic):
            return kind
    return "none"


class _Prefixed(io.RawIOBase):
    """``head`` then the rest of ``stream``: puts sniffed bytes back in front of a pipe."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        super().__init__()
        self._head = head
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._stream.read(len(view))
        if not data:
            return 0
        view[:len(data)] = data
        return len(data)


def peek(stream: IO[bytes], n: int = MAGIC_PEEK_BYTES) -> tuple[bytes, IO[bytes]]:
    """The first ``n`` bytes of ``stream``, and a stream that still starts with them."""
    if stream.seekable():
        pos = stream.tell()
        head = stream.read(n)
        stream.seek(pos)
        return head, stream
    head = b""
    while len(head) < n:
        more = stream.read(n - len(head))
        if not more:
            break
        head += more
    return head, cast(IO[bytes], io.BufferedReader(_Prefixed(head, stream)))


def decompress(stream: IO[bytes], compression: str | None = None) -> IO[bytes]:
    """``stream`` decompressed on the fly; ``compression`` None means sniff the magic."""
    if compression is None:
        head, stream = peek(stream)
        compression = sniff_compression(head)
    if compression == "gzip":
        return cast(IO[bytes], gzip.GzipFile(fileobj=stream, mode="rb"))
    if compression == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(
            stream, read_across_frames=True, closefd=False)
        return cast(IO[bytes], reader)
    if compression == "bzip2":
        return cast(IO[bytes], bz2.BZ2File(stream))
    if compression == "xz":
        return cast(IO[bytes], lzma.LZMAFile(stream))
    if compression == "none":
        return stream
    raise ValueError(f"unknown compression {compression!r}")


# Errors that reading a damaged archive can raise, from tarfile or a decompressor.
ARCHIVE_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


# A zero block, or no data at all where a header would be: how archives end.
_CLEAN_END: tuple[type[BaseException], ...] = (
    tarfile.EOFHeaderError, tarfile.EmptyHeaderError)  # type: ignore[attr-defined]


class _StrictTarInfo(tarfile.TarInfo):
    """Remembers a damaged header on the TarFile it was read from.

    In stream mode tarfile treats a header that fails its checksum, or a truncated one,
    after the first member as the end of the archive, silently dropping the rest; we
    want a truncated or corrupted layer refused instead.
    """

    @classmethod
    def fromtarfile(cls, tarfile_obj: tarfile.TarFile) -> _StrictTarInfo:
        try:
            return super().fromtarfile(tarfile_obj)
        except _CLEAN_END:
            raise  # a zero block, or end of data at a member boundary: a clean end
        except tarfile.HeaderError as err:
            tarfile_obj._swarm_bad_header = err  # type: ignore[attr-defined]
            raise


def open_tar_stream(stream: IO[bytes], label: str) -> tarfile.TarFile:
    """A streaming (``r|``) TarFile over an uncompressed tar, set up for ``apply_tar``."""
    try:
        return tarfile.open(fileobj=stream, mode="r|", encoding=TAR_ENCODING,
                            errors=TAR_ERRORS, tarinfo=_StrictTarInfo)
    except ARCHIVE_ERRORS as err:
        raise ImportRefused(f"{label}: not a tar archive ({err})") from err


def drain(stream: IO[bytes] | io.RawIOBase) -> None:
    """Read ``stream`` to its end (so hashes see every byte)."""
    while stream.read(DRAIN_BLOCK_BYTES):
        pass


# --------------------------------------------------------------------------- the tree
@dataclass
class _Member:
    """One tar member that adds an entry: the original name (for messages), its entry, and
    for a hard link the path it links to."""

    name: str
    entry: Entry
    link_target: bytes | None = None


@dataclass
class _Layer:
    """What one layer says, collected while its members stream past."""

    label: str
    kinds: dict[bytes, str] = field(default_factory=dict)  # path -> tar kind, in this layer
    entries: dict[bytes, _Member] = field(default_factory=dict)
    links: dict[bytes, _Member] = field(default_factory=dict)
    whiteouts: dict[bytes, str] = field(default_factory=dict)  # path -> member name
    opaque: dict[bytes, str] = field(default_factory=dict)  # dir path -> member name
    last_name: str | None = None

    def refuse(self, name: str, what: str) -> ImportRefused:
        return ImportRefused(f"{self.label}: entry {name!r}: {what}")


def _ancestors(path: bytes) -> Iterator[bytes]:
    """Proper ancestors of ``path`` below the root, shallowest first."""
    parts = path.split(b"/")[1:-1]
    for i in range(1, len(parts) + 1):
        yield b"/" + b"/".join(parts[:i])


def _parent(path: bytes) -> bytes:
    head = path.rsplit(b"/", 1)[0]
    return head or b"/"


class TreeBuilder:
    """An image tree in memory, built by applying tar layers in order.

    Every entry's ancestors are directories at all times (members through symlinks or
    under non-directories are refused), so the map is always a valid tree and ``build``
    only numbers hard links.
    """

    def __init__(self) -> None:
        self._entries: dict[bytes, Entry] = {b"/": Entry(b"/", "dir", IMPLICIT_DIR_MODE)}
        self._children: dict[bytes, set[bytes]] = {b"/": set()}
        # Hard links: path -> group, group -> paths. Group numbers here are internal;
        # ``build`` renumbers them in path order so equal trees encode equally.
        self._group_of: dict[bytes, int] = {}
        self._groups: dict[int, set[bytes]] = {}
        self._next_group = 0
        self.layers = 0

    # ----------------------------------------------------------------- reading a layer
    def apply_tar(self, tf: tarfile.TarFile, batch: Batch, progress: Progress | None = None,
                  layer_name: str = "layer", *,
                  before_apply: Callable[[], None] | None = None) -> None:
        """Read every member of ``tf`` (file contents go to the store through ``batch``),
        then apply the layer to the tree.

        ``before_apply`` runs after the last member is read and before the tree changes:
        the OCI importer verifies the layer's digest there, so a tampered layer never
        reaches the tree. Raises ImportRefused naming the entry for hostile or malformed
        input; the tree is then unusable (callers drop the builder).
        """
        layer = _Layer(layer_name)
        self.layers += 1
        current: str | None = None  # the member being read
        try:
            while True:
                info = tf.next()
                if info is None:
                    break
                del tf.members[:]  # type: ignore[attr-defined]  # stream mode keeps them all
                current = info.name
                self._read_member(layer, tf, info, batch, progress)
                layer.last_name, current = info.name, None
        except ImportRefused:
            raise
        except ARCHIVE_ERRORS as err:
            if current is not None:  # its header was fine, its data is not
                raise ImportRefused(f"{layer_name}: entry {current!r}: unreadable data "
                                    f"({err})") from err
            where = (f"after entry {layer.last_name!r}" if layer.last_name is not None
                     else "at its start")
            raise ImportRefused(f"{layer_name}: unreadable tar {where} ({err})") from err
        bad = getattr(tf, "_swarm_bad_header", None)
        if bad is not None:
            where = (f"after entry {layer.last_name!r}" if layer.last_name is not None
                     else "at its start")
            raise ImportRefused(f"{layer_name}: truncated or corrupt tar header {where} "
                                f"({bad})")
        if before_apply is not None:
            before_apply()
        self._apply(layer)

    def _member_path(self, layer: _Layer, name: str) -> bytes:
        raw = name.encode(TAR_ENCODING, TAR_ERRORS)
        if not raw:
            raise layer.refuse(name, "empty member name")
        if b"\0" in raw:
            raise layer.refuse(name, "member name contains a NUL byte")
        if raw.startswith(b"/"):
            raise layer.refuse(name, "absolute member name (layers hold relative paths)")
        parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
        if b".." in parts:
            raise layer.refuse(name, "member name has a '..' component")
        for p in parts:
            if len(p) > NAME_MAX_BYTES:
                raise layer.refuse(name, f"name component longer than {NAME_MAX_BYTES} bytes")
        for p in parts[:-1]:
            if p.startswith(WHITEOUT_PREFIX):
                raise layer.refuse(name, "entry inside a whiteout name")
        return b"/" + b"/".join(parts)

    def _link_path(self, layer: _Layer, name: str, linkname: str) -> bytes:
        """The path a hard link member points at, checked like a member name."""
        raw = linkname.encode(TAR_ENCODING, TAR_ERRORS)
        if not raw or b"\0" in raw:
            raise layer.refuse(name, f"hard link with an invalid target {linkname!r}")
        if raw.startswith(b"/"):
            raise layer.refuse(name, f"hard link target {linkname!r} is absolute "
                                     "(outside the image)")
        parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
        if b".." in parts:
            raise layer.refuse(name, f"hard link target {linkname!r} escapes the image "
                                     "('..' component)")
        return b"/" + b"/".join(parts)

    def _read_member(self, layer: _Layer, tf: tarfile.TarFile, info: tarfile.TarInfo,
                     batch: Batch, progress: Progress | None) -> None:
        name = info.name
        path = self._member_path(layer, name)
        base = path.rsplit(b"/", 1)[1]
        if base.startswith(WHITEOUT_PREFIX):
            self._read_whiteout(layer, name, path, base)
            return
        kind = _KIND_OF_TYPE.get(info.type)
        if kind is None:
            raise layer.refuse(name, f"unsupported tar member type {info.type!r} (sockets "
                                     "and other special files cannot be in an image)")
        prev = layer.kinds.get(path)
        if prev is not None and prev != kind:
            raise layer.refuse(name, f"appears twice in one layer, as a {prev} and as a "
                                     f"{kind}")
        if path == b"/" and kind != "dir":
            raise layer.refuse(name, f"the root must be a directory, not a {kind}")
        mode, uid, gid, mtime_ns = self._stat_fields(layer, info)
        xattrs = self._xattrs(layer, info)
        common: dict[str, Any] = dict(path=path, mode=mode, uid=uid, gid=gid,
                                      mtime_ns=mtime_ns, xattrs=xattrs)
        if kind == "hardlink":
            target = self._link_path(layer, name, info.linkname)
            if target == path:
                raise layer.refuse(name, "hard link to itself")
            self._check_link_target(layer, name, target)
            layer.kinds[path] = kind
            layer.links.pop(path, None)  # a repeated link moves to the end of the order
            layer.links[path] = _Member(name, Entry(kind="file", **common), target)
            return
        if kind == "file":
            fobj = tf.extractfile(info)
            if fobj is None:  # pragma: no cover - tarfile returns a reader for files
                raise layer.refuse(name, "file member without data")
            with fobj:
                digest, size = batch.put_stream(fobj)
            if size != info.size:
                raise layer.refuse(name, f"holds {size} bytes, its header says {info.size}")
            entry = Entry(kind="file", size=size, digest=digest, **common)
            if progress is not None:
                progress.advance(files=1, nbytes=size)
        elif kind == "symlink":
            target_b = info.linkname.encode(TAR_ENCODING, TAR_ERRORS)
            if not target_b or b"\0" in target_b:
                raise layer.refuse(name, f"symlink with an invalid target {info.linkname!r}")
            entry = Entry(kind="symlink", size=len(target_b), target=target_b, **common)
        elif kind in ("char", "block"):
            try:
                rdev = os.makedev(info.devmajor, info.devminor)
            except (OverflowError, ValueError) as err:
                raise layer.refuse(name, f"device number {info.devmajor}:{info.devminor} "
                                         "out of range") from err
            entry = Entry(kind=kind, rdev=rdev, **common)
        else:
            entry = Entry(kind=kind, **common)
        if kind != "file" and progress is not None:
            progress.advance(files=1)
        layer.kinds[path] = kind
        layer.entries[path] = _Member(name, entry)

    def _read_whiteout(self, layer: _Layer, name: str, path: bytes, base: bytes) -> None:
        parent = _parent(path)
        if base == OPAQUE_MARKER:
            layer.opaque[parent] = name
            return
        if base.startswith(AUFS_META_PREFIX):
            return
        victim = base[len(WHITEOUT_PREFIX):]
        if victim in (b"", b".", b".."):
            raise layer.refuse(name, f"whiteout of {victim.decode(TAR_ENCODING, TAR_ERRORS)!r}"
                                     " (not an entry name)")
        layer.whiteouts[parent.rstrip(b"/") + b"/" + victim] = name

    def _check_link_target(self, layer: _Layer, name: str, target: bytes) -> None:
        """A hard link must follow its target: in this layer before it, or in a lower one."""
        for anc in _ancestors(target):
            kind = layer.kinds.get(anc) or (e.kind if (e := self._entries.get(anc)) else None)
            if kind == "symlink":
                raise layer.refuse(name, f"hard link target {target.decode(errors='replace')!r}"
                                         f" goes through symlink {anc.decode(errors='replace')!r}")
        kind = layer.kinds.get(target)
        if kind is None:
            e = self._entries.get(target)
            kind = e.kind if e is not None else None
        if kind is None:
            raise layer.refuse(name, f"hard link to {target.decode(errors='replace')!r}, "
                                     "which is not in the image before it")
        if kind == "dir":
            raise layer.refuse(name, "hard link to a directory")

    def _stat_fields(self, layer: _Layer, info: tarfile.TarInfo) -> tuple[int, int, int, int]:
        mtime_ns = _mtime_ns(info)
        if not MTIME_NS_MIN <= mtime_ns <= MTIME_NS_MAX:
            raise layer.refuse(info.name, f"mtime {mtime_ns} ns is out of range")
        for what, value in (("uid", info.uid), ("gid", info.gid)):
            if not 0 <= value <= ID_MAX:
                raise layer.refuse(info.name, f"{what} {value} is out of range")
        return info.mode & 0o7777, info.uid, info.gid, mtime_ns

    def _xattrs(self, layer: _Layer, info: tarfile.TarInfo) -> dict[str, bytes] | None:
        out: dict[str, bytes] = {}
        for key, value in info.pax_headers.items():
            if not key.startswith(XATTR_PAX_PREFIX):
                continue
            xname = key[len(XATTR_PAX_PREFIX):]
            try:
                xname.encode("utf-8")
            except UnicodeEncodeError:
                raise layer.refuse(info.name, f"xattr name {xname!r} is not UTF-8") from None
            if not xname or "\0" in xname:
                raise layer.refuse(info.name, f"invalid xattr name {xname!r}")
            if xname.startswith(SKIP_XATTR_PREFIXES):
                continue
            out[xname] = value.encode(TAR_ENCODING, TAR_ERRORS)
        return out or None

    # ----------------------------------------------------------------- applying a layer
    def _apply(self, layer: _Layer) -> None:
        # 1. deletions from lower layers, before anything this layer adds
        for path in layer.whiteouts:
            if path in self._entries:
                self._remove(path)
        for path in layer.opaque:
            if (e := self._entries.get(path)) is not None and e.kind == "dir":
                for child in list(self._children[path]):
                    self._remove(child)
        # 2. entries, parents before children
        touched: set[bytes] = set()
        for path in sorted(layer.entries, key=sort_key):
            m = layer.entries[path]
            self._insert(layer, m.name, m.entry, touched)
        # 3. hard links, in member order: their targets are all in place now
        for path, m in layer.links.items():
            assert m.link_target is not None
            target = self._entries.get(m.link_target)
            if target is None:  # a whiteout of this layer removed it
                raise layer.refuse(m.name, "hard link to "
                                   f"{m.link_target.decode(errors='replace')!r}, which is not "
                                   "in the image before it")
            if target.kind == "dir":
                raise layer.refuse(m.name, "hard link to a directory")
            self._insert(layer, m.name, target._replace(path=path), touched)
            if m.link_target not in self._entries:
                continue  # the link replaced a directory holding its target: one inode left
            group = self._group_of.get(m.link_target)
            if group is None:
                group = self._next_group
                self._next_group += 1
                self._group_of[m.link_target] = group
                self._groups[group] = {m.link_target}
            self._group_of[path] = group
            self._groups[group].add(path)

    def _insert(self, layer: _Layer, name: str, entry: Entry, touched: set[bytes]) -> None:
        path = entry.path
        if path != b"/":
            self._ensure_parents(layer, name, path)
        old = self._entries.get(path)
        if old is not None:
            if old.kind == "dir" and entry.kind == "dir":
                self._entries[path] = entry  # metadata only: the children merge
                touched.add(path)
                return
            if old.kind == "dir" and self._has_touched(path, touched):
                raise layer.refuse(name, f"a {entry.kind} replaces a directory that the same "
                                         "layer puts entries in")
            self._remove(path)
        self._entries[path] = entry
        self._children[_parent(path)].add(path)
        if entry.kind == "dir":
            self._children[path] = set()
        touched.add(path)

    def _ensure_parents(self, layer: _Layer, name: str, path: bytes) -> None:
        for anc in _ancestors(path):
            e = self._entries.get(anc)
            if e is None:
                self._entries[anc] = Entry(anc, "dir", IMPLICIT_DIR_MODE)
                self._children[_parent(anc)].add(anc)
                self._children[anc] = set()
            elif e.kind == "symlink":
                raise layer.refuse(name, f"path goes through symlink "
                                         f"{anc.decode(errors='replace')!r} -> "
                                         f"{(e.target or b'').decode(errors='replace')!r}")
            elif e.kind != "dir":
                raise layer.refuse(name, f"parent {anc.decode(errors='replace')!r} is a "
                                         f"{e.kind}, not a directory")

    def _has_touched(self, path: bytes, touched: set[bytes]) -> bool:
        stack = list(self._children.get(path, ()))
        while stack:
            p = stack.pop()
            if p in touched:
                return True
            stack.extend(self._children.get(p, ()))
        return False

    def _remove(self, path: bytes) -> None:
        """Remove ``path`` and its subtree (the root is never removed, only emptied)."""
        stack = [path]
        while stack:
            p = stack.pop()
            stack.extend(self._children.pop(p, ()))
            if p == b"/":
                self._children[b"/"] = set()
                continue
            del self._entries[p]
            group = self._group_of.pop(p, None)
            if group is not None:
                members = self._groups[group]
                members.discard(p)
                if not members:
                    del self._groups[group]
        if path != b"/":
            self._children[_parent(path)].discard(path)

    # ----------------------------------------------------------------- result
    def build(self, config: dict[str, Any] | None = None) -> Index:
        """The index of the tree. Hard-link groups are numbered 0, 1, ... in path order
        (as the directory importer does), so equal trees give equal image ids."""
        order: dict[int, int] = {}
        out = []
        for path in sorted(self._entries, key=sort_key):
            e = self._entries[path]
            group = self._group_of.get(path)
            link = None
            if group is not None and len(self._groups[group]) > 1:
                link = order.setdefault(group, len(order))
            out.append(e._replace(link=link))
        return Index(out, config or {})

    def __len__(self) -> int:
        return len(self._entries)


def _mtime_ns(info: tarfile.TarInfo) -> int:
    """mtime in ns. A pax ``mtime`` record may be fractional ("1700000000.123456789");
    tarfile turns it into a float, which loses the last digits, so parse the text."""
    raw = info.pax_headers.get("mtime")
    if raw is not None:
        try:
            d = Decimal(raw)
        except InvalidOperation:
            d = None
        if d is not None and d.is_finite():
            return int((d * NS_PER_S).to_integral_value(rounding=ROUND_FLOOR))
    return int(info.mtime) * NS_PER_S


# --------------------------------------------------------------------------- rootfs tarballs
def import_tar(store: Store, src: str | os.PathLike[str] | BinaryIO | IO[bytes],
               names: list[str] | tuple[str, ...] = (), *, progress: Progress | None = None,
               source_label: str | None = None) -> ImageRecord:
    """Import a rootfs tarball (plain, gzip, zstd, bzip2 or xz, told apart by magic bytes)
    as a one-layer image with an empty config. ``src`` is a path or a readable binary
    stream (a pipe is fine: the archive is read once, front to back).

    The image is registered only after the whole archive was read and accepted, so a
    refused archive leaves no image record (its blobs are unreferenced; ``gc`` drops them).
    """
    checked = [images.parse_name(n) for n in names]  # a bad name fails before any work
    is_path = isinstance(src, str | os.PathLike)
    label = source_label or (f"tar:{os.fspath(cast(Any, src))}" if is_path else "tar:<stream>")
    builder = TreeBuilder()
    with contextlib.ExitStack() as stack:
        if is_path:
            try:
                raw: IO[bytes] = stack.enter_context(open(cast(Any, src), "rb"))
            except OSError as err:
                raise ImportRefused(f"{label}: cannot open: {err}") from err
        else:
            raw = cast(IO[bytes], src)
        try:
            stream = decompress(raw)
        except ARCHIVE_ERRORS as err:
            raise ImportRefused(f"{label}: unreadable archive ({err})") from err
        tf = open_tar_stream(stream, label)
        with store.batch() as batch:
            builder.apply_tar(tf, batch, progress, label)
            new_bytes = batch.new_bytes
    index = builder.build({})
    return images.register(store, index, checked, source=label, new_bytes=new_bytes)
