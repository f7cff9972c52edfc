"""``swarm node`` (alias ``swarm up``, and ``swarm join``): the long-running node process.

One asyncio process per machine, and one :class:`~contextlib.AsyncExitStack` that owns
everything it starts, each teardown registered right after its resource is created:
the state-directory lock, the embedded :class:`~swarm.node.Engine` (store, image mounts,
containers; it also cleans what a SIGKILLed predecessor left), the peer transport, and the
local API socket (:mod:`swarm.nodeapi`). SIGTERM and SIGINT unwind the stack in reverse:
no socket, container, overlay or FUSE mount outlives the process.

Cluster state in ``<state>``: ``node.key`` (this node's X25519 key pair), ``cluster.json``
(the join token and the members last known, so a restarted node rejoins on its own), both
mode 0600. Configuration: ``<state>/node.toml`` (keys ``listen``, ``advertise``, ``peers``),
overridden by ``SWARM_LISTEN`` / ``SWARM_ADVERTISE`` / ``SWARM_MOUNT_IDLE_S``, overridden
by flags.

Membership, until the gossip issue: a static set of addresses. ``join`` at a member
answers with every member it knows; the joiner then introduces itself to each of them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import tomllib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from swarm.digest import DIGEST_SIZE, is_hex_digest, to_hex
from swarm.errors import (
    BlobMissing,
    NotFound,
    PeerError,
    SwarmError,
    UsageError,
)
from swarm.fs import images
from swarm.fs.hotdir import async_prepare_hot_tree
from swarm.fs.source import Fetcher
from swarm.gossip.service import GossipPeerSource, GossipService
from swarm.gossip.state import StateSampler
from swarm.net import frames
from swarm.net.blobs import BlobService, PeerSource
from swarm.net.rpc import Call, Connection, Handler
from swarm.net.secure import ClusterKey, NodeKey
from swarm.net.transport import Transport, format_addr, parse_addr
from swarm.node import Engine, RunOptions, list_containers
from swarm.nodeapi import MAX_SOCKET_PATH_BYTES, socket_path
from swarm.runtime.spec import BindMount

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PORT = 7077
CONFIG_FILE = "node.toml"
CLUSTER_FILE = "cluster.json"
KEY_FILE = "node.key"
LOCK_FILE = "node.lock"
BLOBS_SOCKET = "blobs.sock"
# Test-only: a node started with this set to 1 serves every blob with one byte flipped.
CORRUPT_ENV = "SWARM_TEST_SERVE_CORRUPT"
# Test-only: a node started with this set to 1 SIGKILLs itself when a member asks it for a
# blob, so tests can show that a peer dying mid-transfer does not fail the read.
DIE_ENV = "SWARM_TEST_DIE_ON_SERVE"
# zeroconf discovery multicasts on every interface: only where the LAN is ours to use
DISCOVERY_ENV = "SWARM_DISCOVERY"
JOIN_TIMEOUT_S = 10.0
# Bytes of container output read from the pipe at once before they go out as one DATA.
OUTPUT_CHUNK_BYTES = 64 << 10


@dataclass
class NodeConfig:
    """Everything a node needs to start; :func:`load_config` fills it from file, env, flags."""

    state_dir: Path
    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    advertise: str | None = None
    join: list[str] = field(default_factory=list)
    token: str | None = None
    create: bool = False  # `swarm up`: make a new cluster when the state dir has none
    serve_corrupt: bool = False
    mount_idle_s: float = 60.0


def load_config(state_dir: Path, **flags: Any) -> NodeConfig:
    """Defaults < ``<state>/node.toml`` < ``SWARM_*`` environment < flags (None = unset)."""
    cfg = NodeConfig(state_dir=state_dir)
    path = state_dir / CONFIG_FILE
    if path.is_file():
        try:
            doc = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, OSError) as err:
            raise UsageError(f"cannot read {path}: {err}") from None
        for key in ("listen", "advertise"):
            if isinstance(doc.get(key), str):
                setattr(cfg, key, doc[key])
        if isinstance(doc.get("peers"), list):
            cfg.join = [str(p) for p in doc["peers"]]
    for key, env in (("listen", "SWARM_LISTEN"), ("advertise", "SWARM_ADVERTISE")):
        if os.environ.get(env):
            setattr(cfg, key, os.environ[env])
    if os.environ.get("SWARM_MOUNT_IDLE_S"):
        cfg.mount_idle_s = float(os.environ["SWARM_MOUNT_IDLE_S"])
    cfg.serve_corrupt = os.environ.get(CORRUPT_ENV) == "1"
    for key, value in flags.items():
        if value is not None and value != []:
            setattr(cfg, key, value)
    return cfg


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class BlobProxy:
    """A second event loop, on its own thread, that owns this node's outgoing blob traffic:
    the :class:`PeerSource` (its connections to members, its suspects), the fetcher that
    makes images local, and ``<state>/blobs.sock``, through which mount daemons fetch.

    Why a thread: the main loop makes blocking reads of image files (creating a container
    bundle reads ``/etc/passwd`` through the FUSE mount). A FUSE miss answered by that same
    loop would wait on itself; answered here, it never does.
    """

    def __init__(self, node: Node, socket: Path) -> None:
        self.node = node
        self.socket = socket
        self.loop: asyncio.AbstractEventLoop | None = None
        self.source: PeerSource
        self.fetcher: Fetcher
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._resolving: dict[str, asyncio.Future[bytes]] = {}

    async def start(self) -> None:
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="blob-proxy",
                                        daemon=True)
        self._thread.start()
        await asyncio.wrap_future(ready)

    async def aclose(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            asyncio.run(self._serve(ready))
        except BaseException as err:
            if not ready.done():
                ready.set_exception(err)
            else:
                log.exception("blob proxy failed")

    async def _serve(self, ready: concurrent.futures.Future[None]) -> None:
        node = self.node
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            # dial-only: members' requests on these connections are blob reads, served
            # from the store as on the main listener
            transport = Transport(node.cluster, node.key, node.service.handlers())
            stack.push_async_callback(transport.aclose)
            # warm peers first: gossip's blob filters and warmth rank the members
            self.source = GossipPeerSource(node.gossip, transport,
                                           members=lambda: node.member_list)
            self.fetcher = Fetcher(node.engine.store, self.source)
            stack.push_async_callback(self.fetcher.aclose)  # its stores behind land first
            await _serve_unix(stack, self.socket, {"blob.get": self.blob_get,
                                                   "blob.manifest": self.blob_manifest})
            ready.set_result(None)
            await self._stop.wait()

    async def prepare_hot_tree(self, image_id: bytes) -> Path | None:
        """The engine's hot tree of ``image_id``, built on this loop: the hot set's files
        come from peers through this loop's fetcher directly. Built on the main loop, each
        file went engine -> blobs.sock -> this loop -> peer and back, through two event
        loops and a socket (measured: ~170 ms of a ~600 ms peers cold start)."""
        engine = self.node.engine
        return await self.call(async_prepare_hot_tree(engine.store, engine.state_dir,
                                                      image_id, self.fetcher))

    def call(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run ``coro`` on the proxy's loop; awaitable from the main loop."""
        assert self.loop is not None
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def ensure_image(self, ref: str) -> bytes:
        """Make image ``ref`` local through peers: its index (verified by its digest, which
        is the id) and its hot set, registered under the name asked for. Concurrent
        requests for one ref share one fetch."""
        fut = self._resolving.get(ref)
        if fut is None:
            fut = asyncio.ensure_future(self._fetch_image(ref))
            self._resolving[ref] = fut
            fut.add_done_callback(lambda _f: self._resolving.pop(ref, None))
        return await asyncio.shield(fut)

    async def _fetch_image(self, ref: str) -> bytes:
        store = self.node.engine.store
        with contextlib.suppress(NotFound):
            return images.resolve(store, ref)  # made local meanwhile
        image_id, hot = await self.source.resolve(ref)
        # the hot set's list comes in while the index does
        hot_list = None if hot is None or images.hot_set(store, image_id) is not None \
            else asyncio.ensure_future(self.fetcher.ensure(hot))
        try:
            await self.fetcher.ensure(image_id)
        except BaseException:
            if hot_list is not None:
                hot_list.cancel()
                await asyncio.gather(hot_list, return_exceptions=True)
            raise
        index = images.load_index(store, image_id)
        names = [] if is_hex_digest(ref) or _is_prefix(ref) else [ref]
        images.register(store, index, names, source="peer")
        if hot_list is not None and hot is not None:
            try:
                await hot_list
                images.set_hot_set(store, image_id, hot)
            except SwarmError as err:
                log.warning("hot set of %s not fetched: %s", to_hex(image_id)[:12], err)
        log.info("image %s (%s) fetched through peers", ref, to_hex(image_id)[:12])
        return image_id

    async def blob_get(self, call: Call) -> bytes | bytearray | None:
        """A leaf for a mount daemon: local if held (sent straight from the store's map),
        else from peers, verified. ``call`` must be a call on this proxy's loop."""
        digest = call.args.get("digest")
        if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
            raise UsageError("digest must be 32 bytes")
        if self.node.engine.store.manifest(digest) is None:
            with contextlib.suppress(BlobMissing):
                await self.node.service.blob_get(call)
                return None
        return await self.source.fetch(digest)

    async def leaf(self, digest: bytes) -> bytes | bytearray:
        """A leaf for a caller on another loop: a copy from the store, else from peers."""
        if self.node.engine.store.manifest(digest) is None:
            with contextlib.suppress(BlobMissing):
                return self.node.engine.store.get(digest)
        return await self.source.fetch(digest)

    async def blob_manifest(self, call: Call) -> bytes | None:
        digest = call.args.get("digest")
        if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
            raise UsageError("digest must be 32 bytes")
        with contextlib.suppress(BlobMissing):
            return await self.node.service.blob_manifest(call)
        man = await self.source.fetch_manifest(digest)
        return None if man is None else man.encode()


async def _serve_unix(stack: contextlib.AsyncExitStack, path: Path,
                      handlers: dict[str, Handler]) -> None:
    """Serve ``handlers`` on a unix socket at ``path`` (mode 0600) until the stack unwinds.
    A leftover socket file is a dead predecessor's (the caller holds the state-dir lock)."""
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH_BYTES:
        raise UsageError(f"socket path {path} is too long for a unix socket; use a "
                         "shorter state directory or SWARM_NODE_SOCKET")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    conns: set[Connection] = set()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(reader, writer, handlers=handlers,
                          name=f"local client of {path.name}").start()
        conns.add(conn)
        with contextlib.suppress(asyncio.CancelledError):
            await conn.closed.wait()
        conns.discard(conn)

    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(client, str(path))
    finally:
        os.umask(old_umask)

    async def close() -> None:
        server.close()
        for c in list(conns):
            await c.aclose()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    stack.push_async_callback(close)


class Node:
    """The running node. :meth:`run` returns when a signal (or :meth:`stop`) ends it."""

    def __init__(self, cfg: NodeConfig, *, on_ready: Callable[[Node], None] | None = None):
        self.cfg = cfg
        self.state_dir = cfg.state_dir.absolute()
        self.on_ready = on_ready
        self.stopping = asyncio.Event()
        self.members: dict[str, None] = {}  # addresses of the other members, in join order
        self.member_list: tuple[str, ...] = ()  # a snapshot the proxy thread reads
        self.addr = ""
        self.cluster: ClusterKey
        self.key: NodeKey
        self.engine: Engine
        self.transport: Transport
        self.service: BlobService
        self.proxy: BlobProxy
        self.socket = socket_path(self.state_dir)

    def stop(self) -> None:
        self.stopping.set()

    # ------------------------------------------------------------------ cluster state
    def _load_cluster(self) -> None:
        path = self.state_dir / CLUSTER_FILE
        doc: dict[str, Any] = {}
        if path.is_file():
            doc = json.loads(path.read_text())
        token = self.cfg.token or doc.get("token")
        if token is None:
            if not self.cfg.create:
                raise UsageError("this node belongs to no cluster: run `swarm up` to create "
                                 "one or `swarm join ADDR --token TOKEN`")
            self.cluster = ClusterKey.generate()
        else:
            self.cluster = ClusterKey.from_token(token)
            if doc.get("token") not in (None, token):
                doc["members"] = []  # another cluster now: forget the old members
        for m in doc.get("members", []):
            self.members[m] = None
        self.member_list = tuple(self.members)
        self._save_cluster()

    def _save_cluster(self) -> None:
        _write_private(self.state_dir / CLUSTER_FILE, json.dumps(
            {"token": self.cluster.token, "members": list(self.members)}, indent=1) + "\n")

    def add_member(self, addr: str) -> bool:
        if addr == self.addr or addr in self.members:
            return False
        parse_addr(addr)
        self.members[addr] = None
        self.member_list = tuple(self.members)
        gossip = getattr(self, "gossip", None)  # none yet while the node is starting
        if gossip is not None:
            gossip.join([addr])
        self._save_cluster()
        log.info("member %s added (%d members)", addr, len(self.members) + 1)
        return True

    # ------------------------------------------------------------------ life
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            async with contextlib.AsyncExitStack() as stack:
                await self._start(stack)
                if self.on_ready is not None:
                    self.on_ready(self)
                await self.stopping.wait()
                log.info("node stopping")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(self._lock())
        self.key = NodeKey.load_or_create(self.state_dir / KEY_FILE)
        self._load_cluster()
        self.engine = await stack.enter_async_context(
            Engine(self.state_dir, mount_idle_s=self.cfg.mount_idle_s))
        # mount daemons fetch missing blobs through the proxy (see nodeapi.SocketSource)
        blobs_socket = self.state_dir / BLOBS_SOCKET
        self.engine.mounts.extra_args = ("--source-socket", str(blobs_socket))
        # the proxy brings a cold image's hot set in, many files in flight, into a hot
        # tree (swarm.fs.hotdir; BlobProxy.prepare_hot_tree); the mount daemons then fetch
        # only the rest
        self.engine.mounts.prefetch = False
        self.service = BlobService(self.engine.store, corrupt=self.cfg.serve_corrupt,
                                   die_on_serve=os.environ.get(DIE_ENV) == "1")
        if self.cfg.serve_corrupt:
            log.warning("%s=1: serving corrupt blobs (test switch)", CORRUPT_ENV)
        peer_handlers: dict[str, Handler] = {
            "ping": self._ping, "join": self._join, "members": self._members,
            **self.service.handlers()}
        self.transport = Transport(self.cluster, self.key, peer_handlers)
        stack.push_async_callback(self.transport.aclose)
        host, port = parse_addr(self.cfg.listen, DEFAULT_PORT)
        bound_host, bound_port = await self.transport.listen(host, port)
        self.addr = self.cfg.advertise or format_addr(bound_host, bound_port)
        if self.addr.startswith(("0.0.0.0:", "[::]:")):
            raise UsageError("listening on all addresses: give --advertise HOST:PORT, the "
                             "address members reach this node at")
        self.members.pop(self.addr, None)
        self.member_list = tuple(self.members)
        # membership: SWIM gossip over UDP on the listener's port; the member list that
        # blob fetches use follows it (a tuple, replaced whole: the proxy thread reads it)
        self.gossip = GossipService(
            self.cluster, self.key, self.addr, transport=self.transport,
            sampler=StateSampler(store=self.engine.store,
                                 containers=lambda: len(list_containers(self.state_dir))),
            seeds=list(self.members), discovery=os.environ.get(DISCOVERY_ENV) == "1")
        peer_handlers.update(self.gossip.handlers())
        self.gossip.listeners.append(self._follow_gossip)
        await self.gossip.async_start(bind=format_addr(bound_host, bound_port))
        stack.push_async_callback(self.gossip.async_stop)
        self.proxy = BlobProxy(self, blobs_socket)
        stack.push_async_callback(self.proxy.aclose)
        await self.proxy.start()
        self.engine.hot_tree_runner = self.proxy.prepare_hot_tree
        await self._serve_local(stack)
        await self._join_cluster()
        log.info("node %s listening on %s, %d other members", self.key.short, self.addr,
                 len(self.members))

    @contextlib.contextmanager
    def _lock(self) -> Any:
        """One node per state directory: an flock held for the life of the process (the
        kernel drops it when the process dies, so a SIGKILLed node does not block its
        successor)."""
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"a swarm node already runs on {self.state_dir}") from None
        try:
            yield
        finally:
            os.close(fd)

    def _follow_gossip(self) -> None:
        alive = tuple(a for a in self.gossip.alive_addrs() if a != self.addr)
        for addr in alive:
            self.members.setdefault(addr, None)
        self.member_list = alive

    async def _gossip_peers(self, call: Call) -> list[dict[str, Any]]:
        return self.gossip.peers_json()

    async def _gossip_status(self, call: Call) -> dict[str, Any]:
        return self.gossip.status_json()

    async def _serve_local(self, stack: contextlib.AsyncExitStack) -> None:
        await _serve_unix(stack, self.socket, {
            "status": self._status, "ps": self._ps, "image.resolve": self._image_resolve,
            "run": self._run, "blob.get": self._proxied, "blob.manifest": self._proxied,
            "gossip.peers": self._gossip_peers, "gossip.status": self._gossip_status})

    async def _join_cluster(self) -> None:
        """Introduce ourselves to the seeds and to every member they know. A seed given on
        the command line must answer (a mistyped address or token is an error); members
        remembered from an earlier run may be gone, and are only logged."""
        seeds = list(self.cfg.join)
        todo = seeds + [m for m in self.members if m not in seeds]
        done: set[str] = set()
        while todo:
            addr = todo.pop(0)
            if addr in done or addr == self.addr:
                continue
            done.add(addr)
            try:
                conn = await self.transport.connect(addr)
                res = await conn.request("join", {"addr": self.addr}, timeout_s=JOIN_TIMEOUT_S)
            except (PeerError, SwarmError) as err:
                if addr in seeds:
                    raise PeerError(f"cannot join the cluster at {addr}: {err}") from None
                log.warning("member %s unreachable: %s", addr, err)
                continue
            self.add_member(addr)
            for m in res.get("members", []):
                if isinstance(m, str) and m != self.addr and m not in done:
                    todo.append(m)

    # ------------------------------------------------------------------ peer handlers
    async def _ping(self, call: Call) -> str:
        return "pong"

    async def _join(self, call: Call) -> dict[str, Any]:
        addr = call.args.get("addr")
        if not isinstance(addr, str):
            raise UsageError("join needs addr")
        self.add_member(addr)
        return {"members": [self.addr, *self.members], "node": self.key.public}

    async def _members(self, call: Call) -> dict[str, Any]:
        return {"members": [self.addr, *self.members]}

    # ------------------------------------------------------------------ local handlers
    async def _status(self, call: Call) -> dict[str, Any]:
        return {"node": self.key.public.hex(), "addr": self.addr,
                "members": list(self.members), "token": self.cluster.token,
                "pid": os.getpid(), "suspects": sorted(
                    a for a in self.member_list if self.proxy.source.is_suspect(a)),
                "served": self.service.served, "fetched": self.proxy.source.fetches,
                "rejected_blobs": self.proxy.source.rejected,
                "refused_peers": self.transport.rejected}

    async def _ps(self, call: Call) -> list[dict[str, Any]]:
        return [c.as_json() for c in list_containers(self.state_dir)]

    async def ensure_image(self, ref: str) -> bytes:
        """The id of image ``ref``, made local through peers when this node lacks it."""
        try:
            return images.resolve(self.engine.store, ref)
        except NotFound:
            return await self.proxy.call(self.proxy.ensure_image(ref))

    async def _image_resolve(self, call: Call) -> dict[str, Any]:
        ref = call.args.get("ref")
        if not isinstance(ref, str):
            raise UsageError("image.resolve needs ref")
        image_id = await self.ensure_image(ref)
        return {"id": to_hex(image_id), "names": images.record(self.engine.store,
                                                               image_id).names}

    async def _proxied(self, call: Call) -> Any:
        """Blob requests on the main socket are answered by the proxy loop too."""
        if call.method == "blob.get":
            digest = call.args.get("digest")
            if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
                raise UsageError("digest must be 32 bytes")
            return await self.proxy.call(self.proxy.leaf(digest))
        return await self.proxy.call(self.proxy.blob_manifest(call))

    async def _run(self, call: Call) -> dict[str, Any]:
        ref = call.args.get("image")
        if not isinstance(ref, str):
            raise UsageError("run needs image")
        opts = run_options_from_wire(call.args.get("opts") or {})
        await self.ensure_image(ref)
        log.info("run %s%s: %s", ref, " (stdin attached)" if opts.stdin else "",
                 " ".join(opts.args)[:200])
        loop = asyncio.get_running_loop()
        pipes = [os.pipe(), os.pipe()]
        readers: list[asyncio.Task[None]] = []
        stdin_r: int | None = None
        feeder: asyncio.Task[None] | None = None
        try:
            for stream, (r, _w) in zip((frames.STREAM_STDOUT, frames.STREAM_STDERR), pipes,
                                       strict=True):
                readers.append(asyncio.create_task(_forward(loop, call, r, stream)))
            if opts.stdin:
                stdin_r, stdin_w = os.pipe()
                feeder = asyncio.create_task(_feed_stdin(call, stdin_w))
            code = await self.engine.async_run(ref, opts, stdin=stdin_r, stdout=pipes[0][1],
                                               stderr=pipes[1][1])
        finally:
            if stdin_r is not None:
                os.close(stdin_r)  # the last read end: a write still blocked gets EPIPE
            if feeder is not None:
                feeder.cancel()
                with contextlib.suppress(BaseException):
                    await feeder
            for _r, w in pipes:
                os.close(w)  # the container is gone: the readers now see end of file
            for t in readers:
                with contextlib.suppress(Exception):
                    await t
        return {"exit": code}


def _is_prefix(ref: str) -> bool:
    from swarm.digest import is_hex_prefix

    return is_hex_prefix(ref) and ":" not in ref


async def _forward(loop: asyncio.AbstractEventLoop, call: Call, fd: int, stream: int) -> None:
    """Copy a pipe to DATA frames of ``call`` until end of file; owns (closes) ``fd``."""
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    try:
        while True:
            chunk = await reader.read(OUTPUT_CHUNK_BYTES)
            if not chunk:
                break
            with contextlib.suppress(PeerError):
                call.send_data(stream, chunk)
                await call.drain()
    finally:
        transport.close()


async def _feed_stdin(call: Call, fd: int) -> None:
    """Copy the caller's STDIN DATA chunks into the container's stdin pipe; an empty chunk
    is end of input. Owns (closes) ``fd``. Writes block in a thread; each chunk written is
    answered with a credit (see :mod:`swarm.net.frames`), so a container that reads slowly
    holds the caller back without filling the call's queue, and one that exits closes the
    pipe's last read end and the write fails with EPIPE, ending the copy."""

    def write_all(chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]

    def close_after(f: asyncio.Future[None]) -> None:
        if not f.cancelled():
            f.exception()  # retrieved: EPIPE from a container that is gone is expected
        os.close(fd)

    writing: asyncio.Future[None] | None = None
    try:
        while True:
            stream, chunk = await call.incoming.get()
            if stream != frames.STREAM_STDIN:
                continue
            if not chunk:
                break
            writing = asyncio.ensure_future(asyncio.to_thread(write_all, chunk))
            await asyncio.shield(writing)
            call.send_data(frames.STREAM_STDIN, b"")  # credit: the CLI may send one more
    except (BrokenPipeError, ConnectionResetError, PeerError):
        pass  # the container closed its stdin, or the caller went
    finally:
        if writing is not None and not writing.done():
            writing.add_done_callback(close_after)  # the thread still writes to fd
        else:
            os.close(fd)


# Fields of RunOptions that travel over the local socket (all plain data).
_WIRE_FIELDS = ("args", "env", "cwd", "user", "cpus", "memory_bytes", "network",
                "entrypoint", "init", "hostname", "stdin")


def run_options_to_wire(opts: RunOptions) -> dict[str, Any]:
    doc: dict[str, Any] = {k: getattr(opts, k) for k in _WIRE_FIELDS}
    doc["args"] = list(opts.args)
    doc["entrypoint"] = list(opts.entrypoint) if opts.entrypoint is not None else None
    doc["binds"] = [[str(b.source), b.destination, b.readonly] for b in opts.binds]
    return doc


def run_options_from_wire(doc: dict[str, Any]) -> RunOptions:
    try:
        kwargs = {k: doc[k] for k in _WIRE_FIELDS if k in doc}
        binds = [BindMount(Path(s), str(t), bool(ro)) for s, t, ro in doc.get("binds") or []]
        return RunOptions(**kwargs, binds=binds)
    except (TypeError, ValueError) as err:
        raise UsageError(f"malformed run options: {err}") from None


def serve_forever(cfg: NodeConfig, *, print_token: bool) -> None:
    """Run a node in this process until SIGTERM/SIGINT; prints its address (and the join
    token when asked) and then ``ready`` on stdout, so a launcher can wait for that line."""

    def ready(node: Node) -> None:
        lines = [f"swarm node {node.key.short} listening on {node.addr}"]
        if print_token:
            lines += [f"join token: {node.cluster.token}",
                      f"to add a machine: swarm join {node.addr} --token {node.cluster.token}"]
        text = "\n".join([*lines, "ready"]) + "\n"
        # One write, then stdout points at /dev/null: a launcher closes its end of the pipe
        # once it has read "ready", and a later write (even Python's flush at exit) must
        # not fail with EPIPE and take the node down.
        sys.stdout.flush()
        with contextlib.suppress(OSError):
            os.write(sys.stdout.fileno(), text.encode())
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)

    asyncio.run(Node(cfg, on_ready=ready).run())
