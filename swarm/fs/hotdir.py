"""Hot trees: an image's hot files materialized as a plain directory, stacked above the
image's FUSE mount as the top overlay lower layer.

Measured on the numpy workload (ops/bench/coldstart.py): even with every kernel cache
warm, a container start sends ~180 open and ~180 release requests to the FUSE daemon,
one per file Python opens, at 100-350 us each from Python. Files that are already local
need no daemon at all: written once into ``<state>/hot/<image>/<hot-set>/`` with the
image's exact metadata, they are served by the kernel from the local filesystem, and the
FUSE mount below answers only for the rest (overlayfs looks a name up in the top lower
first). The tree holds the files whose digests are in the image's hot set, every symlink
(cheap, and readlink is a daemon round trip too), and the directories above them with the
image's metadata (a merged directory shows the topmost layer's attributes).

A tree is built only when every blob of the hot set is in the local store, into a
temporary directory renamed into place, so a tree that exists is complete; it is named by
the hot-set digest, so a grown hot set yields a new tree and never changes one an overlay
is using (overlayfs forbids changing a lower layer under a mount).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
from pathlib import Path

from swarm.digest import to_hex
from swarm.fs import hotset, images
from swarm.fs.index import Entry, Index
from swarm.fs.materialize import export_directory
from swarm.fs.source import Fetcher
from swarm.store import Store

log = logging.getLogger(__name__)

HOT_DIR = "hot"


def hot_tree_dir(state_dir: Path, image_id: bytes, hot_set_digest: bytes) -> Path:
    return state_dir / HOT_DIR / to_hex(image_id) / to_hex(hot_set_digest)[:16]


def select(index: Index, hot: set[bytes]) -> Index:
    """The sub-index a hot tree holds: hot files, symlinks, and their ancestors."""
    chosen: list[Entry] = [e for e in index
                           if (e.kind == "file" and e.digest in hot) or e.kind == "symlink"]
    by_path = index.by_path
    dirs: dict[bytes, Entry] = {b"/": by_path[b"/"]}
    for e in chosen:
        parent = e.parent
        while parent not in dirs:
            dirs[parent] = by_path[parent]
            parent = dirs[parent].parent
    return Index([*dirs.values(), *chosen], index.config)


def ensure_hot_tree(store: Store, state_dir: Path, image_id: bytes) -> Path | None:
    """The image's hot tree, building it if the hot set is recorded and wholly local;
    None when there is no hot set yet or some of its blobs are missing here."""
    hot_digest = images.hot_set(store, image_id)
    if hot_digest is None:
        return None
    dest = hot_tree_dir(state_dir, image_id, hot_digest)
    if dest.is_dir():
        return dest
    digests = hotset.load(store, image_id)
    if not digests or any(store.missing(d) for d in digests):
        return None
    index = images.load_index(store, image_id)
    sub = select(index, set(digests))
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_directory(store, sub, tmp)
        os.rename(tmp, dest)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        return dest  # another process built it first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_hot_trees(state_dir, image_id, keep=dest)
    log.info("hot tree of %s: %d entries at %s", to_hex(image_id)[:12], len(sub), dest)
    return dest


HOT_PREFETCH_CONCURRENCY = 16  # origin/peer reads in flight while a hot set comes in


async def async_prepare_hot_tree(store: Store, state_dir: Path, image_id: bytes,
                                 fetcher: Fetcher | None) -> Path | None:
    """``ensure_hot_tree``, first bringing a recorded hot set in through ``fetcher`` when
    some of it is missing here (a cold node)."""
    tree = await asyncio.to_thread(ensure_hot_tree, store, state_dir, image_id)
    if tree is not None or fetcher is None:
        return tree
    hot_digest = images.hot_set(store, image_id)
    if hot_digest is None:
        return None
    await fetcher.ensure(hot_digest)
    digests = await asyncio.to_thread(hotset.load, store, image_id)
    report = await fetcher.prefetch(digests, HOT_PREFETCH_CONCURRENCY)
    if report.failed:
        return None
    return await asyncio.to_thread(ensure_hot_tree, store, state_dir, image_id)


def trees_in_use() -> set[Path]:
    """Hot trees that a mounted overlay has as a lower layer (never to be removed)."""
    used = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            if b" - overlay " not in line:
                continue
            for opt in line.rsplit(b" ", 1)[-1].strip().split(b","):
                if opt.startswith(b"lowerdir="):
                    for part in opt[len(b"lowerdir="):].split(b":"):
                        used.add(Path(os.fsdecode(part.replace(b"\\040", b" "))))
    return used


def remove_hot_trees(state_dir: Path, image_id: bytes | None = None, *,
                     keep: Path | None = None) -> int:
    """Remove hot trees (of one image, or all) that no overlay uses: after ``cache drop``,
    and old trees once a grown hot set has a new one. Returns how many were removed."""
    root = state_dir / HOT_DIR
    images_dirs = [root / to_hex(image_id)] if image_id is not None else (
        list(root.iterdir()) if root.is_dir() else [])
    used = trees_in_use()
    removed = 0
    for d in images_dirs:
        if not d.is_dir():
            continue
        for tree in d.iterdir():
            if tree == keep or tree in used:
                continue
            shutil.rmtree(tree, ignore_errors=True)
            removed += 1
    return removed
