"""Real nodes in network namespaces (ops/netns-cluster): an image imported on one node
runs on a node that never saw it; a lying peer is caught by digest; a peer that dies
mid-transfer does not fail the read. Needs root."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from nodes import netns_cluster

from swarm.build.importer import import_directory
from swarm.fs import images
from swarm.store import Store

pytestmark = [pytest.mark.root, pytest.mark.cluster]

IMAGE = "base:1"
# Files the workload reads: enough distinct blobs that, whichever peer each fetch starts
# at, some start at the peer under test.
READ = ["/etc/debian_version", "/etc/os-release", "/bin/ls", "/bin/cat", "/bin/sh",
        "/usr/bin/md5sum", "/bin/grep", "/usr/bin/find", "/bin/sed", "/usr/bin/sort",
        "/bin/tar", "/usr/bin/dpkg"]
WORKLOAD = ["md5sum", *READ]


def _free_subnet() -> str:
    """A /24 in 10.231.0.0/16 no interface of this machine uses (other engineers' clusters
    may be up)."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    for third in range(100, 250):
        prefix = f"10.231.{third}."
        if prefix not in used:
            return prefix[:-1]
    raise RuntimeError("no free subnet in 10.231.0.0/16")


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("netns")


@pytest.fixture
def cluster(cluster_dir):
    with netns_cluster(cluster_dir, _free_subnet()) as c:
        yield c


def _expected(rootfs: Path) -> str:
    lines = []
    for p in READ:
        real = rootfs / p.lstrip("/")
        data = real.read_bytes()
        lines.append(f"{hashlib.md5(data).hexdigest()}  {p}")
    return "\n".join(lines) + "\n"


def _import(state: Path, rootfs: Path) -> bytes:
    with Store(state / "store") as s:
        return import_directory(s, rootfs, [IMAGE]).id


def _digests(state: Path, rootfs: Path, image_id: bytes) -> dict[str, bytes]:
    with Store(state / "store") as s:
        idx = images.load_index(s, image_id)
    out = {}
    for e in idx:
        path = "/" + e.path.decode() if isinstance(e.path, bytes) else "/" + str(e.path)
        if e.digest is not None:
            out[path.replace("//", "/")] = e.digest
    return out


def test_image_from_node_a_runs_on_cold_node_b(cluster, debian_rootfs):
    cluster.up(2)
    image_id = _import(cluster.state(1), debian_rootfs)
    with Store(cluster.state(2) / "store") as s:
        assert images.list_images(s) == [] and s.stats().blobs == 0
    out = cluster.swarm(2, "run", IMAGE, *WORKLOAD).stdout
    assert out == _expected(debian_rootfs)
    # B now holds the image and what the run read
    digests = _digests(cluster.state(1), debian_rootfs, image_id)
    with Store(cluster.state(2) / "store") as s:
        assert images.resolve(s, IMAGE) == image_id
        read_digests = [digests[p] for p in ("/etc/debian_version", "/usr/bin/md5sum")
                        if p in digests]
        assert read_digests and all(s.has(d) for d in read_digests)
        assert s.stats().blobs < len(set(digests.values()))  # lazily: not the whole image
    st = cluster.swarm(2, "node", "status").stdout
    assert '"fetched": 0' not in st


def _holders_then_up(cluster, rootfs: Path, special: dict[str, str]) -> None:
    """Node 1 cold, node 2 honest, node 3 with the ``special`` test switch; 2 and 3 hold
    the image before they start. Every blob filter they ever gossip then lists its blobs,
    and node 1, the seed both join, has both filters from the joins: it ranks the two
    holders equal, so the digest's rotation sends some fetches to node 3 whatever gossip
    has exchanged since (with stale filters, an honest peer could rank first for all)."""
    for i in (2, 3):
        _import(cluster.state_before_up(i), rootfs)
    cluster.up(3, node_env={3: special})


def test_liar_is_caught_by_digest_and_marked_suspect(cluster, debian_rootfs):
    # (the dying peer has a test of its own: four nodes are too many for this machine)
    _holders_then_up(cluster, debian_rootfs, {"SWARM_TEST_SERVE_CORRUPT": "1"})
    out = cluster.swarm(1, "run", IMAGE, *WORKLOAD).stdout
    assert out == _expected(debian_rootfs)
    st = json.loads(cluster.swarm(1, "node", "status").stdout)
    liar = cluster.node(3)["addr"]
    assert st["suspects"] == [liar], st
    assert st["rejected_blobs"] >= 1


def test_peer_killed_mid_transfer_does_not_fail_the_read(cluster, debian_rootfs):
    _holders_then_up(cluster, debian_rootfs, {"SWARM_TEST_DIE_ON_SERVE": "1"})
    out = cluster.swarm(1, "run", IMAGE, *WORKLOAD).stdout
    assert out == _expected(debian_rootfs)
    assert "dying while serving" in cluster.log(3)  # it was asked, and died asking


def test_cold_node_builds_the_hot_tree_from_peers(cluster, debian_rootfs):
    """Node A runs the image once (its mount records the hot set); node B, cold, gets the
    hot set's list with the image and builds the hot tree from A's blobs on its blob
    proxy's loop, before the container starts: B's run reads the hot files from it."""
    from swarm.fs.hotdir import HOT_DIR

    idle0 = {"SWARM_MOUNT_IDLE_S": "0"}  # A's mount goes (and saves the hot set) at once
    cluster.up(2, node_env={1: idle0, 2: idle0})
    image_id = _import(cluster.state(1), debian_rootfs)
    assert cluster.swarm(1, "run", IMAGE, *WORKLOAD).stdout == _expected(debian_rootfs)
    with Store(cluster.state(1) / "store") as s:
        hot = images.hot_set(s, image_id)
    assert hot is not None  # A's mount recorded what the run read
    out = cluster.swarm(2, "run", IMAGE, *WORKLOAD).stdout
    assert out == _expected(debian_rootfs)
    with Store(cluster.state(2) / "store") as s:
        assert images.hot_set(s, image_id) == hot
    trees = list((cluster.state(2) / HOT_DIR / image_id.hex()).iterdir())
    assert [t.name for t in trees] == [hot.hex()[:16]]
    assert (trees[0] / "etc" / "debian_version").read_bytes() == \
        (debian_rootfs / "etc" / "debian_version").read_bytes()
