"""The gossip datagram: authenticated encryption under the cluster key, with replays
dropped. Pure (no sockets), so crafted datagrams are tested by feeding bytes straight in.

Layout of one datagram (at most :data:`~swarm.gossip.timing.MAX_DATAGRAM_BYTES`)::

    version (1) | nonce (24) | XSalsa20-Poly1305( sent_ms (u64) | payload )

The key is derived from the join token's cluster key under its own personalisation, so it
is never the key of a TCP session and never the token. The nonce is random (24 bytes, so
random nonces never collide in practice). The send time inside the ciphertext bounds
replays: a datagram older or newer than :data:`REPLAY_WINDOW_S` by the receiver's clock is
dropped, and within the window each nonce is accepted once. Clocks of one cluster must
agree to within the window (NTP does far better).

Why not the TCP channel's counters: datagrams are lost and reordered, and a node talks to
every member, so a per-peer counter would need per-peer state the first packet of a
stranger could make us allocate. A time window plus a bounded set of recent nonces costs
one dict per node, however many peers send.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable

import nacl.exceptions
import nacl.hash
import nacl.secret
import nacl.utils
from nacl.encoding import RawEncoder

from swarm.gossip.timing import MAX_DATAGRAM_BYTES, REPLAY_WINDOW_S
from swarm.net.secure import ClusterKey

VERSION = 1
NONCE_BYTES = nacl.secret.SecretBox.NONCE_SIZE
MAC_BYTES = nacl.secret.SecretBox.MACBYTES
TIME = struct.Struct(">Q")
OVERHEAD_BYTES = 1 + NONCE_BYTES + MAC_BYTES + TIME.size
MIN_DATAGRAM_BYTES = OVERHEAD_BYTES + 1
# Nonces remembered: at most this many datagrams per replay window are accepted (a few
# hundred a second for a 60 s window: far more than gossip sends), so the set is bounded
# whatever a flood of valid-looking traffic does.
MAX_REMEMBERED_NONCES = 100_000


def gossip_key(cluster: ClusterKey) -> bytes:
    """The datagram key of a cluster: a KDF of the cluster key, personalised for gossip."""
    return nacl.hash.blake2b(b"", digest_size=nacl.secret.SecretBox.KEY_SIZE,
                             key=cluster.key, person=b"swarm-gossip-k", encoder=RawEncoder)


class DatagramCodec:
    """Seals payloads into datagrams and opens them. ``clock`` is wall-clock seconds
    (``time.time``; injected in tests); ``drops`` counts rejected datagrams by reason."""

    def __init__(self, key: bytes, *, clock: Callable[[], float],
                 window_s: float = REPLAY_WINDOW_S,
                 max_datagram_bytes: int = MAX_DATAGRAM_BYTES) -> None:
        self._box = nacl.secret.SecretBox(key)
        self.clock = clock
        self.window_s = window_s
        self.max_datagram_bytes = max_datagram_bytes
        self.max_payload_bytes = max_datagram_bytes - OVERHEAD_BYTES
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # nonce -> time it expires
        self.drops: dict[str, int] = {}

    def seal(self, payload: bytes) -> bytes:
        if len(payload) > self.max_payload_bytes:
            raise ValueError(f"payload of {len(payload)} bytes exceeds "
                             f"{self.max_payload_bytes}")
        nonce = nacl.utils.random(NONCE_BYTES)
        sent_ms = int(self.clock() * 1000)
        ct = self._box.encrypt(TIME.pack(sent_ms) + payload, nonce).ciphertext
        return bytes([VERSION]) + nonce + ct

    def _drop(self, why: str) -> None:
        self.drops[why] = self.drops.get(why, 0) + 1

    def open(self, data: bytes) -> bytes | None:
        """The payload of a valid, fresh datagram; None (and a counted drop) for one that
        is truncated, oversized, of another version or key, forged, stale or replayed."""
        if len(data) > self.max_datagram_bytes:
            self._drop("oversized")
            return None
        if len(data) < MIN_DATAGRAM_BYTES:
            self._drop("truncated")
            return None
        if data[0] != VERSION:
            self._drop("version")
            return None
        nonce = bytes(data[1:1 + NONCE_BYTES])
        try:
            plain = self._box.decrypt(bytes(data[1 + NONCE_BYTES:]), nonce)
        except nacl.exceptions.CryptoError:
            self._drop("authentication")
            return None
        (sent_ms,) = TIME.unpack_from(plain)
        now = self.clock()
        if abs(now - sent_ms / 1000) > self.window_s:
            self._drop("stale")
            return None
        self._expire(now)
        if nonce in self._seen:
            self._drop("replayed")
            return None
        if len(self._seen) >= MAX_REMEMBERED_NONCES:
            self._drop("flood")  # cannot remember more: refuse rather than forget
            return None
        self._seen[nonce] = now + 2 * self.window_s
        return plain[TIME.size:]

    def _expire(self, now: float) -> None:
        seen = self._seen
        while seen:
            nonce, until = next(iter(seen.items()))
            if until > now:
                break
            del seen[nonce]
