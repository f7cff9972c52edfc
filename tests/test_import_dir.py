"""Import a directory, export it again: the tree comes back exactly. Needs root (owners,
devices, trusted/security xattrs)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import tarfile
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from swarm.build.importer import import_directory
from swarm.fs import images
from swarm.fs.materialize import export_directory, export_tar
from swarm.store import Store
from treecmp import diff, snapshot

pytestmark = pytest.mark.root
CHUNK = 4096
# security.capability of `setcap cap_net_raw+ep` (VFS_CAP_REVISION_2, little-endian)
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def round_trip(src, workdir, chunk=CHUNK):
    with Store(os.path.join(workdir, "store"), chunk_size=chunk, verify_on_read=True) as s:
        rec = import_directory(s, src, ["test:rt"])
        idx = images.load_index(s, images.resolve(s, "test:rt"))
        assert images.resolve(s, rec.id.hex()) == rec.id == idx.image_id
        out = os.path.join(workdir, "out")
        export_directory(s, idx, out)
        return rec, idx, out


def test_debootstrap_rootfs_round_trip(debian_rootfs, tmp_path):
    rec, idx, out = round_trip(debian_rootfs, tmp_path, chunk=64 * 1024)
    assert diff(snapshot(debian_rootfs), snapshot(out)) == []
    assert rec.entries == len(idx) > 5000
    kinds = {e.kind for e in idx}
    assert {"dir", "file", "symlink"} <= kinds


def test_export_tar_reimports_to_the_same_image(tmp_path):
    src = tmp_path / "src"
    make_special_tree(src)
    with Store(tmp_path / "store", chunk_size=CHUNK) as s:
        rec = import_directory(s, src)
        idx = images.load_index(s, rec.id)
        for comp, ext in (("", ".tar"), ("gz", ".tar.gz"), ("zst", ".tar.zst")):
            path = tmp_path / f"img{ext}"
            with open(path, "wb") as f:
                export_tar(s, idx, f, comp)
            from swarm.build.layers import import_tar

            again = import_tar(s, path, [])
            assert again.id == rec.id, f"tar{ext} round trip changed the image"


def make_special_tree(root):
    """Every kind of entry an image may carry, with awkward metadata."""
    os.makedirs(root / "d/sub")
    (root / "d/file").write_bytes(os.urandom(3 * CHUNK + 5))
    (root / "empty").write_bytes(b"")
    os.link(root / "d/file", root / "hard")
    os.symlink("/etc/passwd", root / "abs-link")
    os.symlink("../d/file", root / "d/sub/rel-link")
    os.symlink("nowhere/at/all", root / "dangling")
    os.mkfifo(root / "fifo", 0o640)
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "loop", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    (root / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "suid", 0o4755)
    os.chmod(root / "d/sub", 0o2775)
    os.chmod(root / "d", 0o1777)
    os.chown(root / "suid", 1000, 1001)
    os.chown(root / "dangling", 12, 34, follow_symlinks=False)
    os.setxattr(root / "suid", "security.capability", CAP_NET_RAW)
    os.setxattr(root / "d", "user.note", b"\x00binary\xff")
    os.setxattr(root / "abs-link", "trusted.t", b"on a symlink", follow_symlinks=False)
    os.utime(root / "abs-link", ns=(1, 123_456_789_123), follow_symlinks=False)
    os.utime(root / "d/file", ns=(1, 1_700_000_000_999_999_999))


def test_special_entries_round_trip(tmp_path):
    src = tmp_path / "src"
    make_special_tree(src)
    _, idx, out = round_trip(src, tmp_path)
    assert diff(snapshot(src), snapshot(out)) == []
    byp = idx.by_path
    assert byp[b"/hard"].link == byp[b"/d/file"].link is not None
    assert byp[b"/suid"].xattrs == {"security.capability": CAP_NET_RAW}
    assert byp[b"/loop"].rdev == os.makedev(7, 0)


names = st.text(alphabet="abcxyz-._ é", min_size=1, max_size=6).filter(
    lambda n: n not in (".", "..") and "/" not in n)


@st.composite
def trees(draw):
    """A list of (relative path, kind, details) making up a random tree."""
    nodes = [("", "dir")]
    dirs = [""]
    items = []
    for _ in range(draw(st.integers(1, 25))):
        parent = draw(st.sampled_from(dirs))
        name = draw(names)
        path = f"{parent}/{name}" if parent else name
        if any(p == path for p, _ in nodes):
            continue
        kind = draw(st.sampled_from(["dir", "file", "file", "symlink", "fifo", "hardlink",
                                     "chardev"]))
        files = [p for p, k in nodes if k == "file"]
        if kind == "hardlink" and not files:
            kind = "file"
        detail = {
            "mode": draw(st.sampled_from([0o755, 0o644, 0o600, 0o4755, 0o2755, 0o1777, 0o000,
                                          0o444])),
            "uid": draw(st.integers(0, 70000)), "gid": draw(st.integers(0, 70000)),
            "mtime_ns": draw(st.integers(0, 2**33 * 10**9)),
            "data": draw(st.binary(max_size=3 * CHUNK)) if kind == "file" else b"",
            "target": draw(st.sampled_from(["/abs/x", "../up", "rel", "a/b/c"])),
            "xattr": draw(st.none() | st.binary(max_size=40)),
            "link_to": draw(st.sampled_from(files)) if kind == "hardlink" else None,
        }
        nodes.append((path, kind))
        if kind == "dir":
            dirs.append(path)
        items.append((path, kind, detail))
    return items


def build_tree(root, items):
    os.mkdir(root)
    metas = []
    for path, kind, d in items:
        p = os.path.join(root, path)
        if kind == "dir":
            os.mkdir(p)
        elif kind == "file":
            with open(p, "wb") as f:
                f.write(d["data"])
        elif kind == "symlink":
            os.symlink(d["target"], p)
        elif kind == "fifo":
            os.mkfifo(p)
        elif kind == "chardev":
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 5))
        elif kind == "hardlink":
            os.link(os.path.join(root, d["link_to"]), p)
            continue  # metadata belongs to the inode, set through its first name
        metas.append((p, kind, d))
    for p, kind, d in reversed(metas):  # children before parents, so mtimes stick
        os.chown(p, d["uid"], d["gid"], follow_symlinks=False)
        if kind != "symlink":
            os.chmod(p, d["mode"])
        if d["xattr"] is not None and kind in ("dir", "file"):
            os.setxattr(p, "user.h", d["xattr"])
        os.utime(p, ns=(d["mtime_ns"], d["mtime_ns"]), follow_symlinks=False)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=trees())
def test_random_trees_round_trip(items):
    with tempfile.TemporaryDirectory() as work:
        src = os.path.join(work, "src")
        build_tree(src, items)
        _, _, out = round_trip(src, work)
        assert diff(snapshot(src), snapshot(out)) == []


def test_dedup_second_image_stores_only_new_contents(tmp_path):
    base = tmp_path / "base"
    os.makedirs(base / "lib")
    for i in range(40):
        (base / "lib" / f"m{i}.so").write_bytes(os.urandom(20_000))
    child = tmp_path / "child"
    shutil.copytree(base, child, symlinks=True)
    (child / "lib" / "new.so").write_bytes(os.urandom(30_000))
    (child / "lib" / "m0.so").write_bytes(os.urandom(20_000))  # changed
    state = tmp_path / "state"
    env = {"SWARM_CHUNK_SIZE": str(CHUNK)}
    run_cli(["image", "import", str(base), "-n", "base"], state_dir=state, env=env)
    before = json.loads(run_cli(["cache", "stats", "--json"], state_dir=state).stdout)
    run_cli(["image", "import", str(child), "-n", "child"], state_dir=state, env=env)
    after = json.loads(run_cli(["cache", "stats", "--json"], state_dir=state).stdout)
    grown = after["bytes"] - before["bytes"]
    # 50 KB of new content (plus the small index blob), not the 830 KB image
    assert 50_000 <= grown < 60_000, grown
    child_rec = json.loads(run_cli(["image", "inspect", "child"], state_dir=state).stdout)
    assert child_rec["content_bytes"] == 40 * 20_000 + 30_000
    assert child_rec["new_bytes"] < 60_000
    # the human table says the same
    text = run_cli(["cache", "stats"], state_dir=state).stdout
    assert f"({after['bytes']} B)" in text


def test_cli_round_trip_and_gc(tmp_path):
    src = tmp_path / "src"
    make_special_tree(src)
    state = tmp_path / "state"
    image_id = run_cli(["image", "import", str(src), "--name", "special:v1"],
                       state_dir=state).stdout.strip()
    assert len(image_id) == 64
    ls = run_cli(["image", "ls"], state_dir=state).stdout
    assert "special:v1" in ls and image_id[:12] in ls
    inspect = json.loads(run_cli(["image", "inspect", image_id[:8], "--entries"],
                                 state_dir=state).stdout)
    assert inspect["id"] == image_id
    assert any(e["path"] == "/fifo" and e["kind"] == "fifo" for e in inspect["entries_list"])
    run_cli(["image", "export", "special:v1", str(tmp_path / "out")], state_dir=state)
    assert diff(snapshot(src), snapshot(tmp_path / "out")) == []
    run_cli(["image", "export", "special:v1", str(tmp_path / "x.tar")], state_dir=state)
    with tarfile.open(tmp_path / "x.tar") as tar:
        assert "./suid" in tar.getnames()
    assert "clean" in run_cli(["cache", "verify"], state_dir=state).stdout
    run_cli(["image", "rm", "special:v1"], state_dir=state)
    assert "removed" in run_cli(["cache", "gc"], state_dir=state).stdout
    stats = json.loads(run_cli(["cache", "stats", "--json"], state_dir=state).stdout)
    assert stats["bytes"] == 0 and stats["blobs"] == 0


def test_cli_errors_are_one_line(tmp_path):
    state = tmp_path / "state"
    err = run_cli(["image", "inspect", "nope"], 3, state_dir=state).stderr
    assert err.strip() == "swarm: error: no such image: nope"
    err = run_cli(["image", "import", str(tmp_path / "missing")], 3, state_dir=state).stderr
    assert "no such file or directory" in err
    err = run_cli(["image", "import", str(tmp_path), "-n", "Bad Name"], 2,
                  state_dir=state).stderr
    assert "invalid image name 'Bad Name'" in err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    run_cli(["image", "import", str(tmp_path / "o"), "-n", "o"], state_dir=state)
    err = run_cli(["image", "export", "o", str(tmp_path / "o")], 2, state_dir=state).stderr
    assert "not empty" in err


def test_import_failure_leaves_no_image_record(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_special_tree(src)
    with Store(tmp_path / "store", chunk_size=CHUNK) as s:
        import swarm.build.importer as importer

        calls = {"n": 0}
        real = importer.read_xattrs

        def failing(path):
            calls["n"] += 1
            if calls["n"] == 5:
                raise OSError(5, "Input/output error", path)
            return real(path)

        monkeypatch.setattr(importer, "read_xattrs", failing)
        with pytest.raises(OSError):
            import_directory(s, src, ["half:done"])
        assert images.list_images(s) == []
        s.gc(images.live_digests(s))
        assert s.stats().blobs == 0
