"""The ``swarm`` command line. Each command parses, calls one library function, and prints.

Errors: a ``SwarmError`` prints ``swarm: error: <one line>`` and exits with its class's
code (swarm.errors); anything else is a bug and prints one line too, with the traceback
only when ``SWARM_DEBUG=1``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # `python -m swarm.cli`: the thin client first (swarm.quickcli)
    from swarm.quickcli import try_run as _try_run

    _code = _try_run(sys.argv[1:])
    if _code is not None:
        sys.exit(_code)

# (the thin client above runs before these imports: they are most of its cost)
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from swarm import __version__
from swarm.build.progress import Progress
from swarm.digest import short, to_hex
from swarm.errors import SwarmError, UsageError
from swarm.store import Store

F = TypeVar("F", bound=Callable[..., Any])
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70


def default_state_dir() -> Path:
    from swarm.quickcli import default_state_dir as default  # one rule for both clients

    return Path(default())


def parse_size(text: str) -> int:
    """'512m', '2g', '1024k', '4096' -> bytes (docker's units: powers of 1024)."""
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b") if text else ""
    num = t.rstrip("kmgt")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise UsageError(f"invalid size {text!r}: want a number with an optional k, m, g or "
                         "t suffix") from None
    if value < 0 or unit not in units:
        raise UsageError(f"invalid size {text!r}")
    return int(value * units[unit])


class Context:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            budget = os.environ.get("SWARM_CACHE_BUDGET")
            self._store = Store(self.state_dir / "store",
                                budget_bytes=parse_size(budget) if budget else None)
        return self._store

    def source_stores(self) -> list[Store]:
        """The stores named by $SWARM_BLOB_SOURCES (colon-separated store directories): the
        blob sources this machine fetches missing blobs from, until peers do that."""
        paths = [p for p in os.environ.get("SWARM_BLOB_SOURCES", "").split(":") if p]
        return [Store(p) for p in paths]

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def _progress(label: str) -> tuple[Progress, Callable[[], None]]:
    """A Progress that renders live on a terminal (stderr), and a finisher that prints the
    summary line in every case."""
    prog = Progress(label=label)
    live = None
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        console = Console(stderr=True)
        live = Live(Text(""), console=console, transient=True, refresh_per_second=8)
        live.start()

        def update(p: Progress) -> None:
            live.update(Text(f"{label}: {p.files} files, {p.bytes / 1e6:.1f} MB, "
                             f"{p.rate_bytes_per_s / 1e6:.1f} MB/s"))

        prog.on_update = update

    def finish() -> None:
        if live is not None:
            live.stop()
        click.echo(f"{label}: {prog.summary()}", err=True)

    return prog, finish


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="swarm")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Node state directory (default: $SWARM_STATE_DIR or /var/lib/swarm).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, state_dir: Path | None, verbose: int) -> None:
    """swarm: run Python in containers on a peer-to-peer cluster."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    obj = Context(state_dir or default_state_dir())
    ctx.obj = obj
    ctx.call_on_close(obj.close)


# ---------------------------------------------------------------------------- image
@cli.group()
def image() -> None:
    """Import, list, inspect, export and remove images."""


@image.command("import")
@click.argument("src", type=click.Path(exists=False))
@click.option("-n", "--name", "names", multiple=True, help="NAME[:TAG] for the image.")
@click.pass_obj
def image_import(obj: Context, src: str, names: tuple[str, ...]) -> None:
    """Import SRC: a rootfs directory, a tar (plain, gzip, zstd), an OCI layout or a
    `docker save` tarball. Prints the image id."""
    from swarm.build.importer import import_source
    from swarm.fs.images import parse_name

    for n in names:
        parse_name(n)  # reject a bad name before doing the work
    prog, finish = _progress("import")
    try:
        rec = import_source(obj.store, src, list(names), progress=prog)
    finally:
        finish()
    click.echo(to_hex(rec.id))


@image.command("debootstrap")
@click.argument("suite", default="bookworm")
@click.option("--variant", default="minbase", show_default=True)
@click.option("--include", "include", default="", help="Comma-separated extra packages.")
@click.option("--mirror", default=None, help="Debian mirror (default: deb.debian.org).")
@click.option("-n", "--name", "names", multiple=True, help="NAME[:TAG] for the image.")
@click.pass_obj
def image_debootstrap(obj: Context, suite: str, variant: str, include: str,
                      mirror: str | None, names: tuple[str, ...]) -> None:
    """Build a Debian SUITE root with debootstrap (cached per recipe) and import it."""
    from swarm.build.debootstrap import DEFAULT_MIRROR, ensure_rootfs
    from swarm.build.importer import import_directory
    from swarm.fs.images import parse_name

    for n in names:
        parse_name(n)
    pkgs = [p for p in include.split(",") if p]
    click.echo(f"debootstrap {suite} ({variant}{', ' + ', '.join(pkgs) if pkgs else ''})...",
               err=True)
    root = ensure_rootfs(suite, variant, pkgs, mirror or DEFAULT_MIRROR)
    prog, finish = _progress("import")
    try:
        rec = import_directory(obj.store, root, list(names), progress=prog,
                               source_label=f"debootstrap:{suite}:{variant}:{include}",
                               config={"Cmd": ["/bin/bash"], "Env": [
                                   "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                                   "/sbin:/bin"]})
    finally:
        finish()
    click.echo(to_hex(rec.id))


@image.command("ls")
@click.option("--json", "as_json", is_flag=True, help="JSON list instead of a table.")
@click.pass_obj
def image_ls(obj: Context, as_json: bool) -> None:
    """List images."""
    from swarm.fs import images

    recs = sorted(images.list_images(obj.store), key=lambda r: -r.created)
    if as_json:
        click.echo(json.dumps([r.as_json() for r in recs], indent=2))
        return
    rows = []
    for r in recs:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created))
        for name in r.names or ["<none>"]:
            rows.append((name, short(r.id), str(r.entries), _human(r.content_bytes), created))
    _table(("NAME", "IMAGE ID", "ENTRIES", "SIZE", "CREATED"), rows)


@image.command("inspect")
@click.argument("ref")
@click.option("--entries", is_flag=True, help="Include every index entry.")
@click.pass_obj
def image_inspect(obj: Context, ref: str, entries: bool) -> None:
    """Show an image (by NAME[:TAG], id or id prefix) as JSON."""
    from swarm.fs import images

    image_id = images.resolve(obj.store, ref)
    rec = images.record(obj.store, image_id)
    idx = images.load_index(obj.store, image_id)
    out: dict[str, Any] = rec.as_json()
    out["config"] = idx.config
    hot = images.hot_set(obj.store, image_id)
    out["hot_set"] = to_hex(hot) if hot else None
    out["files"] = sum(1 for e in idx if e.kind == "file")
    out["distinct_contents"] = len(idx.file_digests())
    if entries:
        out["entries_list"] = [_entry_json(e) for e in idx]
    click.echo(json.dumps(out, indent=2))


def _entry_json(e: Any) -> dict[str, Any]:
    d = {"path": os.fsdecode(e.path), "kind": e.kind, "mode": f"{e.mode:04o}", "uid": e.uid,
         "gid": e.gid, "size": e.size, "mtime_ns": e.mtime_ns}
    if e.digest:
        d["digest"] = to_hex(e.digest)
    if e.target is not None:
        d["target"] = os.fsdecode(e.target)
    if e.rdev:
        d["rdev"] = [os.major(e.rdev), os.minor(e.rdev)]
    if e.xattrs:
        d["xattrs"] = {k: v.hex() for k, v in e.xattrs.items()}
    if e.link is not None:
        d["link"] = e.link
    return d


@image.command("export")
@click.argument("ref")
@click.argument("dest")
@click.pass_obj
def image_export(obj: Context, ref: str, dest: str) -> None:
    """Write an image to DEST: a new directory, or a tar when DEST ends in .tar, .tar.gz,
    .tgz or .tar.zst ('-' writes a tar to stdout)."""
    from swarm.fs import images
    from swarm.fs.materialize import export_directory, export_tar

    image_id = images.resolve(obj.store, ref)
    idx = images.load_index(obj.store, image_id)
    tar_kinds = {".tar": "", ".tar.gz": "gz", ".tgz": "gz", ".tar.zst": "zst"}
    comp = next((c for ext, c in tar_kinds.items() if dest.endswith(ext)), None)
    prog, finish = _progress("export")
    try:
        if dest == "-":
            export_tar(obj.store, idx, sys.stdout.buffer, "", prog)
        elif comp is not None:
            tmp = f"{dest}.part-{os.getpid()}"
            try:
                with open(tmp, "wb") as f:
                    export_tar(obj.store, idx, f, comp, prog)
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            export_directory(obj.store, idx, dest, prog)
    finally:
        finish()


@image.command("rm")
@click.argument("refs", nargs=-1, required=True)
@click.pass_obj
def image_rm(obj: Context, refs: tuple[str, ...]) -> None:
    """Remove images (their blobs stay until `swarm cache gc`)."""
    from swarm.fs import images

    for ref in refs:
        rec = images.remove(obj.store, ref)
        click.echo(f"removed {to_hex(rec.id)}")


@image.command("tag")
@click.argument("ref")
@click.argument("name")
@click.pass_obj
def image_tag(obj: Context, ref: str, name: str) -> None:
    """Give image REF another NAME[:TAG]."""
    from swarm.fs import images

    image_id = images.resolve(obj.store, ref)
    images.register(obj.store, images.load_index(obj.store, image_id), [name], source="tag")


# ---------------------------------------------------------------------------- run, ps
@cli.command("run", context_settings={"allow_interspersed_args": False})
@click.option("--rm", is_flag=True, help="Accepted for docker compatibility: swarm never "
              "keeps a stopped container.")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open to the container.")
@click.option("-e", "--env", "env", multiple=True, help="K=V, or K to pass the host's value.")
@click.option("-w", "--workdir", default=None, help="Working directory inside the container.")
@click.option("-u", "--user", default=None, help="USER[:GROUP] or UID[:GID].")
@click.option("--cpus", default=None, help="CPU limit, e.g. 1.5.")
@click.option("-m", "--memory", default=None, help="Memory limit, e.g. 512m, 2g.")
@click.option("--net", "--network", "network", type=click.Choice(["host", "none"]),
              default="host", show_default=True)
@click.option("--entrypoint", default=None, help="Override the image's entrypoint.")
@click.option("--init", is_flag=True, help="Run tini as pid 1 (signals, zombie reaping).")
@click.option("--hostname", default=None)
@click.option("-v", "--volume", "volumes", multiple=True,
              help="Bind mount HOST_PATH:CONTAINER_PATH[:ro].")
@click.argument("image_ref", metavar="IMAGE")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def run(obj: Context, rm: bool, interactive: bool, env: tuple[str, ...], workdir: str | None,
        user: str | None, cpus: str | None, memory: str | None, network: str,
        entrypoint: str | None, init: bool, hostname: str | None,
        volumes: tuple[str, ...], image_ref: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in a new container of IMAGE, like `docker run`; exits with its code."""
    import asyncio

    from swarm.node import Engine, RunOptions
    from swarm.runtime.spec import BindMount, parse_cpus, parse_env, parse_memory

    opts = RunOptions(
        args=list(command), env=parse_env(env, os.environ), cwd=workdir, user=user,
        cpus=parse_cpus(cpus) if cpus else None,
        memory_bytes=parse_memory(memory) if memory else None,
        network="none" if network == "none" else "host", stdin=interactive,
        entrypoint=[entrypoint] if entrypoint is not None else None, init=init,
        hostname=hostname, binds=[BindMount.parse(v) for v in volumes])
    sources = [p for p in os.environ.get("SWARM_BLOB_SOURCES", "").split(":") if p]
    from swarm.cli_node import remote_run

    remote = remote_run(obj.state_dir, image_ref, opts)  # a running node runs it
    if remote is not None:
        sys.exit(remote)

    async def go() -> int:
        async with Engine(obj.state_dir, source=sources[0] if sources else None,
                          mount_idle_s=0) as engine:
            return await engine.async_run(image_ref, opts, forward_signals=True)

    obj.close()  # the engine opens its own handle on the store
    code = asyncio.run(go())
    sys.exit(code)


@cli.command("ps")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ps(obj: Context, as_json: bool) -> None:
    """List running containers."""
    from swarm.cli_node import remote_ps
    from swarm.node import ContainerInfo, cleanup_dead_engines, list_containers

    remote = remote_ps(obj.state_dir)  # the running node's view, when one runs
    if remote is not None:
        items = [ContainerInfo(**c) for c in remote]
    else:
        cleanup_dead_engines(obj.state_dir)  # what crashed `swarm run`s left is not running
        items = list_containers(obj.state_dir)
    if as_json:
        click.echo(json.dumps([c.as_json() for c in items], indent=2))
        return
    rows = []
    for c in items:
        age = time.time() - c.created
        rows.append((c.id, c.image, c.command[:40], f"{age:.0f} s ago", c.status, str(c.pid)))
    _table(("CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PID"), rows)


# ---------------------------------------------------------------------------- cache
@cli.group()
def cache() -> None:
    """Inspect and maintain the local content-addressed cache."""


@cache.command("stats")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def cache_stats(obj: Context, as_json: bool) -> None:
    """Bytes and blobs held, budget, hit counts."""
    st = obj.store.stats()
    if as_json:
        click.echo(json.dumps(st.as_dict(), indent=2))
        return
    budget = _human(st.budget_bytes) if st.budget_bytes else "unlimited"
    lookups = st.hits + st.misses
    rate = f"{100 * st.hits / lookups:.1f} %" if lookups else "-"
    rows = [
        ("store", str(obj.store.path)),
        ("bytes", f"{_human(st.bytes)} ({st.bytes} B) in {st.blobs} blobs, {st.files} chunked"),
        ("on disk", _human(st.disk_bytes)),
        ("budget", budget),
        ("images", str(st.images)),
        ("hits / misses", f"{st.hits} / {st.misses} (hit rate {rate})"),
        ("puts / dedup", f"{st.puts} / {st.dedup}"),
        ("evicted", str(st.evicted)),
    ]
    for k, v in rows:
        click.echo(f"{k:14} {v}")


@cache.command("verify")
@click.option("--repair", is_flag=True, help="Remove corrupt blobs (they are fetched again).")
@click.pass_obj
def cache_verify(obj: Context, repair: bool) -> None:
    """Re-hash every blob; exit 4 if any is corrupt or a chunked file is incomplete."""
    report = obj.store.verify(repair=repair)
    for d in report.corrupt:
        click.echo(f"corrupt {d}")
    for d in report.incomplete:
        click.echo(f"incomplete {d}")
    if report.clean:
        click.echo(f"clean: {report.checked} blobs verified")
        return
    click.echo(f"{len(report.corrupt)} corrupt, {len(report.incomplete)} incomplete of "
               f"{report.checked}" + (f"; removed {report.removed}" if repair else ""))
    sys.exit(4)


@cache.command("drop")
@click.argument("refs", nargs=-1)
@click.option("--force", is_flag=True,
              help="Drop blobs even where no blob source holds a copy (they are then lost).")
@click.pass_obj
def cache_drop(obj: Context, refs: tuple[str, ...], force: bool) -> None:
    """Evict the file contents of images (all images when none is named) from the local
    store, keeping their indexes, so the next start of them is cold. Refuses to drop a blob
    that no blob source ($SWARM_BLOB_SOURCES) holds, unless --force."""
    from swarm.fs import images
    from swarm.fs.hotdir import remove_hot_trees

    ids = [images.resolve(obj.store, r) for r in refs] or [
        r.id for r in images.list_images(obj.store)]
    digests: dict[bytes, None] = {}
    for image_id in ids:
        digests.update(dict.fromkeys(images.load_index(obj.store, image_id).file_digests()))
    sources = obj.source_stores()
    try:
        if not force:
            nowhere = [d for d in digests if obj.store.missing(d) != [d]
                       and not any(src.has(d) for src in sources)]
            if nowhere:
                raise UsageError(
                    f"{len(nowhere)} blobs of these images are held nowhere else "
                    f"(first: {to_hex(nowhere[0])}); set SWARM_BLOB_SOURCES or use --force")
        removed = obj.store.drop(digests)
        for image_id in ids:  # local copies of hot files go too, or the start is not cold
            remove_hot_trees(obj.state_dir, image_id)
    finally:
        for src in sources:
            src.close()
    click.echo(f"dropped {removed} blobs of {len(ids)} images")


@cache.command("gc")
@click.pass_obj
def cache_gc(obj: Context) -> None:
    """Delete blobs that no image references."""
    from swarm.fs import images

    removed, freed = obj.store.gc(images.live_digests(obj.store))
    click.echo(f"removed {removed} blobs, freed {_human(freed)}")


# ---------------------------------------------------------------------------- helpers
def _human(n: int | None) -> str:
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if x < 1000 or unit == "TB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1000
    return str(n)


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    for r in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


from swarm.cli_node import register as _register_node_commands  # noqa: E402

_register_node_commands(cli)  # swarm node / up / join

from swarm.gossip.cli import register as _register_gossip_commands  # noqa: E402

_register_gossip_commands(cli)  # swarm status / peers


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the click group, mapping errors to one line and an exit code."""
    try:
        cli.main(args=argv, prog_name="swarm", standalone_mode=False)
    except SwarmError as err:
        click.echo(f"swarm: error: {err}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("swarm: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("swarm: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as err:
        click.echo(f"swarm: error: {err}", err=True)
        sys.exit(1)
    except Exception as err:  # a bug: one line, traceback on request
        if os.environ.get("SWARM_DEBUG"):
            traceback.print_exc()
        click.echo(f"swarm: internal error: {type(err).__name__}: {err} "
                   "(SWARM_DEBUG=1 shows the traceback)", err=True)
        sys.exit(EXIT_INTERNAL)


from swarm.build.cli import build as _build_command  # noqa: E402 - one click module per area

cli.add_command(_build_command)

if __name__ == "__main__":
    main()
