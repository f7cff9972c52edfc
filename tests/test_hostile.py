"""Hostile and malformed archives: each is refused with its own message naming the
offending entry, leaves no image record, and writes nothing outside the store."""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers_archives import (
    OciLayout,
    dev,
    dir_,
    end_blocks,
    hard,
    jbytes,
    raw_pax_member,
    reg,
    sym,
    tar_bytes,
)

from swarm.build.layers import import_tar
from swarm.build.oci import import_docker_save, import_oci_layout
from swarm.errors import ImportRefused
from swarm.fs import images
from swarm.store import Store

CHUNK_BYTES = 1024
STORE_DIR = "store"
PASSWD = Path("/etc/passwd")


class Case(NamedTuple):
    """``build(tmp_path)`` gives the archive bytes; the message must match ``phrase`` (the
    wording of this kind of refusal, shared by no other kind), name ``entry``, and match
    ``detail`` (what this case adds: the symlink, the target)."""

    build: Callable[[Path], bytes]
    phrase: str
    entry: str
    detail: str = ""


def _victim(tmp: Path) -> str:
    """A directory outside the store that a symlink escape would write into."""
    v = tmp / "victim"
    v.mkdir(exist_ok=True)
    return str(v)


def _unknown_type() -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo("run/socket")
    ti.type = b"s"  # no tar type means "socket"; GNU/star use letters tarfile does not know
    return ti, None


def _truncated(_: Path) -> bytes:
    return tar_bytes([reg("ok", b"1"), reg("cut", b"x" * 4096)])[:2048]


def _bad_header(_: Path) -> bytes:
    raw = bytearray(tar_bytes([reg("ok", b"1"), reg("next", b"2")]))
    raw[1024 + 148] ^= 0x01  # the checksum field of the second header
    return bytes(raw)


CASES: dict[str, Case] = {
    "dotdot": Case(lambda t: tar_bytes([reg("../../tmp/evil", b"x")]),
                   r"member name has a '\.\.' component", "../../tmp/evil"),
    "dotdot_middle": Case(lambda t: tar_bytes([reg("usr/../../etc/passwd", b"x")]),
                          r"member name has a '\.\.' component", "usr/../../etc/passwd"),
    "absolute": Case(lambda t: tar_bytes([reg("/etc/passwd", b"root::0:0::/:/bin/sh\n")]),
                     r"absolute member name", "/etc/passwd"),
    "symlink_parent_abs": Case(
        lambda t: tar_bytes([sym("evil", "/etc"), reg("evil/passwd", b"pwned")]),
        r"path goes through symlink", "evil/passwd", r"'/evil' -> '/etc'"),
    "symlink_parent_relative": Case(
        lambda t: tar_bytes([dir_("a"), sym("a/up", "../.."), reg("a/up/x", b"pwned")]),
        r"path goes through symlink", "a/up/x", r"'/a/up' -> '\.\./\.\.'"),
    "symlink_parent_tmp_victim": Case(
        lambda t: tar_bytes([sym("evil", _victim(t)), reg("evil/planted", b"pwned")]),
        r"path goes through symlink", "evil/planted", r"'/evil' -> '/.*/victim'"),
    "symlink_parent_child_first": Case(
        lambda t: tar_bytes([reg("evil/passwd", b"pwned"), sym("evil", "/etc")]),
        r"path goes through symlink", "evil/passwd", r"'/evil' -> '/etc'"),
    "dir_then_symlink": Case(
        lambda t: tar_bytes([dir_("etc"), sym("etc", "/etc"), reg("etc/passwd", b"pwned")]),
        r"appears twice in one layer", "etc", "as a dir and as a symlink"),
    "file_then_dir": Case(lambda t: tar_bytes([reg("x", b"1"), dir_("x")]),
                          r"appears twice in one layer", "x", "as a file and as a dir"),
    "parent_is_file": Case(lambda t: tar_bytes([reg("f", b"1"), reg("f/g", b"2")]),
                           r"parent '/f' is a file, not a directory", "f/g"),
    "hardlink_absent": Case(lambda t: tar_bytes([hard("l", "nowhere")]),
                            r"which is not in the image before it", "l", "'/nowhere'"),
    "hardlink_before_target": Case(lambda t: tar_bytes([hard("l", "t"), reg("t", b"1")]),
                                   r"which is not in the image before it", "l", "'/t'"),
    "hardlink_escapes": Case(lambda t: tar_bytes([hard("l", "../../etc/passwd")]),
                             r"hard link target '\.\./\.\./etc/passwd' escapes the image", "l"),
    "hardlink_absolute": Case(lambda t: tar_bytes([hard("l", "/etc/passwd")]),
                              r"hard link target '/etc/passwd' is absolute", "l"),
    "hardlink_through_symlink": Case(
        lambda t: tar_bytes([sym("evil", "/etc"), hard("l", "evil/passwd")]),
        r"hard link target '/evil/passwd' goes through symlink '/evil'", "l"),
    "hardlink_to_dir": Case(lambda t: tar_bytes([dir_("d"), hard("l", "d")]),
                            r"hard link to a directory", "l"),
    "hardlink_to_itself": Case(lambda t: tar_bytes([hard("l", "l")]),
                               r"hard link to itself", "l"),
    "nul_in_name": Case(lambda t: tar_bytes([reg("a", b"1", pax={"path": "etc\0passwd"})]),
                        r"member name contains a NUL byte", "etc\\x00passwd"),
    "empty_name": Case(lambda t: tar_bytes([reg("", b"1")]), r"empty member name", "''"),
    "socket_or_unknown_type": Case(lambda t: tar_bytes([_unknown_type()]),
                                   r"unsupported tar member type b's'", "run/socket"),
    "whiteout_dotdot": Case(lambda t: tar_bytes([dir_("a"), reg("a/.wh...")]),
                            r"whiteout of '\.\.' \(not an entry name\)", "a/.wh..."),
    "whiteout_dot": Case(lambda t: tar_bytes([dir_("a"), reg("a/.wh..")]),
                         r"whiteout of '\.' \(not an entry name\)", "a/.wh.."),
    "inside_whiteout": Case(lambda t: tar_bytes([reg(".wh.x/y", b"1")]),
                            r"entry inside a whiteout name", ".wh.x/y"),
    "long_component": Case(lambda t: tar_bytes([reg("d/" + "n" * 256, b"1")]),
                           r"name component longer than 255 bytes", "d/nnnn"),
    "root_not_dir": Case(lambda t: tar_bytes([reg(".", b"1")]),
                         r"the root must be a directory, not a file", "'.'"),
    "symlink_nul_target": Case(
        lambda t: tar_bytes([sym("s", "x", pax={"linkpath": "/etc\0x"})]),
        r"symlink with an invalid target", "s"),
    "uid_out_of_range": Case(lambda t: tar_bytes([reg("u", b"1", pax={"uid": str(1 << 40)})]),
                             r"uid 1099511627776 is out of range", "u"),
    "xattr_name_not_utf8": Case(
        lambda t: raw_pax_member("x", {b"SCHILY.xattr.user.\xff": b"v"}) + end_blocks(),
        r"xattr name .* is not UTF-8", "'x'"),
    "truncated": Case(_truncated, r"unreadable data \(unexpected end of data\)", "cut"),
    "bad_header": Case(_bad_header, r"truncated or corrupt tar header after entry", "ok"),
}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / STORE_DIR, chunk_size=CHUNK_BYTES)
    yield s
    s.close()


def outside_store(tmp: Path) -> dict[str, tuple[int, str]]:
    """Every path under ``tmp`` but the store: (mode, content hash)."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(tmp):
        if Path(dirpath) == tmp:
            dirnames[:] = [d for d in dirnames if d != STORE_DIR]
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            snap[str(p.relative_to(tmp))] = (st.st_mode, digest)
    return snap


def passwd_state() -> tuple[int, int, bytes]:
    st = PASSWD.stat()
    return st.st_mtime_ns, st.st_size, hashlib.sha256(PASSWD.read_bytes()).digest()


def refuse(store: Store, tmp: Path, importer: Callable[[], object]) -> str:
    """Run an import that must be refused; check it left nothing behind; the message."""
    before, passwd = outside_store(tmp), passwd_state()
    with pytest.raises(ImportRefused) as info:
        importer()
    assert images.list_images(store) == []
    assert outside_store(tmp) == before
    assert passwd_state() == passwd
    victim = tmp / "victim"
    assert not victim.exists() or list(victim.iterdir()) == []
    # the store holds no name either, and what the import stored is garbage
    store.gc(images.live_digests(store))
    assert store.stats().blobs == 0
    return str(info.value)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_tar_is_refused(store: Store, tmp_path: Path, case: str) -> None:
    c = CASES[case]
    archive = tmp_path / "hostile.tar"
    archive.write_bytes(c.build(tmp_path))
    msg = refuse(store, tmp_path, lambda: import_tar(store, archive, ["victim"]))
    assert re.search(c.phrase, msg), msg
    assert re.search(c.detail, msg), msg
    assert c.entry in msg, msg
    assert msg.startswith(f"tar:{archive}: ")


def test_messages_are_distinct(store: Store, tmp_path: Path) -> None:
    """Each kind of refusal has its own wording: no message matches another kind's."""
    phrases = {c.phrase for c in CASES.values()}
    for name, c in CASES.items():
        with pytest.raises(ImportRefused) as info:
            import_tar(store, io.BytesIO(c.build(tmp_path)), [])
        others = [p for p in phrases if p != c.phrase and re.search(p, str(info.value))]
        assert others == [], (name, str(info.value))


def test_symlink_from_lower_layer_then_member_through_it(store: Store, tmp_path: Path) -> None:
    oci = OciLayout(tmp_path / "layout")
    l1 = tar_bytes([sym("evil", _victim(tmp_path))])
    l2 = tar_bytes([reg("evil/planted", b"pwned")])
    oci.add(oci.image([(l1, "gzip"), (l2, "gzip")]))
    msg = refuse(store, tmp_path, lambda: import_oci_layout(store, oci.root, ["victim"]))
    assert "layer 2/2" in msg and "entry 'evil/planted': path goes through symlink" in msg


def test_oci_digest_with_path_traversal(store: Store, tmp_path: Path) -> None:
    oci = OciLayout(tmp_path / "layout")
    desc = oci.image([(tar_bytes([reg("a")]), "none")])
    oci.add({**desc, "digest": "sha256:../../../../etc/passwd"})
    msg = refuse(store, tmp_path, lambda: import_oci_layout(store, oci.root, []))
    assert "invalid digest 'sha256:../../../../etc/passwd'" in msg


def _docker_save(path: Path, layer_path: str, extra: list[tuple[tarfile.TarInfo, bytes | None]]
                 ) -> None:
    cfg = jbytes({"config": {}})
    manifest = jbytes([{"Config": "c.json", "RepoTags": [], "Layers": [layer_path]}])
    path.write_bytes(tar_bytes([reg("c.json", cfg), reg("manifest.json", manifest), *extra]))


def test_docker_save_layer_path_outside_archive(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "save.tar"
    _docker_save(path, "../../etc/passwd", [])
    msg = refuse(store, tmp_path, lambda: import_docker_save(store, path, []))
    assert "'../../etc/passwd' points outside the archive" in msg


def test_docker_save_layer_symlink_outside_archive(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "save.tar"
    _docker_save(path, "l/layer.tar", [sym("l/layer.tar", "../../../etc/passwd")])
    msg = refuse(store, tmp_path, lambda: import_docker_save(store, path, []))
    assert "'l/layer.tar' links outside the archive ('../../../etc/passwd')" in msg


def test_device_in_tar_is_only_recorded(store: Store, tmp_path: Path) -> None:
    """Not hostile, but the counterpart: a device node is an index entry, never a mknod."""
    archive = tmp_path / "dev.tar"
    archive.write_bytes(tar_bytes([dev("dev/sda", "block", 8, 0), dev("dev/fifo", "fifo")]))
    before = outside_store(tmp_path)
    rec = import_tar(store, archive, [])
    assert outside_store(tmp_path) == before
    assert images.load_index(store, rec.id).by_path[b"/dev/sda"].rdev == os.makedev(8, 0)
