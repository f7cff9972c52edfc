"""The image builder: Dockerfile stages and Python recipes -> image indexes, step by step.

A build is a chain of states. A state is an image (its entries) plus the config the next
step runs under; metadata instructions (ENV, WORKDIR, USER, CMD ...) only change the
config, so they cost nothing and materialize no image until a later step needs one.

- RUN starts a container (runc, host network) over an overlay whose lower is the parent
  image's lazy FUSE mount; when it exits, its upper directory is applied onto the parent's
  entries (``swarm.build.upper``): new and changed files stored, whiteouts and opaque
  directories applied as deletions.
- COPY and ADD need no container: the context's files are stored and their entries put
  into the parent's entries directly (ADD of a local archive reads it as a tar layer).
- Every content step has a key (``swarm.build.cache.step_key``): the parent image id, the
  config, the instruction after substitution, and the digests of files it copies. A hit
  takes the cached image and starts nothing.

Errors name the Dockerfile and the line: ``Dockerfile:7: RUN: exited with code 2``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import shutil
import stat as statmod
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from swarm.build import context as ctxmod
from swarm.build.cache import LayerCache, step_key
from swarm.build.dockerfile import (
    Dockerfile,
    Instruction,
    Lexer,
    LexError,
    heredoc_alone,
    parse_file,
)
from swarm.build.layers import (
    ARCHIVE_ERRORS,
    TreeBuilder,
    decompress,
    open_tar_stream,
    peek,
    sniff_compression,
)
from swarm.build.upper import UpperStats, apply_upper, renumber_links
from swarm.digest import short, to_hex
from swarm.errors import BuildError, ImportRefused, NotFound, UsageError
from swarm.fs import images
from swarm.fs.index import Entry, Index
from swarm.store import Store
from swarm.store.cas import Batch

DEFAULT_SHELL = ["/bin/sh", "-c"]
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DIR_MODE = 0o755
FILE_MODE = 0o644
# A step that prints nothing for this long gets a "still running" line.
HEARTBEAT_S = 15.0
MAX_SYMLINK_HOPS = 40
TAR_MAGIC_OFFSET = 257
TAR_MAGIC = b"ustar"
TAR_SNIFF_BYTES = 512
DEBIAN_SLIM = "debian_slim"
# BuildKit's automatic platform ARGs (swarm builds linux/amd64 only).
PLATFORM_ARGS = {"TARGETPLATFORM": "linux/amd64", "TARGETOS": "linux", "TARGETARCH": "amd64",
                 "TARGETVARIANT": "", "BUILDPLATFORM": "linux/amd64", "BUILDOS": "linux",
                 "BUILDARCH": "amd64", "BUILDVARIANT": ""}
NS_PER_S = 1_000_000_000
DURATION_UNITS_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": NS_PER_S, "m": 60 * NS_PER_S,
                     "h": 3600 * NS_PER_S}
SCRATCH_ROOT = Entry(b"/", "dir", DIR_MODE)


@dataclass
class State:
    """Where a stage stands: the image holding its entries, and the config now in force
    (which differs from that image's own config after metadata-only instructions)."""

    image_id: bytes
    config: dict[str, Any]
    name: str | None = None
    args: dict[str, str] = field(default_factory=dict)  # ARGs declared in this stage
    cmd_set: bool = False  # a CMD in this stage (ENTRYPOINT then keeps it)

    def env(self) -> dict[str, str]:
        """What ``$VAR`` sees: the stage's ARGs, with ENV winning (as in Docker)."""
        out = dict(self.args)
        out.update(env_dict(self.config))
        return out


def env_dict(config: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in config.get("Env") or []:
        k, _, v = str(item).partition("=")
        out[k] = v
    return out


def set_env(config: dict[str, Any], key: str, value: str) -> None:
    env = list(config.get("Env") or [])
    for i, item in enumerate(env):
        if str(item).partition("=")[0] == key:
            env[i] = f"{key}={value}"
            break
    else:
        env.append(f"{key}={value}")
    config["Env"] = env


@dataclass
class BuildResult:
    image_id: bytes
    names: list[str]
    steps: int
    cached: int
    seconds: float


class Builder:
    """Builds images into the store under ``state_dir``. Use as an async context manager;
    an embedded node (Engine) is started only when a RUN step misses the cache."""

    def __init__(self, state_dir: str | os.PathLike[str], *, no_cache: bool = False,
                 out: TextIO | None = None, quiet: bool = False) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.no_cache = no_cache
        self.out = out if out is not None else sys.stderr
        self.quiet = quiet
        self._stack = contextlib.AsyncExitStack()
        self._engine: Any = None
        self.store: Store
        self.cache: LayerCache
        self.steps = 0
        self.cached = 0
        self.index_seconds = 0.0  # time spent indexing RUN upper dirs (benchmark)
        self.index_bytes = 0

    async def __aenter__(self) -> Builder:
        await self._stack.__aenter__()
        self.store = Store(self.state_dir / "store")
        self._stack.callback(self.store.close)
        self.cache = LayerCache(self.state_dir, self.store)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _get_engine(self) -> Any:
        if self._engine is None:
            from swarm.node import Engine  # the runtime is needed only for RUN misses

            self._engine = await self._stack.enter_async_context(
                Engine(self.state_dir, mount_idle_s=0, prefetch=False, hot_trees=False))
        return self._engine

    # ------------------------------------------------------------------ output
    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.out, flush=True)

    # ------------------------------------------------------------------ images
    def load(self, image_id: bytes) -> Index:
        return images.load_index(self.store, image_id)

    def materialize(self, state: State, source: str) -> bytes:
        """The image id of ``state`` (registering an image when the config changed)."""
        idx = self.load(state.image_id)
        if idx.config == state.config:
            return state.image_id
        new = Index(idx.entries, state.config)
        if new.image_id == state.image_id:
            return state.image_id
        images.register(self.store, new, [], source=source)
        return new.image_id

    def register_entries(self, entries: Sequence[Entry] | Mapping[bytes, Entry],
                         config: dict[str, Any], source: str) -> bytes:
        values = entries.values() if isinstance(entries, Mapping) else entries
        index = Index(renumber_links(values), config)
        images.register(self.store, index, [], source=source)
        return index.image_id

    def scratch(self) -> bytes:
        index = Index([SCRATCH_ROOT], {})
        images.register(self.store, index, [], source="scratch")
        return index.image_id

    def debian_slim(self, include: Sequence[str] = ("python3",)) -> bytes:
        """A debootstrap bookworm minbase (with ``include``), imported once per recipe."""
        from swarm.build.debootstrap import ensure_rootfs
        from swarm.build.importer import import_directory

        include = sorted(set(include))
        key = step_key("debian_slim", "bookworm", "minbase", include)
        if not self.no_cache and (hit := self.cache.get(key)) is not None:
            return hit
        self.say(f"--> debootstrap bookworm minbase{' + ' + ','.join(include) if include else ''}"
                 " (built once per recipe)")
        tree = ensure_rootfs("bookworm", "minbase", include)
        rec = import_directory(self.store, tree, [], source_label=f"debian_slim:{tree.name}",
                               config={"Env": [f"PATH={DEFAULT_PATH}"], "Cmd": ["bash"]})
        self.cache.put(key, rec.id)
        return rec.id

    def resolve_image(self, ref: str, where: str) -> bytes:
        """A base image: ``scratch``, ``debian_slim``, a local image, or a registry pull."""
        if ref == "scratch":
            return self.scratch()
        if ref in (DEBIAN_SLIM, f"{DEBIAN_SLIM}:latest", f"{DEBIAN_SLIM}:python"):
            return self.debian_slim()
        if ref == f"{DEBIAN_SLIM}:minbase":
            return self.debian_slim(())
        with contextlib.suppress(NotFound, UsageError):
            return images.resolve(self.store, ref)
        from swarm.build import registry

        try:
            return registry.pull(self.store, ref, out=None if self.quiet else self.out).id
        except (UsageError, NotFound) as err:
            raise BuildError(f"{where}: cannot find image {ref!r}: {err}") from None
        except ImportRefused as err:
            raise BuildError(f"{where}: pulling {ref!r} failed: {err}") from None

    # ------------------------------------------------------------------ RUN
    async def run_step(self, state: State, argv: list[str], env: Mapping[str, str],
                       *, label: str, where: str, network: str = "host") -> State:
        """Run ``argv`` in a container of ``state``; the result is its upper applied."""
        key = step_key("RUN", state.image_id, state.config, argv, dict(env), network)
        self.steps += 1
        if not self.no_cache and (hit := self.cache.get(key)) is not None:
            self.cached += 1
            self.say(f"    CACHED {short(hit)}")
            return _with_image(state, hit)
        parent_id = self.materialize(state, f"build:{where}")
        engine = await self._get_engine()
        uppers = engine.dir / "build-uppers"
        uppers.mkdir(exist_ok=True)
        upper = uppers / uuid.uuid4().hex
        from swarm.node import RunOptions

        opts = RunOptions(args=(), entrypoint=argv, env=dict(env),
                          network="none" if network == "none" else "host", tmpfs_tmp=False)
        t0 = time.monotonic()
        beat = asyncio.create_task(self._heartbeat(label, t0))
        try:
            self.out.flush()
            code = await engine.async_run(to_hex(parent_id), opts, keep_upper=upper,
                                          stdout=self._out_fd(), stderr=self._out_fd())
        finally:
            beat.cancel()
        try:
            if code != 0:
                raise BuildError(f"{where}: RUN: exited with code {code}: "
                                 f"{' '.join(argv)[:200]}")
            t1 = time.monotonic()
            parent = self.load(parent_id)

            def index_upper() -> tuple[bytes, UpperStats]:
                # One thread: an LMDB write transaction belongs to the thread that began it.
                with self.store.batch() as batch:
                    entries, stats = apply_upper(parent, upper, batch)
                return self.register_entries(entries, state.config, f"build:{where}"), stats

            new_id, stats = await asyncio.to_thread(index_upper)
            self.index_seconds += time.monotonic() - t1
            self.index_bytes += stats.bytes
        finally:
            shutil.rmtree(upper, ignore_errors=True)
        self.cache.put(key, new_id)
        self.say(f"    done in {time.monotonic() - t0:.1f} s: +{stats.added} -{stats.removed} "
                 f"entries, {stats.bytes / 1e6:.1f} MB new -> {short(new_id)}")
        return _with_image(state, new_id)

    def _out_fd(self) -> int | None:
        if self.quiet:
            return asyncio.subprocess.DEVNULL
        try:
            return self.out.fileno()
        except (AttributeError, OSError, ValueError):
            return None

    async def _heartbeat(self, label: str, t0: float) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self.say(f"    ... {label}: still running ({time.monotonic() - t0:.0f} s)")

    # ------------------------------------------------------------------ COPY / ADD
    def add_entries(self, state: State, key_parts: list[Any], make: Callable[
            [Index, Batch], dict[bytes, Entry]], *, where: str) -> State:
        """A content step without a container: ``make`` returns the entries to put in."""
        self.steps += 1
        key = step_key("ADD", state.image_id, state.config, key_parts)
        if not self.no_cache and (hit := self.cache.get(key)) is not None:
            self.cached += 1
            self.say(f"    CACHED {short(hit)}")
            return _with_image(state, hit)
        parent = self.load(state.image_id)
        with self.store.batch() as batch:
            new = make(parent, batch)
        merged = merge_entries(parent, new, where)
        new_id = self.register_entries(merged, state.config, f"build:{where}")
        self.cache.put(key, new_id)
        self.say(f"    {len(new)} entries -> {short(new_id)}")
        return _with_image(state, new_id)


    def ensure_dir(self, st: State, path: str, where: str) -> State:
        """WORKDIR's directory: created (root-owned, 0755) when the image lacks it."""
        index = self.load(st.image_id)
        real = resolve_in_index(index.by_path, path.encode(), where, follow_last=True)
        e = index.by_path.get(real)
        if e is not None:
            if e.kind != "dir":
                raise BuildError(f"{where}: WORKDIR: {path} exists and is a {e.kind}, not a "
                                 "directory")
            return st
        entry = Entry(real, "dir", DIR_MODE)
        return self.add_entries(st, ["WORKDIR", path], lambda _i, _b: {real: entry},
                                where=where)

    def copy_local(self, st: State, src: Path, dest: str, where: str) -> State:
        """A local file, or a directory's contents, into ``dest`` (relative to WORKDIR),
        root-owned; the key holds every copied file's digest."""
        if not src.exists():
            raise BuildError(f"{where}: {src}: no such file or directory")
        wd = st.config.get("WorkingDir") or "/"
        parent = self.load(st.image_id)
        dest_real = resolve_in_index(parent.by_path, posixpath.normpath(
            posixpath.join(wd, dest)).encode(), where, follow_last=True)
        ctx = ContextFiles(src if src.is_dir() else src.parent)
        rel = "." if src.is_dir() else src.name
        out: dict[bytes, Entry] = {}
        with self.store.batch() as batch:
            for sub, full in ctx.walk(rel):
                if sub == "" and src.is_dir():
                    if dest_real not in parent.by_path:
                        out[dest_real] = Entry(dest_real, "dir", DIR_MODE)
                    continue
                target = dest_real.rstrip(b"/") + b"/" + os.fsencode(sub) if sub else dest_real
                ent = entry_for(target, full, batch, owner=None, chmod=None)
                if ent is not None:
                    out[target] = ent
        digests = sorted((p, e.kind, e.mode, e.digest or e.target or b"")
                         for p, e in out.items())
        return self.add_entries(st, ["COPY-LOCAL", dest, digests], lambda _p, _b: out,
                                where=where)


def _with_image(state: State, image_id: bytes) -> State:
    return State(image_id, state.config, state.name, state.args, state.cmd_set)


# --------------------------------------------------------------------------- tree helpers
def resolve_in_index(by_path: Mapping[bytes, Entry], path: bytes, where: str,
                     follow_last: bool = False) -> bytes:
    """``path`` with symlinked directories in it resolved inside the image (Debian's
    /bin -> usr/bin), as Docker resolves a COPY destination."""
    parts = [p for p in path.split(b"/") if p]
    done: list[bytes] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == b".":
            continue
        if name == b"..":
            if done:
                done.pop()
            continue
        cand = b"/" + b"/".join([*done, name])
        e = by_path.get(cand)
        if e is not None and e.kind == "symlink" and (parts or follow_last):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise BuildError(f"{where}: too many symlinks resolving "
                                 f"{path.decode(errors='replace')}")
            target = e.target or b""
            if target.startswith(b"/"):
                done = []
            parts = [p for p in target.split(b"/") if p and p != b"."] + parts
            continue
        done.append(name)
    return b"/" + b"/".join(done)


def merge_entries(parent: Index, new: Mapping[bytes, Entry], where: str) -> dict[bytes, Entry]:
    """``parent``'s entries with ``new`` put in: a directory over a directory merges, any
    other entry replaces what was at its path (and its subtree). Missing parents are
    created as root-owned 0755 directories; a parent that is not a directory is an error."""
    out = dict(parent.by_path)
    for path in sorted(new, key=lambda p: p.split(b"/")):
        e = new[path]
        parts = path.split(b"/")[1:-1]
        for i in range(1, len(parts) + 1):
            anc = b"/" + b"/".join(parts[:i])
            a = out.get(anc)
            if a is None:
                out[anc] = Entry(anc, "dir", DIR_MODE, mtime_ns=e.mtime_ns)
            elif a.kind != "dir":
                raise BuildError(f"{where}: cannot copy to {path.decode(errors='replace')}: "
                                 f"{anc.decode(errors='replace')} is a {a.kind}")
        old = out.get(path)
        if old is not None and not (old.kind == "dir" and e.kind == "dir"):
            prefix = path + b"/"
            for p in [p for p in out if p.startswith(prefix)]:
                del out[p]
        out[path] = e
    return out


def read_image_file(store: Store, index: Index, path: str) -> str | None:
    e = index.get(path)
    if e is None or e.kind != "file" or e.digest is None:
        return None
    try:
        return store.get(e.digest).decode("utf-8", "replace")
    except NotFound:
        return None


def parse_chown(store: Store, index: Index, spec: str, where: str) -> tuple[int, int]:
    """``--chown=USER[:GROUP]`` -> (uid, gid), names looked up in the image's
    /etc/passwd and /etc/group (a user alone means its primary group)."""
    user, _, group = spec.partition(":")

    def table(path: str) -> list[list[str]]:
        text = read_image_file(store, index, path) or ""
        return [ln.split(":") for ln in text.splitlines() if ln and not ln.startswith("#")]

    def lookup(name: str, path: str, min_fields: int) -> list[str] | None:
        for row in table(path):
            if len(row) >= min_fields and (row[0] == name or row[2] == name):
                return row
        return None

    if user.isdigit():
        uid = int(user)
        row = lookup(user, "/etc/passwd", 4)
        gid = int(row[3]) if row else uid
    else:
        row = lookup(user, "/etc/passwd", 4)
        if row is None:
            raise BuildError(f"{where}: --chown: no user {user!r} in the image's /etc/passwd")
        uid, gid = int(row[2]), int(row[3])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            grow = lookup(group, "/etc/group", 3)
            if grow is None:
                raise BuildError(f"{where}: --chown: no group {group!r} in the image's "
                                 "/etc/group")
            gid = int(grow[2])
    return uid, gid


def parse_chmod(spec: str, where: str) -> int:
    try:
        mode = int(spec, 8)
    except ValueError:
        raise BuildError(f"{where}: --chmod={spec}: want an octal mode like 0755") from None
    if not 0 <= mode <= 0o7777:
        raise BuildError(f"{where}: --chmod={spec}: out of range")
    return mode


def is_archive(path: Path) -> bool:
    """Whether ADD extracts ``path``: a tar, plain or compressed (told by content)."""
    with open(path, "rb") as f:
        head = f.read(TAR_SNIFF_BYTES)
    if sniff_compression(head) != "none":
        return True
    return head[TAR_MAGIC_OFFSET:TAR_MAGIC_OFFSET + len(TAR_MAGIC)] == TAR_MAGIC


def archive_entries(path: Path, batch: Batch, where: str) -> list[Entry]:
    """The entries of a tar archive (contents stored through ``batch``), root excluded."""
    tb = TreeBuilder()
    try:
        with open(path, "rb") as raw:
            head, stream = peek(raw)
            del head
            tf = open_tar_stream(decompress(stream), f"{where}: {path.name}")
            tb.apply_tar(tf, batch, None, f"{where}: {path.name}")
    except ImportRefused as err:
        raise BuildError(f"{err}") from None
    except ARCHIVE_ERRORS as err:
        raise BuildError(f"{where}: {path.name}: unreadable archive ({err})") from None
    return [e for e in tb.build({}).entries if e.path != b"/"]


def _rebase(path: bytes, dest: bytes) -> bytes:
    return dest.rstrip(b"/") + path if dest != b"/" else path


class ContextFiles:
    """The build context directory, with ``.dockerignore`` applied."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.ignore = ctxmod.Ignore.load(self.root)
        self._paths: list[str] | None = None

    def paths(self) -> list[str]:
        """Every non-excluded context path (clean, relative), parents before children."""
        if self._paths is None:
            out = []
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames.sort()
                rel_dir = os.path.relpath(dirpath, self.root)
                for name in sorted(dirnames) + sorted(filenames):
                    rel = ctxmod.clean(os.path.join(rel_dir, name))
                    if not self.ignore.excluded(rel):
                        out.append(rel)
            self._paths = out
        return self._paths

    def match(self, pattern: str) -> list[str]:
        pat = ctxmod.clean(pattern)
        if pat == ".":
            return ["."]
        if not any(c in pat for c in "*?["):
            full = self.root / pat
            return [pat] if (full.exists() or full.is_symlink()) and not \
                self.ignore.excluded(pat) else []
        rx = ctxmod.pattern_regex(pat)
        return [p for p in self.paths() if rx.fullmatch(p)]

    def walk(self, rel: str) -> Iterator[tuple[str, Path]]:
        """(path relative to ``rel``, full path) of ``rel`` and, for a directory, every
        non-excluded path below it; "" names ``rel`` itself."""
        full = self.root if rel == "." else self.root / rel
        yield "", full
        if full.is_dir() and not full.is_symlink():
            prefix = "" if rel == "." else rel + "/"
            for p in self.paths():
                if p.startswith(prefix) and p != rel:
                    yield p[len(prefix):], self.root / p


def entry_for(path: bytes, full: Path, batch: Batch, *, owner: tuple[int, int] | None,
              chmod: int | None) -> Entry | None:
    """The entry of a context file at image path ``path`` (its content stored)."""
    st = os.lstat(full)
    uid, gid = owner if owner is not None else (0, 0)
    mode = statmod.S_IMODE(st.st_mode)
    if statmod.S_ISDIR(st.st_mode):
        return Entry(path, "dir", chmod if chmod is not None else mode, uid, gid,
                     mtime_ns=st.st_mtime_ns)
    if statmod.S_ISLNK(st.st_mode):
        target = os.readlink(os.fsencode(full))
        return Entry(path, "symlink", 0o777, uid, gid, len(target), st.st_mtime_ns,
                     target=target)
    if statmod.S_ISREG(st.st_mode):
        digest, size = batch.put_file(full)
        return Entry(path, "file", chmod if chmod is not None else mode, uid, gid, size,
                     st.st_mtime_ns, digest=digest)
    return None  # sockets, fifos and devices in a context are not copied


# --------------------------------------------------------------------------- Dockerfiles
@dataclass
class _Stage:
    index: int
    name: str | None
    base: str  # unexpanded
    from_ins: Instruction
    body: list[Instruction]


class DockerfileBuild:
    """One ``swarm build``: a Dockerfile, its context, build args and target."""

    def __init__(self, builder: Builder, dockerfile: Dockerfile, context: Path, *,
                 build_args: Mapping[str, str] | None = None, target: str | None = None
                 ) -> None:
        self.b = builder
        self.df = dockerfile
        self.context = ContextFiles(context)
        self.build_args = dict(build_args or {})
        self.target = target
        self.lexer = Lexer(dockerfile.escape)
        self.global_args: dict[str, str] = dict(PLATFORM_ARGS)
        self.stages: list[_Stage] = []
        self.results: dict[int, State] = {}
        self.used_args: set[str] = set()
        self._split()

    def _word(self, ins: Instruction, text: str, env: Mapping[str, str]) -> str:
        try:
            return self.lexer.word(text, env)
        except LexError as err:
            raise ins.error(str(err)) from None

    def _split(self) -> None:
        current: _Stage | None = None
        for ins in self.df.instructions:
            if ins.cmd == "FROM":
                name = ins.args[2].lower() if len(ins.args) == 3 else None
                current = _Stage(len(self.stages), name, ins.args[0], ins, [])
                self.stages.append(current)
            elif current is None:  # ARG before the first FROM: global scope
                for arg in ins.args:
                    k, eq, v = arg.partition("=")
                    self.used_args.add(k)
                    if k in self.build_args:
                        self.global_args[k] = self.build_args[k]
                    elif eq:
                        self.global_args[k] = self._word(ins, v, self.global_args)
                    else:
                        self.global_args.setdefault(k, "")
            else:
                current.body.append(ins)

    def _stage_by_ref(self, ref: str) -> _Stage | None:
        for s in self.stages:
            if s.name == ref.lower():
                return s
        if ref.isdigit() and int(ref) < len(self.stages):
            return self.stages[int(ref)]
        return None

    def _needed(self, target: _Stage) -> list[_Stage]:
        """The stages ``target`` depends on (FROM a stage, COPY --from), in file order."""
        need: set[int] = set()
        todo = [target]
        while todo:
            s = todo.pop()
            if s.index in need:
                continue
            need.add(s.index)
            refs = [self._word(s.from_ins, s.base, self.global_args)]
            refs += [i.flags["from"] for i in s.body if i.cmd == "COPY" and "from" in i.flags]
            for r in refs:
                dep = self._stage_by_ref(r)
                if dep is not None and dep.index < s.index:
                    todo.append(dep)
        return [s for s in self.stages if s.index in need]

    async def run(self) -> State:
        if self.target is not None:
            target = self._stage_by_ref(self.target)
            if target is None:
                have = ", ".join(s.name for s in self.stages if s.name) or "none"
                raise BuildError(f"{self.df.file}: no stage named {self.target!r} "
                                 f"(stages: {have})")
        else:
            target = self.stages[-1]
        stages = self._needed(target)
        total = sum(1 + len(s.body) for s in stages)
        n = 0
        for s in stages:
            n += 1
            state = await self._from(s, f"[{n}/{total}]")
            for ins in s.body:
                n += 1
                self.b.say(f"#{s.index} [{n}/{total}] {_one_line(ins.original)}")
                state = await self._step(state, ins)
            self.results[s.index] = state
        unused = set(self.build_args) - self.used_args - set(PLATFORM_ARGS)
        if unused:
            self.b.say(f"warning: build args not consumed: {', '.join(sorted(unused))}")
        return self.results[target.index]

    async def _from(self, s: _Stage, counter: str) -> State:
        ins = s.from_ins
        ref = self._word(ins, s.base, self.global_args)
        self.b.say(f"#{s.index} {counter} FROM {ref}" + (f" AS {s.name}" if s.name else ""))
        platform = ins.flags.get("platform")
        if platform is not None:
            plat = self._word(ins, platform, self.global_args)
            if plat not in ("linux/amd64", ""):
                raise ins.error(f"--platform={plat}: only linux/amd64 is supported")
        if not ref:
            raise ins.error("empty image reference")
        dep = self._stage_by_ref(ref)
        if dep is not None and dep.index < s.index:
            prev = self.results[dep.index]
            return State(prev.image_id, dict(prev.config), s.name, {})
        image_id = await asyncio.to_thread(self.b.resolve_image, ref, ins.where)
        config = dict(self.b.load(image_id).config)
        return State(image_id, config, s.name, {})

    async def _step(self, st: State, ins: Instruction) -> State:
        cmd = ins.cmd
        env = st.env()
        cfg = dict(st.config)
        new = State(st.image_id, cfg, st.name, dict(st.args), st.cmd_set)
        if cmd == "ARG":
            for arg in ins.args:
                k, eq, v = arg.partition("=")
                self.used_args.add(k)
                if k in self.build_args:
                    new.args[k] = self.build_args[k]
                elif eq:
                    new.args[k] = self._word(ins, v, env)
                elif k in self.global_args:
                    new.args[k] = self.global_args[k]
                else:
                    new.args.pop(k, None)  # declared without a value: unset
                env = new.env()
        elif cmd == "ENV":
            for k, v in zip(ins.args[::2], ins.args[1::2], strict=True):
                key = self._word(ins, k, env)
                set_env(cfg, key, self._word(ins, v, env))
                env = new.env()
        elif cmd == "LABEL":
            labels = dict(cfg.get("Labels") or {})
            pairs = list(zip(ins.args[::2], ins.args[1::2], strict=False))
            if len(ins.args) % 2:
                raise ins.error("LABEL needs KEY=VALUE pairs")
            for k, v in pairs:
                labels[self._word(ins, k, env)] = self._word(ins, v, env)
            cfg["Labels"] = labels
        elif cmd == "WORKDIR":
            path = self._word(ins, ins.args[0], env)
            cur = cfg.get("WorkingDir") or "/"
            wd = posixpath.normpath(posixpath.join(cur, path))
            cfg["WorkingDir"] = wd
            new = self.b.ensure_dir(new, wd, ins.where)
        elif cmd == "USER":
            user = self._word(ins, ins.args[0], env)
            if not user:
                raise ins.error("empty user")
            cfg["User"] = user
        elif cmd in ("CMD", "ENTRYPOINT"):
            value = list(ins.args) if ins.json else [*self._shell(cfg), ins.args[0]]
            if cmd == "CMD":
                cfg["Cmd"] = value
                new.cmd_set = True
            else:
                cfg["Entrypoint"] = value
                if not st.cmd_set:
                    cfg.pop("Cmd", None)
        elif cmd == "SHELL":
            cfg["Shell"] = list(ins.args)
        elif cmd == "EXPOSE":
            ports = dict(cfg.get("ExposedPorts") or {})
            for word in ins.args:
                for p in self.lexer.words(word, env):
                    port = p if "/" in p else f"{p}/tcp"
                    num = port.split("/")[0]
                    if not all(x.isdigit() for x in num.split("-")):
                        raise ins.error(f"invalid port {p!r}")
                    ports[port] = {}
            cfg["ExposedPorts"] = ports
        elif cmd == "STOPSIGNAL":
            cfg["StopSignal"] = self._word(ins, ins.args[0], env)
        elif cmd == "VOLUME":
            vols = dict(cfg.get("Volumes") or {})
            items = list(ins.args) if ins.json else [
                w for a in ins.args for w in self.lexer.words(a, env)]
            for v in items:
                vols[v] = {}
            cfg["Volumes"] = vols
        elif cmd == "HEALTHCHECK":
            cfg["Healthcheck"] = self._healthcheck(ins, cfg)
        elif cmd == "ONBUILD":
            cfg["OnBuild"] = [*(cfg.get("OnBuild") or []), ins.args[0]]
        elif cmd == "MAINTAINER":
            pass  # deprecated; Docker records it as the image's author, outside the config
        elif cmd == "RUN":
            return await self._run(new, ins)
        elif cmd in ("COPY", "ADD"):
            return await asyncio.to_thread(self._copy, new, ins)
        else:  # pragma: no cover - parse() rejects unknown instructions
            raise ins.error("unsupported instruction")
        return new

    def _shell(self, cfg: Mapping[str, Any]) -> list[str]:
        return list(cfg.get("Shell") or DEFAULT_SHELL)

    def _healthcheck(self, ins: Instruction, cfg: Mapping[str, Any]) -> dict[str, Any]:
        kind = ins.args[0].upper()
        if kind == "NONE":
            return {"Test": ["NONE"]}
        rest = ins.args[1:]
        if not rest:
            raise ins.error("HEALTHCHECK CMD needs a command")
        test = ["CMD", *rest] if ins.json else ["CMD-SHELL", rest[0]]
        hc: dict[str, Any] = {"Test": test}
        names = {"interval": "Interval", "timeout": "Timeout", "start-period": "StartPeriod",
                 "start-interval": "StartInterval"}
        for flag, key in names.items():
            if flag in ins.flags:
                hc[key] = _duration_ns(ins.flags[flag], ins)
        if "retries" in ins.flags:
            try:
                hc["Retries"] = int(ins.flags["retries"])
            except ValueError:
                raise ins.error(f"--retries={ins.flags['retries']}: not a number") from None
        return hc

    async def _run(self, st: State, ins: Instruction) -> State:
        net = ins.flags.get("network", "default")
        if net not in ("default", "host", "none"):
            raise ins.error(f"--network={net}: want default, host or none")
        if ins.json:
            argv = list(ins.args)
        else:
            lone = heredoc_alone(ins)
            if lone is not None:
                if lone.content.startswith("#!"):
                    raise ins.error("a heredoc script with a #! line is not supported; "
                                    "name the interpreter: RUN python3 <<EOF")
                script = lone.content
            elif ins.heredocs:
                script = ins.args[0] + "\n" + "".join(
                    h.content + ("" if h.content.endswith("\n") else "\n") + h.name + "\n"
                    for h in ins.heredocs)
            else:
                script = ins.args[0]
            argv = [*self._shell(st.config), script]
        image_env = env_dict(st.config)
        run_env = {k: v for k, v in st.args.items() if k not in image_env}
        return await self.b.run_step(st, argv, run_env, label=_one_line(ins.original)[:60],
                                     where=ins.where,
                                     network="none" if net == "none" else "host")

    # ---------------------------------------------------------------- COPY / ADD
    def _copy(self, st: State, ins: Instruction) -> State:
        env = st.env()
        words = [self._word(ins, a, env) for a in ins.args]
        heredocs = {h.name: h for h in ins.heredocs}
        srcs, dest = words[:-1], words[-1]
        if not dest:
            raise ins.error("empty destination")
        wd = st.config.get("WorkingDir") or "/"
        dest_abs = posixpath.normpath(posixpath.join(wd, dest))
        dest_is_dir = dest.endswith("/") or dest.endswith("/.") or dest in (".", "..")
        parent = self.b.load(st.image_id)
        owner = (parse_chown(self.b.store, parent, self._word(ins, ins.flags["chown"], env),
                             ins.where) if "chown" in ins.flags else None)
        chmod = (parse_chmod(ins.flags["chmod"], ins.where) if "chmod" in ins.flags else None)
        dest_real = resolve_in_index(parent.by_path, dest_abs.encode(), ins.where,
                                     follow_last=True)
        existing = parent.by_path.get(dest_real)
        if existing is not None and existing.kind == "dir":
            dest_is_dir = True
        if len(srcs) > 1 and not dest_is_dir:
            raise ins.error(f"with more than one source the destination must be a directory "
                            f"and end with a / ({dest})")
        from_ref = ins.flags.get("from")
        if from_ref is not None:
            return self._copy_from_image(st, ins, self._word(ins, from_ref, env), srcs,
                                         dest_real, dest_is_dir, owner, chmod)
        # Sources: heredocs, or context paths (globs expanded, .dockerignore applied).
        plan: list[tuple[str, str]] = []  # (kind, rel) kind: heredoc | path
        for s in srcs:
            m = _heredoc_name(s)
            if m is not None and m in heredocs:
                plan.append(("heredoc", m))
                continue
            if ins.cmd == "ADD" and ("://" in s or s.startswith("git@")):
                raise ins.error(f"ADD from a URL is not supported: {s}")
            hits = self.context.match(s)
            if not hits:
                raise ins.error(f"{s}: no such file or directory in the build context "
                                "(or excluded by .dockerignore)")
            plan += [("path", h) for h in hits]
        if len(plan) > 1:
            dest_is_dir = True

        def make(_parent: Index, batch: Batch) -> dict[bytes, Entry]:
            out: dict[bytes, Entry] = {}
            for kind, rel in plan:
                if kind == "heredoc":
                    h = heredocs[rel]
                    text = self._word(ins, h.content, env) if h.expand else h.content
                    data = text.encode()
                    target = dest_real + b"/" + rel.encode() if dest_is_dir else dest_real
                    uid, gid = owner or (0, 0)
                    out[target] = Entry(target, "file", chmod if chmod is not None else
                                        FILE_MODE, uid, gid, len(data), 0,
                                        digest=batch.put(data))
                    continue
                full = self.context.root / rel if rel != "." else self.context.root
                if ins.cmd == "ADD" and full.is_file() and not full.is_symlink() and \
                        is_archive(full):
                    for e in archive_entries(full, batch, ins.where):
                        out[_rebase(e.path, dest_real)] = e._replace(
                            path=_rebase(e.path, dest_real))
                    continue
                is_dir = full.is_dir() and not full.is_symlink()
                for sub, fpath in self.context.walk(rel):
                    if sub == "":
                        if is_dir:
                            continue  # a directory's contents go in, not the directory
                        target = (dest_real.rstrip(b"/") + b"/" + os.fsencode(full.name)
                                  if dest_is_dir else dest_real)
                    else:
                        target = dest_real.rstrip(b"/") + b"/" + os.fsencode(sub)
                    if target == b"":
                        target = b"/"
                    ent = entry_for(target, fpath, batch, owner=owner, chmod=chmod)
                    if ent is not None:
                        out[target] = ent
            if dest_is_dir and dest_real not in out and dest_real not in _parent.by_path:
                uid, gid = owner or (0, 0)
                out[dest_real] = Entry(dest_real, "dir", DIR_MODE, uid, gid)
            return out

        # The key: the instruction and the content of every file it copies.
        with self.b.store.batch() as batch:
            preview = make(parent, batch)
        digests = sorted((p, e.kind, e.mode, e.uid, e.gid, e.digest or e.target or b"")
                         for p, e in preview.items())
        key_parts = [ins.cmd, words, sorted(ins.flags.items()), digests]
        return self.b.add_entries(st, key_parts, lambda _p, _b: preview, where=ins.where)

    def _copy_from_image(self, st: State, ins: Instruction, ref: str, srcs: list[str],
                         dest: bytes, dest_is_dir: bool, owner: tuple[int, int] | None,
                         chmod: int | None) -> State:
        dep = self._stage_by_ref(ref)
        if dep is not None:
            if dep.index not in self.results:
                raise ins.error(f"--from={ref}: that stage is not built before this one")
            src_id = self.b.materialize(self.results[dep.index], f"build:{ins.where}")
        else:
            src_id = self.b.resolve_image(ref, ins.where)
        src = self.b.load(src_id)
        src_wd = (src.config.get("WorkingDir") or "/")
        picks: list[bytes] = []
        for s in srcs:
            pat = posixpath.normpath(posixpath.join(src_wd, s))
            if any(c in pat for c in "*?["):
                rx = ctxmod.pattern_regex(pat.lstrip("/"))
                hits = [e.path for e in src.entries
                        if e.path != b"/" and rx.fullmatch(e.path.decode(errors="replace")[1:])]
            else:
                real = resolve_in_index(src.by_path, pat.encode(), ins.where, follow_last=True)
                hits = [real] if real in src.by_path else []
            if not hits:
                raise ins.error(f"--from={ref}: {s}: no such file or directory in that image")
            picks += hits
        if len(picks) > 1:
            dest_is_dir = True
        out: dict[bytes, Entry] = {}
        for p in picks:
            top = src.by_path[p]
            if top.kind == "dir":
                prefix = p.rstrip(b"/") + b"/"
                members = [(e.path[len(prefix) - 1:] if p != b"/" else e.path, e)
                           for e in src.entries if e.path.startswith(prefix) or (
                               p == b"/" and e.path != b"/")]
            else:
                name = p.rsplit(b"/", 1)[1]
                members = [(b"/" + name if dest_is_dir else b"", top)]
            for rel, e in members:
                target = dest.rstrip(b"/") + rel if rel else dest
                e = e._replace(path=target or b"/", link=None)
                if owner is not None:
                    e = e._replace(uid=owner[0], gid=owner[1])
                if chmod is not None and e.kind != "symlink":
                    e = e._replace(mode=chmod)
                out[e.path] = e
        if dest_is_dir and dest not in out and dest not in self.b.load(st.image_id).by_path:
            out[dest] = Entry(dest, "dir", DIR_MODE, *(owner or (0, 0)))
        key_parts = ["COPY-FROM", src_id, [s for s in srcs], dest, dest_is_dir, owner, chmod]
        return self.b.add_entries(st, key_parts, lambda _p, _b: out, where=ins.where)


def _heredoc_name(word: str) -> str | None:
    if not word.startswith("<<"):
        return None
    return word.lstrip("<").lstrip("-").strip("\"'") or None


def _one_line(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= 120 else first[:117] + "..."


def _duration_ns(text: str, ins: Instruction) -> int:
    """Go durations as Docker takes them: "30s", "1m30s", "500ms"."""
    total, num, i = 0, "", 0
    if not text:
        raise ins.error("empty duration")
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            num += ch
            i += 1
            continue
        unit = text[i:i + 2] if text[i:i + 2] in DURATION_UNITS_NS else text[i]
        if unit not in DURATION_UNITS_NS or not num:
            raise ins.error(f"invalid duration {text!r}")
        total += int(float(num) * DURATION_UNITS_NS[unit])
        num, i = "", i + len(unit)
    if num:
        raise ins.error(f"invalid duration {text!r} (missing unit)")
    return total


async def build_dockerfile(state_dir: str | os.PathLike[str], context: str | os.PathLike[str],
                           *, dockerfile: str | os.PathLike[str] | None = None,
                           names: Sequence[str] = (), build_args: Mapping[str, str] | None =
                           None, target: str | None = None, no_cache: bool = False,
                           out: TextIO | None = None, quiet: bool = False) -> BuildResult:
    """Build the Dockerfile (default ``CONTEXT/Dockerfile``) and name the image."""
    ctx = Path(context)
    if not ctx.is_dir():
        raise BuildError(f"build context {ctx} is not a directory")
    df = parse_file(Path(dockerfile) if dockerfile is not None else ctx / "Dockerfile")
    checked = [images.parse_name(n) for n in names]
    t0 = time.monotonic()
    async with Builder(state_dir, no_cache=no_cache, out=out, quiet=quiet) as b:
        build = DockerfileBuild(b, df, ctx, build_args=build_args, target=target)
        final = await build.run()
        image_id = b.materialize(final, f"build:{df.file}")
        rec = images.register(b.store, b.load(image_id), checked, source=f"build:{df.file}")
        b.say(f"built {to_hex(rec.id)}" + (f" as {', '.join(checked)}" if checked else "") +
              f" ({b.steps} steps, {b.cached} cached, {time.monotonic() - t0:.1f} s)")
        return BuildResult(rec.id, checked, b.steps, b.cached, time.monotonic() - t0)

