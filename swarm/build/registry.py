"""Pull images through the Docker Registry HTTP API v2.

A reference ``[HOST[:PORT]/]REPO[:TAG|@DIGEST]`` names a registry (Docker Hub when the
first component does not look like a host), a repository and a manifest. The manifest is
fetched with every media type we read in ``Accept``; a manifest list / OCI index is
resolved to linux/amd64; then the config and each layer are fetched as blobs and applied
with the same code that imports OCI layouts (``swarm.build.oci``): every blob is checked
against its sha256 (and size) before its changes reach the tree, and the uncompressed
layers against the config's ``diff_ids``. A manifest fetched by digest is checked too.

Authentication: anonymous, and bearer tokens (a 401 with ``WWW-Authenticate: Bearer
realm=...,service=...,scope=...`` sends us to the token service; the token is then sent
on every request to that registry, never across a redirect to a blob store). Plain HTTP is
used for loopback registries and for hosts listed in ``$SWARM_INSECURE_REGISTRIES``
(comma-separated ``host:port``), HTTPS otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import IO, Any, TextIO

from swarm.build import oci
from swarm.build.progress import Progress
from swarm.errors import ImportRefused, NotFound, UsageError
from swarm.fs import images
from swarm.fs.images import ImageRecord
from swarm.store import Store

DOCKER_HUB = "registry-1.docker.io"
DOCKER_HUB_NAMES = ("docker.io", "index.docker.io", "registry-1.docker.io")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
HTTP_TIMEOUT_S = 60.0
MAX_MANIFEST_BYTES = oci.MAX_JSON_BYTES
ACCEPT = ", ".join([oci.MT_OCI_INDEX, oci.MT_DOCKER_LIST, oci.MT_OCI_MANIFEST,
                    oci.MT_DOCKER_MANIFEST])
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class Reference:
    host: str  # as used in URLs (registry-1.docker.io for Docker Hub)
    repo: str
    tag: str | None
    digest: str | None

    @property
    def manifest_ref(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return f"{self.host}/{self.repo}" + (f"@{self.digest}" if self.digest else
                                              f":{self.tag or 'latest'}")


def parse_reference(ref: str) -> Reference:
    """Docker's reference rules: a first component with a ``.`` or ``:`` (or
    ``localhost``) is a host; otherwise Docker Hub, with ``library/`` for one-part names."""
    rest, digest = ref, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not oci._DIGEST_RE.fullmatch(digest):
            raise UsageError(f"invalid image reference {ref!r}: bad digest {digest!r}")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG_RE.fullmatch(tag):
            raise UsageError(f"invalid image reference {ref!r}: bad tag {tag!r}")
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        host, repo = first, remainder
    else:
        host, repo = DOCKER_HUB, rest
    if host in DOCKER_HUB_NAMES:
        host = DOCKER_HUB
    if host == DOCKER_HUB and "/" not in repo:
        repo = f"library/{repo}"
    if not re.fullmatch(images._COMPONENT + r"(?:/" + images._COMPONENT + r")*", repo):
        raise UsageError(f"invalid image reference {ref!r}: bad repository name {repo!r}")
    return Reference(host, repo, tag, digest)


def _insecure(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    listed = [h.strip() for h in os.environ.get("SWARM_INSECURE_REGISTRIES", "").split(",")]
    return name in LOOPBACK_HOSTS or host in listed


class RegistryClient:
    """HTTP to one registry, with the bearer-token dance done once per scope."""

    def __init__(self, ref: Reference) -> None:
        self.ref = ref
        scheme = "http" if _insecure(ref.host) else "https"
        self.base = f"{scheme}://{ref.host}/v2/{ref.repo}"
        self.label = f"registry:{ref}"
        self._token: str | None = None
        # Redirects (to blob stores) are followed; the Authorization header is added as
        # an unredirected header, so urllib never carries it to another host.
        self._opener = urllib.request.build_opener()

    def _request(self, url: str, accept: str | None = None) -> urllib.request.Request:
        req = urllib.request.Request(url)
        if accept:
            req.add_header("Accept", accept)
        if self._token:
            req.add_unredirected_header("Authorization", f"Bearer {self._token}")
        return req

    def open(self, url: str, accept: str | None = None) -> Any:
        """A response for ``url``; a 401 with a bearer challenge fetches a token and
        retries once."""
        for attempt in range(2):
            try:
                return self._opener.open(self._request(url, accept), timeout=HTTP_TIMEOUT_S)
            except urllib.error.HTTPError as err:
                challenge = err.headers.get("WWW-Authenticate", "") if err.headers else ""
                if err.code == 401 and attempt == 0 and challenge.lower().startswith("bearer"):
                    self._token = self._fetch_token(challenge)
                    continue
                if err.code == 404:
                    raise NotFound(f"{self.label}: {url.rsplit('/v2/', 1)[-1]} not found "
                                   "(HTTP 404)") from None
                if err.code in (401, 403):
                    raise ImportRefused(f"{self.label}: access denied (HTTP {err.code}); "
                                        "only anonymous and bearer-token pulls are "
                                        "supported") from None
                raise ImportRefused(f"{self.label}: HTTP {err.code} for {url}") from None
            except (urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                raise ImportRefused(f"{self.label}: cannot reach {self.ref.host}: "
                                    f"{reason}") from None
        raise ImportRefused(f"{self.label}: the token service's token was refused")

    def _fetch_token(self, challenge: str) -> str:
        params = dict(_CHALLENGE_RE.findall(challenge))
        realm = params.pop("realm", None)
        if not realm:
            raise ImportRefused(f"{self.label}: bearer challenge without a realm")
        params.setdefault("scope", f"repository:{self.ref.repo}:pull")
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(params)
        try:
            with self._opener.open(url, timeout=HTTP_TIMEOUT_S) as resp:
                doc = json.loads(resp.read(MAX_MANIFEST_BYTES))
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise ImportRefused(f"{self.label}: token service {realm}: {err}") from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise ImportRefused(f"{self.label}: token service {realm} gave no token")
        return token

    def manifest(self, ref: str, expect: oci.Descriptor | None = None
                 ) -> tuple[str, str, Any]:
        """(media type, sha256 digest, document) of a manifest or index."""
        with self.open(f"{self.base}/manifests/{ref}", ACCEPT) as resp:
            raw = resp.read(MAX_MANIFEST_BYTES + 1)
            ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ImportRefused(f"{self.label}: manifest {ref} is too large")
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        want = expect.digest if expect is not None else (ref if ref.startswith("sha256:")
                                                         else None)
        if want is not None and digest != want:
            raise ImportRefused(f"{self.label}: manifest {ref} does not match its digest "
                                f"(it hashes to {digest})")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise ImportRefused(f"{self.label}: manifest {ref}: not valid JSON ({err})") from None
        if not isinstance(doc, dict):
            raise ImportRefused(f"{self.label}: manifest {ref}: not a JSON object")
        media = (expect.media_type if expect is not None and expect.media_type else "") or \
            doc.get("mediaType") or ctype
        return media, digest, doc

    # The oci._Blobs protocol: blobs by layout path "blobs/<alg>/<hex>".
    def open_path(self, path: str) -> tuple[IO[bytes], int]:
        parts = path.split("/")
        if len(parts) != 3 or parts[0] != "blobs":
            raise ImportRefused(f"{self.label}: no such blob path {path!r}")
        resp = self.open(f"{self.base}/blobs/{parts[1]}:{parts[2]}")
        length = resp.headers.get("Content-Length")
        try:
            size = int(length) if length is not None else -1
        except ValueError:
            size = -1
        return resp, size


class _SizedBlobs:
    """Registry blobs where a missing Content-Length takes the descriptor's size (the
    verifier still counts every byte)."""

    def __init__(self, client: RegistryClient, sizes: dict[str, int]) -> None:
        self.client = client
        self.sizes = sizes
        self.label = client.label

    def open_path(self, path: str) -> tuple[IO[bytes], int]:
        f, size = self.client.open_path(path)
        return f, size if size >= 0 else self.sizes.get(path, 0)


def pull(store: Store, ref: str, names: list[str] | None = None, *,
         out: TextIO | None = None, progress: Progress | None = None) -> ImageRecord:
    """Pull ``ref`` into the store and register it (named ``ref`` unless ``names``)."""
    parsed = parse_reference(ref)
    client = RegistryClient(parsed)
    if out is not None:
        print(f"--> pulling {parsed}", file=out, flush=True)
    media, digest, doc = client.manifest(parsed.manifest_ref)
    depth = 0
    while media in oci.INDEX_TYPES or (not media and "manifests" in doc):
        depth += 1
        if depth > oci.MAX_INDEX_DEPTH:
            raise ImportRefused(f"{client.label}: indexes nested too deep")
        where = f"{client.label}: index {digest}"
        child = oci._pick_platform(oci._descriptors(doc, where), where)
        media, digest, doc = client.manifest(child.digest, child)
    if media and media not in oci.MANIFEST_TYPES:
        raise ImportRefused(f"{client.label}: unsupported manifest media type {media!r}")
    mwhere = f"{client.label}: manifest {digest}"
    config_desc = oci.Descriptor.parse(doc.get("config"), f"{mwhere} config")
    layers = doc.get("layers") if isinstance(doc.get("layers"), list) else []
    sizes = {}
    for i, d in enumerate(layers):
        desc = oci.Descriptor.parse(d, f"{mwhere} layers[{i}]")
        sizes[oci._blob_path(desc)] = desc.size
    sizes[oci._blob_path(config_desc)] = config_desc.size
    blobs = _SizedBlobs(client, sizes)
    config_doc = oci._read_blob_json(blobs, config_desc, "config")
    specs = oci._layer_specs(blobs, doc, config_doc, mwhere)
    if names is None:
        names = [ref] if oci._valid_name(ref) else []
    checked = [images.parse_name(n) for n in names]
    if out is not None:
        print(f"    {len(specs)} layers, {sum(s.size or 0 for s in specs) / 1e6:.1f} MB",
              file=out, flush=True)
    return oci._build_and_register(store, blobs, specs, oci.image_config(config_doc, mwhere),
                                   checked, f"registry:{parsed}", progress)
