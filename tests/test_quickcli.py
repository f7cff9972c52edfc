"""The thin ``swarm run`` client (swarm.quickcli): the same request as the full CLI, the
full CLI for everything it does not take, output, errors and Ctrl-C against a node."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from swarm import cli as cli_mod
from swarm import cli_node, quickcli
from swarm.errors import NotFound
from swarm.net import frames
from swarm.net.rpc import Call, Connection
from swarm.node_daemon import run_options_from_wire

REPO = Path(__file__).resolve().parents[1]


def test_wire_constants_match_frames():
    assert (quickcli.REQUEST, quickcli.RESPONSE, quickcli.ERROR, quickcli.CANCEL,
            quickcli.DATA, quickcli.BYTES) == (frames.REQUEST, frames.RESPONSE, frames.ERROR,
                                               frames.CANCEL, frames.DATA, frames.BYTES)
    assert (quickcli.STREAM_STDOUT, quickcli.STREAM_STDERR) == (frames.STREAM_STDOUT,
                                                                frames.STREAM_STDERR)
    assert quickcli.LENGTH.format == frames.LENGTH.format
    assert quickcli.MAX_FRAME_BYTES == frames.MAX_FRAME_BYTES
    assert quickcli.EXIT_SIGNAL_BASE == cli_node.EXIT_SIGNAL_BASE


def _full_cli_opts(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any]:
    """What the full CLI hands the node for ``swarm run ARGV``."""
    seen: list[tuple[str, Any]] = []

    def fake_remote_run(state_dir: Path, image_ref: str, opts: Any) -> int:
        seen.append((image_ref, opts))
        return 0

    monkeypatch.setattr(cli_node, "remote_run", fake_remote_run)
    res = CliRunner().invoke(cli_mod.cli, ["run", *argv])
    assert res.exit_code == 0, res.output
    return seen[0]


@pytest.mark.parametrize("argv", [
    ["img"],
    ["img", "python3", "-c", "import numpy"],
    ["--rm", "img", "ls", "-l", "--all"],
    ["-e", "A=1", "--env=B=2", "-eC=3", "-e", "HOME", "-e", "NOPE_NOT_SET_X", "img", "env"],
    ["-w", "/tmp", "--user=1000:1000", "--cpus", "1.5", "-m", "512m", "img"],
    ["--net", "none", "--init", "--hostname", "h1", "--entrypoint", "/bin/sh", "img", "-c",
     "echo hi"],
    ["--network=host", "--memory=1g", "--", "img", "--rm"],
])
def test_thin_client_sends_what_the_full_cli_sends(argv, monkeypatch):
    monkeypatch.setenv("HOME", "/home/somebody")
    monkeypatch.delenv("NOPE_NOT_SET_X", raising=False)
    image, wire = quickcli.parse_run(argv)
    full_image, full_opts = _full_cli_opts(argv, monkeypatch)
    assert image == full_image
    assert run_options_from_wire(wire) == full_opts


@pytest.mark.parametrize("argv", [
    ["--state-dir", "/x", "run", "img"],  # a global option: the full CLI
    ["-v", "run", "img"],
    ["ps"],
    ["run"],
    ["run", "--help"],
    ["run", "-i", "img"],
    ["run", "-it", "img"],
    ["run", "-v", "/a:/b", "img"],
    ["run", "--cpus", "nonsense", "img"],
    ["run", "--net", "bridge", "img"],
    ["run", "-e", "=x", "img"],
    ["run", "--bogus", "img"],
    ["run", "-w"],
])
def test_thin_client_leaves_the_rest_to_the_full_cli(argv, tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_NODE_SOCKET", str(tmp_path / "nobody-listens"))
    assert quickcli.try_run(argv) is None


def test_no_node_means_the_full_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_NODE_SOCKET", str(tmp_path / "nobody-listens"))
    assert quickcli.try_run(["run", "img", "true"]) is None


# ---------------------------------------------------------------------------- a fake node
def _client_cmd(*argv: str) -> list[str]:
    """The thin client in a child, failing if it fell back to (or loaded) the full CLI."""
    code = ("import sys; from swarm.quickcli import try_run; c = try_run(sys.argv[1:]); "
            "assert c is not None and 'click' not in sys.modules and "
            "'asyncio' not in sys.modules, 'fell back'; sys.exit(c)")
    return [sys.executable, "-c", code, *argv]


async def _fake_node(sock_path: Path, run: Any) -> asyncio.AbstractServer:
    async def client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        Connection(r, w, handlers={"run": run}, name="fake node").start()

    return await asyncio.start_unix_server(client, str(sock_path))


def test_output_exit_code_and_errors_through_a_node(tmp_path):
    requests: list[dict[str, Any]] = []

    async def run(call: Call) -> Any:
        requests.append(call.args)
        if call.args["image"] == "missing:1":
            raise NotFound("no such image: missing:1")
        call.send_data(frames.STREAM_STDOUT, b"out " * 50_000)
        call.send_data(frames.STREAM_STDERR, b"err\n")
        await call.drain()
        return {"exit": 7}

    async def go() -> None:
        sock = tmp_path / "node.sock"
        server = await _fake_node(sock, run)
        env = dict(os.environ, SWARM_NODE_SOCKET=str(sock), PYTHONPATH=str(REPO))
        try:
            proc = await asyncio.create_subprocess_exec(
                *_client_cmd("run", "-e", "A=1", "img:1", "echo", "hi"), env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            assert proc.returncode == 7, err
            assert out == b"out " * 50_000 and err == b"err\n"
            assert requests[0]["image"] == "img:1"
            assert requests[0]["opts"]["args"] == ["echo", "hi"]
            assert requests[0]["opts"]["env"] == {"A": "1"}
            proc = await asyncio.create_subprocess_exec(
                *_client_cmd("run", "missing:1"), env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            assert proc.returncode == 3  # NotFound's exit code, as the full CLI
            assert err == b"swarm: error: no such image: missing:1\n"
        finally:
            server.close()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_sigterm_cancels_the_container(tmp_path):
    started = asyncio.Event
    state: dict[str, Any] = {}

    async def run(call: Call) -> Any:
        state["started"].set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            state["cancelled"].set()  # the node would kill the container here
            raise

    async def go() -> None:
        state["started"], state["cancelled"] = started(), started()
        sock = tmp_path / "node.sock"
        server = await _fake_node(sock, run)
        env = dict(os.environ, SWARM_NODE_SOCKET=str(sock), PYTHONPATH=str(REPO))
        try:
            proc = await asyncio.create_subprocess_exec(*_client_cmd("run", "img", "sleep"),
                                                        env=env)
            await state["started"].wait()
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 128 + signal.SIGTERM
            await asyncio.wait_for(state["cancelled"].wait(), 10)
        finally:
            server.close()

    asyncio.run(asyncio.wait_for(go(), 60))
