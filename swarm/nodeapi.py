"""The local API: how the CLI and mount daemons talk to a running ``swarm node``.

Transport: the unix socket ``<state>/node.sock`` (mode 0600, so only the node's owner can
connect), carrying the frames and messages of :mod:`swarm.net.frames` without handshake
or encryption. Methods:

``status``        {} -> {node, addr, members, token, pid}
``ps``            {} -> [container, ...] as ``swarm ps --json`` prints them
``image.resolve`` {ref} -> {id, names}: the image, fetched through peers when this
                  node has never seen it (its index and hot set become local)
``run``           {image, opts} -> {exit}; stdout and stderr come back as DATA frames of
                  the call while it runs; CANCEL kills the container
``blob.get``      {digest} -> bytes of a leaf, from the local store or, verified, from
                  peers (this is how mount daemons fetch: they hold no peer connections)
``blob.manifest`` {digest} -> manifest bytes, or nil for a leaf

When no node answers, :func:`connect` raises :class:`~swarm.errors.NodeNotRunning` and
the CLI works in-process, as it did before nodes existed.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

from swarm.digest import to_hex
from swarm.errors import BlobMissing, NodeNotRunning, PeerError, RemoteError
from swarm.fs.source import BlobSource
from swarm.net.rpc import Connection
from swarm.net.transport import STREAM_LIMIT_BYTES
from swarm.store.cas import Manifest

SOCKET_NAME = "node.sock"
# A unix socket path must fit sun_path (108 bytes, NUL included).
MAX_SOCKET_PATH_BYTES = 107
# Blob fetches through the node wait as long as the node's own peer fetch may take.
LOCAL_BLOB_TIMEOUT_S = 60.0


def socket_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where the node of ``state_dir`` listens ($SWARM_NODE_SOCKET overrides)."""
    env = os.environ.get("SWARM_NODE_SOCKET")
    return Path(env) if env else Path(state_dir).absolute() / SOCKET_NAME


async def connect(path: str | os.PathLike[str]) -> Connection:
    """A connection to the node listening on ``path``; NodeNotRunning when none does."""
    try:
        reader, writer = await asyncio.open_unix_connection(os.fspath(path),
                                                            limit=STREAM_LIMIT_BYTES)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
            raise NodeNotRunning(f"no swarm node is running on {path}") from None
        raise
    return Connection(reader, writer, name=f"node {path}").start()


class SocketSource(BlobSource):
    """A :class:`BlobSource` that asks the local node, which asks its peers. The mount
    daemon verifies what comes back like any other source's bytes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = f"node:{path}"
        self.fetches = 0
        self.fetched_bytes = 0
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> Connection:
        async with self._lock:
            if self._conn is None or self._conn.is_closed:
                self._conn = await connect(self.path)
            return self._conn

    async def _request(self, method: str, digest: bytes) -> Any:
        try:
            conn = await self._connection()
            return await conn.request(method, {"digest": digest},
                                      timeout_s=LOCAL_BLOB_TIMEOUT_S)
        except RemoteError as err:
            if err.code == "missing":
                raise BlobMissing(to_hex(digest), self.name) from None
            raise
        except (PeerError, NodeNotRunning) as err:
            raise BlobMissing(to_hex(digest), f"{self.name} ({err})") from None

    async def fetch(self, digest: bytes) -> bytes | bytearray:
        data = await self._request("blob.get", digest)
        if not isinstance(data, bytes | bytearray):
            raise BlobMissing(to_hex(digest), self.name)
        self.fetches += 1
        self.fetched_bytes += len(data)
        return data

    async def fetch_manifest(self, digest: bytes) -> Manifest | None:
        raw = await self._request("blob.manifest", digest)
        return None if raw is None else Manifest.decode(raw)

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.aclose()
