"""Hot trees built on a cold node: fetched through a Fetcher, written as files arrive."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from swarm.build.importer import import_directory
from swarm.digest import hash_bytes
from swarm.fs import hotset, images
from swarm.fs.hotdir import HOT_DIR, async_prepare_hot_tree, hot_tree_dir
from swarm.fs.source import Fetcher, StoreSource
from swarm.store import Store

CHUNK = 1024


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Store, Store, bytes]:
    """An image in an origin store; a local store that has its index but none of its
    file contents (a cold node)."""
    src = tmp_path / "src"
    (src / "lib" / "deep").mkdir(parents=True)
    (src / "lib" / "a.py").write_bytes(b"print('a')\n")
    (src / "lib" / "deep" / "big.so").write_bytes(os.urandom(5 * CHUNK + 17))
    (src / "lib" / "cold.txt").write_bytes(b"never read at start-up\n")
    os.link(src / "lib" / "a.py", src / "lib" / "a-link.py")
    os.symlink("deep/big.so", src / "lib" / "big.so")
    os.chmod(src / "lib" / "a.py", 0o751)
    os.utime(src / "lib" / "deep", ns=(1_000_000_123, 1_000_000_123))
    origin = Store(tmp_path / "origin", chunk_size=CHUNK)
    local = Store(tmp_path / "state" / "store", chunk_size=CHUNK)
    rec = import_directory(origin, src, ["t:1"])
    import_directory(local, src, ["t:1"])
    local.drop(images.load_index(local, rec.id).file_digests())
    yield src, origin, local, rec.id
    local.close()
    origin.close()


def test_cold_node_builds_the_tree_from_fetched_bytes(
        tmp_path: Path, image: tuple[Path, Store, Store, bytes]) -> None:
    src, origin, local, image_id = image
    hot = [hash_bytes((src / "lib" / "a.py").read_bytes()),
           hash_bytes((src / "lib" / "deep" / "big.so").read_bytes())]
    hotset.save(local, image_id, hot)
    state = tmp_path / "state"
    source = StoreSource(origin)
    fetcher = Fetcher(local, source)

    async def main() -> Path | None:
        tree = await async_prepare_hot_tree(local, state, image_id, fetcher)
        await fetcher.aclose()
        return tree

    tree = asyncio.run(main())
    assert tree == hot_tree_dir(state, image_id, images.hot_set(local, image_id))
    for rel in ("lib/a.py", "lib/a-link.py", "lib/deep/big.so"):
        got, want = os.lstat(tree / rel), os.lstat(src / rel)
        assert (tree / rel).read_bytes() == (src / rel).read_bytes(), rel
        assert (got.st_mode, got.st_mtime_ns, got.st_uid) == (
            want.st_mode, want.st_mtime_ns, want.st_uid), rel
    assert os.lstat(tree / "lib" / "a.py").st_ino == os.lstat(tree / "lib" / "a-link.py").st_ino
    assert os.readlink(tree / "lib" / "big.so") == "deep/big.so"
    assert os.lstat(tree / "lib" / "deep").st_mtime_ns == 1_000_000_123
    assert not (tree / "lib" / "cold.txt").exists()
    # the fetched blobs reached the local store too (behind the tree), each fetched once
    assert all(local.has(d) for d in hot)
    assert source.fetches == 1 + 6  # a.py, and big.so's six chunks
    assert sorted(p.name for p in (state / HOT_DIR / image_id.hex()).iterdir()) == [tree.name]


def test_a_failed_fetch_leaves_no_tree(tmp_path: Path,
                                       image: tuple[Path, Store, Store, bytes]) -> None:
    src, origin, local, image_id = image
    a_py = hash_bytes((src / "lib" / "a.py").read_bytes())
    hotset.save(local, image_id, [a_py, hash_bytes((src / "lib" / "cold.txt").read_bytes())])
    origin.drop([a_py])  # the source cannot provide it
    state = tmp_path / "state"
    fetcher = Fetcher(local, StoreSource(origin))

    async def main() -> Path | None:
        tree = await async_prepare_hot_tree(local, state, image_id, fetcher)
        await fetcher.aclose()
        return tree

    assert asyncio.run(main()) is None
    assert list((state / HOT_DIR / image_id.hex()).iterdir()) == []  # no temporary left
