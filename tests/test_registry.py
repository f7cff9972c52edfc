"""Registry pulls from Debian's docker-registry on loopback, with test images pushed into
it by skopeo: multi-layer (gzip and zstd, whiteouts), manifest lists, a tampered layer,
bearer-token auth, and FROM of a registry image in a Dockerfile."""

from __future__ import annotations

import asyncio
import http.server
import json
import shutil
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_archives import OciLayout, dir_, reg, skopeo, tar_bytes, whiteout

from swarm.build import registry
from swarm.build.builder import build_dockerfile
from swarm.errors import ImportRefused, NotFound
from swarm.fs import images
from swarm.store import Store

REGISTRY = shutil.which("docker-registry")
pytestmark = pytest.mark.skipif(REGISTRY is None or shutil.which("skopeo") is None,
                                reason="docker-registry and skopeo are needed")
READY_LINE = "listening on"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry_addr(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A docker-registry on loopback (no auth); yields (host:port, storage root)."""
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    config = root / "config.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "version": 0.1, "log": {"level": "info"},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {"addr": f"127.0.0.1:{port}"}}))
    proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # blocks until the registry says it listens
            if READY_LINE in line:
                break
        else:
            pytest.fail("docker-registry exited before listening")
        drain = threading.Thread(target=lambda: [None for _ in proc.stderr or ()],
                                 daemon=True)
        drain.start()
        yield f"127.0.0.1:{port}", root / "data"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def push(layout: OciLayout, tag: str, dest: str, *, all_images: bool = False) -> None:
    args = ["copy", "--dest-tls-verify=false"] + (["--all"] if all_images else [])
    skopeo(*args, f"oci:{layout.root}:{tag}", f"docker://{dest}")


def multi_layer(root: Path, unique: bytes = b"") -> OciLayout:
    """Three layers; ``unique`` makes the last layer's blob this test's own (the registry
    stores a blob once for every repository)."""
    layout = OciLayout(root)
    l1 = tar_bytes([dir_("etc"), reg("etc/os-release", b"ID=test\n"), dir_("opt"),
                    reg("opt/old", b"old\n"), reg("opt/keep", b"keep\n")])
    l2 = tar_bytes([whiteout("opt/old"), dir_("app"), reg("app/main.py", b"print(2)\n")])
    l3 = tar_bytes([reg("app/version", b"3\n" + unique, mode=0o600)])
    desc = layout.image([(l1, "gzip"), (l2, "zstd"), (l3, "none")],
                        {"Env": ["A=1"], "Cmd": ["python3"]})
    layout.add(desc, ref="v1")
    return layout


def test_pull_multi_layer_image(registry_addr, tmp_path):
    addr, _ = registry_addr
    push(multi_layer(tmp_path / "layout"), "v1", f"{addr}/test/multi:v1")
    with Store(tmp_path / "store") as store:
        rec = registry.pull(store, f"{addr}/test/multi:v1")
        assert rec.names == [f"{addr}/test/multi:v1"]
        idx = images.load_index(store, rec.id)
        by = {e.path: e for e in idx}
        assert b"/opt/old" not in by and b"/opt/keep" in by
        assert store.get(by[b"/app/main.py"].digest) == b"print(2)\n"
        assert by[b"/app/version"].mode == 0o600
        assert idx.config == {"Cmd": ["python3"], "Env": ["A=1"]}
        assert images.resolve(store, f"{addr}/test/multi:v1") == rec.id
        with pytest.raises(NotFound):
            registry.pull(store, f"{addr}/test/nothing:v1")


def test_manifest_list_resolves_to_linux_amd64(registry_addr, tmp_path):
    addr, _ = registry_addr
    layout = OciLayout(tmp_path / "layout")
    amd = layout.image([(tar_bytes([reg("arch", b"amd64\n")]), "gzip")])
    arm = layout.image([(tar_bytes([reg("arch", b"arm64\n")]), "gzip")])
    amd["platform"] = {"os": "linux", "architecture": "amd64"}
    arm["platform"] = {"os": "linux", "architecture": "arm64"}
    layout.add(layout.index_blob([arm, amd]), ref="multi")
    push(layout, "multi", f"{addr}/test/list:1", all_images=True)
    with Store(tmp_path / "store") as store:
        rec = registry.pull(store, f"{addr}/test/list:1")
        e = images.load_index(store, rec.id).get("/arch")
        assert e is not None and e.digest is not None
        assert store.get(e.digest) == b"amd64\n"


def test_tampered_layer_is_rejected_by_its_digest(registry_addr, tmp_path):
    addr, data = registry_addr
    layout = multi_layer(tmp_path / "layout", b"tampered")
    push(layout, "v1", f"{addr}/test/tampered:v1")
    # skopeo may recompress layers on push: read the manifest the registry serves
    req = urllib.request.Request(f"http://{addr}/v2/test/tampered/manifests/v1",
                                 headers={"Accept": registry.ACCEPT})
    with urllib.request.urlopen(req) as resp:
        manifest = json.loads(resp.read())
    digest = manifest["layers"][-1]["digest"][7:]
    blob = data / "docker/registry/v2/blobs/sha256" / digest[:2] / digest / "data"
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    blob.write_bytes(bytes(raw))
    with Store(tmp_path / "store") as store:
        with pytest.raises(ImportRefused, match="does not match its digest"):
            registry.pull(store, f"{addr}/test/tampered:v1")
        assert images.list_images(store) == []


class _TokenProxy(http.server.BaseHTTPRequestHandler):
    """A registry front that demands a bearer token, and the token service itself."""

    upstream = ""
    token = "tok-123"
    seen_tokens: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/token"):
            body = json.dumps({"token": self.token}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        auth = self.headers.get("Authorization")
        if auth != f"Bearer {self.token}":
            self.send_response(401)
            host = self.headers["Host"]
            self.send_header("WWW-Authenticate", f'Bearer realm="http://{host}/token",'
                             'service="test",scope="repository:test/multi:pull"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.seen_tokens.append(auth)
        req = urllib.request.Request(f"http://{self.upstream}{self.path}",
                                     headers={"Accept": self.headers.get("Accept", "*/*")})
        with urllib.request.urlopen(req) as resp:
            body = resp.read()
            self.send_response(resp.status)
            for k in ("Content-Type", "Docker-Content-Digest"):
                if resp.headers.get(k):
                    self.send_header(k, resp.headers[k])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


def test_bearer_token_auth(registry_addr, tmp_path):
    addr, _ = registry_addr
    push(multi_layer(tmp_path / "layout"), "v1", f"{addr}/test/multi:v1")
    _TokenProxy.upstream = addr
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenProxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        with Store(tmp_path / "store") as store:
            rec = registry.pull(store, f"127.0.0.1:{port}/test/multi:v1")
            assert images.load_index(store, rec.id).get("/app/main.py") is not None
        assert _TokenProxy.seen_tokens
    finally:
        server.shutdown()
        server.server_close()


def test_dockerfile_from_registry_image(registry_addr, tmp_path):
    addr, _ = registry_addr
    push(multi_layer(tmp_path / "layout"), "v1", f"{addr}/test/base:v1")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "extra.txt").write_text("extra\n")
    (ctx / "Dockerfile").write_text(f"FROM {addr}/test/base:v1\nCOPY extra.txt /app/\n")
    res = asyncio.run(build_dockerfile(tmp_path / "state", ctx, names=["onreg"], quiet=True))
    with Store(tmp_path / "state" / "store") as store:
        idx = images.load_index(store, res.image_id)
        assert idx.get("/app/extra.txt") is not None and idx.get("/app/main.py") is not None
        assert idx.config["Env"] == ["A=1"]


def test_parse_reference_defaults_to_docker_hub():
    r = registry.parse_reference("python:3.12-slim")
    assert (r.host, r.repo, r.tag) == ("registry-1.docker.io", "library/python", "3.12-slim")
    r = registry.parse_reference("localhost:5000/a/b@sha256:" + "0" * 64)
    assert (r.host, r.repo, r.tag, r.digest) == ("localhost:5000", "a/b", None,
                                                 "sha256:" + "0" * 64)
