"""The store shared by several processes, and a writer SIGKILLed mid-put."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from conftest import run_cli
from swarm.digest import hash_bytes
from swarm.store import Store

CHUNK = 4096
WRITER = textwrap.dedent("""
    import sys, hashlib
    from swarm.store import Store
    s = Store(sys.argv[1], chunk_size=int(sys.argv[2]))
    i = int(sys.argv[3])
    while True:
        data = hashlib.shake_256(str(i).encode()).digest(200_000 + i * 997 % 50_000)
        d = s.put(data)
        print(i, d.hex(), flush=True)
        i += 2
""")


def blob(i: int) -> bytes:
    import hashlib

    return hashlib.shake_256(str(i).encode()).digest(200_000 + i * 997 % 50_000)


def test_sigkill_mid_put_leaves_a_clean_store(tmp_path):
    path = str(tmp_path / "state" / "store")  # where `swarm --state-dir state` looks
    Store(path, chunk_size=CHUNK).close()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, str(CHUNK), str(start)],
                              stdout=subprocess.PIPE, text=True) for start in (0, 1)]
    committed: dict[int, str] = {}
    try:
        # two writers at once; kill both once each has committed a few blobs (mid-loop:
        # most of each iteration is spent inside put, so the kill lands inside one)
        for p in procs:
            assert p.stdout is not None
            for _ in range(15):
                line = p.stdout.readline()
                i, hexd = line.split()
                committed[int(i)] = hexd
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for p in procs:
        assert p.returncode == -signal.SIGKILL
    with Store(path, chunk_size=CHUNK, verify_on_read=True) as s:
        report = s.verify()
        assert report.clean, report
        for i, hexd in committed.items():
            d = bytes.fromhex(hexd)
            assert d == hash_bytes(blob(i))
            assert s.get(d) == blob(i)
        # and it is writable again
        d = s.put(b"after the crash")
        assert s.get(d) == b"after the crash"
    out = run_cli(["--state-dir", str(tmp_path / "state"), "cache", "verify"]).stdout
    assert out.startswith("clean:"), out


def test_reader_in_another_process_sees_commits(tmp_path):
    path = str(tmp_path / "store")
    with Store(path, chunk_size=CHUNK) as s:
        d = s.put(os.urandom(3 * CHUNK))
        code = ("import sys; from swarm.store import Store; s = Store(sys.argv[1]); "
                "sys.stdout.buffer.write(s.get(bytes.fromhex(sys.argv[2])))")
        out = subprocess.run([sys.executable, "-c", code, path, d.hex()], capture_output=True,
                             check=True).stdout
        assert out == s.get(d)


IMPORTER = textwrap.dedent("""
    import sys
    from swarm.build.importer import import_directory
    from swarm.store import Store
    with Store(sys.argv[1], chunk_size=int(sys.argv[2])) as s:
        import_directory(s, sys.argv[3], ["killed:mid-import"])
    print("finished", flush=True)
""")


def test_sigkill_mid_directory_import_leaves_a_clean_store(tmp_path):
    """The import's writer thread holds a write transaction most of the time: killing the
    process must leave the committed part readable and verifiable, and no image."""
    import time

    from swarm.build.importer import import_directory
    from swarm.fs import images

    src = tmp_path / "src"
    for d in range(30):
        os.makedirs(src / f"d{d}")
        for f in range(40):
            (src / f"d{d}" / f"f{f}").write_bytes(hashlib_blob(d * 100 + f, 60_000))
    path = str(tmp_path / "store")
    Store(path, chunk_size=CHUNK).close()
    proc = subprocess.Popen([sys.executable, "-c", IMPORTER, path, str(CHUNK), str(src)],
                            stdout=subprocess.PIPE, text=True)
    try:
        with Store(path, chunk_size=CHUNK) as s:
            deadline = time.monotonic() + 60
            while s.stats().blobs == 0:  # the writer has committed once: it is mid-import
                assert proc.poll() is None, "the import ended before its first commit"
                assert time.monotonic() < deadline
                time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with Store(path, chunk_size=CHUNK, verify_on_read=True) as s:
        assert images.list_images(s) == []  # killed before it registered
        held = s.stats().blobs
        assert held > 0
        assert s.verify().clean
        rec = import_directory(s, src, ["again:1"])  # and the import completes afterwards
        idx = images.load_index(s, rec.id)
        for e in idx:
            if e.kind == "file":
                assert s.get(e.digest) == (src / e.path.decode().lstrip("/")).read_bytes()
        assert s.stats().blobs >= held
    out = run_cli(["--state-dir", str(tmp_path), "cache", "verify"]).stdout
    assert out.startswith("clean:"), out


def hashlib_blob(i: int, n: int) -> bytes:
    import hashlib

    return hashlib.shake_256(str(i).encode()).digest(n)
