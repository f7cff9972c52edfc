"""One image, one FUSE mount, one process: ``python -m swarm.fs.daemon``.

pyfuse3 keeps its session in module globals, so a process serves exactly one mount; the
:class:`~swarm.fs.mounts.MountManager` starts one daemon per mounted image.

Command line::

    python -m swarm.fs.daemon --state-dir D --image ID --mountpoint M
        [--store PATH]          the local store (default D/store)
        [--source-store PATH]   where missing blobs come from (a store standing in for peers)
        [--source-socket PATH]  or: a running node's local API socket (it asks its peers)
        [--chunk-size BYTES]    chunk size of blobs this process writes (match the store's)
        [--no-verify]           do not hash local blobs on first read
        [--no-prefetch]         do not prefetch the image's hot set
        [--control-fd FD]       readiness and commands (below)
        [--stats-file PATH]     final statistics (default D/run/<image-hex>.stats.json)

Readiness: once the mount exists (before that, nothing is written), the daemon writes one
JSON line to the control fd: ``{"ready": true, "pid": ..., "mountpoint": ...,
"startup_ms": {...}}``, or ``{"ready": false, "error": "..."}`` and exits 1. If the fd is a
pipe it is then closed. If it is a unix socket it stays open for commands, one per line,
each answered with one JSON line:

``stats``        op counts by kind, fetch and prefetch counters, hot-set size, timings
``reset``        zero the op counts (to measure one workload)
``save-hotset``  merge the recording into the image's hot set now
``prefetch-wait`` answer once the hot-set prefetch has finished (with its counts)
``flush``        commit the fetched blobs still held for writing (write-behind), then answer
``unmount``      unmount and exit (as SIGTERM does)

End of file on the control socket means the parent is gone: the daemon unmounts and exits,
so a killed node leaves no mount behind. SIGTERM and SIGINT unmount and exit 0. On the way
out the hot set is saved, the statistics file written and the pid file removed.

Files: ``D/run/<image-hex>.pid`` while it runs (``cleanup_leftovers`` reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
import types
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarm.digest import from_hex, is_hex_digest, to_hex
from swarm.errors import NotFound, SwarmError, UsageError
from swarm.fs import hotset, images
from swarm.fs.source import (
    DEFAULT_PREFETCH_CONCURRENCY,
    BlobSource,
    Fetcher,
    PrefetchReport,
    StoreSource,
)
from swarm.fs.tree import ContentReader, Tree
from swarm.store import Store

if TYPE_CHECKING:
    from swarm.fs.fuse import SwarmOperations

log = logging.getLogger("swarm.fs.daemon")

DAEMON_MODULE = "swarm.fs.daemon"
# Commands on the control socket are short lines; anything longer is not a command.
CONTROL_LINE_MAX_BYTES = 4096
# Kernel readahead for the mount (default 128 KiB). Programs map big binaries and shared
# libraries; with 1 MiB a page fault brings 1 MiB per FUSE read: `import encodings` on a
# fresh mount needs 33 reads instead of 100. Contents are fetched by the chunk anyway.
READ_AHEAD_KB = 1024
# Set to a directory to have each daemon write a trace of every FUSE op there on exit.
TRACE_ENV = "SWARM_FS_TRACE"


def run_dir(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / "run"


def pid_file(state_dir: str | os.PathLike[str], image_id: bytes) -> Path:
    return run_dir(state_dir) / f"{to_hex(image_id)}.pid"


def log_file(state_dir: str | os.PathLike[str], image_id: bytes) -> Path:
    return run_dir(state_dir) / f"{to_hex(image_id)}.log"


def stats_file(state_dir: str | os.PathLike[str], image_id: bytes) -> Path:
    return run_dir(state_dir) / f"{to_hex(image_id)}.stats.json"


def _import_pyfuse3() -> types.ModuleType:
    """pyfuse3 in asyncio mode, without importing trio.

    pyfuse3 imports trio at module level (about 110 ms, a third of this process's start-up)
    but, once ``pyfuse3.asyncio.enable()`` has run, never uses it. A placeholder module
    stands in during the import; if a pyfuse3 release ever needs trio at import time, the
    placeholder is dropped and the real trio imported.
    """
    placeholder = None
    if "trio" not in sys.modules:
        placeholder = types.ModuleType("trio", "placeholder: pyfuse3 runs on asyncio here")
        sys.modules["trio"] = placeholder
    try:
        import pyfuse3
    except (AttributeError, ImportError):
        if placeholder is None:
            raise
        del sys.modules["trio"]
        sys.modules.pop("pyfuse3", None)
        import pyfuse3
    import pyfuse3.asyncio

    pyfuse3.asyncio.enable()
    return pyfuse3


class Daemon:
    """The life of one mount; :meth:`run` returns the exit status."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state_dir = Path(args.state_dir)
        self.mountpoint = Path(args.mountpoint).absolute()
        self.started = time.monotonic()
        self.timings_ms: dict[str, float] = {}
        self.stop = asyncio.Event()
        self.image_id = b""
        self.store: Store | None = None
        self.source: BlobSource | None = None
        self.fetcher: Fetcher | None = None
        self.reader: ContentReader | None = None
        self.recorder = hotset.HotSetRecorder()
        self.ops: SwarmOperations | None = None
        self.prefetch_report: PrefetchReport | None = None
        self.prefetch_ms: float | None = None
        self.hot_set_saved: bytes | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._control_is_socket = False
        self._pipe_fd: int | None = None
        self._ready_sent = False
        self._prefetch_task: asyncio.Task[None] | None = None
        self.tree_prepared = False  # the zygote had built the tree

    def _mark(self, what: str) -> None:
        self.timings_ms[what] = round((time.monotonic() - self.started) * 1000, 1)

    # ------------------------------------------------------------------ control channel
    async def _open_control(self) -> None:
        fd = self.args.control_fd
        if fd is None:
            return
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            self._reader, self._writer = await asyncio.open_unix_connection(
                sock=sock, limit=CONTROL_LINE_MAX_BYTES)
            self._control_is_socket = True
        else:
            self._pipe_fd = fd  # readiness only: one short write, then closed

    async def _send(self, doc: dict[str, Any]) -> None:
        line = json.dumps(doc).encode() + b"\n"
        if self._pipe_fd is not None:
            with contextlib.suppress(OSError):  # the reader is gone: nobody to tell
                os.write(self._pipe_fd, line)  # < PIPE_BUF: atomic, never blocks
            return
        if self._writer is None:
            return
        self._writer.write(line)
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    async def _signal_ready(self, ok: bool, error: str = "") -> None:
        if self._ready_sent:
            return
        self._ready_sent = True
        doc: dict[str, Any]
        if ok:
            doc = {"ready": True, "pid": os.getpid(), "mountpoint": str(self.mountpoint),
                   "startup_ms": self.timings_ms}
        else:
            doc = {"ready": False, "error": error}
        await self._send(doc)
        if self._pipe_fd is not None:
            os.close(self._pipe_fd)
            self._pipe_fd = None

    async def _serve_control(self) -> None:
        """Answer commands until EOF, which means the parent is gone: then stop."""
        assert self._reader is not None
        try:
            while True:
                try:
                    line = await self._reader.readline()
                except (ValueError, ConnectionError):  # over-long line, reset
                    break
                if not line:
                    break
                await self._send(await self._command(line.decode(errors="replace").strip()))
        finally:
            log.info("control channel closed: unmounting")
            self.stop.set()

    async def _command(self, cmd: str) -> dict[str, Any]:
        if cmd == "stats":
            return self.stats()
        if cmd == "reset":
            if self.ops is not None:
                self.ops.reset_counts()
            return {"ok": True}
        if cmd == "save-hotset":
            digest = await self._save_hot_set()
            return {"ok": True, "hot_set": to_hex(digest) if digest else None,
                    "recorded": len(self.recorder)}
        if cmd == "prefetch-wait":
            if self._prefetch_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._prefetch_task)
            return {"ok": True, "prefetch": self.stats()["prefetch"]}
        if cmd == "flush":
            if self.fetcher is not None:
                await self.fetcher.flush()
            return {"ok": True}
        if cmd == "unmount":
            self.stop.set()
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict[str, Any]:
        fetch = self.fetcher.stats.as_dict() if self.fetcher else None
        pre = self.prefetch_report
        return {
            "image": to_hex(self.image_id) if self.image_id else None,
            "pid": os.getpid(),
            "mountpoint": str(self.mountpoint),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "startup_ms": self.timings_ms,
            "tree_prepared": self.tree_prepared,
            "ops": self.ops.op_counts() if self.ops else {},
            "op_ms": self.ops.op_times_ms() if self.ops else {},
            "op_errors": self.ops.errors if self.ops else 0,
            "reads_waiting_for_fetch": self.reader.misses if self.reader else 0,
            "fetch": fetch,
            "source_fetches": getattr(self.source, "fetches", 0),
            "hot_set": {"recorded": len(self.recorder),
                        "saved": to_hex(self.hot_set_saved) if self.hot_set_saved else None},
            "prefetch": None if pre is None else {
                "fetched": pre.fetched, "present": pre.present, "failed": pre.failed,
                "duration_ms": self.prefetch_ms},
        }

    def _write_stats(self) -> None:
        path = Path(self.args.stats_file) if self.args.stats_file else stats_file(
            self.state_dir, self.image_id)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.stats(), indent=1) + "\n")
            os.replace(tmp, path)
        except OSError as err:
            log.warning("cannot write statistics to %s: %s", path, err)

    def _write_trace(self, directory: Path) -> None:
        """Every op of this mount, one JSON line each: start (CLOCK_MONOTONIC, ms: the
        same clock in every process), duration (ms), op, arguments."""
        assert self.ops is not None and self.ops.trace is not None
        path = directory / f"{to_hex(self.image_id)[:12]}-{os.getpid()}.trace.jsonl"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                for t0, dt, op, args in self.ops.trace:
                    f.write(json.dumps([round(t0 / 1e6, 3), round(dt / 1e6, 3), op,
                                        [a.decode(errors="replace") if isinstance(a, bytes)
                                         else a if isinstance(a, int) else repr(a)
                                         for a in args]]) + "\n")
        except OSError as err:
            log.warning("cannot write the op trace to %s: %s", path, err)

    # ------------------------------------------------------------------ hot set
    async def _save_hot_set(self) -> bytes | None:
        if self.store is None or not self.recorder.dirty:
            return None
        recorded = self.recorder.digests
        try:
            digest = await asyncio.to_thread(hotset.save, self.store, self.image_id, recorded)
        except SwarmError as err:
            log.warning("hot set not saved: %s", err)
            return None
        self.recorder.mark_saved(len(recorded))
        if digest is not None:
            self.hot_set_saved = digest
            log.info("hot set of %s saved: %d files", to_hex(self.image_id), len(recorded))
        return digest

    async def _save_when_idle(self) -> None:
        """Save the recording once no new file has been read for a while."""
        last = -1
        while True:
            await asyncio.sleep(hotset.HOT_SET_IDLE_S)
            n = len(self.recorder)
            if n == last and self.recorder.dirty:
                await self._save_hot_set()
            last = n

    async def _prefetch(self) -> None:
        assert self.store is not None and self.fetcher is not None
        t0 = time.monotonic()
        self.prefetch_report = await hotset.prefetch(
            self.store, self.image_id, self.fetcher,
            concurrency=self.args.prefetch_concurrency, durable=False)
        self.prefetch_ms = round((time.monotonic() - t0) * 1000, 1)
        log.info("hot set prefetch: %s in %.0f ms", self.prefetch_report, self.prefetch_ms)

    # ------------------------------------------------------------------ life
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        await self._open_control()
        try:
            async with contextlib.AsyncExitStack() as stack:
                await self._mount_and_serve(stack)
        except (SwarmError, OSError, RuntimeError) as err:
            log.error("mount of %s at %s failed: %s", self.args.image, self.mountpoint, err)
            await self._signal_ready(False, str(err))
            return 1
        finally:
            if self._writer is not None:
                self._writer.close()
        return 0

    async def _mount_and_serve(self, stack: contextlib.AsyncExitStack) -> None:
        args = self.args
        pyfuse3 = _import_pyfuse3()
        # _set_read_ahead needs it once the kernel's INIT arrives; importing it then (from
        # source, without a zygote) held up the mount's first requests by ~20 ms
        import swarm.fs.mounts  # noqa: F401
        from swarm.fs.fuse import MOUNT_OPTIONS, SwarmOperations
        self._mark("imports")

        store_path = Path(args.store) if args.store else self.state_dir / "store"
        self.store = store = Store(store_path, chunk_size=args.chunk_size,
                                   verify_on_read=args.verify)
        stack.callback(store.close)
        self.source = _open_source(args)
        if self.source is not None:
            stack.push_async_callback(self.source.aclose)
            self.fetcher = Fetcher(store, self.source)
            stack.push_async_callback(self.fetcher.aclose)  # its writes, before the store
        self.image_id = _image_id(store, args.image)
        stack.callback(self._write_stats)  # runs last: after the unmount and hot-set save
        self.reader = ContentReader(store, self.fetcher, on_read=self.recorder.record)
        tree = _prepared_trees.get(self.image_id)
        if tree is not None:  # built by the zygote before it forked us (its index is local)
            tree.reader = self.reader
            self.tree_prepared = True
        else:
            if not store.has(self.image_id):
                if self.fetcher is None:
                    raise NotFound(f"image {to_hex(self.image_id)} is not in {store_path} "
                                   "and no source to fetch it from was given")
                await self.fetcher.ensure(self.image_id)
            tree = Tree(images.load_index(store, self.image_id), self.reader)
        self._mark("index")
        self.ops = ops = SwarmOperations(tree)
        if os.environ.get(TRACE_ENV):
            ops.trace = []
            stack.callback(self._write_trace, Path(os.environ[TRACE_ENV]))
        self._mark("tree")
        if self.stop.is_set():
            return

        stack.push_async_callback(self._save_hot_set)  # after the unmount below
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        pyfuse3.init(ops, str(self.mountpoint), set(MOUNT_OPTIONS))
        stack.callback(_close_fuse, pyfuse3)
        self._mark("mounted")
        # The INIT reply sets the readahead, so ours goes in right after it is answered.
        loop = asyncio.get_running_loop()

        def after_init() -> None:
            self._mark("fuse_init")
            loop.call_soon(_set_read_ahead, self.mountpoint, READ_AHEAD_KB)

        ops.on_init = after_init
        pid_path = pid_file(self.state_dir, self.image_id)
        pid_path.parent.mkdir(parents=True, exist_ok=True)
        pid_path.write_text(f"{os.getpid()}\n")
        stack.callback(_unlink, pid_path)

        tasks: list[asyncio.Task[None]] = []
        stack.push_async_callback(_cancel_all, tasks)
        if self.fetcher is not None and args.prefetch:
            self._prefetch_task = asyncio.create_task(self._prefetch())
            tasks.append(self._prefetch_task)
        tasks.append(asyncio.create_task(self._save_when_idle()))
        if self._control_is_socket:
            tasks.append(asyncio.create_task(self._serve_control()))

        main = asyncio.create_task(pyfuse3.main())
        # pyfuse3.close() (registered above) must never run under a live main loop: it
        # frees the session the loop is using. So stopping the loop unwinds first.
        stack.push_async_callback(_stop_main, pyfuse3, main)
        await self._signal_ready(True)
        log.info("mounted %s at %s (%s)", to_hex(self.image_id), self.mountpoint,
                 self.timings_ms)
        stopping = asyncio.create_task(self.stop.wait())
        await asyncio.wait({main, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        await _stop_main(pyfuse3, main)
        log.info("unmounting %s; ops %s", self.mountpoint, ops.op_counts())


def _open_source(args: argparse.Namespace) -> BlobSource | None:
    if args.source_store and args.source_socket:
        raise UsageError("give --source-store or --source-socket, not both")
    if args.source_store:
        return StoreSource(Store(args.source_store, chunk_size=args.chunk_size),
                           owns_store=True)
    if args.source_socket:
        # The daemon is an entry point of its own, so it may reach up to the node's
        # local API (imported only here: swarm.fs itself never depends on swarm.nodeapi).
        from swarm.nodeapi import SocketSource

        return SocketSource(args.source_socket)
    return None


def _image_id(store: Store, ref: str) -> bytes:
    """A full hex id is taken as given (a cold node may not know the image yet); anything
    else is resolved in the local catalog (prefix or name)."""
    if is_hex_digest(ref):
        return from_hex(ref)
    return images.resolve(store, ref)


def _set_read_ahead(mountpoint: Path, kib: int) -> None:
    """Raise the readahead of the mount's backing device (best effort: a hint). The device
    comes from mountinfo, not stat(): a stat would be a FUSE request nobody serves yet."""
    from swarm.fs.mounts import swarm_mounts

    for m in swarm_mounts(mountpoint):
        if m.mountpoint == mountpoint and m.dev:
            try:
                Path(f"/sys/class/bdi/{m.dev}/read_ahead_kb").write_text(f"{kib}\n")
                log.debug("readahead of %s (bdi %s): %d KiB", mountpoint, m.dev, kib)
            except OSError as err:
                log.debug("readahead of %s unchanged: %s", mountpoint, err)


def _close_fuse(pyfuse3: Any) -> None:
    try:
        pyfuse3.close(unmount=True)
    except Exception:  # teardown must go on; the manager detaches leftovers
        log.exception("pyfuse3.close failed")


async def _stop_main(pyfuse3: Any, main: asyncio.Task[None]) -> None:
    """End pyfuse3's main loop and wait for it; its errors are logged, not raised."""
    if not main.done():
        pyfuse3.terminate()
    try:
        await main
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("FUSE main loop failed")


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await t
            except Exception:
                log.exception("background task failed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {DAEMON_MODULE}",
                                description="Serve one swarm image over FUSE.")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--image", required=True, help="image id (hex), id prefix or NAME[:TAG]")
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--store", help="local store (default STATE_DIR/store)")
    p.add_argument("--source-store", help="store to fetch missing blobs from")
    p.add_argument("--source-socket", help="local API socket of a node to fetch through")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--no-verify", dest="verify", action="store_false")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false")
    p.add_argument("--prefetch-concurrency", type=int, default=DEFAULT_PREFETCH_CONCURRENCY)
    p.add_argument("--control-fd", type=int, default=None)
    p.add_argument("--stats-file", default=None)
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--zygote"]:
        return zygote_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, force=True,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    return asyncio.run(Daemon(args).run())


# ---------------------------------------------------------------------- zygote
# A daemon spends ~100 ms of its ~170 ms start-up importing (asyncio, lmdb, pyfuse3, swarm).
# ``python -m swarm.fs.daemon --zygote --state-dir D --control-fd FD`` imports all of that
# once and forks a ready daemon per request, so a mount starts in the time the daemon
# itself needs (index, tree, mount). The zygote never starts threads or an event loop, so
# forking it is safe.
#
# Protocol on FD (a SOCK_SEQPACKET unix socket, one message per request): the zygote sends
# ``{"ready": true}`` once imported; each request is a JSON list of daemon arguments with
# two file descriptors attached (SCM_RIGHTS): the daemon's control socket and its log
# file. The reply is ``{"pid": N}`` or ``{"error": "..."}``. The forked daemon runs in a
# session of its own; the zygote reaps it. At end of file the zygote exits (its daemons
# live on: each has its own control socket).
ZYGOTE_MESSAGE_MAX_BYTES = 64 << 10


def zygote_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {DAEMON_MODULE} --zygote")
    p.add_argument("--state-dir", required=True)  # names whose daemons these are
    p.add_argument("--control-fd", type=int, required=True)
    args = p.parse_args(argv)
    _import_pyfuse3()
    # imported here, once, for every daemon forked (this process is __main__, so
    # swarm.fs.daemon itself comes in through swarm.fs.mounts); swarm.nodeapi for the
    # --source-socket a node gives every daemon: imported after the fork it held up a
    # peers cold start's mount by 60-95 ms (asyncio, the RPC and its frames)
    import swarm.fs.fuse
    import swarm.fs.mounts
    import swarm.nodeapi  # noqa: F401

    sock = socket.socket(fileno=args.control_fd)
    signal.signal(signal.SIGCHLD, _reap_children)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the manager decides when we go
    sock.send(b'{"ready": true}')
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, ZYGOTE_MESSAGE_MAX_BYTES, 2)
        except ConnectionError:
            return 0
        if not msg:
            return 0
        try:
            if len(fds) != 2:
                raise ValueError(f"want 2 file descriptors, got {len(fds)}")
            daemon_argv = json.loads(msg)
            if not isinstance(daemon_argv, list) or not all(
                    isinstance(a, str) for a in daemon_argv):
                raise ValueError("request is not a list of strings")
            _prepare_tree(daemon_argv, args.state_dir)
            pid = _fork_daemon(sock, daemon_argv, fds[0], fds[1])
            reply: dict[str, Any] = {"pid": pid}
        except (ValueError, OSError) as err:
            reply = {"error": str(err)}
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(json.dumps(reply).encode())


# Trees (decoded index and inodes) of the images this zygote's daemons mounted last, built
# before forking so that a later mount of the same image starts with them: image ids name
# immutable content, so a kept tree is never stale. Cold numpy start: the daemon's index
# load and tree build (~45 ms with a cold page cache) leave the mount's critical path.
ZYGOTE_TREES_MAX = 4
_prepared_trees: OrderedDict[bytes, Tree] = OrderedDict()


def _prepare_tree(argv: list[str], state_dir: str) -> None:
    """Build (or find) the tree a daemon with ``argv`` will serve; best effort: the daemon
    builds its own when this cannot. The store is closed again before any fork (an LMDB
    environment must not cross a fork)."""
    try:
        args = parse_args(argv)
    except SystemExit:
        return  # the daemon will say what is wrong with its arguments
    if not is_hex_digest(args.image):
        return
    image_id = from_hex(args.image)
    if image_id in _prepared_trees:
        _prepared_trees.move_to_end(image_id)
        return
    store_path = Path(args.store) if args.store else Path(state_dir) / "store"
    try:
        with Store(store_path, chunk_size=args.chunk_size) as store:
            if not store.has(image_id):
                return  # a cold node: the daemon fetches the index itself
            index = images.load_index(store, image_id)
    except (SwarmError, OSError) as err:
        log.warning("zygote: no tree for %s: %s", args.image[:12], err)
        return
    _prepared_trees[image_id] = Tree(index)
    while len(_prepared_trees) > ZYGOTE_TREES_MAX:
        _prepared_trees.popitem(last=False)


def _fork_daemon(zygote_sock: socket.socket, argv: list[str], control_fd: int,
                 log_fd: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: never returns into the zygote's loop
        zygote_sock.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        code = main([*argv, "--control-fd", str(control_fd)])
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reap_children(signum: int, frame: object) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


if __name__ == "__main__":
    sys.exit(main())
