"""Debian root filesystems made with debootstrap, built once per recipe and cached.

A recipe is (suite, variant, extra packages, mirror). Its cache directory is named by the
digest of the recipe, so a changed recipe never reuses a stale tree. The tree is built in
a temporary sibling directory and renamed into place only when debootstrap succeeded, so an
interrupted build leaves nothing that looks finished.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from swarm.digest import hash_bytes, to_hex
from swarm.errors import BuildError

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_CACHE_DIR = Path(os.environ.get("SWARM_DEBOOTSTRAP_CACHE", "/var/cache/swarm/debootstrap"))


def recipe_key(suite: str, variant: str, include: Iterable[str], mirror: str) -> str:
    recipe = {"suite": suite, "variant": variant, "include": sorted(set(include)),
              "mirror": mirror}
    return to_hex(hash_bytes(json.dumps(recipe, sort_keys=True).encode()))[:16]


def ensure_rootfs(
    suite: str = "bookworm",
    variant: str = "minbase",
    include: Iterable[str] = (),
    mirror: str = DEFAULT_MIRROR,
    cache_dir: Path | None = None,
    quiet: bool = True,
) -> Path:
    """Return the path of a cached debootstrap tree for this recipe, building it if needed."""
    include = sorted(set(include))
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = f"{suite}-{variant}" + (f"-{'-'.join(include)}" if include else "")
    name = f"{name[:60]}-{recipe_key(suite, variant, include, mirror)}"
    final = cache_dir / name
    marker = cache_dir / f"{name}.complete"  # outside the tree: it is not image content
    if marker.exists() and final.is_dir():
        return final
    with open(cache_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same recipe
        if marker.exists() and final.is_dir():
            return final
        if shutil.which("debootstrap") is None:
            raise BuildError("debootstrap is not installed (run ops/install)")
        tmp = cache_dir / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = ["debootstrap", f"--variant={variant}"]
        if include:
            cmd.append("--include=" + ",".join(include))
        cmd += [suite, str(tmp), mirror]
        out = subprocess.DEVNULL if quiet else sys.stderr
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE if quiet else None)
        if proc.returncode != 0:
            err = (proc.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
            shutil.rmtree(tmp, ignore_errors=True)
            raise BuildError(f"debootstrap {suite} failed: {' / '.join(err)}")
        # apt's caches are not part of the image a user wants
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            d = tmp / sub
            if d.is_dir():
                for child in d.iterdir():
                    if child.is_file() and child.name != "lock":
                        child.unlink()
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        marker.touch()
        return final
