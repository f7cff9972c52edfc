"""The gossip service on real loopback sockets (UDP + the encrypted TCP transport), with
quick timings: join, state gossip, push/pull of blob filters, kill detection, and a node
with the wrong token never admitted. Waits are on membership-change events, not sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from swarm.gossip.service import GossipPeerSource, GossipService
from swarm.gossip.state import StateSampler
from swarm.gossip.swim import Status
from swarm.gossip.timing import Timing
from swarm.net.secure import ClusterKey, NodeKey

QUICK = Timing.quick(0.05, push_pull_interval_s=0.3, state_interval_s=0.1)
WAIT_S = 20.0


def free_port() -> int:
    """A port free for both TCP and UDP on loopback."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


@contextlib.asynccontextmanager
async def gossip_node(cluster: ClusterKey, seeds: tuple[str, ...] = (),
                      sampler: StateSampler | None = None) -> AsyncIterator[GossipService]:
    svc = GossipService(cluster, NodeKey.generate(), f"127.0.0.1:{free_port()}",
                        timing=QUICK, seeds=seeds, sampler=sampler)
    await svc.async_start()
    try:
        yield svc
    finally:
        await svc.async_stop()


def sees(svc: GossipService, name: str, status: Status) -> bool:
    m = svc.swim.members.get(name)
    return m is not None and m.status is status


def test_loopback_cluster_join_state_kill_and_wrong_key() -> None:
    async def main() -> None:
        cluster = ClusterKey.generate()
        sampler = StateSampler(containers=lambda: 3, gpus=lambda: [])
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(gossip_node(cluster))
            b = await stack.enter_async_context(gossip_node(cluster, (a.addr,), sampler))
            c = await stack.enter_async_context(gossip_node(cluster, (b.addr,)))
            nodes = [a, b, c]
            for n in nodes:
                assert await n.async_wait(lambda n=n: n.swim.num_members() == 3, WAIT_S)
            # b's state reaches a by gossip
            assert await a.async_wait(
                lambda: a.swim.members[b.name].meta.get("ctr") == 3, WAIT_S)

            # a stranger with another token: its push/pull fails the handshake and its
            # datagrams fail authentication
            evil = await stack.enter_async_context(
                gossip_node(ClusterKey.generate(), (a.addr,)))
            evil.swim._alive(a.name, a.addr, 1, {})
            await evil.async_wait(lambda: sees(evil, a.name, Status.DEAD), WAIT_S)
            assert all(evil.name not in n.swim.members for n in nodes)
            assert a.codec.drops.get("authentication", 0) > 0

            # kill c without a goodbye: a and b declare it dead
            await c.async_stop()
            for n in (a, b):
                assert await n.async_wait(lambda n=n: sees(n, c.name, Status.DEAD), WAIT_S)
            assert sees(a, b.name, Status.ALIVE) and sees(b, a.name, Status.ALIVE)
            st = a.status_json()
            assert st["members"] == {"alive": 2, "suspect": 0, "dead": 1}
            assert st["bytes_sent"] > 0 and st["bytes_received"] > 0

    asyncio.run(main())


def test_sync_carries_blob_filters(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from swarm.digest import hash_bytes
    from swarm.store import Store

    async def main() -> None:
        cluster = ClusterKey.generate()
        with Store(tmp_path / "s") as store:
            d = store.put(b"a blob only b holds")
            sampler = StateSampler(store=store, gpus=lambda: [])
            async with contextlib.AsyncExitStack() as stack:
                a = await stack.enter_async_context(gossip_node(cluster))
                b = await stack.enter_async_context(gossip_node(cluster, (a.addr,), sampler))
                assert await a.async_wait(lambda: b.name in a.blooms, WAIT_S)
                assert d in a.blooms[b.name]
                assert a.rank(d, ["127.0.0.1:1", b.addr]) == [b.addr, "127.0.0.1:1"]
                assert a.rank(hash_bytes(b"nobody"), [b.addr]) == [b.addr]
                # the source a node's blob proxy fetches through asks the holder first,
                # whichever member the digest's rotation would have started at
                for order in (("127.0.0.1:1", b.addr), (b.addr, "127.0.0.1:1")):
                    src = GossipPeerSource(a, a.transport, members=lambda o=order: o)
                    assert src.candidates(d)[0] == b.addr
                    src.suspect(b.addr, "a test")  # a suspect holder is not asked at all
                    assert src.candidates(d) == ["127.0.0.1:1"]

    asyncio.run(main())


@pytest.mark.parametrize("n", [4])
def test_loopback_join_reaches_everyone(n: int) -> None:
    async def main() -> None:
        cluster = ClusterKey.generate()
        async with contextlib.AsyncExitStack() as stack:
            first = await stack.enter_async_context(gossip_node(cluster))
            nodes = [first]
            for _ in range(n - 1):
                nodes.append(await stack.enter_async_context(
                    gossip_node(cluster, (nodes[-1].addr,))))
            for x in nodes:
                assert await x.async_wait(lambda x=x: x.swim.num_members() == n, WAIT_S)

    asyncio.run(main())


def test_zeroconf_discovery_joins_same_cluster_only() -> None:
    """mDNS pinned to loopback: two members of one cluster find each other with no seed;
    a node of another cluster is seen and ignored (its cluster id differs)."""

    async def main() -> None:
        cluster = ClusterKey.generate()

        def make(c: ClusterKey) -> GossipService:
            return GossipService(c, NodeKey.generate(), f"127.0.0.1:{free_port()}",
                                 timing=QUICK, discovery=True,
                                 discovery_interfaces=["127.0.0.1"])

        async with contextlib.AsyncExitStack() as stack:
            a, b, other = make(cluster), make(cluster), make(ClusterKey.generate())
            for svc in (a, b, other):
                await svc.async_start()
                stack.push_async_callback(svc.async_stop)
            assert await a.async_wait(lambda: b.name in a.swim.members, WAIT_S)
            assert await b.async_wait(lambda: a.name in b.swim.members, WAIT_S)
            assert a._discovery is not None
            assert other.name not in a.swim.members
            assert other.addr not in a._discovery.found.values()

    asyncio.run(main())
