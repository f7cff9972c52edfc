"""Every frame and message swarm sends between processes, documented once.

Framing (both transports)
-------------------------
A frame is ``u32 length`` (big-endian) followed by ``length`` bytes of body. The length is
checked against the limit of the phase *before* the body is read, so a peer cannot make
us allocate more than :data:`MAX_FRAME_BYTES` (:data:`MAX_HANDSHAKE_FRAME_BYTES` before it
has authenticated). A frame over the limit ends the connection.

Peer transport (TCP between nodes; :mod:`swarm.net.secure`)
-----------------------------------------------------------
Handshake, three plaintext frames whose body is a msgpack array:

``HELLO``  client -> server  ``[1, version, cluster_id(8), static_pub(32), eph_pub(32),
           ciphers]``
``HELLO``  server -> client  ``[1, version, cluster_id(8), static_pub(32), eph_pub(32),
           cipher, proof(32)]``
``AUTH``   client -> server  ``[2, proof(32)]``

``version`` is :data:`PROTOCOL_VERSION` (2); a side speaking another version is refused.
``cluster_id`` names the cluster (a hash of the join token, not the token); a server
whose id differs closes without answering, so a stranger learns nothing to attack.
``ciphers`` lists the AEADs the client accepts, most preferred first (at most 8 names):
``"aes-256-gcm"``, ``"chacha20-poly1305"``; names the server does not know are skipped.
``cipher`` is the server's choice: the first of its own list that the client offered (no
common one: the server closes). Both proofs are MACs of the transcript (both HELLOs
without the server's proof, so the offer and the choice too) under keys derived from the
token *and* from two X25519 agreements, ephemeral-ephemeral (forward secrecy) and
static-static (each side holds the private key of the identity it claims). A side that
lacks the token or the key cannot produce a proof; the server serves nothing before it
has checked ``AUTH``; the client refuses a cipher it did not offer.

After the handshake every frame body is ``u64 counter | ciphertext | tag(16)``: the
chosen AEAD (IETF ChaCha20-Poly1305, or AES-256-GCM) under the direction's key, nonce
``4 zero bytes | counter``, the counter bytes as associated data, the plaintext a
*message* (below) or the payload that a ``BYTES`` message announced. Counters start at 0
and go up by one per frame in each direction; a frame whose counter is not the next
expected one is a replay or a reorder and ends the connection (before decryption).
Session keys are fresh per connection, so a frame captured from another connection does
not authenticate either.

Local API (the node's unix socket; :mod:`swarm.nodeapi`)
--------------------------------------------------------
No handshake, no encryption: the socket lives in the state directory with mode 0600, so
only its owner can connect. Frame bodies are messages.

Messages (msgpack arrays; the first element is the type)
--------------------------------------------------------
``REQUEST``  ``[1, id, method, args]``   id: int chosen by the sender, unique among its
                                          requests in flight; args: a map
``RESPONSE`` ``[2, id, result]``
``ERROR``    ``[3, id, code, message]``  code: one of :data:`ERROR_CODES`, or
                                          ``swarm:<ErrorClass>`` for a swarm.errors class
``CANCEL``   ``[4, id]``                  the sender no longer wants the answer; the
                                          receiver cancels the handler (no reply)
``DATA``     ``[5, id, stream, bytes]``   a chunk of a byte stream belonging to request id:
                                          stream 1 stdout, 2 stderr (node -> CLI), 0 stdin
                                          (CLI -> node); empty bytes end the stream.
                                          Stdin is credit-paced: the node answers each
                                          chunk it has handed to the container with an
                                          empty stream-0 DATA, and the CLI keeps at most
                                          a few chunks unanswered, so a container that
                                          does not read never stalls the connection
                                          (its CANCEL still gets through)
``BYTES``    ``[6, id]``                  the RESPONSE to request id is a byte string: the
                                          whole (decrypted) body of the *next* frame, raw,
                                          not msgpack; nothing else comes between the two.
                                          A handler whose result is bytes-like answers
                                          this way when it is 64 KiB or more (less goes
                                          as a RESPONSE): a blob goes out sealed straight
                                          from the store's map and comes in with no
                                          decoding; the caller gets bytes or bytearray

Methods a member serves to authenticated members (:mod:`swarm.net.blobs`):
``ping`` {} -> "pong" · ``join`` {addr} -> {members, node} · ``members`` {} -> {members} ·
``blob.get`` {digest} -> bytes of a leaf · ``blob.manifest`` {digest} -> manifest bytes,
or nil for a leaf · ``image.resolve`` {ref} -> image id (32 bytes).
Methods of the local API are listed in :mod:`swarm.nodeapi`.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from swarm.errors import ProtocolError

# The largest frame after the handshake: a leaf blob is at most one chunk (4 MiB by
# default, SWARM_CHUNK_SIZE may raise it) plus the message and AEAD overhead.
MAX_FRAME_BYTES = 32 << 20
# Handshake frames are a few hundred bytes; a stranger gets no more than this.
MAX_HANDSHAKE_FRAME_BYTES = 1024
LENGTH = struct.Struct(">I")
COUNTER = struct.Struct(">Q")

PROTOCOL_VERSION = 2

# handshake frame types
HELLO = 1
AUTH = 2

# message types
REQUEST = 1
RESPONSE = 2
ERROR = 3
CANCEL = 4
DATA = 5
BYTES = 6

STREAM_STDIN = 0
STREAM_STDOUT = 1
STREAM_STDERR = 2

ERROR_CODES = frozenset({
    "missing",         # the blob or image is not held here
    "bad_request",     # malformed arguments
    "unknown_method",
    "timeout",
    "busy",            # too many requests in flight on this connection
    "internal",        # the handler failed; the message says how
})


@dataclass(frozen=True)
class Message:
    """One decoded message; fields unused by a type are left at their defaults."""

    type: int
    id: int
    method: str = ""
    args: Any = None          # REQUEST: the args map; RESPONSE: the result
    code: str = ""            # ERROR
    text: str = ""            # ERROR
    stream: int = 0           # DATA
    data: bytes = b""         # DATA


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(body: bytes | bytearray | memoryview, *, max_bytes: int = MAX_FRAME_BYTES) -> Any:
    """msgpack bytes -> Python, with the container sizes bounded by the frame size."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True,
                               max_bin_len=max_bytes, max_str_len=max_bytes,
                               max_array_len=1 << 20, max_map_len=1 << 16)
    except Exception as err:  # msgpack raises several types; all mean a bad frame
        raise ProtocolError(f"undecodable frame: {type(err).__name__}") from None


def frame(body: bytes) -> bytes:
    """Length-prefix a body."""
    return LENGTH.pack(len(body)) + body


def parse_length(header: bytes, limit: int) -> int:
    """The body length a 4-byte frame header announces; ProtocolError past ``limit``."""
    if len(header) != LENGTH.size:
        raise ProtocolError("truncated frame header")
    (n,) = LENGTH.unpack(header)
    if n > limit:
        raise ProtocolError(f"frame of {n} bytes exceeds the limit of {limit}")
    return n


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """The next frame body, or None at a clean end of stream (between frames)."""
    try:
        header = await reader.readexactly(LENGTH.size)
    except asyncio.IncompleteReadError as err:
        if not err.partial:
            return None
        raise ProtocolError("connection closed inside a frame header") from None
    n = parse_length(header, limit)
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed inside a frame") from None


def _int(v: Any) -> int:
    if type(v) is not int or v < 0:
        raise ProtocolError("message id must be a non-negative integer")
    return v


def decode_message(body: bytes | bytearray | memoryview) -> Message:
    """A message body -> :class:`Message`, checking its shape; ProtocolError otherwise."""
    obj = unpack(body)
    if not isinstance(obj, list) or not obj or type(obj[0]) is not int:
        raise ProtocolError("a message must be an array starting with its type")
    t = obj[0]
    if t == REQUEST:
        if len(obj) != 4 or not isinstance(obj[2], str) or not isinstance(obj[3], dict):
            raise ProtocolError("malformed REQUEST")
        return Message(t, _int(obj[1]), method=obj[2], args=obj[3])
    if t == RESPONSE:
        if len(obj) != 3:
            raise ProtocolError("malformed RESPONSE")
        return Message(t, _int(obj[1]), args=obj[2])
    if t == ERROR:
        if len(obj) != 4 or not isinstance(obj[2], str) or not isinstance(obj[3], str):
            raise ProtocolError("malformed ERROR")
        return Message(t, _int(obj[1]), code=obj[2], text=obj[3])
    if t == CANCEL:
        if len(obj) != 2:
            raise ProtocolError("malformed CANCEL")
        return Message(t, _int(obj[1]))
    if t == DATA:
        if (len(obj) != 4 or obj[2] not in (STREAM_STDIN, STREAM_STDOUT, STREAM_STDERR)
                or not isinstance(obj[3], bytes)):
            raise ProtocolError("malformed DATA")
        return Message(t, _int(obj[1]), stream=obj[2], data=obj[3])
    if t == BYTES:
        if len(obj) != 2:
            raise ProtocolError("malformed BYTES")
        return Message(t, _int(obj[1]))
    raise ProtocolError(f"unknown message type {t}")


def request(req_id: int, method: str, args: dict[str, Any]) -> bytes:
    return pack([REQUEST, req_id, method, args])


def response(req_id: int, result: Any) -> bytes:
    return pack([RESPONSE, req_id, result])


def error(req_id: int, code: str, text: str) -> bytes:
    return pack([ERROR, req_id, code, text])


def cancel(req_id: int) -> bytes:
    return pack([CANCEL, req_id])


def data(req_id: int, stream: int, chunk: bytes) -> bytes:
    return pack([DATA, req_id, stream, chunk])


def bytes_header(req_id: int) -> bytes:
    """The BYTES message; the payload goes as the next frame's body."""
    return pack([BYTES, req_id])
