"""Request/response RPC over one framed connection (message layouts: frames.py).

A :class:`Connection` is symmetric: either side may send requests, and either side may
serve them when it was given handlers. One reader task per connection decodes frames and
routes them: a RESPONSE or ERROR resolves the caller's future, a REQUEST starts a handler
task, a CANCEL cancels one, DATA goes to the call it belongs to, BYTES makes the next
frame's body the caller's answer. Writes are synchronous (seal and write without an await
between), so frames leave in counter order whichever task sends them.

Any protocol violation (bad frame, replay, undecodable message) closes the connection:
once a peer has sent one bad frame nothing else it says can be trusted.

The data path is built for 4 MiB blobs at GB/s: once the handshake is done (it runs on
asyncio streams), the connection takes its socket's transport over with
:class:`FrameProtocol`, which has the kernel write frame bodies straight into their own
buffers (no stream buffer to grow, copy and slice), and a blob answer goes out as BYTES:
sealed straight from the store's map into one wire buffer, opened straight into the
buffer the caller gets, never through msgpack. Measured on this 2-core machine: 4 MiB
frames through StreamReader + msgpack + seal-by-concatenation ran ~400 MB/s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import sys
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
# FrameProtocol: small frames are parsed out of one buffer of this size; a frame body
# longer than SMALL_FRAME_BYTES is received into a buffer of its own.
STREAM_BUFFER_BYTES = 256 << 10
SMALL_FRAME_BYTES = 64 << 10
# Received bytes waiting for the reader task past which the socket is not read.
MAX_QUEUED_BYTES = 64 << 20
# Large frame buffers kept for reuse once their frame is decrypted: as many as a fetch
# keeps chunks in flight (4 MiB each; 2 ran ~5-8% slower in the peers throughput bench).
SPARE_BUFFERS = 4

Payload = bytes | bytearray | memoryview

# glibc malloc: blocks this large are never mmapped, and freed heap memory is kept up to
# this much (see tune_allocator).
MALLOC_MMAP_THRESHOLD_BYTES = 32 << 20
MALLOC_TRIM_THRESHOLD_BYTES = 128 << 20
_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_allocator_tuned = False


def tune_allocator() -> None:
    """Make glibc malloc keep the 4 MiB frame buffers' memory instead of giving it back
    to the kernel after each frame. By default a 4 MiB block is mmapped, or carved from a
    heap top that is trimmed as soon as it is freed: either way the next frame's buffer
    is fresh memory, and every one of its 1024 pages faults on first touch. Measured on
    4 MiB blob transfers over loopback: ~1.1 GB/s as shipped, ~1.8 GB/s with both
    thresholds raised (either alone does not help: setting one turns off glibc's dynamic
    adjustment of the other). The cost: up to MALLOC_TRIM_THRESHOLD_BYTES of freed heap
    kept per process. Once per process; nothing where glibc is not the allocator;
    ``SWARM_MALLOC_TUNE=0`` turns it off."""
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    if os.environ.get("SWARM_MALLOC_TUNE") == "0" or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc (musl has no mallopt)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)
    mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES)


class FrameProtocol(asyncio.BufferedProtocol):
    """Splits a byte stream into frames, for the reader task to take with
    :meth:`next_frame`; flow control both ways (:meth:`drain` for writers).

    Small frames are cut out of one reusable buffer (many per ``recv``); the body of a
    large frame gets a buffer of exactly its size, that the kernel fills in place and that
    becomes the frame (the reader decrypts it, or hands it on as is). Lengths are checked
    against ``limit`` before anything is allocated for them.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray(STREAM_BUFFER_BYTES)
        self._start = 0  # first unparsed byte of _buf
        self._end = 0  # end of the received bytes in _buf
        self._body: bytearray | None = None  # a large frame being received
        self._body_n = 0
        self._spares: list[bytearray] = []  # large buffers given back (recycle)
        self._frames: collections.deque[Payload] = collections.deque()
        self._queued = 0  # bytes in _frames
        self._read_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._error: BaseException | None = None
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.lost: asyncio.Future[None] = self._loop.create_future()

    @classmethod
    def take_over(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  limit: int) -> FrameProtocol:
        """Replace the stream protocol under ``writer``'s transport with a FrameProtocol,
        moving over what the StreamReader had received and not yet handed out (a frame
        that came in with the handshake's last one). Both must be idle (no read pending),
        as they are between the handshake and the reader task."""
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        proto = cls(limit)
        proto.transport = transport
        # StreamReader keeps what it has received in ``_buffer`` (CPython 3.11-3.13);
        # there is no public way to take it without awaiting it.
        pending = getattr(reader, "_buffer", None)
        if not isinstance(pending, bytearray):
            raise RuntimeError("cannot take over this StreamReader (no _buffer)")
        leftover = bytes(pending)
        pending.clear()
        eof = reader.at_eof() or getattr(reader, "_eof", False)
        exc = reader.exception()
        transport.set_protocol(proto)
        if leftover:
            proto._feed(leftover)
        if exc is not None:
            proto.connection_lost(exc)
        elif transport.is_closing():
            proto.connection_lost(None)
        elif eof:
            proto.eof_received()
        else:
            transport.resume_reading()  # the StreamReader may have paused it
        return proto

    # ------------------------------------------------------------------ receiving
    def _feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            buf = self.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is not None:
            return memoryview(self._body)[self._body_n:]
        if self._end == len(self._buf):  # full of an incomplete small frame: compact
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start:self._end]
            self._start, self._end = 0, n
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._error is not None:
            return  # a bad frame came: nothing after it counts
        if self._body is not None:
            self._body_n += nbytes
            if self._body_n == len(self._body):
                body, self._body = self._body, None
                self._push(body)
            return
        self._end += nbytes
        self._parse()

    def _parse(self) -> None:
        buf, head = self._buf, frames.LENGTH.size
        while self._end - self._start >= head:
            try:
                n = frames.parse_length(bytes(buf[self._start:self._start + head]), self.limit)
            except ProtocolError as err:
                self._fail(err)
                return
            have = self._end - self._start - head
            begin = self._start + head
            if have >= n:
                with memoryview(buf) as view:
                    self._push(bytes(view[begin:begin + n]))
                self._start = begin + n
                continue
            if n > SMALL_FRAME_BYTES:  # a large frame: its own buffer, filled in place
                body = self._large_buffer(n)
                body[:have] = buf[begin:self._end]
                self._body, self._body_n = body, have
                self._start = self._end = 0
                return
            if begin + n > len(buf):  # make room for the rest of this small frame
                self._buf[:self._end - self._start] = buf[self._start:self._end]
                self._end -= self._start
                self._start = 0
            return
        if self._start == self._end:
            self._start = self._end = 0

    def _large_buffer(self, n: int) -> bytearray:
        for i, spare in enumerate(self._spares):
            if len(spare) == n:
                return self._spares.pop(i)
        return bytearray(n)

    def recycle(self, body: Payload) -> None:
        """Take back a large frame's buffer that nobody holds any more (the reader has
        decrypted it into another): the next frame of its size is received into it, so
        a stream of 4 MiB chunks needs no new (zeroed) buffer per ciphertext."""
        if isinstance(body, bytearray) and len(body) > SMALL_FRAME_BYTES:
            self._spares.append(body)
            del self._spares[:-SPARE_BUFFERS]

    def _push(self, body: Payload) -> None:
        self._frames.append(body)
        self._queued += len(body)
        if self._queued > MAX_QUEUED_BYTES and not self._read_paused \
                and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, err: BaseException) -> None:
        if self._error is None:
            self._error = err
        self._wake()

    def _partial(self) -> bool:
        return self._body is not None or self._end > self._start

    def eof_received(self) -> bool:
        if self._partial():
            self._fail(ProtocolError("connection closed inside a frame"))
        self._eof = True
        self._wake()
        return True  # the connection closes the transport itself

    async def next_frame(self) -> Payload | None:
        """The next frame body; None at a clean end of stream (between frames). Raises
        ProtocolError (bad length, stream cut inside a frame) or the connection's error,
        after the frames received before it."""
        while not self._frames:
            if self._error is not None:
                raise self._error
            if self._eof:
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        body = self._frames.popleft()
        self._queued -= len(body)
        if self._read_paused and self._queued <= MAX_QUEUED_BYTES // 2 \
                and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        return body

    # ------------------------------------------------------------------ writing
    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)

    async def drain(self) -> None:
        """Wait while the transport holds more than its high-water mark unsent."""
        if self.lost.done():
            raise ConnectionResetError("connection lost")
        if self.transport is not None and self.transport.is_closing():
            await asyncio.sleep(0)  # let connection_lost run
        while self._write_paused:  # woken writers go one by one: each may refill it
            w = self._loop.create_future()
            self._drain_waiters.append(w)
            try:
                await w
            finally:
                self._drain_waiters.remove(w)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._fail(exc)
        elif self._partial():
            self._fail(ProtocolError("connection closed inside a frame"))
        self._eof = True
        self._wake()
        for w in self._drain_waiters:
            if not w.done():
                w.set_exception(exc or ConnectionResetError("connection lost"))
        if not self.lost.done():
            self.lost.set_result(None)


class Call:
    """One request being served: its arguments, and its byte streams both ways."""

    def __init__(self, conn: Connection, req_id: int, method: str, args: dict[str, Any]):
        self.conn = conn
        self.id = req_id
        self.method = method
        self.args = args
        self.incoming: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(DATA_QUEUE_CHUNKS)
        self.replied = False

    def send_data(self, stream: int, chunk: bytes) -> None:
        self.conn.send_data(self.id, stream, chunk)

    def reply_bytes(self, data: Payload) -> None:
        """Answer now with ``data`` as BYTES, sealed before this returns: ``data`` may be a
        view that is only valid for the moment (a blob in the store's map). What the
        handler then returns is not sent."""
        if self.replied:
            raise RuntimeError(f"{self.method}#{self.id} already answered")
        self.replied = True
        self.conn.send_bytes(self.id, data)

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
        self._proto: FrameProtocol | None = None
        self._bytes_for: int | None = None  # a BYTES came: the next frame answers this id

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Connection:
        tune_allocator()
        self._proto = FrameProtocol.take_over(self.reader, self.writer, frames.MAX_FRAME_BYTES)
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
            if self._proto is not None:
                await self._proto.lost  # the transport told its (new) protocol
            else:
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
    def _send(self, body: Payload) -> None:
        """Frame (and seal) ``body`` and hand it to the transport. ``body`` is only read
        during the call: the frame written is always a new buffer of its own."""
        if self.closed.is_set():
            raise PeerError(f"connection to {self.name} is closed: {self.close_reason}")
        if self.channel is not None:
            self.writer.transport.write(self.channel.seal_frame(body))
        else:
            self.writer.transport.write(frames.LENGTH.pack(len(body)) + body)

    async def drain(self) -> None:
        try:
            if self._proto is not None:
                await self._proto.drain()
            else:
                await self.writer.drain()
        except (ConnectionError, RuntimeError) as err:
            self._close(f"write failed: {err}")
            raise PeerError(f"connection to {self.name} lost: {err}") from None

    def send_data(self, req_id: int, stream: int, chunk: bytes) -> None:
        self._send(frames.data(req_id, stream, chunk))

    def send_bytes(self, req_id: int, data: Payload) -> None:
        """Answer request ``req_id`` with the byte string ``data``. A large one goes as a
        BYTES message, then ``data`` as the next frame's whole body (sealed from where it
        lies, no copy); one under SMALL_FRAME_BYTES as an ordinary RESPONSE (one frame,
        not two: most blobs of a hot set are that small)."""
        if len(data) < SMALL_FRAME_BYTES:
            self._send(frames.response(req_id, bytes(data)))
            return
        if len(data) + 64 > frames.MAX_FRAME_BYTES:
            raise ProtocolError(f"{len(data)} bytes do not fit one frame")
        self._send(frames.bytes_header(req_id))
        self._send(data)

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
        assert self._proto is not None
        try:
            while True:
                body = await self._proto.next_frame()
                if body is None:
                    if self._bytes_for is not None:
                        raise ProtocolError("connection closed between BYTES and its body")
                    break
                if self.channel is not None:
                    sealed, body = body, self.channel.open(body)
                    self._proto.recycle(sealed)  # opened into a buffer of its own
                if self._bytes_for is not None:  # the body a BYTES announced
                    req_id, self._bytes_for = self._bytes_for, None
                    fut = self._pending.get(req_id)
                    if fut is not None and not fut.done():
                        fut.set_result(body)
                    continue
                msg = frames.decode_message(body)
                if msg.type == frames.BYTES:
                    self._bytes_for = msg.id
                    continue
                await self._dispatch(msg)
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
                if not self.closed.is_set() and not call.replied:
                    self._send(frames.error(call.id, code, text))
                    await self.drain()
                return
            if not self.closed.is_set():
                if call.replied:
                    pass
                elif isinstance(result, bytes | bytearray | memoryview):
                    self.send_bytes(call.id, result)
                else:
                    self._send(frames.response(call.id, result))
                await self.drain()
        except PeerError:
            pass
        finally:
            self._calls.pop(call.id, None)
