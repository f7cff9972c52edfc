"""Dockerfiles built for real (RUN in runc over the lazy mount) and then run with
`swarm run`, checking the result inside the container. Needs root."""

from __future__ import annotations

import asyncio
import io
import tarfile
from pathlib import Path

import pytest

from conftest import assert_nothing_left, python_image_state, run_cli
from swarm.build.builder import BuildResult, build_dockerfile
from swarm.errors import BuildError
from swarm.fs import images
from swarm.store import Store

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def state(debian_python_rootfs, tmp_path_factory):
    """A state dir holding the python3 image as `py`."""
    return python_image_state(tmp_path_factory, debian_python_rootfs, "build")


@pytest.fixture(autouse=True)
def nothing_left_behind(state):
    yield
    assert_nothing_left(state)


def build(state: Path, ctx: Path, **kw) -> BuildResult:
    return asyncio.run(build_dockerfile(state, ctx, quiet=True, **kw))


def write(ctx: Path, files: dict[str, str | bytes]) -> Path:
    for name, data in files.items():
        p = ctx / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            p.write_bytes(data)
        else:
            p.write_text(data)
    return ctx


def sh(state: Path, image: str, script: str, *args: str) -> str:
    return run_cli(["run", *args, image, "sh", "-c", script], state_dir=state).stdout


def test_multi_stage_with_copy_from_and_target(state, tmp_path):
    ctx = write(tmp_path, {"Dockerfile": """\
FROM debian_slim AS build
WORKDIR /src
RUN mkdir -p /out && echo compiled > /out/app.txt && echo junk > /out/junk
FROM debian_slim AS unused
RUN exit 1
FROM debian_slim
COPY --from=build /out/app.txt /app/
COPY --from=0 /out /everything
CMD ["cat", "/app/app.txt"]
"""})
    res = build(state, ctx, names=["ms"])
    assert run_cli(["run", "ms"], state_dir=state).stdout == "compiled\n"
    assert sh(state, "ms", "ls /everything; test ! -e /src && echo no-src") == \
        "app.txt\njunk\nno-src\n"
    target = build(state, ctx, names=["ms-build"], target="build")
    assert target.image_id != res.image_id
    assert sh(state, "ms-build", "pwd; cat /out/app.txt") == "/src\ncompiled\n"


def test_heredocs_arg_before_from_and_build_args(state, tmp_path):
    ctx = write(tmp_path, {"Dockerfile": """\
ARG BASE=debian_slim
ARG VERSION=1
FROM ${BASE}
ARG VERSION
ARG MODE=dev
ENV APP_HOME=/srv/app
RUN <<EOF
mkdir -p $APP_HOME
echo "version=$VERSION mode=$MODE" > $APP_HOME/info
EOF
RUN python3 <<EOF
import os
open(os.environ["APP_HOME"] + "/py", "w").write("from python\\n")
EOF
COPY <<EOT ${APP_HOME}/note
home is ${APP_HOME}
EOT
LABEL org.example.version="$VERSION" other=x
EXPOSE 8080 53/udp
HEALTHCHECK --interval=30s --retries=3 CMD test -f /srv/app/info
STOPSIGNAL SIGINT
"""})
    res = build(state, ctx, names=["hd"], build_args={"VERSION": "2"})
    out = sh(state, "hd", "cat /srv/app/info /srv/app/py /srv/app/note; echo ${MODE:-unset}")
    assert out == "version=2 mode=dev\nfrom python\nhome is /srv/app\nunset\n"
    with Store(state / "store") as s:
        cfg = images.load_index(s, res.image_id).config
    assert cfg["Labels"] == {"org.example.version": "2", "other": "x"}
    assert cfg["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert cfg["Healthcheck"] == {"Test": ["CMD-SHELL", "test -f /srv/app/info"],
                                  "Interval": 30_000_000_000, "Retries": 3}
    assert cfg["StopSignal"] == "SIGINT"


def test_dockerignore_add_tarball_and_user_switches(state, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in (("pkg/bin/tool", b"#!/bin/sh\necho tool ran\n"),
                           ("pkg/README", b"readme\n")):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o755
            tf.addfile(ti, io.BytesIO(data))
    ctx = write(tmp_path, {
        "Dockerfile": """\
FROM debian_slim
RUN useradd -m alice
ADD pkg.tar.gz /opt/
COPY --chown=alice:alice . /home/alice/ctx/
COPY --chmod=0600 src/*.py /etc/app/
USER alice
RUN whoami > /home/alice/who && id -u >> /home/alice/who
USER root
RUN touch /root/as-root
USER alice
WORKDIR /home/alice
""",
        ".dockerignore": "*.log\nsecret/\n!src/keep.log\n",
        "pkg.tar.gz": buf.getvalue(),
        "app.log": "noise", "secret/key": "hush", "src/main.py": "print(1)\n",
        "src/util.py": "x = 1\n", "src/keep.log": "kept\n"})
    build(state, ctx, names=["ign"])
    out = sh(state, "ign", "whoami; cat who; /opt/pkg/bin/tool; cd ctx; find . -type f | sort;"
             " stat -c '%U %a' src/main.py /etc/app/main.py; ls /etc/app")
    assert out.splitlines() == [
        "alice", "alice", "1000", "tool ran", "./.dockerignore", "./Dockerfile",
        "./pkg.tar.gz", "./src/keep.log", "./src/main.py", "./src/util.py", "alice 644",
        "root 600",
        "main.py", "util.py"]
    assert sh(state, "ign", "ls /root/as-root", "-u", "0") == "/root/as-root\n"


def test_deletions_across_steps_are_absent_in_image_and_mount(state, tmp_path):
    ctx = write(tmp_path, {"Dockerfile": """\
FROM debian_slim
RUN mkdir -p /data/sub && echo big > /data/sub/big && echo x > /etc/extra && touch /keep
RUN rm -r /data/sub && rm /etc/extra /etc/issue && mkdir /data/sub && echo new > /data/sub/n
RUN rm -rf /usr/share/doc
"""})
    res = build(state, ctx, names=["del"])
    with Store(state / "store") as s:
        idx = images.load_index(s, res.image_id)
    paths = {e.path for e in idx}
    for gone in (b"/data/sub/big", b"/etc/extra", b"/etc/issue", b"/usr/share/doc"):
        assert gone not in paths
    assert b"/data/sub/n" in paths and b"/keep" in paths
    assert not any(p.startswith(b"/usr/share/doc/") for p in paths)
    out = sh(state, "del", "ls /data/sub; for f in /data/sub/big /etc/extra /etc/issue "
             "/usr/share/doc; do test -e $f && echo present $f; done; echo end")
    assert out == "n\nend\n"


def test_files_a_step_writes_to_tmp_stay_for_later_steps(state, tmp_path):
    # docker build has no tmpfs on /tmp: what one RUN leaves there, the next one sees
    ctx = write(tmp_path, {"Dockerfile": """\
FROM debian_slim
RUN echo fetched > /tmp/download
RUN cp /tmp/download /opt/installed
"""})
    res = build(state, ctx, names=["tmpkeep"])
    with Store(state / "store") as s:
        paths = {e.path for e in images.load_index(s, res.image_id)}
    assert b"/tmp/download" in paths and b"/opt/installed" in paths
    assert sh(state, "tmpkeep", "cat /opt/installed; ls /tmp") == "fetched\n"  # run: tmpfs


def test_layer_cache_hits_start_nothing_and_changes_rebuild_what_follows(state, tmp_path):
    files = {"Dockerfile": "FROM debian_slim\nRUN echo one > /one\nCOPY f.txt /f.txt\n"
                           "RUN cat /f.txt > /two\n", "f.txt": "v1\n"}
    ctx = write(tmp_path, files)
    first = build(state, ctx)
    again = build(state, ctx)
    assert again.image_id == first.image_id and again.cached == again.steps == 3
    write(ctx, {"f.txt": "v2\n"})
    changed = build(state, ctx, names=["cache-v2"])
    assert changed.cached == 1  # the first RUN; the COPY and the RUN after it rebuilt
    assert sh(state, "cache-v2", "cat /one /two") == "one\nv2\n"
    nocache = build(state, ctx, no_cache=True)
    assert nocache.cached == 0 and nocache.image_id != changed.image_id  # new mtimes


def test_failing_run_and_bad_copy_name_the_line(state, tmp_path):
    ctx = write(tmp_path, {"Dockerfile": "FROM debian_slim\n\nRUN echo fine\nRUN exit 3\n"})
    with pytest.raises(BuildError, match=r"Dockerfile:4: RUN: exited with code 3"):
        build(state, ctx)
    write(ctx, {"Dockerfile": "FROM debian_slim\nCOPY missing.txt /x\n"})
    with pytest.raises(BuildError, match=r"Dockerfile:2: COPY: missing.txt: no such file"):
        build(state, ctx)


def test_cli_build_tags_prints_id_and_rejects_malformed(state, tmp_path):
    ctx = write(tmp_path, {"Dockerfile": "FROM debian_slim\nENV X=1\nCMD [\"sh\", \"-c\", "
                                         "\"echo $X\"]\n"})
    out = run_cli(["build", "-t", "cli:1", str(ctx)], state_dir=state)
    assert len(out.stdout.strip()) == 64 and "FROM debian_slim" in out.stderr
    assert run_cli(["run", "cli:1"], state_dir=state).stdout == "1\n"
    write(ctx, {"bad.Dockerfile": "FROM debian_slim\nRUN true\nCOPY --nope=1 a b\n"})
    res = run_cli(["build", "-f", str(ctx / "bad.Dockerfile"), str(ctx)], 7, state_dir=state)
    assert "bad.Dockerfile:3: COPY: unknown flag --nope" in res.stderr
