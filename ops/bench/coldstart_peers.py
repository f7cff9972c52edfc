#!/usr/bin/env python3
"""Cold start from a peer, and peer blob throughput, between two real nodes in network
namespaces joined by a veth bridge (ops/netns-cluster), in one run:

  native cold        runc over an overlay of the exported rootfs, page cache dropped
  peers cold         `swarm run` on node B, whose store is empty (no image, no blobs, page
                     cache dropped): the index, the hot set recorded on node A, and every
                     file read come from node A over the veth, encrypted and verified
  CLI start          `swarm run` of an image nobody has, on node B (the node asks node A
                     and answers "not found"): the part of "peers cold" that is the CLI
                     process and one request, not the image or the container

  peer throughput    node B's PeerSource pulling a 256 MiB file's chunks from node A
                     (4 in flight; ChaCha20-Poly1305 and BLAKE3 verification included)
  HTTP throughput    curl of the same bytes from a plain python HTTP server on node A

Goals (issue 5): peers cold within 1.5x of native cold; peer throughput at least 0.5x of
HTTP. Needs root. This is the `--peers` variant of ops/bench/coldstart.py (a sibling
script, so the two benchmarks stay independent; `coldstart.py --peers` runs this one).

    .venv/bin/python ops/bench/coldstart_peers.py [--runs 3] [--mib 256]
    .venv/bin/python ops/bench/coldstart.py --peers [--runs 3] [--mib 256]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.bench.common import drop_page_cache, row, verdict
from ops.netns_cluster import NODE_PORT, Cluster
from swarm.build.debootstrap import ensure_rootfs
from swarm.build.importer import import_directory
from swarm.errors import NotFound
from swarm.fs import images
from swarm.fs.hotdir import remove_hot_trees
from swarm.fs.materialize import export_directory
from swarm.fs.source import WRITE_BEHIND_S
from swarm.runtime.runc import Runc
from swarm.store import Store

WORKLOAD = ["python3", "-c", "import numpy"]
CLI_START = "CLI start (swarm run of an unknown image)"
IMAGE = "bench/numpy:latest"
HTTP_PORT = 8080
SUBNET = "10.231.250"

# Runs in node B's namespace: fetch every chunk of a file from node A through PeerSource.
PULL = """
import asyncio, sys, time
from swarm.net.blobs import PeerSource
from swarm.net.secure import ClusterKey, NodeKey
from swarm.net.transport import Transport
from swarm.store.cas import Manifest

async def main(token, addr, digest_hex, par):
    t = Transport(ClusterKey.from_token(token), NodeKey.generate(), {})
    src = PeerSource(t, lambda: [addr])
    man = await src.fetch_manifest(bytes.fromhex(digest_hex))
    chunks = list(man.chunks)
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(par)
    async def one(c):
        async with sem:
            return len(await src.fetch(c))
    n = sum(await asyncio.gather(*(one(c) for c in chunks)))
    dt = time.perf_counter() - t0
    await t.aclose()
    print(n, dt)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


def timed(cmd: list[str], expect: int = 0) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != expect:
        raise SystemExit(f"{cmd} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return dt


def make_cold(state: Path) -> None:
    """Node B forgets the image and every blob, as if it had never seen it. Its blob proxy
    stores what it fetched behind its readers (swarm.fs.source.WRITE_BEHIND_S after the
    last fetch): first wait until the store has stopped growing, or those writes land
    after the gc and the next run finds the hot set local (every other run was warm)."""
    _wait_store_quiet(state / "store")
    with Store(state / "store") as s:
        for rec in images.list_images(s):
            images.remove(s, to_ref(rec.id))
            remove_hot_trees(state, rec.id)
        s.gc(set())
    drop_page_cache()


def _wait_store_quiet(path: Path, quiet_s: float = 4 * WRITE_BEHIND_S,
                      limit_s: float = 20.0) -> None:
    def size() -> tuple[int, int]:
        with Store(path) as s:
            st = s.stats()
        return st.blobs, st.bytes

    deadline = time.monotonic() + limit_s
    last, since = size(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = size()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


def to_ref(image_id: bytes) -> str:
    return image_id.hex()


async def native_cold(runs: int, rootfs: Path, work: Path, cfg: dict[str, object]) -> list[float]:
    from ops.bench.coldstart import native_run  # the same baseline as coldstart.py

    runc = Runc(work / "native")
    times = []
    for _ in range(runs):
        drop_page_cache()
        t0 = time.perf_counter()
        if await native_run(runc, rootfs, work, cfg) != 0:
            raise SystemExit("native run failed")
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=256)
    args = ap.parse_args(argv)
    print("preparing the image (debootstrap cached after the first run)...", flush=True)
    rootfs_src = ensure_rootfs(include=["python3-numpy"])
    work = Path(tempfile.mkdtemp(prefix="swarm-bench-peers-", dir="/var/tmp"))
    c = Cluster("bench", work / "cluster", SUBNET)
    http = None
    os.environ["SWARM_MOUNT_IDLE_S"] = "0"  # every run mounts afresh
    try:
        c.up(2, {})
        a, b = Path(c.node(1)["state_dir"]), Path(c.node(2)["state_dir"])
        with Store(a / "store") as s:
            rec = import_directory(s, rootfs_src, [IMAGE])
            index = images.load_index(s, rec.id)
            export_directory(s, index, work / "rootfs")
        swarm = [sys.executable, "-m", "swarm.cli"]
        # node A runs it once: its mount records the hot set that cold nodes prefetch
        timed(["nsenter", f"--net=/run/netns/{c.netns(1)}", "--", "env",
               f"SWARM_STATE_DIR={a}", *swarm, "run", IMAGE, *WORKLOAD])
        with Store(a / "store") as s:
            hot = images.hot_set(s, rec.id)
        print(f"image: {len(index)} entries, {index.content_bytes() / 1e6:.0f} MB; hot set "
              f"{'recorded' if hot else 'MISSING'}", flush=True)

        results: dict[str, list[float]] = {}
        results["native cold"] = asyncio.run(native_cold(args.runs, work / "rootfs", work,
                                                         index.config))
        in_b = ["nsenter", f"--net=/run/netns/{c.netns(2)}", "--", "env",
                f"SWARM_STATE_DIR={b}"]
        peers = []
        for _ in range(args.runs):
            make_cold(b)
            peers.append(timed([*in_b, *swarm, "run", IMAGE, *WORKLOAD]))
        results["peers cold"] = peers
        results[CLI_START] = [timed([*in_b, *swarm, "run", "bench/nobody-has:this", "true"],
                                    expect=NotFound.exit_code) for _ in range(args.runs)]

        # throughput ------------------------------------------------------------------
        blob = work / "www" / "blob.bin"
        blob.parent.mkdir()
        with open(blob, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        with Store(a / "store") as s:
            digest, _size = s.put_file(blob)
        token = c.doc["token"]
        out = subprocess.run([*in_b, sys.executable, "-c", PULL, token,
                              f"{c.ip(1)}:{NODE_PORT}", digest.hex(), "4"],
                             capture_output=True, text=True, check=True).stdout.split()
        peer_mbs = int(out[0]) / float(out[1]) / 1e6
        http = subprocess.Popen(["nsenter", f"--net=/run/netns/{c.netns(1)}", "--",
                                 sys.executable, "-u", "-m", "http.server", str(HTTP_PORT),
                                 "--bind", c.ip(1), "-d", str(blob.parent)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert http.stdout is not None
        http.stdout.readline()  # "Serving HTTP on ..." once it listens
        url = f"http://{c.ip(1)}:{HTTP_PORT}/blob.bin"
        drop_page_cache()
        timed([*in_b, "curl", "-sf", "-o", "/dev/null", url])  # warm the server's cache
        t_http = timed([*in_b, "curl", "-sf", "-o", "/dev/null", url])
        http_mbs = args.mib * (1 << 20) / t_http / 1e6

        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"\ncontainer start + `{' '.join(WORKLOAD)}`, median of {args.runs}:")
        for k, v in results.items():
            row(k, f"{med[k] * 1000:.0f} ms", f"runs {[round(t, 3) for t in v]}")
        r_cold = med["peers cold"] / med["native cold"]
        r_cold_net = (med["peers cold"] - med[CLI_START]) / \
            med["native cold"]
        print("\nthroughput over the veth:")
        row("peer blobs (encrypted, verified)", f"{peer_mbs:.0f} MB/s")
        row("plain HTTP (curl, python http.server)", f"{http_mbs:.0f} MB/s")
        r_tp = peer_mbs / http_mbs
        print("\nratios:")
        row("peers cold / native cold", f"{r_cold:.2f}x")
        row("peers cold less CLI start / native cold", f"{r_cold_net:.2f}x")
        row("peer / HTTP throughput", f"{r_tp:.2f}x")
        print()
        verdict("peers cold within 1.5x of native cold", r_cold <= 1.5, f"{r_cold:.2f}x")
        verdict("peer throughput >= 0.5x HTTP", r_tp >= 0.5, f"{r_tp:.2f}x")
    except BaseException:
        for n in c.doc.get("nodes", []):  # what the nodes said, before down removes it
            proc = c.procs.get(n["index"])
            print(f"node {n['index']}: exit status {proc.poll() if proc else '?'}")
            with contextlib.suppress(OSError):
                print(f"--- node {n['index']} log ---\n{Path(n['log']).read_text()[-3000:]}")
            for f in Path(n["state_dir"]).glob("engines/*/run/*.log"):
                print(f"--- {f} ---\n{f.read_text()[-3000:]}")
        raise
    finally:
        if http is not None:
            http.kill()
            http.wait()
        c.down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
