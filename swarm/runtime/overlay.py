"""The per-container overlayfs: read-only image layers below, a private upper dir above.

A container directory holds ``upper/`` (the container's writes), ``work/`` (overlayfs's
scratch space, same filesystem as ``upper``) and ``merged/`` (the mount, which becomes the
container's rootfs). Nothing is copied: starting a container costs one mount(2).

Mounts are made with the mount(2) syscall through ctypes: a ``mount`` process costs
~2 ms of fork/exec per container for no gain.

Options, chosen so the lower may be a FUSE mount and the upper can be indexed as a layer:

- ``index=off``: the inode index needs file handles (export ops) of the lower fs, which a
  FUSE lower does not offer; overlayfs would fall back with a kernel warning anyway.
- ``xino=off``: same reason (xino=auto needs file handles to be useful); inode numbers
  then come straight from the layer that holds the file.
- ``redirect_dir=off``: a rename of a lower directory then fails with EXDEV and ``mv``
  copies instead. With redirects, the upper would hold a pointer into the lower that only
  overlayfs can follow, and a build step's upper dir could not be read as a plain layer.
- ``metacopy=off``: for the same reason: a chmod/chown must copy the data up, so the
  upper dir holds every byte of every file it names.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from swarm.errors import MountError

OVERLAY_OPTIONS: tuple[str, ...] = ("index=off", "xino=off", "redirect_dir=off", "metacopy=off")
# Legacy mount(2) copies at most one page of option data; longer lower lists need the new
# mount API (fsconfig "lowerdir+", Linux 6.8+).
MAX_MOUNT_DATA_BYTES = 4095
MNT_DETACH = 2
MOUNTINFO = Path("/proc/self/mountinfo")

UPPER_DIR = "upper"
WORK_DIR = "work"
MERGED_DIR = "merged"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def _escape(path: Path) -> str:
    """Escape a path for overlayfs's option parser (``,`` splits options, ``:`` layers)."""
    text = os.fsdecode(os.path.abspath(path))
    return text.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def overlay_options(lowerdirs: Sequence[Path], upper: Path, work: Path,
                    volatile: bool = False) -> str:
    """The option string for mount(2); the first lowerdir is the topmost layer."""
    if not lowerdirs:
        raise MountError("an overlay needs at least one lower directory")
    opts = [
        "lowerdir=" + ":".join(_escape(p) for p in lowerdirs),
        "upperdir=" + _escape(upper),
        "workdir=" + _escape(work),
        *OVERLAY_OPTIONS,
    ]
    if volatile:
        opts.append("volatile")
    data = ",".join(opts)
    if len(data.encode()) > MAX_MOUNT_DATA_BYTES:
        raise MountError(
            f"overlay options are {len(data.encode())} bytes, over mount(2)'s limit of "
            f"{MAX_MOUNT_DATA_BYTES}: too many or too long lower directories"
        )
    return data


@dataclass(frozen=True)
class Overlay:
    """A mounted overlay; ``merged`` is the directory to use as a rootfs."""

    container_dir: Path
    lowerdirs: tuple[Path, ...]

    @property
    def upper(self) -> Path:
        return self.container_dir / UPPER_DIR

    @property
    def work(self) -> Path:
        return self.container_dir / WORK_DIR

    @property
    def merged(self) -> Path:
        return self.container_dir / MERGED_DIR

    def unmount(self, remove: bool = False) -> None:
        """Unmount; with ``remove`` also delete the container dir (upper included)."""
        unmount(self.merged)
        if remove:
            shutil.rmtree(self.container_dir, ignore_errors=True)


def mount_tmpfs(target: Path, options: str) -> None:
    """Mount a tmpfs at ``target`` (an existing directory) with ``options``
    (e.g. ``size=1g,mode=0700``)."""
    if _libc.mount(b"tmpfs", os.fsencode(target), b"tmpfs", 0, options.encode()) != 0:
        err = ctypes.get_errno()
        raise MountError(f"cannot mount a tmpfs at {target}: {os.strerror(err)}")


def mount_overlay(lowerdirs: Sequence[Path], container_dir: Path, *,
                  volatile: bool = False) -> Overlay:
    """Mount an overlay of ``lowerdirs`` (topmost first) at ``container_dir/merged``.

    ``volatile`` skips overlayfs's sync of the upper filesystem (on unmount and syncfs):
    right for a container whose writes are thrown away, wrong for one whose upper dir
    must survive a crash.
    """
    container_dir = Path(os.path.abspath(container_dir))
    lowers = tuple(Path(os.path.abspath(p)) for p in lowerdirs)
    ov = Overlay(container_dir, lowers)
    data = overlay_options(lowers, ov.upper, ov.work, volatile)
    for d in (ov.upper, ov.work, ov.merged):
        d.mkdir(parents=True, exist_ok=True)
    # No nosuid/nodev: images carry setuid binaries (su, ping) that must keep working.
    if _libc.mount(b"overlay", os.fsencode(ov.merged), b"overlay", 0, data.encode()) != 0:
        err = ctypes.get_errno()
        raise MountError(
            f"cannot mount overlay at {ov.merged}: {os.strerror(err)}"
            " (the kernel log says why)"
        )
    return ov


def unmount(target: Path) -> None:
    """Unmount ``target``; if it is busy, detach it (lazy unmount) instead of failing.

    A target that is not mounted is not an error: teardown paths call this more than once.
    """
    path = os.fsencode(os.path.abspath(target))
    if _libc.umount2(path, 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY:
        if _libc.umount2(path, MNT_DETACH) == 0:
            return
        err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more)
        return
    raise MountError(f"cannot unmount {target}: {os.strerror(err)}")


@contextlib.contextmanager
def overlay(lowerdirs: Sequence[Path], container_dir: Path, *, volatile: bool = False,
            remove: bool = True) -> Iterator[Overlay]:
    """Mount for the duration of a ``with`` block; unmount (and remove) however it ends."""
    ov = mount_overlay(lowerdirs, container_dir, volatile=volatile)
    try:
        yield ov
    finally:
        ov.unmount(remove=remove)


_MOUNTINFO_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape_mountinfo(field: bytes) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    raw = _MOUNTINFO_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field)
    return os.fsdecode(raw)


def mounts_under(directory: Path, fstype: str = "overlay",
                 mountinfo: Path = MOUNTINFO) -> list[Path]:
    """Mount points of ``fstype`` at or below ``directory``, deepest first."""
    base = os.path.abspath(directory)
    prefix = base.rstrip("/") + "/"
    found = []
    for line in mountinfo.read_bytes().splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-")
        except ValueError:
            continue
        if os.fsdecode(fields[sep + 1]) != fstype:
            continue
        point = _unescape_mountinfo(fields[4])
        if point == base or point.startswith(prefix):
            found.append(Path(point))
    found.sort(key=lambda p: len(p.parts), reverse=True)
    return found


def cleanup_leftovers(state_dir: Path) -> list[Path]:
    """Unmount every overlay under ``state_dir`` and remove its container directory.

    For a node starting after a crash: nothing of a previous run's containers is in use,
    so every overlay mounted below its state dir is a leftover. Returns the mount points.
    """
    removed = []
    for point in mounts_under(state_dir):
        unmount(point)
        removed.append(point)
        if point.name == MERGED_DIR and (point.parent / UPPER_DIR).is_dir():
            shutil.rmtree(point.parent, ignore_errors=True)
    return removed
