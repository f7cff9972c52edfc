"""ContentPipeline: files read and hashed on the calling thread, appended to LMDB by a writer
thread. Real trees and a real store; no root needed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from swarm.build.importer import PIPELINE_MAX_BYTES, WHOLE_READ_MAX_BYTES, ContentPipeline
from swarm.digest import hash_bytes
from swarm.store import Store

CHUNK = 4096


def make_files(root, n, size):
    os.makedirs(root, exist_ok=True)
    paths = []
    for i in range(n):
        p = os.path.join(root, f"f{i}")
        with open(p, "wb") as f:
            f.write(os.urandom(size + i))
        paths.append(os.fsencode(p))
    return paths


def test_every_file_stored_and_reported_in_the_caller_thread(tmp_path):
    import threading

    paths = make_files(tmp_path / "src", 150, 3000)  # several groups, chunked and not
    got: dict[int, tuple[bytes, int]] = {}
    threads = set()

    def stored(key, digest, size):
        threads.add(threading.get_ident())
        got[key] = (digest, size)

    with Store(tmp_path / "store", chunk_size=CHUNK) as s:
        with s.batch() as batch, ContentPipeline(batch, stored) as pipeline:
            for i, p in enumerate(paths):
                pipeline.submit(i, p, os.path.getsize(p))
            pipeline.drain()
            assert len(got) == len(paths)  # drain reports everything before it returns
        assert threads == {threading.get_ident()}
        for i, p in enumerate(paths):
            data = Path(os.fsdecode(p)).read_bytes()
            assert got[i] == (hash_bytes(data), len(data))
            assert s.get(got[i][0]) == data
        assert s.verify().clean


def test_batch_is_the_callers_again_after_the_pipeline(tmp_path):
    paths = make_files(tmp_path / "src", 40, 1000)
    with Store(tmp_path / "store", chunk_size=CHUNK) as s:
        with s.batch() as batch:
            before = batch.put(b"put by the caller before the pipeline")  # open txn
            with ContentPipeline(batch, lambda *_: None) as pipeline:
                for i, p in enumerate(paths):
                    pipeline.submit(i, p, os.path.getsize(p))
            after = batch.put(b"put by the caller after the pipeline")
        assert s.get(before) == b"put by the caller before the pipeline"
        assert s.get(after) == b"put by the caller after the pipeline"
        assert s.stats().blobs == 2 + len(paths)


def test_file_streamed_by_the_writer_and_submits_after_drain(tmp_path):
    big = tmp_path / "big"
    data = os.urandom(WHOLE_READ_MAX_BYTES + 5 * CHUNK + 7)  # too big to read whole
    big.write_bytes(data)
    small = make_files(tmp_path / "src", 3, 100)
    got = {}
    with Store(tmp_path / "store", chunk_size=CHUNK) as s:
        with s.batch() as batch, ContentPipeline(batch, lambda k, d, n: got.update({k: d})
                                                 ) as pipeline:
            pipeline.submit("big", os.fsencode(big), len(data))
            pipeline.drain()
            for i, p in enumerate(small):
                pipeline.submit(i, p, os.path.getsize(p))
        assert got["big"] == hash_bytes(data)
        assert s.get(got["big"]) == data
        assert sorted(k for k in got if k != "big") == [0, 1, 2]


def test_writer_error_reaches_the_caller_and_committed_blobs_stay_valid(tmp_path):
    paths = make_files(tmp_path / "src", 70, 2000)
    slow = tmp_path / "slow"  # streamed by the writer in many chunks while the caller reads on
    slow.write_bytes(os.urandom(8 * WHOLE_READ_MAX_BYTES))
    missing = os.fsencode(tmp_path / "gone")  # the writer streams it, and fails
    one_mb = tmp_path / "one-mb"
    one_mb.write_bytes(os.urandom(1 << 20))
    with Store(tmp_path / "store", chunk_size=CHUNK) as s:
        with pytest.raises(FileNotFoundError), s.batch() as batch, \
                ContentPipeline(batch, lambda *_: None) as pipeline:
            for i, p in enumerate(paths):
                pipeline.submit(i, p, os.path.getsize(p))
            pipeline.submit(-2, os.fsencode(slow), slow.stat().st_size)
            pipeline.submit(-1, missing, WHOLE_READ_MAX_BYTES + 1)
            # more than the writer's queue holds: the caller waits for room, and must be
            # woken by the failure rather than wait forever
            for i in range(PIPELINE_MAX_BYTES // (1 << 20) + 8):
                pipeline.submit(1000 + i, os.fsencode(one_mb), 1 << 20)
        assert s.verify().clean
        # the store takes writes again (no writer transaction left behind)
        d = s.put(b"after the failure")
        assert s.get(d) == b"after the failure"


def test_caller_error_drops_what_the_writer_has_not_committed(tmp_path, monkeypatch):
    from swarm.store import cas

    monkeypatch.setattr(cas, "BATCH_COMMIT_S", 3600.0)  # no timed commit mid-test
    paths = make_files(tmp_path / "src", 100, 500)  # several groups handed to the writer
    with Store(tmp_path / "store", chunk_size=CHUNK) as s:
        with pytest.raises(RuntimeError, match="walk failed"), s.batch() as batch, \
                ContentPipeline(batch, lambda *_: None) as pipeline:
            for i, p in enumerate(paths):
                pipeline.submit(i, p, os.path.getsize(p))
            raise RuntimeError("walk failed")
        assert s.stats().blobs == 0  # the writer aborted its transaction
        assert s.verify().clean
        d = s.put(b"after the failure")
        assert s.get(d) == b"after the failure"


def test_files_that_changed_size_since_lstat_are_stored_as_read(tmp_path):
    grown = tmp_path / "grown"
    grown.write_bytes(os.urandom(5000))
    huge = tmp_path / "huge"  # grew past the whole-read limit: streamed instead
    huge.write_bytes(os.urandom(WHOLE_READ_MAX_BYTES + 100))
    shrunk = tmp_path / "shrunk"
    shrunk.write_bytes(os.urandom(700))
    got = {}
    with Store(tmp_path / "store", chunk_size=CHUNK) as s:
        with s.batch() as batch, ContentPipeline(
                batch, lambda k, d, n: got.update({k: (d, n)})) as pipeline:
            pipeline.submit(grown, os.fsencode(grown), 10)  # the size lstat said earlier
            pipeline.submit(huge, os.fsencode(huge), 10)
            pipeline.submit(shrunk, os.fsencode(shrunk), 9000)
        for path in (grown, huge, shrunk):
            data = path.read_bytes()
            assert got[path] == (hash_bytes(data), len(data))
            assert s.get(got[path][0]) == data
