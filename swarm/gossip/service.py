"""The gossip service: the pure :class:`~swarm.gossip.swim.Swim` core on real UDP, push/pull
over the encrypted TCP transport, node state every 2 s, and (optionally) zeroconf.

One task drives the core: it runs due timers, sends what the core queued, starts the
push/pull exchanges it asked for, and sleeps until the next timer or until a datagram
wakes it. The UDP socket binds the same port as the node's TCP listener, so a member has
one address. ``datagram_received`` checks the size first and hands the bytes to the pure
codec and decoder; nothing else on the receive path can raise.

Peer methods served on the TCP transport (add :meth:`GossipService.handlers` to the
node's handlers): ``gossip.sync`` {name, state, blobs} -> {name, state, blobs}: the
caller's full state is merged first, then ours is answered (so a node that learns it was
declared dead answers with its refutation); ``blobs`` is the sender's Bloom filter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from swarm.errors import PeerError, SwarmError, UsageError
from swarm.gossip import state as node_state
from swarm.gossip.codec import DatagramCodec, gossip_key
from swarm.gossip.swim import Member, Status, Swim
from swarm.gossip.timing import Timing
from swarm.net.blobs import Dialer, PeerSource
from swarm.net.rpc import Call, Handler
from swarm.net.secure import ClusterKey, NodeKey
from swarm.net.transport import Transport, format_addr, parse_addr

log = logging.getLogger(__name__)

# A push/pull is a few KiB of state plus a filter; past this the peer is treated as gone.
SYNC_TIMEOUT_S = 10.0
# Hex characters of the node key that name a member in gossip.
NAME_HEX = 16
# How often the Bloom filter of held blobs is rebuilt (it travels in push/pull only).
BLOOM_REBUILD_S = 30.0


class GossipProtocol(asyncio.DatagramProtocol):
    """UDP edge: size check, then the pure codec and the pure core; ``wake`` tells the
    driver there may be packets to send."""

    def __init__(self, codec: DatagramCodec, swim: Swim, wake: Callable[[], None]) -> None:
        self.codec = codec
        self.swim = swim
        self.wake = wake
        self.dropped = 0
        self.received = 0
        self.bytes_received = 0

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.bytes_received += len(data)
        if len(data) > self.codec.max_datagram_bytes:
            self.dropped += 1
            return
        payload = self.codec.open(data)
        if payload is None:
            self.dropped += 1
            return
        self.received += 1
        self.swim.handle_packet(format_addr(str(addr[0]), int(addr[1])), payload)
        self.wake()

    def error_received(self, exc: Exception) -> None:
        log.debug("gossip socket error: %s", exc)  # ICMP unreachable: the probe will tell


class GossipService:
    """Membership for one node. ``addr`` is the advertised ``host:port`` (TCP and UDP);
    ``transport`` is the node's TCP transport (its handlers must include
    :meth:`handlers`), or None to run one of our own (tests, the benchmark)."""

    def __init__(self, cluster: ClusterKey, node: NodeKey, addr: str, *,
                 transport: Transport | None = None, timing: Timing | None = None,
                 sampler: node_state.StateSampler | None = None,
                 seeds: Sequence[str] = (), discovery: bool = False,
                 discovery_interfaces: list[str] | None = None,
                 rng: random.Random | None = None) -> None:
        self.cluster = cluster
        self.node = node
        self.addr = addr
        self.name = node.public.hex()[:NAME_HEX]
        self.timing = timing or Timing()
        self.sampler = sampler
        self.seeds = list(seeds)
        self.discovery_enabled = discovery
        # addresses of the interfaces mDNS runs on (None: all; tests pin loopback)
        self.discovery_interfaces = discovery_interfaces
        self.codec = DatagramCodec(gossip_key(cluster), clock=time.time,
                                   window_s=self.timing.replay_window_s,
                                   max_datagram_bytes=self.timing.max_datagram_bytes)
        self.swim = Swim(self.name, addr, clock=time.monotonic, rng=rng, timing=self.timing,
                         max_payload_bytes=self.codec.max_payload_bytes)
        self.transport = transport
        self._own_transport = transport is None
        self.blooms: dict[str, node_state.BloomFilter] = {}  # member name -> its filter
        self._bloom: node_state.BloomFilter | None = None
        self._bloom_at = 0.0
        self._udp: asyncio.DatagramTransport | None = None
        self.protocol: GossipProtocol | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._syncing: set[str] = set()
        self.bytes_sent = 0
        self.sync_failures = 0
        self._discovery: Any = None
        # set on every membership change or new blob filter (tests await it)
        self.changed = asyncio.Event()
        # called (on the loop) after every membership change: the node keeps the member
        # list its blob fetches use current from here
        self.listeners: list[Callable[[], None]] = []
        self.swim.on_change = self._on_change

    def _on_change(self, _member: Member) -> None:
        self.changed.set()
        for fn in self.listeners:
            fn()

    # ------------------------------------------------------------------ lifecycle
    def handlers(self) -> dict[str, Handler]:
        return {"gossip.sync": self.async_handle_sync}

    async def __aenter__(self) -> GossipService:
        await self.async_start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.async_stop()

    async def async_start(self, bind: str | None = None) -> None:
        """Bind UDP (and TCP when we own the transport) on ``bind`` (default: the
        advertised address), join the seeds, start the driver."""
        host, port = parse_addr(bind or self.addr)
        loop = asyncio.get_running_loop()
        if self.transport is None:
            self.transport = Transport(self.cluster, self.node, self.handlers())
            await self.transport.listen(host, port)
        try:
            udp, proto = await loop.create_datagram_endpoint(
                lambda: GossipProtocol(self.codec, self.swim, self._wake.set),
                local_addr=(host, port))
        except OSError as err:
            raise UsageError(f"cannot bind gossip UDP {format_addr(host, port)}: "
                             f"{err}") from None
        self._udp = udp
        self.protocol = proto
        self.swim.start()
        self.swim.join(self.seeds)
        self._spawn(self._async_drive(), "gossip-drive")
        if self.sampler is not None:
            self._spawn(self._async_sample(), "gossip-state")
        if self.discovery_enabled:
            from swarm.gossip.discovery import Discovery

            self._discovery = Discovery(self)
            try:
                await self._discovery.async_start()
            except Exception as err:  # multicast may be unavailable (clouds): not fatal
                log.warning("zeroconf discovery unavailable: %s", err)
                self._discovery = None

    async def async_stop(self) -> None:
        if self._discovery is not None:
            with contextlib.suppress(Exception):
                await self._discovery.async_stop()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        if self._udp is not None:
            self._udp.close()
        if self._own_transport and self.transport is not None:
            await self.transport.aclose()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def join(self, addrs: Sequence[str]) -> None:
        """Join (push/pull with) these addresses soon: seeds, discovered peers."""
        self.swim.join(addrs)
        self._wake.set()

    # ------------------------------------------------------------------ driving
    async def _async_drive(self) -> None:
        while True:
            self._wake.clear()
            self.swim.tick()
            self._flush()
            deadline = self.swim.next_deadline()
            delay = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def _flush(self) -> None:
        udp = self._udp
        for addr, payload in self.swim.take_outbox():
            if udp is None:
                break
            try:
                host, port = parse_addr(addr)
            except UsageError:
                continue
            data = self.codec.seal(payload)
            self.bytes_sent += len(data)
            udp.sendto(data, (host, port))
        for addr, _join in self.swim.take_syncs():
            if addr not in self._syncing:
                self._syncing.add(addr)
                self._spawn(self._async_sync(addr), f"gossip-sync-{addr}")

    def _blob_filter(self) -> list[Any] | None:
        store = self.sampler.store if self.sampler is not None else None
        if store is None:
            return None
        now = time.monotonic()
        if self._bloom is None or now - self._bloom_at > BLOOM_REBUILD_S:
            try:
                self._bloom = node_state.BloomFilter.of(node_state.held_digests(store))
                self._bloom_at = now
            except Exception as err:
                log.warning("blob filter not built: %s", err)
                return None
        return self._bloom.encode()

    def _take_filter(self, name: object, obj: object) -> None:
        if isinstance(name, str):
            f = node_state.BloomFilter.decode(obj)
            if f is not None:
                self.blooms[name] = f
                self.changed.set()

    async def _async_sync(self, addr: str) -> None:
        try:
            assert self.transport is not None
            conn = await self.transport.connect(addr)
            blobs = await asyncio.to_thread(self._blob_filter)
            res = await conn.request("gossip.sync", {
                "name": self.name, "state": self.swim.local_state(), "blobs": blobs},
                timeout_s=SYNC_TIMEOUT_S)
            if isinstance(res, dict):
                self.swim.merge_state(res.get("state"))
                self._take_filter(res.get("name"), res.get("blobs"))
        except (PeerError, SwarmError, OSError) as err:
            self.sync_failures += 1
            log.debug("push/pull with %s failed: %s", addr, err)
            if self.transport is not None:
                self.transport.drop(addr)
        finally:
            self._syncing.discard(addr)
            self._wake.set()

    async def async_handle_sync(self, call: Call) -> dict[str, Any]:
        self.swim.merge_state(call.args.get("state"))
        self._take_filter(call.args.get("name"), call.args.get("blobs"))
        self._wake.set()
        blobs = await asyncio.to_thread(self._blob_filter)
        return {"name": self.name, "state": self.swim.local_state(), "blobs": blobs}

    async def _async_sample(self) -> None:
        assert self.sampler is not None
        while True:
            try:
                meta = await asyncio.to_thread(self.sampler.sample)
                self.swim.set_meta(meta)
                self._wake.set()
            except Exception as err:
                log.warning("node state not measured: %s", err)
            await asyncio.sleep(self.timing.state_interval_s)

    # ------------------------------------------------------------------ views
    def members(self) -> list[Member]:
        return list(self.swim.members.values())

    def alive_addrs(self) -> list[str]:
        return self.swim.alive_addrs()

    def peers_json(self) -> list[dict[str, Any]]:
        """Every member as ``swarm peers --json`` prints it (this node first)."""
        out = []
        for m in sorted(self.members(), key=lambda m: (m.name != self.name, m.addr)):
            doc = m.as_json()
            doc["self"] = m.name == self.name
            out.append(doc)
        return out

    def status_json(self) -> dict[str, Any]:
        counts = {s.value: 0 for s in Status}
        for m in self.members():
            counts[m.status.value] += 1
        return {"name": self.name, "addr": self.addr, "incarnation": self.swim.me.incarnation,
                "health": self.swim.health, "members": counts,
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.protocol.bytes_received if self.protocol else 0,
                "dropped_datagrams": dict(self.codec.drops),
                "sync_failures": self.sync_failures}

    async def async_wait(self, cond: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``cond()`` holds, re-checking on every membership change."""
        try:
            async with asyncio.timeout(timeout_s):
                while not cond():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            return cond()
        return True

    def rank(self, digest: bytes, addrs: Sequence[str],
             image_id: bytes | None = None) -> list[str]:
        """``addrs`` in the order a fetch of ``digest`` should try them (warm first).
        Called from the blob proxy's thread: it only reads, and a snapshot that races a
        change just ranks by slightly older news."""
        try:
            by_addr = {m.addr: m for m in list(self.swim.members.values())}
        except RuntimeError:  # the dict changed size under us: keep the caller's order
            return list(addrs)
        peers = []
        for a in addrs:
            m = by_addr.get(a)
            peers.append((a, m.meta if m else {}, self.blooms.get(m.name) if m else None))
        return node_state.rank_peers(peers, digest, image_id)


class GossipPeerSource(PeerSource):
    """A :class:`PeerSource` that asks warm peers first: those whose blob filter holds the
    digest, then the warmest and least loaded (:func:`rank_peers`). Its members come from
    gossip (alive and suspect ones), or from ``members`` when given: the node's blob
    proxy, on another thread, passes the member tuple the main loop keeps current."""

    def __init__(self, gossip: GossipService, transport: Dialer,
                 members: Callable[[], Sequence[str]] | None = None, **kw: Any) -> None:
        super().__init__(transport, members or gossip.alive_addrs, **kw)
        self.gossip = gossip

    def candidates(self, digest: bytes) -> list[str]:
        return self.gossip.rank(digest, super().candidates(digest))
