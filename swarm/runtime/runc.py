"""Container lifecycle on top of the ``runc`` binary, with a private state root.

Everything lives under one state directory: ``runc/`` is runc's ``--root`` (so ``runc
list`` shows swarm's containers only) and ``bundles/<id>/`` holds each container's
``config.json``, the files bind-mounted over ``/etc/hosts``, ``/etc/hostname`` and
``/etc/resolv.conf``, runc's JSON log and the init's pid file. The rootfs is not in the
bundle: ``config.json`` points at a directory the caller prepared (an overlay mount).

A container runs with ``runc run`` in the foreground: one exec per container (~20 ms
for ``echo`` here), no polling. runc passes its own stdin/stdout/stderr through to the container and
exits with the container's status, 128+signo for a signal death, as docker does. runc
deletes a foreground container when it exits; ``run`` still deletes it (``delete
--force``) and removes the bundle on every other way out: an error, an exception, a
KeyboardInterrupt, a cancelled task.

Signals. runc runs in a session of its own, so a terminal's Ctrl-C reaches only the
caller, which decides. The container's command is pid 1 of its pid namespace, and the
kernel drops every signal that pid 1 has no handler for (even SIGKILL from inside). So a
forwarded SIGINT/SIGTERM/SIGHUP is delivered as is when the init handles or ignores it,
and otherwise emulated the way it would end an ordinary process: the init is SIGKILLed
and the run returns 128+signo (130 for Ctrl-C). A delivered signal must end the
container within ``stop_grace_s`` or it is killed, as ``docker stop`` does: a handler
may decline to exit, and one that re-raises the signal to die by it (dash, bash) cannot
die that way as pid 1. A second signal kills at once. With ``ContainerSpec.init`` a real
init (tini) is pid 1 and forwards signals itself.

Each bundle's config records its owner (pid and start time, as annotations), so
``cleanup_leftovers`` can tell a crashed process's containers from a living one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from swarm.errors import RuntimeFailure, UsageError
from swarm.runtime.spec import (
    NOFILE_LIMIT,
    ContainerSpec,
    build_oci_config,
    check_container_id,
    support_files,
)

RUNC_BINARY = "runc"
RUNC_DIR = "runc"
BUNDLES_DIR = "bundles"
CONFIG_FILE = "config.json"
PID_FILE = "init.pid"
LOG_FILE = "runc.log"
OWNER_PID_LABEL = "swarm.owner.pid"
OWNER_START_LABEL = "swarm.owner.start"
SIGNAL_EXIT_BASE = 128  # a process killed by signal N exits 128+N, as in a shell
EXIT_CANNOT_EXECUTE = 126  # docker's codes for a command that cannot run / is not found
EXIT_NOT_FOUND = 127
# SIGHUP too: a closed terminal should stop the container, not orphan it.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
INIT_BINARIES = ("tini-static", "docker-init")  # static, so they run in any image
CONTAINER_ID_BYTES = 8
STOP_GRACE_S = 10.0  # docker stop's default
CAP_SYS_RESOURCE = 24

# What runc's stdin/stdout/stderr may be: inherited (None), a file descriptor or a file.
Stream = int | IO[Any] | None


def new_container_id() -> str:
    """A fresh random container id (16 hex characters)."""
    return secrets.token_hex(CONTAINER_ID_BYTES)


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot; None if it is gone or a zombie.

    Together with the pid it names a process uniquely: a recycled pid starts later. A
    zombie counts as gone: it has exited, only its parent has not reaped it (yet).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat_line[stat_line.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):  # field 3: the process state
        return None
    return int(fields[19])  # field 22 of the whole line


def _status_mask(pid: int, field: str) -> int:
    """A bitmask (``SigCgt``, ``SigIgn``, ``CapEff``) from /proc/<pid>/status; 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1], 16)
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def init_would_die(pid: int, sig: int) -> bool:
    """True if ``sig`` at its default action would end ``pid`` were it not a pid-1 init.

    That is: the process neither catches nor ignores it (SIGINT and SIGTERM terminate).
    """
    bit = 1 << (sig - 1)
    return not (_status_mask(pid, "SigCgt") & bit or _status_mask(pid, "SigIgn") & bit)


@functools.cache
def host_nofile_limit() -> int:
    """The open-files limit runc can give a container here: docker's, if allowed.

    Raising a hard limit needs CAP_SYS_RESOURCE (some sandboxes withhold it); without
    it a container gets at most this process's own hard limit, or runc fails to start it.
    """
    if _status_mask(os.getpid(), "CapEff") & (1 << CAP_SYS_RESOURCE):
        try:
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            nr_open = NOFILE_LIMIT
        return min(NOFILE_LIMIT, nr_open)
    return min(NOFILE_LIMIT, resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def find_init_binary() -> Path | None:
    """A static init (tini) on the host to bind-mount for ``ContainerSpec.init``."""
    for name in INIT_BINARIES:
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def _runc_error(log_path: Path) -> str | None:
    """The last error runc logged (its JSON log), or None if it logged none."""
    try:
        text = log_path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    message = None
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            message = str(entry.get("msg", ""))
    return message


@dataclass
class _Stop:
    """What a run learned from signals: the exit code to report instead of runc's."""

    signals: int = 0
    exit_code: int | None = None


class Runc:
    """runc with its own state root under ``state_dir``; see the module docstring."""

    def __init__(self, state_dir: Path, binary: str = RUNC_BINARY,
                 stop_grace_s: float = STOP_GRACE_S) -> None:
        self.state_dir = Path(os.path.abspath(state_dir))
        self.root = self.state_dir / RUNC_DIR
        self.bundles = self.state_dir / BUNDLES_DIR
        self.binary = binary
        self.stop_grace_s = stop_grace_s

    # ------------------------------------------------------------------ plumbing

    def _cmd(self, *args: str | os.PathLike[str]) -> list[str]:
        return [self.binary, "--root", str(self.root), *map(str, args)]

    def _invoke(self, *args: str | os.PathLike[str]) -> str:
        """Run a short runc command; its stdout, or RuntimeFailure with runc's message."""
        try:
            proc = subprocess.run(self._cmd(*args), capture_output=True, text=True)
        except FileNotFoundError:
            raise RuntimeFailure(f"{self.binary} is not installed (run ops/install)") from None
        if proc.returncode != 0:
            raise RuntimeFailure(f"runc {args[0]} failed: {_last_line(proc.stderr)}")
        return proc.stdout

    def bundle_dir(self, container_id: str) -> Path:
        return self.bundles / container_id

    def exists(self, container_id: str) -> bool:
        """Whether runc has state for the container (a stat, no runc exec)."""
        return (self.root / container_id / "state.json").exists()

    def create_bundle(
        self,
        container_id: str,
        spec: ContainerSpec,
        image_config: Mapping[str, Any] | None = None,
        init_binary: Path | None = None,
    ) -> Path:
        """Write the bundle of a new container; the rootfs is referenced, not copied."""
        check_container_id(container_id)
        if spec.init and init_binary is None:
            init_binary = find_init_binary()
            if init_binary is None:
                raise UsageError("--init needs tini on the host (apt-get install tini)")
        config = build_oci_config(spec, image_config, container_id=container_id,
                                  init_binary=init_binary, nofile_limit=host_nofile_limit())
        pid = os.getpid()
        config["annotations"][OWNER_PID_LABEL] = str(pid)
        config["annotations"][OWNER_START_LABEL] = str(process_start_time(pid))
        bundle = self.bundle_dir(container_id)
        self.bundles.mkdir(parents=True, exist_ok=True)
        try:
            bundle.mkdir()
        except FileExistsError:
            raise RuntimeFailure(f"container {container_id} already exists") from None
        try:
            # config.json first: it names the owner, so cleanup_leftovers can judge even
            # a bundle whose creator died while writing the rest.
            (bundle / CONFIG_FILE).write_text(json.dumps(config))
            for name, text in support_files(config, spec).items():
                (bundle / name).write_text(text)
        except BaseException:
            shutil.rmtree(bundle, ignore_errors=True)
            raise
        return bundle

    def _run_cmd(self, container_id: str, bundle: Path) -> list[str]:
        return self._cmd("--log", bundle / LOG_FILE, "--log-format", "json", "run",
                         "--bundle", bundle, "--pid-file", bundle / PID_FILE, container_id)

    def _started(self, bundle: Path) -> bool:
        """Whether the command started: runc writes the pid file only once it has."""
        return (bundle / PID_FILE).exists()

    def _exit_code(self, returncode: int, bundle: Path, stop: _Stop) -> int:
        """The docker-style exit code of a finished ``runc run``."""
        if stop.exit_code is not None:
            return stop.exit_code
        if returncode < 0:  # runc itself was killed
            return SIGNAL_EXIT_BASE - returncode
        if not self._started(bundle):
            # The command never started: runc failed, and said why in its log.
            message = _runc_error(bundle / LOG_FILE)
            if message is not None:
                lowered = message.lower()
                if "exec:" in lowered and ("not found" in lowered
                                           or "no such file" in lowered):
                    return EXIT_NOT_FOUND
                if "exec:" in lowered and "permission denied" in lowered:
                    return EXIT_CANNOT_EXECUTE
                raise RuntimeFailure(f"container failed to start: {message}")
        return returncode

    def _running_pid(self, container_id: str) -> int | None:
        """The init's pid as soon as runc has created it, or None before that.

        Read from runc's own state file rather than the pid file, which runc writes only
        after the command has started (and may already be printing); no runc exec, so it
        is cheap enough for a signal handler or an event-loop callback.
        """
        try:
            state = json.loads((self.root / container_id / "state.json").read_text())
            return int(state["init_process_pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _stop_plan(self, container_id: str, sig: int, stop: _Stop) -> str:
        """Decide how to pass on a signal: 'forward' it, 'kill' the init, or kill 'runc'.

        Records the exit code to report when the kill stands in for the signal.
        """
        stop.signals += 1
        pid = self._running_pid(container_id)
        if stop.signals > 1:
            return "kill" if pid is not None else "runc"
        if pid is None:  # not created yet: nothing to forward to
            stop.exit_code = SIGNAL_EXIT_BASE + sig
            return "runc"
        if init_would_die(pid, sig):
            stop.exit_code = SIGNAL_EXIT_BASE + sig
            return "kill"
        return "forward"

    def _remove(self, container_id: str, bundle: Path) -> None:
        if self.exists(container_id):
            self.delete(container_id)
        shutil.rmtree(bundle, ignore_errors=True)

    def _stdin(self, spec: ContainerSpec, stdin: Stream) -> Stream:
        # docker without -i gives the command /dev/null, never the caller's stdin.
        return stdin if spec.stdin else subprocess.DEVNULL

    # ------------------------------------------------------------------ sync API

    def run(
        self,
        spec: ContainerSpec,
        image_config: Mapping[str, Any] | None = None,
        *,
        container_id: str | None = None,
        stdin: Stream = None,
        stdout: Stream = None,
        stderr: Stream = None,
        forward_signals: bool = True,
        init_binary: Path | None = None,
    ) -> int:
        """Run a container in the foreground and return its exit code, docker-style.

        Streams are inherited unless given (fds or files, not ``subprocess.PIPE``).
        With ``forward_signals`` (and on the main thread) SIGINT/SIGTERM go to the
        container as the module docstring describes.
        """
        container_id = container_id or new_container_id()
        bundle = self.create_bundle(container_id, spec, image_config, init_binary)
        try:
            stop = _Stop()
            started: list[subprocess.Popen[bytes]] = []
            forwarding: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
            if forward_signals and threading.current_thread() is threading.main_thread():
                # Installed before runc starts, so no signal slips between the two.
                forwarding = self._forwarding(container_id, started, stop)
            with forwarding:
                try:
                    proc = subprocess.Popen(
                        self._run_cmd(container_id, bundle), stdin=self._stdin(spec, stdin),
                        stdout=stdout, stderr=stderr, start_new_session=True)
                except FileNotFoundError:
                    raise RuntimeFailure(f"{self.binary} is not installed") from None
                started.append(proc)
                try:
                    if stop.signals:  # signalled while runc was being started
                        proc.kill()
                    returncode = proc.wait()
                finally:
                    self._reap(container_id, proc)  # a no-op unless an exception unwinds
            return self._exit_code(returncode, bundle, stop)
        finally:
            self._remove(container_id, bundle)

    @contextlib.contextmanager
    def _forwarding(self, container_id: str, started: list[subprocess.Popen[bytes]],
                    stop: _Stop) -> Iterator[None]:
        timers: list[threading.Timer] = []

        def handler(signum: int, _frame: object) -> None:
            action = self._stop_plan(container_id, signum, stop)
            if not started:
                return  # run() kills runc as soon as it exists
            if action == "forward":
                started[0].send_signal(signum)  # runc relays it to the init
                if not timers:  # the grace period runs from the first signal
                    timer = threading.Timer(self.stop_grace_s, self._quiet_kill,
                                            (container_id,))
                    timer.daemon = True
                    timers.append(timer)
                    timer.start()
            elif action == "kill":
                self._quiet_kill(container_id)
            else:
                started[0].kill()

        previous = {sig: signal.signal(sig, handler) for sig in FORWARDED_SIGNALS}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
            for timer in timers:
                timer.cancel()

    def _quiet_kill(self, container_id: str) -> None:
        """SIGKILL the container if it still exists; it may end by itself meanwhile."""
        with contextlib.suppress(RuntimeFailure):
            if self.exists(container_id):
                self.kill(container_id, signal.SIGKILL)

    def _reap(self, container_id: str, proc: subprocess.Popen[bytes]) -> None:
        """If runc is still running (we are unwinding an exception), end it and wait.

        The container is killed first and runc left to reap it: killing runc instead
        would orphan the init, and ``runc delete`` then waits (10 s) for a zombie that
        only the host's pid 1 can reap.
        """
        if proc.poll() is not None:
            return
        if self.exists(container_id):
            try:
                self.kill(container_id, signal.SIGKILL)
            except RuntimeFailure:
                pass
            else:
                proc.wait()
                return
        proc.kill()  # no container yet: runc is all there is to stop
        proc.wait()

    def kill(self, container_id: str, sig: int = signal.SIGTERM,
             all_processes: bool = False) -> None:
        """Send ``sig`` to the container's init (or to every process in it)."""
        self._invoke("kill", *(["--all"] if all_processes else []), container_id,
                     str(int(sig)))

    def delete(self, container_id: str, force: bool = True) -> None:
        """Delete the container (``force``: kill it first if it is running)."""
        self._invoke("delete", *(["--force"] if force else []), container_id)

    def list_containers(self) -> list[dict[str, Any]]:
        """runc's JSON view of every container in this state root."""
        if not self.root.is_dir():
            return []
        return json.loads(self._invoke("list", "--format", "json") or "null") or []

    def state(self, container_id: str) -> dict[str, Any] | None:
        """runc's state of one container, or None if it does not exist."""
        if not self.exists(container_id):
            return None
        state: dict[str, Any] = json.loads(self._invoke("state", container_id))
        return state

    def cleanup_leftovers(self) -> list[str]:
        """Delete containers (and bundles) whose owning process is gone; return their ids.

        Meant for a node starting up: one process owns a state dir at a time, so a bundle
        without a readable config.json is a crash's leftover, not one being written.
        """
        removed = []
        live_ids = set()
        for entry in self.list_containers():
            container_id = entry["id"]
            live_ids.add(container_id)
            if _owner_alive(entry.get("annotations") or {}):
                continue
            with contextlib.suppress(RuntimeFailure):  # it may have just gone by itself
                self.delete(container_id)
            shutil.rmtree(self.bundle_dir(container_id), ignore_errors=True)
            removed.append(container_id)
        if self.bundles.is_dir():
            for bundle in self.bundles.iterdir():
                if bundle.name in live_ids:
                    continue
                try:
                    config = json.loads((bundle / CONFIG_FILE).read_text())
                    annotations = config.get("annotations") or {}
                except (OSError, ValueError):
                    annotations = {}
                if not _owner_alive(annotations):
                    shutil.rmtree(bundle, ignore_errors=True)
                    removed.append(bundle.name)
        return removed

    # ------------------------------------------------------------------ asyncio API

    async def async_run(
        self,
        spec: ContainerSpec,
        image_config: Mapping[str, Any] | None = None,
        *,
        container_id: str | None = None,
        stdin: Stream = None,
        stdout: Stream = None,
        stderr: Stream = None,
        forward_signals: bool = False,
        init_binary: Path | None = None,
    ) -> int:
        """``run`` for the event loop. Cancelling the task kills and deletes the container.

        ``forward_signals`` installs loop signal handlers for SIGINT/SIGTERM/SIGHUP for
        the duration, for a CLI. asyncio cannot restore a previous loop handler, so a
        daemon keeps its own handlers and cancels the task instead.
        """
        container_id = container_id or new_container_id()
        bundle = self.create_bundle(container_id, spec, image_config, init_binary)
        loop = asyncio.get_running_loop()
        stop = _Stop()
        started: list[asyncio.subprocess.Process] = []
        tasks: set[asyncio.Task[None]] = set()
        timers: list[asyncio.TimerHandle] = []
        try:
            if forward_signals:
                for sig in FORWARDED_SIGNALS:
                    loop.add_signal_handler(sig, self._async_on_signal, container_id, started,
                                            sig, stop, tasks, timers)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._run_cmd(container_id, bundle), stdin=self._stdin(spec, stdin),
                    stdout=stdout, stderr=stderr, start_new_session=True)
            except FileNotFoundError:
                raise RuntimeFailure(f"{self.binary} is not installed") from None
            started.append(proc)
            try:
                if stop.signals:  # signalled while runc was being started
                    proc.kill()
                returncode = await proc.wait()
            except BaseException:
                await asyncio.shield(self._async_reap(container_id, proc))
                raise
            return self._exit_code(returncode, bundle, stop)
        finally:
            if forward_signals:
                for sig in FORWARDED_SIGNALS:
                    loop.remove_signal_handler(sig)
            for timer in timers:
                timer.cancel()
            for task in tasks:
                task.cancel()
            if self.exists(container_id):  # shielded: a second cancel must not orphan it
                await asyncio.shield(self.async_delete(container_id))
            shutil.rmtree(bundle, ignore_errors=True)

    def _async_on_signal(self, container_id: str, started: list[asyncio.subprocess.Process],
                         sig: int, stop: _Stop, tasks: set[asyncio.Task[None]],
                         timers: list[asyncio.TimerHandle]) -> None:
        action = self._stop_plan(container_id, sig, stop)
        if not started:
            return  # async_run kills runc as soon as it exists
        loop = asyncio.get_running_loop()

        def kill_soon() -> None:
            task = loop.create_task(self._async_quiet_kill(container_id, signal.SIGKILL))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        if action == "forward":
            with contextlib.suppress(ProcessLookupError):  # it may have just exited
                started[0].send_signal(sig)
            if not timers:
                timers.append(loop.call_later(self.stop_grace_s, kill_soon))
        elif action == "kill":
            kill_soon()
        else:
            with contextlib.suppress(ProcessLookupError):
                started[0].kill()

    async def _async_quiet_kill(self, container_id: str, sig: int) -> None:
        with contextlib.suppress(RuntimeFailure):
            if self.exists(container_id):
                await self.async_kill(container_id, sig)

    async def _async_reap(self, container_id: str, proc: asyncio.subprocess.Process) -> None:
        """``_reap`` for the loop: kill the container, let runc reap it, then wait."""
        if proc.returncode is not None:
            return
        if self.exists(container_id):
            try:
                await self.async_kill(container_id, signal.SIGKILL)
            except RuntimeFailure:
                pass
            else:
                await proc.wait()
                return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()

    async def _async_invoke(self, *args: str | os.PathLike[str]) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise RuntimeFailure(f"{self.binary} is not installed (run ops/install)") from None
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeFailure(f"runc {args[0]} failed: {_last_line(err.decode())}")
        return out.decode()

    async def async_kill(self, container_id: str, sig: int = signal.SIGTERM) -> None:
        await self._async_invoke("kill", container_id, str(int(sig)))

    async def async_delete(self, container_id: str, force: bool = True) -> None:
        await self._async_invoke("delete", *(["--force"] if force else []), container_id)


def _owner_alive(annotations: Mapping[str, str]) -> bool:
    try:
        pid = int(annotations[OWNER_PID_LABEL])
        start = int(annotations[OWNER_START_LABEL])
    except (KeyError, ValueError):
        return False  # not made by a swarm process we can check: treat as abandoned
    return process_start_time(pid) == start


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def cleanup_leftovers(state_dir: Path) -> list[str]:
    """Delete the containers under ``state_dir`` whose owner died; see ``Runc``."""
    return Runc(state_dir).cleanup_leftovers()
