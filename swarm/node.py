"""The composition root: the one place that knows every part (store, image mounts,
overlays, runc) and wires them into "run this image".

Until the long-running ``swarm node`` daemon exists, each CLI process that runs containers
is an *embedded* node: an :class:`Engine` with a private directory
``<state>/engines/<pid>/`` holding its FUSE mounts, overlay mounts, runc state and bundles.
Private, because several ``swarm run`` processes may share one state directory and must
never tear down each other's mounts; the store (``<state>/store``) is shared by all of
them, as LMDB allows. An engine's directory is removed when it closes; one left by a
process that died (SIGKILL) is cleaned by the next engine that starts: its containers
deleted, its overlays and FUSE mounts unmounted, its daemons stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from swarm.digest import short, to_hex
from swarm.errors import RuntimeFailure, SwarmError
from swarm.fs import images
from swarm.fs import mounts as fs_mounts
from swarm.fs.hotdir import async_prepare_hot_tree, mount_hot_tmpfs
from swarm.fs.mounts import MountManager
from swarm.fs.source import Fetcher, StoreSource
from swarm.runtime import overlay as overlay_mod
from swarm.runtime.runc import Runc, new_container_id, process_start_time
from swarm.runtime.spec import BindMount, ContainerSpec, Network
from swarm.store import Store

log = logging.getLogger(__name__)

ENGINES_DIR = "engines"
OWNER_FILE = "owner.json"
CONTAINERS_DIR = "containers"
LABEL_IMAGE = "swarm.image"
LABEL_IMAGE_ID = "swarm.image.id"
LABEL_COMMAND = "swarm.command"
LABEL_CREATED = "swarm.created"


def _owner_alive(owner: dict[str, Any]) -> bool:
    pid = int(owner.get("pid", 0))
    if pid <= 0:
        return False
    start = process_start_time(pid)
    return start is not None and start == owner.get("start")


def cleanup_dead_engines(state_dir: Path) -> list[Path]:
    """Remove what processes that died left under ``<state>/engines``: containers first,
    then overlays (they sit on the image mounts), then the FUSE mounts and daemons."""
    removed: list[Path] = []
    root = state_dir / ENGINES_DIR
    if not root.is_dir():
        return removed
    for d in root.iterdir():
        try:
            owner = json.loads((d / OWNER_FILE).read_text())
        except (OSError, ValueError):
            owner = {}
        if _owner_alive(owner):
            continue
        with contextlib.suppress(Exception):
            Runc(d).cleanup_leftovers()
        with contextlib.suppress(Exception):
            overlay_mod.cleanup_leftovers(d)
        with contextlib.suppress(Exception):
            fs_mounts.cleanup_leftovers(d)
        if not fs_mounts.swarm_mounts(d) and not overlay_mod.mounts_under(d):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        else:
            log.warning("could not clean up %s: mounts remain", d)
    return removed


@dataclass
class RunOptions:
    """What ``swarm run`` takes, docker-style."""

    args: Sequence[str] = ()
    env: dict[str, str] | None = None
    cwd: str | None = None
    user: str | None = None
    cpus: float | None = None
    memory_bytes: int | None = None
    network: Network = "host"
    stdin: bool = False
    entrypoint: Sequence[str] | None = None
    init: bool = False
    hostname: str | None = None
    binds: Sequence[BindMount] = ()
    tmpfs_tmp: bool = True  # False for build steps: what RUN writes to /tmp stays, as in docker


class Engine:
    """An embedded node: runs containers of images from the shared store."""

    def __init__(self, state_dir: str | os.PathLike[str], *,
                 source: str | os.PathLike[str] | None = None,
                 mount_idle_s: float = fs_mounts.MOUNT_IDLE_S, prefetch: bool = True,
                 hot_trees: bool = True) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.dir = self.state_dir / ENGINES_DIR / str(os.getpid())
        self.source = source
        self.mount_idle_s = mount_idle_s
        self.prefetch = prefetch
        self.hot_trees = hot_trees
        self.fetcher: Fetcher | None = None  # brings hot sets in; a node may set its own
        # where a node prepares hot trees instead (on the loop that owns its peer links)
        self.hot_tree_runner: Callable[[bytes], Awaitable[Path | None]] | None = None
        self._stack = contextlib.AsyncExitStack()
        self.store: Store
        self.mounts: MountManager
        self.runc: Runc

    async def __aenter__(self) -> Engine:
        await self._stack.__aenter__()
        try:
            cleanup_dead_engines(self.state_dir)
            self.dir.mkdir(parents=True, exist_ok=True)
            pid = os.getpid()
            (self.dir / OWNER_FILE).write_text(
                json.dumps({"pid": pid, "start": process_start_time(pid)}))
            self._stack.callback(shutil.rmtree, self.dir, True)
            if self.hot_trees:  # hot trees on a tmpfs (swarm.fs.hotdir), gone last
                hot = mount_hot_tmpfs(self.state_dir,
                                      {"pid": pid, "start": process_start_time(pid)},
                                      _owner_alive)
                if hot is not None:
                    self._stack.callback(fs_mounts.detach, hot)
            self.store = Store(self.state_dir / "store")
            self._stack.callback(self.store.close)
            self._stack.push_async_callback(self._async_close_fetcher)  # before the store
            if self.source is not None and self.prefetch and self.hot_trees:
                origin = StoreSource(Store(self.source), owns_store=True)
                self._stack.push_async_callback(origin.aclose)
                self.fetcher = Fetcher(self.store, origin)
            # with a fetcher here, the engine prefetches hot sets itself (into hot trees)
            self.mounts = await self._stack.enter_async_context(MountManager(
                self.dir, store_path=self.state_dir / "store", source=self.source,
                idle_s=self.mount_idle_s, prefetch=self.prefetch and self.fetcher is None))
            self.runc = Runc(self.dir)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def async_run(self, image_ref: str, opts: RunOptions, *,
                        stdin: IO[bytes] | int | None = None,
                        stdout: IO[bytes] | int | None = None,
                        stderr: IO[bytes] | int | None = None,
                        container_id: str | None = None,
                        forward_signals: bool = False,
                        keep_upper: Path | None = None) -> int:
        """Run one container of ``image_ref`` to completion; returns its exit code.

        ``keep_upper``: after the container exits and its overlay is unmounted, move the
        overlay's upper directory (the container's changes) there instead of deleting it;
        a build step indexes it as a layer. It must be on the engine's filesystem.
        ``stdin`` reaches the container only with ``opts.stdin`` (docker's ``-i``); without
        it the container reads /dev/null.
        """
        image_id = images.resolve(self.store, image_ref)
        index = images.load_index(self.store, image_id)
        container_id = container_id or new_container_id()
        # the mount starts while the hot tree is prepared (prefetched, on a cold node)
        acquiring = asyncio.ensure_future(self.mounts.acquire(image_id))
        try:
            hot = await self._hot_tree(image_id) if self.hot_trees else None
        except BaseException:
            with contextlib.suppress(Exception):
                await acquiring
                await self.mounts.release(image_id)
            raise
        lower = await acquiring
        try:
            lowers = [lower]
            if hot is not None:
                lowers.insert(0, hot)  # local files first; the FUSE mount for the rest
            cdir = self.dir / CONTAINERS_DIR / container_id
            # volatile: the upper is thrown away, so its unmount need not sync the
            # filesystem (measured: 30-60 ms per cold start, flushing the hot tree)
            ov = overlay_mod.mount_overlay(lowers, cdir, volatile=keep_upper is None)
            try:
                spec = ContainerSpec(
                    rootfs=ov.merged, args=list(opts.args), env=dict(opts.env or {}),
                    cwd=opts.cwd, user=opts.user, cpus=opts.cpus,
                    memory_bytes=opts.memory_bytes, network=opts.network, stdin=opts.stdin,
                    entrypoint=list(opts.entrypoint) if opts.entrypoint is not None else None,
                    init=opts.init, hostname=opts.hostname, binds=list(opts.binds),
                    tmpfs_tmp=opts.tmpfs_tmp,
                    labels={LABEL_IMAGE: image_ref, LABEL_IMAGE_ID: to_hex(image_id),
                            LABEL_COMMAND: shlex.join(opts.args) if opts.args else "",
                            LABEL_CREATED: str(time.time())})
                return await self.runc.async_run(
                    spec, index.config, container_id=container_id, stdin=stdin,
                    stdout=stdout, stderr=stderr, forward_signals=forward_signals)
            finally:
                ov.unmount()
                if keep_upper is not None:
                    os.rename(ov.upper, keep_upper)
                shutil.rmtree(cdir, ignore_errors=True)
        finally:
            await self.mounts.release(image_id)


    async def _async_close_fetcher(self) -> None:
        """The fetcher stores what it fetched behind its readers: let it finish."""
        if self.fetcher is not None:
            await self.fetcher.aclose()

    async def _hot_tree(self, image_id: bytes) -> Path | None:
        """The image's hot tree. On a cold node whose image has a recorded hot set, the hot
        set is prefetched first (in parallel with the mount's start-up): those files will
        be read at start-up anyway, and fetched in parallel, then served by the kernel
        from local files, they arrive sooner than one blocking FUSE read at a time. A
        failure only costs speed: the FUSE mount serves everything without a tree."""
        try:
            if self.hot_tree_runner is not None:
                return await self.hot_tree_runner(image_id)
            return await async_prepare_hot_tree(self.store, self.state_dir, image_id,
                                                 self.fetcher if self.prefetch else None)
        except (SwarmError, OSError) as err:
            log.warning("no hot tree for %s: %s", short(image_id), err)
            return None


@dataclass
class ContainerInfo:
    id: str
    image: str
    image_id: str
    command: str
    created: float
    status: str
    pid: int
    engine: str

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def list_containers(state_dir: str | os.PathLike[str]) -> list[ContainerInfo]:
    """Every container of every live engine on this state directory (``swarm ps``)."""
    out: list[ContainerInfo] = []
    root = Path(state_dir) / ENGINES_DIR
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if not (d / "runc").is_dir():
            continue
        try:
            entries = Runc(d).list_containers()
        except RuntimeFailure:
            continue
        for e in entries:
            ann = e.get("annotations") or {}
            out.append(ContainerInfo(
                id=e["id"], image=ann.get(LABEL_IMAGE, "?"),
                image_id=short(bytes.fromhex(ann[LABEL_IMAGE_ID])) if ann.get(
                    LABEL_IMAGE_ID) else "?",
                command=ann.get(LABEL_COMMAND, ""),
                created=float(ann.get(LABEL_CREATED, 0) or 0), status=e.get("status", "?"),
                pid=int(e.get("pid", 0)), engine=d.name))
    return out
