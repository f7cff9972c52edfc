"""Hot sets: the files an image's containers read first, in order, to prefetch on cold nodes.

A mount records the digest of every file the first time it is read (:class:`HotSetRecorder`).
When the mount goes idle or away, the recording is merged into the image's previous hot set
(previous order first, then digests seen for the first time, so the order of first
appearance over all runs is kept) and stored as a blob: a msgpack array of 32-byte digests,
linked to the image with ``images.set_hot_set``. A mount on a node whose cache is cold
prefetches that list from the blob source, a few files at a time, while the container
starts: by the time the program opens those files they are usually local.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import msgpack

from swarm.digest import DIGEST_SIZE, to_hex
from swarm.errors import SwarmError
from swarm.fs import images
from swarm.fs.source import DEFAULT_PREFETCH_CONCURRENCY, Fetcher, PrefetchReport
from swarm.store import Store

log = logging.getLogger(__name__)

# A hot set is for start-up: past this many files it stops being "what is read first".
MAX_HOT_SET_ENTRIES = 50_000
# A mount saves its recording once no file has been read for the first time for this long
# (and again on unmount), so a container that runs for hours still leaves a hot set.
HOT_SET_IDLE_S = 10.0


class HotSetRecorder:
    """The digests a mount read, in the order of their first read. ``record`` is called
    on every read, so it is one dict lookup when the digest was seen before."""

    def __init__(self) -> None:
        self._seen: dict[bytes, None] = {}
        self._saved = 0  # how many of _seen the last save included

    def record(self, digest: bytes) -> None:
        if digest not in self._seen and len(self._seen) < MAX_HOT_SET_ENTRIES:
            self._seen[digest] = None

    @property
    def digests(self) -> list[bytes]:
        return list(self._seen)

    @property
    def dirty(self) -> bool:
        """Whether digests were recorded since the last save."""
        return len(self._seen) > self._saved

    def mark_saved(self, count: int | None = None) -> None:
        """The first ``count`` digests (default: all) are in the stored hot set."""
        self._saved = len(self._seen) if count is None else count

    def __len__(self) -> int:
        return len(self._seen)


def encode(digests: Iterable[bytes]) -> bytes:
    return msgpack.packb(list(digests), use_bin_type=True)


def decode(raw: bytes) -> list[bytes]:
    """A hot-set blob's digests; ValueError when it is not a list of 32-byte digests."""
    try:
        doc = msgpack.unpackb(raw, raw=False)
    except (ValueError, msgpack.UnpackException) as err:
        raise ValueError(f"malformed hot set: {err}") from err
    if not isinstance(doc, list) or not all(
            isinstance(d, bytes) and len(d) == DIGEST_SIZE for d in doc):
        raise ValueError("malformed hot set: not a list of digests")
    return doc


def merge(previous: Iterable[bytes], recorded: Iterable[bytes],
          limit: int = MAX_HOT_SET_ENTRIES) -> list[bytes]:
    """``previous`` then the digests of ``recorded`` not in it, each once, at most
    ``limit`` long."""
    out: dict[bytes, None] = {}
    for d in previous:
        out.setdefault(d, None)
    for d in recorded:
        if len(out) >= limit:
            break
        out.setdefault(d, None)
    return list(out)[:limit]


def load(store: Store, image_id: bytes) -> list[bytes]:
    """The image's hot set from the local store; empty when it has none (or it is not
    local or not readable: a hot set is a hint, never a reason to fail)."""
    digest = images.hot_set(store, image_id)
    if digest is None:
        return []
    try:
        return decode(store.get(digest))
    except (SwarmError, ValueError) as err:
        log.warning("hot set %s of image %s is unusable: %s", to_hex(digest),
                    to_hex(image_id), err)
        return []


def save(store: Store, image_id: bytes, recorded: Iterable[bytes]) -> bytes | None:
    """Merge ``recorded`` into the image's hot set; returns the new hot-set digest, or
    None when nothing changed."""
    previous = load(store, image_id)
    merged = merge(previous, recorded)
    if merged == previous:
        return None
    digest = store.put(encode(merged))
    images.set_hot_set(store, image_id, digest)
    return digest


async def prefetch(store: Store, image_id: bytes, fetcher: Fetcher, *,
                   concurrency: int = DEFAULT_PREFETCH_CONCURRENCY,
                   durable: bool = True) -> PrefetchReport:
    """Fetch the image's hot set into the local store (digests already local are skipped).
    The hot-set blob itself comes from the source when only its digest is known here."""
    digest = images.hot_set(store, image_id)
    if digest is None:
        return PrefetchReport()
    if not store.has(digest):
        try:
            await fetcher.ensure(digest)
        except SwarmError as err:
            log.warning("hot set %s of image %s not fetched: %s", to_hex(digest),
                        to_hex(image_id), err)
            return PrefetchReport(failed=1)
    return await fetcher.prefetch(load(store, image_id), concurrency=concurrency,
                                  durable=durable)
