"""Hot trees on a tmpfs (swarm.fs.hotdir.mount_hot_tmpfs), and trees of one image built
by several starts at once."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
from pathlib import Path

import pytest

from swarm.build.importer import import_directory
from swarm.digest import hash_bytes
from swarm.fs import hotset, images
from swarm.fs.hotdir import (
    HOT_DIR,
    HOT_OWNER_FILE,
    ensure_hot_tree,
    hot_tree_dir,
    mount_hot_tmpfs,
    remove_hot_trees,
)
from swarm.fs.mounts import detach
from swarm.store import Store

ME = {"pid": 1, "start": "me"}
LIVE = {"pid": 2, "start": "live"}


def _alive(owner: dict) -> bool:
    return owner == LIVE


def _fstype(path: Path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.mark.root
def test_hot_trees_get_a_tmpfs_once(tmp_path, monkeypatch):
    state = tmp_path / "state"
    stale = state / HOT_DIR / ("ab" * 32)  # an image's trees left on disk by a run
    (stale / "old-tree").mkdir(parents=True)
    monkeypatch.delenv("SWARM_HOT_TMPFS", raising=False)
    hot = mount_hot_tmpfs(state, LIVE, _alive)
    try:
        assert hot == state / HOT_DIR
        assert os.path.ismount(hot) and _fstype(hot) == "tmpfs"
        assert [p.name for p in hot.iterdir()] == [HOT_OWNER_FILE]
        # a live engine's tmpfs is left alone; a dead one's is adopted, once
        assert mount_hot_tmpfs(state, ME, _alive) is None
        (hot / HOT_OWNER_FILE).write_text('{"pid": 3, "start": "dead"}')
        assert mount_hot_tmpfs(state, ME, _alive) == hot
        assert mount_hot_tmpfs(state, LIVE, lambda o: o == ME) is None
        (hot / HOT_OWNER_FILE).unlink()  # a tmpfs we did not mount: never ours
        assert mount_hot_tmpfs(state, ME, _alive) is None
    finally:
        assert hot is not None and detach(hot)
    assert not (stale / "old-tree").exists()  # not in use: removed, not hidden
    monkeypatch.setenv("SWARM_HOT_TMPFS", "0")
    assert mount_hot_tmpfs(state, ME, _alive) is None
    assert not os.path.ismount(state / HOT_DIR)


@pytest.mark.root
def test_a_tree_in_use_keeps_the_hot_directory_on_disk(tmp_path, monkeypatch):
    state = tmp_path / "state"
    busy = state / HOT_DIR / "img" / f".tmp-0123456789abcdef-{os.getpid()}-x"
    busy.mkdir(parents=True)  # being built by a live process (this one)
    monkeypatch.delenv("SWARM_HOT_TMPFS", raising=False)
    assert mount_hot_tmpfs(state, ME, _alive) is None
    assert busy.is_dir() and not os.path.ismount(state / HOT_DIR)


def test_removal_spares_trees_being_built(tmp_path):
    state = tmp_path / "state"
    img = state / HOT_DIR / ("00" * 32)
    live = img / f".tmp-0123456789abcdef-{os.getpid()}-aa"
    dead = img / ".tmp-0123456789abcdef-999999999-bb"  # no such pid
    done = img / "0123456789abcdef"
    for d in (live, dead, done):
        d.mkdir(parents=True)
    assert remove_hot_trees(state) == 2
    assert live.is_dir() and not dead.exists() and not done.exists()


def test_starts_of_one_image_build_its_tree_side_by_side(tmp_path):
    """Several threads of one process building the same tree (two containers of an
    image starting at once) all get the complete tree."""
    src = tmp_path / "src"
    (src / "lib").mkdir(parents=True)
    files = {f"lib/f{i}.py": os.urandom(3000 + i) for i in range(40)}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    state = tmp_path / "state"
    with Store(state / "store") as store:
        rec = import_directory(store, src, ["t:1"])
        hotset.save(store, rec.id, [hash_bytes(d) for d in files.values()])
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            trees = list(pool.map(lambda _: ensure_hot_tree(store, state, rec.id), range(8)))
        want = hot_tree_dir(state, rec.id, images.hot_set(store, rec.id))
    assert trees == [want] * 8
    for rel, data in files.items():
        assert (want / rel).read_bytes() == data
    assert [p.name for p in want.parent.iterdir()] == [want.name]  # no temporary left
