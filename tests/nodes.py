"""Helpers for tests that start real ``swarm node`` processes (on loopback, or in network
namespaces through ``ops/netns-cluster``)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# A node prints "ready" in well under a second; this only bounds a broken one.
NODE_READY_TIMEOUT_S = 60.0


@dataclass
class NodeProc:
    proc: subprocess.Popen[bytes]
    state: Path
    addr: str = ""
    token: str = ""
    lines: list[str] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "swarm.cli", "--state-dir",
                              str(self.state), "node", "status"], capture_output=True,
                             text=True, check=True, timeout=60).stdout
        doc: dict[str, Any] = json.loads(out)
        return doc


def wait_ready(proc: subprocess.Popen[bytes], log: Path) -> list[str]:
    """The lines a node printed up to ``ready`` (select on its stdout, no sleeping)."""
    assert proc.stdout is not None
    buf = b""
    while True:
        if not select.select([proc.stdout], [], [], NODE_READY_TIMEOUT_S)[0]:
            raise AssertionError(f"node not ready; log:\n{log.read_text()[-3000:]}")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            proc.wait()
            raise AssertionError(f"node exited {proc.returncode} before it was ready; "
                                 f"log:\n{log.read_text()[-3000:]}")
        buf += chunk
        lines = buf.decode().split("\n")[:-1]  # complete lines only
        if "ready" in lines:
            return lines


class Nodes:
    """Starts nodes on loopback; :meth:`close` kills whatever is still running."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[NodeProc] = []

    def start(self, name: str, *args: str, env: dict[str, str] | None = None,
              expect_ready: bool = True) -> NodeProc:
        state = self.tmp / name
        state.mkdir(parents=True, exist_ok=True)
        log = self.tmp / f"{name}.log"
        full_env = dict(os.environ) | (env or {})
        full_env.pop("SWARM_NODE_SOCKET", None)
        with open(log, "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "swarm.cli", "--state-dir", str(state), "-v", *args,
                 "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=logf,
                stdin=subprocess.DEVNULL, env=full_env, cwd=REPO, start_new_session=True)
        node = NodeProc(proc, state)
        self.procs.append(node)
        if not expect_ready:
            return node
        node.lines = wait_ready(proc, log)
        for line in node.lines:
            if line.startswith("join token: "):
                node.token = line.split(": ", 1)[1]
            if " listening on " in line:
                node.addr = line.rsplit(" ", 1)[1]
        return node

    def close(self) -> None:
        for n in self.procs:
            if n.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    n.proc.send_signal(signal.SIGTERM)
                try:
                    n.proc.wait(30)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait()
            if n.proc.stdout is not None:
                n.proc.stdout.close()


class NetnsCluster:
    """``ops/netns-cluster`` driven from a test: ``up`` in the constructor's caller,
    ``down`` always (the fixture's finally)."""

    def __init__(self, base: Path, subnet: str) -> None:
        self.name = "t" + uuid.uuid4().hex[:6]
        self.base = base
        self.subnet = subnet
        self.doc: dict[str, Any] = {}

    def _cmd(self, *args: str) -> list[str]:
        return [sys.executable, str(REPO / "ops" / "netns_cluster.py"), "--name", self.name,
                "--dir", str(self.base), "--subnet", self.subnet, *args]

    def up(self, count: int, node_env: dict[int, dict[str, str]] | None = None,
           env: dict[str, str] | None = None) -> None:
        extra = [f"--node-env={i}:{k}={v}" for i, kv in (node_env or {}).items()
                 for k, v in kv.items()]
        out = subprocess.run(self._cmd("up", str(count), *extra), capture_output=True,
                             text=True, timeout=300, env=dict(os.environ) | (env or {}))
        assert out.returncode == 0, out.stderr[-3000:]
        self.doc = json.loads(out.stdout)

    def exec(self, i: int, *cmd: str, check: int | None = 0,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(self._cmd("exec", str(i), "--", *cmd), capture_output=True,
                             text=True, timeout=timeout)
        if check is not None:
            assert out.returncode == check, (
                f"{cmd} exited {out.returncode}, want {check}\nstdout: {out.stdout[-2000:]}"
                f"\nstderr: {out.stderr[-2000:]}\nlog: {self.log(i)[-3000:]}")
        return out

    def swarm(self, i: int, *args: str, check: int | None = 0
              ) -> subprocess.CompletedProcess[str]:
        return self.exec(i, sys.executable, "-m", "swarm.cli", *args, check=check)

    def kill(self, i: int) -> None:
        subprocess.run(self._cmd("kill", str(i)), check=True, timeout=60)

    def down(self) -> None:
        subprocess.run(self._cmd("down"), check=True, timeout=120)

    def state(self, i: int) -> Path:
        return Path(self.node(i)["state_dir"])

    def state_before_up(self, i: int) -> Path:
        """Node ``i``'s state directory, made before ``up`` starts it (the place
        ``ops/netns_cluster.py`` gives it), so a test can fill its store first."""
        d = self.base / self.name / str(i) / "state"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def node(self, i: int) -> dict[str, Any]:
        return next(n for n in self.doc["nodes"] if n["index"] == i)

    def log(self, i: int) -> str:
        with contextlib.suppress(OSError, StopIteration, KeyError):
            return Path(self.node(i)["log"]).read_text(errors="replace")
        return ""


@contextlib.contextmanager
def netns_cluster(base: Path, subnet: str) -> Iterator[NetnsCluster]:
    c = NetnsCluster(base, subnet)
    try:
        yield c
    finally:
        c.down()
