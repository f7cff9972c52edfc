"""The LMDB content-addressed store (CAS): every byte swarm keeps on a machine lives here.

One LMDB environment per state directory (``<state>/store``), shared by every process of
the machine (the node, its FUSE daemon, builders, the CLI): LMDB serialises writers with
its lock file and gives readers lock-free snapshots, and a commit is atomic, so a process
SIGKILLed mid-write leaves the last committed state, never a half-written blob. Commits
fsync the data pages but not the meta page (LMDB's NOMETASYNC): an OS crash may lose the
last transaction, never the integrity of the file; a cache can afford that, and it halves
the fsyncs of every write.

Sub-databases, keys and values (every integer is unsigned big-endian; a digest is the
32-byte BLAKE3 of the bytes it names):

``blobs``     digest(32) -> the blob's bytes. A *leaf* blob: at most one chunk long.
``files``     digest(32) -> chunk manifest of a file longer than one chunk:
              ``u64 total_size | u32 chunk_size | chunk digest(32) * n``. Every chunk but
              the last is exactly ``chunk_size`` bytes. The key is the digest of the whole
              content, so equal files dedup whatever their chunking; the chunks are leaves
              in ``blobs`` and dedup on their own.
``use``       leaf digest(32) -> ``u64 last_use_ns | u64 size``: when the leaf was last read
              or written (wall clock, nanoseconds) and its length, for LRU eviction.
``lru``       ``u64 last_use_ns | digest(32)`` -> b"": the same, ordered oldest first.
``pins``      ``digest(32) | u32 pid`` -> ``u32 count``: a pinned digest is never evicted.
              pid 0 is a durable pin (an image holds its index); any other pid is a process
              that uses the blob, and its pins lapse when that process is gone.
``images``    image id(32) -> msgpack map, the image record (see swarm.store.images).
``names``     utf-8 ``name:tag`` -> image id(32).
``hotsets``   image id(32) -> digest(32) of the image's hot-set blob.
``counters``  ascii name -> u64: ``bytes`` and ``blobs`` (leaf bytes and leaves held),
              ``hits``, ``misses``, ``puts``, ``dedup`` (puts of bytes already held),
              ``evicted``.
``config``    ascii name -> bytes: ``format`` (b"1").
"""

from swarm.store.cas import DEFAULT_CHUNK_SIZE, Store, StoreStats, VerifyReport

__all__ = ["DEFAULT_CHUNK_SIZE", "Store", "StoreStats", "VerifyReport"]
