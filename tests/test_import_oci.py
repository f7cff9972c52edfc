"""OCI layouts (by hand and through skopeo), docker-save tarballs (legacy, OCI-inside,
compressed), digest verification, ref and platform selection, and format detection."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers_archives import (
    SKOPEO,
    OciLayout,
    compress,
    dev,
    dir_,
    docker_save_legacy,
    hard,
    jbytes,
    opaque,
    reg,
    sha256,
    skopeo,
    sym,
    tar_bytes,
    tar_directory,
    whiteout,
    xattr_pax,
)

from swarm.build import oci
from swarm.build.progress import Progress
from swarm.digest import hash_bytes
from swarm.errors import ImportRefused, NotFound, UsageError
from swarm.fs import images
from swarm.fs.index import Index
from swarm.store import Store

CHUNK_BYTES = 1024
BIG = bytes(range(256)) * 12  # 3 KiB: three chunks
CONFIG = {
    "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"], "Cmd": ["python3", "-c", "print(1)"],
    "Entrypoint": ["/init"], "WorkingDir": "/srv", "User": "1000:1000",
    "ExposedPorts": {"8080/tcp": {}}, "Labels": {"org.example.k": "v"},
    "StopSignal": "SIGINT",
}
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")

L1 = tar_bytes([
    dir_("usr"), dir_("usr/lib"), reg("usr/lib/libc.so", BIG, mode=0o755),
    dir_("etc"), reg("etc/old", b"old"), dir_("cache"), reg("cache/lower", b"lower"),
    dev("dev/null", "char", 1, 3),
])
L2 = tar_bytes([
    whiteout("etc/old"), reg("etc/new", b"new", pax={"mtime": "1700000000.5"}),
    opaque("cache"), dir_("cache"), reg("cache/upper", b"upper"),
    hard("usr/lib/libc.so.6", "usr/lib/libc.so"),
])
L3 = tar_bytes([reg("bin/ping", b"elf", pax=xattr_pax({"security.capability": b"\x01\0\0\x02"})),
                sym("bin/sh", "dash")])
EXPECTED_PATHS = [b"/", b"/bin", b"/bin/ping", b"/bin/sh", b"/cache", b"/cache/upper", b"/dev",
                  b"/dev/null", b"/etc", b"/etc/new", b"/usr", b"/usr/lib",
                  b"/usr/lib/libc.so", b"/usr/lib/libc.so.6"]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store", chunk_size=CHUNK_BYTES)
    yield s
    s.close()


def build_layout(root: Path, compressions: tuple[str, str, str] = ("gzip", "zstd", "none")
                 ) -> OciLayout:
    """L1, L2, L3 stored with ``compressions``, tagged "v1"; the config has keys an image
    does not keep (Hostname) and nulls."""
    o = OciLayout(root)
    layers = list(zip((L1, L2, L3), compressions, strict=True))
    o.add(o.image(layers, {**CONFIG, "Hostname": "x", "Volumes": None}), ref="v1")
    return o


@pytest.fixture
def layout(tmp_path: Path) -> OciLayout:
    """Three layers (gzip, zstd, plain) tagged "v1"."""
    return build_layout(tmp_path / "layout")


def index_of(store: Store, rec: images.ImageRecord) -> Index:
    return images.load_index(store, rec.id)


def check_image(idx: Index) -> None:
    by = idx.by_path
    assert [e.path for e in idx] == EXPECTED_PATHS
    assert by[b"/usr/lib/libc.so"].digest == hash_bytes(BIG)
    assert by[b"/usr/lib/libc.so"].link == by[b"/usr/lib/libc.so.6"].link == 0
    assert by[b"/etc/new"].mtime_ns == 1_700_000_000_500_000_000
    assert by[b"/bin/ping"].xattrs == {"security.capability": b"\x01\0\0\x02"}
    assert by[b"/dev/null"].kind == "char"
    assert idx.config == CONFIG  # as-is; other keys (Hostname) and nulls are not kept


# --------------------------------------------------------------------------- OCI layouts
def test_layout_layers_applied_in_order(store: Store, layout: OciLayout) -> None:
    p = Progress()
    rec = oci.import_oci_layout(store, layout.root, ["app:1"], progress=p)
    check_image(index_of(store, rec))
    assert images.resolve(store, "app:1") == rec.id
    assert rec.source == f"oci:{layout.root}"
    assert p.files > 0 and p.bytes >= len(BIG)


def test_nested_index_resolves_linux_amd64(store: Store, tmp_path: Path) -> None:
    o = OciLayout(tmp_path / "multi")
    arm = o.image([(tar_bytes([reg("arch", b"arm64")]), "gzip")])
    amd = o.image([(tar_bytes([reg("arch", b"amd64")]), "gzip")])
    att = o.image([(tar_bytes([reg("attestation", b"{}")]), "none")])
    manifests = [{**arm, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                 {**att, "platform": {"os": "unknown", "architecture": "unknown"}},
                 {**amd, "platform": {"os": "linux", "architecture": "amd64"}}]
    outer = o.index_blob([o.index_blob(manifests)])  # an index of an index
    o.add(outer, ref="latest")
    idx = index_of(store, oci.import_oci_layout(store, o.root, [], ref="latest"))
    assert store.get(idx.by_path[b"/arch"].digest) == b"amd64"


def test_index_without_amd64_is_refused(store: Store, tmp_path: Path) -> None:
    o = OciLayout(tmp_path / "arm")
    arm = o.image([(tar_bytes([reg("arch", b"arm64")]), "gzip")])
    o.add(o.index_blob([{**arm, "platform": {"os": "linux", "architecture": "arm64"}}]))
    with pytest.raises(ImportRefused, match=r"no linux/amd64 image \(platforms: linux/arm64\)"):
        oci.import_oci_layout(store, o.root, [])


def test_ref_selects_the_image(store: Store, tmp_path: Path) -> None:
    o = OciLayout(tmp_path / "refs")
    o.add(o.image([(tar_bytes([reg("v", b"one")]), "gzip")]), ref="v1")
    o.add(o.image([(tar_bytes([reg("v", b"two")]), "zstd")]), ref="v2")
    for ref, want in (("v1", b"one"), ("v2", b"two")):
        idx = index_of(store, oci.import_oci_layout(store, o.root, [f"x:{ref}"], ref=ref))
        assert store.get(idx.by_path[b"/v"].digest) == want
    with pytest.raises(UsageError, match=r"holds 2 images \(v1, v2\)"):
        oci.import_oci_layout(store, o.root, [])
    with pytest.raises(NotFound, match=r"no image named 'v3' \(names: v1, v2\)"):
        oci.import_oci_layout(store, o.root, [], ref="v3")


def test_docker_media_types(store: Store, tmp_path: Path) -> None:
    o = OciLayout(tmp_path / "docker")
    mts = {"gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
           "none": "application/vnd.docker.image.rootfs.diff.tar"}
    img = o.image([(L1, "gzip"), (L2, "none")], media_types=mts)
    manifest = o.read_json(img)
    manifest["mediaType"] = "application/vnd.docker.distribution.manifest.v2+json"
    mdesc = o.blob(jbytes(manifest), manifest["mediaType"])
    lst = o.blob(jbytes({"schemaVersion": 2, "manifests": [
        {**mdesc, "platform": {"os": "linux", "architecture": "amd64"}}],
        "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json"}),
        "application/vnd.docker.distribution.manifest.list.v2+json")
    o.add(lst)
    idx = index_of(store, oci.import_oci_layout(store, o.root, []))
    assert b"/cache/upper" in idx.by_path and b"/cache/lower" not in idx.by_path


def test_unknown_layer_media_type_is_refused(store: Store, tmp_path: Path) -> None:
    o = OciLayout(tmp_path / "odd")
    desc = o.image([(L1, "gzip")], media_types={"gzip": "application/x-weird"})
    o.add(desc)
    with pytest.raises(ImportRefused, match=r"layer 1 blob sha256:.*unsupported media type "
                                            r"'application/x-weird'"):
        oci.import_oci_layout(store, o.root, [])


def test_containerd_name_annotation_names_the_image(store: Store, tmp_path: Path) -> None:
    o = OciLayout(tmp_path / "named")
    d = o.image([(tar_bytes([reg("a")]), "gzip")])
    o.manifests.append({**d, "annotations": {
        "io.containerd.image.name": "docker.io/library/demo:3",
        "org.opencontainers.image.ref.name": "3"}})
    o.write_index()
    rec = oci.import_oci_layout(store, o.root, [])
    assert rec.names == ["docker.io/library/demo:3"]


# --------------------------------------------------------------------------- verification
def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_nothing_registered(store: Store) -> None:
    assert images.list_images(store) == []
    store.gc(images.live_digests(store))
    assert store.stats().blobs == 0 and store.stats().files == 0


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_tampered_layer_is_refused_and_leaves_nothing(store: Store, layout: OciLayout,
                                                     layer: int) -> None:
    manifest = layout.read_json(layout.manifests[0])
    blob = manifest["layers"][layer]
    _flip_last_byte(layout.blob_path(blob))  # same size, different content
    with pytest.raises(ImportRefused) as info:
        oci.import_oci_layout(store, layout.root, ["app:1"])
    msg = str(info.value)
    assert f"layer {layer + 1}/3 blob {blob['digest']}" in msg
    assert "content does not match its digest (it hashes to sha256:" in msg
    assert_nothing_registered(store)


def test_tampered_layer_garbage_reports_the_digest(store: Store, layout: OciLayout) -> None:
    """A blob so damaged it is no longer gzip still fails as a digest mismatch."""
    blob = layout.read_json(layout.manifests[0])["layers"][0]
    path = layout.blob_path(blob)
    path.write_bytes(b"\0" * path.stat().st_size)
    with pytest.raises(ImportRefused, match="content does not match its digest"):
        oci.import_oci_layout(store, layout.root, [])
    assert_nothing_registered(store)


def test_layer_size_mismatch_is_refused(store: Store, layout: OciLayout) -> None:
    blob = layout.read_json(layout.manifests[0])["layers"][2]
    with layout.blob_path(blob).open("ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ImportRefused, match=f"blob {blob['digest']}: {blob['size'] + 512} bytes, "
                                            f"its descriptor says {blob['size']}"):
        oci.import_oci_layout(store, layout.root, [])
    assert_nothing_registered(store)


@pytest.mark.parametrize("which", ["manifest", "config"])
def test_tampered_json_blob_is_refused(store: Store, layout: OciLayout, which: str) -> None:
    desc = layout.manifests[0] if which == "manifest" else \
        layout.read_json(layout.manifests[0])["config"]
    _flip_last_byte(layout.blob_path(desc))
    with pytest.raises(ImportRefused, match=f"{which} blob {desc['digest']}: content does not "
                                            "match its digest"):
        oci.import_oci_layout(store, layout.root, [])
    assert_nothing_registered(store)


def test_diff_id_mismatch_is_refused(store: Store, tmp_path: Path) -> None:
    o = OciLayout(tmp_path / "diffids")
    layer = o.blob(compress(L1, "gzip"), "application/vnd.oci.image.layer.v1.tar+gzip")
    cfg = o.blob(jbytes({"config": {}, "rootfs": {"type": "layers",
                                                  "diff_ids": [sha256(b"not it")]}}),
                 "application/vnd.oci.image.config.v1+json")
    o.add(o.blob(jbytes({"schemaVersion": 2, "config": cfg, "layers": [layer],
                         "mediaType": "application/vnd.oci.image.manifest.v1+json"}),
                 "application/vnd.oci.image.manifest.v1+json"))
    with pytest.raises(ImportRefused, match=f"uncompressed content hashes to {sha256(L1)}"):
        oci.import_oci_layout(store, o.root, [])
    assert_nothing_registered(store)


def test_missing_blob_is_refused(store: Store, layout: OciLayout) -> None:
    blob = layout.read_json(layout.manifests[0])["layers"][1]
    layout.blob_path(blob).unlink()
    with pytest.raises(ImportRefused, match=f"blobs/sha256/{blob['digest'][7:]} is missing"):
        oci.import_oci_layout(store, layout.root, [])


# --------------------------------------------------------------------------- docker save
def test_docker_save_legacy(store: Store, tmp_path: Path, layout: OciLayout) -> None:
    want = oci.import_oci_layout(store, layout.root, []).id
    path = tmp_path / "save.tar"
    docker_save_legacy(path, [L1, L2, L3], CONFIG, ["example.com/team/app:2", "app:latest"])
    rec = oci.import_docker_save(store, path, [])
    assert rec.id == want  # the same tree and config, whatever the container format
    assert sorted(rec.names) == ["app:latest", "example.com/team/app:2"]
    assert images.resolve(store, "app") == want
    renamed = oci.import_docker_save(store, path, ["other:9"])
    assert "other:9" in renamed.names


def test_docker_save_legacy_symlinked_duplicate_layer(store: Store, tmp_path: Path) -> None:
    base = tar_bytes([reg("a", b"1")])
    path = tmp_path / "dup.tar"
    docker_save_legacy(path, [base, tar_bytes([whiteout("a")]), base], {}, [],
                       duplicate_link=True)
    idx = index_of(store, oci.import_docker_save(store, path, []))
    assert [e.path for e in idx] == [b"/", b"/a"]


@pytest.mark.parametrize("where", ["header", "content"])
def test_docker_save_tampered_layer_fails_diff_id(store: Store, tmp_path: Path,
                                                  where: str) -> None:
    """Legacy saves name layers by no digest: the config's diff_ids catch tampering, and
    win over the tar error a damaged header causes."""
    path = tmp_path / "save.tar"
    docker_save_legacy(path, [L1], {}, ["t:1"])
    data = bytearray(path.read_bytes())
    # "lower" is first a member name (cache/lower), last that member's content
    at = data.find(b"lower") if where == "header" else data.rfind(b"lower")
    data[at] ^= 0x20
    path.write_bytes(bytes(data))
    with pytest.raises(ImportRefused, match=r"layer 1/1 .*/layer\.tar: uncompressed content "
                                            r"hashes to"):
        oci.import_docker_save(store, path, [])
    assert_nothing_registered(store)


def test_docker_save_several_images_need_a_ref(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "two.tar"
    docker_save_legacy(path, [L1], {}, ["a:1"])
    # a second image entry, sharing the first one's files
    import tarfile

    with tarfile.open(path) as tf:
        manifest = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
        members = [(m, tf.extractfile(m).read() if m.isreg() else None)  # type: ignore[union-attr]
                   for m in tf.getmembers() if m.name != "manifest.json"]
    manifest.append({**manifest[0], "RepoTags": ["b:2"]})
    path.write_bytes(tar_bytes([*members, reg("manifest.json", jbytes(manifest))]))
    with pytest.raises(UsageError, match=r"holds 2 images \(a:1, b:2\)"):
        oci.import_docker_save(store, path, [])
    rec = oci.import_docker_save(store, path, [], ref="b:2")
    assert rec.names == ["b:2"]
    with pytest.raises(NotFound, match="no image tagged 'c'"):
        oci.import_docker_save(store, path, [], ref="c")


def _docker25(layout: OciLayout, dest: Path, repo_tags: list[str] | None) -> None:
    """Docker 25+ ``docker save``: the OCI layout, plus manifest.json pointing into it."""
    if repo_tags is not None:
        manifest = layout.read_json(layout.manifests[0])
        (layout.root / "manifest.json").write_bytes(jbytes([{
            "Config": f"blobs/sha256/{manifest['config']['digest'][7:]}",
            "RepoTags": repo_tags,
            "Layers": [f"blobs/sha256/{d['digest'][7:]}" for d in manifest["layers"]]}]))
    tar_directory(layout.root, dest)


@pytest.mark.parametrize("with_manifest_json", [True, False])
def test_docker_save_oci_format(store: Store, tmp_path: Path, layout: OciLayout,
                                with_manifest_json: bool) -> None:
    want = oci.import_oci_layout(store, layout.root, []).id
    path = tmp_path / "save25.tar"
    _docker25(layout, path, ["app:25"] if with_manifest_json else None)
    rec = oci.import_docker_save(store, path, [], ref=None if with_manifest_json else "v1")
    assert rec.id == want
    assert oci.detect_format(path) == "docker-save"


def test_docker_save_oci_format_tampered_layer(store: Store, tmp_path: Path,
                                               layout: OciLayout) -> None:
    blob = layout.read_json(layout.manifests[0])["layers"][2]
    _flip_last_byte(layout.blob_path(blob))
    path = tmp_path / "save25.tar"
    _docker25(layout, path, ["app:25"])
    with pytest.raises(ImportRefused, match=f"layer 3/3 blobs/sha256/{blob['digest'][7:]}: "
                                            "content does not match its digest"):
        oci.import_docker_save(store, path, [])
    assert_nothing_registered(store)


def test_compressed_docker_save_uses_and_removes_a_temp_dir(store: Store, tmp_path: Path,
                                                           layout: OciLayout) -> None:
    want = oci.import_oci_layout(store, layout.root, []).id
    plain = tmp_path / "save.tar"
    docker_save_legacy(plain, [L1, L2, L3], CONFIG, ["app:gz"])
    gz = tmp_path / "save.tar.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    before = sorted(p.name for p in store.path.iterdir())
    assert oci.import_docker_save(store, gz, []).id == want
    assert sorted(p.name for p in store.path.iterdir()) == before
    assert oci.detect_format(gz) == "docker-save"


def test_not_a_docker_save_is_refused(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "rootfs.tar"
    path.write_bytes(L1)
    with pytest.raises(ImportRefused, match=r"neither manifest\.json nor an OCI layout"):
        oci.import_docker_save(store, path, [])


# --------------------------------------------------------------------------- skopeo
@needs_skopeo
def test_skopeo_docker_archive_and_oci_archive(store: Store, tmp_path: Path,
                                               layout: OciLayout) -> None:
    want = oci.import_oci_layout(store, layout.root, [], ref="v1").id
    # docker archives cannot hold zstd layers: start from an all-gzip copy
    layout = build_layout(tmp_path / "gzip-layout", ("gzip", "gzip", "none"))
    assert oci.import_oci_layout(store, layout.root, [], ref="v1").id == want
    docker_archive = tmp_path / "docker-archive.tar"
    skopeo("copy", f"oci:{layout.root}:v1", f"docker-archive:{docker_archive}:team/app:v1")
    assert oci.detect_format(docker_archive) == "docker-save"
    rec = oci.import_docker_save(store, docker_archive, [])
    assert rec.id == want and rec.names == ["docker.io/team/app:v1"]
    check_image(index_of(store, rec))

    oci_archive = tmp_path / "oci-archive.tar"
    skopeo("copy", f"oci:{layout.root}:v1", f"oci-archive:{oci_archive}:v1")
    assert oci.detect_format(oci_archive) == "docker-save"
    assert oci.import_docker_save(store, oci_archive, [], ref="v1").id == want


@needs_skopeo
def test_skopeo_recompressed_zstd_layout(store: Store, tmp_path: Path,
                                         layout: OciLayout) -> None:
    want = oci.import_oci_layout(store, layout.root, [], ref="v1").id
    dest = tmp_path / "zstd-layout"
    skopeo("copy", "--dest-compress-format", "zstd", "--dest-compress",
           f"oci:{layout.root}:v1", f"oci:{dest}:v1")
    manifest: dict[str, Any] = {}
    index = json.loads((dest / "index.json").read_text())
    digest = index["manifests"][0]["digest"][7:]
    manifest = json.loads((dest / "blobs" / "sha256" / digest).read_text())
    assert {d["mediaType"] for d in manifest["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+zstd"}
    assert oci.import_oci_layout(store, dest, [], ref="v1").id == want


# --------------------------------------------------------------------------- detection
def test_detect_format(tmp_path: Path, layout: OciLayout) -> None:
    plain_dir = tmp_path / "rootfs"
    plain_dir.mkdir()
    assert oci.detect_format(plain_dir) == "dir"
    assert oci.detect_format(layout.root) == "oci"
    rootfs = tar_bytes([dir_("./"), dir_("./bin"), reg("./bin/sh", b"x"), reg("manifest.json")])
    for kind in ("none", "gzip", "zstd"):
        p = tmp_path / f"rootfs.{kind}"
        p.write_bytes(compress(rootfs, kind))
        assert oci.detect_format(p) == "tar"  # its manifest.json is not at a save's top
    legacy = tmp_path / "legacy.tar"
    docker_save_legacy(legacy, [L1], {}, [])
    assert oci.detect_format(legacy) == "docker-save"
    archive = tmp_path / "oci-archive.tar"
    tar_directory(layout.root, archive)
    assert oci.detect_format(archive) == "docker-save"
    junk = tmp_path / "junk"
    junk.write_bytes(b"not an archive" * 100)
    with pytest.raises(ImportRefused, match="not a tar archive"):
        oci.detect_format(junk)
    with pytest.raises(NotFound):
        oci.detect_format(tmp_path / "missing")


def test_detect_format_stops_at_the_first_rootfs_member(tmp_path: Path) -> None:
    """A big rootfs tarball is told apart from its first headers, not read to the end."""
    p = tmp_path / "big.tar"
    good = tar_bytes([dir_("etc")])[:1024]  # one header + padding, no end blocks
    p.write_bytes(good + b"\x01" * 4096)  # garbage after: never reached
    assert oci.detect_format(p) == "tar"


def test_import_source_dispatch_uses_these_functions(store: Store, tmp_path: Path,
                                                     layout: OciLayout) -> None:
    """The dispatcher in swarm.build.importer calls detect_format and the importers."""
    from swarm.build.importer import import_source

    oci_only = OciLayout(tmp_path / "single")
    oci_only.add(oci_only.image([(L1, "gzip")]))
    assert import_source(store, oci_only.root, ["d:oci"]).names == ["d:oci"]
    legacy = tmp_path / "legacy.tar"
    docker_save_legacy(legacy, [L1], {}, ["d:save"])
    assert "d:save" in import_source(store, legacy, []).names
    rootfs = tmp_path / "rootfs.tar.zst"
    rootfs.write_bytes(compress(L1, "zstd"))
    rec = import_source(store, rootfs, ["d:tar"])
    assert index_of(store, rec).config == {}
    shutil.rmtree(oci_only.root)
