"""The content-addressed store. The layout of every sub-database is documented in
``swarm/store/__init__.py``; this module is the only code that reads or writes them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import lmdb

from swarm.digest import DIGEST_SIZE, hash_bytes, hasher, to_hex
from swarm.errors import BlobMissing, CorruptBlob, StoreError

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4 << 20
MIN_CHUNK_SIZE = 64
# Virtual address space reserved for the map; LMDB grows the file only as data is written.
DEFAULT_MAP_SIZE_BYTES = 1 << 40
# A batch writer commits after this many bytes or this long, so it never holds LMDB's single
# writer lock for long (the FUSE daemon and other writers wait on it).
BATCH_COMMIT_BYTES = 64 << 20
BATCH_COMMIT_S = 0.25
# Buffered last-use times and hit counters are written at least this often.
TOUCH_FLUSH_S = 1.0
TOUCH_FLUSH_COUNT = 4096
# Eviction frees down to this fraction of the budget, so it does not run on every put.
EVICT_LOW_WATERMARK = 0.9
FORMAT = b"1"

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_USE = struct.Struct(">QQ")
_MANIFEST_HEAD = struct.Struct(">QI")
_DBS = ("blobs", "files", "use", "lru", "pins", "images", "names", "hotsets", "counters",
        "config")


@dataclass(frozen=True)
class Manifest:
    """The chunk list of a file longer than one chunk."""

    size: int
    chunk_size: int
    chunks: tuple[bytes, ...]

    def encode(self) -> bytes:
        return _MANIFEST_HEAD.pack(self.size, self.chunk_size) + b"".join(self.chunks)

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> Manifest:
        raw = bytes(raw)
        size, chunk_size = _MANIFEST_HEAD.unpack_from(raw)
        body = raw[_MANIFEST_HEAD.size:]
        if len(body) % DIGEST_SIZE or chunk_size <= 0:
            raise ValueError("malformed chunk manifest")
        chunks = tuple(body[i:i + DIGEST_SIZE] for i in range(0, len(body), DIGEST_SIZE))
        if (len(chunks) - 1) * chunk_size >= size or len(chunks) * chunk_size < size:
            raise ValueError("chunk manifest sizes disagree")
        return cls(size, chunk_size, chunks)

    def chunk_range(self, offset: int, length: int) -> Iterator[tuple[int, bytes, int, int]]:
        """(index, chunk digest, start within chunk, end within chunk) covering a byte range."""
        end = min(self.size, offset + length)
        i = offset // self.chunk_size
        while offset < end:
            base = i * self.chunk_size
            stop = min(end, base + self.chunk_size)
            yield i, self.chunks[i], offset - base, stop - base
            offset = stop
            i += 1


@dataclass
class StoreStats:
    bytes: int
    blobs: int
    files: int
    budget_bytes: int | None
    hits: int
    misses: int
    puts: int
    dedup: int
    evicted: int
    images: int
    disk_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    checked: int = 0
    corrupt: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # manifests whose chunks are missing
    removed: int = 0

    @property
    def clean(self) -> bool:
        return not self.corrupt and not self.incomplete


class _EnvRegistry:
    """LMDB forbids opening one environment twice in a process: share one per path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._envs: dict[str, tuple[lmdb.Environment, int]] = {}
        self._dbs: dict[str, dict[str, Any]] = {}

    def acquire(self, path: str, map_size: int) -> tuple[lmdb.Environment, dict[str, Any]]:
        """The environment of ``path`` and its sub-database handles. The handles are
        opened once per environment: ``open_db`` begins a write transaction without
        releasing the GIL, so a Store made while another thread of this process held a
        write transaction (it needs the GIL to finish) deadlocked both."""
        with self._lock:
            env, refs = self._envs.get(path, (None, 0))
            if env is None:
                try:
                    # readahead stays on: a cold FUSE read of a multi-MB blob otherwise
                    # faults the map in one 4 KiB page at a time (measured: cold numpy
                    # start 1.65 s -> 1.15 s with readahead)
                    env = lmdb.open(path, max_dbs=len(_DBS) + 2, map_size=map_size,
                                    max_readers=1024, readahead=True, subdir=True,
                                    sync=True, metasync=False)
                except lmdb.Error as err:
                    raise StoreError(f"cannot open store {path}: {err}") from err
                try:
                    env.reader_check()  # drop reader slots of processes that died
                    self._dbs[path] = {name: env.open_db(name.encode()) for name in _DBS}
                except lmdb.Error as err:
                    env.close()
                    raise StoreError(f"cannot open store {path}: {err}") from err
            self._envs[path] = (env, refs + 1)
            return env, self._dbs[path]

    def release(self, path: str) -> None:
        with self._lock:
            env, refs = self._envs[path]
            if refs <= 1:
                del self._envs[path]
                del self._dbs[path]
                env.close()
            else:
                self._envs[path] = (env, refs - 1)


_REGISTRY = _EnvRegistry()


def _pid_alive(pid: int) -> bool:
    if pid == 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """An LMDB content-addressed store of blobs named by BLAKE3 digest.

    Leaves (blobs of at most one chunk) live in ``blobs``; longer content is chunked, and its
    manifest lives in ``files`` under the digest of the whole content. ``get``/``read`` work
    the same for both. Safe for several threads and several processes at once.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        chunk_size: int | None = None,
        budget_bytes: int | None = None,
        verify_on_read: bool = False,
        map_size: int = DEFAULT_MAP_SIZE_BYTES,
    ) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create store directory {self.path}: {err}") from err
        if chunk_size is None:
            chunk_size = int(os.environ.get("SWARM_CHUNK_SIZE", DEFAULT_CHUNK_SIZE))
        if chunk_size < MIN_CHUNK_SIZE:
            raise StoreError(f"chunk size {chunk_size} is below the minimum {MIN_CHUNK_SIZE}")
        self.chunk_size = chunk_size
        self.budget_bytes = budget_bytes
        self.verify_on_read = verify_on_read
        self._key = os.path.realpath(self.path)
        self.env, self.db = _REGISTRY.acquire(self._key, map_size)
        self._closed = False
        with self.env.begin(write=True) as txn:
            fmt = txn.get(b"format", db=self.db["config"])
            if fmt is None:
                txn.put(b"format", FORMAT, db=self.db["config"])
            elif fmt != FORMAT:
                raise StoreError(
                    f"store {self.path} has format {fmt!r}, this swarm reads {FORMAT!r}")
        self._buf_lock = threading.Lock()
        self._touched: dict[bytes, int] = {}
        self._counts: dict[bytes, int] = {}
        self._last_flush = time.monotonic()
        self._verified: set[bytes] = set()
        self._flusher_busy = False
        self._flush_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        with self._flush_lock:  # a background flush finishes before the env goes
            if self._closed:
                return
            with contextlib.suppress(lmdb.Error):
                self._flush_locked()
            self._closed = True
        _REGISTRY.release(self._key)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing
    def put(self, data: bytes | bytearray | memoryview) -> bytes:
        """Store ``data``; return its digest. Content longer than a chunk is chunked."""
        with self.batch() as batch:
            return batch.put(data)

    def put_stream(self, stream: IO[bytes], size_hint: int | None = None) -> tuple[bytes, int]:
        """Store everything read from ``stream`` one chunk at a time; return (digest, size)."""
        with self.batch() as batch:
            return batch.put_stream(stream)

    def put_file(self, path: str | bytes | os.PathLike[str]) -> tuple[bytes, int]:
        with self.batch() as batch:
            return batch.put_file(path)

    @contextlib.contextmanager
    def batch(self) -> Iterator[Batch]:
        """A writer that groups many puts into few commits (see ``BATCH_COMMIT_BYTES``).

        Everything put is committed when the block exits normally; on an exception, what
        was committed stays (blobs are valid on their own) and the rest is dropped.
        """
        batch = Batch(self)
        try:
            yield batch
            batch.commit()
        except BaseException:
            batch.abort()
            raise
        self._evict_if_over_budget()

    # ------------------------------------------------------------------ reading
    def has(self, digest: bytes) -> bool:
        """True if the whole content of ``digest`` is held (every chunk, for a chunked file)."""
        with self.env.begin(buffers=True) as txn:
            if txn.get(digest, db=self.db["blobs"]) is not None:
                return True
            raw = txn.get(digest, db=self.db["files"])
            if raw is None:
                return False
            man = Manifest.decode(raw)
            return all(txn.get(c, db=self.db["blobs"]) is not None for c in man.chunks)

    def missing(self, digest: bytes) -> list[bytes]:
        """The leaves that must be fetched to hold ``digest`` (itself, if it is unknown)."""
        with self.env.begin(buffers=True) as txn:
            if txn.get(digest, db=self.db["blobs"]) is not None:
                return []
            raw = txn.get(digest, db=self.db["files"])
            if raw is None:
                return [digest]
            man = Manifest.decode(raw)
            return [c for c in man.chunks if txn.get(c, db=self.db["blobs"]) is None]

    def manifest(self, digest: bytes) -> Manifest | None:
        with self.env.begin(buffers=True) as txn:
            raw = txn.get(digest, db=self.db["files"])
            return None if raw is None else Manifest.decode(raw)

    def size(self, digest: bytes) -> int:
        with self.env.begin(buffers=True) as txn:
            leaf = txn.get(digest, db=self.db["blobs"])
            if leaf is not None:
                return len(leaf)
            raw = txn.get(digest, db=self.db["files"])
            if raw is None:
                raise BlobMissing(to_hex(digest))
            return int(_MANIFEST_HEAD.unpack_from(bytes(raw[:_MANIFEST_HEAD.size]))[0])

    def get(self, digest: bytes) -> bytes:
        """The whole content of ``digest`` as bytes (joins chunks; fine for small files)."""
        with self.env.begin(buffers=True) as txn:
            leaf = txn.get(digest, db=self.db["blobs"])
            if leaf is not None:
                data = bytes(leaf)
                self._check(digest, data)
                self._touch(digest, hit=True)
                parts = None
            else:
                raw = txn.get(digest, db=self.db["files"])
                if raw is None:
                    self._count(b"misses")
                    raise BlobMissing(to_hex(digest))
                man = Manifest.decode(raw)
                parts = [bytes(self._leaf_in(txn, c)) for c in man.chunks]
        if parts is not None:
            data = b"".join(parts)
            if self.verify_on_read and digest not in self._verified:
                self._check_whole(digest, data)
            self._touch(digest, hit=True)
        self._maybe_flush()
        return data

    @contextlib.contextmanager
    def view(self, digest: bytes) -> Iterator[memoryview]:
        """A zero-copy view of a leaf blob, valid only inside the ``with`` block.

        Chunked files are not contiguous in the map: use ``read`` or ``open`` for those.
        """
        with self.env.begin(buffers=True) as txn:
            leaf = txn.get(digest, db=self.db["blobs"])
            if leaf is None:
                self._count(b"misses")
                if txn.get(digest, db=self.db["files"]) is not None:
                    raise StoreError(f"blob {to_hex(digest)} is chunked: no single view")
                raise BlobMissing(to_hex(digest))
            self._check(digest, leaf)
            self._touch(digest, hit=True)
            yield leaf
        self._maybe_flush()

    def read(self, digest: bytes, offset: int, length: int) -> bytes:
        """``length`` bytes of ``digest``'s content from ``offset`` (short at the end)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        with self.env.begin(buffers=True) as txn:
            leaf = txn.get(digest, db=self.db["blobs"])
            if leaf is not None:
                self._check(digest, leaf)
                data = bytes(leaf[offset:offset + length])
            else:
                data = self._read_chunked(txn, digest, offset, length)
        self._touch(digest, hit=True)
        self._maybe_flush()
        return data

    def _read_chunked(self, txn: lmdb.Transaction, digest: bytes, offset: int,
                      length: int) -> bytes:
        raw = txn.get(digest, db=self.db["files"])
        if raw is None:
            self._count(b"misses")
            raise BlobMissing(to_hex(digest))
        out = []
        for _, chunk, start, stop in Manifest.decode(raw).chunk_range(offset, length):
            out.append(bytes(self._leaf_in(txn, chunk)[start:stop]))
        return b"".join(out)

    def iter_content(self, digest: bytes) -> Iterator[bytes]:
        """The content of ``digest`` one chunk at a time, never all in memory."""
        man = self.manifest(digest)
        if man is None:
            yield self.get(digest)
            return
        h = hasher() if self.verify_on_read else None
        for chunk in man.chunks:
            part = self.get(chunk)
            if h is not None:
                h.update(part)
            yield part
        if h is not None and h.digest() != digest:
            raise CorruptBlob(to_hex(digest), to_hex(h.digest()))

    def _leaf_in(self, txn: lmdb.Transaction, digest: bytes) -> memoryview:
        """A chunk of a chunked file, checked and its use recorded; a view valid inside
        ``txn`` (callers copy only the part they need)."""
        leaf = txn.get(digest, db=self.db["blobs"])
        if leaf is None:
            self._count(b"misses")
            raise BlobMissing(to_hex(digest))
        self._check(digest, leaf)
        self._touch(digest, hit=False)
        return memoryview(leaf)

    def _check(self, digest: bytes, data: bytes | memoryview) -> None:
        if not self.verify_on_read or digest in self._verified:
            return
        self._check_whole(digest, data)

    def _check_whole(self, digest: bytes, data: bytes | memoryview) -> None:
        got = hash_bytes(data)
        if got != digest:
            raise CorruptBlob(to_hex(digest), to_hex(got))
        if len(self._verified) > 1 << 20:
            self._verified.clear()
        self._verified.add(digest)

    # ------------------------------------------------------------------ use tracking
    def _touch(self, digest: bytes, *, hit: bool) -> None:
        """Record a use in memory; ``_maybe_flush`` writes it (never inside a transaction)."""
        now = time.time_ns()
        with self._buf_lock:
            self._touched[digest] = now
            if hit:
                self._counts[b"hits"] = self._counts.get(b"hits", 0) + 1

    def _maybe_flush(self) -> None:
        """Write buffered uses when due, on a background thread: a read (a FUSE request)
        must never wait for LMDB's writer lock, which a batch may hold for a while."""
        with self._buf_lock:
            due = (len(self._touched) >= TOUCH_FLUSH_COUNT
                   or time.monotonic() - self._last_flush >= TOUCH_FLUSH_S)
            if not due or self._flusher_busy:
                return
            self._flusher_busy = True
            self._last_flush = time.monotonic()
        threading.Thread(target=self._background_flush, name="swarm-store-flush",
                         daemon=True).start()

    def _background_flush(self) -> None:
        try:
            self.flush()
        except lmdb.Error as err:
            log.warning("store %s: cannot record blob uses: %s", self.path, err)
        finally:
            with self._buf_lock:
                self._flusher_busy = False

    def _count(self, name: bytes, n: int = 1) -> None:
        with self._buf_lock:
            self._counts[name] = self._counts.get(name, 0) + n

    def flush(self) -> None:
        """Write buffered last-use times and counters."""
        with self._flush_lock:
            if not self._closed:
                self._flush_locked()

    def _flush_locked(self) -> None:
        with self._buf_lock:
            touched, self._touched = self._touched, {}
            counts, self._counts = self._counts, {}
            self._last_flush = time.monotonic()
        if not touched and not counts:
            return
        with self.env.begin(write=True) as txn:
            for digest, now in touched.items():
                self._set_use(txn, digest, now, None)
            for name, n in counts.items():
                _add_counter(txn, self.db["counters"], name, n)

    def _set_use(self, txn: lmdb.Transaction, digest: bytes, now: int, size: int | None) -> None:
        use_db, lru_db = self.db["use"], self.db["lru"]
        old = txn.get(digest, db=use_db)
        if old is not None:
            old_ns, old_size = _USE.unpack(old)
            txn.delete(_U64.pack(old_ns) + digest, db=lru_db)
            size = old_size if size is None else size
        elif size is None:
            return  # not a leaf held here (a manifest, or since evicted)
        txn.put(digest, _USE.pack(now, size), db=use_db)
        txn.put(_U64.pack(now) + digest, b"", db=lru_db)

    # ------------------------------------------------------------------ pins
    def pin(self, digests: Iterable[bytes], *, durable: bool = False) -> None:
        """Protect digests (and the chunks of chunked files) from eviction.

        A pin belongs to this process and lapses when it exits; a durable pin lasts until
        ``unpin(durable=True)``.
        """
        self._pin(digests, +1, 0 if durable else os.getpid())

    def unpin(self, digests: Iterable[bytes], *, durable: bool = False) -> None:
        self._pin(digests, -1, 0 if durable else os.getpid())

    def _pin(self, digests: Iterable[bytes], delta: int, pid: int) -> None:
        with self.env.begin(write=True) as txn:
            self._pin_txn(txn, digests, delta, pid)

    def pin_in(self, txn: lmdb.Transaction, digests: Iterable[bytes], *, durable: bool,
               delta: int = 1) -> None:
        """``pin``/``unpin`` inside a caller's write transaction (atomic with its records)."""
        self._pin_txn(txn, digests, delta, 0 if durable else os.getpid())

    def _pin_txn(self, txn: lmdb.Transaction, digests: Iterable[bytes], delta: int,
                 pid: int) -> None:
        pins = self.db["pins"]
        for digest in digests:
            raw = txn.get(digest, db=self.db["files"])
            targets = [digest] + (list(Manifest.decode(raw).chunks) if raw else [])
            for d in targets:
                key = d + _U32.pack(pid)
                old = txn.get(key, db=pins)
                n = (_U32.unpack(old)[0] if old else 0) + delta
                if n > 0:
                    txn.put(key, _U32.pack(n), db=pins)
                elif old is not None:
                    txn.delete(key, db=pins)

    def _pinned(self, txn: lmdb.Transaction, digest: bytes) -> bool:
        cur = txn.cursor(db=self.db["pins"])
        if not cur.set_range(digest):
            return False
        for key, _ in cur:
            if key[:DIGEST_SIZE] != digest:
                return False
            if _pid_alive(_U32.unpack(key[DIGEST_SIZE:])[0]):
                return True
        return False

    def pinned(self, digest: bytes) -> bool:
        with self.env.begin() as txn:
            return self._pinned(txn, digest)

    # ------------------------------------------------------------------ eviction and removal
    def _evict_if_over_budget(self) -> None:
        if self.budget_bytes is None:
            return
        with self.env.begin() as txn:
            held = _get_counter(txn, self.db["counters"], b"bytes")
        if held > self.budget_bytes:
            self.evict(int(self.budget_bytes * EVICT_LOW_WATERMARK))

    def evict(self, target_bytes: int) -> int:
        """Drop least recently used unpinned leaves until at most ``target_bytes`` are held.
        Returns the bytes freed."""
        self.flush()
        freed = 0
        with self.env.begin(write=True) as txn:
            counters = self.db["counters"]
            held = _get_counter(txn, counters, b"bytes")
            victims = []
            cur = txn.cursor(db=self.db["lru"])
            for key, _ in cur:
                if held - freed <= target_bytes:
                    break
                digest = bytes(key[8:])
                if self._pinned(txn, digest):
                    continue
                raw = txn.get(digest, db=self.db["use"])
                size = _USE.unpack(raw)[1] if raw else 0
                victims.append((bytes(key), digest))
                freed += size
            for lru_key, digest in victims:
                txn.delete(lru_key, db=self.db["lru"])
                txn.delete(digest, db=self.db["use"])
                txn.delete(digest, db=self.db["blobs"])
            if victims:
                _add_counter(txn, counters, b"bytes", -freed)
                _add_counter(txn, counters, b"blobs", -len(victims))
                _add_counter(txn, counters, b"evicted", len(victims))
        return freed

    def drop(self, digests: Iterable[bytes]) -> int:
        """Remove the leaves of these digests from this store (pins notwithstanding: the
        caller means it). Manifests stay: they are metadata, needed to fetch the chunks
        again. Returns the number of leaves removed."""
        removed = 0
        with self.env.begin(write=True) as txn:
            freed = 0
            for digest in digests:
                raw = txn.get(digest, db=self.db["files"])
                leaves = list(Manifest.decode(raw).chunks) if raw else [digest]
                for leaf in leaves:
                    size = self._delete_leaf(txn, leaf)
                    if size is not None:
                        freed += size
                        removed += 1
            _add_counter(txn, self.db["counters"], b"bytes", -freed)
            _add_counter(txn, self.db["counters"], b"blobs", -removed)
        return removed

    def _delete_leaf(self, txn: lmdb.Transaction, digest: bytes) -> int | None:
        data = txn.get(digest, db=self.db["blobs"])
        if data is None:
            return None
        size = len(data)
        txn.delete(digest, db=self.db["blobs"])
        raw = txn.get(digest, db=self.db["use"])
        if raw is not None:
            txn.delete(_U64.pack(_USE.unpack(raw)[0]) + digest, db=self.db["lru"])
            txn.delete(digest, db=self.db["use"])
        return size

    def gc(self, live: Iterable[bytes]) -> tuple[int, int]:
        """Delete every blob and manifest not reachable from ``live`` digests (their chunks
        count as reachable) nor pinned. Returns (leaves removed, bytes freed)."""
        keep: set[bytes] = set()
        with self.env.begin(buffers=True) as txn:
            for digest in live:
                keep.add(digest)
                raw = txn.get(digest, db=self.db["files"])
                if raw is not None:
                    keep.update(Manifest.decode(raw).chunks)
            for key, _ in txn.cursor(db=self.db["pins"]):
                keep.add(bytes(key[:DIGEST_SIZE]))
        removed = freed = 0
        with self.env.begin(write=True) as txn:
            dead_files = [bytes(k) for k, _ in txn.cursor(db=self.db["files"])
                          if bytes(k) not in keep]
            for k in dead_files:
                txn.delete(k, db=self.db["files"])
            dead = [bytes(k) for k, _ in txn.cursor(db=self.db["blobs"]) if bytes(k) not in keep]
            for k in dead:
                size = self._delete_leaf(txn, k)
                if size is not None:
                    removed += 1
                    freed += size
            _add_counter(txn, self.db["counters"], b"bytes", -freed)
            _add_counter(txn, self.db["counters"], b"blobs", -removed)
        return removed, freed

    # ------------------------------------------------------------------ verify and stats
    def verify(self, *, repair: bool = False,
               progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Re-hash every leaf and check every manifest's chunks are present and hash to the
        file digest. With ``repair``, corrupt leaves are removed (to be fetched again)."""
        report = VerifyReport()
        bad: list[bytes] = []
        with self.env.begin(buffers=True) as txn:
            for key, value in txn.cursor(db=self.db["blobs"]):
                report.checked += 1
                if hash_bytes(value) != bytes(key):
                    report.corrupt.append(to_hex(bytes(key)))
                    bad.append(bytes(key))
                if progress and report.checked % 1024 == 0:
                    progress(report.checked)
            for key, value in txn.cursor(db=self.db["files"]):
                report.checked += 1
                man = Manifest.decode(value)
                h = hasher()
                complete = True
                for c in man.chunks:
                    leaf = txn.get(c, db=self.db["blobs"])
                    if leaf is None:
                        complete = False
                        break
                    h.update(leaf)
                if not complete:
                    report.incomplete.append(to_hex(bytes(key)))
                elif h.digest() != bytes(key):
                    report.corrupt.append(to_hex(bytes(key)))
        if repair and bad:
            report.removed = self.drop(bad)
        return report

    def stats(self) -> StoreStats:
        self.flush()
        with self.env.begin() as txn:
            c = self.db["counters"]

            def counter(name: bytes) -> int:
                return _get_counter(txn, c, name)

            files = txn.stat(self.db["files"])["entries"]
            images = txn.stat(self.db["images"])["entries"]
            return StoreStats(
                bytes=counter(b"bytes"), blobs=counter(b"blobs"), files=files,
                budget_bytes=self.budget_bytes, hits=counter(b"hits"),
                misses=counter(b"misses"), puts=counter(b"puts"), dedup=counter(b"dedup"),
                evicted=counter(b"evicted"), images=images,
                disk_bytes=os.path.getsize(self.path / "data.mdb"),
            )

    def leaves(self) -> Iterator[bytes]:
        with self.env.begin() as txn:
            for key in txn.cursor(db=self.db["blobs"]).iternext(values=False):
                yield bytes(key)


class Batch:
    """Puts grouped into few write transactions (see ``Store.batch``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._txn: lmdb.Transaction | None = None
        self._pending_bytes = 0
        self._opened = 0.0
        self._delta_bytes = 0
        self._delta_blobs = 0
        self._puts = 0
        self._dedup = 0
        self.new_bytes = 0  # leaf bytes this batch actually added (not already held)

    def _begin(self) -> lmdb.Transaction:
        if self._txn is None:
            self._txn = self.store.env.begin(write=True)
            self._opened = time.monotonic()
        return self._txn

    def _maybe_commit(self) -> None:
        if self._txn is not None and (
            self._pending_bytes >= BATCH_COMMIT_BYTES
            or time.monotonic() - self._opened >= BATCH_COMMIT_S
        ):
            self.commit()

    def commit(self) -> None:
        txn, self._txn = self._txn, None
        if txn is None:
            return
        counters = self.store.db["counters"]
        try:
            _add_counter(txn, counters, b"bytes", self._delta_bytes)
            _add_counter(txn, counters, b"blobs", self._delta_blobs)
            _add_counter(txn, counters, b"puts", self._puts)
            _add_counter(txn, counters, b"dedup", self._dedup)
            txn.commit()
        except lmdb.MapFullError as err:
            txn.abort()
            raise StoreError(f"store {self.store.path} is full: {err}") from err
        except lmdb.Error:
            txn.abort()
            raise
        self._pending_bytes = self._delta_bytes = self._delta_blobs = 0
        self._puts = self._dedup = 0

    def abort(self) -> None:
        txn, self._txn = self._txn, None
        if txn is not None:
            txn.abort()

    def _put_leaf(self, digest: bytes, data: bytes | bytearray | memoryview) -> None:
        txn = self._begin()
        blobs = self.store.db["blobs"]
        now = time.time_ns()
        if txn.put(digest, data, db=blobs, overwrite=False):
            # a new leaf has no use record yet (they are created and deleted together)
            txn.put(digest, _USE.pack(now, len(data)), db=self.store.db["use"])
            txn.put(_U64.pack(now) + digest, b"", db=self.store.db["lru"])
            self._delta_bytes += len(data)
            self._delta_blobs += 1
            self._pending_bytes += len(data)
            self.new_bytes += len(data)
        else:
            self._dedup += 1
            self.store._set_use(txn, digest, now, None)

    def put(self, data: bytes | bytearray | memoryview) -> bytes:
        digest = hash_bytes(data)
        self.put_digest(digest, data)
        return digest

    def put_leaf(self, digest: bytes, data: bytes | bytearray | memoryview) -> None:
        """Put one leaf as it is, whatever its size: a chunk fetched from a peer whose chunk
        size differs from ours is still that file's chunk, and re-chunking it would break
        the chunk-range reads of the file's manifest. The digest must be verified."""
        self._puts += 1
        self._put_leaf(digest, data)
        self._maybe_commit()

    def put_digest(self, digest: bytes, data: bytes | bytearray | memoryview) -> None:
        """Put ``data`` whose digest the caller has already computed (a worker thread hashed
        it). The digest is trusted: only pass one that ``swarm.digest`` just computed."""
        self._puts += 1
        cs = self.store.chunk_size
        if len(data) <= cs:
            self._put_leaf(digest, data)
        else:
            view = memoryview(data)
            chunks = []
            for off in range(0, len(view), cs):
                part = view[off:off + cs]
                c = hash_bytes(part)
                self._put_leaf(c, part)
                chunks.append(c)
            self._put_manifest(digest, Manifest(len(data), cs, tuple(chunks)))
        self._maybe_commit()

    def _put_manifest(self, digest: bytes, man: Manifest) -> None:
        txn = self._begin()
        if not txn.put(digest, man.encode(), db=self.store.db["files"], overwrite=False):
            self._dedup += 1

    def put_stream(self, stream: IO[bytes]) -> tuple[bytes, int]:
        cs = self.store.chunk_size
        first = _read_full(stream, cs)
        if len(first) < cs:
            return self.put(first), len(first)
        self._puts += 1
        whole = hasher()
        chunks: list[bytes] = []
        size = 0
        part = first
        while part:
            whole.update(part)
            c = hash_bytes(part)
            self._put_leaf(c, part)
            chunks.append(c)
            size += len(part)
            self._maybe_commit()
            part = _read_full(stream, cs)
        digest = whole.digest()
        if len(chunks) == 1:
            return digest, size  # exactly one chunk: the leaf is the file
        self._put_manifest(digest, Manifest(size, cs, tuple(chunks)))
        self._maybe_commit()
        return digest, size

    def put_file(self, path: str | bytes | os.PathLike[str]) -> tuple[bytes, int]:
        with open(path, "rb", buffering=0) as f:
            return self.put_stream(f)

    def has(self, digest: bytes) -> bool:
        """Whether the digest is held, seen from inside this batch's transaction."""
        txn = self._begin()
        return (txn.get(digest, db=self.store.db["blobs"]) is not None
                or txn.get(digest, db=self.store.db["files"]) is not None)

    @property
    def txn(self) -> lmdb.Transaction:
        """The open write transaction, for callers that add records atomically with blobs."""
        return self._begin()


class PartsReader(io.RawIOBase):
    """A read-only binary stream over an iterator of byte strings (a file's chunks, as
    ``Store.iter_content`` yields them): ``tarfile`` and ``put_stream`` read from it
    without the whole content ever being in memory."""

    def __init__(self, parts: Iterable[bytes]) -> None:
        super().__init__()
        self._parts = iter(parts)
        self._buf = bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, out: Any) -> int:
        view = memoryview(out).cast("B")
        while not self._buf:
            nxt = next(self._parts, None)
            if nxt is None:
                return 0
            self._buf += nxt
        n = min(len(view), len(self._buf))
        view[:n] = self._buf[:n]
        del self._buf[:n]
        return n


def _read_full(stream: IO[bytes], n: int) -> bytes:
    """Read exactly ``n`` bytes unless the stream ends first (pipes return short reads)."""
    data = stream.read(n)
    if not data or len(data) == n:
        return data or b""
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _get_counter(txn: lmdb.Transaction, db: Any, name: bytes) -> int:
    raw = txn.get(name, db=db)
    return _U64.unpack(raw)[0] if raw is not None else 0


def _add_counter(txn: lmdb.Transaction, db: Any, name: bytes, delta: int) -> None:
    if delta:
        txn.put(name, _U64.pack(max(0, _get_counter(txn, db, name) + delta)), db=db)
