"""``swarm run`` through a running node without loading the CLI: the thin client.

The full CLI imports click, asyncio, the store, the engine and the node's modules before
it knows that a running node will do the work: ~300 ms of a 900 ms cold start through
peers, measured with ``ops/bench/coldstart_peers.py``. When a node runs, ``swarm run``
only has to send one request on the node's socket and copy the container's output to
ours, so this module does exactly that, with the standard library and msgpack.

It takes the common case only: ``swarm run [OPTIONS] IMAGE [COMMAND...]`` with no global
option before ``run``, and options among ``--rm -e/--env -w/--workdir -u/--user --cpus
-m/--memory --net/--network --entrypoint --init --hostname`` (``--opt value``,
``--opt=value``, ``-o value``, ``-ovalue``). Anything else (``-i``, ``-v``, ``--help``, a
value the full parser would reject, no node answering) returns None and the full CLI
runs, so there is one source of truth for everything but this path; a test checks that
both send the node the same request.

Wire: frames and messages of :mod:`swarm.net.frames` (a test checks the constants here
against it; that module is not imported because it costs ~20 ms of imports).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import sys
from typing import Any

# swarm.net.frames, restated (tests/test_quickcli.py checks them)
REQUEST, RESPONSE, ERROR, CANCEL, DATA, BYTES = 1, 2, 3, 4, 5, 6
STREAM_STDOUT, STREAM_STDERR = 1, 2
LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = 32 << 20
EXIT_SIGNAL_BASE = 128
SOCKET_NAME = "node.sock"

_FLAGS = {"--rm": None, "--init": "init"}
_VALUED = {"-e": "env", "--env": "env", "-w": "cwd", "--workdir": "cwd", "-u": "user",
           "--user": "user", "--cpus": "cpus", "-m": "memory_bytes",
           "--memory": "memory_bytes", "--net": "network", "--network": "network",
           "--entrypoint": "entrypoint", "--hostname": "hostname"}


class _Fallback(Exception):
    """This invocation is not for the thin client: the full CLI takes it."""


def default_state_dir() -> str:
    """The state directory when ``--state-dir`` is not given (pathlib is not imported:
    it alone costs this client ~8 ms)."""
    env = os.environ.get("SWARM_STATE_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/swarm"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"),
                                                           ".local/share")
    return os.path.join(data, "swarm")


def node_socket(state_dir: str) -> str:
    """Where the node of ``state_dir`` listens (the rule of
    :func:`swarm.nodeapi.socket_path`)."""
    return os.environ.get("SWARM_NODE_SOCKET") or os.path.join(os.path.abspath(state_dir),
                                                               SOCKET_NAME)


def parse_run(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """``run``'s arguments -> (image, the ``opts`` the node's ``run`` method takes), as
    ``swarm run`` would send them; _Fallback for anything this client does not take."""
    opts: dict[str, Any] = {}
    env: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in _FLAGS and not eq:
            flag = _FLAGS[name]
            if flag is not None:
                opts[flag] = True
            i += 1
            continue
        if not arg.startswith("--") and len(arg) > 2 and arg[:2] in _VALUED:
            name, eq, value = arg[:2], "=", arg[2:]  # -eK=V
        if name not in _VALUED:
            raise _Fallback(arg)
        if not eq:
            if i + 1 >= len(argv):
                raise _Fallback(arg)
            value = argv[i + 1]
            i += 1
        i += 1
        key = _VALUED[name]
        if key == "env":
            env.append(value)
        else:
            opts[key] = value
    if i >= len(argv):
        raise _Fallback("no image")
    image, command = argv[i], argv[i + 1:]
    if env or "cpus" in opts or "memory_bytes" in opts:
        # the full CLI's parsers (swarm.runtime.spec costs ~15 ms: only when needed)
        from swarm.errors import UsageError
        from swarm.runtime.spec import parse_cpus, parse_env, parse_memory

        try:
            if "cpus" in opts:
                opts["cpus"] = parse_cpus(opts["cpus"])
            if "memory_bytes" in opts:
                opts["memory_bytes"] = parse_memory(opts["memory_bytes"])
            opts["env"] = parse_env(env, os.environ)
        except UsageError as err:
            raise _Fallback(str(err)) from None  # the full CLI reports it
    else:
        opts["env"] = {}
    if opts.get("network", "host") not in ("host", "none"):
        raise _Fallback("network")
    if "entrypoint" in opts:
        opts["entrypoint"] = [opts["entrypoint"]]
    opts["args"] = list(command)
    return image, opts


def _frame(obj: Any) -> bytes:
    import msgpack

    body = msgpack.packb(obj, use_bin_type=True)
    return LENGTH.pack(len(body)) + body


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(n - len(self.buf), 1 << 16))
            if not chunk:
                raise ConnectionError("the node closed the connection")
            self.buf += chunk

    def frame(self) -> bytes:
        self._fill(LENGTH.size)
        (n,) = LENGTH.unpack_from(self.buf)
        if n > MAX_FRAME_BYTES:
            raise ConnectionError(f"frame of {n} bytes from the node")
        self._fill(LENGTH.size + n)
        body = bytes(self.buf[LENGTH.size:LENGTH.size + n])
        del self.buf[:LENGTH.size + n]
        return body


def _exit_code(code: str) -> int:
    from swarm import errors

    if code.startswith("swarm:"):
        cls = getattr(errors, code[len("swarm:"):], None)
        if isinstance(cls, type) and issubclass(cls, errors.SwarmError):
            return cls.exit_code
    if code == "missing":
        return errors.NotFound.exit_code
    return errors.RemoteError.exit_code


def remote_run(sock: socket.socket, image: str, opts: dict[str, Any]) -> int:
    """Send ``run`` and copy the container's output until the node answers; SIGINT and
    SIGTERM cancel the call (the node stops the container), as the full client does."""
    import msgpack

    req_id = 1

    def on_signal(sig: int, _frame_: Any) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(_frame([CANCEL, req_id]))
        raise SystemExit(EXIT_SIGNAL_BASE + sig)

    for sig in (signal.SIGINT, signal.SIGTERM):  # before the request: no window
        signal.signal(sig, on_signal)
    sock.sendall(_frame([REQUEST, req_id, "run", {"image": image, "opts": opts}]))
    reader = _Reader(sock)
    out = {STREAM_STDOUT: 1, STREAM_STDERR: 2}
    while True:
        try:
            msg = msgpack.unpackb(reader.frame(), raw=False)
        except ConnectionError as err:
            sys.stderr.write(f"swarm: error: connection to the node lost: {err}\n")
            return 10
        kind = msg[0]
        if kind == DATA and msg[1] == req_id and msg[2] in out:
            view = memoryview(msg[3])
            while view:
                view = view[os.write(out[msg[2]], view):]
        elif kind == RESPONSE and msg[1] == req_id:
            return int(msg[2]["exit"])
        elif kind == ERROR and msg[1] == req_id:
            sys.stderr.write(f"swarm: error: {msg[3]}\n")
            return _exit_code(msg[2])


def try_run(argv: list[str]) -> int | None:
    """The exit code of ``swarm ARGV`` when the thin client could run it; None when the
    full CLI must (not a plain ``run``, an option it does not take, no node)."""
    if not argv or argv[0] != "run":
        return None
    try:
        image, opts = parse_run(argv[1:])
    except _Fallback:
        return None
    path = node_socket(default_state_dir())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:  # no node (or not ours to use): the full CLI decides what to do
        sock.close()
        return None
    with sock:
        return remote_run(sock, image, opts)


def main() -> None:
    """The ``swarm`` command: the thin client when it applies, else the full CLI."""
    code = try_run(sys.argv[1:])
    if code is not None:
        sys.stdout.flush()
        sys.exit(code)
    from swarm.cli import main as full_main

    full_main()
