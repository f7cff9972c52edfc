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
import io
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from swarm.digest import hash_bytes, to_hex
from swarm.errors import BlobMissing, CorruptBlob, SwarmError
from swarm.store import Store
from swarm.store.cas import Manifest, PartsReader

log = logging.getLogger(__name__)

# Files prefetched at once (a hot set is hundreds of small files: latency-bound, not
# bandwidth-bound, so several in flight hide the round trips).
DEFAULT_PREFETCH_CONCURRENCY = 8
# Chunks of one file fetched at once when a reader waits for them.
READ_CHUNK_CONCURRENCY = 4
# Leaves at least this large are hashed and stored on a worker thread, so the event loop
# (which serves FUSE requests) never stalls on a big blob or on LMDB's writer lock.
THREAD_OFFLOAD_BYTES = 64 << 10


class BlobSource(abc.ABC):
    """A place that may hold blobs this machine lacks. Implementations need not verify
    anything: the :class:`Fetcher` checks every byte they return."""

    name: str = "source"

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
    """

    def __init__(self, store: Store, source: BlobSource, *,
                 read_chunk_concurrency: int = READ_CHUNK_CONCURRENCY) -> None:
        self.store = store
        self.source = source
        self.stats = FetchStats()
        self._read_parallel = max(1, read_chunk_concurrency)
        self._leaves: dict[bytes, asyncio.Task[None]] = {}
        self._files: dict[bytes, asyncio.Task[None]] = {}
        self._to_write: list[tuple[bytes, bytes | bytearray, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ public
    async def ensure(self, digest: bytes, *, parallel: int | None = None) -> None:
        """Make the whole content of ``digest`` local (every chunk of a chunked file).

        ``parallel`` bounds the chunks of this file fetched at once (default: the reader's
        bound). Raises BlobMissing or CorruptBlob when the source cannot provide it.
        """
        if self.store.has(digest):
            return
        par = self._read_parallel if parallel is None else max(1, parallel)
        await self._once(self._files, digest, lambda: self._bring_whole(digest, par))

    async def ensure_range(self, digest: bytes, offset: int, length: int) -> None:
        """Make local what a read of ``length`` bytes at ``offset`` needs: only the chunks
        covering the range when the file's manifest is local (it is trusted), the whole
        file otherwise (a fetched manifest is only trusted once its content hashes)."""
        man = self.store.manifest(digest)
        if man is None:
            await self.ensure(digest)
            return
        missing = set(self.store.missing(digest))
        needed = [c for _, c, _, _ in man.chunk_range(offset, length) if c in missing]
        await self._leaves_bounded(needed, self._read_parallel)

    async def prefetch(self, digests: Iterable[bytes],
                       concurrency: int = DEFAULT_PREFETCH_CONCURRENCY) -> PrefetchReport:
        """Bring every digest in, at most ``concurrency`` source fetches at a time, in the
        order given (a hot set lists what is read first first). Failures are logged and
        counted, never raised: prefetch is an optimisation, a read will try again."""
        report = PrefetchReport()
        pending = iter(digests)

        async def worker() -> None:
            for digest in pending:
                if self.store.has(digest):
                    report.present += 1
                    continue
                try:
                    await self.ensure(digest, parallel=1)
                except SwarmError as err:
                    log.warning("prefetch of %s failed: %s", to_hex(digest), err)
                    report.failed += 1
                else:
                    report.fetched += 1

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        return report

    # ------------------------------------------------------------------ internals
    async def _once(self, table: dict[bytes, asyncio.Task[None]], key: bytes,
                    start: Callable[[], Awaitable[None]]) -> None:
        """Run ``start()`` once per key at a time; later callers await the same task.
        The task is shielded: a reader that gives up does not cancel others' fetch."""
        task = table.get(key)
        if task is None:
            task = asyncio.ensure_future(start())
            table[key] = task
            task.add_done_callback(lambda t: _forget(table, key, t))
        else:
            self.stats.joined += 1
        await asyncio.shield(task)

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
                missing = self.store.missing(digest)
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
        await self._leaves_bounded(list(man.chunks), parallel)
        got, _size = await asyncio.to_thread(
            self.store.put_stream,
            io.BufferedReader(PartsReader(self.store.get(c) for c in man.chunks)))
        if got != digest:
            self.stats.corrupt += 1
            log.error("chunk manifest of %s from %s assembles to %s: rejected",
                      to_hex(digest), self.source.name, to_hex(got))
            raise CorruptBlob(to_hex(digest), to_hex(got), where=self.source.name)

    async def _leaf(self, digest: bytes) -> None:
        if self.store.has(digest):
            return
        await self._once(self._leaves, digest, lambda: self._bring_leaf(digest))

    async def _bring_leaf(self, digest: bytes) -> None:
        data = await self.source.fetch(digest)
        big = len(data) >= THREAD_OFFLOAD_BYTES
        got = await asyncio.to_thread(hash_bytes, data) if big else hash_bytes(data)
        if got != digest:
            self.stats.corrupt += 1
            log.error("blob %s from %s hashes to %s: rejected", to_hex(digest),
                      self.source.name, to_hex(got))
            raise CorruptBlob(to_hex(digest), to_hex(got), where=self.source.name)
        await self._put_verified(digest, data)
        self.stats.leaves += 1
        self.stats.bytes += len(data)

    async def _put_verified(self, digest: bytes, data: bytes | bytearray) -> None:
        """Store a leaf whose digest was just computed here (so the store need not hash
        it again), by group commit: leaves that arrive while a commit is running are
        written together by the next one, on a worker thread. One commit (and fsync) per
        leaf measured ~2 ms each and serialised a 173-file prefetch to ~400 ms, stalling
        the event loop that serves FUSE requests."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._to_write.append((digest, data, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_pending())
        await done

    async def _write_pending(self) -> None:
        while self._to_write:
            items, self._to_write = self._to_write, []
            try:
                await asyncio.to_thread(self._write_batch, [(d, b) for d, b, _ in items])
            except BaseException as err:  # every waiter hears of it; none waits forever
                for _, _, fut in items:
                    if not fut.done():
                        fut.set_exception(err if isinstance(err, Exception)
                                          else SwarmError(f"store write cancelled: {err!r}"))
                if not isinstance(err, Exception):
                    raise
                continue
            for _, _, fut in items:
                if not fut.done():
                    fut.set_result(None)

    def _write_batch(self, items: list[tuple[bytes, bytes | bytearray]]) -> None:
        with self.store.batch() as batch:
            for digest, data in items:
                batch.put_leaf(digest, data)


def _forget(table: dict[bytes, asyncio.Task[None]], key: bytes, task: asyncio.Task[None]) -> None:
    if table.get(key) is task:
        del table[key]
    if not task.cancelled():
        task.exception()  # retrieved: every waiter may have gone; it was logged or raised
