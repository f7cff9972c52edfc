"""The image catalog: image records, ``NAME[:TAG]`` names, and the roots for ``cache gc``.

Records live in the store's ``images`` sub-database, names in ``names`` (layouts in
``swarm/store/__init__.py``). Registering an image is one LMDB transaction: the record, its
names and the durable pin of its index blob appear together or not at all, so an import
that fails part-way leaves no image record (its blobs are unreferenced, and ``gc`` drops
them).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgpack

from swarm.digest import DIGEST_SIZE, from_hex, is_hex_digest, is_hex_prefix, to_hex
from swarm.errors import NotFound, UsageError
from swarm.fs.index import Index
from swarm.store import Store

DEFAULT_TAG = "latest"
# Docker's reference grammar, simplified: lowercase path components separated by "/",
# optionally led by a registry host[:port]; a tag of up to 128 characters.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9-]+)*(?::[0-9]+)?/)?"
_REPO_RE = re.compile(rf"{_HOST}{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def parse_name(ref: str) -> str:
    """``NAME[:TAG]`` -> ``name:tag`` (tag defaults to ``latest``); UsageError if malformed."""
    repo, tag = ref, DEFAULT_TAG
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = ref.rsplit(":", 1)
    if not _REPO_RE.fullmatch(repo) or not _TAG_RE.fullmatch(tag):
        raise UsageError(
            f"invalid image name {ref!r}: want NAME[:TAG], NAME lowercase letters, digits "
            "and . _ - / separators")
    return f"{repo}:{tag}"


@dataclass
class ImageRecord:
    id: bytes
    names: list[str] = field(default_factory=list)
    created: float = 0.0
    source: str = ""
    entries: int = 0
    content_bytes: int = 0
    new_bytes: int = 0  # bytes the import added to the store (the rest deduplicated)

    def encode(self) -> bytes:
        return msgpack.packb({
            "names": sorted(self.names), "created": self.created, "source": self.source,
            "entries": self.entries, "content_bytes": self.content_bytes,
            "new_bytes": self.new_bytes}, use_bin_type=True)

    @classmethod
    def decode(cls, image_id: bytes, raw: bytes) -> ImageRecord:
        d = msgpack.unpackb(raw, raw=False)
        return cls(id=image_id, names=list(d.get("names", [])), created=d.get("created", 0.0),
                   source=d.get("source", ""), entries=d.get("entries", 0),
                   content_bytes=d.get("content_bytes", 0), new_bytes=d.get("new_bytes", 0))

    def as_json(self) -> dict[str, Any]:
        return {"id": to_hex(self.id), "names": self.names, "created": self.created,
                "source": self.source, "entries": self.entries,
                "content_bytes": self.content_bytes, "new_bytes": self.new_bytes}


def register(store: Store, index: Index, names: list[str], *, source: str,
             new_bytes: int = 0) -> ImageRecord:
    """Store the index blob and record the image under ``names`` in one transaction.

    Every file digest of the index must already be in the store. A name that pointed at
    another image moves to this one (as ``docker tag`` does).
    """
    raw = index.encode()
    names = [parse_name(n) for n in names]
    with store.batch() as batch:
        image_id = batch.put(raw)
        txn = batch.txn
        db_images, db_names = store.db["images"], store.db["names"]
        old = txn.get(image_id, db=db_images)
        record = (ImageRecord.decode(image_id, bytes(old)) if old is not None
                  else ImageRecord(id=image_id, created=time.time(), source=source,
                                   entries=len(index), content_bytes=index.content_bytes(),
                                   new_bytes=new_bytes))
        for name in names:
            prev = txn.get(name.encode(), db=db_names)
            if prev is not None and bytes(prev) != image_id:
                prev_raw = txn.get(bytes(prev), db=db_images)
                if prev_raw is not None:
                    prev_rec = ImageRecord.decode(bytes(prev), bytes(prev_raw))
                    prev_rec.names = [n for n in prev_rec.names if n != name]
                    txn.put(bytes(prev), prev_rec.encode(), db=db_images)
            txn.put(name.encode(), image_id, db=db_names)
            if name not in record.names:
                record.names.append(name)
        txn.put(image_id, record.encode(), db=db_images)
        if old is None:
            store.pin_in(txn, [image_id], durable=True)
    return record


def resolve(store: Store, ref: str) -> bytes:
    """An image id from a full id, a unique id prefix (4+ hex digits) or ``NAME[:TAG]``."""
    with store.env.begin() as txn:
        if is_hex_digest(ref):
            image_id = from_hex(ref)
            if txn.get(image_id, db=store.db["images"]) is not None:
                return image_id
        elif is_hex_prefix(ref):
            prefix = bytes.fromhex(ref[: len(ref) // 2 * 2])
            hits = []
            cur = txn.cursor(db=store.db["images"])
            if cur.set_range(prefix):
                for key in cur.iternext(values=False):
                    if not to_hex(bytes(key)).startswith(ref):
                        break
                    hits.append(bytes(key))
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise UsageError(f"image id prefix {ref!r} is ambiguous ({len(hits)} images)")
        try:
            name = parse_name(ref)
        except UsageError:
            raise NotFound(f"no such image: {ref}") from None
        found = txn.get(name.encode(), db=store.db["names"])
        if found is None:
            raise NotFound(f"no such image: {ref}")
        return bytes(found)


def record(store: Store, image_id: bytes) -> ImageRecord:
    with store.env.begin() as txn:
        raw = txn.get(image_id, db=store.db["images"])
    if raw is None:
        raise NotFound(f"no such image: {to_hex(image_id)}")
    return ImageRecord.decode(image_id, bytes(raw))


# Decoded indexes by image id. An index is immutable (its id is its digest), so a process
# may keep it: decoding and validating a 40k-entry index costs ~100 ms, too much for the
# container start path.
INDEX_CACHE_SIZE = 16
_index_cache: OrderedDict[bytes, Index] = OrderedDict()
_index_cache_lock = threading.Lock()


def load_index(store: Store, image_id: bytes) -> Index:
    with _index_cache_lock:
        idx = _index_cache.get(image_id)
        if idx is not None:
            _index_cache.move_to_end(image_id)
            return idx
    idx = Index.decode(store.get(image_id))
    if idx.image_id != image_id:  # a store that returned other bytes than were asked for
        raise NotFound(f"index blob {to_hex(image_id)} does not match its digest")
    with _index_cache_lock:
        _index_cache[image_id] = idx
        while len(_index_cache) > INDEX_CACHE_SIZE:
            _index_cache.popitem(last=False)
    return idx


def list_images(store: Store) -> list[ImageRecord]:
    with store.env.begin() as txn:
        return [ImageRecord.decode(bytes(k), bytes(v))
                for k, v in txn.cursor(db=store.db["images"])]


def remove(store: Store, ref: str) -> ImageRecord:
    """Forget an image and its names; its blobs stay until ``gc`` (another image may share
    them)."""
    image_id = resolve(store, ref)
    rec = record(store, image_id)
    with store.env.begin(write=True) as txn:
        for name in rec.names:
            if txn.get(name.encode(), db=store.db["names"]) == image_id:
                txn.delete(name.encode(), db=store.db["names"])
        txn.delete(image_id, db=store.db["images"])
        txn.delete(image_id, db=store.db["hotsets"])
        store.pin_in(txn, [image_id], durable=True, delta=-1)
    return rec


def untag(store: Store, name: str) -> None:
    name = parse_name(name)
    with store.env.begin(write=True) as txn:
        image_id = txn.get(name.encode(), db=store.db["names"])
        if image_id is None:
            raise NotFound(f"no such image: {name}")
        image_id = bytes(image_id)
        txn.delete(name.encode(), db=store.db["names"])
        raw = txn.get(image_id, db=store.db["images"])
        if raw is not None:
            rec = ImageRecord.decode(image_id, bytes(raw))
            rec.names = [n for n in rec.names if n != name]
            txn.put(image_id, rec.encode(), db=store.db["images"])


def set_hot_set(store: Store, image_id: bytes, hot_set_digest: bytes) -> None:
    with store.env.begin(write=True) as txn:
        txn.put(image_id, hot_set_digest, db=store.db["hotsets"])


def hot_set(store: Store, image_id: bytes) -> bytes | None:
    with store.env.begin() as txn:
        raw = txn.get(image_id, db=store.db["hotsets"])
    return None if raw is None else bytes(raw)


def live_digests(store: Store) -> set[bytes]:
    """Every digest some image needs: its index, its files, its hot set."""
    live: set[bytes] = set()
    with store.env.begin() as txn:
        image_ids = [bytes(k) for k in txn.cursor(db=store.db["images"]).iternext(values=False)]
        hot = [bytes(v) for _, v in txn.cursor(db=store.db["hotsets"])]
    live.update(image_ids)
    live.update(d for d in hot if len(d) == DIGEST_SIZE)
    for image_id in image_ids:
        live.update(load_index(store, image_id).file_digests())
    return live
