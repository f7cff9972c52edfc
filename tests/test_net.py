"""swarm.net: frames fed straight into the decoders, the handshake, the encrypted channel,
RPC (errors, timeouts, cancellation), and peer blobs over loopback TCP."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest

from swarm.digest import hash_bytes
from swarm.errors import (
    AuthFailed,
    BlobMissing,
    NotFound,
    PeerError,
    ProtocolError,
    RemoteError,
    RpcTimeout,
    UsageError,
)
from swarm.fs.source import Fetcher
from swarm.net import frames
from swarm.net.blobs import BlobService, PeerSource
from swarm.net.rpc import Call, Connection, FrameProtocol
from swarm.net.secure import (
    AES_256_GCM,
    CHACHA20_POLY1305,
    ClusterKey,
    NodeKey,
    SecureChannel,
    choose_cipher,
    local_ciphers,
)
from swarm.net.transport import Transport, parse_addr
from swarm.store import Store


@dataclass
class Timing:
    """Protocol timeouts shrunk for tests: what must time out does so quickly."""

    request_timeout_s: float = 0.3
    handshake_timeout_s: float = 2.0


@pytest.fixture
def quick_timing() -> Timing:
    return Timing()


# ---------------------------------------------------------------------------- tokens
def test_token_round_trip_and_rejects_garbage():
    ck = ClusterKey.generate()
    again = ClusterKey.from_token(ck.token)
    assert again.key == ck.key and again.cluster_id == ck.cluster_id
    assert ClusterKey.generate().key != ck.key
    for bad in ["", "swarm1-", "swarm1-abc", "nope-" + ck.token[7:], ck.token + "AAAA"]:
        with pytest.raises(UsageError):
            ClusterKey.from_token(bad)


def test_node_key_persists(tmp_path):
    k1 = NodeKey.load_or_create(tmp_path / "node.key")
    k2 = NodeKey.load_or_create(tmp_path / "node.key")
    assert k1.public == k2.public
    assert (tmp_path / "node.key").stat().st_mode & 0o777 == 0o600


# ---------------------------------------------------------------------------- frames
@pytest.mark.parametrize("body", [
    b"", b"\xc1", msgpack.packb({"a": 1}), msgpack.packb([]), msgpack.packb(["x"]),
    msgpack.packb([99, 1]), msgpack.packb([frames.REQUEST, 1, "m"]),
    msgpack.packb([frames.REQUEST, -1, "m", {}]), msgpack.packb([frames.REQUEST, 1, 2, {}]),
    msgpack.packb([frames.REQUEST, 1, "m", []]), msgpack.packb([frames.RESPONSE, 1]),
    msgpack.packb([frames.ERROR, 1, 5, "x"]), msgpack.packb([frames.CANCEL, "1"]),
    msgpack.packb([frames.DATA, 1, 7, b"x"]), msgpack.packb([frames.DATA, 1, 1, "text"]),
    msgpack.packb([frames.RESPONSE, True, None]),
    msgpack.packb({1: 2}, strict_types=True),
])
def test_decoder_rejects_crafted_messages(body):
    with pytest.raises(ProtocolError):
        frames.decode_message(body)


def test_decoder_accepts_every_message_type():
    assert frames.decode_message(frames.request(3, "m", {"k": b"v"})) == frames.Message(
        frames.REQUEST, 3, method="m", args={"k": b"v"})
    assert frames.decode_message(frames.response(3, [1])).args == [1]
    err = frames.decode_message(frames.error(4, "missing", "no"))
    assert (err.code, err.text) == ("missing", "no")
    assert frames.decode_message(frames.cancel(5)).type == frames.CANCEL
    d = frames.decode_message(frames.data(6, frames.STREAM_STDERR, b"x"))
    assert (d.stream, d.data) == (frames.STREAM_STDERR, b"x")


def test_length_is_checked_before_the_body_is_read():
    with pytest.raises(ProtocolError, match="exceeds"):
        frames.parse_length(struct.pack(">I", frames.MAX_FRAME_BYTES + 1),
                            frames.MAX_FRAME_BYTES)
    with pytest.raises(ProtocolError):
        frames.parse_length(b"\0\0", 10)

    async def go() -> None:
        r = asyncio.StreamReader()
        r.feed_data(struct.pack(">I", 1 << 31))  # announces 2 GiB, sends nothing more
        with pytest.raises(ProtocolError):
            await frames.read_frame(r, frames.MAX_FRAME_BYTES)
        r = asyncio.StreamReader()
        r.feed_data(frames.frame(b"abc") + b"\0\0")
        r.feed_eof()
        assert await frames.read_frame(r, 10) == b"abc"
        with pytest.raises(ProtocolError, match="header"):
            await frames.read_frame(r, 10)
        r = asyncio.StreamReader()
        r.feed_eof()
        assert await frames.read_frame(r, 10) is None

    asyncio.run(go())


# ---------------------------------------------------------------------------- channel
def _pair() -> tuple[SecureChannel, SecureChannel]:
    a, b = bytes(range(32)), bytes(range(1, 33))
    return SecureChannel(a, b), SecureChannel(b, a)


def test_channel_round_trip_and_rejects_replay_reorder_forgery():
    tx, rx = _pair()
    f0, f1, f2 = tx.seal(b"zero"), tx.seal(b"one"), tx.seal(b"two")
    assert rx.open(f0) == b"zero"
    with pytest.raises(ProtocolError, match="replayed"):
        rx.open(f0)
    with pytest.raises(ProtocolError, match="reordered"):
        rx.open(f2)
    forged = f1[:-1] + bytes([f1[-1] ^ 1])
    with pytest.raises(ProtocolError, match="authentication"):
        rx.open(forged)
    # a frame claiming the right counter but carrying another frame's ciphertext
    with pytest.raises(ProtocolError, match="authentication"):
        rx.open(f1[:8] + f2[8:])
    assert rx.open(f1) == b"one"
    assert rx.open(f2) == b"two"
    with pytest.raises(ProtocolError, match="short"):
        rx.open(b"\0" * 10)
    other = SecureChannel(bytes(32), bytes(32))  # another session's key
    other.sent = 3
    with pytest.raises(ProtocolError, match="authentication"):
        rx.open(other.seal(b"x"))


# ---------------------------------------------------------------------------- RPC over TCP
@dataclass
class Node:
    transport: Transport
    addr: str
    rejects: list[tuple[str, str]]
    rejected: asyncio.Event

    async def wait_rejects(self, n: int) -> None:
        while len(self.rejects) < n:
            self.rejected.clear()
            await self.rejected.wait()


@contextlib.asynccontextmanager
async def node(cluster: ClusterKey, handlers: dict[str, Any], timing: Timing
               ) -> AsyncIterator[Node]:
    rejects: list[tuple[str, str]] = []
    ev = asyncio.Event()

    def on_reject(who: str, why: str) -> None:
        rejects.append((who, why))
        ev.set()

    t = Transport(cluster, NodeKey.generate(), handlers,
                  handshake_timeout_s=timing.handshake_timeout_s, on_reject=on_reject)
    try:
        host, port = await t.listen("127.0.0.1", 0)
        yield Node(t, f"{host}:{port}", rejects, ev)
    finally:
        await t.aclose()


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 30))


def test_rpc_request_response_errors_and_unknown_method(quick_timing):
    async def echo(call: Call) -> Any:
        return {"got": call.args}

    async def fail(call: Call) -> Any:
        raise NotFound("no such thing")

    async def boom(call: Call) -> Any:
        raise RuntimeError("bug")

    async def go() -> None:
        ck = ClusterKey.generate()
        async with node(ck, {"echo": echo, "fail": fail, "boom": boom}, quick_timing) as a, \
                node(ck, {}, quick_timing) as b:
            conn = await b.transport.connect(a.addr)
            assert await conn.request("echo", {"x": b"\0\1"}) == {"got": {"x": b"\0\1"}}
            assert conn.peer_key == a.transport.node.public
            with pytest.raises(RemoteError) as ei:
                await conn.request("fail")
            assert ei.value.code == "missing"
            with pytest.raises(RemoteError) as ei:
                await conn.request("boom")
            assert ei.value.code == "internal"
            with pytest.raises(RemoteError) as ei:
                await conn.request("nope")
            assert ei.value.code == "unknown_method"
            # many in flight at once on one connection
            res = await asyncio.gather(*(conn.request("echo", {"i": i}) for i in range(50)))
            assert [r["got"]["i"] for r in res] == list(range(50))
            assert await b.transport.connect(a.addr) is conn  # cached

    run(go)


def test_rpc_timeout_and_cancellation_reach_the_server(quick_timing):
    started = asyncio.Event
    state: dict[str, Any] = {}

    async def hang(call: Call) -> Any:
        state["started"].set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            state["cancelled"].set()
            raise

    async def go() -> None:
        state["started"], state["cancelled"] = started(), started()
        ck = ClusterKey.generate()
        async with node(ck, {"hang": hang}, quick_timing) as a, \
                node(ck, {}, quick_timing) as b:
            conn = await b.transport.connect(a.addr)
            with pytest.raises(RpcTimeout):
                await conn.request("hang", timeout_s=quick_timing.request_timeout_s)
            await state["cancelled"].wait()  # the timeout sent CANCEL
            state["started"].clear()
            state["cancelled"].clear()
            task = asyncio.create_task(conn.request("hang", timeout_s=None))
            await state["started"].wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await state["cancelled"].wait()
            assert not conn.is_closed  # cancelling one call keeps the connection

    run(go)


def test_wrong_token_gets_nothing_and_is_logged(quick_timing):
    calls: list[Any] = []

    async def touch(call: Call) -> Any:
        calls.append(call.args)
        return "done"

    async def go() -> None:
        async with node(ClusterKey.generate(), {"touch": touch}, quick_timing) as a, \
                node(ClusterKey.generate(), {"touch": touch}, quick_timing) as stranger:
            with pytest.raises(AuthFailed):
                await stranger.transport.connect(a.addr)
            # the other way round too: the stranger as a server proves nothing
            with pytest.raises(AuthFailed):
                await a.transport.connect(stranger.addr)
            # a client that knows the cluster id but not the key (a leaked id, say)
            forger = Transport(_SameIdOtherKey(a.transport.cluster), NodeKey.generate(), {})
            with pytest.raises(AuthFailed):
                await forger.connect(a.addr)
            await forger.aclose()
            await a.wait_rejects(2)
            assert any("another cluster" in why for _, why in a.rejects)
            assert calls == []

    run(go)


class _SameIdOtherKey(ClusterKey):
    """A cluster key with the right id but a wrong key: the forger of the test above."""

    def __init__(self, real: ClusterKey) -> None:
        object.__setattr__(self, "secret", real.secret)
        object.__setattr__(self, "_id", real.cluster_id)

    @property
    def key(self) -> bytes:
        return bytes(32)

    @property
    def cluster_id(self) -> bytes:
        return self._id  # type: ignore[attr-defined,no-any-return]


def test_replayed_frame_is_rejected_and_not_acted_on(quick_timing):
    """A proxy between two members captures the first encrypted frame (a request) and,
    once the answer has passed, sends it to the server again: the server drops the
    connection on the copy; the request ran once."""
    calls: list[Any] = []

    async def touch(call: Call) -> Any:
        calls.append(call.args)
        return "done"

    async def go() -> None:
        ck = ClusterKey.generate()
        async with node(ck, {"touch": touch}, quick_timing) as a, \
                node(ck, {}, quick_timing) as b:
            host, port = parse_addr(a.addr)
            proxy_tasks: set[asyncio.Task[None]] = set()
            captured: list[bytes] = []

            async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                           hook: Callable[[int, bytes], None]) -> None:
                n = 0
                try:
                    while True:
                        body = await frames.read_frame(r, frames.MAX_FRAME_BYTES)
                        if body is None:
                            break
                        w.write(frames.frame(body))
                        await w.drain()
                        n += 1
                        hook(n, body)
                except (ConnectionError, ProtocolError):
                    pass
                finally:
                    w.close()

            async def on_client(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
                sr, sw = await asyncio.open_connection(host, port)

                def client_frame(n: int, body: bytes) -> None:
                    if n == 3:  # HELLO, AUTH, then the request
                        captured.append(body)

                def server_frame(n: int, body: bytes) -> None:
                    if n == 2:  # HELLO, then the response: replay the request now
                        sw.write(frames.frame(captured[0]))

                t1 = asyncio.create_task(pipe(cr, sw, client_frame))
                t2 = asyncio.create_task(pipe(sr, cw, server_frame))
                proxy_tasks.update((t1, t2))
                await asyncio.gather(t1, t2)

            proxy = await asyncio.start_server(on_client, "127.0.0.1", 0)
            try:
                pport = proxy.sockets[0].getsockname()[1]
                conn = await b.transport.connect(f"127.0.0.1:{pport}")
                assert await conn.request("touch", {"n": 1}) == "done"
                await conn.closed.wait()  # the server hung up on the replay
                assert calls == [{"n": 1}]
            finally:
                proxy.close()
                for t in proxy_tasks:
                    t.cancel()
                await asyncio.gather(*proxy_tasks, return_exceptions=True)

    run(go)


def test_oversized_frame_from_a_member_ends_the_connection(quick_timing):
    async def go() -> None:
        ck = ClusterKey.generate()
        async with node(ck, {}, quick_timing) as a, node(ck, {}, quick_timing) as b:
            conn = await b.transport.connect(a.addr)
            # bypass the sender's framing: announce a frame past the limit
            conn.writer.write(struct.pack(">I", frames.MAX_FRAME_BYTES + 1))
            await conn.writer.drain()
            await conn.closed.wait()

    run(go)


# ---------------------------------------------------------------------------- peer blobs
@pytest.fixture
def stores(tmp_path):
    opened: list[Store] = []

    def make(name: str) -> Store:
        s = Store(tmp_path / name, chunk_size=64 << 10)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def _fill(store: Store, blobs: list[bytes]) -> None:
    for b in blobs:
        store.put(b)


def test_peer_source_catches_a_liar_and_survives_a_dying_peer(stores, quick_timing):
    blobs = [bytes([i]) * (1000 + i) for i in range(20)]
    big = bytes(range(256)) * 2000  # 512 000 bytes: 8 chunks of 64 KiB

    async def go() -> None:
        ck = ClusterKey.generate()
        honest, liar, dying, local = stores("honest"), stores("liar"), stores("dying"), \
            stores("local")
        for s in (honest, liar, dying):
            _fill(s, blobs)
            s.put(big)

        async def die(call: Call) -> Any:
            call.conn.writer.transport.abort()  # the node is gone mid-transfer
            await asyncio.Event().wait()

        dying_handlers = BlobService(dying).handlers() | {"blob.get": die}
        async with node(ck, BlobService(honest).handlers(), quick_timing) as h, \
                node(ck, BlobService(liar, corrupt=True).handlers(), quick_timing) as li, \
                node(ck, dying_handlers, quick_timing) as dy, \
                node(ck, {}, quick_timing) as me:
            src = PeerSource(me.transport, lambda: [li.addr, dy.addr, h.addr],
                             timeout_s=quick_timing.request_timeout_s)
            fetcher = Fetcher(local, src)
            for b in blobs:
                d = hash_bytes(b)
                await fetcher.ensure(d)
                assert local.get(d) == b
            assert src.is_suspect(li.addr)
            assert src.rejected == 1  # skipped after the first lie
            assert src.failovers >= 1  # the dying peer was tried and failed over
            await fetcher.ensure(hash_bytes(big))
            assert local.get(hash_bytes(big)) == big
            assert fetcher.stats.corrupt == 0  # nothing wrong ever reached the fetcher
            with pytest.raises(BlobMissing):
                await src.fetch(hash_bytes(b"nobody has this"))

    run(go)


def test_image_resolution_through_peers(stores, quick_timing):
    from swarm.build.importer import import_directory

    async def go(tree: Any) -> None:
        ck = ClusterKey.generate()
        origin = stores("origin")
        rec = import_directory(origin, tree, ["demo:1"])
        async with node(ck, BlobService(origin).handlers(), quick_timing) as o, \
                node(ck, {}, quick_timing) as me:
            src = PeerSource(me.transport, lambda: [o.addr])
            image_id, hot = await src.resolve("demo:1")
            assert image_id == rec.id and hot is None
            with pytest.raises(NotFound):
                await src.resolve("nope:1")

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "f").write_text("hello")
        run(lambda: go(Path(d)))


def test_connection_loss_fails_pending_requests(quick_timing):
    async def hang(call: Call) -> Any:
        call.conn.writer.transport.abort()
        await asyncio.Event().wait()

    async def go() -> None:
        ck = ClusterKey.generate()
        async with node(ck, {"hang": hang}, quick_timing) as a, \
                node(ck, {}, quick_timing) as b:
            conn: Connection = await b.transport.connect(a.addr)
            with pytest.raises(PeerError):
                await conn.request("hang", timeout_s=None)
            new = await b.transport.connect(a.addr)  # a dead connection is replaced
            assert new is not conn

    run(go)


def test_channel_is_the_ietf_chacha20_poly1305_construction():
    """The channel seals with OpenSSL; its bytes are exactly libsodium's IETF
    ChaCha20-Poly1305 (counter as additional data, zero-padded counter as nonce)."""
    import os as _os

    import nacl.bindings as sodium

    from swarm.net import frames as _frames
    from swarm.net.secure import SecureChannel

    k1, k2 = _os.urandom(32), _os.urandom(32)
    a, b = SecureChannel(k1, k2), SecureChannel(k2, k1)
    body = a.seal(b"payload")
    ctr = _frames.COUNTER.pack(0)
    assert body == ctr + sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
        b"payload", ctr, b"\0\0\0\0" + ctr, k1)
    assert b.open(body) == b"payload"


# ---------------------------------------------------------------------------- ciphers
CIPHERS = [CHACHA20_POLY1305, AES_256_GCM]


@pytest.mark.parametrize("cipher", CIPHERS)
def test_every_cipher_rejects_replay_reorder_forgery(cipher):
    a, b = bytes(range(32)), bytes(range(1, 33))
    tx, rx = SecureChannel(a, b, cipher), SecureChannel(b, a, cipher)
    big = bytes(range(256)) * 1024  # 256 KiB: opened into its own buffer
    f0, f1, f2 = tx.seal(b"zero"), tx.seal_frame(big), tx.seal(b"two")
    assert f1[:4] == struct.pack(">I", len(f1) - 4)
    assert rx.open(f0) == b"zero"
    with pytest.raises(ProtocolError, match="replayed"):
        rx.open(f0)
    with pytest.raises(ProtocolError, match="reordered"):
        rx.open(f2)
    body = bytearray(f1[4:])
    body[100] ^= 1  # one flipped bit in a large frame
    with pytest.raises(ProtocolError, match="authentication"):
        rx.open(body)
    body[100] ^= 1
    body[7] ^= 1  # the counter is associated data: changing it is caught too
    with pytest.raises(ProtocolError):
        rx.open(body)
    body[7] ^= 1
    assert rx.open(body) == big
    assert rx.open(f2) == b"two"
    # the other cipher under the same keys does not open it
    other = SecureChannel(b, a, AES_256_GCM if cipher == CHACHA20_POLY1305
                          else CHACHA20_POLY1305)
    with pytest.raises(ProtocolError, match="authentication"):
        other.open(SecureChannel(a, b, cipher).seal(b"x"))


def test_aes_channel_is_the_standard_aes_256_gcm_construction():
    """seal_frame's bytes: the length, then what AES-256-GCM (counter as associated data,
    zero-padded counter as nonce) gives, as any AES-GCM implementation computes it."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    k1, k2 = bytes(range(32)), bytes(range(32, 64))
    ch = SecureChannel(k1, k2, AES_256_GCM)
    ch.sent = 7
    frame = ch.seal_frame(b"payload")
    ctr = frames.COUNTER.pack(7)
    body = ctr + AESGCM(k1).encrypt(b"\0\0\0\0" + ctr, b"payload", ctr)
    assert bytes(frame) == frames.frame(body)
    assert ch.sent == 8


def test_cipher_choice_and_preferences():
    assert choose_cipher([AES_256_GCM, CHACHA20_POLY1305],
                         ["x-future", CHACHA20_POLY1305, AES_256_GCM]) == AES_256_GCM
    assert choose_cipher([CHACHA20_POLY1305, AES_256_GCM],
                         [AES_256_GCM, CHACHA20_POLY1305]) == CHACHA20_POLY1305
    with pytest.raises(ProtocolError, match="no cipher in common"):
        choose_cipher([AES_256_GCM], [CHACHA20_POLY1305])
    assert CHACHA20_POLY1305 in local_ciphers()  # every node speaks it


def test_cipher_env_override(monkeypatch):
    monkeypatch.setenv("SWARM_CIPHERS", "chacha20-poly1305")
    assert local_ciphers() == [CHACHA20_POLY1305]
    monkeypatch.setenv("SWARM_CIPHERS", "rot13")
    with pytest.raises(UsageError):
        local_ciphers()


@contextlib.asynccontextmanager
async def cipher_node(cluster: ClusterKey, handlers: dict[str, Any], ciphers: list[str]
                      ) -> AsyncIterator[Node]:
    rejects: list[tuple[str, str]] = []
    ev = asyncio.Event()

    def on_reject(who: str, why: str) -> None:
        rejects.append((who, why))
        ev.set()

    t = Transport(cluster, NodeKey.generate(), handlers, handshake_timeout_s=2.0,
                  on_reject=on_reject, ciphers=ciphers)
    try:
        host, port = await t.listen("127.0.0.1", 0)
        yield Node(t, f"{host}:{port}", rejects, ev)
    finally:
        await t.aclose()


@pytest.mark.parametrize(("server", "client", "chosen"), [
    ([AES_256_GCM, CHACHA20_POLY1305], [AES_256_GCM, CHACHA20_POLY1305], AES_256_GCM),
    ([AES_256_GCM, CHACHA20_POLY1305], [CHACHA20_POLY1305], CHACHA20_POLY1305),
    ([CHACHA20_POLY1305, AES_256_GCM], [AES_256_GCM, CHACHA20_POLY1305], CHACHA20_POLY1305),
    ([AES_256_GCM], [CHACHA20_POLY1305], None),
])
def test_handshake_negotiates_the_cipher(server, client, chosen):
    async def echo(call: Call) -> Any:
        return call.args["x"]

    async def go() -> None:
        ck = ClusterKey.generate()
        async with cipher_node(ck, {"echo": echo}, server) as a, \
                cipher_node(ck, {}, client) as b:
            if chosen is None:
                with pytest.raises(AuthFailed):
                    await b.transport.connect(a.addr)
                await a.wait_rejects(1)
                assert "no cipher in common" in a.rejects[0][1]
                return
            conn = await b.transport.connect(a.addr)
            assert conn.channel is not None and conn.channel.cipher == chosen
            assert await conn.request("echo", {"x": b"hi"}) == b"hi"
            (served,) = a.transport._accepted
            assert served.channel is not None and served.channel.cipher == chosen

    run(go)


async def _tampering_proxy(target: str, rewrite: Callable[[str, int, bytes], bytes],
                           tasks: set[asyncio.Task[None]]) -> asyncio.Server:
    """A TCP proxy to ``target`` that passes each frame through ``rewrite(direction, n,
    body)`` (direction "c2s" or "s2c", n counting from 1)."""
    host, port = parse_addr(target)

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, direction: str) -> None:
        n = 0
        try:
            while (body := await frames.read_frame(r, frames.MAX_FRAME_BYTES)) is not None:
                n += 1
                w.write(frames.frame(rewrite(direction, n, body)))
                await w.drain()
        except (ConnectionError, ProtocolError):
            pass
        finally:
            w.close()

    async def on_client(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(host, port)
        t1 = asyncio.create_task(pipe(cr, sw, "c2s"))
        t2 = asyncio.create_task(pipe(sr, cw, "s2c"))
        tasks.update((t1, t2))
        await asyncio.gather(t1, t2)

    return await asyncio.start_server(on_client, "127.0.0.1", 0)


@pytest.mark.parametrize("where", ["offer", "choice"])
def test_a_man_in_the_middle_cannot_steer_the_cipher(where):
    """Both sides accept both ciphers and prefer AES-GCM. A proxy that strips AES-GCM
    from the client's offer, or rewrites the server's choice to ChaCha20, is caught by
    the proofs over the transcript: no connection, nothing served."""
    calls: list[Any] = []

    async def touch(call: Call) -> Any:
        calls.append(call.args)
        return "done"

    def rewrite(direction: str, n: int, body: bytes) -> bytes:
        obj = msgpack.unpackb(body)
        if where == "offer" and direction == "c2s" and n == 1:
            obj[5] = [CHACHA20_POLY1305]
        elif where == "choice" and direction == "s2c" and n == 1:
            obj[5] = CHACHA20_POLY1305
        else:
            return body
        return frames.pack(obj)

    async def go() -> None:
        ck = ClusterKey.generate()
        both = [AES_256_GCM, CHACHA20_POLY1305]
        async with cipher_node(ck, {"touch": touch}, both) as a, \
                cipher_node(ck, {}, both) as b:
            tasks: set[asyncio.Task[None]] = set()
            proxy = await _tampering_proxy(a.addr, rewrite, tasks)
            try:
                pport = proxy.sockets[0].getsockname()[1]
                with pytest.raises(AuthFailed, match="failed to prove"):
                    await b.transport.connect(f"127.0.0.1:{pport}")
                assert calls == []
            finally:
                proxy.close()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    run(go)


# ---------------------------------------------------------------------------- frames in
def _collect(proto: FrameProtocol) -> list[bytes]:
    out: list[bytes] = []
    while proto._frames:
        out.append(bytes(proto._frames.popleft()))
    return out


@pytest.mark.parametrize("split", [1, 3, 4096, 100_000, 1 << 22])
def test_frame_protocol_splits_any_byte_stream(split):
    """Small frames (cut out of the stream buffer) and large ones (received into their
    own buffer), fed in pieces of any size, come out whole and in order."""
    import random

    rnd = random.Random(split)
    bodies = [b"", b"a", bytes(70_000), rnd.randbytes(300_000), b"tail" * 10,
              rnd.randbytes(5 << 20), rnd.randbytes(65_536), rnd.randbytes(65_537)]
    stream = b"".join(frames.frame(b) for b in bodies)

    async def go() -> None:
        proto = FrameProtocol(frames.MAX_FRAME_BYTES)
        got: list[bytes] = []
        view = memoryview(stream)
        while view:
            buf = proto.get_buffer(-1)
            n = min(len(buf), split, len(view))
            buf[:n] = view[:n]
            view = view[n:]
            proto.buffer_updated(n)
            got += _collect(proto)
        assert got == bodies
        assert not proto._partial()

    asyncio.run(go())


def test_frame_protocol_errors_come_after_the_frames_before_them():
    async def go() -> None:
        proto = FrameProtocol(1000)
        proto._feed(frames.frame(b"ok") + struct.pack(">I", 1001) + b"junk")
        assert await proto.next_frame() == b"ok"
        with pytest.raises(ProtocolError, match="exceeds"):
            await proto.next_frame()
        proto = FrameProtocol(1 << 20)
        proto._feed(frames.frame(b"ok") + frames.frame(bytes(200_000))[:1000])
        proto.connection_lost(None)
        assert await proto.next_frame() == b"ok"
        with pytest.raises(ProtocolError, match="inside a frame"):
            await proto.next_frame()
        proto = FrameProtocol(1 << 20)
        proto._feed(frames.frame(b"last"))
        proto.eof_received()
        assert await proto.next_frame() == b"last"
        assert await proto.next_frame() is None

    asyncio.run(go())


# ---------------------------------------------------------------------------- BYTES
@pytest.mark.parametrize("cipher", CIPHERS)
def test_byte_answers_travel_raw_large_and_small_interleaved(cipher):
    """Handlers answering bytes, bytearray, a memoryview or reply_bytes (a view valid
    only during the call), small and up to 6 MiB, many in flight on one connection:
    every caller gets exactly its bytes."""
    import random

    rnd = random.Random(5)
    blobs = {i: rnd.randbytes(rnd.choice([0, 1, 100, 70_000, 1 << 20, 6 << 20]))
             for i in range(40)}

    async def get(call: Call) -> Any:
        i = call.args["i"]
        data = blobs[i]
        if i % 4 == 0:
            return data
        if i % 4 == 1:
            return bytearray(data)
        if i % 4 == 2:
            return memoryview(data)
        scratch = bytearray(data)
        call.reply_bytes(scratch)
        scratch[:] = bytes(len(scratch))  # sealed already: changing it now is harmless
        return "ignored"

    async def echo(call: Call) -> Any:
        return {"i": call.args["i"]}

    async def go() -> None:
        ck = ClusterKey.generate()
        async with cipher_node(ck, {"get": get, "echo": echo}, [cipher]) as a, \
                cipher_node(ck, {}, [cipher]) as b:
            conn = await b.transport.connect(a.addr)
            reqs = []
            for i in blobs:
                reqs.append(conn.request("get", {"i": i}))
                reqs.append(conn.request("echo", {"i": i}))
            res = await asyncio.gather(*reqs)
            for k, i in enumerate(blobs):
                assert bytes(res[2 * k]) == blobs[i]
                assert isinstance(res[2 * k], bytes | bytearray)
                assert res[2 * k + 1] == {"i": i}

    run(go)


def test_byte_answers_over_an_unencrypted_socket(tmp_path):
    """The local API (no channel) carries BYTES the same way."""
    big = bytes(range(256)) * 20_000

    async def get(call: Call) -> Any:
        return big if call.args["big"] else b"small"

    async def go() -> None:
        conns: list[Connection] = []

        async def client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            conns.append(Connection(r, w, handlers={"get": get}, name="server").start())

        server = await asyncio.start_unix_server(client, str(tmp_path / "s"))
        r, w = await asyncio.open_unix_connection(str(tmp_path / "s"))
        conn = Connection(r, w, name="client").start()
        try:
            got = await asyncio.gather(*(conn.request("get", {"big": i % 2 == 0})
                                         for i in range(10)))
            assert [bytes(g) for g in got] == [big, b"small"] * 5
        finally:
            await conn.aclose()
            for c in conns:
                await c.aclose()
            server.close()

    run(go)


def test_a_byte_answer_cut_off_fails_the_call(quick_timing):
    """The server sends BYTES and dies before the body: the caller gets PeerError."""

    async def half(call: Call) -> Any:
        call.conn._send(frames.bytes_header(call.id))
        call.conn.writer.transport.abort()
        await asyncio.Event().wait()

    async def go() -> None:
        ck = ClusterKey.generate()
        async with node(ck, {"half": half}, quick_timing) as a, \
                node(ck, {}, quick_timing) as b:
            conn = await b.transport.connect(a.addr)
            with pytest.raises(PeerError):
                await conn.request("half", timeout_s=5)

    run(go)


def test_connection_takes_over_what_the_handshake_reader_had_buffered():
    """Requests that arrive with the handshake's last frame sit in the StreamReader's
    buffer when the connection starts: they are served, in order."""
    import socket

    async def echo(call: Call) -> Any:
        return call.args["n"]

    async def go() -> None:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        r, w = await asyncio.open_unix_connection(sock=ours)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(theirs, frames.frame(b"auth") + b"".join(
            frames.frame(frames.request(n, "echo", {"n": n})) for n in (1, 2, 3)))
        assert await frames.read_frame(r, 100) == b"auth"  # the "handshake"
        while len(r._buffer) < 3 * len(frames.frame(frames.request(1, "echo", {"n": 1}))):
            await asyncio.sleep(0.01)  # all three requests wait in the reader's buffer
        conn = Connection(r, w, handlers={"echo": echo}, name="t").start()
        got = b""
        want = b"".join(frames.frame(frames.response(n, n)) for n in (1, 2, 3))
        while len(got) < len(want):
            got += await loop.sock_recv(theirs, 1 << 16)
        assert got == want
        theirs.close()
        await conn.closed.wait()
        await conn.aclose()

    run(go)


def test_small_byte_answers_take_one_frame_large_ones_two(quick_timing):
    sizes = {"small": 1000, "edge": 64 * 1024 - 1, "large": 64 * 1024}

    async def get(call: Call) -> Any:
        return bytes(sizes[call.args["k"]])

    async def go() -> None:
        ck = ClusterKey.generate()
        async with node(ck, {"get": get}, quick_timing) as a, \
                node(ck, {}, quick_timing) as b:
            conn = await b.transport.connect(a.addr)
            await conn.request("get", {"k": "small"})  # the server has its end now
            (served,) = a.transport._accepted
            assert served.channel is not None
            for k, frames_sent in (("small", 1), ("edge", 1), ("large", 2)):
                before = served.channel.sent
                assert await conn.request("get", {"k": k}) == bytes(sizes[k])
                assert served.channel.sent - before == frames_sent, k

    run(go)
