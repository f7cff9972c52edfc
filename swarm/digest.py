"""Digests: BLAKE3, 32 bytes, printed as 64 lowercase hex characters.

This module is the one place that hashes, validates and formats digests. Everything else
passes ``bytes`` of length 32 around and calls :func:`to_hex` / :func:`from_hex` at the edges.
"""

from __future__ import annotations

import re

import blake3

from swarm.errors import UsageError

DIGEST_SIZE = 32
HEX_LEN = 2 * DIGEST_SIZE
_HEX_RE = re.compile(r"[0-9a-f]{64}")
# Hashing inputs at least this large uses blake3's internal threads (it releases the GIL).
_MT_THRESHOLD_BYTES = 1 << 20


def hash_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """The digest of ``data``."""
    if len(data) >= _MT_THRESHOLD_BYTES:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()
    return blake3.blake3(data).digest()


def hasher() -> blake3.blake3:
    """An incremental hasher; ``.update()`` then ``.digest()``."""
    return blake3.blake3()


def to_hex(digest: bytes) -> str:
    if len(digest) != DIGEST_SIZE:
        raise ValueError(f"digest must be {DIGEST_SIZE} bytes, got {len(digest)}")
    return digest.hex()


def from_hex(text: str) -> bytes:
    """Parse a full 64-character lowercase hex digest; raises UsageError otherwise."""
    if not isinstance(text, str) or not _HEX_RE.fullmatch(text):
        raise UsageError(f"not a digest: {text!r} (want 64 lowercase hex characters)")
    return bytes.fromhex(text)


def is_hex_digest(text: str) -> bool:
    return isinstance(text, str) and _HEX_RE.fullmatch(text) is not None


def is_hex_prefix(text: str) -> bool:
    """True for 4..64 lowercase hex characters: something a user may type to name an id."""
    return isinstance(text, str) and 4 <= len(text) <= HEX_LEN and re.fullmatch(
        r"[0-9a-f]+", text) is not None


def short(digest: bytes) -> str:
    """12 hex characters, for humans (logs, tables)."""
    return to_hex(digest)[:12]
