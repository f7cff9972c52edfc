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

Where the engine runs as root, ``<state>/hot`` is a tmpfs (:func:`mount_hot_tmpfs`): a
cold start builds the tree on its critical path, and on this machine's ext4 creating its
~1100 entries took ~60 ms against ~9 ms on tmpfs. Trees are caches of immutable content,
so losing them at reboot costs one rebuild from the store. ``SWARM_HOT_TMPFS`` sets the
tmpfs's size (default 1g; a full one only means a start without a tree), ``0`` keeps the
trees on the state directory's filesystem.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swarm.digest import to_hex
from swarm.errors import SwarmError
from swarm.fs import hotset, images
from swarm.fs.index import Entry, Index
from swarm.fs.materialize import WRITE_FLAGS, apply_meta, export_directory
from swarm.fs.source import Fetcher
from swarm.store import Store

log = logging.getLogger(__name__)

HOT_DIR = "hot"
HOT_TMPFS_ENV = "SWARM_HOT_TMPFS"
HOT_OWNER_FILE = ".owner"  # in the tmpfs: the engine that mounted it, {"pid", "start"}
DEFAULT_HOT_TMPFS_SIZE = "1g"


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
    tmp = _temp_tree(dest)
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


# Hot files smaller than this are written on the loop: open, write, close and metadata
# take less than handing them to a worker thread (most of a hot set is this small).
INLINE_WRITE_BYTES = 64 << 10
HOT_PREFETCH_CONCURRENCY = 16  # origin/peer reads in flight while a hot set comes in


class _TreeWriter:
    """Writes a hot tree into a temporary directory while its files arrive: directories
    and symlinks first, each file as soon as its content is here, directory metadata
    last (creating a child changes its parent's mtime)."""

    def __init__(self, sub: Index, root: Path) -> None:
        self.sub = sub
        self.root = os.fsencode(root)
        self.files: dict[bytes, list[Entry]] = {}
        self.dirs: list[tuple[bytes, Entry]] = []

    def _path(self, e: Entry) -> bytes:
        return self.root + e.path if e.path != b"/" else self.root

    def skeleton(self) -> None:
        os.mkdir(self.root, 0o700)
        for e in self.sub:
            path = self._path(e)
            if e.kind == "dir":
                if e.path != b"/":
                    os.mkdir(path, 0o700)
                self.dirs.append((path, e))
            elif e.kind == "symlink":
                assert e.target is not None
                os.symlink(e.target, path)
                apply_meta(path, e)
            elif e.kind == "file":
                assert e.digest is not None
                self.files.setdefault(e.digest, []).append(e)

    def write(self, digest: bytes, data: bytes) -> None:
        """Every path of the tree whose content is ``data`` (hard links linked)."""
        first_of_group: dict[int, bytes] = {}
        for e in self.files.get(digest, ()):
            path = self._path(e)
            if e.link is not None and e.link in first_of_group:
                os.link(first_of_group[e.link], path, follow_symlinks=False)
                continue
            fd = os.open(path, WRITE_FLAGS, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            apply_meta(path, e)
            if e.link is not None:
                first_of_group[e.link] = path

    def finish(self) -> None:
        for path, e in reversed(self.dirs):
            apply_meta(path, e)
            os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


async def async_prepare_hot_tree(store: Store, state_dir: Path, image_id: bytes,
                                 fetcher: Fetcher | None) -> Path | None:
    """``ensure_hot_tree``; on a node that lacks some of a recorded hot set (a cold node),
    the hot set is fetched through ``fetcher`` and the tree written as its files arrive,
    from the verified bytes (the store gets them too, behind): the tree is ready about
    when the last file is, not after every commit and a second pass reading them back."""
    tree = await asyncio.to_thread(ensure_hot_tree, store, state_dir, image_id)
    if tree is not None or fetcher is None:
        return tree
    hot_digest = images.hot_set(store, image_id)
    if hot_digest is None:
        return None
    await fetcher.ensure(hot_digest)
    digests = await asyncio.to_thread(hotset.load, store, image_id)
    if not digests:
        return None
    index = images.load_index(store, image_id)
    sub = select(index, set(digests))
    dest = hot_tree_dir(state_dir, image_id, hot_digest)
    tmp = _temp_tree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    writer = _TreeWriter(sub, tmp)
    sizes = {e.digest: e.size for e in sub if e.kind == "file" and e.digest is not None}
    writes: list[asyncio.Future[None]] = []  # threads outlive a cancelled worker
    workers: list[asyncio.Future[None]] = []
    try:
        # the directories are made while the first files are fetched (1110 entries of
        # the numpy image: 20-100 ms of mkdir, symlink and metadata calls)
        skeleton = asyncio.ensure_future(asyncio.to_thread(writer.skeleton))
        writes.append(skeleton)
        # Largest first: the tree is used only once complete, so the hot set's order
        # (the order of reads) does not matter here, and a big file started late was the
        # tail of the build (numpy's: a 4 MiB file from 85 to 110 ms of 110; largest
        # first, the last file was in at ~95 ms). Taking small files from the other end
        # at the same time was slower: the loop is CPU-bound, nothing overlaps.
        pending = iter(sorted((d for d in digests if d in sizes), key=lambda d: -sizes[d]))

        async def worker() -> None:
            for digest in pending:
                data = await fetcher.read(digest, 0, sizes[digest], size=sizes[digest])
                if len(data) != sizes[digest]:
                    raise SwarmError(f"blob {to_hex(digest)} is {len(data)} bytes, the "
                                     f"index says {sizes[digest]}")
                await asyncio.shield(skeleton)  # its directory exists
                if len(data) < INLINE_WRITE_BYTES:  # a few syscalls: less than a hop
                    writer.write(digest, data)
                    continue
                writes.append(asyncio.ensure_future(
                    asyncio.to_thread(writer.write, digest, data)))
                await asyncio.shield(writes[-1])

        workers = [asyncio.ensure_future(worker()) for _ in range(HOT_PREFETCH_CONCURRENCY)]
        await asyncio.gather(*workers)
        await skeleton
        await asyncio.to_thread(writer.finish)
        return await asyncio.to_thread(_install, tmp, dest, state_dir, image_id, len(sub))
    except (SwarmError, OSError) as err:
        log.warning("hot tree of %s not built: %s", to_hex(image_id)[:12], err)
        return None
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, *writes, return_exceptions=True)
        if tmp.exists():
            await asyncio.to_thread(shutil.rmtree, tmp, True)


def _temp_tree(dest: Path) -> Path:
    """Where a tree for ``dest`` is built: unique per build, since two starts of one image
    in one process build it side by side (the first to finish renames it into place);
    named ``.tmp-NAME-PID-RANDOM`` so :func:`_building` can tell a live build."""
    return dest.with_name(f".tmp-{dest.name}-{os.getpid()}-{secrets.token_hex(4)}")


def _install(tmp: Path, dest: Path, state_dir: Path, image_id: bytes, entries: int) -> Path:
    """Rename a finished tree into place (a tree that exists is complete)."""
    try:
        os.rename(tmp, dest)
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        return dest  # another process built it first
    remove_hot_trees(state_dir, image_id, keep=dest)
    log.info("hot tree of %s: %d entries at %s", to_hex(image_id)[:12], entries, dest)
    return dest


def mount_hot_tmpfs(state_dir: Path, owner: dict[str, Any],
                    owner_alive: Callable[[dict[str, Any]], bool]) -> Path | None:
    """Make ``<state>/hot`` a tmpfs when running as root (see the module's doc) and record
    ``owner`` (the engine's pid and start time) in it; returns the mountpoint for the
    caller to detach when it is done, or None when there is nothing for it to detach.

    A tmpfs already there is adopted when its recorded owner is dead (a SIGKILLed engine
    left it: its successor cleans up, at its own exit), and left alone when the owner
    lives or none is recorded (not ours). Trees already on disk that no overlay uses are
    removed before mounting; if any is in use, the directory is left as it is."""
    size = os.environ.get(HOT_TMPFS_ENV, DEFAULT_HOT_TMPFS_SIZE).strip()
    root = state_dir / HOT_DIR
    if size in ("", "0") or os.geteuid() != 0:
        return None
    record = root / HOT_OWNER_FILE
    if os.path.ismount(root):
        try:
            current = json.loads(record.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(current, dict) or owner_alive(current):
            return None
        record.write_text(json.dumps(owner))
        return root
    from swarm.runtime.overlay import mount_tmpfs

    remove_hot_trees(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    for d in root.iterdir():  # image directories the removal emptied
        with contextlib.suppress(OSError):
            d.rmdir()
    if any(root.iterdir()):
        return None
    try:
        mount_tmpfs(root, f"size={size},mode=0700")
    except SwarmError as err:
        log.warning("hot trees stay on disk: %s", err)
        return None
    record.write_text(json.dumps(owner))
    return root


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
            if tree == keep or tree in used or _building(tree):
                continue
            shutil.rmtree(tree, ignore_errors=True)
            removed += 1
    return removed


def _building(tree: Path) -> bool:
    """A temporary tree (``.tmp-NAME-PID-...``) that a live process is still writing."""
    parts = tree.name.split("-")
    if not tree.name.startswith(".tmp-") or len(parts) < 4 or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
