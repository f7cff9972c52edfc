"""Node state: measurements (zero GPUs is fine), cache warmth from hot sets, the blob
Bloom filter, and the warm-first ranking peer fetches use."""

from __future__ import annotations

from pathlib import Path

from swarm.digest import hash_bytes
from swarm.fs import hotset, images
from swarm.fs.index import Entry, Index
from swarm.gossip import state
from swarm.gossip.state import BloomFilter, StateSampler, image_key, rank_peers
from swarm.store import Store


def test_no_gpu_is_an_empty_list() -> None:
    gpus = state.gpu_state()  # this host has no NVIDIA driver
    assert isinstance(gpus, list)
    for g in gpus:
        assert len(g) == 4


def test_sample_is_quantized_and_small() -> None:
    s = StateSampler(containers=lambda: 2, queued=lambda: 5, gpus=lambda: [])
    doc = s.sample()
    assert doc["ctr"] == 2 and doc["q"] == 5 and doc["gpu"] == []
    assert doc["cpu"] % state.PERCENT_STEP == 0 and doc["mem"] % state.PERCENT_STEP == 0
    assert doc["mem_mib"] > 0


def test_warmth_is_the_fraction_of_the_hot_set_held(tmp_path: Path) -> None:
    files = [bytes([i]) * 40 for i in range(4)]
    digests = [hash_bytes(f) for f in files]
    with Store(tmp_path / "s", chunk_size=1 << 12) as store:
        for f in files:
            store.put(f)
        index = Index([Entry(b"/", "dir", 0o755)] + [
            Entry(b"/f%d" % i, "file", 0o644, size=40, digest=d)
            for i, d in enumerate(digests)])
        rec = images.register(store, index, ["w:1"], source="test")
        assert state.image_warmth(store) == {}  # no hot set recorded yet
        hotset.save(store, rec.id, digests)
        assert state.image_warmth(store) == {image_key(rec.id): 100}
        store.drop(digests[:2])
        assert state.image_warmth(store) == {image_key(rec.id): 50}
        held = state.held_digests(store)
        assert digests[2] in held and digests[0] not in held
        doc = StateSampler(store=store, gpus=lambda: []).sample()
        assert doc["warm"] == {image_key(rec.id): 50}


def test_bloom_filter_has_no_false_negatives_and_few_positives() -> None:
    items = [hash_bytes(b"%d" % i) for i in range(5000)]
    f = BloomFilter.of(items)
    assert all(d in f for d in items)
    others = [hash_bytes(b"x%d" % i) for i in range(5000)]
    fp = sum(d in f for d in others) / len(others)
    assert fp < 0.03
    g = BloomFilter.decode(f.encode())
    assert g is not None and all(d in g for d in items[:100])
    for bad in (None, [1, 2], [8, 7, b"\0" * 5], [0, 7, b""], [1 << 40, 7, b""], "x"):
        assert BloomFilter.decode(bad) is None


def test_rank_asks_holders_then_warm_then_idle_peers() -> None:
    d = hash_bytes(b"blob")
    image = hash_bytes(b"image")
    holds = BloomFilter.of([d])
    lacks = BloomFilter.of([hash_bytes(b"other")])
    peers = [
        ("cold:1", {"cpu": 0}, lacks),
        ("busywarm:1", {"cpu": 90, "warm": {image_key(image): 80}}, None),
        ("idlewarm:1", {"cpu": 10, "warm": {image_key(image): 80}}, None),
        ("holder:1", {"cpu": 50}, holds),
    ]
    assert rank_peers(peers, d, image) == ["holder:1", "idlewarm:1", "busywarm:1", "cold:1"]
    assert rank_peers([], d) == []


def test_rank_keeps_the_rotation_among_peers_about_as_busy() -> None:
    d = hash_bytes(b"blob")
    peers = [("b:1", {"cpu": 20}, None), ("a:1", {"cpu": 5}, None)]
    assert rank_peers(peers, d) == ["b:1", "a:1"]  # one load band: the caller's order
    peers = [("b:1", {"cpu": 60}, None), ("a:1", {"cpu": 5}, None)]
    assert rank_peers(peers, d) == ["a:1", "b:1"]
