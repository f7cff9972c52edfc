"""The node daemon on loopback: `swarm up` / `swarm join`, the local socket, membership,
wrong tokens, clean shutdown and restart after SIGKILL."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from nodes import Nodes

from conftest import assert_nothing_left, run_cli


@pytest.fixture
def nodes(tmp_path):
    n = Nodes(tmp_path)
    try:
        yield n
    finally:
        n.close()


def test_up_prints_a_token_and_join_makes_a_member(nodes):
    a = nodes.start("a", "up")
    assert a.token.startswith("swarm1-") and a.addr.startswith("127.0.0.1:")
    b = nodes.start("b", "join", a.addr, "--token", a.token)
    assert b.token == ""  # a joiner does not print the token
    assert a.status()["members"] == [b.addr]
    sb = b.status()
    assert sb["members"] == [a.addr] and sb["token"] == a.token
    c = nodes.start("c", "join", b.addr, "--token", a.token)  # any member will do
    assert sorted(c.status()["members"]) == sorted([a.addr, b.addr])
    assert sorted(a.status()["members"]) == sorted([b.addr, c.addr])
    # the CLI talks to the running node
    assert json.loads(run_cli(["ps", "--json"], state_dir=a.state).stdout) == []


def test_wrong_token_cannot_join_and_is_logged(nodes):
    a = nodes.start("a", "up")
    bad = nodes.start("bad", "join", a.addr, "--token",
                      "swarm1-" + "A" * 43, expect_ready=False)
    assert bad.proc.wait(60) == 10  # PeerError/AuthFailed
    st = a.status()
    assert st["members"] == [] and st["refused_peers"] >= 1
    assert "refused peer" in (nodes.tmp / "a.log").read_text()
    run_cli(["join", a.addr, "--token", "not-a-token"], 2, state_dir=nodes.tmp / "x")


def test_sigterm_stops_cleanly_and_sigkill_leaves_nothing_a_restart_cannot_fix(nodes):
    a = nodes.start("a", "up")
    sock = a.state / "node.sock"
    assert sock.exists()
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(60) == 0
    assert not sock.exists()
    assert not any((a.state / "engines").iterdir())
    # in-process fallback once no node runs
    assert json.loads(run_cli(["ps", "--json"], state_dir=a.state).stdout) == []

    a2 = nodes.start("a", "up")
    assert a2.token == a.token  # the cluster survives a restart
    a2.proc.kill()
    a2.proc.wait()
    assert sock.exists()  # left behind by the killed node...
    a3 = nodes.start("a", "up")  # ...and replaced by its successor
    assert a3.status()["pid"] == a3.proc.pid


def test_a_second_node_on_one_state_dir_is_refused_with_a_message(nodes):
    a = nodes.start("a", "up")
    run_cli(["up", "--listen", "127.0.0.1:0"], 2, state_dir=a.state)


def test_swarm_peers_shows_gossip_membership(nodes):
    """The node runs SWIM gossip on its listener's port: `swarm peers` lists the members
    it learned, alive, with their gossiped state; `swarm status` summarises."""
    a = nodes.start("a", "up")
    b = nodes.start("b", "join", a.addr, "--token", a.token)
    peers: list = []
    for _ in range(50):  # each call is a process start: bounded, no sleep
        peers = json.loads(run_cli(["peers", "--json"], state_dir=a.state).stdout)
        if {p["addr"] for p in peers if p["state"] == "alive"} == {a.addr, b.addr}:
            break
    assert {p["addr"]: p["state"] for p in peers} == {a.addr: "alive", b.addr: "alive"}
    assert [p["self"] for p in peers if p["addr"] == a.addr] == [True]
    status = json.loads(run_cli(["status", "--json"], state_dir=a.state).stdout)
    assert status["members"]["alive"] == 2


@pytest.mark.root
def test_run_i_through_the_node_forwards_stdin_to_the_container(nodes, debian_rootfs):
    """`swarm run -i` with a node running: the node runs the container, and the CLI's stdin
    reaches it (more than a pipe buffer of it, then end of file); a container that never
    reads its stdin neither hangs nor fails the run."""
    from swarm.build.importer import import_directory
    from swarm.store import Store

    a = nodes.start("a", "up")
    with Store(a.state / "store") as s:
        import_directory(s, debian_rootfs, ["base:1"])
    text = "".join(f"line {i} of the input\n" for i in range(150_000))  # ~3.4 MB
    out = run_cli(["run", "-i", "base:1", "sh", "-c", "md5sum; echo end"], input=text,
                  state_dir=a.state).stdout
    assert out == f"{hashlib.md5(text.encode()).hexdigest()}  -\nend\n"
    run_cli(["run", "-i", "base:1", "sh", "-c", "read x; exit $x"], 7, input="7\n",
            state_dir=a.state)
    run_cli(["run", "-i", "base:1", "true"], input=text, state_dir=a.state)
    # without -i the container reads /dev/null, as with docker
    assert run_cli(["run", "base:1", "sh", "-c", "wc -c"], input=text,
                   state_dir=a.state).stdout.strip() == "0"
    log = (nodes.tmp / "a.log").read_text()
    assert log.count("(stdin attached)") == 3 and "run base:1: sh -c wc -c" in log

    # Ctrl-C while a container ignores a stdin that never ends: the window of unanswered
    # chunks keeps the node's connection free, so the CANCEL gets through
    env = dict(os.environ, SWARM_STATE_DIR=str(a.state))
    cli = subprocess.Popen([sys.executable, "-m", "swarm.cli", "run", "-i", "base:1",
                            "sleep", "600"], stdin=subprocess.PIPE, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert cli.stdin is not None

    def flood() -> None:
        with contextlib.suppress(OSError):
            while True:
                cli.stdin.write(b"x" * 65536)

    threading.Thread(target=flood, daemon=True).start()
    try:
        for _ in range(100):  # each call is a process start: bounded, no sleep
            if json.loads(run_cli(["ps", "--json"], state_dir=a.state).stdout):
                break
        else:
            raise AssertionError("the container never showed in swarm ps")
        cli.send_signal(signal.SIGINT)
        assert cli.wait(60) == 130, cli.stderr.read() if cli.stderr else ""
    finally:
        cli.kill()
        cli.wait()
    assert json.loads(run_cli(["ps", "--json"], state_dir=a.state).stdout) == []
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(60) == 0
    assert_nothing_left(a.state)
