"""Images from OCI image layouts and ``docker save`` tarballs.

An OCI layout (``oci-layout``, ``index.json``, ``blobs/sha256/...``) names every blob by
its sha256, so we check each blob against its descriptor (digest and size) as we read it;
a layer is checked before its changes reach the tree (see ``TreeBuilder.apply_tar``'s
``before_apply``), and JSON documents before they are parsed. Where the image config
lists ``rootfs.diff_ids`` we also check the uncompressed layers against them: that is
the only integrity a legacy ``docker save`` (``manifest.json`` + ``<id>/layer.tar``)
carries, and it is what ``docker load`` checks too.

A ``docker save`` tarball is read in place: members are opened with ``extractfile`` on the
seekable outer tar, never unpacked. A compressed outer tarball (``docker save | gzip``)
is first decompressed to a temporary file inside the store's directory, removed after.
Newer ``docker save`` output (Docker 25+) and ``skopeo``'s ``oci-archive`` are an OCI layout
inside the tar; when a ``manifest.json`` is there too we follow it, for its ``RepoTags``.

Nothing is registered until every layer has been applied, so a refused import leaves no
image record.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import stat as statmod
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

from swarm.build.layers import (
    ARCHIVE_ERRORS,
    TAR_ENCODING,
    TAR_ERRORS,
    TreeBuilder,
    decompress,
    drain,
    open_tar_stream,
    peek,
    sniff_compression,
)
from swarm.build.progress import Progress
from swarm.errors import ImportRefused, NotFound, UsageError
from swarm.fs import images
from swarm.fs.images import ImageRecord
from swarm.store import Store
from swarm.store.cas import Batch

# JSON documents (index, manifest, config) are read whole: refuse absurd ones.
MAX_JSON_BYTES = 16 << 20
# Nested indexes (an index pointing at an index ...) deeper than this are refused.
MAX_INDEX_DEPTH = 4
# Symlinks followed inside a docker-save tarball (legacy ones link duplicate layers).
MAX_SYMLINK_HOPS = 16
COPY_BLOCK_BYTES = 1 << 20
OCI_LAYOUT_VERSION_MAJOR = "1"
DEFAULT_PLATFORM = ("linux", "amd64")

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
LAYER_COMPRESSION = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
# The keys of the image config's ``config`` object that an image carries (as-is).
CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "ExposedPorts", "Labels",
               "StopSignal")

_DIGEST_RE = re.compile(r"(sha256):([a-f0-9]{64})|(sha512):([a-f0-9]{128})")
_HASH_LEN = {"sha256": 64, "sha512": 128}
# Top-level names a docker-save / oci-archive tarball has (and a rootfs tarball has not).
_SAVE_TOP_RE = re.compile(r"[a-f0-9]{64}(\.json|\.tar)?|blobs|index\.json|manifest\.json|"
                          r"oci-layout|repositories")


# --------------------------------------------------------------------------- descriptors
@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor, validated (the digest is safe to put in a path)."""

    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, obj: Any, where: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise ImportRefused(f"{where}: descriptor is not an object")
        digest, size = obj.get("digest"), obj.get("size")
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
            raise ImportRefused(f"{where}: invalid digest {digest!r}")
        if type(size) is not int or size < 0:
            raise ImportRefused(f"{where}: blob {digest}: invalid size {size!r}")
        media_type = obj.get("mediaType") or ""
        platform = obj.get("platform") or {}
        annotations = obj.get("annotations") or {}
        if not isinstance(media_type, str) or not isinstance(platform, dict) or not \
                isinstance(annotations, dict):
            raise ImportRefused(f"{where}: blob {digest}: malformed descriptor")
        return cls(media_type, digest, size, platform, annotations)

    @property
    def algorithm(self) -> str:
        return self.digest.split(":", 1)[0]

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    def platform_str(self) -> str:
        p = self.platform
        parts = [str(p.get("os", "?")), str(p.get("architecture", "?"))]
        if p.get("variant"):
            parts.append(str(p["variant"]))
        return "/".join(parts)


class _Verifier(io.RawIOBase):
    """Reads through to ``raw`` while hashing and counting; ``finish`` drains the rest and
    checks digest and size. Reading past the expected size fails at once, so a blob that
    lies about its size cannot make us read forever."""

    def __init__(self, raw: IO[bytes], what: str, digest: str | None = None,
                 size: int | None = None) -> None:
        super().__init__()
        self._raw = raw
        self._what = what
        self._digest = digest
        self._size = size
        algorithm = digest.split(":", 1)[0] if digest else "sha256"
        self._hash = hashlib.new(algorithm)
        self.count = 0
        self._result: ImportRefused | bool | None = False  # False: not finished yet

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        data = self._raw.read(len(view))
        if not data:
            return 0
        self.count += len(data)
        if self._size is not None and self.count > self._size:
            raise ImportRefused(f"{self._what}: longer than the {self._size} bytes its "
                                "descriptor says")
        self._hash.update(data)
        view[:len(data)] = data
        return len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def finish(self) -> None:
        """Drain and check (once; later calls repeat the verdict)."""
        if self._result is False:
            self._result = None
            try:
                drain(self)
            except ImportRefused as err:
                self._result = err
            except ARCHIVE_ERRORS as err:
                self._result = ImportRefused(f"{self._what}: unreadable ({err})")
            else:
                self._result = self._check()
        if isinstance(self._result, ImportRefused):
            raise self._result

    def _check(self) -> ImportRefused | None:
        if self._size is not None and self.count != self._size:
            return ImportRefused(f"{self._what}: {self.count} bytes, its descriptor says "
                                 f"{self._size}")
        if self._digest is not None:
            got = f"{self._hash.name}:{self._hash.hexdigest()}"
            if got != self._digest:
                return ImportRefused(f"{self._what}: content does not match its digest "
                                     f"(it hashes to {got})")
        return None


# --------------------------------------------------------------------------- blob sources
class _Blobs(Protocol):
    """Where a layout's files are: a directory, or the members of a tarball."""

    label: str

    def open_path(self, path: str) -> tuple[IO[bytes], int]:
        """The file at ``path`` (relative to the layout root) and its size."""
        ...


def _blob_path(desc: Descriptor) -> str:
    return f"blobs/{desc.algorithm}/{desc.hex}"


class _DirBlobs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.label = f"oci:{root}"

    def open_path(self, path: str) -> tuple[IO[bytes], int]:
        full = self.root / path
        try:
            f = open(full, "rb")  # noqa: SIM115 - handed to the caller, who closes it
        except FileNotFoundError:
            raise ImportRefused(f"{self.label}: {path} is missing") from None
        except OSError as err:
            raise ImportRefused(f"{self.label}: cannot open {path}: {err}") from err
        st = os.fstat(f.fileno())
        if not statmod.S_ISREG(st.st_mode):
            f.close()
            raise ImportRefused(f"{self.label}: {path} is not a regular file")
        return f, st.st_size


def _clean_member_name(name: str) -> str | None:
    """A tar member name as a layout-relative path, or None if it could never be one."""
    if name.startswith("/"):
        return None
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../"):
        return None
    return norm


class _TarBlobs:
    """Members of a seekable outer tarball, opened in place with ``extractfile``."""

    def __init__(self, tf: tarfile.TarFile, label: str) -> None:
        self.tf = tf
        self.label = label
        self.members: dict[str, tarfile.TarInfo] = {}
        for m in tf.getmembers():
            clean = _clean_member_name(m.name)
            if clean is not None:
                self.members[clean] = m  # the last of repeated names wins, as in tar

    def has(self, path: str) -> bool:
        return path in self.members

    def open_path(self, path: str) -> tuple[IO[bytes], int]:
        current = _clean_member_name(path)
        if current is None:
            raise ImportRefused(f"{self.label}: {path!r} points outside the archive")
        for _ in range(MAX_SYMLINK_HOPS):
            m = self.members.get(current)
            if m is None:
                raise ImportRefused(f"{self.label}: {path!r} is missing from the archive")
            if m.issym() or m.islnk():
                base = posixpath.dirname(current) if m.issym() else ""
                nxt = _clean_member_name(posixpath.join(base, m.linkname))
                if nxt is None or m.linkname.startswith("/"):
                    raise ImportRefused(f"{self.label}: {path!r} links outside the archive "
                                        f"({m.linkname!r})")
                current = nxt
                continue
            if not m.isreg():
                raise ImportRefused(f"{self.label}: {path!r} is not a regular file")
            f = self.tf.extractfile(m)
            if f is None:  # pragma: no cover - extractfile gives a reader for files
                raise ImportRefused(f"{self.label}: {path!r} has no data")
            return f, m.size
        raise ImportRefused(f"{self.label}: {path!r}: too many levels of links")


def _read_json(blobs: _Blobs, path: str, what: str, *, digest: str | None = None,
               size: int | None = None) -> Any:
    """A JSON file of the layout, checked against ``digest``/``size`` before parsing."""
    if size is not None and size > MAX_JSON_BYTES:
        raise ImportRefused(f"{what}: {size} bytes is too large for a JSON document")
    f, actual = blobs.open_path(path)
    with f:
        if actual > MAX_JSON_BYTES:
            raise ImportRefused(f"{what}: {actual} bytes is too large for a JSON document")
        if size is not None and actual != size:
            raise ImportRefused(f"{what}: {actual} bytes, its descriptor says {size}")
        v = _Verifier(f, what, digest, size)
        try:
            data = v.readall()
        except ARCHIVE_ERRORS as err:
            raise ImportRefused(f"{what}: unreadable ({err})") from err
        v.finish()
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise ImportRefused(f"{what}: not valid JSON ({err})") from err


def _read_blob_json(blobs: _Blobs, desc: Descriptor, kind: str) -> Any:
    return _read_json(blobs, _blob_path(desc), f"{blobs.label}: {kind} blob {desc.digest}",
                      digest=desc.digest, size=desc.size)


# --------------------------------------------------------------------------- resolution
def _is_default_platform(desc: Descriptor) -> bool:
    p = desc.platform
    return (p.get("os"), p.get("architecture")) == DEFAULT_PLATFORM


def _pick_platform(descs: list[Descriptor], where: str) -> Descriptor:
    hits = [d for d in descs if _is_default_platform(d)]
    if hits:
        return hits[0]  # variants of amd64 in document order: the first is the baseline
    if len(descs) == 1 and not descs[0].platform:
        return descs[0]
    have = ", ".join(sorted({d.platform_str() for d in descs})) or "none"
    raise ImportRefused(f"{where}: no {'/'.join(DEFAULT_PLATFORM)} image (platforms: {have})")


def _descriptors(doc: Any, where: str) -> list[Descriptor]:
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
        raise ImportRefused(f"{where}: not an image index (no manifests list)")
    return [Descriptor.parse(m, f"{where} manifests[{i}]")
            for i, m in enumerate(doc["manifests"])]


def _ref_names(d: Descriptor) -> list[str]:
    return [v for k in (REF_NAME_ANNOTATION, CONTAINERD_NAME_ANNOTATION)
            if isinstance(v := d.annotations.get(k), str)]


def _select_top(index_doc: Any, ref: str | None, where: str) -> Descriptor:
    """The descriptor ``index.json`` offers for ``ref`` (or its only / linux/amd64 one)."""
    descs = _descriptors(index_doc, where)
    if not descs:
        raise ImportRefused(f"{where}: the index lists no images")
    if ref is not None:
        hits = [d for d in descs if ref in _ref_names(d)]
        if not hits:
            have = ", ".join(sorted({n for d in descs for n in _ref_names(d)})) or "none"
            raise NotFound(f"{where}: no image named {ref!r} (names: {have})")
        descs = hits
    if len(descs) == 1:
        return descs[0]
    platformed = [d for d in descs if _is_default_platform(d)]
    if len(platformed) == 1 or (platformed and ref is not None):
        return platformed[0]
    names = sorted({n for d in descs for n in _ref_names(d)})
    if len(names) > 1:
        raise UsageError(f"{where}: holds {len(descs)} images ({', '.join(names)}); "
                         "say which one with a ref")
    return _pick_platform(descs, where)


def _resolve_manifest(blobs: _Blobs, desc: Descriptor, depth: int = 0) -> tuple[Descriptor, Any]:
    """Follow indexes down to an image manifest: (its descriptor, its document)."""
    what = f"{blobs.label}: blob {desc.digest}"
    doc = _read_blob_json(blobs, desc, "manifest")
    if not isinstance(doc, dict):
        raise ImportRefused(f"{what}: not a JSON object")
    media_type = desc.media_type or doc.get("mediaType") or ""
    if media_type in INDEX_TYPES or (not media_type and "manifests" in doc):
        if depth >= MAX_INDEX_DEPTH:
            raise ImportRefused(f"{what}: indexes nested more than {MAX_INDEX_DEPTH} deep")
        child = _pick_platform(_descriptors(doc, what), what)
        return _resolve_manifest(blobs, child, depth + 1)
    if media_type in MANIFEST_TYPES or (not media_type and "layers" in doc):
        return desc, doc
    raise ImportRefused(f"{what}: unsupported manifest media type {media_type!r}")


def image_config(doc: Any, where: str) -> dict[str, Any]:
    """The parts of an image config JSON an image keeps: its ``config`` object's
    Env/Cmd/Entrypoint/WorkingDir/User/ExposedPorts/Labels/StopSignal, as they are."""
    if not isinstance(doc, dict):
        raise ImportRefused(f"{where}: image config is not a JSON object")
    cfg = doc.get("config") or {}
    if not isinstance(cfg, dict):
        raise ImportRefused(f"{where}: image config's 'config' is not an object")
    return {k: cfg[k] for k in CONFIG_KEYS if cfg.get(k) is not None}


def _diff_ids(doc: Any, layers: int, where: str) -> list[str | None]:
    """The config's ``rootfs.diff_ids`` (sha256 of each uncompressed layer), if it has
    them; they must then be one per layer."""
    rootfs = doc.get("rootfs") if isinstance(doc, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if ids is None:
        return [None] * layers
    if not isinstance(ids, list) or len(ids) != layers:
        n = len(ids) if isinstance(ids, list) else "no list of"
        raise ImportRefused(f"{where}: image config lists {n} diff_ids for {layers} layers")
    for d in ids:
        if not isinstance(d, str) or not _DIGEST_RE.fullmatch(d):
            raise ImportRefused(f"{where}: image config has an invalid diff_id {d!r}")
    return list(ids)


# --------------------------------------------------------------------------- layers
@dataclass
class _LayerSpec:
    """One layer to apply: where it is, and what it must hash to."""

    path: str
    label: str
    digest: str | None = None
    size: int | None = None
    compression: str | None = None  # None: sniff the magic bytes
    diff_id: str | None = None


def _apply_layer(builder: TreeBuilder, blobs: _Blobs, spec: _LayerSpec, batch: Batch,
                 progress: Progress | None) -> None:
    f, actual = blobs.open_path(spec.path)
    with f:
        if spec.size is not None and actual != spec.size:
            raise ImportRefused(f"{spec.label}: {actual} bytes, its descriptor says "
                                f"{spec.size}")
        raw = _Verifier(f, spec.label, spec.digest, spec.size)
        diff: _Verifier | None = None

        def verify() -> None:
            # Everything read: drain what tar left (end padding), then check both hashes.
            if diff is not None:
                try:
                    drain(diff)
                except ARCHIVE_ERRORS as err:
                    raw.finish()  # a tampered blob: say so rather than "bad gzip"
                    raise ImportRefused(f"{spec.label}: unreadable ({err})") from err
            raw.finish()
            if diff is not None and spec.diff_id is not None:
                got = f"sha256:{diff.hexdigest()}"
                if got != spec.diff_id:
                    raise ImportRefused(f"{spec.label}: uncompressed content hashes to {got}, "
                                        f"the image config says {spec.diff_id}")

        try:
            # The verifiers are passed as streams themselves (not wrapped in a
            # BufferedReader, which would close them when collected).
            stream = decompress(cast(IO[bytes], raw), spec.compression)
            diff = _Verifier(stream, f"{spec.label} (uncompressed)")
            tf = open_tar_stream(cast(IO[bytes], diff), spec.label)
            builder.apply_tar(tf, batch, progress, spec.label, before_apply=verify)
        except (ImportRefused, *ARCHIVE_ERRORS) as err:  # type: ignore[misc]
            # A damaged or tampered blob often fails as a bad tar first; when a digest or
            # diff_id does not match, that is the real news.
            if diff is None:
                raw.finish()
            else:
                verify()
            if isinstance(err, ImportRefused):
                raise
            raise ImportRefused(f"{spec.label}: unreadable layer ({err})") from err


def _layer_specs(blobs: _Blobs, manifest: Any, config_doc: Any, where: str) -> list[_LayerSpec]:
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ImportRefused(f"{where}: manifest has no layers list")
    descs = [Descriptor.parse(d, f"{where} layers[{i}]") for i, d in enumerate(layers)]
    diff_ids = _diff_ids(config_doc, len(descs), where)
    specs = []
    for i, (d, diff_id) in enumerate(zip(descs, diff_ids, strict=True)):
        if d.media_type and d.media_type not in LAYER_COMPRESSION:
            raise ImportRefused(f"{blobs.label}: layer {i + 1} blob {d.digest}: unsupported "
                                f"media type {d.media_type!r}")
        specs.append(_LayerSpec(
            path=_blob_path(d), digest=d.digest, size=d.size, diff_id=diff_id,
            compression=LAYER_COMPRESSION.get(d.media_type),
            label=f"{blobs.label}: layer {i + 1}/{len(descs)} blob {d.digest}"))
    return specs


def _build_and_register(store: Store, blobs: _Blobs, specs: list[_LayerSpec],
                        config: dict[str, Any], names: list[str], source: str,
                        progress: Progress | None) -> ImageRecord:
    builder = TreeBuilder()
    with store.batch() as batch:
        for spec in specs:
            _apply_layer(builder, blobs, spec, batch, progress)
        new_bytes = batch.new_bytes
    index = builder.build(config)
    return images.register(store, index, names, source=source, new_bytes=new_bytes)


def _import_from_index(store: Store, blobs: _Blobs, ref: str | None, names: list[str],
                       source: str, progress: Progress | None) -> ImageRecord:
    """Shared by OCI layout directories and OCI layouts inside a tarball."""
    layout = _read_json(blobs, "oci-layout", f"{blobs.label}: oci-layout")
    version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
    if not isinstance(version, str) or version.split(".")[0] != OCI_LAYOUT_VERSION_MAJOR:
        raise ImportRefused(f"{blobs.label}: unsupported OCI layout version {version!r}")
    where = f"{blobs.label}: index.json"
    top = _select_top(_read_json(blobs, "index.json", where), ref, where)
    mdesc, manifest = _resolve_manifest(blobs, top)
    mwhere = f"{blobs.label}: manifest {mdesc.digest}"
    config_desc = Descriptor.parse(manifest.get("config"), f"{mwhere} config")
    config_doc = _read_blob_json(blobs, config_desc, "config")
    specs = _layer_specs(blobs, manifest, config_doc, mwhere)
    if not names:
        names = [n for n in top.annotations.get(CONTAINERD_NAME_ANNOTATION, "").split()
                 if _valid_name(n)]
    return _build_and_register(store, blobs, specs, image_config(config_doc, mwhere), names,
                               source, progress)


def _valid_name(name: str) -> bool:
    try:
        images.parse_name(name)
    except UsageError:
        return False
    return True


# --------------------------------------------------------------------------- public API
def import_oci_layout(store: Store, dir: str | os.PathLike[str], names: list[str] | tuple[
        str, ...] = (), *, ref: str | None = None,
        progress: Progress | None = None) -> ImageRecord:
    """Import the image of an OCI image layout directory.

    ``ref`` picks the image whose ``org.opencontainers.image.ref.name`` (or
    ``io.containerd.image.name``) annotation equals it; without one the layout must hold a
    single image, or a single linux/amd64 one. Indexes / manifest lists resolve to
    linux/amd64. With no ``names``, a ``io.containerd.image.name`` annotation names it.
    """
    checked = [images.parse_name(n) for n in names]
    root = Path(dir)
    if not root.is_dir():
        raise NotFound(f"not a directory: {root}")
    if not (root / "oci-layout").is_file():
        raise ImportRefused(f"oci:{root}: not an OCI layout (no oci-layout file)")
    blobs = _DirBlobs(root)
    source = f"oci:{root}" + (f":{ref}" if ref else "")
    return _import_from_index(store, blobs, ref, checked, source, progress)


def _seekable_tar(f: IO[bytes], label: str) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=f, mode="r:", encoding=TAR_ENCODING, errors=TAR_ERRORS)
    except ARCHIVE_ERRORS as err:
        raise ImportRefused(f"{label}: not a tar archive ({err})") from err


@contextlib.contextmanager
def _open_outer(store: Store, path: Path) -> Iterator[tarfile.TarFile]:
    """The outer tarball, seekable: in place when plain, else decompressed to a temporary
    file in the store's directory (same filesystem as the data it becomes)."""
    label = f"docker-save:{path}"
    with open(path, "rb") as f:
        head, _ = peek(f)
        compression = sniff_compression(head)
        if compression == "none":
            with _seekable_tar(f, label) as tf:
                yield tf
            return
        tmp = tempfile.mkdtemp(prefix="import-", dir=store.path)
        try:
            plain = os.path.join(tmp, "outer.tar")
            try:
                with open(plain, "wb") as out:
                    shutil.copyfileobj(decompress(f, compression), out, COPY_BLOCK_BYTES)
            except ARCHIVE_ERRORS as err:
                raise ImportRefused(f"{label}: unreadable ({err})") from err
            with open(plain, "rb") as pf, _seekable_tar(pf, label) as tf:
                yield tf
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _digest_from_path(path: str) -> str | None:
    """``blobs/sha256/<hex>`` or ``<hex>.json`` names its sha256: return it as a digest."""
    parts = posixpath.normpath(path).split("/")
    if len(parts) == 3 and parts[0] == "blobs" and parts[1] in _HASH_LEN and \
            re.fullmatch(f"[a-f0-9]{{{_HASH_LEN[parts[1]]}}}", parts[2]):
        return f"{parts[1]}:{parts[2]}"
    if len(parts) == 1 and re.fullmatch(r"[a-f0-9]{64}\.json", parts[0]):
        return f"sha256:{parts[0][:64]}"
    return None


def _import_docker_manifest(store: Store, blobs: _TarBlobs, ref: str | None, names: list[str],
                            source: str, progress: Progress | None) -> ImageRecord:
    where = f"{blobs.label}: manifest.json"
    doc = _read_json(blobs, "manifest.json", where)
    if not isinstance(doc, list) or not doc or not all(isinstance(e, dict) for e in doc):
        raise ImportRefused(f"{where}: not a list of images")

    def tags(e: dict[str, Any]) -> list[str]:
        t = e.get("RepoTags") or []
        if not isinstance(t, list) or not all(isinstance(x, str) for x in t):
            raise ImportRefused(f"{where}: malformed RepoTags {t!r}")
        return t

    entries: list[dict[str, Any]] = doc
    if ref is not None:
        want = images.parse_name(ref)
        entries = [e for e in entries if want in [images.parse_name(t) for t in tags(e)
                                                  if _valid_name(t)]]
        if not entries:
            have = ", ".join(t for e in doc for t in tags(e)) or "none"
            raise NotFound(f"{where}: no image tagged {ref!r} (tags: {have})")
    if len(entries) > 1:
        have = ", ".join(t for e in entries for t in tags(e)) or "untagged"
        raise UsageError(f"{where}: holds {len(entries)} images ({have}); say which one "
                         "with a ref")
    entry = entries[0]
    config_path, layer_paths = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_path, str) or not isinstance(layer_paths, list) or not all(
            isinstance(p, str) for p in layer_paths):
        raise ImportRefused(f"{where}: entry without Config and Layers")
    config_doc = _read_json(blobs, config_path, f"{blobs.label}: config {config_path!r}",
                            digest=_digest_from_path(config_path))
    diff_ids = _diff_ids(config_doc, len(layer_paths), f"{blobs.label}: {config_path}")
    specs = [
        _LayerSpec(path=p, digest=_digest_from_path(p), diff_id=diff_id,
                   label=f"{blobs.label}: layer {i + 1}/{len(layer_paths)} {p}")
        for i, (p, diff_id) in enumerate(zip(layer_paths, diff_ids, strict=True))]
    if not names:
        for t in tags(entry):
            if not _valid_name(t):
                raise ImportRefused(f"{where}: RepoTag {t!r} is not a valid image name")
        names = [images.parse_name(t) for t in tags(entry)]
    return _build_and_register(store, blobs, specs, image_config(config_doc, where), names,
                               source, progress)


def import_docker_save(store: Store, tarpath: str | os.PathLike[str],
                       names: list[str] | tuple[str, ...] = (), *, ref: str | None = None,
                       progress: Progress | None = None) -> ImageRecord:
    """Import a ``docker save`` tarball (plain or compressed): the legacy format
    (``manifest.json`` with Config, RepoTags, Layers) or an OCI layout inside the tar
    (Docker 25+, ``skopeo copy ... oci-archive:``).

    With no ``names``, the image's RepoTags name it. ``ref`` picks one image of a tarball
    that holds several: a RepoTag (legacy) or a ref name annotation (OCI).
    """
    checked = [images.parse_name(n) for n in names]
    path = Path(tarpath)
    if not path.is_file():
        raise NotFound(f"no such file: {path}")
    source = f"docker-save:{path}" + (f":{ref}" if ref else "")
    with _open_outer(store, path) as tf:
        blobs = _TarBlobs(tf, f"docker-save:{path}")
        if blobs.has("manifest.json"):
            return _import_docker_manifest(store, blobs, ref, checked, source, progress)
        if blobs.has("index.json") and blobs.has("oci-layout"):
            return _import_from_index(store, blobs, ref, checked, source, progress)
    raise ImportRefused(f"docker-save:{path}: neither manifest.json nor an OCI layout "
                        "(index.json, oci-layout) in the archive")


def detect_format(path: str | os.PathLike[str]) -> str:
    """What ``path`` is, for the import dispatcher: "dir", "oci" (a directory with an
    ``oci-layout`` file), "docker-save" (a tar, maybe compressed, holding ``manifest.json``
    or ``oci-layout``) or "tar" (any other tar: a root filesystem).

    A rootfs tar is recognised at its first member that no docker-save tarball has, so
    telling a big rootfs tarball apart reads only its first headers.
    """
    p = Path(path)
    if p.is_dir():
        return "oci" if (p / "oci-layout").is_file() else "dir"
    if not p.exists():
        raise NotFound(f"no such file or directory: {p}")
    label = str(p)
    with open(p, "rb") as f:
        try:
            tf = open_tar_stream(decompress(f), label)
            with tf:
                while (m := tf.next()) is not None:
                    del tf.members[:]  # type: ignore[attr-defined]
                    name = _clean_member_name(m.name)
                    if name in ("manifest.json", "oci-layout"):
                        return "docker-save"
                    top = (name or "").split("/", 1)[0]
                    if top != "." and not _SAVE_TOP_RE.fullmatch(top):
                        return "tar"
        except ARCHIVE_ERRORS as err:
            raise ImportRefused(f"{label}: not a tar archive ({err})") from err
    return "tar"
