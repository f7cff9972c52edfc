#!/usr/bin/env python3
"""Gossip benchmark: for N members, how long a join takes to reach everyone and a kill to
be detected by everyone, beside what the SWIM/Lifeguard model predicts for the same
settings (ratio measured/model), and the bytes per second each member sends.

    .venv/bin/python ops/bench/gossip.py [--sizes 8,32,128] [--runs 5] [--real 8]

Two kinds of rows, labelled:
- ``sim``: the real protocol core and codec in the discrete-event network of
  swarm/gossip/sim.py (0.5 ms hops, no loss), default (production) timings, fake clock:
  protocol behaviour without this machine's scheduling noise, at sizes it cannot host.
- ``real``: N :class:`GossipService` instances on loopback in this process, real UDP and
  the encrypted TCP transport, default timings, wall clock.

The model (memberlist/SWIM, T = probe interval, g = gossip interval, f = gossip fanout):
- join: the joiner's push/pull makes the seed know it at once; the ALIVE then spreads as
  an epidemic, log_{f+1}(N) + ln(N)/f rounds of g (Pittel's bound for push gossip).
- kill: the first member to probe the dead one does so after T/(1 - 1/e) - T/2 on
  average (each of N-1 members probes one of N-1 per period), declares it suspect one
  period later; the suspicion then runs the Lifeguard timeout, shrinking from max to min
  as the other members' probes confirm it (about one confirmation per T/(1 - 1/e));
  finally the DEAD spreads like a join.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.bench.common import row
from swarm.gossip.service import GossipService
from swarm.gossip.sim import SimNetwork
from swarm.gossip.swim import Status
from swarm.gossip.timing import Timing
from swarm.net.secure import ClusterKey, NodeKey

KEY = bytes(range(32))
FIRST_PROBE_PERIODS = 1 / (1 - 1 / math.e)  # SWIM: expected periods to a first probe


def model_spread_s(t: Timing, n: int) -> float:
    f = t.gossip_nodes
    rounds = math.log(n, f + 1) + math.log(n) / f
    return rounds * t.gossip_interval_s


def model_kill_s(t: Timing, n: int) -> float:
    T = t.probe_interval_s
    first = FIRST_PROBE_PERIODS * T - T / 2 + T
    per_confirmation = FIRST_PROBE_PERIODS * T
    k = t.suspicion_confirmations(n)
    # the suspicion ends at the first s with s >= timeout(confirmations seen by s)
    s = t.suspicion_min_s(n)
    for c in range(k + 1):
        timeout = t.suspicion_timeout_s(n, c)
        if c == k or timeout <= (c + 1) * per_confirmation:
            s = max(timeout, c * per_confirmation)
            break
    return first + s + model_spread_s(t, n)


def sim_run(n: int, seed: int, timing: Timing) -> tuple[float, float, float]:
    net = SimNetwork(seed=seed, timing=timing)
    first = net.add("n0", KEY)
    for i in range(1, n):
        net.add(f"n{i}", KEY, seeds=(first.addr,))
    ok = net.run_until(lambda: all(x.swim.num_members() == n for x in net.nodes.values()),
                       600)
    assert ok is not None, "cluster did not form"
    net.run_for(3 * timing.push_pull_interval_s)  # settle: initial broadcasts retired
    sent0 = {a: x.bytes_sent for a, x in net.nodes.items()}
    t0 = net.clock.now
    net.run_for(60)
    bps = statistics.mean((x.bytes_sent - sent0[a]) / (net.clock.now - t0)
                          for a, x in net.nodes.items())
    addrs = list(net.nodes)
    net.add("late", KEY, seeds=(addrs[seed % n],))
    join = net.run_until(lambda: net.all_see("late", Status.ALIVE), 600)
    victim = addrs[(seed * 7 + 1) % n]
    name = net.nodes[victim].swim.name
    net.kill(victim)
    kill = net.run_until(lambda: net.all_see(name, Status.DEAD), 600)
    assert join is not None and kill is not None
    return join, kill, bps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def real_run(n: int, timing: Timing) -> tuple[float, float, float]:
    cluster = ClusterKey.generate()
    async with contextlib.AsyncExitStack() as stack:
        nodes: list[GossipService] = []

        async def start(seeds: tuple[str, ...]) -> GossipService:
            svc = GossipService(cluster, NodeKey.generate(), f"127.0.0.1:{free_port()}",
                                timing=timing, seeds=seeds)
            await svc.async_start()
            stack.push_async_callback(svc.async_stop)
            return svc

        for _ in range(n):
            nodes.append(await start((nodes[0].addr,) if nodes else ()))
        for x in nodes:
            assert await x.async_wait(lambda x=x: x.swim.num_members() == n, 120)
        await asyncio.sleep(5)  # the initial broadcasts retire: measure steady traffic
        sent0 = [x.bytes_sent for x in nodes]
        t0 = time.monotonic()
        await asyncio.sleep(10)
        bps = statistics.mean((x.bytes_sent - s) / (time.monotonic() - t0)
                              for x, s in zip(nodes, sent0, strict=True))

        t0 = time.monotonic()
        late = await start((nodes[1].addr,))
        for x in nodes:
            assert await x.async_wait(lambda x=x: late.name in x.swim.members, 120)
        join = time.monotonic() - t0

        victim = nodes.pop(2)
        t0 = time.monotonic()
        await victim.async_stop()  # no goodbye: as a SIGKILL looks to the others
        for x in [*nodes, late]:
            assert await x.async_wait(
                lambda x=x: x.swim.members[victim.name].status is Status.DEAD, 300)
        kill = time.monotonic() - t0
        return join, kill, bps


def report(kind: str, n: int, t: Timing, joins: list[float], kills: list[float],
           bps: list[float]) -> None:
    j, k = statistics.median(joins), statistics.median(kills)
    mj, mk = model_spread_s(t, n + 1), model_kill_s(t, n)
    print(f"{kind} N={n} ({len(joins)} runs, median)")
    row("join reaches every member", f"{j:.2f} s",
        f"model {mj:.2f} s, ratio {j / mj:.2f}")
    row("kill detected (dead) by every member", f"{k:.2f} s",
        f"model {mk:.2f} s, ratio {k / mk:.2f} (suspicion min {t.suspicion_min_s(n):.1f} s,"
        f" max {t.suspicion_max_s(n):.1f} s)")
    row("bytes sent per member, steady", f"{statistics.mean(bps):.0f} B/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="8,32,128", help="N values for simulated runs")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--real", type=int, default=8, help="N for the loopback run (0: none)")
    args = ap.parse_args()
    t = Timing()
    print(f"timings: probe {t.probe_interval_s} s, timeout {t.probe_timeout_s} s, "
          f"gossip {t.gossip_interval_s} s x {t.gossip_nodes}, suspicion mult "
          f"{t.suspicion_mult}/{t.suspicion_max_mult}, retransmit mult {t.retransmit_mult}")
    for n in [int(x) for x in args.sizes.split(",") if x]:
        res = [sim_run(n, seed, t) for seed in range(1, args.runs + 1)]
        report("sim", n, t, [r[0] for r in res], [r[1] for r in res], [r[2] for r in res])
    if args.real:
        join, kill, bps = asyncio.run(real_run(args.real, t))
        report("real (loopback, one process)", args.real, t, [join], [kill], [bps])


if __name__ == "__main__":
    main()
