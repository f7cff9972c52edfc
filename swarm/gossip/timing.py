"""Every timing and size of the gossip layer, with its unit, in one place.

The defaults are HashiCorp memberlist's LAN profile (the settings Consul and Nomad run),
so the failure-detection model behind them is a known quantity: with N members a dead
node is probed within a few protocol periods, suspected for
``SUSPICION_MULT * log10(N) * PROBE_INTERVAL_S`` at least (up to ``SUSPICION_MAX_MULT``
times that when nobody confirms), and the news reaches everyone in
``O(log N)`` gossip rounds. Tests and the benchmark pass a :class:`Timing` with shorter
periods (``Timing.quick()``) instead of sleeping through the real ones.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# --- failure detection (SWIM) ---
PROBE_INTERVAL_S = 1.0  # one member probed per interval (scaled by local health)
PROBE_TIMEOUT_S = 0.5  # wait for a direct ack before asking k peers to probe
INDIRECT_CHECKS = 3  # k: peers asked to probe on our behalf
# --- suspicion (Lifeguard) ---
SUSPICION_MULT = 4  # min suspicion = mult * log10(max(1, N)) * probe interval
SUSPICION_MAX_MULT = 6  # max suspicion = this * min (shrinks with confirmations)
AWARENESS_MAX_MULT = 8  # local health multiplier: timeouts scale by (score + 1) <= this
# --- dissemination ---
GOSSIP_INTERVAL_S = 0.2  # piggyback-only gossip rounds
GOSSIP_NODES = 3  # members each gossip round goes to
RETRANSMIT_MULT = 4  # a broadcast is sent mult * ceil(log10(N + 1)) times
GOSSIP_TO_THE_DEAD_S = 30.0  # dead members still get gossip this long (they may refute)
# --- anti-entropy and rejoining ---
PUSH_PULL_INTERVAL_S = 30.0  # full state exchange over TCP with one random member
DEAD_RETAIN_S = 72 * 3600.0  # dead members are remembered (and retried) this long
RECONNECT_INTERVAL_S = 30.0  # one dead member is tried (push/pull) per interval
# --- node state ---
STATE_INTERVAL_S = 2.0  # load and cache warmth measured this often, gossiped on change
# --- packets ---
MAX_DATAGRAM_BYTES = 1400  # stays under a 1500-byte Ethernet MTU with IP/UDP headers
REPLAY_WINDOW_S = 60.0  # datagrams older (or newer) than this by our clock are dropped


@dataclass(frozen=True)
class Timing:
    """The settings one gossip instance runs with; every field defaults to the constant of
    the same name above."""

    probe_interval_s: float = PROBE_INTERVAL_S
    probe_timeout_s: float = PROBE_TIMEOUT_S
    indirect_checks: int = INDIRECT_CHECKS
    suspicion_mult: int = SUSPICION_MULT
    suspicion_max_mult: int = SUSPICION_MAX_MULT
    awareness_max_mult: int = AWARENESS_MAX_MULT
    gossip_interval_s: float = GOSSIP_INTERVAL_S
    gossip_nodes: int = GOSSIP_NODES
    retransmit_mult: int = RETRANSMIT_MULT
    gossip_to_the_dead_s: float = GOSSIP_TO_THE_DEAD_S
    push_pull_interval_s: float = PUSH_PULL_INTERVAL_S
    dead_retain_s: float = DEAD_RETAIN_S
    reconnect_interval_s: float = RECONNECT_INTERVAL_S
    state_interval_s: float = STATE_INTERVAL_S
    max_datagram_bytes: int = MAX_DATAGRAM_BYTES
    replay_window_s: float = REPLAY_WINDOW_S

    @classmethod
    def quick(cls, factor: float = 0.1, **overrides: float) -> Timing:
        """Every period scaled by ``factor`` (counts and sizes kept): zeroconf's
        ``quick_timing`` idea, for tests and simulations."""
        scaled = {f.name: getattr(cls, f.name) * factor for f in dataclasses.fields(cls)
                  if f.name.endswith("_s") and f.name != "replay_window_s"}
        return cls(**(scaled | overrides))

    def retransmit_limit(self, n: int) -> int:
        """How many times one broadcast is sent with ``n`` members (memberlist's
        ``retransmitLimit``)."""
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def suspicion_min_s(self, n: int) -> float:
        """The shortest suspicion: reached once enough members confirm it."""
        node_scale = max(1.0, math.log10(max(1, n)))
        return self.suspicion_mult * node_scale * self.probe_interval_s

    def suspicion_max_s(self, n: int) -> float:
        """The suspicion timeout of a suspect nobody else confirms."""
        return self.suspicion_max_mult * self.suspicion_min_s(n)

    def suspicion_confirmations(self, n: int) -> int:
        """k: independent confirmations that shrink a suspicion to its minimum (zero when
        the cluster is too small for that many)."""
        k = self.suspicion_mult - 2
        return 0 if n - 2 < k else k

    def suspicion_timeout_s(self, n: int, confirmations: int) -> float:
        """memberlist's formula: from max down to min as confirmations arrive, on a log
        scale, so the first few confirmations count most."""
        lo, hi = self.suspicion_min_s(n), self.suspicion_max_s(n)
        k = self.suspicion_confirmations(n)
        if k < 1:
            return lo
        frac = math.log(confirmations + 1) / math.log(k + 1)
        return max(lo, hi - (hi - lo) * frac)
