"""FUSE mounts of images, one per image, shared by the containers that run it.

:class:`MountManager` starts one ``swarm.fs.daemon`` process per mounted image (pyfuse3
serves one mount per process) at ``<state>/mnt/<image-id-hex>``, counts the containers
using it (:meth:`~MountManager.acquire` / :meth:`~MountManager.release`), keeps it for an
idle window after the last release (a container of the same image often follows), then
unmounts it.

Talking to a daemon: a socketpair. The daemon writes one readiness line once the mount
exists (awaited, never polled), then answers commands (``stats``, ``reset``,
``save-hotset``, ``unmount``); when our end closes (this process died), the daemon
unmounts and exits on its own, so a killed node leaves no mount behind. What survives
anyway (SIGKILL of both, a kernel that lost the daemon) is removed by
:func:`cleanup_leftovers`, which the manager runs when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from swarm.digest import is_hex_digest, to_hex
from swarm.errors import MountError
from swarm.fs import daemon as daemon_mod

log = logging.getLogger(__name__)

# Keep an unused mount this long after its last container: the next container of the same
# image then starts on a warm mount (kernel caches included).
MOUNT_IDLE_S = 60.0
# A daemon that has not mounted in this long is broken (start-up is ~0.2 s).
MOUNT_START_TIMEOUT_S = 30.0
# After SIGTERM a daemon unmounts and saves its hot set; past this it is killed.
UNMOUNT_TIMEOUT_S = 10.0
# Waiting for a killed stale daemon to go away.
KILL_WAIT_S = 5.0
CONTROL_TIMEOUT_S = 10.0
# A zygote answers a fork request in milliseconds; this bounds a wedged one.
ZYGOTE_REPLY_TIMEOUT_S = 5.0
FSTYPE = "fuse.swarm"
MNT_DETACH = 2
LOG_TAIL_BYTES = 2000


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo that matters here."""

    mountpoint: Path
    fstype: str
    source: str
    dev: str = ""  # "major:minor", as /sys/class/bdi names the mount's backing device


def _unescape(field_: bytes) -> bytes:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out = bytearray()
    i = 0
    while i < len(field_):
        if field_[i] == 0x5C and field_[i + 1:i + 4].isdigit() and len(field_[i + 1:i + 4]) == 3:
            out.append(int(field_[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return bytes(out)


def parse_mountinfo(raw: bytes) -> list[MountInfo]:
    """Every mount of a /proc/<pid>/mountinfo text."""
    out = []
    for line in raw.splitlines():
        parts = line.split(b" ")
        try:
            sep = parts.index(b"-", 6)
        except ValueError:
            continue
        if len(parts) < sep + 3:
            continue
        out.append(MountInfo(Path(os.fsdecode(_unescape(parts[4]))),
                             os.fsdecode(parts[sep + 1]), os.fsdecode(_unescape(parts[sep + 2])),
                             os.fsdecode(parts[2])))
    return out


def swarm_mounts(under: str | os.PathLike[str] | None = None) -> list[MountInfo]:
    """swarm FUSE mounts of this mount namespace, optionally only those below ``under``."""
    with open("/proc/self/mountinfo", "rb") as f:
        mounts = [m for m in parse_mountinfo(f.read()) if m.fstype == FSTYPE]
    if under is None:
        return mounts
    # Resolve symlinks in the parent only: resolving ``under`` itself would stat it, and
    # stat on a mountpoint whose daemon is not serving (yet, or any more) hangs or fails.
    under = os.path.abspath(under)
    base = Path(os.path.realpath(os.path.dirname(under))) / os.path.basename(under)
    return [m for m in mounts if m.mountpoint == base or base in m.mountpoint.parents]


_libc: ctypes.CDLL | None = None


def detach(path: str | os.PathLike[str]) -> bool:
    """Lazily unmount ``path`` (MNT_DETACH: busy or dead mounts go too). Returns False
    when nothing was mounted there."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.umount2(os.fsencode(os.fspath(path)), MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    if err == errno.EPERM:  # not root: the setuid helper may unmount our own mounts
        proc = subprocess.run(["fusermount3", "-u", "-z", os.fspath(path)],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            return True
        raise MountError(f"cannot unmount {path}: {proc.stderr.strip()}")
    raise MountError(f"cannot unmount {path}: {os.strerror(err)}")


def _wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait for a process that is not our child to exit (a pidfd polls readable then)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout_s)[0])
    finally:
        os.close(fd)


def _is_daemon_of(pid: int, state_dir: Path) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    if daemon_mod.DAEMON_MODULE.encode() not in argv:
        return False
    try:
        given = argv[argv.index(b"--state-dir") + 1]
    except (ValueError, IndexError):
        return False
    cwd = f"/proc/{pid}/cwd"
    with contextlib.suppress(OSError):
        given = os.fsencode(os.path.realpath(os.path.join(os.readlink(cwd), os.fsdecode(given))))
    return os.path.realpath(given) == os.fsencode(os.path.realpath(state_dir))


def cleanup_leftovers(state_dir: str | os.PathLike[str]) -> list[Path]:
    """Unmount stale swarm FUSE mounts below ``state_dir`` and kill stale daemons of it.

    Mounts go first (a live daemon then sees its session end, saves its hot set and
    exits); daemons still there are killed. Returns the mountpoints that were detached.
    Call it only when no manager of this state directory is running.
    """
    state = Path(state_dir)
    detached = []
    for m in sorted(swarm_mounts(state), key=lambda m: len(m.mountpoint.parts), reverse=True):
        if detach(m.mountpoint):
            log.warning("detached stale swarm mount %s", m.mountpoint)
            detached.append(m.mountpoint)
    run = daemon_mod.run_dir(state)
    for pid_path in sorted(run.glob("*.pid")) if run.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_path.read_text().strip())
            if pid != os.getpid() and _is_daemon_of(pid, state):
                log.warning("killing stale mount daemon %d (%s)", pid, pid_path.stem[:12])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not _wait_gone(pid, KILL_WAIT_S):
                    log.error("stale mount daemon %d did not exit", pid)
        with contextlib.suppress(FileNotFoundError):
            pid_path.unlink()
    return detached


class DaemonProcess(Protocol):
    """What the manager needs of a daemon process: ``asyncio.subprocess.Process`` for
    one it started itself, :class:`ForkedDaemon` for one its zygote forked."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class ForkedDaemon:
    """A daemon forked by the zygote: not our child, so it is watched through a pidfd
    (readable once it exits; signals sent through it can never hit a reused pid). Its
    exit status is its parent's to know: ``returncode`` is -1 once it has exited."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[None] = self._loop.create_future()
        self._fd: int | None = None
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._exited.set_result(None)
        else:
            self._loop.add_reader(self._fd, self._on_exit)

    def _on_exit(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        if not self._exited.done():
            self._exited.set_result(None)

    @property
    def returncode(self) -> int | None:
        return -1 if self._exited.done() else None

    async def wait(self) -> int:
        await asyncio.shield(self._exited)
        return -1

    def send_signal(self, sig: int) -> None:
        if self._fd is None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._fd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The manager's end of a daemon zygote (see ``swarm.fs.daemon``): one process that
    has imported everything a daemon needs and forks one per mount."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.proc: asyncio.subprocess.Process | None = None
        self.sock: socket.socket | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log_path = daemon_mod.run_dir(self.state_dir) / "zygote.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(log_path, "ab") as logf:
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", daemon_mod.DAEMON_MODULE, "--zygote",
                    "--state-dir", str(self.state_dir), "--control-fd", str(theirs.fileno()),
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=logf,
                    stderr=logf, start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours
        msg = await asyncio.wait_for(loop.sock_recv(ours, 4096), MOUNT_START_TIMEOUT_S)
        if not msg or not json.loads(msg).get("ready"):
            raise MountError(f"mount zygote did not start{_log_tail(log_path)}")

    async def fork(self, argv: list[str], control_fd: int, log_fd: int) -> ForkedDaemon:
        if self.sock is None:
            raise MountError("mount zygote is not running")
        loop = asyncio.get_running_loop()
        async with self._lock:
            socket.send_fds(self.sock, [json.dumps(argv).encode()], [control_fd, log_fd])
            msg = await asyncio.wait_for(loop.sock_recv(self.sock, 4096),
                                         ZYGOTE_REPLY_TIMEOUT_S)
            if not msg:
                raise MountError("mount zygote exited")
            reply = json.loads(msg)
            if "pid" not in reply:
                raise MountError(f"mount zygote could not fork: {reply.get('error')}")
            return ForkedDaemon(int(reply["pid"]))

    async def aclose(self) -> None:
        if self.sock is not None:
            self.sock.close()  # end of file: the zygote exits
            self.sock = None
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), UNMOUNT_TIMEOUT_S)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@dataclass
class Mount:
    """A running daemon and its mount."""

    image_id: bytes
    path: Path
    proc: DaemonProcess
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    refs: int = 0
    startup_s: float = 0.0
    ready: dict[str, Any] = field(default_factory=dict)
    idle_timer: asyncio.TimerHandle | None = None
    stopping: bool = False
    control_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    watcher: asyncio.Task[None] | None = None


class MountManager:
    """One FUSE mount per image under ``<state_dir>/mnt``, shared and reference-counted.

    Use it as ``async with MountManager(...) as mounts:``; leaving the block (normally, on
    an error, or on Ctrl-C's cancellation) unmounts everything. ``source`` is the path of a
    store that missing blobs are fetched from (the stand-in for peers), or None.
    ``idle_s`` is how long an unused mount stays (0: unmount on the last release).
    """

    def __init__(self, state_dir: str | os.PathLike[str],
                 store_path: str | os.PathLike[str] | None = None,
                 source: str | os.PathLike[str] | None = None, *,
                 idle_s: float = MOUNT_IDLE_S, chunk_size: int | None = None,
                 verify: bool = True, prefetch: bool = True, zygote: bool = True,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.store_path = Path(store_path).absolute() if store_path else self.state_dir / "store"
        self.source = Path(source).absolute() if source else None
        self.idle_s = idle_s
        self.chunk_size = chunk_size
        self.verify = verify
        self.prefetch = prefetch
        self.extra_args = extra_args
        self.use_zygote = zygote
        self._zygote: asyncio.Task[Zygote] | None = None
        self._mounts: dict[bytes, Mount] = {}
        self._locks: dict[bytes, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> MountManager:
        self.cleanup_leftovers()
        if self.use_zygote:  # its imports overlap whatever the caller does next
            self._zygote = asyncio.create_task(self._start_zygote())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def cleanup_leftovers(self) -> list[Path]:
        return cleanup_leftovers(self.state_dir)

    async def aclose(self) -> None:
        """Unmount everything (whatever the reference counts say)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for image_id in list(self._mounts):
            with contextlib.suppress(Exception):
                await self._unmount(image_id)
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._zygote is not None:
            zygote_task, self._zygote = self._zygote, None
            if not zygote_task.done():
                zygote_task.cancel()
            with contextlib.suppress(BaseException):
                await (await zygote_task).aclose()

    # ------------------------------------------------------------------ public
    def mountpoint(self, image_id: bytes) -> Path:
        return self.state_dir / "mnt" / to_hex(image_id)

    def mounted(self) -> dict[bytes, int]:
        """image id -> containers using it, for every live mount."""
        return {i: m.refs for i, m in self._mounts.items() if not m.stopping}

    async def acquire(self, image_id: bytes) -> Path:
        """Mount the image if needed and count one more user; returns the mountpoint."""
        if self._closed:
            raise MountError("mount manager is closed")
        async with self._lock(image_id):
            m = self._mounts.get(image_id)
            if m is None or m.stopping or m.proc.returncode is not None:
                m = await self._start(image_id)
                self._mounts[image_id] = m
            if m.idle_timer is not None:
                m.idle_timer.cancel()
                m.idle_timer = None
            m.refs += 1
            return m.path

    async def release(self, image_id: bytes) -> None:
        """One user fewer; the last one starts the idle window (or unmounts, with
        ``idle_s == 0``)."""
        async with self._lock(image_id):
            m = self._mounts.get(image_id)
            if m is None or m.refs <= 0:
                raise MountError(f"image {to_hex(image_id)[:12]} is not acquired")
            m.refs -= 1
            if m.refs:
                return
            if self.idle_s <= 0:
                await self._unmount_locked(image_id)  # the daemon commits on its way out
                return
            # what the containers read is in the store once the last one is gone (the
            # daemon writes fetched blobs behind its readers)
            try:
                await self.control(image_id, "flush")
            except (MountError, OSError, TimeoutError, ValueError) as err:
                log.warning("mount daemon of %s did not flush: %s", to_hex(image_id)[:12], err)
            loop = asyncio.get_running_loop()
            m.idle_timer = loop.call_later(self.idle_s, self._spawn_expire, image_id)

    async def unmount_idle(self) -> list[bytes]:
        """Unmount every mount no container uses now, without waiting for its window."""
        gone = []
        for image_id, m in list(self._mounts.items()):
            if m.refs == 0:
                await self._expire(image_id)
                gone.append(image_id)
        return gone

    async def stats(self, image_id: bytes) -> dict[str, Any]:
        """The daemon's statistics (op counts by kind, fetches, hot set, timings)."""
        return await self.control(image_id, "stats")

    async def control(self, image_id: bytes, command: str) -> dict[str, Any]:
        m = self._mounts.get(image_id)
        if m is None:
            raise MountError(f"image {to_hex(image_id)[:12]} is not mounted")
        async with m.control_lock:
            m.writer.write(command.encode() + b"\n")
            await m.writer.drain()
            line = await asyncio.wait_for(m.reader.readline(), CONTROL_TIMEOUT_S)
        if not line:
            raise MountError(f"mount daemon of {to_hex(image_id)[:12]} is gone")
        result: dict[str, Any] = json.loads(line)
        return result

    # ------------------------------------------------------------------ internals
    def _lock(self, image_id: bytes) -> asyncio.Lock:
        return self._locks.setdefault(image_id, asyncio.Lock())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn_expire(self, image_id: bytes) -> None:
        self._spawn(self._expire(image_id))

    async def _expire(self, image_id: bytes) -> None:
        async with self._lock(image_id):
            m = self._mounts.get(image_id)
            if m is not None and m.refs == 0:
                await self._unmount_locked(image_id)

    def _daemon_args(self, image_id: bytes) -> list[str]:
        args = ["--state-dir", str(self.state_dir), "--image", to_hex(image_id),
                "--mountpoint", str(self.mountpoint(image_id)), "--store", str(self.store_path)]
        if self.source is not None:
            args += ["--source-store", str(self.source)]
        if self.chunk_size is not None:
            args += ["--chunk-size", str(self.chunk_size)]
        if not self.verify:
            args.append("--no-verify")
        if not self.prefetch:
            args.append("--no-prefetch")
        return args + list(self.extra_args)

    async def _start_zygote(self) -> Zygote:
        zygote = Zygote(self.state_dir)
        try:
            await zygote.start()
        except BaseException:
            await zygote.aclose()
            raise
        return zygote

    async def _spawn_daemon(self, image_id: bytes, control: socket.socket, log_fd: int
                     ) -> DaemonProcess:
        """A daemon from the zygote when there is one (~100 ms sooner), else exec'd."""
        args = self._daemon_args(image_id)
        if self.use_zygote:
            if self._zygote is None:
                self._zygote = asyncio.create_task(self._start_zygote())
            try:
                zygote = await asyncio.shield(self._zygote)
                return await zygote.fork(args, control.fileno(), log_fd)
            except (MountError, OSError, ValueError, TimeoutError) as err:
                log.warning("mount zygote failed (%s): starting daemons directly", err)
                self.use_zygote = False
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", daemon_mod.DAEMON_MODULE, *args,
            "--control-fd", str(control.fileno()), pass_fds=(control.fileno(),),
            stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            start_new_session=True)  # Ctrl-C reaches us; we unmount in order

    async def _start(self, image_id: bytes) -> Mount:
        path = self.mountpoint(image_id)
        if swarm_mounts(path):  # a daemon we lost track of (it died): its mount is stale
            detach(path)
        path.mkdir(parents=True, exist_ok=True)
        log_path = daemon_mod.log_file(self.state_dir, image_id)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair()
        t0 = time.monotonic()
        try:
            with open(log_path, "ab") as logf:
                proc = await self._spawn_daemon(image_id, theirs, logf.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        m = Mount(image_id, path, proc, reader, writer)
        try:
            line = await asyncio.wait_for(reader.readline(), MOUNT_START_TIMEOUT_S)
            ready = json.loads(line) if line else {"ready": False, "error": "daemon exited"}
            if not ready.get("ready"):
                raise MountError(f"mount of image {to_hex(image_id)[:12]} failed: "
                                 f"{ready.get('error')}{_log_tail(log_path)}")
        except BaseException as err:
            await self._kill(m)
            if isinstance(err, asyncio.TimeoutError):
                raise MountError(f"mount of image {to_hex(image_id)[:12]} did not become "
                                 f"ready in {MOUNT_START_TIMEOUT_S:.0f} s") from None
            if isinstance(err, ValueError):
                raise MountError(f"mount daemon said something odd: {line!r}") from None
            raise
        m.startup_s = time.monotonic() - t0
        m.ready = ready
        m.watcher = asyncio.create_task(self._watch(m))
        log.info("mounted image %s at %s in %.0f ms", to_hex(image_id)[:12], path,
                 m.startup_s * 1000)
        return m

    async def _watch(self, m: Mount) -> None:
        """Notice a daemon that dies on its own: its mount is dead, detach it."""
        await m.proc.wait()
        if m.stopping:
            return
        log.error("mount daemon of image %s exited with %s; see %s", to_hex(m.image_id)[:12],
                  m.proc.returncode, daemon_mod.log_file(self.state_dir, m.image_id))
        m.stopping = True
        with contextlib.suppress(MountError):
            detach(m.path)
        m.writer.close()
        if self._mounts.get(m.image_id) is m:
            del self._mounts[m.image_id]

    async def _unmount(self, image_id: bytes) -> None:
        async with self._lock(image_id):
            await self._unmount_locked(image_id)

    async def _unmount_locked(self, image_id: bytes) -> None:
        m = self._mounts.pop(image_id, None)
        if m is None:
            return
        m.stopping = True
        if m.idle_timer is not None:
            m.idle_timer.cancel()
        if m.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                m.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(m.proc.wait(), UNMOUNT_TIMEOUT_S)
            except TimeoutError:
                log.error("mount daemon of %s ignored SIGTERM: killing it",
                          to_hex(image_id)[:12])
                await self._kill(m)
        m.writer.close()
        if m.watcher is not None:
            m.watcher.cancel()
        if swarm_mounts(m.path):  # the daemon could not unmount (killed, or it failed)
            detach(m.path)
        with contextlib.suppress(OSError):
            m.path.rmdir()
        log.info("unmounted image %s", to_hex(image_id)[:12])

    async def _kill(self, m: Mount) -> None:
        m.stopping = True
        if m.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                m.proc.kill()
            await m.proc.wait()
        m.writer.close()
        if swarm_mounts(m.path):
            with contextlib.suppress(MountError):
                detach(m.path)


def _log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
            tail = f.read().decode(errors="replace").strip()
    except OSError:
        return ""
    return f"\n--- {path} (tail) ---\n{tail}" if tail else ""


def mounted_images(state_dir: str | os.PathLike[str]) -> Iterator[bytes]:
    """Image ids with a swarm mount under ``<state_dir>/mnt`` (for ``swarm`` status)."""
    for m in swarm_mounts(Path(state_dir) / "mnt"):
        if is_hex_digest(m.mountpoint.name):
            yield bytes.fromhex(m.mountpoint.name)
