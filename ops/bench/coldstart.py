#!/usr/bin/env python3
"""Cold-start benchmark: `python3 -c 'import numpy'` in a container of a Debian bookworm +
python3-numpy image, started five ways in one run (median of --runs each):

  native warm / cold   runc over an overlay of the exported rootfs directory, page cache
                       warm / dropped before each run
  pull baseline        stream a zstd tar of the image over loopback HTTP, extract it, runc
  swarm warm           blobs local, image mount already up (the usual second start)
  swarm cold           local blobs dropped, page cache dropped, fresh mount: every file
                       read is fetched from the blob source (another store on this machine)
  swarm cold + hot set the same, with the hot set recorded by an earlier run prefetched

then the ratios and the FUSE operations that reached the daemon, by kind. Goals (issue 3):
swarm warm within 1.15x of native warm; swarm cold within 1.5x of native cold; swarm cold
at least 8x faster than the pull baseline. Needs root.

    .venv/bin/python ops/bench/coldstart.py [--runs 5]
    .venv/bin/python ops/bench/coldstart.py --peers [--runs 3] [--mib 256]   (issue 5:
        the cold start with blobs from a peer over a veth; see coldstart_peers.py)
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.server
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.bench.common import drop_page_cache, row, verdict
from swarm.build.debootstrap import ensure_rootfs
from swarm.build.importer import import_directory
from swarm.fs import images
from swarm.fs.hotdir import remove_hot_trees
from swarm.fs.materialize import export_directory, export_tar
from swarm.node import Engine, RunOptions
from swarm.runtime import overlay as overlay_mod
from swarm.runtime.runc import Runc
from swarm.runtime.spec import ContainerSpec
from swarm.store import Store

WORKLOAD = ["python3", "-c", "import numpy"]
IMAGE = "bench/numpy:latest"


async def timed_runs(runs: int, setup: Callable[[], Any] | None,
                     fn: Callable[[], Awaitable[int]]) -> list[float]:
    times = []
    for _ in range(runs):
        if setup is not None:
            r = setup()
            if asyncio.iscoroutine(r):
                await r
        t0 = time.perf_counter()
        code = await fn()
        times.append(time.perf_counter() - t0)
        if code != 0:
            raise SystemExit(f"workload exited {code}")
    return times


def fmt(times: list[float]) -> str:
    return f"runs {[round(t, 3) for t in times]}"


async def native_run(runc: Runc, rootfs: Path, work: Path, image_config: dict[str, Any]) -> int:
    cdir = work / "native-c"
    ov = overlay_mod.mount_overlay([rootfs], cdir)
    try:
        spec = ContainerSpec(rootfs=ov.merged, args=WORKLOAD)
        return await runc.async_run(spec, image_config, stdout=subprocess.DEVNULL)
    finally:
        ov.unmount(remove=True)
        shutil.rmtree(cdir, ignore_errors=True)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


async def main_async(args: argparse.Namespace) -> None:
    print("preparing the image (debootstrap cached after the first run)...", flush=True)
    rootfs_src = ensure_rootfs(include=["python3-numpy"])
    work = Path(tempfile.mkdtemp(prefix="swarm-bench-cold-", dir="/var/tmp"))
    state = work / "state"
    origin = work / "origin"
    srv = None
    try:
        with Store(origin) as o:
            rec = import_directory(o, rootfs_src, [IMAGE])
        with Store(state / "store") as s:
            import_directory(s, rootfs_src, [IMAGE])
            index = images.load_index(s, rec.id)
            export_directory(s, index, work / "rootfs")
            with open(work / "image.tar.zst", "wb") as f:
                export_tar(s, index, f, "zst")
        size_mb = index.content_bytes() / 1e6
        tar_mb = (work / "image.tar.zst").stat().st_size / 1e6
        print(f"image: {len(index)} entries, {size_mb:.0f} MB; zstd tar {tar_mb:.0f} MB",
              flush=True)
        runc = Runc(work / "native")
        cfg = index.config
        results: dict[str, list[float]] = {}

        # native ----------------------------------------------------------------
        await native_run(runc, work / "rootfs", work, cfg)  # warm the page cache
        results["native warm"] = await timed_runs(
            args.runs, None, lambda: native_run(runc, work / "rootfs", work, cfg))
        results["native cold"] = await timed_runs(
            args.runs, drop_page_cache, lambda: native_run(runc, work / "rootfs", work, cfg))

        # pull baseline -----------------------------------------------------------
        srv, port = serve(work)
        pulled = work / "pulled"

        def pull_setup() -> None:
            shutil.rmtree(pulled, ignore_errors=True)
            drop_page_cache()

        async def pull_and_run() -> int:
            pulled.mkdir()
            proc = await asyncio.create_subprocess_shell(
                f"curl -sf http://127.0.0.1:{port}/image.tar.zst | zstd -dcq | "
                f"tar -x --xattrs --xattrs-include='*' -C {pulled}")
            if await proc.wait() != 0:
                raise SystemExit("pull failed")
            return await native_run(runc, pulled, work, cfg)

        results["pull baseline"] = await timed_runs(args.runs, pull_setup, pull_and_run)
        shutil.rmtree(pulled, ignore_errors=True)

        opts = RunOptions(args=WORKLOAD)
        file_digests = index.file_digests()

        # swarm warm ---------------------------------------------------------------
        async with Engine(state, source=origin, mount_idle_s=3600) as engine:
            # the first start mounts, warms the kernel caches and records the hot set,
            # which later starts of the image on this node serve from a local hot tree
            await engine.mounts.acquire(rec.id)
            await engine.async_run(IMAGE, opts, stdout=subprocess.DEVNULL)
            await engine.mounts.control(rec.id, "save-hotset")
            await engine.mounts.release(rec.id)
            await engine.async_run(IMAGE, opts, stdout=subprocess.DEVNULL)  # builds the tree
            await engine.mounts.control(rec.id, "reset")
            results["swarm warm"] = await timed_runs(
                args.runs, None, lambda: engine.async_run(IMAGE, opts,
                                                          stdout=subprocess.DEVNULL))
            warm_ops = (await engine.mounts.stats(rec.id))["ops"]

        # swarm cold (no hot set) ----------------------------------------------------
        def make_cold() -> None:
            with Store(state / "store") as s:
                s.drop(file_digests)
                with s.env.begin(write=True) as txn:
                    txn.delete(rec.id, db=s.db["hotsets"])
            remove_hot_trees(state, rec.id)
            drop_page_cache()

        cold_ops: dict[str, Any] = {}
        cold_fetch: dict[str, Any] = {}
        async with Engine(state, source=origin, mount_idle_s=0, prefetch=False) as engine:
            times = []
            for _ in range(args.runs):
                make_cold()
                t0 = time.perf_counter()
                lower = await engine.mounts.acquire(rec.id)  # count ops before release
                try:
                    code = await engine.async_run(IMAGE, opts, stdout=subprocess.DEVNULL)
                    times.append(time.perf_counter() - t0)
                    st = await engine.mounts.stats(rec.id)
                    cold_ops, cold_fetch = st["ops"], st.get("fetch") or {}
                    await engine.mounts.control(rec.id, "save-hotset")
                finally:
                    await engine.mounts.release(rec.id)
                if code != 0:
                    raise SystemExit(f"workload exited {code}")
                del lower
            results["swarm cold"] = times

        # swarm cold with the hot set recorded above ------------------------------------
        def make_cold_keep_hot_set() -> None:
            with Store(state / "store") as s:
                s.drop(file_digests)
            remove_hot_trees(state, rec.id)
            drop_page_cache()

        async with Engine(state, source=origin, mount_idle_s=0, prefetch=True) as engine:
            hot = images.hot_set(engine.store, rec.id)
            if hot is None:
                raise SystemExit("no hot set was recorded by the cold runs")
            results["swarm cold + hot set"] = await timed_runs(
                args.runs, make_cold_keep_hot_set,
                lambda: engine.async_run(IMAGE, opts, stdout=subprocess.DEVNULL))

        # report ---------------------------------------------------------------------
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"\ncontainer start + `{' '.join(WORKLOAD)}`, median of {args.runs}:")
        for k, v in results.items():
            row(k, f"{med[k] * 1000:.0f} ms", fmt(v))
        print("\nratios:")
        r_warm = med["swarm warm"] / med["native warm"]
        r_cold = med["swarm cold"] / med["native cold"]
        r_hot = med["swarm cold + hot set"] / med["native cold"]
        r_pull = med["pull baseline"] / med["swarm cold"]
        row("swarm warm / native warm", f"{r_warm:.2f}x")
        row("swarm cold / native cold", f"{r_cold:.2f}x")
        row("swarm cold + hot set / native cold", f"{r_hot:.2f}x")
        row("pull baseline / swarm cold (speed-up)", f"{r_pull:.1f}x")
        print("\nFUSE operations that reached the daemon, one start:")
        per = {k: round(v / args.runs, 1) for k, v in warm_ops.items()}  # over the runs
        row("warm start (mount up)", f"{sum(per.values()):g}",
            " ".join(f"{k}={v:g}" for k, v in sorted(per.items())))
        row("cold start (fresh mount)", str(sum(cold_ops.values())),
            " ".join(f"{k}={v}" for k, v in sorted(cold_ops.items())))
        row("cold start: blobs fetched from the source", str(cold_fetch.get("leaves", "?")),
            str(cold_fetch))
        print()
        verdict("swarm warm within 1.15x of native warm", r_warm <= 1.15, f"{r_warm:.2f}x")
        verdict("swarm cold within 1.5x of native cold", r_cold <= 1.5, f"{r_cold:.2f}x")
        verdict("swarm cold >= 8x faster than pull", r_pull >= 8, f"{r_pull:.1f}x")
    finally:
        if srv is not None:
            srv.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    argv = sys.argv[1:]
    if "--peers" in argv:  # that benchmark, with the rest of the arguments (and its --help)
        from ops.bench import coldstart_peers

        coldstart_peers.main([a for a in argv if a != "--peers"])
        return
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--peers", action="store_true",
                    help="the cold start with node B's blobs coming from node A over a veth, "
                    "and peer vs HTTP throughput: runs ops/bench/coldstart_peers.py")
    asyncio.run(main_async(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
