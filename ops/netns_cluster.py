"""A cluster of real swarm nodes on one machine: one network namespace per node, joined by
a bridge (run as ``ops/netns-cluster``; needs root).

    ops/netns-cluster [--name N] [--subnet 10.231.0] up COUNT [--node-env I:K=V ...]
    ops/netns-cluster [--name N] exec I -- CMD...     run CMD in node I's namespace, with
                                                      SWARM_STATE_DIR set to node I's
    ops/netns-cluster [--name N] kill I               SIGKILL node I's process
    ops/netns-cluster [--name N] down                 stop and remove everything
    ops/netns-cluster [--name N] status               the cluster file (JSON)

Layout: bridge ``swb-<name>`` holds ``<subnet>.1/24``; node I (1-based) lives in netns
``swarm-<name>-<I>`` at ``<subnet>.<10+I>``, its node listening on port 7077, its state in
``<dir>/<I>/state`` and its log in ``<dir>/<I>/node.log``. Node 1 runs ``swarm up`` (a new
cluster); the others ``swarm join`` it with the token node 1 printed. ``up`` returns once
every node has printed ``ready``. ``down`` works from whatever the cluster file records
and from the names alone, so it also cleans up after a failed ``up``.

Nodes enter only their network namespace (``nsenter --net``), so their mounts live in the
host's mount namespace, under their state directories; ``down`` stops the nodes (SIGTERM:
they unmount), kills whatever is left in each namespace, and detaches any mount still
below a state directory (a SIGKILLed node's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NODE_PORT = 7077
NODE_START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
DEFAULT_SUBNET = "10.231.0"
DEFAULT_DIR = Path("/run/swarm-netns")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


class Cluster:
    def __init__(self, name: str, base: Path, subnet: str = DEFAULT_SUBNET) -> None:
        if not name.isalnum() or len(name) > 8:
            raise SystemExit("--name: up to 8 letters and digits")
        self.name = name
        self.dir = base / name
        self.file = self.dir / "cluster.json"
        self.subnet = subnet
        self.doc: dict[str, Any] = {"name": name, "subnet": subnet, "nodes": []}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}  # nodes this process started
        if self.file.is_file():
            self.doc = json.loads(self.file.read_text())
            self.subnet = self.doc["subnet"]

    # names ------------------------------------------------------------------------
    @property
    def bridge(self) -> str:
        return f"swb-{self.name}"

    def netns(self, i: int) -> str:
        return f"swarm-{self.name}-{i}"

    def veth(self, i: int) -> str:
        return f"sv-{self.name}-{i}"

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    def enter(self, i: int) -> list[str]:
        """The command prefix that runs a program in node ``i``'s network namespace only.
        Not ``ip netns exec``: it also makes a mount namespace with a fresh /sys, which
        hides the cgroup mounts runc needs."""
        return ["nsenter", f"--net=/run/netns/{self.netns(i)}", "--"]

    def node_dir(self, i: int) -> Path:
        return self.dir / str(i)

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file.write_text(json.dumps(self.doc, indent=1) + "\n")

    def node(self, i: int) -> dict[str, Any]:
        for n in self.doc["nodes"]:
            if n["index"] == i:
                return dict(n)
        raise SystemExit(f"no node {i} in cluster {self.name}")

    # network ----------------------------------------------------------------------
    def make_network(self, count: int) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i in range(1, count + 1):
            ns, veth = self.netns(i), self.veth(i)
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
            sh("ip", "link", "set", veth, "master", self.bridge, "up")
            sh("ip", "link", "set", f"{veth}p", "netns", ns)
            sh("ip", "-n", ns, "link", "set", f"{veth}p", "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    # nodes ------------------------------------------------------------------------
    def env(self, i: int) -> dict[str, str]:
        env = dict(os.environ)
        env["SWARM_STATE_DIR"] = str(self.node_dir(i) / "state")
        env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env["PYTHONPATH"] = str(REPO)
        env.pop("SWARM_NODE_SOCKET", None)
        return env

    def start_node(self, i: int, args: list[str], extra_env: dict[str, str]) -> dict[str, str]:
        """Start node ``i`` and wait for its ``ready`` line; returns what it printed
        (``addr``, ``token``)."""
        d = self.node_dir(i)
        (d / "state").mkdir(parents=True, exist_ok=True)
        env = self.env(i) | extra_env
        with open(d / "node.log", "ab") as log:
            proc = subprocess.Popen(
                [*self.enter(i), sys.executable, "-m", "swarm.cli",
                 "-v", *args, "--listen", f"{self.ip(i)}:{NODE_PORT}"],
                env=env, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=REPO)
        self.procs[i] = proc
        self.doc["nodes"].append({"index": i, "pid": proc.pid, "ip": self.ip(i),
                                  "addr": f"{self.ip(i)}:{NODE_PORT}", "netns": self.netns(i),
                                  "state_dir": str(d / "state"), "log": str(d / "node.log")})
        self.save()
        out: dict[str, str] = {}
        assert proc.stdout is not None
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                raise SystemExit(f"node {i} not ready in {NODE_START_TIMEOUT_S:.0f} s; "
                                 f"see {d / 'node.log'}")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                tail = (d / "node.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"node {i} exited before it was ready:\n{tail}")
            buf += chunk
            lines = buf.decode(errors="replace").split("\n")[:-1]  # complete lines only
            for line in lines:
                if line.startswith("join token: "):
                    out["token"] = line.split(": ", 1)[1].strip()
            if "ready" in lines:
                break
        proc.stdout.close()  # the node prints nothing more on stdout
        return out

    def up(self, count: int, node_env: dict[int, dict[str, str]]) -> None:
        if self.file.is_file():
            raise SystemExit(f"cluster {self.name} exists ({self.file}): `down` it first")
        self.doc = {"name": self.name, "subnet": self.subnet, "nodes": []}
        self.save()
        try:
            self.make_network(count)
            first = self.start_node(1, ["up"], node_env.get(1, {}))
            self.doc["token"] = first["token"]
            self.save()
            for i in range(2, count + 1):
                self.start_node(i, ["join", f"{self.ip(1)}:{NODE_PORT}", "--token",
                                    first["token"]], node_env.get(i, {}))
        except BaseException:
            self.down()
            raise

    def exec(self, i: int, cmd: list[str]) -> int:
        self.node(i)
        return subprocess.call([*self.enter(i), *cmd], env=self.env(i), cwd=REPO)

    def kill(self, i: int) -> None:
        pid = int(self.node(i)["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    def down(self) -> None:
        nodes = self.doc.get("nodes", [])
        for n in nodes:  # SIGTERM first: a node unmounts and stops its containers
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(n["pid"]), signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for n in nodes:
            _wait_gone(int(n["pid"]), deadline)
        for ns in self._namespaces():
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            for pid in pids:
                with contextlib.suppress(ValueError):
                    _wait_gone(int(pid), time.monotonic() + STOP_TIMEOUT_S)
            sh("ip", "netns", "delete", ns, check=False)
        sh("ip", "link", "delete", self.bridge, check=False)
        for n in nodes:  # mounts a node left in the host's namespace (none, normally)
            state = n.get("state_dir")
            if state and Path(state).is_dir():
                _detach_under(Path(state))
        shutil.rmtree(self.dir, ignore_errors=True)

    def _namespaces(self) -> list[str]:
        out = sh("ip", "netns", "list", check=False).stdout.split("\n")
        names = [line.split()[0] for line in out if line.strip()]
        return [n for n in names if n.startswith(f"swarm-{self.name}-")]


def _wait_gone(pid: int, deadline: float) -> None:
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return
    try:
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            select.select([fd], [], [], STOP_TIMEOUT_S)
    finally:
        os.close(fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _detach_under(path: Path) -> None:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for p in sorted((p for p in points if p == real or p.startswith(real + "/")),
                    key=len, reverse=True):
        sh("umount", "-l", p, check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ops/netns-cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="sw")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--subnet", default=DEFAULT_SUBNET, help="first three octets")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up")
    p_up.add_argument("count", type=int)
    p_up.add_argument("--node-env", action="append", default=[], metavar="I:K=V")
    p_exec = sub.add_parser("exec")
    p_exec.add_argument("index", type=int)
    p_exec.add_argument("command", nargs=argparse.REMAINDER)
    p_kill = sub.add_parser("kill")
    p_kill.add_argument("index", type=int)
    sub.add_parser("down")
    sub.add_parser("status")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("ops/netns-cluster needs root")
    c = Cluster(args.name, args.dir, args.subnet)
    if args.cmd == "up":
        node_env: dict[int, dict[str, str]] = {}
        for spec in args.node_env:
            idx, _, kv = spec.partition(":")
            k, _, v = kv.partition("=")
            node_env.setdefault(int(idx), {})[k] = v
        c.up(args.count, node_env)
        print(json.dumps(c.doc, indent=1))
    elif args.cmd == "exec":
        cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not cmd:
            raise SystemExit("exec I -- CMD...")
        return c.exec(args.index, cmd)
    elif args.cmd == "kill":
        c.kill(args.index)
    elif args.cmd == "down":
        c.down()
    else:
        print(json.dumps(c.doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
