"""SWIM membership with the Lifeguard refinements, as a pure state machine.

No sockets, no asyncio, no wall clock: the owner feeds it datagram payloads
(:meth:`Swim.handle_packet`), calls :meth:`Swim.tick` at :meth:`Swim.next_deadline`, and
sends what :meth:`Swim.take_outbox` and :meth:`Swim.take_syncs` return. The clock and the
random source are injected, so a whole cluster runs deterministically in a simulated
network (tests/test_gossip_core.py, ops/bench/gossip.py) and the same object runs on real
UDP (:mod:`swarm.gossip.service`).

What it does, and why (memberlist's choices, which Lifeguard measured):

- **Probe**: each protocol period one member, round-robin over a shuffled list (every
  member is probed within 2N periods), gets a ``PING``; no ``ACK`` within the probe
  timeout, and ``k`` random members are asked to ping it for us (``PING_REQ``), which
  gets past a single lossy link; they answer ``NACK`` when they hear nothing, so a
  prober can tell "the target is silent" from "my own packets do not get out".
- **Suspicion**: a member that fails a probe is *suspect*, not dead. It can refute by
  gossiping ``ALIVE`` with a higher incarnation. The suspicion lasts from
  ``max`` down to ``min`` as independent members confirm it (log scale), so a real
  failure is declared fast and a lone slow prober does not kill anyone.
- **Local health (LHM)**: failed probes with missing nacks, and having to refute
  suspicion of ourselves, raise a score that multiplies our probe interval and timeout;
  successful probes lower it. A node starved of CPU slows down instead of accusing
  healthy members.
- **Dissemination**: every state change is a broadcast piggybacked on probes and on
  gossip rounds to a few random members, each sent ``mult * ceil(log10(N+1))`` times,
  fewest-sent first; a newer broadcast about a member replaces the older one.
- **Anti-entropy**: a full state push/pull over TCP with one random member per period,
  and with a *dead* member now and then: dead members are kept for a long window
  (``dead_retain_s``) exactly so that after a partition heals the two sides meet again;
  a node that learns it was declared dead refutes with a higher incarnation.

Packets are msgpack arrays of messages, each itself an array whose first element is its
type (the table below). Everything decoded is checked for shape; a malformed packet is
dropped whole and counted, before any of it is acted on.

==========  ===========================================================
``PING``     ``[1, seq, target_name, sender_name, sender_addr]``
``PING_REQ`` ``[2, seq, target_name, target_addr, sender_name, sender_addr]``
``ACK``      ``[3, seq, sender_name]``
``NACK``     ``[4, seq, sender_name]``
``ALIVE``    ``[5, name, addr, incarnation, meta]`` (meta: a small map, node state)
``SUSPECT``  ``[6, name, incarnation, from_name]``
``DEAD``     ``[7, name, incarnation, from_name]``
==========  ===========================================================
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from swarm.gossip.timing import Timing

log = logging.getLogger(__name__)

PING, PING_REQ, ACK, NACK, ALIVE, SUSPECT, DEAD = 1, 2, 3, 4, 5, 6, 7
# Names and addresses longer than this are malformed (a name is a key prefix in hex).
MAX_NAME_CHARS = 64
MAX_ADDR_CHARS = 64
# Messages in one packet; more is malformed (a full packet holds a few dozen).
MAX_MESSAGES_PER_PACKET = 128
# Room the msgpack array header of a packet may take.
PACKET_HEADER_BYTES = 3


class Status(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass
class Member:
    """What this node believes about one member (itself included)."""

    name: str
    addr: str
    incarnation: int
    status: Status
    since: float  # clock time of the last status change
    meta: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "addr": self.addr, "incarnation": self.incarnation,
                "state": self.status.value, "meta": self.meta}


@dataclass
class _Suspicion:
    """A running suspicion of one member at one incarnation (Lifeguard's dogpile)."""

    incarnation: int
    start: float
    n: int  # members when it started (fixes min, max and k)
    confirmers: set[str]
    deadline: float


@dataclass
class _Probe:
    """This node's probe in flight: the target, and what the indirect probes said."""

    seq: int
    target: str
    started: float
    acked: bool = False
    indirect_sent: int = 0
    nacks: int = 0


@dataclass
class _Relay:
    """An indirect probe we run for another member: whom to answer, under which seq."""

    requester_addr: str
    requester_seq: int
    done: bool = False


@dataclass
class _Broadcast:
    name: str  # the member it is about: a newer broadcast about it replaces this one
    data: bytes  # the encoded message
    transmits: int = 0
    order: int = 0  # newer first among broadcasts sent equally often


class _Malformed(Exception):
    pass


def _check_str(v: object, limit: int) -> str:
    if not isinstance(v, str) or not v or len(v) > limit:
        raise _Malformed("bad string")
    return v


def _check_int(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 63:
        raise _Malformed("bad integer")
    return v


def decode_packet(payload: bytes) -> list[list[Any]]:
    """The messages of a packet, shape-checked; raises ValueError for anything malformed
    (the caller drops the packet whole)."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True,
                              max_array_len=MAX_MESSAGES_PER_PACKET, max_map_len=64)
    except Exception as err:  # msgpack raises several unrelated types
        raise ValueError(f"undecodable packet: {type(err).__name__}") from None
    if not isinstance(obj, list) or not obj:
        raise ValueError("packet is not a list of messages")
    out = []
    try:
        for msg in obj:
            if not isinstance(msg, list) or not msg:
                raise _Malformed("message is not a list")
            t = msg[0]
            shape: tuple[str, ...] = {
                PING: ("i", "n", "n", "a"), PING_REQ: ("i", "n", "a", "n", "a"),
                ACK: ("i", "n"), NACK: ("i", "n"), ALIVE: ("n", "a", "i", "m"),
                SUSPECT: ("n", "i", "n"), DEAD: ("n", "i", "n")}.get(t, ())
            if not shape or len(msg) != len(shape) + 1:
                raise _Malformed(f"unknown or malformed message type {t!r}")
            for kind, v in zip(shape, msg[1:], strict=True):
                if kind == "i":
                    _check_int(v)
                elif kind == "n":
                    _check_str(v, MAX_NAME_CHARS)
                elif kind == "a":
                    _check_str(v, MAX_ADDR_CHARS)
                elif not isinstance(v, dict):
                    raise _Malformed("meta is not a map")
            out.append(msg)
    except _Malformed as err:
        raise ValueError(str(err)) from None
    return out


def _pack(msg: list[Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


class Swim:
    """One member's view of the cluster and its side of the protocol (see the module
    docstring). ``clock`` returns seconds (monotonic); ``rng`` makes every random choice,
    so a seeded simulation replays exactly."""

    def __init__(self, name: str, addr: str, *, clock: Callable[[], float],
                 rng: random.Random | None = None, timing: Timing | None = None,
                 meta: dict[str, Any] | None = None, max_payload_bytes: int | None = None,
                 on_change: Callable[[Member], None] | None = None) -> None:
        self.name = name
        self.addr = addr
        self.clock = clock
        self.rng = rng or random.Random()
        self.timing = timing or Timing()
        # the codec's overhead comes off the datagram limit
        self.max_payload_bytes = max_payload_bytes or self.timing.max_datagram_bytes
        self.on_change = on_change
        now = clock()
        self.me = Member(name, addr, 0, Status.ALIVE, now, dict(meta or {}))
        self.members: dict[str, Member] = {name: self.me}
        self.health = 0  # Lifeguard's local health score: timeouts scale by health + 1
        self.dropped = 0  # malformed packets
        self.stats: dict[str, int] = {}
        self._seq = itertools.count(1)
        self._order = itertools.count()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_ids = itertools.count()
        self._outbox: list[tuple[str, bytes]] = []
        self._syncs: list[tuple[str, bool]] = []
        self._broadcasts: dict[str, _Broadcast] = {}
        self._suspicions: dict[str, _Suspicion] = {}
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._probe_order: list[str] = []
        self._started = False
        self._seeds: list[str] = []  # tried again while we know nobody (seed not up yet)
        self._broadcast_alive()

    # ------------------------------------------------------------------ driving
    def start(self) -> None:
        """Begin probing, gossiping and push/pull (each on its own timer)."""
        if self._started:
            return
        self._started = True
        t = self.timing
        # stagger the first rounds so simulated members do not move in lockstep
        self._after(self.rng.uniform(0, t.probe_interval_s), self._probe_round)
        self._after(self.rng.uniform(0, t.gossip_interval_s), self._gossip_round)
        self._after(self.rng.uniform(0, t.push_pull_interval_s), self._push_pull_round)
        self._after(self.rng.uniform(0, t.reconnect_interval_s), self._reconnect_round)

    def join(self, addrs: Iterable[str]) -> None:
        """Ask for a full state exchange with each address (seeds, discovered peers)."""
        for a in addrs:
            if a != self.addr:
                self._syncs.append((a, True))
                self._seeds.append(a)

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def tick(self) -> None:
        """Run every timer that is due by the clock."""
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            fn()

    def take_outbox(self) -> list[tuple[str, bytes]]:
        """Packets to send: (address, payload)."""
        out, self._outbox = self._outbox, []
        return out

    def take_syncs(self) -> list[tuple[str, bool]]:
        """Push/pull exchanges to run: (address, is_join). The owner calls
        :meth:`local_state` for what to send and :meth:`merge_state` with the answer."""
        out, self._syncs = self._syncs, []
        return out

    def _after(self, delay_s: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (self.clock() + delay_s, next(self._timer_ids), fn))

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    # ------------------------------------------------------------------ views
    def num_members(self) -> int:
        """Members not dead, ourselves included: the N of every log(N) formula."""
        return sum(1 for m in self.members.values() if m.status is not Status.DEAD)

    def alive_addrs(self) -> list[str]:
        """Addresses of the other members that are alive (suspects too: a suspect is
        probably alive, and blob fetches fail over anyway)."""
        return [m.addr for m in self.members.values()
                if m.name != self.name and m.status is not Status.DEAD]

    def set_meta(self, meta: dict[str, Any]) -> None:
        """New node state: gossiped as an ALIVE with the next incarnation (memberlist's
        way, so everyone orders state updates by incarnation)."""
        if meta == self.me.meta:
            return
        self.me.meta = dict(meta)
        self.me.incarnation += 1
        self._broadcast_alive()

    def _scale(self, s: float) -> float:
        return s * (self.health + 1)

    def _adjust_health(self, delta: int) -> None:
        self.health = min(max(self.health + delta, 0), self.timing.awareness_max_mult - 1)

    # ------------------------------------------------------------------ probing
    def _next_target(self) -> Member | None:
        while True:
            if not self._probe_order:
                names = [n for n, m in self.members.items()
                         if n != self.name and m.status is not Status.DEAD]
                if not names:
                    return None
                self.rng.shuffle(names)
                self._probe_order = names
            m = self.members.get(self._probe_order.pop())
            if m is not None and m.status is not Status.DEAD:
                return m

    def _probe_round(self) -> None:
        interval = self._scale(self.timing.probe_interval_s)
        self._after(interval, self._probe_round)
        if self._probe is not None and not self._probe.acked:
            self._probe_failed(self._probe)
        self._probe = None
        target = self._next_target()
        if target is None:
            return
        seq = next(self._seq)
        probe = _Probe(seq, target.name, self.clock())
        self._probe = probe
        self._count("probes")
        self._send(target.addr, [PING, seq, target.name, self.name, self.addr])
        self._after(self._scale(self.timing.probe_timeout_s),
                    lambda: self._probe_indirect(probe))

    def _probe_indirect(self, probe: _Probe) -> None:
        if probe.acked or self._probe is not probe:
            return
        target = self.members.get(probe.target)
        if target is None:
            return
        helpers = [m for n, m in self.members.items() if n not in (self.name, probe.target)
                   and m.status is Status.ALIVE]
        for m in self.rng.sample(helpers, min(self.timing.indirect_checks, len(helpers))):
            probe.indirect_sent += 1
            self._send(m.addr, [PING_REQ, probe.seq, target.name, target.addr, self.name,
                                self.addr])

    def _probe_failed(self, probe: _Probe) -> None:
        """The period ended with no ack, direct or relayed: suspect the target, and count
        missing nacks against our own health (Lifeguard: no nacks means it is probably
        our network, not theirs)."""
        self._count("probe_failures")
        self._adjust_health(probe.indirect_sent - probe.nacks)
        target = self.members.get(probe.target)
        if target is None or target.status is Status.DEAD:
            return
        self._suspect(target.name, target.incarnation, self.name)

    def _on_ack(self, seq: int) -> None:
        probe = self._probe
        if probe is not None and probe.seq == seq and not probe.acked:
            probe.acked = True
            self._adjust_health(-1)
            return
        relay = self._relays.pop(seq, None)
        if relay is not None and not relay.done:
            relay.done = True
            self._send(relay.requester_addr, [ACK, relay.requester_seq, self.name])

    def _on_nack(self, seq: int) -> None:
        probe = self._probe
        if probe is not None and probe.seq == seq:
            probe.nacks += 1

    def _on_ping_req(self, seq: int, target: str, target_addr: str, src_addr: str) -> None:
        my_seq = next(self._seq)
        relay = _Relay(src_addr, seq)
        self._relays[my_seq] = relay
        self._send(target_addr, [PING, my_seq, target, self.name, self.addr])

        def expire() -> None:
            if self._relays.pop(my_seq, None) is not None and not relay.done:
                self._send(relay.requester_addr, [NACK, relay.requester_seq, self.name])

        self._after(self.timing.probe_timeout_s, expire)

    # ------------------------------------------------------------------ suspicion
    def _suspect(self, name: str, inc: int, by: str) -> None:
        m = self.members.get(name)
        if m is None or inc < m.incarnation or m.status is Status.DEAD:
            return
        if name == self.name:
            self._refute(inc)
            return
        susp = self._suspicions.get(name)
        if m.status is Status.SUSPECT and susp is not None and inc == susp.incarnation:
            if by in susp.confirmers:
                return
            susp.confirmers.add(by)  # an independent confirmation: shorten it
            timeout = self.timing.suspicion_timeout_s(susp.n, len(susp.confirmers) - 1)
            susp.deadline = susp.start + timeout
            self._after(max(0.0, susp.deadline - self.clock()), lambda: self._check(name))
            self._queue(name, [SUSPECT, name, inc, by])  # re-gossip the confirmation
            return
        n = self.num_members()
        now = self.clock()
        timeout = self.timing.suspicion_timeout_s(n, 0)
        susp = _Suspicion(inc, now, n, {by}, now + timeout)
        self._suspicions[name] = susp
        m.incarnation = inc
        self._set_status(m, Status.SUSPECT)
        self._queue(name, [SUSPECT, name, inc, by])
        self._after(timeout, lambda: self._check(name))

    def _check(self, name: str) -> None:
        susp = self._suspicions.get(name)
        m = self.members.get(name)
        if susp is None or m is None or m.status is not Status.SUSPECT \
                or m.incarnation != susp.incarnation:
            return
        if self.clock() < susp.deadline:
            return  # a stale timer: a later one is queued for the real deadline
        log.info("%s: suspicion of %s timed out after %.1f s (%d confirmations): dead",
                 self.name, name, self.clock() - susp.start, len(susp.confirmers) - 1)
        self._dead(name, susp.incarnation, self.name)

    def _dead(self, name: str, inc: int, by: str) -> None:
        m = self.members.get(name)
        if m is None or inc < m.incarnation or m.status is Status.DEAD:
            return
        if name == self.name:
            self._refute(inc)
            return
        self._suspicions.pop(name, None)
        m.incarnation = inc
        self._set_status(m, Status.DEAD)
        self._queue(name, [DEAD, name, inc, by])

    def _refute(self, inc: int) -> None:
        """Someone thinks we are suspect or dead: outbid them. Having to do so is a
        sign our own packets are late, so it costs local health too."""
        self.me.incarnation = max(self.me.incarnation, inc) + 1
        self._adjust_health(1)
        self._count("refutations")
        self._broadcast_alive()

    def _alive(self, name: str, addr: str, inc: int, meta: dict[str, Any]) -> None:
        if name == self.name:
            if inc > self.me.incarnation or (inc == self.me.incarnation
                                              and meta != self.me.meta):
                self._refute(inc)  # an older self of ours (a restart) is being gossiped
            return
        m = self.members.get(name)
        if m is None:
            m = Member(name, addr, inc, Status.ALIVE, self.clock(), dict(meta))
            self.members[name] = m
            self._queue(name, [ALIVE, name, addr, inc, meta])
            self._notify(m)
            return
        if inc <= m.incarnation:
            return
        m.incarnation = inc
        m.addr = addr
        m.meta = dict(meta)
        self._suspicions.pop(name, None)
        self._queue(name, [ALIVE, name, addr, inc, meta])
        if m.status is not Status.ALIVE:
            self._set_status(m, Status.ALIVE)
        else:
            self._notify(m)

    def _set_status(self, m: Member, status: Status) -> None:
        m.status = status
        m.since = self.clock()
        self._notify(m)

    def _notify(self, m: Member) -> None:
        if self.on_change is not None:
            self.on_change(m)

    # ------------------------------------------------------------------ dissemination
    def _broadcast_alive(self) -> None:
        me = self.me
        self._queue(me.name, [ALIVE, me.name, me.addr, me.incarnation, me.meta])

    def _queue(self, about: str, msg: list[Any]) -> None:
        self._broadcasts[about] = _Broadcast(about, _pack(msg), 0, next(self._order))

    def _piggyback(self, room: int) -> list[bytes]:
        """Broadcasts that fit in ``room`` bytes, least-sent (then newest) first; each
        sent past the retransmit limit is retired."""
        if not self._broadcasts:
            return []
        limit = self.timing.retransmit_limit(self.num_members())
        out = []
        for b in sorted(self._broadcasts.values(), key=lambda b: (b.transmits, -b.order)):
            if len(b.data) > room:
                continue
            out.append(b.data)
            room -= len(b.data)
            b.transmits += 1
            if b.transmits >= limit:
                del self._broadcasts[b.name]
            if len(out) >= MAX_MESSAGES_PER_PACKET - 1:
                break
        return out

    def _send(self, addr: str, msg: list[Any] | None) -> None:
        """One packet: ``msg`` (when given) and as many broadcasts as fit."""
        parts = [] if msg is None else [_pack(msg)]
        room = self.max_payload_bytes - PACKET_HEADER_BYTES - sum(len(p) for p in parts)
        parts += self._piggyback(room)
        if not parts:
            return
        packer = msgpack.Packer()
        payload = packer.pack_array_header(len(parts)) + b"".join(parts)
        self._count("packets_sent")
        self._count("bytes_sent", len(payload))
        self._outbox.append((addr, payload))

    def _gossip_round(self) -> None:
        self._after(self.timing.gossip_interval_s, self._gossip_round)
        if not self._broadcasts:
            return
        now = self.clock()
        peers = [m for n, m in self.members.items() if n != self.name and (
            m.status is not Status.DEAD
            or now - m.since < self.timing.gossip_to_the_dead_s)]
        for m in self.rng.sample(peers, min(self.timing.gossip_nodes, len(peers))):
            self._send(m.addr, None)

    # ------------------------------------------------------------------ receiving
    def handle_packet(self, src_addr: str, payload: bytes) -> None:
        """Act on one authenticated payload from ``src_addr``; a malformed one is dropped
        whole, before anything in it is acted on."""
        try:
            msgs = decode_packet(payload)
        except ValueError as err:
            self.dropped += 1
            log.debug("%s: dropped packet from %s: %s", self.name, src_addr, err)
            return
        self._count("packets_received")
        for msg in msgs:
            t = msg[0]
            if t == PING:
                if msg[2] == self.name:  # not an old member's address reused by us
                    self._send(src_addr, [ACK, msg[1], self.name])
            elif t == PING_REQ:
                self._on_ping_req(msg[1], msg[2], msg[3], src_addr)
            elif t == ACK:
                self._on_ack(msg[1])
            elif t == NACK:
                self._on_nack(msg[1])
            elif t == ALIVE:
                self._alive(msg[1], msg[2], msg[3], msg[4])
            elif t == SUSPECT:
                self._suspect(msg[1], msg[2], msg[3])
            elif t == DEAD:
                self._dead(msg[1], msg[2], msg[3])

    # ------------------------------------------------------------------ push/pull
    def local_state(self) -> list[list[Any]]:
        """Every member we know, for a push/pull: ``[name, addr, inc, status, meta]``."""
        return [[m.name, m.addr, m.incarnation, m.status.value, m.meta]
                for m in self.members.values()]

    def merge_state(self, remote: object) -> None:
        """Fold a peer's full state into ours, as if each entry had been gossiped. A
        malformed state is dropped whole."""
        if not isinstance(remote, list):
            self.dropped += 1
            return
        entries = []
        try:
            for e in remote:
                if not isinstance(e, list) or len(e) != 5:
                    raise _Malformed("bad entry")
                name, addr = _check_str(e[0], MAX_NAME_CHARS), _check_str(e[1], MAX_ADDR_CHARS)
                inc = _check_int(e[2])
                status = Status(e[3])
                if not isinstance(e[4], dict):
                    raise _Malformed("bad meta")
                entries.append((name, addr, inc, status, e[4]))
        except (_Malformed, ValueError):
            self.dropped += 1
            return
        self._count("syncs_merged")
        for name, addr, inc, status, meta in entries:
            known = self.members.get(name)
            if status is Status.ALIVE or known is None:
                # an unknown member is learnt as alive first (memberlist does the same):
                # we cannot suspect what we have never seen
                self._alive(name, addr, inc, meta)
                if status is Status.ALIVE:
                    continue
            if status is Status.SUSPECT:
                self._suspect(name, inc, self.name)
            else:
                # a dead verdict from a sync is taken as a suspicion: the two sides of a
                # healed partition do not get to kill each other without a probe
                self._suspect(name, inc, self.name)

    # ------------------------------------------------------------------ anti-entropy
    def _push_pull_round(self) -> None:
        self._after(self.timing.push_pull_interval_s
                    * _push_pull_scale(self.num_members()), self._push_pull_round)
        peers = [m.addr for n, m in self.members.items()
                 if n != self.name and m.status is Status.ALIVE]
        if peers:
            self._syncs.append((self.rng.choice(peers), False))
        elif self._seeds and self.num_members() == 1:
            self._syncs.extend((a, True) for a in self._seeds)

    def _reconnect_round(self) -> None:
        """Try one dead member: a healed partition, or a node that came back."""
        self._after(self.timing.reconnect_interval_s, self._reconnect_round)
        now = self.clock()
        for name, m in list(self.members.items()):
            if m.status is Status.DEAD and now - m.since > self.timing.dead_retain_s:
                del self.members[name]  # gone for good
        dead = [m.addr for m in self.members.values() if m.status is Status.DEAD]
        if dead:
            self._syncs.append((self.rng.choice(dead), False))


def _push_pull_scale(n: int) -> float:
    """memberlist's pushPullScale: above 32 members push/pull slows down with log2(N), so
    the cluster's total sync traffic stays bounded."""
    threshold = 32
    if n <= threshold:
        return 1.0
    return math.ceil(math.log2(n) - math.log2(threshold)) + 1.0
