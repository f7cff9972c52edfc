"""The pyfuse3 adapter: kernel requests in, :class:`~swarm.fs.tree.Tree` calls, replies out.

Nothing here decides what the filesystem contains (that is ``swarm.fs.tree``); this module
decides how little the kernel needs to ask. The image is immutable, so:

* entries and attributes are cached by the kernel for :data:`CACHE_TIMEOUT_S`, and a name
  that does not exist is answered with a *negative entry* (inode 0) with the same timeout,
  so the many failed ``stat`` calls of a Python import reach the daemon once each;
* ``readdir`` is ``readdirplus``: listing a directory hands the kernel every child's
  attributes, so the lookups that usually follow a listing never happen;
* ``open`` answers with ``keep_cache`` (FOPEN_KEEP_CACHE): the page cache of a file
  survives close and reopen, so a file's bytes are read through FUSE once per mount;
  the file handle is the inode number, so ``read`` needs no table and ``release`` is a
  no-op. (Answering ``open`` with ENOSYS would spare the open round trip, but pyfuse3's
  ``read`` then cannot tell which file is meant and deadlocks: never do that.)
* ``flush`` answers ENOSYS once, which makes the kernel stop sending it;
* an image without any xattr answers ``getxattr`` with ENOSYS once, which makes the kernel
  answer every later ``getxattr`` itself (EOPNOTSUPP). Otherwise every ``execve`` (for
  ``security.capability``) and every overlayfs lookup of a lower directory (for
  ``trusted.overlay.*``) would be a round trip.
* mount options ``ro`` (the kernel refuses writes itself), ``default_permissions`` (the
  kernel checks modes, so ``access`` is never sent), ``allow_other`` (containers run as
  other users).

Every op counts itself in :attr:`SwarmOperations.ops` (exposed by the daemon), so a
benchmark can show which requests still reach Python. Ops raise ``pyfuse3.FUSEError`` and
nothing else: ``OSError`` from the tree keeps its errno, store and fetch errors become EIO
(logged, never wrong bytes), anything unexpected is logged with its traceback and becomes
EIO too.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3

from swarm.errors import SwarmError
from swarm.fs.tree import Attrs, Tree

log = logging.getLogger(__name__)

# The image never changes while mounted: let the kernel keep names and attributes for a
# week (the longest any container lives), including "no such file" answers.
CACHE_TIMEOUT_S = 7 * 24 * 3600.0
# st_blksize: stdio and Python's io size their buffers by it.
BLOCK_SIZE_BYTES = 64 << 10
STAT_BLOCK_BYTES = 512  # st_blocks unit
NAME_MAX_BYTES = 255
MOUNT_OPTIONS = frozenset({
    "ro", "default_permissions", "allow_other", "noatime", "fsname=swarm", "subtype=swarm",
})

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def _fuse_op(fn: _F) -> _F:
    """Count the op and translate every error at the boundary (see the module docstring)."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: SwarmOperations, *args: Any) -> Any:
        self.ops[name] += 1
        t0 = time.perf_counter_ns()
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as err:
            raise pyfuse3.FUSEError(err.errno or errno.EIO) from None
        except SwarmError as err:
            self.errors += 1
            log.error("%s%r failed: %s", name, args[:2], err)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            self.errors += 1
            log.exception("%s%r failed unexpectedly", name, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            dt = time.perf_counter_ns() - t0
            self.op_ns[name] += dt
            if self.trace is not None:
                self.trace.append((t0, dt, name, args[:3]))

    return wrapper  # type: ignore[return-value]


class SwarmOperations(pyfuse3.Operations):
    """pyfuse3 operations over one :class:`Tree` (one image, read-only)."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree) -> None:
        super().__init__()
        self.tree = tree
        self.ops: Counter[str] = Counter()
        self.op_ns: Counter[str] = Counter()  # time spent in each kind of op, here
        self.errors = 0
        # (start ns, duration ns, op, first arguments) of every op, when tracing
        self.trace: list[tuple[int, int, str, tuple[Any, ...]]] | None = None
        # EntryAttributes are copied into each reply, so one object per inode serves all.
        self._attr_cache: dict[int, pyfuse3.EntryAttributes] = {}
        self._negative = pyfuse3.EntryAttributes()
        self._negative.st_ino = 0
        self._negative.entry_timeout = CACHE_TIMEOUT_S
        self._content_blocks = -(-tree.index.content_bytes() // BLOCK_SIZE_BYTES)
        # Called when the kernel's INIT arrives, before it is answered (so it must not
        # block); the daemon uses it to tune the mount once the kernel has set it up.
        self.on_init: Callable[[], None] | None = None

    def init(self) -> None:
        if self.on_init is not None:
            self.on_init()

    def _entry(self, a: Attrs) -> pyfuse3.EntryAttributes:
        ea = self._attr_cache.get(a.ino)
        if ea is None:
            ea = pyfuse3.EntryAttributes()
            ea.st_ino = a.ino
            ea.generation = 0
            ea.entry_timeout = CACHE_TIMEOUT_S
            ea.attr_timeout = CACHE_TIMEOUT_S
            ea.st_mode = a.mode
            ea.st_nlink = a.nlink
            ea.st_uid = a.uid
            ea.st_gid = a.gid
            ea.st_rdev = a.rdev
            ea.st_size = a.size
            ea.st_blksize = BLOCK_SIZE_BYTES
            ea.st_blocks = -(-a.size // STAT_BLOCK_BYTES)
            ea.st_atime_ns = ea.st_ctime_ns = ea.st_mtime_ns = a.mtime_ns
            self._attr_cache[a.ino] = ea
        return ea

    # ------------------------------------------------------------------ names and attributes
    @_fuse_op
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        attrs = self.tree.lookup(parent_inode, name)
        return self._negative if attrs is None else self._entry(attrs)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Inodes live as long as the tree: nothing to forget (and nothing to count)."""

    @_fuse_op
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(self.tree.getattr(inode))

    @_fuse_op
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        return self.tree.readlink(inode)

    @_fuse_op
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        sv = pyfuse3.StatvfsData()
        sv.f_bsize = sv.f_frsize = BLOCK_SIZE_BYTES
        sv.f_blocks = self._content_blocks
        sv.f_bfree = sv.f_bavail = 0
        sv.f_files = self.tree.inode_count
        sv.f_ffree = sv.f_favail = 0
        sv.f_namemax = NAME_MAX_BYTES
        return sv

    # ------------------------------------------------------------------ xattrs
    @_fuse_op
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        if not self.tree.has_xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel stops asking (see above)
        return self.tree.getxattr(inode, name)

    @_fuse_op
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        return self.tree.listxattr(inode)

    # ------------------------------------------------------------------ files
    @_fuse_op
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        if self.tree.entry(inode).kind != "file":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_fuse_op
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.tree.read(fh, off, size)

    @_fuse_op
    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)  # once: the kernel then stops sending flush

    @_fuse_op
    async def release(self, fh: int) -> None:
        """Nothing to release: the handle is the inode number."""

    # ------------------------------------------------------------------ directories
    @_fuse_op
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        if not stat.S_ISDIR(self.tree.getattr(inode).mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_fuse_op
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name, attrs, next_id in self.tree.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self._entry(attrs), next_id):
                return

    @_fuse_op
    async def releasedir(self, fh: int) -> None:
        """Nothing to release: the handle is the inode number."""

    # ------------------------------------------------------------------ stats
    def op_counts(self) -> dict[str, int]:
        return dict(sorted(self.ops.items()))

    def op_times_ms(self) -> dict[str, float]:
        return {k: round(v / 1e6, 2) for k, v in sorted(self.op_ns.items())}

    def reset_counts(self) -> None:
        self.ops.clear()
        self.op_ns.clear()
