"""Zeroconf discovery: advertise ``_swarm._tcp.local.`` and join peers of our cluster.

The advertisement carries the node's address and the cluster id (a hash of the token,
see :mod:`swarm.net.secure`), never the token: anyone on the LAN may read it. A node
joins (push/pull with) a discovered peer only when the cluster ids match; the encrypted
handshake then proves the peer holds the token, so a forged advertisement costs one
refused connection and admits nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Any

from swarm.net.transport import format_addr, parse_addr

if TYPE_CHECKING:
    from swarm.gossip.service import GossipService

log = logging.getLogger(__name__)

SERVICE_TYPE = "_swarm._tcp.local."
# How long one discovered service's addresses are waited for.
RESOLVE_TIMEOUT_MS = 3000


class Discovery:
    """Owns one AsyncZeroconf: the registration and the browser."""

    def __init__(self, gossip: GossipService) -> None:
        self.gossip = gossip
        self.cluster_hex = gossip.cluster.cluster_id.hex()
        self.found: dict[str, str] = {}  # service name -> address joined
        self._azc: Any = None
        self._browser: Any = None
        self._info: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def async_start(self) -> None:
        from zeroconf import InterfaceChoice, IPVersion
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

        host, port = parse_addr(self.gossip.addr)
        interfaces = self.gossip.discovery_interfaces or InterfaceChoice.All
        self._azc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE, f"{self.gossip.name}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(host)], port=port,
            properties={"cluster": self.cluster_hex, "node": self.gossip.name},
            server=f"swarm-{self.gossip.name}.local.")
        await self._azc.async_register_service(self._info)
        self._browser = AsyncServiceBrowser(self._azc.zeroconf, [SERVICE_TYPE],
                                            handlers=[self._on_change])

    async def async_stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._browser is not None:
            with contextlib.suppress(Exception):
                await self._browser.async_cancel()
        if self._azc is not None:
            with contextlib.suppress(Exception):
                await self._azc.async_unregister_all_services()
            await self._azc.async_close()

    def _on_change(self, zeroconf: Any, service_type: str, name: str,
                   state_change: Any) -> None:
        from zeroconf import ServiceStateChange

        if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return
        task = asyncio.ensure_future(self._async_resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _async_resolve(self, service_type: str, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._azc.zeroconf, RESOLVE_TIMEOUT_MS):
            return
        props = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
                 for k, v in (info.properties or {}).items()}
        if props.get("cluster") != self.cluster_hex or props.get("node") == self.gossip.name:
            return  # another cluster, or ourselves
        addrs = info.parsed_addresses()
        if not addrs or info.port is None:
            return
        addr = format_addr(addrs[0], info.port)
        if self.found.get(name) == addr:
            return
        self.found[name] = addr
        log.info("discovered member %s at %s", props.get("node"), addr)
        self.gossip.join([addr])
