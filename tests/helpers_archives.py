"""Builders of crafted archives for import tests: tar members, layers, OCI layouts by hand,
``docker save`` tarballs (legacy and OCI-inside), and skopeo conversions of them."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import zstandard

Member = tuple[tarfile.TarInfo, bytes | None]

SKOPEO = shutil.which("skopeo")
# skopeo copies between local formats in well under a second; this only bounds a hang.
SKOPEO_TIMEOUT_S = 120
MT_LAYER = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"


# --------------------------------------------------------------------------- tar members
def _info(name: str, type_: bytes, *, mode: int, uid: int = 0, gid: int = 0,
          mtime: int = 1_600_000_000, pax: dict[str, str] | None = None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = mtime
    if pax:
        ti.pax_headers = dict(pax)
    return ti


def reg(name: str, data: bytes = b"", mode: int = 0o644, **kw: Any) -> Member:
    ti = _info(name, tarfile.REGTYPE, mode=mode, **kw)
    ti.size = len(data)
    return ti, data


def dir_(name: str, mode: int = 0o755, **kw: Any) -> Member:
    return _info(name, tarfile.DIRTYPE, mode=mode, **kw), None


def sym(name: str, target: str, **kw: Any) -> Member:
    ti = _info(name, tarfile.SYMTYPE, mode=0o777, **kw)
    ti.linkname = target
    return ti, None


def hard(name: str, target: str, **kw: Any) -> Member:
    ti = _info(name, tarfile.LNKTYPE, mode=0o644, **kw)
    ti.linkname = target
    return ti, None


def dev(name: str, kind: str, major: int = 0, minor: int = 0, mode: int = 0o600) -> Member:
    type_ = {"char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    ti = _info(name, type_, mode=mode)
    ti.devmajor, ti.devminor = major, minor
    return ti, None


def whiteout(path: str) -> Member:
    head, _, base = path.rpartition("/")
    return reg(f"{head}/.wh.{base}" if head else f".wh.{base}")


def opaque(dirpath: str) -> Member:
    return reg(f"{dirpath}/.wh..wh..opq")


def xattr_pax(values: dict[str, bytes]) -> dict[str, str]:
    """pax records for xattrs; binary values survive as surrogate-escaped text, which
    tarfile writes back as the original bytes."""
    return {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
            for k, v in values.items()}


def tar_bytes(members: Iterable[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return bio.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    assert kind == "none"
    return data


def raw_pax_member(name: str, records: dict[bytes, bytes], data: bytes = b"") -> bytes:
    """A pax header with raw byte records (as Go's archive/tar writes binary xattrs:
    no hdrcharset record), then a ustar file member. No end-of-archive blocks."""
    payload = b""
    for key, value in records.items():
        body = b" " + key + b"=" + value + b"\n"
        n = len(body) + 1
        while len(str(n).encode()) + len(body) != n:
            n += 1
        payload += str(n).encode() + body
    hdr = tarfile.TarInfo("PaxHeaders/" + name)
    hdr.type = tarfile.XHDTYPE
    hdr.size = len(payload)
    out = hdr.tobuf(tarfile.USTAR_FORMAT) + _pad(payload)
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = 0o644
    return out + ti.tobuf(tarfile.USTAR_FORMAT) + _pad(data)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def end_blocks() -> bytes:
    return b"\0" * (2 * tarfile.BLOCKSIZE)


# --------------------------------------------------------------------------- OCI layouts
def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def jbytes(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class OciLayout:
    """An OCI image layout written by hand: blobs named by their sha256."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.manifests: list[dict[str, Any]] = []

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        digest = sha256(data)
        (self.root / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def image(self, layers: list[tuple[bytes, str]], config: dict[str, Any] | None = None,
              *, diff_ids: bool = True, media_types: dict[str, str] | None = None,
              ) -> dict[str, Any]:
        """Write an image (layers given uncompressed, with the compression to store them
        in) and return its manifest descriptor."""
        mts = media_types or MT_LAYER
        descs = [self.blob(compress(tar, comp), mts[comp]) for tar, comp in layers]
        cfg: dict[str, Any] = {"architecture": "amd64", "os": "linux",
                               "config": config or {}}
        if diff_ids:
            cfg["rootfs"] = {"type": "layers", "diff_ids": [sha256(t) for t, _ in layers]}
        cdesc = self.blob(jbytes(cfg), MT_CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": cdesc,
                    "layers": descs}
        return self.blob(jbytes(manifest), MT_MANIFEST)

    def index_blob(self, manifests: list[dict[str, Any]]) -> dict[str, Any]:
        return self.blob(jbytes({"schemaVersion": 2, "mediaType": MT_INDEX,
                                 "manifests": manifests}), MT_INDEX)

    def add(self, desc: dict[str, Any], ref: str | None = None,
            platform: tuple[str, str] | None = None) -> dict[str, Any]:
        d = dict(desc)
        if ref is not None:
            d["annotations"] = {"org.opencontainers.image.ref.name": ref}
        if platform is not None:
            d["platform"] = {"os": platform[0], "architecture": platform[1]}
        self.manifests.append(d)
        self.write_index()
        return d

    def write_index(self) -> None:
        (self.root / "index.json").write_bytes(jbytes(
            {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": self.manifests}))

    def blob_path(self, desc: dict[str, Any]) -> Path:
        return self.root / "blobs" / "sha256" / desc["digest"].split(":")[1]

    def read_json(self, desc: dict[str, Any]) -> Any:
        return json.loads(self.blob_path(desc).read_bytes())


# --------------------------------------------------------------------------- docker save
def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = 0o644
    tf.addfile(ti, io.BytesIO(data))


def docker_save_legacy(path: Path, layers: list[bytes], config: dict[str, Any],
                       repo_tags: list[str], *, duplicate_link: bool = False) -> None:
    """A pre-25 ``docker save``: ``<id>/layer.tar``, ``<sha>.json``, ``manifest.json``.
    With ``duplicate_link`` the last layer is a symlink to the first (docker does that for
    identical layers)."""
    cfg = {"architecture": "amd64", "os": "linux", "config": config,
           "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t in layers]}}
    cfg_raw = jbytes(cfg)
    cfg_name = sha256(cfg_raw).split(":")[1] + ".json"
    layer_paths = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i, tar in enumerate(layers):
            lid = hashlib.sha256(b"layer%d" % i).hexdigest()
            d = tarfile.TarInfo(lid)
            d.type, d.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(d)
            if duplicate_link and i == len(layers) - 1 and i > 0:
                s = tarfile.TarInfo(f"{lid}/layer.tar")
                s.type, s.linkname = tarfile.SYMTYPE, f"../{layer_paths[0]}"
                tf.addfile(s)
            else:
                _tar_add(tf, f"{lid}/layer.tar", tar)
            layer_paths.append(f"{lid}/layer.tar")
        _tar_add(tf, cfg_name, cfg_raw)
        _tar_add(tf, "manifest.json", jbytes(
            [{"Config": cfg_name, "RepoTags": repo_tags, "Layers": layer_paths}]))
        _tar_add(tf, "repositories", b"{}")


def tar_directory(src: Path, dest: Path) -> None:
    """Pack a directory (an OCI layout) into a tarball, as Docker 25+ ``docker save`` does,
    plus a ``manifest.json`` when ``src`` has one."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, _, filenames in sorted(os.walk(src)):
            for fn in sorted(filenames):
                full = Path(dirpath) / fn
                tf.add(full, arcname=str(full.relative_to(src)))


def skopeo(*args: str) -> None:
    assert SKOPEO is not None
    done = subprocess.run([SKOPEO, "--insecure-policy", *args], capture_output=True,
                          timeout=SKOPEO_TIMEOUT_S)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
