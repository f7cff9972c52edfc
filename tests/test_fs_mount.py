"""Images through a real FUSE mount (root): exact trees, verified reads, fetches, hot sets,
and a mount table left clean."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swarm.build.importer import import_directory
from swarm.digest import to_hex
from swarm.fs import daemon as daemon_mod
from swarm.fs import hotset, images
from swarm.fs.mounts import MountManager, cleanup_leftovers, swarm_mounts
from swarm.store import Store
from treecmp import diff, snapshot

pytestmark = pytest.mark.root
CHUNK = 1024
DEBIAN_CHUNK = 4096  # a 200 MB tree: 1 KiB chunks would only slow the import


@pytest.fixture(autouse=True)
def mount_table_clean(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test leaves no swarm FUSE mount (nor daemon) behind."""
    base = tmp_path_factory.getbasetemp()
    yield
    left = swarm_mounts(base)
    for m in left:
        cleanup_leftovers(m.mountpoint.parent.parent)
    assert not left, f"swarm mounts left behind: {left}"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ---------------------------------------------------------------------- trees and images
def make_small_tree(root: Path) -> None:
    """Every kind of entry, xattrs, hard links, multi-chunk files."""
    rnd = random.Random(11)
    (root / "etc" / "deep" / "er").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "big").write_bytes(rnd.randbytes(20 * CHUNK + 17))
    (root / "one-chunk").write_bytes(rnd.randbytes(CHUNK))
    (root / "empty").write_bytes(b"")
    (root / "etc" / "conf").write_text("key = value\n")
    os.link(root / "etc" / "conf", root / "bin" / "conf-link")
    os.link(root / "etc" / "conf", root / "etc" / "deep" / "conf-link2")
    os.symlink("../etc/conf", root / "bin" / "rel")
    os.symlink("/nowhere/at/all", root / "bin" / "dangling")
    os.mkfifo(root / "bin" / "fifo")
    os.mknod(root / "bin" / "null", 0o666 | 0o020000, os.makedev(1, 3))
    os.setxattr(root / "etc" / "conf", "user.note", b"hello")
    os.setxattr(root / "etc", "trusted.swarm-test", b"\x00\x01binary")
    os.setxattr(root / "big", "user.empty", b"")
    os.chmod(root / "bin", 0o1755)
    os.chown(root / "etc" / "deep", 1234, 5678)
    os.chmod(root / "etc" / "deep" / "er", 0o700)
    for i in range(5):
        (root / "bin" / f"f{i}").write_bytes(rnd.randbytes(100 + 900 * i))
    os.chmod(root / "bin" / "f0", 0o4755)
    os.utime(root / "big", ns=(1, 1_700_000_000_123_456_789))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes]:
    """(tree, store path, image id) of a small synthetic tree."""
    base = tmp_path_factory.mktemp("small")
    tree = base / "tree"
    tree.mkdir()
    make_small_tree(tree)
    with Store(base / "store", chunk_size=CHUNK) as store:
        rec = import_directory(store, tree, ["small:1"])
    return tree, base / "store", rec.id


@pytest.fixture(scope="module")
def debian(tmp_path_factory: pytest.TempPathFactory, debian_rootfs: Path
           ) -> tuple[Path, Path, bytes]:
    base = tmp_path_factory.mktemp("debian")
    with Store(base / "store", chunk_size=DEBIAN_CHUNK) as store:
        rec = import_directory(store, debian_rootfs, ["debian:test"])
    return debian_rootfs, base / "store", rec.id


def state_with(tmp_path: Path, store_path: Path) -> Path:
    """A state directory whose store is a copy of ``store_path`` (tests may damage it)."""
    state = tmp_path / "state"
    state.mkdir()
    shutil.copytree(store_path, state / "store")
    return state


def nlinks(root: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (st_nlink, inode class), where the class is the first path (in
    sorted order) with that inode: hard links agree, nothing else does."""
    paths = sorted(os.path.relpath(os.path.join(d, n), root)
                   for d, dirs, files in os.walk(root) for n in dirs + files)
    first: dict[int, str] = {}
    out = {}
    for p in paths:
        st = os.lstat(root / p)
        out[p] = (st.st_nlink, first.setdefault(st.st_ino, p))
    return out


def read_together(path: Path, n: int) -> list[bytes]:
    """Read ``path`` from ``n`` threads released at once by a barrier."""
    barrier = threading.Barrier(n)
    out: list[bytes] = [b""] * n

    def one(i: int) -> None:
        barrier.wait()
        out[i] = path.read_bytes()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


# ---------------------------------------------------------------------- tests
def test_debian_tree_is_identical_through_the_mount(tmp_path: Path,
                                                    debian: tuple[Path, Path, bytes]) -> None:
    src, store_path, image_id = debian

    async def main() -> None:
        async with MountManager(tmp_path / "state", store_path, idle_s=0,
                                chunk_size=DEBIAN_CHUNK) as mm:
            mnt = await mm.acquire(image_id)
            try:
                got = await asyncio.to_thread(snapshot, mnt)
                assert await asyncio.to_thread(nlinks, mnt) == nlinks(src)
                stats = await mm.stats(image_id)
            finally:
                await mm.release(image_id)
            assert mm.mounted() == {}
        want = snapshot(src)
        assert got == want, "\n".join(diff(want, got))
        assert stats["op_errors"] == 0
        assert stats["ops"].get("flush", 0) <= 1

    run(main())


def test_small_tree_xattrs_links_devices(tmp_path: Path, small: tuple[Path, Path, bytes]) -> None:
    src, store_path, image_id = small

    async def main() -> None:
        async with MountManager(tmp_path / "state", store_path, idle_s=0,
                                chunk_size=CHUNK) as mm:
            mnt = await mm.acquire(image_id)
            try:
                got = snapshot(mnt)
                assert nlinks(mnt) == nlinks(src)
                st = os.lstat(mnt / "bin" / "conf-link")
                assert st.st_nlink == 3
                assert st.st_ino == os.lstat(mnt / "etc" / "deep" / "conf-link2").st_ino
                assert os.getxattr(mnt / "etc", "trusted.swarm-test") == b"\x00\x01binary"
                with pytest.raises(OSError) as err:
                    os.getxattr(mnt / "etc", "user.absent")
                assert err.value.errno == errno.ENODATA
                with pytest.raises(OSError) as err:
                    os.open(mnt / "etc" / "conf", os.O_WRONLY)
                assert err.value.errno == errno.EROFS
                with pytest.raises(OSError):
                    (mnt / "newfile").write_text("x")
                for name in ("a", "b", "a"):  # negative entries: asked once each
                    assert not (mnt / "etc" / name).exists()
                stats = await mm.stats(image_id)
            finally:
                await mm.release(image_id)
        assert got == snapshot(src), "\n".join(diff(snapshot(src), got))
        assert stats["op_errors"] == 0

    run(main())


def test_negative_lookups_and_attrs_are_cached(tmp_path: Path,
                                               small: tuple[Path, Path, bytes]) -> None:
    _, store_path, image_id = small

    async def main() -> None:
        async with MountManager(tmp_path / "state", store_path, idle_s=0,
                                chunk_size=CHUNK) as mm:
            mnt = await mm.acquire(image_id)
            try:
                def workload() -> None:
                    for _ in range(3):
                        for name in ("nope", "bin/nope", "etc/conf", "big"):
                            (mnt / name).exists()
                        (mnt / "etc" / "conf").read_bytes()
                        os.listdir(mnt / "bin")
                        [os.lstat(mnt / "bin" / n) for n in os.listdir(mnt / "bin")]

                await asyncio.to_thread(workload)
                first = (await mm.stats(image_id))["ops"]
                await mm.control(image_id, "reset")
                await asyncio.to_thread(workload)
                second = (await mm.stats(image_id))["ops"]
            finally:
                await mm.release(image_id)
        # the first pass: each name looked up once (nope, bin, bin/nope, etc, etc/conf,
        # big), the listed children came with the listing (readdirplus)
        assert first["lookup"] == 6, first
        assert first.get("getattr", 0) <= 2
        assert first["read"] == 1
        # the second: nothing but open/release and the directory listings
        assert set(second) <= {"open", "release", "opendir", "readdir", "releasedir"}, second

    run(main())


def test_corrupt_blob_gives_eio_never_bytes(tmp_path: Path,
                                            small: tuple[Path, Path, bytes]) -> None:
    src, store_path, image_id = small
    state = state_with(tmp_path, store_path)
    with Store(state / "store", chunk_size=CHUNK) as store:
        index = images.load_index(store, image_id)
        f3 = index.get("/bin/f3")
        assert f3 is not None and f3.digest is not None
        man = store.manifest(f3.digest)
        assert man is not None
        victim = man.chunks[1]
        good = store.get(victim)
        evil = bytes(b ^ 0xFF for b in good)
        with store.env.begin(write=True) as txn:
            txn.put(victim, evil, db=store.db["blobs"])

    async def main() -> None:
        async with MountManager(state, idle_s=0, chunk_size=CHUNK) as mm:
            mnt = await mm.acquire(image_id)
            try:
                for _ in range(2):  # and again: a failure is not cached as content
                    with pytest.raises(OSError) as err:
                        (mnt / "bin" / "f3").read_bytes()
                    assert err.value.errno == errno.EIO
                assert (mnt / "bin" / "f2").read_bytes() == (src / "bin" / "f2").read_bytes()
                stats = await mm.stats(image_id)
            finally:
                await mm.release(image_id)
        assert stats["op_errors"] >= 1

    run(main())


def test_missing_blobs_come_from_the_source_once(tmp_path: Path,
                                                 small: tuple[Path, Path, bytes]) -> None:
    src, store_path, image_id = small
    state = tmp_path / "state"
    with Store(state / "store", chunk_size=CHUNK) as local, \
            Store(store_path, chunk_size=CHUNK) as remote:
        local.put(remote.get(image_id))  # a cold node: only the index
        big = images.load_index(remote, image_id).get("/big")
        assert big is not None and big.digest is not None
        big_chunks = len(remote.manifest(big.digest).chunks)  # type: ignore[union-attr]
    readers = 8

    async def main() -> None:
        async with MountManager(state, source=store_path, idle_s=0, chunk_size=CHUNK,
                                prefetch=False) as mm:
            mnt = await mm.acquire(image_id)
            try:
                want_big = (src / "big").read_bytes()
                for name, want in (("big", want_big),
                                   ("etc/conf", (src / "etc" / "conf").read_bytes())):
                    got = await asyncio.to_thread(read_together, mnt / name, readers)
                    assert all(g == want for g in got)
                stats = await mm.stats(image_id)
            finally:
                await mm.release(image_id)
        # one fetch per leaf: the big file's chunks and the small file, each once
        assert stats["source_fetches"] == big_chunks + 1, stats
        assert stats["fetch"]["corrupt"] == 0

    run(main())
    with Store(state / "store", chunk_size=CHUNK) as local:
        assert local.has(big.digest)


def test_hot_set_recorded_then_prefetched_cold(tmp_path: Path,
                                               small: tuple[Path, Path, bytes]) -> None:
    src, store_path, image_id = small
    warm_state = state_with(tmp_path, store_path)
    order = ["bin/f3", "etc/conf", "bin/f1", "big"]
    with Store(warm_state / "store", chunk_size=CHUNK) as warm:
        previous = hotset.load(warm, image_id)  # other tests' mounts of this store

    async def warm_run() -> None:
        async with MountManager(warm_state, idle_s=0, chunk_size=CHUNK) as mm:
            mnt = await mm.acquire(image_id)
            try:
                for name in order:
                    (mnt / name).read_bytes()
            finally:
                await mm.release(image_id)  # unmount: the hot set is saved

    run(warm_run())
    with Store(warm_state / "store", chunk_size=CHUNK) as warm:
        index = images.load_index(warm, image_id)
        recorded = [index.get("/" + n).digest for n in order]  # type: ignore[union-attr]
        want = hotset.merge(previous, recorded)
        assert hotset.load(warm, image_id) == want
        assert want[-len(recorded):] == recorded or set(recorded) <= set(previous)
        hot_digest = images.hot_set(warm, image_id)
        assert hot_digest is not None

    cold_state = tmp_path / "cold"
    with Store(cold_state / "store", chunk_size=CHUNK) as cold, \
            Store(warm_state / "store", chunk_size=CHUNK) as warm:
        cold.put(warm.get(image_id))
        images.set_hot_set(cold, image_id, hot_digest)

    async def cold_run() -> None:
        async with MountManager(cold_state, source=warm_state / "store", idle_s=0,
                                chunk_size=CHUNK) as mm:
            mnt = await mm.acquire(image_id)
            try:
                done = await mm.control(image_id, "prefetch-wait")
                assert done["prefetch"]["fetched"] == len(want), done
                before = (await mm.stats(image_id))["source_fetches"]
                for name in order:
                    assert (mnt / name).read_bytes() == (src / name).read_bytes()
                after = await mm.stats(image_id)
            finally:
                await mm.release(image_id)
        assert after["source_fetches"] == before  # everything read was already local
        assert after["reads_waiting_for_fetch"] == 0

    run(cold_run())


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "exec"])
def test_refcount_and_idle_window(tmp_path: Path, small: tuple[Path, Path, bytes],
                                  zygote: bool) -> None:
    _, store_path, image_id = small

    async def main() -> None:
        async with MountManager(tmp_path / "state", store_path, idle_s=3600,
                                chunk_size=CHUNK, zygote=zygote) as mm:
            a = await mm.acquire(image_id)
            b = await asyncio.gather(mm.acquire(image_id), mm.acquire(image_id))
            assert b == [a, a] and mm.mounted() == {image_id: 3}
            assert len(swarm_mounts(a)) == 1
            for _ in range(3):
                await mm.release(image_id)
            assert mm.mounted() == {image_id: 0}  # kept for the idle window
            assert (a / "etc" / "conf").exists()
            assert await mm.acquire(image_id) == a  # reused, not remounted
            await mm.release(image_id)
            assert await mm.unmount_idle() == [image_id]
            assert mm.mounted() == {} and not swarm_mounts(a)
            await mm.acquire(image_id)  # left mounted: closing the manager unmounts it
        assert not swarm_mounts(tmp_path)

    run(main())


def test_dead_daemon_and_leftovers_are_cleaned(tmp_path: Path,
                                               small: tuple[Path, Path, bytes]) -> None:
    _, store_path, image_id = small
    state = tmp_path / "state"

    async def crash() -> None:
        async with MountManager(state, store_path, idle_s=0, chunk_size=CHUNK) as mm:
            mnt = await mm.acquire(image_id)
            pid = (await mm.stats(image_id))["pid"]
            os.kill(pid, signal.SIGKILL)
            m = mm._mounts[image_id]
            assert m.watcher is not None
            await m.watcher  # the manager notices and detaches the dead mount
            assert not swarm_mounts(mnt) and mm.mounted() == {}
            assert await mm.acquire(image_id) == mnt  # and mounts again on demand
            assert (mnt / "etc" / "conf").exists()
            await mm.release(image_id)

    run(crash())

    # a daemon nobody manages (started with a pipe: it does not notice our exit)
    mnt = state / "mnt" / to_hex(image_id)
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarm.fs.daemon", "--state-dir", str(state), "--image",
         to_hex(image_id), "--mountpoint", str(mnt), "--store", str(store_path),
         "--control-fd", str(w), "--chunk-size", str(CHUNK)],
        pass_fds=[w], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    with os.fdopen(r, "rb") as ready:
        assert b'"ready": true' in ready.readline()
    assert swarm_mounts(mnt)
    assert cleanup_leftovers(state) == [mnt]
    assert proc.wait() in (0, -signal.SIGKILL)
    assert not swarm_mounts(state)
    assert not list((state / "run").glob("*.pid"))


@pytest.fixture(scope="module")
def python_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """(store path, image id) of a Debian minbase with python3 (cached by recipe)."""
    from swarm.build.debootstrap import ensure_rootfs

    tree = ensure_rootfs(include=["python3"])
    base = tmp_path_factory.mktemp("python")
    with Store(base / "store", chunk_size=DEBIAN_CHUNK) as store:
        rec = import_directory(store, tree, ["python:test"])
    return base / "store", rec.id


@pytest.mark.slow
def test_python_import_reaches_the_daemon_rarely(tmp_path: Path,
                                                 python_image: tuple[Path, bytes]) -> None:
    """`import encodings` in a chroot on the mount: a fresh mount asks each name and reads
    each file once; a second run only opens files and lists directories (what pyfuse3
    cannot let the kernel cache), and reads nothing."""
    store_path, image_id = python_image
    code = "import encodings, json"

    async def main() -> tuple[dict[str, int], dict[str, int]]:
        async with MountManager(tmp_path / "state", store_path, idle_s=0,
                                chunk_size=DEBIAN_CHUNK) as mm:
            mnt = await mm.acquire(image_id)
            try:
                runs = []
                for _ in range(2):
                    await mm.control(image_id, "reset")
                    await asyncio.to_thread(subprocess.run, [
                        "chroot", str(mnt), "/usr/bin/python3", "-c", code], check=True)
                    runs.append((await mm.stats(image_id))["ops"])
            finally:
                await mm.release(image_id)
        return runs[0], runs[1]

    fresh, warm = run(main())
    assert fresh.get("flush", 0) <= 1 and fresh.get("getxattr", 0) <= 1, fresh
    assert fresh.get("getattr", 0) <= 2, fresh
    assert fresh["read"] <= 2 * fresh["open"], fresh  # 1 MiB readahead: few reads per file
    assert set(warm) <= {"open", "release", "opendir", "readdir", "releasedir", "readlink"}, warm


MANAGER_PROGRAM = """
import asyncio, json, sys
from swarm.fs.mounts import MountManager

async def main():
    async with MountManager(sys.argv[1], sys.argv[2], chunk_size=int(sys.argv[4])) as mm:
        image_id = bytes.fromhex(sys.argv[3])
        mnt = await mm.acquire(image_id)
        pid = (await mm.stats(image_id))["pid"]
        print(json.dumps({"mnt": str(mnt), "pid": pid}), flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


def wait_gone(pid: int) -> None:
    """Wait (on a pidfd, not a clock) for a process to exit."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([fd], [], [], 30)[0], f"process {pid} did not exit"
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_manager_exit_leaves_nothing(tmp_path: Path, small: tuple[Path, Path, bytes],
                                     how: signal.Signals) -> None:
    """Ctrl-C unwinds the manager, which unmounts; SIGKILL of the manager closes the
    daemons' control sockets, and they unmount themselves."""
    _, store_path, image_id = small
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-c", MANAGER_PROGRAM, str(state), str(store_path),
         to_hex(image_id), str(CHUNK)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    assert swarm_mounts(info["mnt"])
    proc.send_signal(how)
    proc.wait()
    wait_gone(info["pid"])
    assert not swarm_mounts(state)


def test_op_times_and_trace(tmp_path: Path, small: tuple[Path, Path, bytes],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Every op kind that reached the daemon has its time in the statistics; with
    SWARM_FS_TRACE set, the daemon writes every op (with its arguments) on unmount."""
    _, store_path, image_id = small
    trace_dir = tmp_path / "trace"
    monkeypatch.setenv(daemon_mod.TRACE_ENV, str(trace_dir))

    async def main() -> dict[str, Any]:
        async with MountManager(tmp_path / "state", store_path, idle_s=0,
                                chunk_size=CHUNK) as mm:
            mnt = await mm.acquire(image_id)
            try:
                await asyncio.to_thread((mnt / "etc" / "conf").read_bytes)
                await asyncio.to_thread((mnt / "nope").exists)
                stats = await mm.stats(image_id)
            finally:
                await mm.release(image_id)
        return stats

    stats = run(main())
    assert set(stats["op_ms"]) == set(stats["ops"]) and "read" in stats["ops"]
    (trace,) = trace_dir.glob("*.trace.jsonl")
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [r[3][1] for r in rows if r[2] == "lookup"][-1] == "nope"
    assert sum(1 for r in rows if r[2] == "read") == stats["ops"]["read"]
    assert all(r[1] >= 0 for r in rows)


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "exec"])
def test_zygote_builds_the_tree_before_forking(tmp_path: Path, small: tuple[Path, Path, bytes],
                                               zygote: bool) -> None:
    """A zygote builds an image's tree once and forks it into each daemon of the image;
    what the mount serves is the same either way."""
    src, store_path, image_id = small

    async def main() -> list[tuple[bool, Any]]:
        seen = []
        async with MountManager(tmp_path / "state", store_path, idle_s=0,
                                chunk_size=CHUNK, zygote=zygote) as mm:
            for _ in range(2):  # the second mount is a new daemon (idle_s=0 unmounted)
                mnt = await mm.acquire(image_id)
                try:
                    view = await asyncio.to_thread(snapshot, mnt)
                    seen.append(((await mm.stats(image_id))["tree_prepared"], view))
                finally:
                    await mm.release(image_id)
        return seen

    (first, view1), (second, view2) = run(main())
    assert first == second == zygote
    assert view1 == view2 and diff(view1, snapshot(src)) == []


def test_blobs_read_are_stored_once_the_last_container_is_gone(
        tmp_path: Path, small: tuple[Path, Path, bytes]) -> None:
    """The daemon answers reads from fetched bytes and stores them behind; the mount's
    last release (the mount stays up for its idle window) has them committed."""
    src, store_path, image_id = small
    state = tmp_path / "state"
    with Store(state / "store", chunk_size=CHUNK) as local, \
            Store(store_path, chunk_size=CHUNK) as remote:
        local.put(remote.get(image_id))  # a cold node: only the index
        conf = images.load_index(remote, image_id).get("/etc/conf")
        assert conf is not None and conf.digest is not None

    async def main() -> None:
        async with MountManager(state, source=store_path, idle_s=3600, chunk_size=CHUNK,
                                prefetch=False) as mm:
            mnt = await mm.acquire(image_id)
            try:
                got = await asyncio.to_thread((mnt / "etc" / "conf").read_bytes)
                assert got == (src / "etc" / "conf").read_bytes()
            finally:
                await mm.release(image_id)
            assert mm.mounted() == {image_id: 0}  # still mounted, idle
            with Store(state / "store", chunk_size=CHUNK) as local:
                assert local.has(conf.digest)

    run(main())
