"""Snapshot a directory tree with everything an image must reproduce, for exact comparison."""

from __future__ import annotations

import os
import stat
from typing import Any

import blake3


def _xattrs(path: bytes) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for n in sorted(names):
        if n.startswith(("trusted.overlay.", "user.overlay.")):
            continue
        out.append((n, os.getxattr(path, n, follow_symlinks=False)))
    return tuple(out)


def snapshot(root: str | os.PathLike[str], *, contents: bool = True,
             root_mtime: bool = True) -> dict[bytes, tuple[Any, ...]]:
    """path -> (st_mode, uid, gid, size, mtime_ns, target, rdev, xattrs, content hash,
    hard-link class). The hard-link class is the first path (in sorted order) of the inode."""
    base = os.fsencode(os.fspath(root))
    paths: list[bytes] = [b"/"]
    for dirpath, dirnames, filenames in os.walk(base):
        rel = dirpath[len(base):] or b""
        for n in dirnames + filenames:
            paths.append(rel + b"/" + n)
    paths.sort(key=lambda p: p.split(b"/"))
    first_of_inode: dict[tuple[int, int], bytes] = {}
    snap = {}
    for p in paths:
        full = base + p if p != b"/" else base
        st = os.lstat(full)
        target = os.readlink(full) if stat.S_ISLNK(st.st_mode) else None
        digest = None
        if contents and stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                digest = blake3.blake3(f.read()).hexdigest()
        link = None
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            link = first_of_inode.setdefault((st.st_dev, st.st_ino), p)
        size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
        mtime = st.st_mtime_ns if (root_mtime or p != b"/") else None
        rdev = st.st_rdev if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) else 0
        snap[p] = (st.st_mode, st.st_uid, st.st_gid, size, mtime, target, rdev, _xattrs(full),
                   digest, link)
    return snap


Snapshot = dict[bytes, tuple[Any, ...]]


def diff(a: Snapshot, b: Snapshot, limit: int = 10) -> list[str]:
    """Human-readable differences (empty when equal)."""
    out = []
    for p in sorted(set(a) | set(b)):
        if a.get(p) != b.get(p):
            out.append(f"{p!r}: {a.get(p)} != {b.get(p)}")
            if len(out) >= limit:
                break
    return out
