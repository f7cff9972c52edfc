"""What a node tells the cluster about itself: load, GPUs, containers, cache warmth (small,
gossiped in every ALIVE), and which blobs it holds (a Bloom filter, sent in push/pull).

The small state is quantized (CPU and memory to 5 %, warmth to 5 %) so that it only
*changes*, and is only gossiped, when something a scheduler would care about moved; a
busy CPU jittering by a percent would otherwise cost a broadcast every 2 s per node.

Keys of the gossiped map (short: it rides in a 1400-byte datagram):
``cpu`` % busy · ``mem`` % used · ``mem_mib`` total · ``gpu`` list of
``[model, mem_mib, mem_used_mib, util_%]`` · ``ctr`` containers running · ``q`` inputs
queued · ``warm`` map of image id (first 16 hex) -> % of its hot set held locally.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from swarm.digest import to_hex

log = logging.getLogger(__name__)

PERCENT_STEP = 5  # quantum of CPU, memory and warmth percentages
LOAD_BAND = 25  # CPU percentages that rank_peers counts as equally busy
GPU_UTIL_STEP = 10  # quantum of GPU utilisation
MAX_WARM_IMAGES = 8  # images listed in ``warm``: the warmest first
IMAGE_KEY_HEX = 16  # image ids are abbreviated to this many hex characters in gossip
# Bloom filter: bits per blob and hash count for ~1 % false positives.
BLOOM_BITS_PER_ITEM = 10
BLOOM_HASHES = 7
BLOOM_MIN_BITS = 1024
BLOOM_MAX_BITS = 64 << 20  # 8 MiB: a node with millions of blobs still fits a sync frame


def _q(value: float, step: int) -> int:
    return int(round(value / step) * step)


def image_key(image_id: bytes) -> str:
    return to_hex(image_id)[:IMAGE_KEY_HEX]


# ---------------------------------------------------------------------- measuring
def gpu_state() -> list[list[Any]]:
    """Every NVIDIA GPU: [model, memory MiB, used MiB, utilisation %]. No driver, no
    library or no GPU is an empty list, never an error: most nodes have none."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no GPUs
        return []
    out: list[list[Any]] = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
            except Exception:
                util = 0
            out.append([name.decode() if isinstance(name, bytes) else str(name),
                        int(mem.total) >> 20, int(mem.used) >> 20, _q(util, GPU_UTIL_STEP)])
    except Exception as err:
        log.debug("GPU query failed: %s", err)
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return out


def image_warmth(store: Any) -> dict[str, int]:
    """Per image with a recorded hot set: the % of that hot set's leaves held locally,
    the warmest :data:`MAX_WARM_IMAGES` only."""
    from swarm.fs import hotset, images

    warm: list[tuple[int, str]] = []
    for rec in images.list_images(store):
        hot = hotset.load(store, rec.id)
        if not hot:
            continue
        held = sum(1 for d in hot if not store.missing(d))
        warm.append((_q(100 * held / len(hot), PERCENT_STEP), image_key(rec.id)))
    warm.sort(reverse=True)
    return {k: pct for pct, k in warm[:MAX_WARM_IMAGES]}


@dataclass
class StateSampler:
    """Measures this node's state. Each provider is optional, so the sampler runs on a
    laptop with no containers and in tests with fakes."""

    store: Any = None
    containers: Callable[[], int] | None = None
    queued: Callable[[], int] | None = None
    gpus: Callable[[], list[list[Any]]] = gpu_state

    def sample(self) -> dict[str, Any]:
        """The gossiped map (blocking: psutil, NVML and LMDB; run it off the loop)."""
        import psutil

        vm = psutil.virtual_memory()
        state: dict[str, Any] = {
            "cpu": _q(psutil.cpu_percent(interval=None), PERCENT_STEP),
            "mem": _q(vm.percent, PERCENT_STEP), "mem_mib": int(vm.total) >> 20,
            "gpu": self.gpus(),
            "ctr": self.containers() if self.containers else 0,
            "q": self.queued() if self.queued else 0,
        }
        if self.store is not None:
            try:
                state["warm"] = image_warmth(self.store)
            except Exception as err:  # a hint: never take the node's gossip down
                log.warning("cache warmth not measured: %s", err)
        return state


# ---------------------------------------------------------------------- blob filter
class BloomFilter:
    """A set of digests with ~1 % false positives and no false negatives: which blobs a
    peer holds, in 10 bits per blob instead of 32 bytes. Digests are already uniform
    hashes, so the k bit positions come from slicing one BLAKE2 of the digest."""

    def __init__(self, nbits: int, hashes: int = BLOOM_HASHES,
                 bits: bytes | None = None) -> None:
        self.nbits = nbits
        self.hashes = hashes
        self.bits = bytearray(bits) if bits is not None else bytearray((nbits + 7) // 8)

    @classmethod
    def for_items(cls, n: int) -> BloomFilter:
        nbits = min(BLOOM_MAX_BITS, max(BLOOM_MIN_BITS, n * BLOOM_BITS_PER_ITEM))
        return cls(nbits)

    @classmethod
    def of(cls, digests: Sequence[bytes]) -> BloomFilter:
        f = cls.for_items(len(digests))
        for d in digests:
            f.add(d)
        return f

    def _positions(self, digest: bytes) -> Iterable[int]:
        h = hashlib.blake2b(digest, digest_size=4 * self.hashes).digest()
        for i in range(self.hashes):
            yield int.from_bytes(h[4 * i:4 * i + 4], "little") % self.nbits

    def add(self, digest: bytes) -> None:
        for p in self._positions(digest):
            self.bits[p >> 3] |= 1 << (p & 7)

    def __contains__(self, digest: object) -> bool:
        if not isinstance(digest, bytes):
            return False
        return all(self.bits[p >> 3] >> (p & 7) & 1 for p in self._positions(digest))

    def encode(self) -> list[Any]:
        return [self.nbits, self.hashes, bytes(self.bits)]

    @classmethod
    def decode(cls, obj: object) -> BloomFilter | None:
        """A filter a peer sent; None when malformed (then it is just not used)."""
        if not (isinstance(obj, list) and len(obj) == 3 and isinstance(obj[0], int)
                and isinstance(obj[1], int) and isinstance(obj[2], bytes)):
            return None
        nbits, k, bits = obj
        if not (0 < nbits <= BLOOM_MAX_BITS and 0 < k <= 16
                and len(bits) == (nbits + 7) // 8):
            return None
        return cls(nbits, k, bits)

    def false_positive_rate(self, n: int) -> float:
        return float((1 - math.exp(-self.hashes * n / self.nbits)) ** self.hashes)


def held_digests(store: Any) -> list[bytes]:
    """Every blob and file digest the store can serve whole or in part: a file whose
    manifest is here is offered, since its chunks mostly are too (the fetch verifies)."""
    out: list[bytes] = []
    with store.env.begin() as txn:
        for db in ("blobs", "files"):
            cur = txn.cursor(db=store.db[db])
            out.extend(bytes(k) for k in cur.iternext(keys=True, values=False))
    return out


# ---------------------------------------------------------------------- ranking
def rank_peers(peers: Sequence[tuple[str, dict[str, Any], BloomFilter | None]],
               digest: bytes, image_id: bytes | None = None) -> list[str]:
    """Peer addresses in the order a blob fetch should ask them: those whose filter holds
    ``digest`` first, then by warmth for ``image_id``, then by load in bands of
    :data:`LOAD_BAND` percent; a peer with no filter yet counts as "maybe". Ties keep the
    caller's order (it rotates by digest to spread load): peers about as busy share the
    fetches, rather than a few percent of CPU, sampled at another moment, sending every
    one to the same peer (which also left peers that tests make lie or die unasked)."""
    key = image_key(image_id) if image_id is not None else None

    def score(item: tuple[int, tuple[str, dict[str, Any], BloomFilter | None]]) -> tuple[
            int, int, int, int]:
        i, (_addr, meta, bloom) = item
        has = 0 if bloom is not None and digest in bloom else (1 if bloom is None else 2)
        warm = meta.get("warm", {}) if isinstance(meta.get("warm"), dict) else {}
        pct = warm.get(key, 0) if key is not None else 0
        cpu = meta.get("cpu", 0) if isinstance(meta.get("cpu"), int) else 0
        return (has, -int(pct), int(cpu) // LOAD_BAND, i)

    return [p[0] for _i, p in sorted(enumerate(peers), key=score)]
