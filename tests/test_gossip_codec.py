"""Crafted datagrams fed straight into the codec and the protocol object: truncated,
oversized, garbage, wrong key, tampered, stale and replayed ones are all dropped, and the
member's view does not change."""

from __future__ import annotations

import pytest

from swarm.gossip.codec import (
    MAX_DATAGRAM_BYTES,
    MIN_DATAGRAM_BYTES,
    OVERHEAD_BYTES,
    DatagramCodec,
    gossip_key,
)
from swarm.gossip.service import GossipProtocol
from swarm.gossip.swim import ALIVE, Swim, _pack
from swarm.gossip.timing import REPLAY_WINDOW_S
from swarm.net.secure import ClusterKey

NOW = 1_700_000_000.0
CLUSTER = ClusterKey(bytes(range(32)))


def codec(cluster: ClusterKey = CLUSTER, now: list[float] | None = None) -> DatagramCodec:
    t = now or [NOW]
    return DatagramCodec(gossip_key(cluster), clock=lambda: t[0])


def alive_packet(name: str = "evil", inc: int = 9) -> bytes:
    return b"\x91" + _pack([ALIVE, name, "10.9.9.9:1", inc, {}])


def test_key_is_derived_from_the_token_and_is_not_it() -> None:
    k = gossip_key(CLUSTER)
    assert len(k) == 32 and k not in (CLUSTER.secret, CLUSTER.key)
    assert gossip_key(ClusterKey(bytes(32))) != k


def test_round_trip_and_overhead() -> None:
    c = codec()
    data = c.seal(b"hello")
    assert len(data) == len(b"hello") + OVERHEAD_BYTES
    assert c.open(data) == b"hello"
    with pytest.raises(ValueError):
        c.seal(b"x" * (c.max_payload_bytes + 1))
    assert len(c.seal(b"x" * c.max_payload_bytes)) == MAX_DATAGRAM_BYTES


@pytest.mark.parametrize("why,mangle", [
    ("truncated", lambda d: d[:MIN_DATAGRAM_BYTES - 1]),
    ("truncated", lambda d: b""),
    ("oversized", lambda d: d + b"\0" * MAX_DATAGRAM_BYTES),
    ("version", lambda d: b"\x02" + d[1:]),
    ("authentication", lambda d: d[:-1] + bytes([d[-1] ^ 1])),
    ("authentication", lambda d: d[:5] + bytes([d[5] ^ 0x80]) + d[6:]),
    ("authentication", lambda d: d[:-3]),
    ("authentication", lambda d: b"\x01" + bytes(range(200))),
])
def test_crafted_datagrams_are_dropped(why: str, mangle) -> None:  # type: ignore[no-untyped-def]
    sender, receiver = codec(), codec()
    assert receiver.open(mangle(sender.seal(b"payload"))) is None
    assert receiver.drops == {why: 1}


def test_wrong_key_is_dropped() -> None:
    assert codec().open(codec(ClusterKey(bytes(32))).seal(b"x")) is None


def test_replay_is_dropped() -> None:
    sender, receiver = codec(), codec()
    data = sender.seal(b"once")
    assert receiver.open(data) == b"once"
    assert receiver.open(data) is None
    assert receiver.drops == {"replayed": 1}


def test_stale_and_future_datagrams_are_dropped() -> None:
    t = [NOW]
    sender, receiver = codec(now=t), codec()
    t[0] = NOW - REPLAY_WINDOW_S - 1
    old = sender.seal(b"old")
    t[0] = NOW + REPLAY_WINDOW_S + 1
    future = sender.seal(b"future")
    assert receiver.open(old) is None and receiver.open(future) is None
    assert receiver.drops == {"stale": 2}


def test_remembered_nonces_expire() -> None:
    t = [NOW]
    sender, receiver = codec(now=t), codec(now=t)
    for _ in range(10):
        assert receiver.open(sender.seal(b"x")) is not None
    t[0] += 3 * REPLAY_WINDOW_S
    receiver.open(sender.seal(b"x"))
    assert len(receiver._seen) == 1


class _Sink:
    def __init__(self) -> None:
        self.woken = 0

    def wake(self) -> None:
        self.woken += 1


def _protocol() -> tuple[GossipProtocol, Swim, DatagramCodec]:
    c = codec()
    swim = Swim("me", "127.0.0.1:1", clock=lambda: 0.0)
    swim.take_outbox()
    sink = _Sink()
    return GossipProtocol(c, swim, sink.wake), swim, c


@pytest.mark.parametrize("data", [
    b"", b"\x01", b"\x00" * 10, b"\xff" * MIN_DATAGRAM_BYTES, b"A" * 5000,
    b"\x01" * (MAX_DATAGRAM_BYTES + 1),
])
def test_protocol_drops_garbage_without_effect(data: bytes) -> None:
    proto, swim, _c = _protocol()
    proto.datagram_received(data, ("10.0.0.9", 7077))
    assert set(swim.members) == {"me"}
    assert swim.take_outbox() == []
    assert proto.dropped == 1


def test_protocol_accepts_valid_once_and_drops_its_replay() -> None:
    proto, swim, c = _protocol()
    sender = codec()
    data = sender.seal(alive_packet())
    proto.datagram_received(data, ("10.0.0.9", 7077))
    assert swim.members["evil"].incarnation == 9
    del swim.members["evil"]
    proto.datagram_received(data, ("10.0.0.9", 7077))  # replayed: not learnt again
    assert "evil" not in swim.members
    assert c.drops == {"replayed": 1}


def test_protocol_drops_valid_crypto_with_malformed_payload() -> None:
    proto, swim, _c = _protocol()
    proto.datagram_received(codec().seal(b"\x91\x93\x05\x01"), ("10.0.0.9", 7077))
    assert set(swim.members) == {"me"} and swim.dropped == 1
