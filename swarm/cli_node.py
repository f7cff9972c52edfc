"""The node commands of the CLI (``swarm node``/``up``, ``swarm join``, ``swarm node status``)
and the client side of ``swarm run`` / ``swarm ps`` when a node is running.

Registered on the main group by :func:`register`; :mod:`swarm.cli` stays the one entry
point. The node runs in the foreground (systemd or ``ops/netns-cluster`` put it in the
background); it prints ``ready`` on stdout once its sockets answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from swarm.errors import NodeNotRunning, PeerError
from swarm.net.frames import STREAM_STDIN

EXIT_SIGNAL_BASE = 128


def _node_options(fn: Any) -> Any:
    for opt in reversed([
        click.option("--listen", default=None,
                     help="HOST:PORT to accept members on (default 0.0.0.0:7077; "
                          "$SWARM_LISTEN; node.toml)."),
        click.option("--advertise", default=None,
                     help="HOST:PORT members reach this node at (default: the listen "
                          "address; $SWARM_ADVERTISE)."),
        click.option("--mount-idle", "mount_idle_s", type=float, default=None,
                     help="Seconds an unused image mount stays up."),
        click.option("--test-serve-corrupt", "serve_corrupt", is_flag=True, default=None,
                     hidden=True),
    ]):
        fn = opt(fn)
    return fn


def _run_node(state_dir: Path, *, print_token: bool, **flags: Any) -> None:
    from swarm.node_daemon import load_config, serve_forever

    cfg = load_config(state_dir, **flags)
    serve_forever(cfg, print_token=print_token)


@click.group("node", invoke_without_command=True)
@_node_options
@click.pass_context
def node_cmd(ctx: click.Context, listen: str | None, advertise: str | None,
             mount_idle_s: float | None, serve_corrupt: bool | None) -> None:
    """Run this machine's node (creating a cluster when it has none; prints the join
    token). `swarm up` is the same."""
    if ctx.invoked_subcommand is not None:
        return
    ctx.obj.close()
    _run_node(ctx.obj.state_dir, print_token=True, create=True, listen=listen,
              advertise=advertise, mount_idle_s=mount_idle_s, serve_corrupt=serve_corrupt)


@node_cmd.command("status")
@click.pass_obj
def node_status(obj: Any) -> None:
    """Show the running node: address, members, suspects, counters (JSON)."""
    click.echo(json.dumps(asyncio.run(_call(obj.state_dir, "status", {})), indent=2))


@click.command("up")
@_node_options
@click.pass_obj
def up_cmd(obj: Any, listen: str | None, advertise: str | None, mount_idle_s: float | None,
           serve_corrupt: bool | None) -> None:
    """Run this machine's node, creating a cluster when it has none; prints the join
    token other machines use with `swarm join`."""
    obj.close()
    _run_node(obj.state_dir, print_token=True, create=True, listen=listen,
              advertise=advertise, mount_idle_s=mount_idle_s, serve_corrupt=serve_corrupt)


@click.command("join")
@click.argument("addr")
@click.option("--token", required=True, envvar="SWARM_TOKEN", help="The cluster's join token.")
@_node_options
@click.pass_obj
def join_cmd(obj: Any, addr: str, token: str, listen: str | None, advertise: str | None,
             mount_idle_s: float | None, serve_corrupt: bool | None) -> None:
    """Make this machine a member of the cluster that the node at ADDR belongs to, and
    run its node."""
    from swarm.net.secure import ClusterKey
    from swarm.net.transport import parse_addr

    ClusterKey.from_token(token)  # a malformed token fails here, before anything starts
    parse_addr(addr)
    obj.close()
    _run_node(obj.state_dir, print_token=False, token=token, join=[addr], listen=listen,
              advertise=advertise, mount_idle_s=mount_idle_s, serve_corrupt=serve_corrupt)


def register(cli: click.Group) -> None:
    for cmd in (node_cmd, up_cmd, join_cmd):
        cli.add_command(cmd)


# ---------------------------------------------------------------------------- clients
async def _call(state_dir: Path, method: str, args: dict[str, Any]) -> Any:
    from swarm import nodeapi

    conn = await nodeapi.connect(nodeapi.socket_path(state_dir))
    try:
        return await conn.request(method, args)
    finally:
        await conn.aclose()


def node_running(state_dir: Path) -> bool:
    from swarm import nodeapi

    return nodeapi.socket_path(state_dir).exists()


def remote_ps(state_dir: Path) -> list[dict[str, Any]] | None:
    """``swarm ps`` through the running node, or None when no node runs."""
    if not node_running(state_dir):
        return None
    try:
        result: list[dict[str, Any]] = asyncio.run(_call(state_dir, "ps", {}))
    except NodeNotRunning:
        return None
    return result


STDIN_CHUNK_BYTES = 64 << 10
# Stdin chunks sent but not yet handed to the container (the node's credits pace us).
STDIN_WINDOW_CHUNKS = 4


def _pump_stdin(loop: asyncio.AbstractEventLoop, conn: Any, req_id: int,
                credits: threading.Semaphore) -> None:
    """Send this process's stdin to call ``req_id`` as STDIN DATA frames, then an empty one
    for end of file. A thread: stdin may be a terminal, a pipe or a regular file, and a
    blocking read is the one way to read them all. Each chunk takes a credit, which the
    node returns once the container has it, so a container that reads slowly (or never)
    holds the reading back and the connection stays free for a CANCEL."""
    async def send(chunk: bytes) -> None:
        conn.send_data(req_id, STREAM_STDIN, chunk)
        await conn.drain()

    try:
        fd: int | None = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        fd = None  # no stdin at all: end of file at once
    while True:
        try:
            chunk = os.read(fd, STDIN_CHUNK_BYTES) if fd is not None else b""
        except OSError:
            chunk = b""
        if chunk:
            credits.acquire()
        try:
            asyncio.run_coroutine_threadsafe(send(chunk), loop).result()
        except (PeerError, RuntimeError, concurrent.futures.CancelledError):
            return  # the call or the loop is over
        if not chunk:
            return


def remote_run(state_dir: Path, image_ref: str, opts: Any) -> int | None:
    """``swarm run`` through the running node: the container's stdout and stderr stream
    back here, SIGINT/SIGTERM stop it there. Returns its exit code, or None when no node
    runs (the caller then runs it in-process)."""
    from swarm import nodeapi
    from swarm.node_daemon import run_options_to_wire

    if not node_running(state_dir):
        return None

    async def go() -> int | None:
        try:
            conn = await nodeapi.connect(nodeapi.socket_path(state_dir))
        except NodeNotRunning:
            return None
        outs = {1: sys.stdout.buffer, 2: sys.stderr.buffer}
        credits = threading.Semaphore(STDIN_WINDOW_CHUNKS)

        def on_data(stream: int, chunk: bytes) -> None:
            if stream == STREAM_STDIN:
                credits.release()
                return
            out = outs.get(stream)
            if out is not None and chunk:
                out.write(chunk)
                out.flush()

        loop = asyncio.get_running_loop()

        def on_start(req_id: int) -> None:
            if opts.stdin:  # -i: our stdin goes to the container, end of file included
                threading.Thread(target=_pump_stdin, args=(loop, conn, req_id, credits),
                                 name="stdin", daemon=True).start()

        task = asyncio.ensure_future(conn.request(
            "run", {"image": image_ref, "opts": run_options_to_wire(opts)}, timeout_s=None,
            on_data=on_data, on_start=on_start))
        got: list[int] = []

        def on_signal(sig: int) -> None:
            got.append(sig)
            task.cancel()  # sends CANCEL: the node kills the container

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            res = await task
        except asyncio.CancelledError:
            if not got:
                raise
            return EXIT_SIGNAL_BASE + got[0]
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            with contextlib.suppress(Exception):
                await conn.aclose()
        return int(res["exit"])

    return asyncio.run(go())
