"""A simulated network of :class:`~swarm.gossip.swim.Swim` members on one fake clock.

Discrete events, no threads and no sleeping: the simulation jumps the clock to the next
timer or delivery. Every datagram goes through a real :class:`DatagramCodec` (so a member
with the wrong key is refused exactly as on UDP), with a latency, a random drop rate and
partitions; push/pull exchanges are modelled as TCP (no random loss, but partitions and
wrong keys stop them). Used by the unit tests and by ``ops/bench/gossip.py``.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from swarm.gossip.codec import DatagramCodec
from swarm.gossip.swim import Status, Swim
from swarm.gossip.timing import Timing

# One-way latency of a simulated LAN hop.
LATENCY_S = 0.0005
# Simulated clocks start here (wall-clock-like, so codec timestamps look real).
EPOCH_S = 1_700_000_000.0


class FakeClock:
    """Seconds that move only when told to."""

    def __init__(self, start: float = EPOCH_S) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@dataclass
class SimNode:
    swim: Swim
    codec: DatagramCodec
    key: bytes
    alive: bool = True
    bytes_sent: int = 0


@dataclass(order=True)
class _Event:
    when: float
    order: int
    fn: Callable[[], None] = field(compare=False)


class SimNetwork:
    """Members by address; ``drop`` is the chance each datagram is lost."""

    def __init__(self, *, seed: int = 1, timing: Timing | None = None,
                 drop: float = 0.0, latency_s: float = LATENCY_S) -> None:
        self.clock = FakeClock()
        self.rng = random.Random(seed)
        self.timing = timing or Timing.quick()
        self.drop = drop
        self.latency_s = latency_s
        self.nodes: dict[str, SimNode] = {}
        self.blocked: set[tuple[str, str]] = set()
        self._events: list[_Event] = []
        self._order = itertools.count()

    # ------------------------------------------------------------------ topology
    def add(self, name: str, key: bytes, *, seeds: tuple[str, ...] = (),
            meta: dict[str, object] | None = None) -> Swim:
        addr = f"10.0.0.{len(self.nodes) + 1}:7077"
        codec = DatagramCodec(key, clock=self.clock)
        swim = Swim(name, addr, clock=self.clock, rng=random.Random(self.rng.random()),
                    timing=self.timing, meta=meta, max_payload_bytes=codec.max_payload_bytes)
        self.nodes[addr] = SimNode(swim, codec, key)
        swim.start()
        swim.join(seeds)
        self._flush(addr)
        return swim

    def kill(self, addr: str) -> None:
        """The process is gone: it neither sends nor answers."""
        self.nodes[addr].alive = False

    def partition(self, side_a: list[str], side_b: list[str]) -> None:
        for a in side_a:
            for b in side_b:
                self.blocked.add((a, b))
                self.blocked.add((b, a))

    def heal(self) -> None:
        self.blocked.clear()

    def _reachable(self, src: str, dst: str) -> bool:
        node = self.nodes.get(dst)
        return node is not None and node.alive and (src, dst) not in self.blocked

    # ------------------------------------------------------------------ running
    def _at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, _Event(when, next(self._order), fn))

    def _flush(self, addr: str) -> None:
        node = self.nodes[addr]
        if not node.alive:
            node.swim.take_outbox()
            node.swim.take_syncs()
            return
        for dst, payload in node.swim.take_outbox():
            data = node.codec.seal(payload)
            node.bytes_sent += len(data)
            if self.drop and self.rng.random() < self.drop:
                continue
            self._at(self.clock.now + self.latency_s,
                     functools.partial(self._deliver, addr, dst, data))
        for dst, _join in node.swim.take_syncs():
            self._at(self.clock.now + 2 * self.latency_s,
                     functools.partial(self._sync, addr, dst))

    def _deliver(self, src: str, dst: str, data: bytes) -> None:
        if not self._reachable(src, dst):
            return
        node = self.nodes[dst]
        payload = node.codec.open(data)
        if payload is not None:
            node.swim.handle_packet(src, payload)
            self._flush(dst)

    def _sync(self, src: str, dst: str) -> None:
        """A push/pull over TCP: both sides merge the other's state (the server merges
        first and answers with its updated state, as the real service does)."""
        a = self.nodes[src]
        if not a.alive or not self._reachable(src, dst):
            return
        b = self.nodes[dst]
        if b.key != a.key:
            return  # the handshake fails: nothing is exchanged
        b.swim.merge_state(a.swim.local_state())
        a.swim.merge_state(b.swim.local_state())
        self._flush(dst)
        self._flush(src)

    def step(self) -> bool:
        """Advance to the next event or timer and run it; False when nothing is left."""
        nxt = self._events[0].when if self._events else None
        for n in self.nodes.values():
            d = n.swim.next_deadline()
            if n.alive and d is not None and (nxt is None or d < nxt):
                nxt = d
        if nxt is None:
            return False
        self.clock.now = max(self.clock.now, nxt)
        while self._events and self._events[0].when <= self.clock.now:
            heapq.heappop(self._events).fn()
        for addr, n in self.nodes.items():
            if n.alive:
                d = n.swim.next_deadline()
                if d is not None and d <= self.clock.now:
                    n.swim.tick()
                    self._flush(addr)
        return True

    def run_for(self, seconds: float) -> None:
        end = self.clock.now + seconds
        while self.clock.now < end and self.step():
            pass
        self.clock.now = max(self.clock.now, end)

    def run_until(self, cond: Callable[[], bool], timeout_s: float) -> float | None:
        """Run until ``cond()`` holds; the simulated seconds it took, or None."""
        start = self.clock.now
        while self.clock.now - start < timeout_s:
            if cond():
                return self.clock.now - start
            if not self.step():
                break
        return self.clock.now - start if cond() else None

    # ------------------------------------------------------------------ views
    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive]

    def status_of(self, observer: str, name: str) -> Status | None:
        m = self.nodes[observer].swim.members.get(name)
        return None if m is None else m.status

    def all_see(self, name: str, status: Status, among: list[str] | None = None) -> bool:
        addrs = among if among is not None else [a for a, n in self.nodes.items() if n.alive]
        return all(self.status_of(a, name) is status for a in addrs
                   if self.nodes[a].swim.name != name)
