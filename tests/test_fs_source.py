"""The fetcher: verified arrival, one fetch per digest, bounded prefetch."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import pytest

from swarm.digest import hash_bytes
from swarm.errors import BlobMissing, CorruptBlob
from swarm.fs import hotset, images
from swarm.fs.index import Entry, Index
from swarm.fs.source import BlobSource, Fetcher, StoreSource
from swarm.store import Store
from swarm.store.cas import Manifest

CHUNK = 1024


class GatedSource(BlobSource):
    """Serves blobs from a dict, holding every fetch until ``gate`` opens; counts calls
    and the most fetches in flight at once."""

    name = "gated"

    def __init__(self, blobs: dict[bytes, bytes],
                 manifests: dict[bytes, Manifest] | None = None) -> None:
        self.blobs = blobs
        self.manifests = manifests or {}
        self.gate = asyncio.Event()
        self.calls: Counter[bytes] = Counter()
        self.inflight = 0
        self.max_inflight = 0

    async def fetch(self, digest: bytes) -> bytes:
        self.calls[digest] += 1
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await self.gate.wait()
        finally:
            self.inflight -= 1
        if digest not in self.blobs:
            raise BlobMissing(digest.hex(), self.name)
        return self.blobs[digest]

    async def fetch_manifest(self, digest: bytes) -> Manifest | None:
        if digest in self.manifests:
            return self.manifests[digest]
        if digest in self.blobs:
            return None
        raise BlobMissing(digest.hex(), self.name)


async def until(cond: object, what: str, max_yields: int = 1000) -> None:
    """Yield to the loop until ``cond()`` holds (no timed sleeps: tasks only need turns)."""
    for _ in range(max_yields):
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture
def local(tmp_path: Path) -> Store:
    s = Store(tmp_path / "local", chunk_size=CHUNK)
    yield s
    s.close()


def test_concurrent_fetches_of_one_digest_share_one(local: Store) -> None:
    data = b"x" * 100
    digest = hash_bytes(data)
    source = GatedSource({digest: data})
    fetcher = Fetcher(local, source)

    async def main() -> None:
        readers = [asyncio.create_task(fetcher.ensure(digest)) for _ in range(10)]
        await until(lambda: fetcher.stats.joined == 9 and source.inflight == 1, "all joined")
        source.gate.set()
        await asyncio.gather(*readers)

    asyncio.run(main())
    assert source.calls[digest] == 1
    assert fetcher.stats.leaves == 1
    assert local.get(digest) == data


def test_cancelled_reader_does_not_cancel_the_fetch(local: Store) -> None:
    data = b"y" * 10
    digest = hash_bytes(data)
    source = GatedSource({digest: data})
    fetcher = Fetcher(local, source)

    async def main() -> None:
        first = asyncio.create_task(fetcher.ensure(digest))
        second = asyncio.create_task(fetcher.ensure(digest))
        await until(lambda: source.inflight == 1 and fetcher.stats.joined == 1, "in flight")
        first.cancel()
        source.gate.set()
        await second
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(main())
    assert local.has(digest) and source.calls[digest] == 1


def test_corrupt_blob_from_source_is_rejected(local: Store,
                                              caplog: pytest.LogCaptureFixture) -> None:
    digest = hash_bytes(b"the real bytes")
    source = GatedSource({digest: b"some other bytes"})
    source.gate.set()
    fetcher = Fetcher(local, source)

    async def main() -> None:
        results = await asyncio.gather(*(fetcher.ensure(digest) for _ in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, CorruptBlob) for r in results)
        # a failure is not cached: the next read asks again
        with pytest.raises(CorruptBlob):
            await fetcher.ensure(digest)

    asyncio.run(main())
    assert not local.has(digest)
    assert hash_bytes(b"some other bytes") not in set(local.leaves())
    assert fetcher.stats.corrupt == 2 and source.calls[digest] == 2
    assert "rejected" in caplog.text


def test_chunked_file_and_lying_manifest(tmp_path: Path, local: Store) -> None:
    rnd = random.Random(3)
    data = bytes(rnd.getrandbits(8) for _ in range(4 * CHUNK + 5))
    other = bytes(rnd.getrandbits(8) for _ in range(4 * CHUNK + 5))
    with Store(tmp_path / "remote", chunk_size=CHUNK) as remote:
        digest = remote.put(data)
        other_digest = remote.put(other)
        source = StoreSource(remote)
        fetcher = Fetcher(local, source)
        asyncio.run(fetcher.ensure(digest))
        assert local.get(digest) == data and local.manifest(digest) is not None
        assert source.fetches == 5

        # a source that answers with another file's manifest: chunks are fine, the whole
        # is not what was asked for, so no manifest is recorded under the digest asked
        liar = GatedSource({c: remote.get(c) for c in remote.manifest(other_digest).chunks},
                           {digest: remote.manifest(other_digest)})
        liar.gate.set()
        with Store(tmp_path / "victim", chunk_size=CHUNK) as victim:
            with pytest.raises(CorruptBlob):
                asyncio.run(Fetcher(victim, liar).ensure(hash_bytes(data)))
            assert victim.manifest(digest) is None and not victim.has(digest)


def test_ensure_range_fetches_only_needed_chunks(tmp_path: Path, local: Store) -> None:
    data = random.Random(5).randbytes(10 * CHUNK)  # 10 distinct chunks
    digest = local.put(data)
    man = local.manifest(digest)
    assert man is not None
    with Store(tmp_path / "remote", chunk_size=CHUNK) as remote:
        remote.put(data)
        local.drop([digest])  # leaves gone, manifest kept (as eviction leaves it)
        source = StoreSource(remote)
        fetcher = Fetcher(local, source)
        asyncio.run(fetcher.ensure_range(digest, 2 * CHUNK + 10, CHUNK))
        assert source.fetches == 2
        assert local.read(digest, 2 * CHUNK + 10, CHUNK) == data[2 * CHUNK + 10:3 * CHUNK + 10]
        assert len(local.missing(digest)) == 8


def test_missing_everywhere(local: Store) -> None:
    source = GatedSource({})
    fetcher = Fetcher(local, source)
    with pytest.raises(BlobMissing):
        asyncio.run(fetcher.ensure(hash_bytes(b"nowhere")))
    assert fetcher.stats.failed == 1


def test_prefetch_respects_its_bound(local: Store) -> None:
    blobs = {hash_bytes(bytes([i]) * 50): bytes([i]) * 50 for i in range(20)}
    present = local.put(b"already here")
    source = GatedSource(blobs)
    fetcher = Fetcher(local, source)

    async def main() -> None:
        job = asyncio.create_task(fetcher.prefetch([present, *blobs], concurrency=3))
        await until(lambda: source.inflight == 3, "three in flight")
        for _ in range(20):  # give every worker many turns: none may start a fourth
            await asyncio.sleep(0)
        assert source.inflight == 3
        source.gate.set()
        report = await job
        assert (report.fetched, report.present, report.failed) == (20, 1, 0)

    asyncio.run(main())
    assert source.max_inflight == 3
    assert all(local.has(d) for d in blobs)


def test_prefetch_logs_failures_and_goes_on(local: Store) -> None:
    good = b"good"
    source = GatedSource({hash_bytes(good): good})
    source.gate.set()
    report = asyncio.run(Fetcher(local, source).prefetch(
        [hash_bytes(b"missing"), hash_bytes(good)], concurrency=1))
    assert (report.fetched, report.failed) == (1, 1)


def test_hot_set_merge_save_and_prefetch(tmp_path: Path, local: Store) -> None:
    files = [bytes([i]) * 30 for i in range(6)]
    digests = [hash_bytes(f) for f in files]
    assert hotset.merge([digests[2], digests[0]], [digests[1], digests[0], digests[3]]) == [
        digests[2], digests[0], digests[1], digests[3]]

    with Store(tmp_path / "warm", chunk_size=CHUNK) as warm:
        for f in files:
            warm.put(f)
        index = Index([Entry(b"/", "dir", 0o755)] + [
            Entry(b"/f%d" % i, "file", 0o644, size=30, digest=d) for i, d in enumerate(digests)])
        rec = images.register(warm, index, ["hot:1"], source="test")
        rec1 = hotset.HotSetRecorder()
        for d in (digests[4], digests[1], digests[4]):
            rec1.record(d)
        assert rec1.digests == [digests[4], digests[1]] and rec1.dirty
        first = hotset.save(warm, rec.id, rec1.digests)
        assert first is not None and hotset.load(warm, rec.id) == [digests[4], digests[1]]
        assert hotset.save(warm, rec.id, [digests[1]]) is None  # nothing new
        hotset.save(warm, rec.id, [digests[0], digests[4]])
        assert hotset.load(warm, rec.id) == [digests[4], digests[1], digests[0]]

        # a cold node knows the image and its hot-set digest, not the blobs
        hot_digest = images.hot_set(warm, rec.id)
        assert hot_digest is not None
        images.set_hot_set(local, rec.id, hot_digest)
        source = StoreSource(warm)
        report = asyncio.run(hotset.prefetch(local, rec.id, Fetcher(local, source)))
        assert report.fetched == 3
        assert all(local.has(d) for d in (digests[4], digests[1], digests[0]))
        assert not local.has(digests[5])


class ManifestCountingSource(GatedSource):
    """A GatedSource (gate open) that counts manifest requests."""

    def __init__(self, blobs: dict[bytes, bytes],
                 manifests: dict[bytes, Manifest] | None = None) -> None:
        super().__init__(blobs, manifests)
        self.gate.set()
        self.manifest_calls = 0

    async def fetch_manifest(self, digest: bytes) -> Manifest | None:
        self.manifest_calls += 1
        return await super().fetch_manifest(digest)


class HeldWrites(Fetcher):
    """A fetcher whose store writes wait for ``release`` (set from the test)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.release = __import__("threading").Event()

    def _write_batch(self, items: list[tuple[bytes, bytes, bool]]) -> None:
        assert self.release.wait(30), "writes never released"
        super()._write_batch(items)


def test_read_answers_from_verified_bytes_before_the_commit(local: Store) -> None:
    data = random.Random(7).randbytes(CHUNK // 2)
    digest = hash_bytes(data)
    source = ManifestCountingSource({digest: data})
    fetcher = HeldWrites(local, source, write_behind_s=0)

    async def main() -> None:
        assert await fetcher.read(digest, 10, 100, size=len(data)) == data[10:110]
        assert not local.has(digest)  # the commit is still held back
        assert fetcher.peek(digest, 0, 5) == data[:5]
        assert await fetcher.read(digest, 0, len(data), size=len(data)) == data
        fetcher.release.set()
        await fetcher.aclose()

    asyncio.run(main())
    assert local.get(digest) == data
    assert fetcher.peek(digest, 0, 5) is None  # committed: served by the store now
    # a file that fits in one chunk came in one request, without a manifest round trip
    assert source.calls[digest] == 1 and source.manifest_calls == 0


def test_small_file_the_source_holds_only_chunked(local: Store) -> None:
    """A source with a smaller chunk size holds a small (for us) file as chunks: the
    one-request fetch misses, and the manifest path brings it in, verified whole."""
    data = random.Random(8).randbytes(CHUNK - 10)
    digest = hash_bytes(data)
    parts = [data[:300], data[300:600], data[600:]]
    man = Manifest(len(data), 300, tuple(hash_bytes(p) for p in parts))
    source = ManifestCountingSource({hash_bytes(p): p for p in parts}, {digest: man})
    fetcher = Fetcher(local, source)

    async def main() -> None:
        assert await fetcher.read(digest, 0, len(data), size=len(data)) == data
        await fetcher.aclose()

    asyncio.run(main())
    assert source.manifest_calls == 1
    assert local.get(digest) == data


def test_read_rejects_corrupt_bytes_and_keeps_nothing(local: Store) -> None:
    digest = hash_bytes(b"the real bytes")
    source = ManifestCountingSource({digest: b"other bytes!!!"})
    fetcher = Fetcher(local, source)

    async def main() -> None:
        with pytest.raises(CorruptBlob):
            await fetcher.read(digest, 0, 14, size=14)
        assert fetcher.peek(digest, 0, 14) is None
        await fetcher.aclose()

    asyncio.run(main())
    assert not local.has(digest) and fetcher.stats.corrupt == 1


def test_ensure_commits_without_the_write_behind_delay(local: Store) -> None:
    """Reads leave their writes for a pause in the fetching; ensure (prefetch, hot trees,
    index blobs) needs the blob in the store and gets its commit at once."""
    blobs = {hash_bytes(bytes([i]) * 20): bytes([i]) * 20 for i in range(3)}
    source = ManifestCountingSource(blobs)
    fetcher = Fetcher(local, source, write_behind_s=3600)  # a read's write would wait
    first, second, third = blobs

    async def main() -> None:
        await fetcher.read(first, 0, 20, size=20)
        await asyncio.wait_for(fetcher.ensure(second), 30)
        assert local.has(second) and local.has(first)  # one commit took both
        await fetcher.read(third, 0, 20, size=20)
        assert not local.has(third)
        await asyncio.wait_for(fetcher.aclose(), 30)  # closing writes what is held

    asyncio.run(main())
    assert all(local.has(d) for d in blobs)


def test_read_of_a_chunked_file_with_a_local_manifest(tmp_path: Path, local: Store) -> None:
    data = random.Random(9).randbytes(6 * CHUNK)
    digest = local.put(data)
    with Store(tmp_path / "remote", chunk_size=CHUNK) as remote:
        remote.put(data)
        local.drop([digest])  # the manifest stays, the chunks go
        source = StoreSource(remote)
        fetcher = Fetcher(local, source)

        async def main() -> bytes:
            got = await fetcher.read(digest, CHUNK + 5, 2 * CHUNK, size=len(data))
            await fetcher.aclose()
            return got

        assert asyncio.run(main()) == data[CHUNK + 5:3 * CHUNK + 5]
        assert source.fetches == 3  # the three chunks the range covers
        assert len(local.missing(digest)) == 3


def test_prefetch_without_waiting_for_commits(local: Store) -> None:
    """A mount's hot-set prefetch leaves the commits behind its readers, as reads do."""
    blobs = {hash_bytes(bytes([i]) * 30): bytes([i]) * 30 for i in range(5)}
    source = ManifestCountingSource(blobs)
    fetcher = Fetcher(local, source, write_behind_s=3600)

    async def main() -> None:
        report = await asyncio.wait_for(fetcher.prefetch(blobs, 2, durable=False), 30)
        assert (report.fetched, report.failed) == (5, 0)
        assert not any(local.has(d) for d in blobs)  # still behind
        assert all(fetcher.peek(d, 0, 30) == data for d, data in blobs.items())
        await asyncio.wait_for(fetcher.aclose(), 30)

    asyncio.run(main())
    assert all(local.get(d) == data for d, data in blobs.items())
