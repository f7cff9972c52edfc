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

The AEAD is negotiated: the client offers the ciphers it accepts, the server picks the
first of its own list that was offered, and both the offer and the choice are in the
transcript the proofs cover (a man in the middle cannot steer the choice). AES-256-GCM
comes first where the CPU has AES instructions (5-8 GB/s here through OpenSSL, against
ChaCha20-Poly1305's 1.3-2.7 GB/s, which capped peer blob throughput); ChaCha20-Poly1305,
which every node supports, otherwise. ``SWARM_CIPHERS`` (comma-separated names) overrides
the list, e.g. to measure one cipher.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import os
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import nacl.bindings as sodium
import nacl.hash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from nacl.encoding import RawEncoder
from nacl.public import PrivateKey

from swarm.errors import AuthFailed, ProtocolError, UsageError
from swarm.net import frames

log = logging.getLogger(__name__)

TOKEN_PREFIX = "swarm1-"
TOKEN_BYTES = 32
KEY_BYTES = 32
CLUSTER_ID_BYTES = 8
TAG_BYTES = sodium.crypto_aead_chacha20poly1305_ietf_ABYTES  # AES-256-GCM's tag: 16 too
HANDSHAKE_TIMEOUT_S = 10.0

CHACHA20_POLY1305 = "chacha20-poly1305"
AES_256_GCM = "aes-256-gcm"
# every cipher a node can speak, by its name on the wire
_AEADS: dict[str, Any] = {CHACHA20_POLY1305: ChaCha20Poly1305, AES_256_GCM: AESGCM}
CIPHERS_ENV = "SWARM_CIPHERS"
# A HELLO offers at most this many names, each at most this long.
MAX_CIPHER_OFFER = 8
MAX_CIPHER_NAME = 32
# wire frame head of an encrypted frame: u32 length | u64 counter
_HEAD = struct.Struct(">IQ")
# Frames at least this long are opened into a buffer of their own (decrypt_into) rather
# than through decrypt's bytes: the same bytes, one allocation less.
_INTO_BYTES = 64 << 10


@cache
def _cpu_has_aes() -> bool:
    """Whether this CPU has AES instructions (x86 ``aes`` flag, arm64 ``aes`` feature);
    without them AES-GCM is slower than ChaCha20-Poly1305."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return False


def local_ciphers() -> list[str]:
    """The ciphers this node accepts, most preferred first."""
    env = os.environ.get(CIPHERS_ENV)
    if env:
        names = [n.strip() for n in env.split(",") if n.strip()]
        unknown = [n for n in names if n not in _AEADS]
        if unknown or not names:
            raise UsageError(f"{CIPHERS_ENV}: unknown cipher {unknown or env!r}; "
                             f"known: {', '.join(_AEADS)}")
        return names
    if _cpu_has_aes():
        return [AES_256_GCM, CHACHA20_POLY1305]
    return [CHACHA20_POLY1305]


def choose_cipher(ours: Sequence[str], offered: Sequence[str]) -> str:
    """The server's pick: the first of its own ciphers the client offered."""
    for name in ours:
        if name in offered:
            return name
    raise ProtocolError(f"no cipher in common (offered {list(offered)}, "
                        f"we accept {list(ours)})")


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


Buffer = bytes | bytearray | memoryview


class SecureChannel:
    """Seals and opens frame bodies of one connection. Pure: no I/O, so crafted frames
    can be fed straight into :meth:`open`.

    Both ciphers are the IETF constructions through OpenSSL (the ChaCha20-Poly1305 bytes
    are libsodium's, a test checks it); OpenSSL releases the GIL while it works."""

    def __init__(self, send_key: bytes, recv_key: bytes,
                 cipher: str = CHACHA20_POLY1305) -> None:
        aead = _AEADS.get(cipher)
        if aead is None:
            raise ProtocolError(f"unknown cipher {cipher!r}")
        self.cipher = cipher
        self._send = aead(send_key)
        self._recv = aead(recv_key)
        # encrypt_into/decrypt_into (cryptography >= 44) write straight into our buffers
        self._into = hasattr(self._send, "encrypt_into")
        self.sent = 0  # counter of the next frame sent
        self.received = 0  # counter the next frame must carry

    @staticmethod
    def _nonce(counter: int) -> bytes:
        return b"\0\0\0\0" + frames.COUNTER.pack(counter)

    def seal(self, plain: Buffer) -> bytes:
        """``counter | ciphertext`` of the next frame (the body, without the length)."""
        ctr = frames.COUNTER.pack(self.sent)
        ct = self._send.encrypt(self._nonce(self.sent), plain, ctr)
        self.sent += 1
        return ctr + ct

    def seal_frame(self, plain: Buffer) -> bytearray:
        """The whole wire frame of the next message, ``length | counter | ciphertext``,
        encrypted straight into one new buffer (no copy of ``plain``, which may be a view
        into the store's map: it is only read during this call)."""
        n = frames.COUNTER.size + len(plain) + TAG_BYTES
        if not self._into:
            out = bytearray(frames.LENGTH.pack(n))
            out += self.seal(plain)
            return out
        out = bytearray(frames.LENGTH.size + n)
        _HEAD.pack_into(out, 0, n, self.sent)
        view = memoryview(out)
        self._send.encrypt_into(self._nonce(self.sent), plain, view[4:12], view[12:])
        self.sent += 1
        return out

    def open(self, body: Buffer) -> bytes | bytearray:
        """The plaintext of the next frame; ProtocolError for a replayed, reordered,
        truncated or forged frame (the connection must then be dropped)."""
        if len(body) < frames.COUNTER.size + TAG_BYTES:
            raise ProtocolError("encrypted frame too short")
        (ctr,) = frames.COUNTER.unpack_from(body)
        if ctr < self.received:
            raise ProtocolError(f"replayed frame (counter {ctr}, expected {self.received})")
        if ctr > self.received:
            raise ProtocolError(f"reordered frame (counter {ctr}, expected {self.received})")
        view = memoryview(body)
        ad, ct = view[:frames.COUNTER.size], view[frames.COUNTER.size:]
        plain: bytes | bytearray
        try:
            if self._into and len(ct) >= _INTO_BYTES:
                plain = bytearray(len(ct) - TAG_BYTES)
                self._recv.decrypt_into(self._nonce(ctr), ct, ad, plain)
            else:
                plain = self._recv.decrypt(self._nonce(ctr), ct, ad)
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


def _cipher_name(v: object) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_CIPHER_NAME:
        raise ProtocolError("malformed cipher name in HELLO")
    return v


def _check_offer(v: object) -> list[str]:
    if not isinstance(v, list) or not 0 < len(v) <= MAX_CIPHER_OFFER:
        raise ProtocolError("malformed cipher offer in HELLO")
    return [_cipher_name(x) for x in v]


async def client_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           cluster: ClusterKey, node: NodeKey,
                           timeout_s: float = HANDSHAKE_TIMEOUT_S,
                           ciphers: Sequence[str] | None = None) -> Session:
    """Authenticate a connection we opened; raises AuthFailed or ProtocolError.
    ``ciphers``: what to offer, most preferred first (default :func:`local_ciphers`)."""
    offer = list(ciphers) if ciphers is not None else local_ciphers()
    async with asyncio.timeout(timeout_s):
        eph = PrivateKey.generate()
        hello_c = frames.pack([frames.HELLO, frames.PROTOCOL_VERSION, cluster.cluster_id,
                               node.public, bytes(eph.public_key), offer])
        writer.write(frames.frame(hello_c))
        await writer.drain()
        obj = await _read(reader)
        s_static, s_eph = _check_hello(obj, cluster, 7)
        cipher, proof = _cipher_name(obj[5]), obj[6]
        transcript = _transcript(hello_c, frames.pack(obj[:6]))
        c2s, s2c, k_ps, k_pc = _derive(cluster, node, eph, s_static, s_eph, transcript)
        if not isinstance(proof, bytes) or not hmac.compare_digest(
                proof, _mac(k_ps, transcript)):
            raise AuthFailed("server failed to prove the join token")
        if cipher not in offer:
            raise ProtocolError(f"server chose cipher {cipher!r}, which was not offered")
        writer.write(frames.frame(frames.pack([frames.AUTH, _mac(k_pc, transcript)])))
        await writer.drain()
        return Session(SecureChannel(c2s, s2c, cipher), s_static)


async def server_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           cluster: ClusterKey, node: NodeKey,
                           timeout_s: float = HANDSHAKE_TIMEOUT_S,
                           ciphers: Sequence[str] | None = None) -> Session:
    """Authenticate a connection a peer opened. Nothing the peer sends is acted on before
    its proof checks out; raises AuthFailed or ProtocolError. ``ciphers``: what this side
    accepts, most preferred first (default :func:`local_ciphers`)."""
    ours = list(ciphers) if ciphers is not None else local_ciphers()
    async with asyncio.timeout(timeout_s):
        obj = await _read(reader)
        c_static, c_eph = _check_hello(obj, cluster, 6)
        cipher = choose_cipher(ours, _check_offer(obj[5]))
        hello_c = frames.pack(obj)
        eph = PrivateKey.generate()
        core = [frames.HELLO, frames.PROTOCOL_VERSION, cluster.cluster_id, node.public,
                bytes(eph.public_key), cipher]
        transcript = _transcript(hello_c, frames.pack(core))
        c2s, s2c, k_ps, k_pc = _derive(cluster, node, eph, c_static, c_eph, transcript)
        writer.write(frames.frame(frames.pack([*core, _mac(k_ps, transcript)])))
        await writer.drain()
        auth = await _read(reader)
        if len(auth) != 2 or auth[0] != frames.AUTH or not isinstance(auth[1], bytes):
            raise ProtocolError("malformed AUTH")
        if not hmac.compare_digest(auth[1], _mac(k_pc, transcript)):
            raise AuthFailed("client failed to prove the join token")
        return Session(SecureChannel(s2c, c2s, cipher), c_static)
