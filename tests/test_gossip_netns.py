"""Gossip between real processes in network namespaces joined by a bridge: join, SIGKILL
detection, 10 % random loss (iptables ``statistic`` rules inside each namespace; this
kernel has no netem), a partition into halves that heals, and a wrong-token member.

Each member is ``python -m swarm.gossip.agent`` (the gossip service alone, quick timings:
every period x0.5) writing its view to a JSON file. Node count and durations are kept
small: the machine's two cores are shared. Namespaces and processes are removed by the
fixture's finally, also when an assertion fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from swarm.net.secure import ClusterKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ops.netns_cluster import REPO, Cluster, sh

pytestmark = [pytest.mark.root, pytest.mark.cluster]

# a longer, bigger run on request (the issue asks 8 nodes over minutes; CI runs this size)
NODES = int(os.environ.get("SWARM_TEST_GOSSIP_NODES", "6"))
PORT = 7946
QUICK = 0.5  # every gossip period x0.5: probe 0.5 s, suspicion >= 2 s
POLL_S = 0.2  # other processes' files: polled, there is no event to await across them
LOSS_WATCH_S = float(os.environ.get("SWARM_TEST_GOSSIP_LOSS_S", "30"))


class GossipNetns:
    def __init__(self, tmp: Path) -> None:
        self.net = Cluster(f"g{os.getpid() % 100000}", tmp, subnet="10.232.0")
        self.tmp = tmp
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.token = ClusterKey.generate().token

    def start(self, i: int, token: str | None = None, seed: int | None = 1) -> None:
        args = [*self.net.enter(i), sys.executable, "-m", "swarm.gossip.agent",
                "--addr", f"{self.net.ip(i)}:{PORT}", "--token", token or self.token,
                "--out", str(self.out(i)), "--quick", str(QUICK)]
        if seed is not None and seed != i:
            args += ["--seed", f"{self.net.ip(seed)}:{PORT}"]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.tmp / f"{i}.log", "ab") as log:
            self.procs[i] = subprocess.Popen(args, stdout=log, stderr=log, env=env,
                                             stdin=subprocess.DEVNULL)

    def out(self, i: int) -> Path:
        return self.tmp / f"{i}.json"

    def view(self, i: int) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(self.out(i).read_text())
            return doc
        except (FileNotFoundError, json.JSONDecodeError):
            return {"name": None, "members": []}

    def states(self, i: int) -> dict[str, str]:
        return {m["name"]: m["state"] for m in self.view(i)["members"]}

    def name(self, i: int) -> str:
        n = self.view(i)["name"]
        assert n is not None
        return str(n)

    def iptables(self, i: int, *rule: str) -> None:
        sh("ip", "netns", "exec", self.net.netns(i), "iptables", *rule)

    def close(self) -> None:
        for p in self.procs.values():
            p.kill()
        for p in self.procs.values():
            p.wait()
        self.net.down()


def wait(cond: Callable[[], bool], timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(POLL_S)
    return time.monotonic() - t0


@pytest.fixture
def gnet(tmp_path: Path) -> Iterator[GossipNetns]:
    g = GossipNetns(tmp_path)
    g.net.down()  # a predecessor's leftovers under the same name
    try:
        g.net.make_network(NODES + 1)
        yield g
    finally:
        g.close()


def test_netns_membership(gnet: GossipNetns) -> None:
    live = list(range(1, NODES))
    for i in live:
        gnet.start(i)
        if i == 1:  # the seed first (a seed not up yet is retried, but only per push/pull)
            wait(lambda: gnet.view(1)["name"] is not None, 30, "the seed to start")
    wait(lambda: all(len(gnet.states(i)) == len(live) and
                     set(gnet.states(i).values()) == {"alive"} for i in live), 60,
         "the first members to know each other")

    # a new member is known to all within a few seconds
    gnet.start(NODES, seed=3)
    wait(lambda: gnet.view(NODES)["name"] is not None, 30, "the newcomer to start")
    new = gnet.name(NODES)
    took = wait(lambda: all(gnet.states(i).get(new) == "alive" for i in live), 30,
                "the newcomer to be known")
    print(f"join known by all in {took:.2f} s")
    live.append(NODES)

    # a member with the wrong token is never admitted
    gnet.start(NODES + 1, token=ClusterKey.generate().token, seed=1)
    wait(lambda: gnet.view(NODES + 1)["name"] is not None, 30, "the intruder to start")

    # SIGKILL one: everyone declares it dead
    victim = live.pop(1)
    vname = gnet.name(victim)
    gnet.procs[victim].kill()
    took = wait(lambda: all(gnet.states(i).get(vname) == "dead" for i in live), 60,
                "the killed member to be declared dead")
    print(f"SIGKILLed member declared dead by all in {took:.2f} s")
    intruder = gnet.name(NODES + 1)
    assert all(intruder not in gnet.states(i) for i in live)

    # 10 % random drop on every link: no healthy member is declared dead
    for i in live:
        gnet.iptables(i, "-A", "INPUT", "-p", "udp", "-m", "statistic", "--mode", "random",
                      "--probability", "0.1", "-j", "DROP")
    end = time.monotonic() + LOSS_WATCH_S
    names = {gnet.name(i) for i in live}
    while time.monotonic() < end:
        for i in live:
            dead = [n for n, s in gnet.states(i).items() if n in names and s == "dead"]
            assert not dead, f"healthy members {dead} declared dead by {i} under 10 % loss"
        time.sleep(POLL_S * 5)
    for i in live:
        gnet.iptables(i, "-F", "INPUT")

    # partition into halves, then heal: one membership again
    half_a, half_b = live[: len(live) // 2], live[len(live) // 2:]
    for i in half_a:
        for j in half_b:
            gnet.iptables(i, "-A", "INPUT", "-s", gnet.net.ip(j), "-j", "DROP")
            gnet.iptables(j, "-A", "INPUT", "-s", gnet.net.ip(i), "-j", "DROP")
    names_b = [gnet.name(j) for j in half_b]
    wait(lambda: all(gnet.states(i).get(n) == "dead" for i in half_a for n in names_b), 60,
         "the halves to declare each other dead")
    for i in live:
        gnet.iptables(i, "-F", "INPUT")
    took = wait(lambda: all(all(gnet.states(i).get(n) == "alive" for n in names)
                            for i in live), 120, "the healed partition to converge")
    print(f"healed partition converged in {took:.2f} s")
