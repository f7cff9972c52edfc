"""The layer cache: step key -> the image id the step produced.

A step's key is the digest of what determines its result: the parent (image id and the
config the step runs under), the instruction after substitution, and for COPY/ADD the
digests of the files it copies. A hit starts no container and reads nothing but the
files it would copy. A changed step has a new key, and so has every step after it (their
parent changed); steps before it keep theirs.

Entries are small files ``<state>/buildcache/<key hex>`` holding the image id in hex,
written by rename so a crash leaves either the old entry or the new one. A hit whose
image was removed (``swarm image rm``) counts as a miss.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import msgpack

from swarm.digest import from_hex, hash_bytes, is_hex_digest, to_hex
from swarm.errors import NotFound
from swarm.fs import images
from swarm.store import Store

CACHE_DIR = "buildcache"
KEY_VERSION = "swarm-build-1"


def step_key(*parts: Any) -> bytes:
    """The digest of ``parts`` (msgpack-encodable values: bytes, str, ints, lists, maps);
    maps are encoded with sorted keys so equal steps give equal keys."""
    return hash_bytes(msgpack.packb([KEY_VERSION, *_canonical(parts)], use_bin_type=True))


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return [[k, _canonical(obj[k])] for k in sorted(obj)]
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    return obj


class LayerCache:
    """Step keys -> image ids, under a state directory."""

    def __init__(self, state_dir: str | os.PathLike[str], store: Store) -> None:
        self.dir = Path(state_dir) / CACHE_DIR
        self.store = store
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> bytes | None:
        try:
            text = (self.dir / to_hex(key)).read_text().strip()
        except OSError:
            self.misses += 1
            return None
        if not is_hex_digest(text):
            self.misses += 1
            return None
        image_id = from_hex(text)
        try:
            images.record(self.store, image_id)
        except NotFound:
            self.misses += 1
            return None
        self.hits += 1
        return image_id

    def put(self, key: bytes, image_id: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / to_hex(key)
        tmp = final.with_name(f".{final.name}.{os.getpid()}")
        tmp.write_text(to_hex(image_id) + "\n")
        try:
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
