"""Where blobs come from when the local store lacks them, and the fetcher that brings them in.

A mounted image reads file contents from the local store; a digest the store does not hold
comes from a :class:`BlobSource` (today :class:`StoreSource`, another store on this
machine, standing in for the peer and origin tiers that ``swarm.net`` adds later).

The :class:`Fetcher` is the only code that writes fetched bytes into the local store, and
it trusts nothing it receives:

* a leaf is hashed on arrival; bytes that do not hash to the digest asked for are logged,
  counted, never stored and never returned (:class:`~swarm.errors.CorruptBlob`);
* a chunk manifest cannot be checked on its own (its digest names the whole content), so a
  chunked file whose manifest is not yet local is fetched whole, and its manifest is only
  recorded by re-hashing the assembled content (``Store.put_stream``) and comparing;
  a manifest already in the local store was verified when it was written, so reads of a
  file whose manifest is local fetch only the chunks the read needs;
* there is one fetch per missing digest: concurrent readers await the same task.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from swarm.digest import hash_bytes, to_hex
from swarm.errors import BlobMissing, CorruptBlob, SwarmError
from swarm.store import Store
from swarm.store.cas import Manifest

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Files prefetched at once (a hot set is hundreds of small files: latency-bound, not
# bandwidth-bound, so several in flight hide the round trips).
DEFAULT_PREFETCH_CONCURRENCY = 8
# Chunks of one file fetched at once when a reader waits for them.
READ_CHUNK_CONCURRENCY = 4
# Leaves at least this large are hashed and stored on a worker thread, so the event loop
# (which serves FUSE requests) never stalls on a big blob or on LMDB's writer lock.
THREAD_OFFLOAD_BYTES = 64 << 10
# Write-behind of fetched blobs that only readers wait for: stored once no fetch has
# arrived for this long (or once this much waits in memory), so a starting container's
# reads never share the disk with LMDB commits and fsyncs. On the numpy cold start the
# commits, done at once, made it 780 ms instead of 610 ms. Callers of ``ensure`` (and
# ``aclose``) get their commit without delay.
WRITE_BEHIND_S = 0.25
WRITE_BEHIND_MAX_BYTES = 256 << 20


class BlobSource(abc.ABC):
    """A place that may hold blobs this machine lacks. Implementations need not verify
    anything: the :class:`Fetcher` checks every byte they return, unless the source says
    it hashed every leaf against its digest before returning it (``verifies_leaves``:
    the peer source does, to know which peer lied)."""

    name: str = "source"
    verifies_leaves: bool = False

    @abc.abstractmethod
    async def fetch(self, digest: bytes) -> bytes | bytearray:
        """The bytes of the leaf ``digest`` (a blob of at most one chunk).

        Raises :class:`~swarm.errors.BlobMissing` when the source does not hold it.
        """

    @abc.abstractmethod
    async def fetch_manifest(self, digest: bytes) -> Manifest | None:
        """The chunk manifest of ``digest`` when the source holds it as a chunked file;
        None when it holds it as a leaf. Raises :class:`~swarm.errors.BlobMissing` when
        it holds neither."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most sources hold nothing
        """Release what the source holds open (connections, stores)."""


class StoreSource(BlobSource):
    """Another :class:`~swarm.store.Store` on this machine.

    Reads run on a worker thread, as a network source's would be awaited, so concurrent
    readers really overlap (and the dedup of fetches is exercised). ``fetches`` counts the
    leaves served, for tests and benchmarks.
    """

    def __init__(self, store: Store, *, name: str | None = None, owns_store: bool = False):
        self.store = store
        self.name = name or f"store:{store.path}"
        self.fetches = 0
        self.fetched_bytes = 0
        self._owns_store = owns_store

    async def fetch(self, digest: bytes) -> bytes:
        data = await asyncio.to_thread(self.store.get, digest)
        self.fetches += 1
        self.fetched_bytes += len(data)
        return data

    async def fetch_manifest(self, digest: bytes) -> Manifest | None:
        return await asyncio.to_thread(self._manifest, digest)

    def _manifest(self, digest: bytes) -> Manifest | None:
        man = self.store.manifest(digest)
        if man is None and not self.store.has(digest):
            raise BlobMissing(to_hex(digest), self.name)
        return man

    async def aclose(self) -> None:
        if self._owns_store:
            self.store.close()


@dataclass
class FetchStats:
    """What a fetcher has done since it started."""

    leaves: int = 0  # leaves fetched, verified and stored
    bytes: int = 0
    files: int = 0  # whole files (leaf or chunked) brought in by ensure()
    corrupt: int = 0  # leaves or manifests rejected because they did not hash right
    failed: int = 0  # fetches that raised (missing at the source, corrupt, store errors)
    joined: int = 0  # requests that waited on a fetch already in flight
    source_us: int = 0  # summed over leaves: waiting for the source
    store_us: int = 0  # summed over leaves: hashing and waiting for the commit

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class PrefetchReport:
    fetched: int = 0  # digests brought in
    present: int = 0  # digests already local
    failed: int = 0


class Fetcher:
    """Brings missing blobs from a :class:`BlobSource` into the local store, verified.

    All methods are coroutines for the event loop that owns the fetcher; the in-flight
    tables are loop-local, so one fetcher serves one loop.

    Two ways in: :meth:`ensure` returns once the content is committed to the local store
    (prefetch, hot trees, index blobs: callers that read the store afterwards), and
    :meth:`read` returns the bytes a read needs as soon as they are fetched and verified.
    Verified bytes are kept in memory (:meth:`peek`) until the group commit that stores
    them is done, so a reader never waits for LMDB's commit and fsync: measured on the
    numpy cold start, those were ~1.3 ms of each of 177 fetches, all on the critical path.
    Call :meth:`aclose` before closing the store: it waits for writes still in flight.
    """

    def __init__(self, store: Store, source: BlobSource, *,
                 read_chunk_concurrency: int = READ_CHUNK_CONCURRENCY,
                 write_behind_s: float = WRITE_BEHIND_S,
                 write_behind_max_bytes: int = WRITE_BEHIND_MAX_BYTES) -> None:
        self.store = store
        self.source = source
        self.stats = FetchStats()
        self._read_parallel = max(1, read_chunk_concurrency)
        self._leaves: dict[bytes, asyncio.Task[bytes]] = {}
        self._files: dict[bytes, asyncio.Task[None]] = {}
        # verified content (a leaf, or a whole file) whose store write is not committed
        # yet, and the future of that commit; both entries go when the commit is done
        self._fresh: dict[bytes, bytes] = {}
        self._stored: dict[bytes, asyncio.Future[None]] = {}
        self._to_write: list[tuple[bytes, bytes, bool, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.write_behind_s = write_behind_s
        self.write_behind_max_bytes = write_behind_max_bytes
        self._flush_now = asyncio.Event()
        self._last_queued = 0.0
        self._unwritten_bytes = 0

    # ------------------------------------------------------------------ public
    async def ensure(self, digest: bytes, *, parallel: int | None = None) -> None:
        """Make the whole content of ``digest`` local (every chunk of a chunked file),
        committed to the store.

        ``parallel`` bounds the chunks of this file fetched at once (default: the reader's
        bound). Raises BlobMissing or CorruptBlob when the source cannot provide it.
        """
        if digest not in self._fresh and self.store.has(digest):
            return
        if digest not in self._fresh:
            par = self._read_parallel if parallel is None else max(1, parallel)
            await self._once(self._files, digest, lambda: self._bring_whole(digest, par))
        await self._committed(digest)

    async def ensure_range(self, digest: bytes, offset: int, length: int) -> None:
        """Make local (committed) what a read of ``length`` bytes at ``offset`` needs:
        only the chunks covering the range when the file's manifest is local (it is
        trusted), the whole file otherwise (a fetched manifest is only trusted once its
        content hashes)."""
        man = self.store.manifest(digest)
        if man is None:
            await self.ensure(digest)
            return
        missing = set(self.store.missing(digest))
        needed = [c for _, c, _, _ in man.chunk_range(offset, length)
                  if c in missing and c not in self._fresh]
        await self._leaves_bounded(needed, self._read_parallel)
        await asyncio.gather(*(self._committed(c) for c in needed))

    def peek(self, digest: bytes, offset: int, length: int) -> bytes | None:
        """The bytes of a read from content fetched but not yet committed; None when it
        is not here (then it is in the store, or not fetched)."""
        data = self._fresh.get(digest)
        return None if data is None else data[offset:offset + length]

    async def read(self, digest: bytes, offset: int, length: int, *,
                   size: int | None = None) -> bytes:
        """``length`` bytes of ``digest`` from ``offset`` (short at the end), fetching what
        the local store lacks; returns as soon as the bytes are verified, before they are
        committed. ``size`` (the file's size, from the index) lets a file that fits in
        one chunk be fetched in one request, without asking the source for a manifest."""
        for _ in range(3):  # a commit may land between the checks below: look again
            data = self.peek(digest, offset, length)
            if data is not None:
                return data
            man = self.store.manifest(digest)
            if man is not None:  # trusted (verified when it was stored): fetch by chunk
                return await self._read_chunks(man, offset, length)
            with contextlib.suppress(BlobMissing):
                return self.store.read(digest, offset, length)
            if size is not None and size <= self.store.chunk_size:
                try:
                    whole = await self._leaf(digest)
                except BlobMissing:  # the source holds it only chunked: the long way
                    pass
                else:
                    self.stats.files += 1
                    if whole is not None:
                        return whole[offset:offset + length]
                    continue
            await self._once(self._files, digest,
                             lambda: self._bring_whole(digest, self._read_parallel))
        return self.store.read(digest, offset, length)  # raises BlobMissing, or returns

    async def prefetch(self, digests: Iterable[bytes],
                       concurrency: int = DEFAULT_PREFETCH_CONCURRENCY, *,
                       durable: bool = True) -> PrefetchReport:
        """Bring every digest in, at most ``concurrency`` source fetches at a time, in the
        order given (a hot set lists what is read first first). Failures are logged and
        counted, never raised: prefetch is an optimisation, a read will try again.
        ``durable=False``: do not wait for the commits (readers of this fetcher find the
        bytes in memory meanwhile; the store gets them behind, as for reads)."""
        report = PrefetchReport()
        pending = iter(digests)

        async def worker() -> None:
            for digest in pending:
                if digest not in self._fresh and self.store.has(digest):
                    report.present += 1
                    continue
                try:
                    if durable:
                        await self.ensure(digest, parallel=1)
                    else:
                        await self._once(self._files, digest,
                                         functools.partial(self._bring_whole, digest, 1))
                except SwarmError as err:
                    log.warning("prefetch of %s failed: %s", to_hex(digest), err)
                    report.failed += 1
                else:
                    report.fetched += 1

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        return report

    async def flush(self) -> None:
        """Commit what is held for writing now, and wait for it (errors were logged, or
        raised to the callers that waited for those commits)."""
        while self._writer is not None and not self._writer.done():
            self._flush_now.set()
            with contextlib.suppress(Exception):
                await asyncio.shield(self._writer)

    async def aclose(self) -> None:
        """Wait for the writes in flight; call it before the store is closed."""
        await self.flush()

    # ------------------------------------------------------------------ internals
    async def _once(self, table: dict[bytes, asyncio.Task[_T]], key: bytes,
                    start: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``start()`` once per key at a time; later callers await the same task.
        The task is shielded: a reader that gives up does not cancel others' fetch."""
        task = table.get(key)
        if task is None:
            task = asyncio.ensure_future(start())
            table[key] = task
            task.add_done_callback(lambda t: _forget(table, key, t))
        else:
            self.stats.joined += 1
        return await asyncio.shield(task)

    async def _read_chunks(self, man: Manifest, offset: int, length: int) -> bytes:
        """A range of a file whose (trusted) manifest is local: its chunks from memory,
        the store, or the source (several at once)."""
        ranges = list(man.chunk_range(offset, length))
        got: dict[bytes, bytes] = {}
        missing = [c for _, c, _, _ in ranges if c not in self._fresh]
        missing = [c for c in missing if self.store.missing(c)]
        if missing:
            sem = asyncio.Semaphore(self._read_parallel)

            async def one(c: bytes) -> None:
                async with sem:
                    data = await self._leaf(c)
                if data is not None:
                    got[c] = data

            await asyncio.gather(*(one(c) for c in dict.fromkeys(missing)))
        parts = []
        for _, c, start, stop in ranges:
            data = got.get(c)
            if data is None:
                data = self._fresh.get(c)
            if data is not None:
                parts.append(data[start:stop])
            else:
                parts.append(self.store.read(c, start, stop - start))
        return b"".join(parts)

    async def _leaves_bounded(self, digests: list[bytes], limit: int) -> None:
        """Fetch these leaves, at most ``limit`` at a time (in order when ``limit`` is 1)."""
        if len(digests) <= 1 or limit <= 1:
            for d in digests:
                await self._leaf(d)
            return
        sem = asyncio.Semaphore(limit)

        async def one(d: bytes) -> None:
            async with sem:
                await self._leaf(d)

        await asyncio.gather(*(one(d) for d in digests))

    async def _bring_whole(self, digest: bytes, parallel: int) -> None:
        try:
            local = self.store.manifest(digest)
            if local is not None:
                missing = [c for c in self.store.missing(digest) if c not in self._fresh]
                await self._leaves_bounded(missing, parallel)
            else:
                man = await self.source.fetch_manifest(digest)
                if man is None:
                    await self._leaf(digest)
                else:
                    await self._bring_chunked(digest, man, parallel)
        except SwarmError:
            self.stats.failed += 1
            raise
        self.stats.files += 1

    async def _bring_chunked(self, digest: bytes, man: Manifest, parallel: int) -> None:
        """A chunked file whose manifest came from the source: its chunks are verified one
        by one, but only the whole content proves the manifest, so it is hashed before
        anything is kept under ``digest``."""
        await self._leaves_bounded(list(man.chunks), parallel)
        whole = b"".join(self._fresh[c] if c in self._fresh else self.store.get(c)
                         for c in man.chunks)
        got = await asyncio.to_thread(hash_bytes, whole)
        if got != digest:
            self.stats.corrupt += 1
            log.error("chunk manifest of %s from %s assembles to %s: rejected",
                      to_hex(digest), self.source.name, to_hex(got))
            raise CorruptBlob(to_hex(digest), to_hex(got), where=self.source.name)
        self._queue_write(digest, whole, leaf=False)

    async def _leaf(self, digest: bytes) -> bytes | None:
        """A leaf's verified bytes; None when it is already committed to the store."""
        data = self._fresh.get(digest)
        if data is not None:
            return data
        if self.store.has(digest):
            return None
        return await self._once(self._leaves, digest, lambda: self._bring_leaf(digest))

    async def _bring_leaf(self, digest: bytes) -> bytes:
        t0 = time.perf_counter_ns()
        got_data = await self.source.fetch(digest)
        t1 = time.perf_counter_ns()
        data = got_data if isinstance(got_data, bytes) else bytes(got_data)
        if self.source.verifies_leaves:
            got = digest  # hashed by the source already (a second hash: ~1 ms per 4 MiB)
        else:
            big = len(data) >= THREAD_OFFLOAD_BYTES
            got = await asyncio.to_thread(hash_bytes, data) if big else hash_bytes(data)
        if got != digest:
            self.stats.corrupt += 1
            log.error("blob %s from %s hashes to %s: rejected", to_hex(digest),
                      self.source.name, to_hex(got))
            raise CorruptBlob(to_hex(digest), to_hex(got), where=self.source.name)
        self._queue_write(digest, data, leaf=True)
        self.stats.source_us += (t1 - t0) // 1000
        self.stats.store_us += (time.perf_counter_ns() - t1) // 1000
        self.stats.leaves += 1
        self.stats.bytes += len(data)
        return data

    async def _committed(self, digest: bytes) -> None:
        """Wait for the commit of ``digest`` (and of its chunks) if one is pending."""
        pending = [self._stored[digest]] if digest in self._stored else []
        man = self.store.manifest(digest) if digest not in self._fresh else None
        if man is not None:
            pending += [self._stored[c] for c in man.chunks if c in self._stored]
        if pending:
            self._flush_now.set()  # someone waits: no write-behind delay
        for fut in pending:
            await asyncio.shield(fut)

    def _queue_write(self, digest: bytes, data: bytes, *, leaf: bool) -> None:
        """Store verified content by group commit: what arrives while a commit is running
        is written together by the next one, on a worker thread (one commit, and fsync,
        per blob measured ~2 ms each and stalled the loop that serves FUSE requests).
        Until its commit is done the content is served from memory. ``leaf``: store the
        bytes as one leaf whatever their size (a chunk named by a manifest); otherwise
        content longer than the store's chunk size is chunked."""
        if digest in self._stored:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fut.add_done_callback(_retrieve)
        self._fresh[digest] = data
        self._stored[digest] = fut
        self._to_write.append((digest, data, leaf, fut))
        self._last_queued = loop.time()
        self._unwritten_bytes += len(data)
        if self._unwritten_bytes >= self.write_behind_max_bytes:
            self._flush_now.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_pending())

    async def _write_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while self._to_write:
            # write-behind: while fetches keep coming (a container starting), wait for a
            # pause, unless a caller waits for the commit or too much is held in memory
            while not self._flush_now.is_set():
                idle_s = loop.time() - self._last_queued
                if idle_s >= self.write_behind_s:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._flush_now.wait(), self.write_behind_s - idle_s)
            self._flush_now.clear()
            items, self._to_write = self._to_write, []
            self._unwritten_bytes -= sum(len(b) for _, b, _, _ in items)
            error: BaseException | None = None
            try:
                await asyncio.to_thread(self._write_batch, [(d, b, leaf)
                                                            for d, b, leaf, _ in items])
            except BaseException as err:  # every waiter hears of it; none waits forever
                error = err
                log.error("storing %d fetched blobs failed: %s", len(items), err)
            for digest, _, _, fut in items:
                if self._stored.get(digest) is fut:
                    del self._stored[digest]
                    self._fresh.pop(digest, None)
                if not fut.done():
                    if error is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(error if isinstance(error, Exception) else
                                          SwarmError(f"store write cancelled: {error!r}"))
            if error is not None and not isinstance(error, Exception):
                raise error

    def _write_batch(self, items: list[tuple[bytes, bytes, bool]]) -> None:
        with self.store.batch() as batch:
            for digest, data, leaf in items:
                if leaf or len(data) <= self.store.chunk_size:
                    batch.put_leaf(digest, data)
                else:
                    batch.put_digest(digest, data)


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: its waiters may all have gone


def _forget(table: dict[bytes, asyncio.Task[_T]], key: bytes, task: asyncio.Task[_T]) -> None:
    if table.get(key) is task:
        del table[key]
    if not task.cancelled():
        task.exception()  # retrieved: every waiter may have gone; it was logged or raised
