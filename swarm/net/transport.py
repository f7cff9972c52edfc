"""The peer transport: TCP listener and dialer, each connection authenticated and
encrypted (secure.py) before any request on it is served (rpc.py).

A connection that fails the handshake is logged with the peer's address and closed;
nothing it sent was acted on. Connections to a peer are cached and shared by every
request to it (requests multiplex by id); a dead one is replaced on the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from swarm.errors import AuthFailed, PeerError, ProtocolError, UsageError
from swarm.net.rpc import Connection, Handler
from swarm.net.secure import (
    HANDSHAKE_TIMEOUT_S,
    ClusterKey,
    NodeKey,
    client_handshake,
    local_ciphers,
    server_handshake,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
# Socket buffers sized for a few 4 MiB chunks in flight on a LAN.
SOCKET_BUFFER_BYTES = 4 << 20
# asyncio's read buffer limit: large frames are read in pieces up to this.
STREAM_LIMIT_BYTES = 1 << 20


def parse_addr(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'HOST:PORT' (or HOST alone with a default port) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise UsageError(f"address {text!r} needs a port (HOST:PORT)")
        return text, default_port
    try:
        num = int(port)
    except ValueError:
        raise UsageError(f"bad port in address {text!r}") from None
    if not 0 <= num <= 65535 or not host:
        raise UsageError(f"bad address {text!r}")
    return host.strip("[]"), num


def format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tune(writer: asyncio.StreamWriter) -> None:
    import socket

    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    writer.transport.set_write_buffer_limits(high=SOCKET_BUFFER_BYTES)


class Transport:
    """Listens for members and dials them. ``handlers`` serve authenticated peers' requests
    (on connections either side opened); ``on_reject`` hears of every refused handshake.
    ``ciphers``: the AEADs this side accepts, most preferred first (default:
    :func:`~swarm.net.secure.local_ciphers`)."""

    def __init__(self, cluster: ClusterKey, node: NodeKey, handlers: dict[str, Handler], *,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 on_reject: Callable[[str, str], None] | None = None,
                 ciphers: Sequence[str] | None = None) -> None:
        self.cluster = cluster
        self.node = node
        self.handlers = handlers
        self.ciphers = list(ciphers) if ciphers is not None else local_ciphers()
        self.handshake_timeout_s = handshake_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.on_reject = on_reject
        self.rejected = 0
        self._server: asyncio.Server | None = None
        self._conns: dict[str, Connection] = {}
        self._dialing: dict[str, asyncio.Future[Connection]] = {}
        self._accepted: set[Connection] = set()
        self._handshakes: set[asyncio.Task[None]] = set()

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        """Start accepting; returns the bound address (port 0 picks one)."""
        self._server = await asyncio.start_server(self._accept, host, port,
                                                  limit=STREAM_LIMIT_BYTES)
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handshakes):
            task.cancel()
        conns = list(self._conns.values()) + list(self._accepted)
        self._conns.clear()
        self._accepted.clear()
        for c in conns:
            await c.aclose()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def _reject(self, who: str, why: str) -> None:
        self.rejected += 1
        log.warning("refused peer %s: %s", who, why)
        if self.on_reject is not None:
            self.on_reject(who, why)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        who = format_addr(peer[0], peer[1]) if peer else "?"
        task = asyncio.current_task()
        if task is not None:
            self._handshakes.add(task)
        try:
            _tune(writer)
            session = await server_handshake(reader, writer, self.cluster, self.node,
                                             self.handshake_timeout_s, self.ciphers)
        except (AuthFailed, ProtocolError) as err:
            self._reject(who, str(err))
            writer.close()
            return
        except (TimeoutError, ConnectionError, OSError) as err:
            self._reject(who, f"handshake did not complete: {type(err).__name__}")
            writer.close()
            return
        except asyncio.CancelledError:  # shutting down: the top of this task, end quietly
            writer.close()
            return
        finally:
            if task is not None:
                self._handshakes.discard(task)
        conn = Connection(reader, writer, channel=session.channel, handlers=self.handlers,
                          name=f"{who} ({session.peer_key.hex()[:12]})",
                          peer_key=session.peer_key).start()
        self._accepted.add(conn)
        with contextlib.suppress(asyncio.CancelledError):
            await conn.closed.wait()  # this task lives as long as the peer's connection
        self._accepted.discard(conn)

    async def connect(self, addr: str) -> Connection:
        """The live connection to ``addr``, dialing (and handshaking) when there is none.
        Concurrent callers share one dial."""
        conn = self._conns.get(addr)
        if conn is not None and not conn.is_closed:
            return conn
        fut = self._dialing.get(addr)
        if fut is None:
            fut = asyncio.ensure_future(self._dial(addr))
            self._dialing[addr] = fut
            fut.add_done_callback(lambda _f: self._dialing.pop(addr, None))
        return await asyncio.shield(fut)

    async def _dial(self, addr: str) -> Connection:
        host, port = parse_addr(addr)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(host, port,
                                                               limit=STREAM_LIMIT_BYTES)
        except (TimeoutError, OSError) as err:
            raise PeerError(f"cannot connect to {addr}: {err or type(err).__name__}"
                            ) from None
        _tune(writer)
        try:
            session = await client_handshake(reader, writer, self.cluster, self.node,
                                             self.handshake_timeout_s, self.ciphers)
        except (AuthFailed, ProtocolError) as err:
            writer.close()
            raise AuthFailed(f"{addr}: {err}") from None
        except (TimeoutError, ConnectionError, OSError) as err:
            writer.close()
            raise PeerError(f"handshake with {addr} failed: {type(err).__name__}") from None
        conn = Connection(reader, writer, channel=session.channel, handlers=self.handlers,
                          name=addr, peer_key=session.peer_key).start()
        self._conns[addr] = conn
        return conn

    def drop(self, addr: str) -> None:
        """Forget the connection to ``addr`` (it misbehaved, or its node died)."""
        conn = self._conns.pop(addr, None)
        if conn is not None:
            conn._close("dropped")
