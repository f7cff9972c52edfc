"""The pure inode tree (swarm.fs.tree), without a mount."""

from __future__ import annotations

import asyncio
import errno
import random
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm.digest import hash_bytes
from swarm.errors import BlobMissing, CorruptBlob
from swarm.fs.index import Entry, Index
from swarm.fs.source import Fetcher, StoreSource
from swarm.fs.tree import ROOT_INO, ContentReader, Tree
from swarm.store import Store

CHUNK = 1024


def _dig(data: bytes) -> bytes:
    return hash_bytes(data)


def sample_index(contents: dict[bytes, bytes]) -> Index:
    """A small tree with every kind, a hard-link group, xattrs and nested directories."""
    return Index([
        Entry(b"/", "dir", 0o755, mtime_ns=1),
        Entry(b"/bin", "dir", 0o755, mtime_ns=2),
        Entry(b"/bin/big", "file", 0o755, 0, 0, len(contents[b"big"]), 3,
              _dig(contents[b"big"])),
        Entry(b"/bin/a", "file", 0o644, 1, 2, 5, 4, _dig(b"hello"), link=0),
        Entry(b"/bin/b", "file", 0o644, 1, 2, 5, 4, _dig(b"hello"), link=0),
        Entry(b"/etc", "dir", 0o755, mtime_ns=5),
        Entry(b"/etc/a-link", "file", 0o644, 1, 2, 5, 4, _dig(b"hello"), link=0),
        Entry(b"/etc/empty", "file", 0o600, size=0, digest=_dig(b"")),
        Entry(b"/etc/sub", "dir", 0o700, 3, 4, mtime_ns=6,
              xattrs={"user.note": b"hi", "security.capability": b"\x01\x02"}),
        Entry(b"/etc/sub/deeper", "dir", 0o755),
        Entry(b"/lib", "symlink", 0o777, size=7, target=b"usr/lib"),
        Entry(b"/dev", "dir", 0o755),
        Entry(b"/dev/null", "char", 0o666, rdev=0x103),
        Entry(b"/dev/fifo", "fifo", 0o644),
    ])


@pytest.fixture
def contents() -> dict[bytes, bytes]:
    rnd = random.Random(7)
    return {b"big": bytes(rnd.getrandbits(8) for _ in range(5 * CHUNK + 123))}


@pytest.fixture
def store(tmp_path: Path, contents: dict[bytes, bytes]) -> Store:
    s = Store(tmp_path / "store", chunk_size=CHUNK)
    for data in (*contents.values(), b"hello", b""):
        s.put(data)
    yield s
    s.close()


def path_ino(tree: Tree, path: bytes) -> int:
    ino = ROOT_INO
    for part in [p for p in path.split(b"/") if p]:
        attrs = tree.lookup(ino, part)
        assert attrs is not None, path
        ino = attrs.ino
    return ino


def test_inodes_links_and_attrs(contents: dict[bytes, bytes]) -> None:
    tree = Tree(sample_index(contents))
    assert tree.getattr(ROOT_INO).mode == stat.S_IFDIR | 0o755
    a, b, c = (path_ino(tree, p) for p in (b"/bin/a", b"/bin/b", b"/etc/a-link"))
    assert a == b == c
    assert tree.getattr(a).nlink == 3
    assert tree.getattr(ROOT_INO).nlink == 2 + 3  # bin, etc, dev
    assert tree.getattr(path_ino(tree, b"/etc")).nlink == 3  # one subdirectory
    assert tree.getattr(path_ino(tree, b"/bin/big")).nlink == 1
    sub = tree.getattr(path_ino(tree, b"/etc/sub"))
    assert (sub.uid, sub.gid, sub.mode) == (3, 4, stat.S_IFDIR | 0o700)
    null = tree.getattr(path_ino(tree, b"/dev/null"))
    assert stat.S_ISCHR(null.mode) and null.rdev == 0x103
    assert stat.S_ISFIFO(tree.getattr(path_ino(tree, b"/dev/fifo")).mode)
    assert tree.readlink(path_ino(tree, b"/lib")) == b"usr/lib"
    assert tree.inode_count == 12  # 14 entries, two of them extra links


def test_lookup_errors_and_dots(contents: dict[bytes, bytes]) -> None:
    tree = Tree(sample_index(contents))
    etc = path_ino(tree, b"/etc")
    assert tree.lookup(etc, b"nope") is None
    assert tree.lookup(etc, b".").ino == etc  # type: ignore[union-attr]
    assert tree.lookup(etc, b"..").ino == ROOT_INO  # type: ignore[union-attr]
    assert tree.lookup(ROOT_INO, b"..").ino == ROOT_INO  # type: ignore[union-attr]
    with pytest.raises(NotADirectoryError):
        tree.lookup(path_ino(tree, b"/bin/a"), b"x")
    with pytest.raises(FileNotFoundError):
        tree.lookup(999, b"x")
    with pytest.raises(FileNotFoundError):
        tree.getattr(0)
    with pytest.raises(OSError) as err:
        tree.readlink(etc)
    assert err.value.errno == errno.EINVAL


def test_readdir_resumes_at_every_offset(contents: dict[bytes, bytes]) -> None:
    tree = Tree(sample_index(contents))
    etc = path_ino(tree, b"/etc")
    full = list(tree.readdir(etc))
    assert [n for n, _, _ in full] == [b".", b"..", b"a-link", b"empty", b"sub"]
    assert full[0][1].ino == etc and full[1][1].ino == ROOT_INO
    for i, (_, _, nxt) in enumerate(full):
        assert list(tree.readdir(etc, nxt)) == full[i + 1:]
    assert list(tree.readdir(etc, 0)) == full
    with pytest.raises(NotADirectoryError):
        list(tree.readdir(path_ino(tree, b"/lib")))


def test_xattrs(contents: dict[bytes, bytes]) -> None:
    tree = Tree(sample_index(contents))
    sub = path_ino(tree, b"/etc/sub")
    assert sorted(tree.listxattr(sub)) == [b"security.capability", b"user.note"]
    assert tree.getxattr(sub, b"user.note") == b"hi"
    assert tree.listxattr(ROOT_INO) == []
    with pytest.raises(OSError) as err:
        tree.getxattr(sub, b"user.other")
    assert err.value.errno == errno.ENODATA
    assert tree.has_xattrs
    assert not Tree(Index([Entry(b"/", "dir", 0o755)])).has_xattrs


def test_read_multi_chunk(store: Store, contents: dict[bytes, bytes]) -> None:
    tree = Tree(sample_index(contents), ContentReader(store))
    big = contents[b"big"]
    ino = path_ino(tree, b"/bin/big")
    rnd = random.Random(1)

    async def reads() -> None:
        for _ in range(50):
            off = rnd.randrange(0, len(big) + 10)
            size = rnd.randrange(0, 3 * CHUNK)
            assert await tree.read(ino, off, size) == big[off:off + size]
        assert await tree.read(path_ino(tree, b"/bin/b"), 0, 100) == b"hello"
        assert await tree.read(path_ino(tree, b"/etc/empty"), 0, 100) == b""
        with pytest.raises(IsADirectoryError):
            await tree.read(ROOT_INO, 0, 1)
        with pytest.raises(OSError):
            await tree.read(path_ino(tree, b"/lib"), 0, 1)

    asyncio.run(reads())


def test_read_records_first_reads(store: Store, contents: dict[bytes, bytes]) -> None:
    seen: list[bytes] = []
    tree = Tree(sample_index(contents), ContentReader(store, on_read=seen.append))

    async def reads() -> None:
        await tree.read(path_ino(tree, b"/bin/a"), 0, 5)
        await tree.read(path_ino(tree, b"/etc/empty"), 0, 5)  # empty: no content read
        await tree.read(path_ino(tree, b"/bin/big"), 0, 5)

    asyncio.run(reads())
    assert seen == [_dig(b"hello"), _dig(contents[b"big"])]


def test_read_missing_and_size_mismatch(tmp_path: Path, contents: dict[bytes, bytes]) -> None:
    with Store(tmp_path / "empty", chunk_size=CHUNK) as empty:
        tree = Tree(sample_index(contents), ContentReader(empty))
        with pytest.raises(BlobMissing):
            asyncio.run(tree.read(path_ino(tree, b"/bin/a"), 0, 5))
        empty.put(b"hell")
        lying = Index([Entry(b"/", "dir", 0o755),
                       Entry(b"/f", "file", 0o644, size=10, digest=_dig(b"hell"))])
        tree = Tree(lying, ContentReader(empty))
        with pytest.raises(OSError) as err:
            asyncio.run(tree.read(path_ino(tree, b"/f"), 0, 10))
        assert err.value.errno == errno.EIO


def test_read_fetches_missing(tmp_path: Path, store: Store, contents: dict[bytes, bytes]) -> None:
    with Store(tmp_path / "local", chunk_size=CHUNK) as local:
        source = StoreSource(store)
        reader = ContentReader(local, Fetcher(local, source))
        tree = Tree(sample_index(contents), reader)
        big = contents[b"big"]

        async def reads() -> None:
            assert await tree.read(path_ino(tree, b"/bin/big"), 100, 50) == big[100:150]
            assert await tree.read(path_ino(tree, b"/bin/big"), 0, len(big)) == big
            assert reader.fetcher is not None
            await reader.fetcher.aclose()  # the store write goes on after the reads

        asyncio.run(reads())
        assert reader.misses == 1  # the whole file came on the first miss
        assert source.fetches == 6  # its six chunks, each once
        assert local.has(_dig(big))


def test_corrupt_local_blob_raises(tmp_path: Path) -> None:
    with Store(tmp_path / "s", chunk_size=CHUNK, verify_on_read=True) as s:
        digest = s.put(b"good bytes")
        with s.env.begin(write=True) as txn:
            txn.put(digest, b"evil bytes", db=s.db["blobs"])
        index = Index([Entry(b"/", "dir", 0o755),
                       Entry(b"/f", "file", 0o644, size=10, digest=digest)])
        tree = Tree(index, ContentReader(s))
        with pytest.raises(CorruptBlob):
            asyncio.run(tree.read(path_ino(tree, b"/f"), 0, 10))


# ---------------------------------------------------------------------- generated trees
NAMES = st.sampled_from([b"a", b"b", b"c", b"lib", b"x.py", b"\xff\xfe", b"sp ace"])


@st.composite
def indexes(draw: st.DrawFn) -> Index:
    entries = {b"/": Entry(b"/", "dir", 0o755)}
    dirs = [b"/"]
    files: list[bytes] = []
    for _ in range(draw(st.integers(0, 40))):
        parent = draw(st.sampled_from(dirs))
        path = (parent if parent != b"/" else b"") + b"/" + draw(NAMES)
        if path in entries:
            continue
        kind = draw(st.sampled_from(["dir", "dir", "file", "file", "file", "symlink"]))
        mode, uid = draw(st.integers(0, 0o7777)), draw(st.integers(0, 70000))
        if kind == "dir":
            entries[path] = Entry(path, "dir", mode, uid)
            dirs.append(path)
        elif kind == "file":
            size = draw(st.integers(0, 5000))
            entries[path] = Entry(path, "file", mode, uid, size=size,
                                  digest=hash_bytes(size.to_bytes(4, "big")))
            files.append(path)
        else:
            entries[path] = Entry(path, "symlink", 0o777, uid, size=1, target=b"x")
    # hard-link groups: some files join the group of an earlier file (same content)
    for i, path in enumerate(files):
        if i and draw(st.booleans()):
            head = entries[files[draw(st.integers(0, i - 1))]]
            group = head.link if head.link is not None else len(files) + i
            entries[head.path] = head._replace(link=group)
            entries[path] = head._replace(path=path, link=group)
    return Index(entries.values())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(indexes())
def test_generated_trees(index: Index) -> None:
    tree = Tree(index)
    by_ino: dict[int, list[Entry]] = {}
    seen_paths = set()

    def walk(ino: int, path: bytes) -> None:
        listing = list(tree.readdir(ino))
        assert [n for n, _, _ in listing[:2]] == [b".", b".."]
        for i, (_, _, nxt) in enumerate(listing):  # resuming never skips or repeats
            assert list(tree.readdir(ino, nxt)) == listing[i + 1:]
        subdirs = 0
        for name, attrs, _ in listing[2:]:
            child = (path if path != b"/" else b"") + b"/" + name
            assert tree.lookup(ino, name) == attrs
            e = index.by_path[child]
            seen_paths.add(child)
            by_ino.setdefault(attrs.ino, []).append(e)
            assert attrs.mode == e.st_mode and attrs.uid == e.uid and attrs.size == e.size
            if e.kind == "dir":
                subdirs += 1
                walk(attrs.ino, child)
        assert tree.getattr(ino).nlink == 2 + subdirs

    walk(ROOT_INO, b"/")
    assert seen_paths == set(index.by_path) - {b"/"}
    assert len(by_ino) + 1 == tree.inode_count
    for ino, group in by_ino.items():
        links = {e.link for e in group}
        assert len(group) == 1 or (len(links) == 1 and None not in links)
        if group[0].kind != "dir":
            assert tree.getattr(ino).nlink == len(group)
    groups: dict[int, set[int]] = {}
    for ino, group in by_ino.items():
        for e in group:
            if e.link is not None:
                groups.setdefault(e.link, set()).add(ino)
    assert all(len(inos) == 1 for inos in groups.values())
