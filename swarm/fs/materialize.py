"""Materialize an image from its index and the store: as a directory tree or a tar stream.

The directory form reproduces the tree exactly: types, modes (setuid/setgid/sticky too),
owners, mtimes (nanoseconds, symlinks included), link targets, hard links, device numbers,
fifos, xattrs and contents. Order matters: ownership before mode (chown clears setuid),
xattrs after chown (it may drop security.capability), and directory mtimes last, deepest
first, since creating a child changes its parent's mtime.
"""

from __future__ import annotations

import gzip
import io
import os
import stat as statmod
import tarfile
from typing import IO, Any

from swarm.build.progress import Progress
from swarm.errors import SwarmError, UsageError
from swarm.fs.index import Entry, Index
from swarm.store import Store
from swarm.store.cas import PartsReader

WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def apply_meta(path: bytes, e: Entry) -> None:
    """Owner, mode, xattrs and (but for directories) mtime of ``path``, in that order."""
    os.chown(path, e.uid, e.gid, follow_symlinks=False)
    if e.kind != "symlink":
        os.chmod(path, e.mode)
    for name, value in (e.xattrs or {}).items():
        os.setxattr(path, name, value, follow_symlinks=False)
    if e.kind != "dir":
        os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


def export_directory(store: Store, index: Index, dest: str | os.PathLike[str],
                     progress: Progress | None = None) -> None:
    """Write the image's tree at ``dest`` (which must not exist, or be an empty directory)."""
    root = os.fsencode(os.path.abspath(dest))
    if os.path.lexists(root):
        if not os.path.isdir(root) or os.path.islink(root) or os.listdir(root):
            raise UsageError(f"export destination {os.fsdecode(root)} exists and is not empty")
    else:
        os.mkdir(root, 0o700)
    progress = progress or Progress()
    first_of_group: dict[int, bytes] = {}
    dirs: list[tuple[bytes, Entry]] = []
    for e in index:
        path = root + e.path if e.path != b"/" else root
        if e.kind == "dir":
            if e.path != b"/":
                os.mkdir(path, 0o700)
            dirs.append((path, e))
            continue
        if e.link is not None:
            first = first_of_group.get(e.link)
            if first is not None:
                os.link(first, path, follow_symlinks=False)
                continue
            first_of_group[e.link] = path
        if e.kind == "file":
            assert e.digest is not None
            fd = os.open(path, WRITE_FLAGS, 0o600)
            try:
                for part in store.iter_content(e.digest):
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            progress.advance(files=1, nbytes=e.size)
        elif e.kind == "symlink":
            assert e.target is not None
            os.symlink(e.target, path)
        elif e.kind in ("char", "block"):
            kind_bit = statmod.S_IFCHR if e.kind == "char" else statmod.S_IFBLK
            os.mknod(path, kind_bit | 0o600, e.rdev)
        elif e.kind == "fifo":
            os.mkfifo(path, 0o600)
        else:  # pragma: no cover - Index validates kinds
            raise SwarmError(f"cannot export {e.path!r} of kind {e.kind}")
        apply_meta(path, e)
    for path, e in reversed(dirs):
        apply_meta(path, e)
        os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


def _mtime_pax(ns: int) -> str:
    sec, frac = divmod(ns, 1_000_000_000)
    return f"{sec}.{frac:09d}" if frac else str(sec)


def export_tar(store: Store, index: Index, out: IO[bytes], compression: str = "",
               progress: Progress | None = None) -> None:
    """Write the image as a PAX tar to ``out`` (a stream: nothing is buffered whole).

    ``compression`` is "", "gz" or "zst". Exact mtimes and xattrs ride in PAX headers
    (``mtime`` with nanoseconds, ``SCHILY.xattr.*``); the root directory is the member "./".
    """
    progress = progress or Progress()
    closer: Any = None
    if compression == "zst":
        import zstandard

        closer = zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False)
    elif compression == "gz":
        closer = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6)
    elif compression != "":
        raise UsageError(f"unknown tar compression {compression!r}")
    target = closer if closer is not None else out
    first_of_group: dict[int, str] = {}
    with tarfile.open(fileobj=target, mode="w|", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        for e in index:
            name = "." if e.path == b"/" else "." + os.fsdecode(e.path)
            ti = tarfile.TarInfo(name)
            ti.mode, ti.uid, ti.gid = e.mode, e.uid, e.gid
            ti.mtime = e.mtime_ns // 1_000_000_000
            pax = {"mtime": _mtime_pax(e.mtime_ns)}
            for k, v in (e.xattrs or {}).items():
                pax["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
            data = None
            if e.link is not None and e.link in first_of_group:
                ti.type, ti.linkname = tarfile.LNKTYPE, first_of_group[e.link]
            elif e.kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif e.kind == "file":
                assert e.digest is not None
                ti.type, ti.size = tarfile.REGTYPE, e.size
                data = io.BufferedReader(PartsReader(store.iter_content(e.digest)))
            elif e.kind == "symlink":
                assert e.target is not None
                ti.type, ti.linkname = tarfile.SYMTYPE, os.fsdecode(e.target)
            elif e.kind in ("char", "block"):
                ti.type = tarfile.CHRTYPE if e.kind == "char" else tarfile.BLKTYPE
                ti.devmajor, ti.devminor = os.major(e.rdev), os.minor(e.rdev)
            elif e.kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            if e.link is not None and e.link not in first_of_group:
                first_of_group[e.link] = name
            ti.pax_headers = pax
            tar.addfile(ti, data)
            if data is not None:
                progress.advance(files=1, nbytes=e.size)
    if closer is not None:
        closer.close()  # ends the gzip member / zstd frame; ``out`` stays open
