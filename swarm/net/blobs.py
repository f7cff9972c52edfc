"""Blobs between members: what a node serves from its store, and :class:`PeerSource`, the
:class:`~swarm.fs.source.BlobSource` that asks members for what this node lacks.

Trust: a member authenticated by the join token may still be broken or compromised, so
nothing it sends is believed. A leaf is hashed on arrival here (and again by the
:class:`~swarm.fs.source.Fetcher`), so a wrong answer is pinned on the peer that gave it:
that peer is marked suspect, skipped for :data:`SUSPECT_S`, and the fetch goes on at the
next peer. A peer that fails mid-transfer (connection lost, no answer in time) is dropped
for that blob the same way, without the suspicion.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from swarm.digest import DIGEST_SIZE, hash_bytes, to_hex
from swarm.errors import BlobMissing, NotFound, PeerError, RemoteError, StoreError, UsageError
from swarm.fs import images
from swarm.fs.source import BlobSource
from swarm.net.rpc import Call, Connection, Handler
from swarm.store import Store
from swarm.store.cas import Manifest

log = logging.getLogger(__name__)

# A peer caught sending wrong bytes is not asked again for this long.
SUSPECT_S = 300.0
# One blob request: a 4 MiB chunk takes tens of milliseconds on a LAN, so this only
# bounds a peer that hangs.
BLOB_TIMEOUT_S = 20.0
RESOLVE_TIMEOUT_S = 5.0
# Leaves at least this large are hashed on a worker thread (BLAKE3 releases the GIL).
# Below it the hop costs more than the hash: ~50 us against 13 us for 64 KiB (a hot set
# is mostly small files; the numpy image's: 127 of 173 under 64 KiB).
HASH_OFFLOAD_BYTES = 1 << 20


def _digest_arg(call: Call) -> bytes:
    d = call.args.get("digest")
    if not isinstance(d, bytes) or len(d) != DIGEST_SIZE:
        raise UsageError("digest must be 32 bytes")
    return d


class BlobService:
    """The handlers through which a node serves its store to members.

    ``corrupt`` is a test-only switch: every leaf served has one byte flipped, so tests
    can show that receivers catch a lying peer by digest. ``die_on_serve`` (test-only
    too) SIGKILLs this process when a request for a leaf arrives: a node dying with a
    transfer in flight.
    """

    def __init__(self, store: Store, *, corrupt: bool = False,
                 die_on_serve: bool = False) -> None:
        self.store = store
        self.corrupt = corrupt
        self.die_on_serve = die_on_serve
        self.served = 0
        self.served_bytes = 0

    def handlers(self) -> dict[str, Handler]:
        return {"blob.get": self.blob_get, "blob.manifest": self.blob_manifest,
                "image.resolve": self.image_resolve}

    async def blob_get(self, call: Call) -> None:
        """The leaf, as BYTES sealed straight from the store's map: no copy of it is made
        here (a 4 MiB chunk costs one AES-GCM pass and the socket write)."""
        digest = _digest_arg(call)
        if self.die_on_serve and call.conn.channel is not None:
            log.error("test switch: dying while serving %s", to_hex(digest)[:12])
            os.kill(os.getpid(), signal.SIGKILL)
        # Room first: with many requests in flight, answers wait here as requests, not
        # as sealed 4 MiB buffers piling up in the transport.
        await call.drain()
        try:
            with self.store.view(digest) as view:
                n = len(view)
                if self.corrupt and n:
                    call.reply_bytes(bytes([view[0] ^ 0xFF]) + view[1:])
                else:
                    call.reply_bytes(view)
        except StoreError:
            raise UsageError(f"blob {to_hex(digest)} is chunked: ask for its chunks") from None
        self.served += 1
        self.served_bytes += n

    async def blob_manifest(self, call: Call) -> bytes | None:
        digest = _digest_arg(call)
        man = self.store.manifest(digest)
        if man is not None:
            return man.encode()
        if not self.store.has(digest):
            raise BlobMissing(to_hex(digest))
        return None

    async def image_resolve(self, call: Call) -> dict[str, Any]:
        ref = call.args.get("ref")
        if not isinstance(ref, str):
            raise UsageError("ref must be a string")
        image_id = images.resolve(self.store, ref)
        return {"id": image_id, "hot_set": images.hot_set(self.store, image_id)}


class Dialer(Protocol):
    """What a PeerSource needs of the transport."""

    async def connect(self, addr: str) -> Connection: ...

    def drop(self, addr: str) -> None: ...


class PeerSource(BlobSource):
    """Missing blobs from members. ``members`` returns the peer addresses to ask (this
    node excluded). Concurrent fetches start at different peers (rotated by digest), so a
    file's chunks and a hot set's files are pulled from several peers in parallel."""

    name = "peers"
    verifies_leaves = True  # fetch() hashes every leaf: that is how a liar is caught

    def __init__(self, dialer: Dialer, members: Callable[[], Sequence[str]], *,
                 timeout_s: float = BLOB_TIMEOUT_S, suspect_s: float = SUSPECT_S) -> None:
        self.dialer = dialer
        self.members = members
        self.timeout_s = timeout_s
        self.suspect_s = suspect_s
        self.suspects: dict[str, float] = {}  # addr -> monotonic time the suspicion ends
        self.fetches = 0
        self.fetched_bytes = 0
        self.rejected = 0
        self.failovers = 0
        self._manifest_from: dict[bytes, str] = {}

    def suspect(self, addr: str, why: str) -> None:
        log.error("peer %s marked suspect for %.0f s: %s", addr, self.suspect_s, why)
        self.suspects[addr] = time.monotonic() + self.suspect_s
        self.dialer.drop(addr)

    def is_suspect(self, addr: str) -> bool:
        until = self.suspects.get(addr)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self.suspects[addr]
            return False
        return True

    def candidates(self, digest: bytes) -> list[str]:
        peers = [a for a in self.members() if not self.is_suspect(a)]
        if not peers:
            return []
        k = digest[0] % len(peers)
        return peers[k:] + peers[:k]

    async def _ask(self, addr: str, method: str, digest: bytes) -> Any:
        """One request to one peer; PeerError (connection lost, timeout) drops the
        connection so the next request dials afresh."""
        try:
            conn = await self.dialer.connect(addr)
            return await conn.request(method, {"digest": digest}, timeout_s=self.timeout_s)
        except RemoteError:
            raise
        except PeerError:
            self.dialer.drop(addr)
            raise

    async def fetch(self, digest: bytes) -> bytes | bytearray:
        """The leaf ``digest`` from the first peer that holds it and sends the right bytes
        (bytes, or a bytearray for a large one: it arrives decrypted into its own
        buffer)."""
        errors: list[str] = []
        for addr in self.candidates(digest):
            try:
                data = await self._ask(addr, "blob.get", digest)
            except RemoteError as err:
                if err.code != "missing":
                    errors.append(f"{addr}: {err}")
                continue
            except PeerError as err:
                self.failovers += 1
                log.warning("blob %s from %s failed: %s", to_hex(digest)[:12], addr, err)
                errors.append(f"{addr}: {err}")
                continue
            if not isinstance(data, bytes | bytearray):
                self.suspect(addr, f"answered blob.get with {type(data).__name__}")
                continue
            got = (await asyncio.to_thread(hash_bytes, data)
                   if len(data) >= HASH_OFFLOAD_BYTES else hash_bytes(data))
            if got != digest:
                self.rejected += 1
                self.suspect(addr, f"sent {len(data)} bytes for blob {to_hex(digest)} that "
                             f"hash to {to_hex(got)}")
                continue
            self.fetches += 1
            self.fetched_bytes += len(data)
            return data
        where = "any peer" + (f" ({'; '.join(errors)})" if errors else "")
        raise BlobMissing(to_hex(digest), where)

    async def fetch_manifest(self, digest: bytes) -> Manifest | None:
        """A manifest cannot be checked until its file is assembled (the Fetcher does
        that). When asked again for a digest, the peer that gave the last manifest is
        asked last: if that manifest did not assemble, another peer's is tried first. It
        is not marked suspect: a second ask may also mean the store was emptied since."""
        prev = self._manifest_from.pop(digest, None)
        order = self.candidates(digest)
        if prev in order and len(order) > 1:
            order.remove(prev)
            order.append(prev)
        for addr in order:
            try:
                raw = await self._ask(addr, "blob.manifest", digest)
            except (RemoteError, PeerError):
                continue
            if raw is None:
                return None
            try:
                man = Manifest.decode(raw)
            except Exception:
                self.suspect(addr, f"sent an undecodable manifest for {to_hex(digest)}")
                continue
            self._manifest_from[digest] = addr
            return man
        raise BlobMissing(to_hex(digest), "any peer")

    async def resolve(self, ref: str) -> tuple[bytes, bytes | None]:
        """(image id, hot-set digest or None) of ``ref`` as the first member that knows
        it says; every member is asked at once. NotFound when none knows it."""
        peers = [a for a in self.members() if not self.is_suspect(a)]

        async def ask(addr: str) -> tuple[bytes, bytes | None]:
            conn = await self.dialer.connect(addr)
            res = await conn.request("image.resolve", {"ref": ref},
                                     timeout_s=RESOLVE_TIMEOUT_S)
            image_id, hot = res.get("id"), res.get("hot_set")
            if not isinstance(image_id, bytes) or len(image_id) != DIGEST_SIZE:
                raise PeerError(f"{addr} answered image.resolve with garbage")
            return image_id, hot if isinstance(hot, bytes) and len(hot) == DIGEST_SIZE \
                else None

        tasks = [asyncio.ensure_future(ask(a)) for a in peers]
        try:
            for fut in asyncio.as_completed(tasks):
                try:
                    return await fut
                except (PeerError, NotFound) as err:
                    log.debug("image.resolve %s: %s", ref, err)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        raise NotFound(f"no such image: {ref} (not here, nor at any of {len(peers)} peers)")
