"""The LMDB content-addressed store, without root: put/get, chunking, pins, LRU, verify."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.digest import hash_bytes
from swarm.errors import BlobMissing, CorruptBlob
from swarm.store import Store
from swarm.store.cas import Manifest

CHUNK = 1024


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "store", chunk_size=CHUNK)
    yield s
    s.close()


def corrupt_leaf(store: Store, digest: bytes) -> None:
    """Flip a byte of a stored leaf behind the store's back (what disk rot would do)."""
    with store.env.begin(write=True) as txn:
        data = bytearray(txn.get(digest, db=store.db["blobs"]))
        data[0] ^= 0xFF
        txn.put(digest, bytes(data), db=store.db["blobs"])


def test_put_get_small(store):
    d = store.put(b"hello")
    assert d == hash_bytes(b"hello")
    assert store.get(d) == b"hello"
    assert store.has(d) and store.size(d) == 5
    with store.view(d) as v:
        assert isinstance(v, memoryview) and bytes(v) == b"hello"


def test_missing_blob_raises(store):
    with pytest.raises(BlobMissing):
        store.get(hash_bytes(b"nope"))
    assert store.missing(hash_bytes(b"nope")) == [hash_bytes(b"nope")]


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=5 * CHUNK), offset=st.integers(0, 6 * CHUNK),
       length=st.integers(0, 6 * CHUNK))
def test_chunked_content_reads_like_bytes(tmp_path_factory, data, offset, length):
    with Store(tmp_path_factory.mktemp("s") / "store", chunk_size=CHUNK) as s:
        d = s.put(data)
        assert d == hash_bytes(data)
        assert s.get(d) == data
        assert s.read(d, offset, length) == data[offset:offset + length]
        assert b"".join(s.iter_content(d)) == data
        d2, n = s.put_stream(io.BytesIO(data))
        assert (d2, n) == (d, len(data))


def test_large_file_is_chunked_and_chunks_dedup(store):
    a = os.urandom(3 * CHUNK + 17)
    d = store.put(a)
    man = store.manifest(d)
    assert isinstance(man, Manifest) and len(man.chunks) == 4 and man.size == len(a)
    before = store.stats().blobs
    # same first three chunks, different tail: only one new leaf
    b = a[: 3 * CHUNK] + b"other tail"
    store.put(b)
    assert store.stats().blobs == before + 1
    # same bytes again: nothing new, counted as dedup
    dedup = store.stats().dedup
    store.put(a)
    assert store.stats().blobs == before + 1
    assert store.stats().dedup > dedup


def test_stream_put_reads_pipe_short_reads(store):
    data = os.urandom(5 * CHUNK + 3)

    class Trickle(io.RawIOBase):
        def __init__(self) -> None:
            self.pos = 0

        def readable(self) -> bool:
            return True

        def read(self, n=-1):  # at most 100 bytes at a time, like a pipe
            part = data[self.pos:self.pos + min(n if n >= 0 else 100, 100)]
            self.pos += len(part)
            return part

    d, n = store.put_stream(Trickle())
    assert n == len(data) and store.get(d) == data


def test_verify_on_read_rejects_corrupt_leaf(tmp_path):
    with Store(tmp_path / "s", chunk_size=CHUNK, verify_on_read=True) as s:
        d = s.put(b"precious bytes")
        big = s.put(os.urandom(3 * CHUNK))
        corrupt_leaf(s, d)
        corrupt_leaf(s, s.manifest(big).chunks[1])
        with pytest.raises(CorruptBlob):
            s.get(d)
        with pytest.raises(CorruptBlob):
            s.read(d, 0, 3)
        with pytest.raises(CorruptBlob):
            s.read(big, CHUNK, 10)
        report = s.verify()
        assert not report.clean and len(report.corrupt) == 3  # leaf, chunk, whole file
        report = s.verify(repair=True)
        assert report.removed == 2
        assert not s.has(d) and s.verify().clean is False  # the file is now incomplete
        assert s.verify().incomplete == [big.hex()]


def test_lru_eviction_respects_budget_and_pins(tmp_path):
    with Store(tmp_path / "s", chunk_size=CHUNK, budget_bytes=10 * CHUNK) as s:
        blobs = [s.put(bytes([i]) * CHUNK) for i in range(6)]
        s.pin([blobs[0]])
        s.get(blobs[1])  # recently used: survives
        s.flush()
        for i in range(6, 12):
            s.put(bytes([i]) * CHUNK)
        st = s.stats()
        assert st.bytes <= 10 * CHUNK
        assert st.evicted > 0
        assert s.has(blobs[0]), "a pinned blob was evicted"
        assert s.has(blobs[1]), "the most recently read old blob was evicted first"
        assert not s.has(blobs[2])
        s.unpin([blobs[0]])
        s.evict(0)
        assert not s.has(blobs[0])


def test_pins_of_dead_processes_lapse(tmp_path):
    with Store(tmp_path / "s", chunk_size=CHUNK) as s:
        d = s.put(b"x" * 100)
        dead_pid = 2**22 + 12345  # beyond pid_max's default: never a live process
        with s.env.begin(write=True) as txn:
            s._pin_txn(txn, [d], +1, dead_pid)
        assert not s.pinned(d)
        s.pin([d], durable=True)
        assert s.pinned(d)
        s.evict(0)
        assert s.has(d)


def test_gc_keeps_live_and_chunks(store):
    live = store.put(os.urandom(2 * CHUNK + 1))
    dead = store.put(b"garbage")
    removed, freed = store.gc([live])
    assert removed == 1 and freed == len(b"garbage")
    assert store.has(live) and not store.has(dead)


def test_counters_hits_and_misses(store):
    d = store.put(b"abc")
    store.get(d)
    store.get(d)
    with pytest.raises(BlobMissing):
        store.get(hash_bytes(b"zzz"))
    st = store.stats()
    assert (st.hits, st.misses, st.puts, st.blobs, st.bytes) == (2, 1, 1, 1, 3)


def test_two_handles_one_process_share_env(tmp_path):
    a = Store(tmp_path / "s", chunk_size=CHUNK)
    b = Store(tmp_path / "s", chunk_size=CHUNK)
    d = a.put(b"shared")
    assert b.get(d) == b"shared"
    a.close()
    assert b.get(d) == b"shared"  # closing one handle leaves the other working
    b.close()


def test_failed_batch_keeps_committed_part(store):
    with pytest.raises(RuntimeError), store.batch() as batch:
        d = batch.put(b"first")
        batch.commit()
        batch.put(b"second")
        raise RuntimeError("import failed")
    assert store.has(d)
    assert not store.has(hash_bytes(b"second"))


def test_reopen_after_close(tmp_path):
    with Store(tmp_path / "s") as s:
        d = s.put(b"persist")
    with Store(tmp_path / "s") as s:
        assert s.get(d) == b"persist"
    assert isinstance(lmdb.version(), tuple)


def test_a_store_opens_while_another_thread_writes(tmp_path: Path) -> None:
    """Opening a Store of a path already open in this process takes no write lock while
    holding the GIL: a thread in a write transaction (which needs the GIL to finish it)
    must not deadlock with it. Run in a child process, so a deadlock fails, not hangs."""
    code = f"""
import threading
from swarm.store import Store
first = Store({str(tmp_path / "s")!r})
inside = threading.Event()
def writer():
    with first.batch() as batch:
        inside.set()
        for i in range(20000):  # Python work, GIL needed, writer lock held
            batch.put(i.to_bytes(4, "big"))
t = threading.Thread(target=writer)
t.start()
inside.wait()
second = Store({str(tmp_path / "s")!r})
t.join()
print(second.stats().blobs)
second.close()
first.close()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "20000"
