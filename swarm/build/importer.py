"""Import an image into the store: from a rootfs directory here, and from archives (tar,
OCI layout, ``docker save``) through ``swarm.build.layers`` / ``swarm.build.oci``.

A directory import is one pass over the tree: ``lstat`` every entry, read xattrs, stream
every regular file into the store once per inode (hard links share the digest), then
register the index. The walking thread reads and hashes files while a writer thread
appends them to LMDB (``ContentPipeline``), so both cores stay busy: LMDB and blake3
release the GIL while they copy, hash and commit.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import stat as statmod
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from swarm.build.progress import Progress
from swarm.digest import hash_bytes
from swarm.errors import ImportRefused, NotFound
from swarm.fs import images
from swarm.fs.images import ImageRecord
from swarm.fs.index import Entry, Index, kind_of, sort_key
from swarm.store import Store
from swarm.store.cas import Batch

log = logging.getLogger(__name__)
K = TypeVar("K")

# xattrs that describe how a tree is stored, not what it is (overlayfs bookkeeping).
SKIP_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
# Files up to this size are read whole and handed to the writer as bytes; larger ones are
# streamed chunk by chunk by the writer thread so memory stays bounded.
WHOLE_READ_MAX_BYTES = 4 << 20
# Files go to the writer in groups of up to this many files or bytes (one queue hand-over
# each). At most PIPELINE_MAX_BYTES of content read whole waits for the writer: enough to
# keep the walk going while the writer commits, and a bound on memory.
GROUP_FILES = 32
GROUP_BYTES = 1 << 20
PIPELINE_MAX_BYTES = 64 << 20


def read_xattrs(path: bytes) -> dict[str, bytes] | None:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise
    out = {}
    for name in names:
        if name.startswith(SKIP_XATTR_PREFIXES):
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as err:
            if err.errno != errno.ENODATA:  # removed between list and get
                raise
    return out or None


def walk(root: bytes) -> Iterator[tuple[bytes, os.stat_result]]:
    """(index path, lstat) of ``root`` and everything below it, parents first."""
    yield b"/", os.lstat(root)
    stack = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(root + rel if rel else root) as it:
            children = list(it)  # any order: the Index sorts
        for d in children:
            st = d.stat(follow_symlinks=False)
            path = rel + b"/" + os.fsencode(d.name)
            yield path, st
            if statmod.S_ISDIR(st.st_mode):
                stack.append(path)


def entry_from_stat(rel: bytes, full: bytes, st: os.stat_result, kind: str) -> Entry:
    """The index entry of the file at ``full`` (image path ``rel``), content not yet
    stored: type, permission bits, owner, mtime, xattrs, link target, device number."""
    e = Entry(path=rel, kind=kind, mode=statmod.S_IMODE(st.st_mode), uid=st.st_uid,
              gid=st.st_gid, mtime_ns=st.st_mtime_ns, xattrs=read_xattrs(full))
    if kind == "symlink":
        target = os.readlink(full)
        return e._replace(target=target, size=len(target))
    if kind in ("char", "block"):
        return e._replace(rdev=st.st_rdev)
    return e


def _read_small(path: bytes, size: int) -> tuple[bytes, bytes] | None:
    """(digest, content) of a file read whole, or None when it is too big to read whole."""
    if size > WHOLE_READ_MAX_BYTES:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        # one read: a short read of a regular file is its end (it may have shrunk)
        data = os.read(fd, size + 1)
        if len(data) > size:  # it grew since lstat: read on, up to the limit
            while len(data) <= WHOLE_READ_MAX_BYTES:
                more = os.read(fd, WHOLE_READ_MAX_BYTES + 1 - len(data))
                if not more:
                    break
                data += more
    finally:
        os.close(fd)
    if len(data) > WHOLE_READ_MAX_BYTES:
        return None  # grew while we read it: stream it instead
    return hash_bytes(data), data


# One group handed to the writer: (caller's key, path, (digest, content) or None to stream).
_Group = list[tuple[K, bytes, "tuple[bytes, bytes] | None"]]
_BARRIER: list[Any] = []  # queued by drain: the writer reports, then commits


class ContentPipeline(Generic[K]):
    """Store many files through ``batch`` with both cores busy.

    The calling thread walks, reads and hashes small files (``submit``); one writer thread
    owns the batch's LMDB write transaction and appends them, in groups, while the caller
    goes on (LMDB releases the GIL while it copies and commits). Files too big to read whole
    are streamed by the writer. ``on_stored(key, digest, size)`` runs on the calling thread,
    from ``submit`` and ``drain``.

    While the pipeline is open only its writer uses ``batch`` (an LMDB write transaction
    belongs to one thread): a transaction the caller had open is committed on entry. After
    ``drain`` every file is stored and reported, and the writer commits in the background;
    leaving the ``with`` block waits for that commit (and raises the writer's error, if any).
    """

    def __init__(self, batch: Batch, on_stored: Callable[[K, bytes, int], None],
                 progress: Progress | None = None) -> None:
        self.batch = batch
        self.on_stored = on_stored
        self.progress = progress
        self._group: _Group[K] = []
        self._group_bytes = 0
        self._queue: queue.SimpleQueue[tuple[_Group[K], int] | None] = queue.SimpleQueue()
        self._room = threading.Condition()  # signalled as the writer takes groups off
        self._queued_bytes = 0
        self._done: deque[tuple[K, bytes, int]] = deque()
        self._reached = threading.Event()  # the writer got to a drain's barrier
        self._error: BaseException | None = None
        self._writer: threading.Thread | None = None

    def __enter__(self) -> ContentPipeline[K]:
        return self

    def __exit__(self, *exc: object) -> None:
        ok = exc[0] is None
        try:
            if ok:
                self.drain()
        finally:
            self._stop(raise_error=ok)

    def submit(self, key: K, path: bytes, size: int) -> None:
        got = _read_small(path, size)
        self._group.append((key, path, got))
        if got is not None:
            self._group_bytes += len(got[1])
        if len(self._group) >= GROUP_FILES or self._group_bytes >= GROUP_BYTES or got is None:
            self._hand_over()
            self._deliver()

    def drain(self) -> None:
        """Store every file submitted so far and report each to ``on_stored``. The writer
        commits them in the background (see the class docstring)."""
        self._hand_over()
        if self._writer is not None:
            self._reached.clear()
            self._put(_BARRIER, 0)
            self._reached.wait()
            self._raise_if_failed()
        self._deliver()

    def _hand_over(self) -> None:
        if not self._group:
            return
        group, nbytes = self._group, self._group_bytes
        self._group, self._group_bytes = [], 0
        if self._writer is None:
            self.batch.commit()  # the writer thread opens its own transaction
            self._writer = threading.Thread(target=self._write_loop, name="swarm-store-writer",
                                            daemon=True)
            self._writer.start()
        self._put(group, nbytes)

    def _put(self, group: _Group[K], nbytes: int) -> None:
        with self._room:
            while (self._queued_bytes and self._queued_bytes + nbytes > PIPELINE_MAX_BYTES
                   and self._error is None):
                self._room.wait()
            self._raise_if_failed()
            self._queued_bytes += nbytes
        self._queue.put((group, nbytes))

    def _stop(self, *, raise_error: bool) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        if self._error is None and not raise_error:
            self._error = _Aborted()  # the caller failed: drop what is not yet committed
        self._queue.put(None)
        writer.join()
        if raise_error:
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        err = self._error
        if err is not None and not isinstance(err, _Aborted):
            self._error = _Aborted()  # raised once
            raise err

    def _deliver(self) -> None:
        done = self._done
        while done:
            key, digest, size = done.popleft()
            self.on_stored(key, digest, size)
            if self.progress is not None:
                self.progress.advance(files=1, nbytes=size)

    def _write_loop(self) -> None:
        batch = self.batch
        try:
            while (item := self._queue.get()) is not None:
                if self._error is not None:
                    raise self._error
                group, nbytes = item
                if group is _BARRIER:
                    self._reached.set()
                    batch.commit()
                    continue
                for key, path, got in group:
                    if got is None:  # too big to read whole: stream it chunk by chunk
                        digest, size = batch.put_file(path)
                    else:
                        digest, data = got
                        batch.put_digest(digest, data)
                        size = len(data)
                    self._done.append((key, digest, size))
                with self._room:
                    self._queued_bytes -= nbytes
                    self._room.notify()
            if self._error is not None:
                raise self._error  # the caller failed: what is not committed is dropped
            batch.commit()
        except BaseException as err:  # handed to the calling thread
            batch.abort()
            if self._error is None:
                self._error = err
            self._reached.set()
            with self._room:
                self._room.notify_all()


class _Aborted(Exception):
    """The pipeline was closed on an error: the writer drops what is left."""


def import_directory(
    store: Store,
    path: str | os.PathLike[str],
    names: list[str] | tuple[str, ...] = (),
    *,
    config: dict[str, Any] | None = None,
    progress: Progress | None = None,
    source_label: str | None = None,
    exclude: Callable[[bytes], bool] | None = None,
) -> ImageRecord:
    """Import the tree at ``path`` as an image; returns its record (``.id`` is the id)."""
    root = os.fsencode(os.path.abspath(path))
    if not os.path.isdir(root):
        raise NotFound(f"not a directory: {os.fsdecode(root)}")
    progress = progress or Progress()
    entries: list[Entry] = []
    inodes: dict[tuple[int, int], int] = {}  # (dev, ino) -> index in entries of first link
    links: dict[int, int] = {}  # index of first link -> group

    def stored(i: int, digest: bytes, size: int) -> None:
        entries[i] = entries[i]._replace(digest=digest, size=size)

    with store.batch() as batch, ContentPipeline(batch, stored, progress) as pipeline:
        for rel, st in walk(root):
            if exclude is not None and rel != b"/" and exclude(rel):
                continue
            kind = kind_of(st.st_mode)
            if kind is None:
                log.warning("skipping socket %s", os.fsdecode(rel))
                continue
            full = root + rel if rel != b"/" else root
            e = entry_from_stat(rel, full, st, kind)
            if kind != "dir" and st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                first = inodes.get(key)
                if first is not None:
                    links.setdefault(first, len(links))
                    entries.append(e._replace(link=first))  # fixed up below
                    continue
                inodes[key] = len(entries)
            entries.append(e)
            if kind == "file":
                pipeline.submit(len(entries) - 1, full, st.st_size)
        pipeline.drain()  # every file stored before the hard links below take digests

        # hard links: every member of a group shares the first link's digest and size
        final = []
        for i, e in enumerate(entries):
            if e.link is not None and e.kind != "dir" and i not in links:
                head = entries[e.link]
                e = e._replace(digest=head.digest, size=head.size, link=links[e.link])
            elif i in links:
                e = e._replace(link=links[i])
            final.append(e)
        # built and encoded while the writer commits the last files
        index = Index(_renumber_links(final), config)
        index.encode()
    return images.register(store, index, list(names),
                           source=source_label or f"dir:{os.fsdecode(root)}",
                           new_bytes=batch.new_bytes)


def _renumber_links(entries: list[Entry]) -> list[Entry]:
    """Hard-link groups numbered 0, 1, ... in path order, so equal trees encode equally.
    Only the linked entries are sorted here (few); ``Index`` sorts them all."""
    linked = sorted((sort_key(e.path), i, e.link) for i, e in enumerate(entries)
                    if e.link is not None)
    order: dict[int, int] = {}
    out = list(entries)
    for _, i, link in linked:
        out[i] = entries[i]._replace(link=order.setdefault(link, len(order)))
    return out


def import_source(store: Store, src: str | os.PathLike[str],
                  names: list[str] | tuple[str, ...] = (),
                  *, progress: Progress | None = None) -> ImageRecord:
    """Import from whatever ``src`` is: a directory, an OCI layout, a ``docker save`` tar
    or a rootfs tar (plain, gzip or zstd)."""
    p = Path(src)
    if not p.exists():
        raise NotFound(f"no such file or directory: {src}")
    if p.is_dir() and not (p / "oci-layout").exists():
        return import_directory(store, p, names, progress=progress)
    from swarm.build import layers, oci  # archive formats; not needed for directories

    fmt = oci.detect_format(p)
    if fmt == "dir":
        return import_directory(store, p, names, progress=progress)
    if fmt == "oci":
        return oci.import_oci_layout(store, p, list(names), progress=progress)
    if fmt == "docker-save":
        return oci.import_docker_save(store, p, list(names), progress=progress)
    if fmt == "tar":
        return layers.import_tar(store, p, list(names), progress=progress)
    raise ImportRefused(f"{src}: not a directory, tar archive, OCI layout or docker-save tar")
