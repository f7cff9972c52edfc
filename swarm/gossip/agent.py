"""A gossip member on its own, with no store or containers: ``python -m swarm.gossip.agent``.

For network-namespace tests and experiments: it runs one :class:`GossipService` and
rewrites ``--out`` (JSON: this member's name and every member it knows, with state) on
each membership change, so a test can watch a real multi-process cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal

from swarm.gossip.service import GossipService
from swarm.gossip.timing import Timing
from swarm.net.secure import ClusterKey, NodeKey


def _write(path: str, svc: GossipService) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"name": svc.name, "members": svc.peers_json(),
                   "status": svc.status_json()}, f)
    os.replace(tmp, path)


async def _main(args: argparse.Namespace) -> None:
    timing = Timing.quick(args.quick) if args.quick else Timing()
    svc = GossipService(ClusterKey.from_token(args.token), NodeKey.generate(), args.addr,
                        timing=timing, seeds=args.seed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with svc:
        while not stop.is_set():
            _write(args.out, svc)
            svc.changed.clear()
            waits = [asyncio.ensure_future(svc.changed.wait()),
                     asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waits, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--addr", required=True, help="HOST:PORT to bind and advertise")
    ap.add_argument("--token", required=True)
    ap.add_argument("--seed", action="append", default=[])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", type=float, default=0.0, help="scale every period by this")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
