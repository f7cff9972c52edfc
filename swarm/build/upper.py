"""Apply an overlayfs upper directory (one build step's changes) onto its parent's index.

A RUN step runs over an overlay whose lower is the parent image; what the step changed is
the overlay's upper directory, in overlayfs's own encoding:

- a new or changed entry is in the upper as itself (a changed file was copied up whole:
  the overlay is mounted with ``metacopy=off``, so the upper holds every byte);
- a deleted entry is a *whiteout*: a character device 0/0 at its path;
- a directory that replaced a lower one (``rm -r d; mkdir d``) is *opaque*: xattr
  ``trusted.overlay.opaque=y``; lower children of it are hidden;
- a directory merely present in the upper merges with the lower one (only its metadata
  comes from the upper).

The overlay has ``redirect_dir=off``, so there are no redirect xattrs to follow.

runc creates missing mount points (``/proc``, ``/dev``, ``/etc/resolv.conf`` ...) in the
upper before the step's command runs, and bind-mounts the container's ``/etc/hosts``,
``/etc/hostname`` and ``/etc/resolv.conf`` over files; neither is the step's output.
Empty mount-point artifacts the lower lacks are dropped, and those three files are never
taken from the upper (writes to them went to the bind-mounted host copies anyway).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass

from swarm.build.importer import ContentPipeline, entry_from_stat, walk
from swarm.build.progress import Progress
from swarm.fs.index import Entry, Index, kind_of
from swarm.store.cas import Batch

OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
OPAQUE_VALUE = b"y"
WHITEOUT_RDEV = 0
# Where runc mounts something for every container (swarm.runtime.spec.build_mounts): if
# the lower lacks one, runc made it in the upper, empty.
MOUNT_POINTS: frozenset[bytes] = frozenset({
    b"/proc", b"/dev", b"/dev/pts", b"/dev/shm", b"/dev/mqueue", b"/sys", b"/sys/fs",
    b"/sys/fs/cgroup", b"/tmp", b"/etc/resolv.conf", b"/etc/hostname", b"/etc/hosts",
})
# Bind-mounted over by runc: their content in a step is the host's, never the image's.
BIND_MOUNTED_FILES: frozenset[bytes] = frozenset({
    b"/etc/resolv.conf", b"/etc/hostname", b"/etc/hosts"})


@dataclass
class UpperStats:
    """What one upper directory changed (for the step summary and the benchmark)."""

    added: int = 0
    removed: int = 0
    files: int = 0
    bytes: int = 0


def _is_opaque(path: bytes) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == OPAQUE_VALUE:
                return True
        except OSError as err:
            if err.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
    return False


def _ancestors_and_self(path: bytes) -> Iterable[bytes]:
    parts = path.split(b"/")[1:]
    for i in range(1, len(parts) + 1):
        yield b"/" + b"/".join(parts[:i])


def _proper_ancestors(path: bytes) -> Iterable[bytes]:
    parts = path.split(b"/")[1:-1]
    yield b"/"
    for i in range(1, len(parts) + 1):
        yield b"/" + b"/".join(parts[:i])


def apply_upper(parent: Index, upper: str | os.PathLike[str], batch: Batch, *,
                extra_mount_points: Iterable[bytes] = (),
                progress: Progress | None = None) -> tuple[list[Entry], UpperStats]:
    """The entries of ``parent`` with the changes in ``upper`` applied, and a summary.

    New file contents go to the store through ``batch``; hard links inside the upper stay
    hard links, and a lower link group that lost members keeps the rest.
    """
    root = os.fsencode(os.path.abspath(upper))
    lower = parent.by_path
    mount_points = MOUNT_POINTS | frozenset(extra_mount_points)
    stats = UpperStats()
    added: dict[bytes, Entry] = {}
    whiteouts: set[bytes] = set()
    opaque: set[bytes] = set()
    inodes: dict[tuple[int, int], bytes] = {}  # (dev, ino) -> first path in the upper
    link_of: dict[bytes, bytes] = {}  # later hard link -> first path
    def stored(path: bytes, digest: bytes, size: int) -> None:
        added[path] = added[path]._replace(digest=digest, size=size)
        stats.files += 1
        stats.bytes += size

    with ContentPipeline(batch, stored, progress) as pipeline:
        for rel, st in walk(root):
            full = root + rel if rel != b"/" else root
            kind = kind_of(st.st_mode)
            if kind is None:
                continue  # a socket left by the step: images do not carry them
            if kind == "char" and st.st_rdev == WHITEOUT_RDEV:
                whiteouts.add(rel)
                continue
            if rel in BIND_MOUNTED_FILES:
                continue
            if rel in mount_points and rel not in lower and (
                    (kind == "dir" and not os.listdir(full))
                    or (kind == "file" and st.st_size == 0)):
                continue
            if kind == "dir" and rel != b"/" and _is_opaque(full):
                opaque.add(rel)
            e = entry_from_stat(rel, full, st, kind)
            if kind != "dir" and st.st_nlink > 1:
                first = inodes.setdefault((st.st_dev, st.st_ino), rel)
                if first != rel:
                    link_of[rel] = first
                    added[rel] = e
                    continue
            added[rel] = e
            if kind == "file":
                pipeline.submit(rel, full, st.st_size)

    # Lower paths whose whole subtree is gone: whiteouts, and anything the upper replaced
    # with an entry of another kind (a non-directory hides what was below it).
    gone = set(whiteouts)
    for path, e in added.items():
        old = lower.get(path)
        if old is not None and (old.kind != "dir" or e.kind != "dir"):
            gone.add(path)
    out: dict[bytes, Entry] = {}
    for e in parent.entries:
        if e.path in added:
            continue
        if e.path != b"/" and (any(a in gone for a in _ancestors_and_self(e.path))
                               or any(a in opaque for a in _proper_ancestors(e.path))):
            stats.removed += 1
            continue
        out[e.path] = e
    # Hard-link groups: lower numbers first, then one new group per upper inode.
    next_group = 1 + max((e.link for e in out.values() if e.link is not None), default=-1)
    upper_groups: dict[bytes, int] = {}
    for path, e in added.items():
        head_path = link_of.get(path)
        if head_path is not None:
            head = added[head_path]
            group = upper_groups.get(head_path)
            if group is None:
                group = upper_groups[head_path] = next_group
                next_group += 1
                added[head_path] = head._replace(link=group)
            e = e._replace(digest=head.digest, size=head.size, link=group)
        out[path] = e
        stats.added += 1
    for path in list(added):
        if path in upper_groups:
            out[path] = out[path]._replace(link=upper_groups[path],
                                           digest=added[path].digest, size=added[path].size)
    return renumber_links(out.values()), stats


def renumber_links(entries: Iterable[Entry]) -> list[Entry]:
    """Hard-link groups numbered 0, 1, ... in path order, a group of one dropped, so equal
    trees encode equally whatever steps made them."""
    items = sorted(entries, key=lambda e: e.path.split(b"/"))
    counts: dict[int, int] = {}
    for e in items:
        if e.link is not None:
            counts[e.link] = counts.get(e.link, 0) + 1
    order: dict[int, int] = {}
    out = []
    for e in items:
        if e.link is not None:
            e = e._replace(link=order.setdefault(e.link, len(order))
                           if counts[e.link] > 1 else None)
        out.append(e)
    return out
