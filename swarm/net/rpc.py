"""Request/response RPC over one framed connection (message layouts: frames.py).

A :class:`Connection` is symmetric: either side may send requests, and either side may
serve them when it was given handlers. One reader task per connection decodes frames and
routes them: a RESPONSE or ERROR resolves the caller's future, a REQUEST starts a handler
task, a CANCEL cancels one, DATA goes to the call it belongs to. Writes are synchronous
(seal and write without an await between), so frames leave in counter order whichever
task sends them.

Any protocol violation (bad frame, replay, undecodable message) closes the connection:
once a peer has sent one bad frame nothing else it says can be trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from swarm import errors
from swarm.errors import PeerError, ProtocolError, RemoteError, RpcTimeout, SwarmError
from swarm.net import frames
from swarm.net.secure import SecureChannel

log = logging.getLogger(__name__)

# Default deadline of one request (a blob of one chunk over a LAN takes milliseconds).
REQUEST_TIMEOUT_S = 30.0
# Handler tasks one connection may have running; past it requests are refused ("busy")
# rather than queued, so one greedy peer cannot hold the node's memory.
MAX_HANDLERS_PER_CONNECTION = 128
# Queued DATA chunks per call before the reader waits for the consumer.
DATA_QUEUE_CHUNKS = 64


class Call:
    """One request being served: its arguments, and its byte streams both ways."""

    def __init__(self, conn: Connection, req_id: int, method: str, args: dict[str, Any]):
        self.conn = conn
        self.id = req_id
        self.method = method
        self.args = args
        self.incoming: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(DATA_QUEUE_CHUNKS)

    def send_data(self, stream: int, chunk: bytes) -> None:
        self.conn.send_data(self.id, stream, chunk)

    async def drain(self) -> None:
        await self.conn.drain()


Handler = Callable[[Call], Awaitable[Any]]


def _error_for(err: BaseException) -> tuple[str, str]:
    if isinstance(err, errors.NotFound):
        return "missing", str(err)
    if isinstance(err, RemoteError):
        return err.code, str(err)
    if isinstance(err, SwarmError):
        return f"swarm:{type(err).__name__}", str(err)
    return "internal", f"{type(err).__name__}: {err}"


def remote_error(code: str, text: str) -> RemoteError:
    """The exception a caller sees for an ERROR; a SwarmError class named by the code
    lends it its exit code, so `swarm run` through a node exits as it would in-process."""
    err = RemoteError(code, text)
    if code.startswith("swarm:"):
        cls = getattr(errors, code[len("swarm:"):], None)
        if isinstance(cls, type) and issubclass(cls, SwarmError):
            err.exit_code = cls.exit_code
    elif code == "missing":
        err.exit_code = errors.NotFound.exit_code
    return err


class Connection:
    """A framed, optionally encrypted connection carrying RPC both ways."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 channel: SecureChannel | None = None,
                 handlers: dict[str, Handler] | None = None, name: str = "peer",
                 peer_key: bytes | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self.channel = channel
        self.handlers = handlers or {}
        self.name = name
        self.peer_key = peer_key
        self.closed = asyncio.Event()
        self.close_reason: str = ""
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._streams: dict[int, Callable[[int, bytes], None]] = {}
        self._calls: dict[int, tuple[Call, asyncio.Task[None]]] = {}
        self._reader_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Connection:
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"rpc-{self.name}")
        return self

    async def aclose(self) -> None:
        self._close("closed locally")
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task
        for _call, task in list(self._calls.values()):
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    @property
    def is_closed(self) -> bool:
        return self.closed.is_set()

    def _close(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        self.writer.close()
        err = PeerError(f"connection to {self.name} lost: {reason}")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        for _call, task in self._calls.values():
            task.cancel()

    # ------------------------------------------------------------------ sending
    def _send(self, body: bytes) -> None:
        if self.closed.is_set():
            raise PeerError(f"connection to {self.name} is closed: {self.close_reason}")
        if self.channel is not None:
            body = self.channel.seal(body)
        self.writer.write(frames.frame(body))

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as err:
            self._close(f"write failed: {err}")
            raise PeerError(f"connection to {self.name} lost: {err}") from None

    def send_data(self, req_id: int, stream: int, chunk: bytes) -> None:
        self._send(frames.data(req_id, stream, chunk))

    async def request(self, method: str, args: dict[str, Any] | None = None, *,
                      timeout_s: float | None = REQUEST_TIMEOUT_S,
                      on_data: Callable[[int, bytes], None] | None = None,
                      on_start: Callable[[int], None] | None = None) -> Any:
        """Send a request and wait for its answer. Raises RemoteError for an ERROR answer,
        RpcTimeout past ``timeout_s`` (None: no deadline), PeerError when the connection
        goes. Cancelling the awaiting task sends CANCEL, so the other side stops too.
        ``on_data`` receives the DATA chunks of the call; ``on_start`` its id."""
        req_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        if on_data is not None:
            self._streams[req_id] = on_data
        try:
            self._send(frames.request(req_id, method, args or {}))
            if on_start is not None:
                on_start(req_id)
            await self.drain()
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
            except TimeoutError:
                raise RpcTimeout(f"{method} to {self.name}: no answer in {timeout_s} s"
                                 ) from None
        except BaseException:
            if not fut.done():
                fut.cancel()
                with contextlib.suppress(PeerError):
                    self._send(frames.cancel(req_id))
            raise
        finally:
            self._pending.pop(req_id, None)
            self._streams.pop(req_id, None)

    # ------------------------------------------------------------------ receiving
    async def _read_loop(self) -> None:
        reason = "end of stream"
        try:
            while True:
                body = await frames.read_frame(self.reader, frames.MAX_FRAME_BYTES)
                if body is None:
                    break
                if self.channel is not None:
                    body = self.channel.open(body)
                await self._dispatch(frames.decode_message(body))
        except ProtocolError as err:
            reason = str(err)
            log.warning("dropping %s: %s", self.name, err)
        except (ConnectionError, OSError) as err:
            reason = f"{type(err).__name__}: {err}"
        except asyncio.CancelledError:
            reason = "closed locally"
            raise
        finally:
            self._close(reason)

    async def _dispatch(self, msg: frames.Message) -> None:
        if msg.type in (frames.RESPONSE, frames.ERROR):
            fut = self._pending.get(msg.id)
            if fut is None or fut.done():
                return  # an answer to a request we gave up on
            if msg.type == frames.RESPONSE:
                fut.set_result(msg.args)
            else:
                fut.set_exception(remote_error(msg.code, msg.text))
        elif msg.type == frames.REQUEST:
            self._start_call(msg)
        elif msg.type == frames.CANCEL:
            entry = self._calls.get(msg.id)
            if entry is not None:
                entry[1].cancel()
        elif msg.type == frames.DATA:
            cb = self._streams.get(msg.id)
            if cb is not None:
                cb(msg.stream, msg.data)
                return
            entry = self._calls.get(msg.id)
            if entry is not None:
                await entry[0].incoming.put((msg.stream, msg.data))

    def _start_call(self, msg: frames.Message) -> None:
        if msg.id in self._calls:
            raise ProtocolError(f"request id {msg.id} is already in flight")
        handler = self.handlers.get(msg.method)
        if handler is None:
            self._send(frames.error(msg.id, "unknown_method", f"no method {msg.method!r}"))
            return
        if len(self._calls) >= MAX_HANDLERS_PER_CONNECTION:
            self._send(frames.error(msg.id, "busy", "too many requests in flight"))
            return
        call = Call(self, msg.id, msg.method, msg.args)
        task = asyncio.create_task(self._serve(call, handler), name=f"{msg.method}#{msg.id}")
        self._calls[msg.id] = (call, task)

    async def _serve(self, call: Call, handler: Handler) -> None:
        try:
            try:
                result = await handler(call)
            except asyncio.CancelledError:
                return  # cancelled by the caller, or the connection went: no answer
            except Exception as err:
                code, text = _error_for(err)
                if code == "internal":
                    log.exception("%s from %s failed", call.method, self.name)
                if not self.closed.is_set():
                    self._send(frames.error(call.id, code, text))
                    await self.drain()
                return
            if not self.closed.is_set():
                self._send(frames.response(call.id, result))
                await self.drain()
        except PeerError:
            pass
        finally:
            self._calls.pop(call.id, None)
