"""Rootfs tarball import and the layer semantics of TreeBuilder (whiteouts, opaque
directories, hard links, xattrs, devices, precise mtimes), plus a property test of layer
application against a reference model of overlay lookup."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from helpers_archives import (
    compress,
    dev,
    dir_,
    end_blocks,
    hard,
    opaque,
    raw_pax_member,
    reg,
    sym,
    tar_bytes,
    whiteout,
    xattr_pax,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarm.build.layers import TreeBuilder, import_tar, open_tar_stream
from swarm.build.progress import Progress
from swarm.digest import hash_bytes
from swarm.errors import ImportRefused
from swarm.fs import images
from swarm.fs.index import Entry, Index
from swarm.store import Store

CHUNK_BYTES = 1024  # tiny, so multi-chunk files go through the chunked path
BIG = bytes(range(256)) * 20  # 5120 bytes: five chunks


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store", chunk_size=CHUNK_BYTES)
    yield s
    s.close()


def apply_layers(store: Store, *layers: bytes, config: dict[str, Any] | None = None) -> Index:
    tb = TreeBuilder()
    with store.batch() as batch:
        for i, raw in enumerate(layers):
            tb.apply_tar(open_tar_stream(io.BytesIO(raw), f"layer{i}"), batch, None,
                         f"layer{i}")
    return tb.build(config)


def paths(index: Index) -> list[bytes]:
    return [e.path for e in index]


def import_bytes(store: Store, raw: bytes, names: list[str] | None = None) -> Index:
    rec = import_tar(store, io.BytesIO(raw), names or [])
    return images.load_index(store, rec.id)


# --------------------------------------------------------------------------- one tarball
def test_every_kind_is_recorded(store: Store) -> None:
    raw = tar_bytes([
        dir_("./", mode=0o750, mtime=5),
        dir_("etc", mode=0o755, uid=1, gid=2),
        reg("etc/big", BIG, mode=0o4755, uid=1000, gid=1001),
        reg("etc/empty", b""),
        hard("etc/big-link", "etc/big"),
        sym("etc/abs", "/etc/shadow"),
        sym("etc/rel", "../../up"),
        dev("dev/null", "char", 1, 3, mode=0o666),
        dev("dev/sda", "block", 8, 0),
        dev("run/fifo", "fifo"),
        reg("deep/a/b/c", b"x"),
    ])
    idx = import_bytes(store, raw, ["t"])
    by = idx.by_path
    assert by[b"/"].mode == 0o750 and by[b"/"].mtime_ns == 5 * 10**9
    assert by[b"/etc"][3:5] == (1, 2)
    big = by[b"/etc/big"]
    assert (big.kind, big.mode, big.uid, big.gid, big.size) == ("file", 0o4755, 1000, 1001, 5120)
    assert big.digest == hash_bytes(BIG) and store.get(big.digest) == BIG
    assert store.manifest(big.digest) is not None  # chunked
    assert by[b"/etc/empty"].digest == hash_bytes(b"")
    link = by[b"/etc/big-link"]
    assert link.digest == big.digest and link.link == big.link == 0
    assert by[b"/etc/abs"].target == b"/etc/shadow" and by[b"/etc/abs"].size == 11
    assert by[b"/etc/rel"].target == b"../../up"
    assert by[b"/dev/null"].kind == "char" and by[b"/dev/null"].rdev == os.makedev(1, 3)
    assert by[b"/dev/sda"].kind == "block" and by[b"/dev/sda"].rdev == os.makedev(8, 0)
    assert by[b"/run/fifo"].kind == "fifo"
    for implicit in (b"/dev", b"/run", b"/deep", b"/deep/a", b"/deep/a/b"):
        assert by[implicit][1:5] == ("dir", 0o755, 0, 0)
    assert idx.config == {}


def test_fractional_pax_mtime_keeps_nanoseconds(store: Store) -> None:
    raw = tar_bytes([reg("a", b"1", pax={"mtime": "1700000000.123456789"}),
                     reg("b", b"2", pax={"mtime": "-1.5"}),
                     reg("c", b"3", mtime=42)])
    by = import_bytes(store, raw).by_path
    assert by[b"/a"].mtime_ns == 1_700_000_000_123_456_789
    assert by[b"/b"].mtime_ns == -1_500_000_000
    assert by[b"/c"].mtime_ns == 42_000_000_000


def test_xattrs_from_pax_keep_exact_bytes(store: Store) -> None:
    cap = bytes.fromhex("0100000200100000000000000000000000000000")  # cap_net_bind_service
    raw = tar_bytes([
        reg("bin/ping", b"elf", pax=xattr_pax({"security.capability": cap,
                                                    "user.x": b"caf\xc3\xa9"})),
        dir_("d", pax=xattr_pax({"user.bin": b"\xff\xfe\x00",
                                        "trusted.overlay.opaque": b"y"})),
    ])
    by = import_bytes(store, raw).by_path
    assert by[b"/bin/ping"].xattrs == {"security.capability": cap, "user.x": "café".encode()}
    # overlayfs bookkeeping is dropped: it would change how the image mounts
    assert by[b"/d"].xattrs == {"user.bin": b"\xff\xfe\x00"}


def test_raw_binary_pax_xattr_without_hdrcharset(store: Store) -> None:
    """Go's archive/tar writes binary xattr values raw, without hdrcharset=BINARY."""
    value = b"\x01\x00\x80\xff\n="
    raw = raw_pax_member("f", {b"SCHILY.xattr.user.raw": value,
                               b"mtime": b"1.000000001"}, b"data") + end_blocks()
    e = import_bytes(store, raw).by_path[b"/f"]
    assert e.xattrs == {"user.raw": value} and e.mtime_ns == 1_000_000_001


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd"])
def test_compressions_are_detected_by_magic(store: Store, tmp_path: Path, kind: str) -> None:
    members = [dir_("etc"), reg("etc/big", BIG), sym("l", "etc/big")]
    plain_id = apply_layers(store, tar_bytes(members)).image_id
    path = tmp_path / "rootfs.tar.misnamed"  # the extension says nothing
    path.write_bytes(compress(tar_bytes(members), kind))
    rec = import_tar(store, path, ["img:" + kind])
    assert rec.id == plain_id and rec.source == f"tar:{path}"
    assert images.resolve(store, "img:" + kind) == plain_id


class _Pipe(io.RawIOBase):
    """A non-seekable stream, like stdin."""

    def __init__(self, data: bytes) -> None:
        self._b = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._b.readinto(b)


@pytest.mark.parametrize("kind", ["none", "zstd"])
def test_reads_a_pipe(store: Store, kind: str) -> None:
    raw = compress(tar_bytes([reg("a", BIG)]), kind)
    rec = import_tar(store, _Pipe(raw), [], source_label="stdin")  # type: ignore[arg-type]
    assert rec.source == "stdin"
    assert images.load_index(store, rec.id).by_path[b"/a"].digest == hash_bytes(BIG)


def test_progress_counts_files_and_bytes(store: Store) -> None:
    p = Progress()
    import_tar(store, io.BytesIO(tar_bytes([reg("a", BIG), reg("b", b"xy"), dir_("d")])), [],
               progress=p)
    assert (p.files, p.bytes) == (3, len(BIG) + 2)


def test_repeated_member_of_the_same_type_last_wins(store: Store) -> None:
    raw = tar_bytes([reg("a", b"old", mode=0o600), reg("a", b"new", mode=0o644),
                     dir_("d", mode=0o700), dir_("d", mode=0o711)])
    by = import_bytes(store, raw).by_path
    assert by[b"/a"].digest == hash_bytes(b"new") and by[b"/a"].mode == 0o644
    assert by[b"/d"].mode == 0o711


def test_children_before_their_directory(store: Store) -> None:
    raw = tar_bytes([reg("d/x", b"1"), dir_("d", mode=0o700, uid=7)])
    by = import_bytes(store, raw).by_path
    assert by[b"/d"].mode == 0o700 and by[b"/d"].uid == 7 and b"/d/x" in by


def test_hard_link_groups_numbered_in_path_order(store: Store) -> None:
    raw = tar_bytes([reg("z", b"zz"), reg("a", b"aa"), hard("y", "z"), hard("b", "a"),
                     hard("c", "a")])
    by = import_bytes(store, raw).by_path
    assert [by[p].link for p in (b"/a", b"/b", b"/c", b"/y", b"/z")] == [0, 0, 0, 1, 1]
    again = import_bytes(store, tar_bytes([reg("a", b"aa"), reg("z", b"zz"), hard("b", "a"),
                                           hard("c", "b"), hard("y", "z")]))
    assert again.encode() == Index(by.values()).encode()


def test_truncated_file_data_is_refused(store: Store) -> None:
    raw = tar_bytes([reg("a", b"1"), reg("big", BIG)])
    with pytest.raises(ImportRefused, match=r"entry 'big': unreadable data.*unexpected end"):
        import_tar(store, io.BytesIO(raw[:2048]), ["x"])
    assert images.list_images(store) == []


def test_corrupt_header_mid_archive_is_refused(store: Store) -> None:
    raw = bytearray(tar_bytes([reg("a", b"1"), reg("b", b"2")]))
    raw[1024 + 148] ^= 0x01  # the checksum of the second member's header
    with pytest.raises(ImportRefused, match="corrupt tar header after entry 'a'"):
        import_tar(store, io.BytesIO(bytes(raw)), [])


def test_not_a_tar_is_refused(store: Store) -> None:
    with pytest.raises(ImportRefused, match="not a tar archive"):
        import_tar(store, io.BytesIO(compress(b"hello" * 200, "gzip")), [])


def test_empty_tar_is_an_image_with_only_a_root(store: Store) -> None:
    idx = import_bytes(store, end_blocks())
    assert [(e.path, e.kind) for e in idx] == [(b"/", "dir")]


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")
def test_gnu_tar_of_a_tree_equals_its_directory_import(store: Store, tmp_path: Path) -> None:
    """GNU tar's pax format keeps ns mtimes, xattrs and hard links: importing the tarball
    must give exactly the image that importing the directory gives (the same id)."""
    from swarm.build.importer import import_directory

    root = tmp_path / "tree"
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "f").write_bytes(BIG)
    os.link(root / "d" / "f", root / "g")
    os.symlink("d/f", root / "s")
    os.mkfifo(root / "p")
    (root / "suid").write_bytes(b"x")
    os.chmod(root / "suid", 0o4755)
    xattr = b"\x00binary\xff"
    with contextlib.suppress(OSError):  # filesystems without user xattrs still test the rest
        os.setxattr(root / "d" / "f", "user.k", xattr)
    for i, p in enumerate(sorted(root.rglob("*"), reverse=True)):
        os.utime(p, ns=(1, 1_700_000_000_123_456_789 + i), follow_symlinks=False)
    os.utime(root, ns=(1, 1_600_000_000_000_000_001))
    archive = tmp_path / "tree.tar.gz"
    subprocess.run(["tar", "-C", str(root), "--format=posix", "--xattrs", "--xattrs-include=*",
                    "--numeric-owner", "-czf", str(archive), "."], check=True)
    from_tar = import_tar(store, archive, [])
    from_dir = import_directory(store, root, [])
    assert images.load_index(store, from_tar.id).encode() == \
        images.load_index(store, from_dir.id).encode()
    assert from_tar.id == from_dir.id
    by = images.load_index(store, from_tar.id).by_path
    assert by[b"/g"].link == by[b"/d/f"].link == 0 and by[b"/p"].kind == "fifo"
    if os.listxattr(root / "d" / "f"):
        assert by[b"/d/f"].xattrs == {"user.k": xattr}


# --------------------------------------------------------------------------- layers
def test_whiteouts_delete_files_and_subtrees(store: Store) -> None:
    lower = tar_bytes([dir_("a"), reg("a/f", b"1"), dir_("a/sub"), reg("a/sub/g", b"2"),
                       reg("keep", b"3"), reg("gone", b"4")])
    upper = tar_bytes([whiteout("gone"), whiteout("a/sub"), whiteout("never-existed")])
    assert paths(apply_layers(store, lower, upper)) == [b"/", b"/a", b"/a/f", b"/keep"]


def test_whiteout_then_recreate_in_the_same_layer(store: Store) -> None:
    lower = tar_bytes([dir_("d"), reg("d/old", b"1")])
    for upper in (tar_bytes([whiteout("d"), dir_("d"), reg("d/new", b"2")]),
                  tar_bytes([dir_("d"), reg("d/new", b"2"), whiteout("d")])):
        assert paths(apply_layers(store, lower, upper)) == [b"/", b"/d", b"/d/new"]


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_dir_hides_lower_children_only(store: Store, marker_first: bool) -> None:
    lower = tar_bytes([dir_("o", mode=0o700), reg("o/lower1", b"1"), dir_("o/sub"),
                       reg("o/sub/lower2", b"2"), reg("other", b"3")])
    same = [dir_("o", mode=0o755), reg("o/mine", b"4"), dir_("o/sub"), reg("o/sub/mine2", b"5")]
    upper = tar_bytes([opaque("o"), *same] if marker_first else [*same, opaque("o")])
    idx = apply_layers(store, lower, upper)
    assert paths(idx) == [b"/", b"/o", b"/o/mine", b"/o/sub", b"/o/sub/mine2", b"/other"]
    assert idx.by_path[b"/o"].mode == 0o755


def test_opaque_root(store: Store) -> None:
    lower = tar_bytes([reg("a", b"1"), dir_("b")])
    upper = tar_bytes([reg("c", b"2"), opaque(".")])
    assert paths(apply_layers(store, lower, upper)) == [b"/", b"/c"]


def test_file_over_directory_hides_its_subtree_and_back(store: Store) -> None:
    l1 = tar_bytes([dir_("x"), reg("x/child", b"1")])
    l2 = tar_bytes([reg("x", b"file now")])
    l3 = tar_bytes([dir_("x", mode=0o700), reg("x/new", b"2")])
    assert paths(apply_layers(store, l1, l2)) == [b"/", b"/x"]
    idx = apply_layers(store, l1, l2, l3)
    assert paths(idx) == [b"/", b"/x", b"/x/new"] and idx.by_path[b"/x"].kind == "dir"


def test_directory_metadata_merges_children(store: Store) -> None:
    l1 = tar_bytes([dir_("d", mode=0o700, uid=1), reg("d/a", b"1")])
    l2 = tar_bytes([dir_("d", mode=0o755, uid=2, pax=xattr_pax({"user.k": b"v"})),
                    reg("d/b", b"2")])
    idx = apply_layers(store, l1, l2)
    assert paths(idx) == [b"/", b"/d", b"/d/a", b"/d/b"]
    d = idx.by_path[b"/d"]
    assert (d.mode, d.uid, d.xattrs) == (0o755, 2, {"user.k": b"v"})


def test_hard_links_across_layers(store: Store) -> None:
    l1 = tar_bytes([reg("bin/python3.11", BIG, mode=0o755)])
    l2 = tar_bytes([hard("bin/python3", "bin/python3.11"), hard("usr/python", "bin/python3")])
    idx = apply_layers(store, l1, l2)
    by = idx.by_path
    group = {p: by[p].link for p in (b"/bin/python3", b"/bin/python3.11", b"/usr/python")}
    assert set(group.values()) == {0}
    assert by[b"/usr/python"].digest == hash_bytes(BIG) and by[b"/usr/python"].mode == 0o755
    # replacing one member breaks it out of the group (a new inode); a pair remains
    l3 = tar_bytes([reg("bin/python3", b"new")])
    by = apply_layers(store, l1, l2, l3).by_path
    assert by[b"/bin/python3"].link is None and by[b"/bin/python3"].digest == hash_bytes(b"new")
    assert by[b"/bin/python3.11"].link == by[b"/usr/python"].link == 0
    # deleting all but one dissolves the group
    l4 = tar_bytes([whiteout("usr/python")])
    by = apply_layers(store, l1, l2, l3, l4).by_path
    assert by[b"/bin/python3.11"].link is None


def test_hard_link_over_the_directory_holding_its_target(store: Store) -> None:
    l1 = tar_bytes([dir_("d"), reg("d/f", b"content")])
    by = apply_layers(store, l1, tar_bytes([hard("d", "d/f")])).by_path
    assert list(by) == [b"/", b"/d"]
    assert by[b"/d"].kind == "file" and by[b"/d"].link is None
    assert by[b"/d"].digest == hash_bytes(b"content")


def test_hard_link_whose_target_this_layer_whites_out_is_refused(store: Store) -> None:
    l1 = tar_bytes([reg("a", b"1")])
    l2 = tar_bytes([hard("b", "a"), whiteout("a")])
    with pytest.raises(ImportRefused, match="hard link to '/a', which is not in the image"):
        apply_layers(store, l1, l2)


def test_symlink_from_a_lower_layer_is_not_followed(store: Store) -> None:
    l1 = tar_bytes([sym("lib", "usr/lib")])
    l2 = tar_bytes([reg("lib/x.so", b"1")])
    with pytest.raises(ImportRefused, match=re.escape(
            "entry 'lib/x.so': path goes through symlink '/lib' -> 'usr/lib'")):
        apply_layers(store, l1, l2)
    # ... but a layer may replace the symlink with a directory first
    l2b = tar_bytes([whiteout("lib"), reg("lib/x.so", b"1")])
    assert paths(apply_layers(store, l1, l2b)) == [b"/", b"/lib", b"/lib/x.so"]


def test_layer_config_is_kept(store: Store) -> None:
    idx = apply_layers(store, tar_bytes([reg("a")]), config={"Env": ["A=1"], "Cmd": ["sh"]})
    assert idx.config == {"Cmd": ["sh"], "Env": ["A=1"]}


# --------------------------------------------------------------------------- property test
NAMES = ("a", "b", "c")
Op = tuple[str, Any]  # ("file", content) | ("dir", mode) | ("opaque", mode) | ("sym", t) | ("wh",)


@st.composite
def layer_ops(draw: st.DrawFn) -> dict[str, Op]:
    """One layer: path -> op, consistent within the layer (nothing under a non-dir), every
    parent of an entry or whiteout present as an explicit directory (as docker writes)."""
    ops: dict[str, Op] = {}
    for _ in range(draw(st.integers(0, 6))):
        depth = draw(st.integers(1, 3))
        path = "/".join(draw(st.sampled_from(NAMES)) for _ in range(depth))
        op = draw(st.one_of(
            st.tuples(st.just("file"), st.binary(max_size=3)),
            st.tuples(st.just("dir"), st.sampled_from([0o755, 0o700])),
            st.tuples(st.just("opaque"), st.sampled_from([0o755, 0o711])),
            st.tuples(st.just("sym"), st.sampled_from(["x", "/etc"])),
            st.tuples(st.just("wh")),
        ))
        parents = ["/".join(path.split("/")[:i]) for i in range(1, depth)]
        if any(ops.get(p, ("dir",))[0] not in ("dir", "opaque") for p in parents):
            continue  # would put something under a non-directory of the same layer
        if op[0] not in ("dir", "opaque") and any(k.startswith(path + "/") for k in ops):
            continue
        for p in parents:
            ops.setdefault(p, ("dir", 0o755))
        if ops.get(path, ("",))[0] in ("dir", "opaque") and op[0] in ("dir", "opaque"):
            continue  # keep the first directory op
        ops[path] = op
    return ops


def _members(ops: dict[str, Op], order: list[str]) -> list[Any]:
    out = []
    for path in order:
        op = ops[path]
        if op[0] == "file":
            out.append(reg(path, op[1]))
        elif op[0] == "dir":
            out.append(dir_(path, mode=op[1]))
        elif op[0] == "opaque":
            out += [dir_(path, mode=op[1]), opaque(path)]
        elif op[0] == "sym":
            out.append(sym(path, op[1]))
        else:
            out.append(whiteout(path))
    return out


def reference(layers: list[dict[str, Op]]) -> dict[str, tuple[str, Any]]:
    """Overlay lookup, top layer down, path by path: a path shows the entry of the highest
    layer that has it, unless a layer above hides it (a whiteout of it, or an ancestor
    that is whited out, opaque or not a directory)."""
    candidates = {p for ops in layers for p, op in ops.items() if op[0] != "wh"}
    view: dict[str, tuple[str, Any]] = {}
    for p in candidates:
        ancestors = ["/".join(p.split("/")[:i]) for i in range(1, p.count("/") + 1)]
        for ops in reversed(layers):
            op = ops.get(p)
            if op is not None and op[0] != "wh":
                view[p] = ("dir" if op[0] == "opaque" else op[0], op[1])
                break
            if op is not None or any(ops.get(a, ("dir",))[0] != "dir" for a in ancestors):
                break
    return view


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(layers=st.lists(layer_ops(), min_size=1, max_size=4), data=st.data())
def test_layers_match_overlay_lookup(store: Store, layers: list[dict[str, Op]],
                                     data: st.DataObject) -> None:
    raws = []
    for ops in layers:
        order = data.draw(st.permutations(sorted(ops)))
        raws.append(tar_bytes(_members(ops, order)))
    want = reference(layers)
    got = {}
    for e in apply_layers(store, *raws):
        if e.path == b"/":
            continue
        detail: Any = {"file": lambda e: store.get(e.digest), "dir": lambda e: e.mode,
                       "symlink": lambda e: e.target.decode()}[e.kind](e)
        got[e.path.decode()[1:]] = ({"symlink": "sym"}.get(e.kind, e.kind), detail)
    assert got == want


def test_reference_model_examples() -> None:
    """The model itself, on cases worked out by hand."""
    assert reference([{"a": ("dir", 0o755), "a/b": ("file", b"1")},
                      {"a": ("opaque", 0o700)}]) == {"a": ("dir", 0o700)}
    assert reference([{"a": ("file", b"1")}, {"a": ("wh",)}]) == {}
    assert reference([{"a": ("dir", 0o755), "a/b": ("file", b"1")},
                      {"a": ("dir", 0o711)}]) == {"a": ("dir", 0o711), "a/b": ("file", b"1")}
    assert reference([{"a": ("sym", "x")}, {"a": ("dir", 0o755), "a/b": ("file", b"")}]) == \
        {"a": ("dir", 0o755), "a/b": ("file", b"")}


def test_entry_type_matches_index_format() -> None:
    """TreeBuilder's output goes through Index validation (parents are directories)."""
    tb = TreeBuilder()
    idx = tb.build()
    assert list(idx) == [Entry(b"/", "dir", 0o755)]


def test_tarfile_stream_members_list_stays_empty(store: Store) -> None:
    """Stream mode would keep every TarInfo; apply_tar drops them as it goes."""
    tf = open_tar_stream(io.BytesIO(tar_bytes([reg(f"f{i}") for i in range(50)])), "l")
    with store.batch() as batch:
        TreeBuilder().apply_tar(tf, batch, None, "l")
    assert len(tf.members) == 0  # type: ignore[attr-defined]
    assert isinstance(tf, tarfile.TarFile)
