"""Cluster identity, the handshake and the encrypted channel (frame layouts: frames.py).

A cluster is its join token: 32 random bytes, printed as ``swarm1-<base64url>``. Nothing
on the wire carries the token; both sides derive from it a cluster key (which keys every
session) and a short cluster id (which lets a server turn a stranger away without
answering). Each node also has its own X25519 key pair, kept in its state directory, so
a member is a key, not an address.

Why this construction: the session keys hash together the cluster key, an
ephemeral-ephemeral agreement (a stolen node key does not decrypt recorded traffic) and a
static-static agreement (a side must hold the private key of the identity it claims),
over the transcript of both HELLOs (nothing in them can be swapped). The proofs are MACs
under keys only a holder of the token and of the private keys can derive. Per-direction
counters as nonces make every frame single-use: :class:`SecureChannel` rejects a frame
whose counter is not exactly the next one.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import nacl.bindings as sodium
import nacl.hash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.encoding import RawEncoder
from nacl.public import PrivateKey

from swarm.errors import AuthFailed, ProtocolError, UsageError
from swarm.net import frames

log = logging.getLogger(__name__)

TOKEN_PREFIX = "swarm1-"
TOKEN_BYTES = 32
KEY_BYTES = 32
CLUSTER_ID_BYTES = 8
TAG_BYTES = sodium.crypto_aead_chacha20poly1305_ietf_ABYTES
HANDSHAKE_TIMEOUT_S = 10.0


def _kdf(data: bytes, key: bytes, person: bytes, size: int = KEY_BYTES) -> bytes:
    return nacl.hash.blake2b(data, digest_size=size, key=key, person=person,
                             encoder=RawEncoder)


@dataclass(frozen=True)
class ClusterKey:
    """What a join token gives: the key that every session key is derived under, and the
    id that names the cluster on the wire."""

    secret: bytes

    @classmethod
    def generate(cls) -> ClusterKey:
        return cls(secrets.token_bytes(TOKEN_BYTES))

    @classmethod
    def from_token(cls, token: str) -> ClusterKey:
        text = token.strip()
        if not text.startswith(TOKEN_PREFIX):
            raise UsageError(f"not a join token (want {TOKEN_PREFIX}...)")
        body = text[len(TOKEN_PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            raise UsageError("malformed join token") from None
        if len(raw) != TOKEN_BYTES:
            raise UsageError("malformed join token (wrong length)")
        return cls(raw)

    @property
    def token(self) -> str:
        return TOKEN_PREFIX + base64.urlsafe_b64encode(self.secret).decode().rstrip("=")

    @property
    def key(self) -> bytes:
        return _kdf(b"", self.secret, b"swarm-cluster-k")

    @property
    def cluster_id(self) -> bytes:
        return _kdf(b"", self.secret, b"swarm-cluster-id", CLUSTER_ID_BYTES)


class NodeKey:
    """A node's own X25519 key pair; ``public`` is its identity among members."""

    def __init__(self, private: bytes) -> None:
        self._private = PrivateKey(private)
        self.public = bytes(self._private.public_key)

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(bytes(PrivateKey.generate()))

    @classmethod
    def load_or_create(cls, path: Path) -> NodeKey:
        """The key in ``path`` (mode 0600), created on first use."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            key = cls.generate()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(bytes(key._private))
            os.replace(tmp, path)
            return key
        if len(raw) != KEY_BYTES:
            raise UsageError(f"{path} does not hold a node key")
        return cls(raw)

    def agree(self, peer_public: bytes) -> bytes:
        return _dh(bytes(self._private), peer_public)

    @property
    def short(self) -> str:
        return self.public.hex()[:12]


def _dh(private: bytes, public: bytes) -> bytes:
    if len(public) != KEY_BYTES:
        raise AuthFailed("malformed public key")
    try:
        shared = sodium.crypto_scalarmult(private, public)
    except Exception:  # libsodium refuses low-order points (an all-zero result)
        raise AuthFailed("degenerate public key") from None
    if not any(shared):
        raise AuthFailed("degenerate public key")
    return bytes(shared)


class SecureChannel:
    """Seals and opens frame bodies of one connection. Pure: no I/O, so crafted frames
    can be fed straight into :meth:`open`."""

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        # The IETF ChaCha20-Poly1305 construction, through OpenSSL: the same bytes on the
        # wire as libsodium's, at ~2.3 GB/s here against libsodium's ~0.57 GB/s (measured
        # on 4 MiB frames), which capped peer blob throughput.
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        self.sent = 0  # counter of the next frame sent
        self.received = 0  # counter the next frame must carry

    @staticmethod
    def _nonce(counter: int) -> bytes:
        return b"\0\0\0\0" + frames.COUNTER.pack(counter)

    def seal(self, plain: bytes) -> bytes:
        ctr = frames.COUNTER.pack(self.sent)
        ct = self._send.encrypt(self._nonce(self.sent), plain, ctr)
        self.sent += 1
        return ctr + ct

    def open(self, body: bytes) -> bytes:
        """The plaintext of the next frame; ProtocolError for a replayed, reordered,
        truncated or forged frame (the connection must then be dropped)."""
        if len(body) < frames.COUNTER.size + TAG_BYTES:
            raise ProtocolError("encrypted frame too short")
        (ctr,) = frames.COUNTER.unpack_from(body)
        if ctr < self.received:
            raise ProtocolError(f"replayed frame (counter {ctr}, expected {self.received})")
        if ctr > self.received:
            raise ProtocolError(f"reordered frame (counter {ctr}, expected {self.received})")
        try:
            plain = self._recv.decrypt(self._nonce(ctr), body[frames.COUNTER.size:],
                                       body[:frames.COUNTER.size])
        except InvalidTag:  # forged, or not for this session
            raise ProtocolError("frame fails authentication") from None
        self.received += 1
        return plain


@dataclass
class Session:
    channel: SecureChannel
    peer_key: bytes  # the peer's static public key: its identity


def _derive(cluster: ClusterKey, node: NodeKey, eph: PrivateKey, peer_static: bytes,
            peer_eph: bytes, transcript: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(client->server key, server->client key, server proof key, client proof key)."""
    ikm = _dh(bytes(eph), peer_eph) + node.agree(peer_static)
    prk = _kdf(ikm + transcript, cluster.key, b"swarm-session", 64)
    return (_kdf(b"c2s", prk, b"swarm-key"), _kdf(b"s2c", prk, b"swarm-key"),
            _kdf(b"proof-s", prk, b"swarm-key"), _kdf(b"proof-c", prk, b"swarm-key"))


def _transcript(hello_c: bytes, hello_s_core: bytes) -> bytes:
    return _kdf(hello_c + hello_s_core, b"", b"swarm-transcript")


def _mac(key: bytes, transcript: bytes) -> bytes:
    return _kdf(transcript, key, b"swarm-proof")


async def _read(reader: asyncio.StreamReader) -> list[object]:
    body = await frames.read_frame(reader, frames.MAX_HANDSHAKE_FRAME_BYTES)
    if body is None:
        raise AuthFailed("peer closed the connection during the handshake")
    obj = frames.unpack(body, max_bytes=frames.MAX_HANDSHAKE_FRAME_BYTES)
    if not isinstance(obj, list) or not obj:
        raise ProtocolError("malformed handshake frame")
    return obj


def _check_hello(obj: list[object], cluster: ClusterKey, n: int) -> tuple[bytes, bytes]:
    if len(obj) != n or obj[0] != frames.HELLO:
        raise ProtocolError("malformed HELLO")
    if obj[1] != frames.PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {obj[1]!r}")
    if obj[2] != cluster.cluster_id:
        raise AuthFailed("peer belongs to another cluster (wrong join token)")
    static, eph = obj[3], obj[4]
    if not (isinstance(static, bytes) and isinstance(eph, bytes)
            and len(static) == len(eph) == KEY_BYTES):
        raise ProtocolError("malformed HELLO keys")
    return static, eph


async def client_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           cluster: ClusterKey, node: NodeKey,
                           timeout_s: float = HANDSHAKE_TIMEOUT_S) -> Session:
    """Authenticate a connection we opened; raises AuthFailed or ProtocolError."""
    async with asyncio.timeout(timeout_s):
        eph = PrivateKey.generate()
        hello_c = frames.pack([frames.HELLO, frames.PROTOCOL_VERSION, cluster.cluster_id,
                               node.public, bytes(eph.public_key)])
        writer.write(frames.frame(hello_c))
        await writer.drain()
        obj = await _read(reader)
        s_static, s_eph = _check_hello(obj, cluster, 6)
        proof = obj[5]
        transcript = _transcript(hello_c, frames.pack(obj[:5]))
        c2s, s2c, k_ps, k_pc = _derive(cluster, node, eph, s_static, s_eph, transcript)
        if not isinstance(proof, bytes) or not hmac.compare_digest(
                proof, _mac(k_ps, transcript)):
            raise AuthFailed("server failed to prove the join token")
        writer.write(frames.frame(frames.pack([frames.AUTH, _mac(k_pc, transcript)])))
        await writer.drain()
        return Session(SecureChannel(c2s, s2c), s_static)


async def server_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           cluster: ClusterKey, node: NodeKey,
                           timeout_s: float = HANDSHAKE_TIMEOUT_S) -> Session:
    """Authenticate a connection a peer opened. Nothing the peer sends is acted on before
    its proof checks out; raises AuthFailed or ProtocolError."""
    async with asyncio.timeout(timeout_s):
        obj = await _read(reader)
        c_static, c_eph = _check_hello(obj, cluster, 5)
        hello_c = frames.pack(obj)
        eph = PrivateKey.generate()
        core = [frames.HELLO, frames.PROTOCOL_VERSION, cluster.cluster_id, node.public,
                bytes(eph.public_key)]
        transcript = _transcript(hello_c, frames.pack(core))
        c2s, s2c, k_ps, k_pc = _derive(cluster, node, eph, c_static, c_eph, transcript)
        writer.write(frames.frame(frames.pack([*core, _mac(k_ps, transcript)])))
        await writer.drain()
        auth = await _read(reader)
        if len(auth) != 2 or auth[0] != frames.AUTH or not isinstance(auth[1], bytes):
            raise ProtocolError("malformed AUTH")
        if not hmac.compare_digest(auth[1], _mac(k_pc, transcript)):
            raise AuthFailed("client failed to prove the join token")
        return Session(SecureChannel(s2c, c2s), c_static)
