"""swarm.api.Image recipes: built step by step like Dockerfiles, cached the same way, and
run with `swarm run`. Needs root; one step reaches Debian's mirror (a tiny package)."""

from __future__ import annotations

import pytest

from conftest import run_cli
from swarm.api import Image
from swarm.build.builder import Builder
from swarm.build.importer import import_directory
from swarm.fs import images
from swarm.fs import mounts as fs_mounts
from swarm.node import list_containers
from swarm.runtime import overlay as overlay_mod
from swarm.store import Store

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def state(debian_python_rootfs, tmp_path_factory):
    state = tmp_path_factory.mktemp("api") / "state"
    with Store(state / "store") as s:
        import_directory(s, debian_python_rootfs, ["py"])
    return state


@pytest.fixture(autouse=True)
def nothing_left_behind(state):
    yield
    assert fs_mounts.swarm_mounts(state) == []
    assert overlay_mod.mounts_under(state) == []
    assert list_containers(state) == []


def test_recipe_builds_runs_and_caches(state, tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "mod.py").write_text("VALUE = 42\n")
    (src / "notes.txt").write_text("notes\n")
    cfg = tmp_path / "app.cfg"
    cfg.write_text("debug=false\n")
    image = (Image.debian_slim()
             .apt_install("hello")
             .env({"MODE": "prod"})
             .workdir("/app")
             .add_local_dir(src, "src")
             .add_local_file(cfg, "/etc/app.cfg")
             .run_commands("echo $MODE > mode", "rm src/notes.txt"))
    image_id = image.build(state, name="api:1")
    out = run_cli(["run", "api:1", "sh", "-c",
                   "hello; pwd; cat mode /etc/app.cfg; ls src; "
                   "cd src && python3 -c 'import pkg.mod as m; print(m.VALUE)'"],
                  state_dir=state).stdout
    assert out.splitlines() == ["Hello, world!", "/app", "prod", "debug=false", "pkg", "42"]

    # Unchanged: every step is a cache hit, and no container (no engine) starts.
    started = []
    orig = Builder._get_engine

    async def spy(self):
        started.append(1)
        return await orig(self)

    monkeypatch.setattr(Builder, "_get_engine", spy)
    assert image.build(state) == image_id
    assert started == []
    # A changed last step rebuilds that step only.
    changed = image.run_commands("echo extra > extra")
    new_id = changed.build(state)
    assert new_id != image_id and started == [1]
    with Store(state / "store") as s:
        idx = images.load_index(s, new_id)
        assert idx.get("/app/extra") is not None and idx.get("/app/src/notes.txt") is None
        assert idx.config["WorkingDir"] == "/app"
