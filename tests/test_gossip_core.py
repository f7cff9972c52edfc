"""The SWIM/Lifeguard core in a simulated network on a fake clock: deterministic, and
seconds of protocol time run in milliseconds."""

from __future__ import annotations

import math
import random

import pytest

from swarm.gossip.sim import SimNetwork
from swarm.gossip.swim import ALIVE, DEAD, PING, SUSPECT, Status, Swim, decode_packet
from swarm.gossip.timing import Timing

KEY = bytes(range(32))
OTHER_KEY = bytes(32)
QUICK = Timing.quick(0.1)  # probe every 0.1 s, suspicion >= 0.4 s * log10(N)


def cluster(n: int, *, seed: int = 1, drop: float = 0.0,
            timing: Timing = QUICK) -> tuple[SimNetwork, list[str]]:
    net = SimNetwork(seed=seed, timing=timing, drop=drop)
    first = net.add("n0", KEY)
    for i in range(1, n):
        net.add(f"n{i}", KEY, seeds=(first.addr,))
    addrs = list(net.nodes)
    assert net.run_until(lambda: all(n.swim.num_members() == len(addrs)
                                     for n in net.nodes.values()), 30) is not None
    return net, addrs


def test_timing_formulas_match_memberlist() -> None:
    t = Timing()
    assert t.retransmit_limit(1) == 4 and t.retransmit_limit(9) == 4
    assert t.retransmit_limit(10) == 8 and t.retransmit_limit(100) == 12
    assert t.suspicion_min_s(10) == pytest.approx(4.0)
    assert t.suspicion_max_s(10) == pytest.approx(24.0)
    assert t.suspicion_confirmations(3) == 0  # too small a cluster: min at once
    assert t.suspicion_timeout_s(3, 0) == t.suspicion_min_s(3)
    # shrinks on a log scale: max with none, min with k = mult - 2 confirmations
    assert t.suspicion_timeout_s(10, 0) == pytest.approx(24.0)
    assert t.suspicion_timeout_s(10, 2) == pytest.approx(4.0)
    mid = 24.0 - 20.0 * math.log(2) / math.log(3)
    assert t.suspicion_timeout_s(10, 1) == pytest.approx(mid)
    assert Timing.quick(0.1).probe_interval_s == pytest.approx(0.1)


def test_join_propagates_to_all() -> None:
    net, addrs = cluster(8)
    newcomer = net.add("late", KEY, seeds=(addrs[3],))
    took = net.run_until(lambda: net.all_see("late", Status.ALIVE), 10)
    assert took is not None and took < 2.0
    assert newcomer.num_members() == 9


def test_kill_is_detected_by_all_and_nobody_else_dies() -> None:
    net, addrs = cluster(8)
    net.kill(addrs[5])
    took = net.run_until(lambda: net.all_see("n5", Status.DEAD), 30)
    assert took is not None
    # detection within a probe round or two plus the (confirmed) suspicion timeout
    assert took < 8 * QUICK.probe_interval_s + QUICK.suspicion_max_s(8)
    for a in addrs:
        if a != addrs[5]:
            assert all(m.status is Status.ALIVE for m in net.nodes[a].swim.members.values()
                       if m.name != "n5")


def test_no_false_deaths_with_ten_percent_loss() -> None:
    net, addrs = cluster(8, drop=0.10, seed=7)
    net.run_for(120 * QUICK.probe_interval_s * 10)  # ~1200 protocol periods
    for a in addrs:
        assert all(m.status is not Status.DEAD for m in net.nodes[a].swim.members.values())


def test_suspect_refutes_with_higher_incarnation() -> None:
    net, addrs = cluster(4)
    victim = net.nodes[addrs[2]].swim
    before = victim.me.incarnation
    accuser = net.nodes[addrs[0]].swim
    accuser._suspect("n2", victim.me.incarnation, accuser.name)  # a false suspicion
    net._flush(addrs[0])
    assert accuser.members["n2"].status is Status.SUSPECT
    took = net.run_until(lambda: net.all_see("n2", Status.ALIVE), 5)
    assert took is not None
    assert victim.me.incarnation > before
    assert victim.stats.get("refutations", 0) >= 1
    assert victim.health >= 1  # Lifeguard: being suspected costs local health


def test_confirmations_shrink_suspicion() -> None:
    """With independent confirmations the suspect is declared dead near the minimum
    timeout, not the maximum."""
    net, addrs = cluster(10)
    net.kill(addrs[4])
    t = QUICK
    took = net.run_until(lambda: any(net.status_of(a, "n4") is Status.DEAD
                                     for a in addrs if a != addrs[4]), 60)
    assert took is not None
    assert took < t.suspicion_max_s(10)  # never waited out the unconfirmed maximum


def test_local_health_slows_a_struggling_node() -> None:
    """A node whose probes all fail with no nacks raises its health score, and with it
    its probe interval; acks bring it back down."""
    clock = [0.0]
    s = Swim("me", "a:1", clock=lambda: clock[0], rng=random.Random(1), timing=QUICK)
    for i in range(4):
        s._alive(f"p{i}", f"b:{i}", 1, {})
    s.start()
    for _ in range(200):
        clock[0] += 0.01
        s.tick()
        s.take_outbox()  # nothing ever answers: our packets go nowhere
    assert s.health >= 3  # three helpers per failed probe, none of them nacked
    assert s._scale(1.0) == s.health + 1
    s.health = 3
    probe = s._probe
    assert probe is not None
    s._on_ack(probe.seq)
    assert s.health == 2


def test_nacks_spare_local_health() -> None:
    clock = [0.0]
    s = Swim("me", "a:1", clock=lambda: clock[0], rng=random.Random(1), timing=QUICK)
    for i in range(4):
        s._alive(f"p{i}", f"b:{i}", 1, {})
    s.start()
    while s._probe is None:
        clock[0] += 0.01
        s.tick()
    probe = s._probe
    clock[0] += QUICK.probe_timeout_s
    s.tick()
    assert probe.indirect_sent == 3
    for _ in range(probe.indirect_sent):
        s._on_nack(probe.seq)
    clock[0] += QUICK.probe_interval_s
    s.tick()
    assert s.health == 0  # every helper answered: the target is the problem, not us
    assert s.members[probe.target].status is Status.SUSPECT


def test_partition_heals_into_one_membership() -> None:
    net, addrs = cluster(8, seed=3)
    a, b = addrs[:4], addrs[4:]
    net.partition(a, b)
    names_b = [net.nodes[x].swim.name for x in b]
    assert net.run_until(lambda: all(net.all_see(n, Status.DEAD, a) for n in names_b),
                         60) is not None
    net.heal()
    took = net.run_until(lambda: all(
        m.status is Status.ALIVE for n in net.nodes.values() for m in n.swim.members.values()),
        10 * QUICK.reconnect_interval_s + 30)
    assert took is not None


def test_wrong_key_is_never_admitted() -> None:
    net, addrs = cluster(4)
    intruder = net.add("intruder", OTHER_KEY, seeds=(addrs[0],))  # its push/pull fails
    # it even learns the members' addresses and probes and gossips at them directly
    for i, a in enumerate(addrs):
        intruder._alive(f"n{i}", a, 1, {})
    net.run_for(20)
    for a in addrs:
        assert "intruder" not in net.nodes[a].swim.members
    assert sum(net.nodes[a].codec.drops.get("authentication", 0) for a in addrs) > 10
    assert all(m.status is Status.DEAD for m in intruder.members.values()
               if m.name != "intruder")


def test_retransmit_limit_retires_broadcasts() -> None:
    net, _addrs = cluster(4)
    net.run_for(5)
    for n in net.nodes.values():
        assert not n.swim._broadcasts  # every broadcast was sent its quota and retired


def test_packets_stay_under_the_datagram_limit() -> None:
    net, addrs = cluster(6)
    big = {"warm": {f"{i:012x}": 0.5 for i in range(20)}, "cpu": 12}
    for a in addrs:
        net.nodes[a].swim.set_meta(big)
    sizes: list[int] = []
    for n in net.nodes.values():
        orig = n.codec.seal

        def seal(p: bytes, orig=orig) -> bytes:
            out = orig(p)
            sizes.append(len(out))
            return out
        n.codec.seal = seal  # type: ignore[method-assign]
    net.run_for(3)
    assert sizes and max(sizes) <= QUICK.max_datagram_bytes
    assert all(net.nodes[a].swim.members["n1"].meta == big for a in addrs)


@pytest.mark.parametrize("payload", [
    b"", b"\x90", b"\xc1", b"\x91\x90", b"\x91\x91\x09", bytes(range(256)),
    b"\x91\x95\x05\xa1x\xa1y\xff\x80",  # negative incarnation
    b"\x91\x94\x01\x01\xa1x\xa1y",  # PING missing a field
])
def test_malformed_packets_are_dropped_whole(payload: bytes) -> None:
    s = Swim("me", "a:1", clock=lambda: 0.0, timing=QUICK)
    before = {n: (m.status, m.incarnation) for n, m in s.members.items()}
    s.take_outbox()
    s.handle_packet("x:1", payload)
    assert s.dropped == 1
    assert {n: (m.status, m.incarnation) for n, m in s.members.items()} == before
    assert s.take_outbox() == []
    with pytest.raises(ValueError):
        decode_packet(payload)


def test_message_shapes_round_trip() -> None:
    import msgpack
    msgs = [[PING, 1, "t", "s", "a:1"], [ALIVE, "x", "b:2", 3, {"cpu": 1}],
            [SUSPECT, "x", 3, "y"], [DEAD, "x", 3, "y"]]
    assert decode_packet(msgpack.packb(msgs)) == msgs


def test_dead_member_forgotten_after_retain_window() -> None:
    timing = Timing.quick(0.1, dead_retain_s=5.0, reconnect_interval_s=1.0)
    net, addrs = cluster(4, timing=timing)
    net.kill(addrs[3])
    assert net.run_until(lambda: net.all_see("n3", Status.DEAD), 30) is not None
    net.run_for(8)
    for a in addrs[:3]:
        assert "n3" not in net.nodes[a].swim.members


def test_a_seed_that_was_not_up_yet_is_retried() -> None:
    net = SimNetwork(seed=2, timing=QUICK)
    first = net.add("n0", KEY)
    net.kill(first.addr)  # not answering yet
    late = net.add("n1", KEY, seeds=(first.addr,))
    net.run_for(1)
    assert late.num_members() == 1
    net.nodes[first.addr].alive = True  # the seed comes up
    assert net.run_until(lambda: late.num_members() == 2, 3 * QUICK.push_pull_interval_s)
