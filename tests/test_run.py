"""`swarm run` end to end: an image served by the lazy FUSE filesystem, an overlay per
container, runc. Needs root."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_nothing_left, python_image_state, run_cli
from swarm.fs import mounts as fs_mounts
from swarm.node import Engine, RunOptions, list_containers
from swarm.runtime import overlay as overlay_mod
from swarm.runtime.spec import BindMount

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def state(debian_python_rootfs, tmp_path_factory):
    """A state dir holding the python3 image as `py`."""
    return python_image_state(tmp_path_factory, debian_python_rootfs, "run")


@pytest.fixture(autouse=True)
def nothing_left_behind(state):
    yield
    assert_nothing_left(state)


def test_run_python_one_liner_and_exit_codes(state):
    out = run_cli(["run", "--rm", "py", "python3", "-c", "import sys; print(sys.version_info[0])"],
                  state_dir=state).stdout
    assert out.strip() == "3"
    run_cli(["run", "py", "sh", "-c", "exit 7"], 7, state_dir=state)
    run_cli(["run", "py", "/no/such/binary"], 127, state_dir=state)


def test_run_flags_like_docker(state, tmp_path):
    script = ("import os; print(os.getuid(), os.getcwd(), os.environ['FOO'], "
              "os.environ.get('FROM_HOST'), open('/proc/net/dev').read().count(':'))")
    out = run_cli(["run", "-u", "65534", "-w", "/tmp", "-e", "FOO=bar", "-e", "FROM_HOST",
                   "--net", "none", "py", "python3", "-c", script], state_dir=state,
                  env={"FROM_HOST": "yes"}).stdout
    assert out.split() == ["65534", "/tmp", "bar", "yes", "1"]  # only lo without a network
    out = run_cli(["run", "-i", "py", "python3", "-c", "import sys; print(sys.stdin.read()[::-1])"],
                  state_dir=state, input="abc").stdout
    assert out.strip() == "cba"
    out = run_cli(["run", "--memory", "64m", "py", "sh", "-c",
                   "cat /sys/fs/cgroup/memory/memory.limit_in_bytes"], state_dir=state).stdout
    assert out.strip() == str(64 << 20)


def test_bad_run_input_is_one_clear_line(state):
    err = run_cli(["run", "nosuchimage", "true"], 3, state_dir=state).stderr
    assert err.strip() == "swarm: error: no such image: nosuchimage"
    err = run_cli(["run", "--memory", "lots", "py", "true"], 2, state_dir=state).stderr
    assert "lots" in err
    err = run_cli(["run", "-u", "nobody-here", "py", "true"], 2, state_dir=state).stderr
    assert "nobody-here" in err


async def _read_fifo(path: Path) -> str:
    def read() -> str:
        with open(path) as f:
            return f.read()
    return await asyncio.to_thread(read)


async def _write_fifo(path: Path, text: str) -> None:
    def write() -> None:
        with open(path, "w") as f:
            f.write(text)
    await asyncio.to_thread(write)


def test_two_containers_share_one_mount_and_not_their_writes(state, tmp_path):
    sync = tmp_path / "sync"
    sync.mkdir()
    for n in (1, 2):
        os.mkfifo(sync / f"ready{n}")
        os.mkfifo(sync / f"go{n}")
    # each container writes a file, reports what it sees, then waits for the test
    script = ("echo mine > /written-$N; echo data >> /etc/os-release; "
              "ls / | grep written- > /sync/ready$N; cat /sync/go$N")

    async def scenario() -> None:
        async with Engine(state, mount_idle_s=0) as engine:
            runs = [asyncio.create_task(engine.async_run(
                "py", RunOptions(args=["sh", "-c", script], env={"N": str(n)},
                                 binds=[BindMount(sync, "/sync", False)])))
                for n in (1, 2)]
            seen = [await _read_fifo(sync / f"ready{n}") for n in (1, 2)]
            # both running now: one FUSE mount, used twice; two overlays on it
            assert list(engine.mounts.mounted().values()) == [2]
            mine = fs_mounts.swarm_mounts(engine.dir)
            assert len(mine) == 1
            assert len(overlay_mod.mounts_under(engine.dir)) == 2
            assert {c.image for c in list_containers(state)} == {"py"}
            assert len(list_containers(state)) == 2
            image_root = mine[0].mountpoint
            assert not any(p.name.startswith("written-") for p in image_root.iterdir())
            assert b"data\n" not in (image_root / "etc/os-release").read_bytes()[-5:]
            for n in (1, 2):
                await _write_fifo(sync / f"go{n}", "")
            assert await asyncio.gather(*runs) == [0, 0]
            assert seen == ["written-1\n", "written-2\n"]  # each sees only its own write
        assert fs_mounts.swarm_mounts(state) == []

    asyncio.run(scenario())


def test_container_sigkilled_from_outside_is_cleaned_up(state, tmp_path):
    sync = tmp_path / "sync"
    sync.mkdir()
    os.mkfifo(sync / "ready")

    async def scenario() -> None:
        async with Engine(state, mount_idle_s=0) as engine:
            run = asyncio.create_task(engine.async_run("py", RunOptions(
                args=["sh", "-c", "echo $$ > /sync/ready; exec sleep 1000"],
                binds=[BindMount(sync, "/sync", False)])))
            await _read_fifo(sync / "ready")
            (c,) = list_containers(state)
            os.kill(c.pid, signal.SIGKILL)
            assert await run == 128 + signal.SIGKILL
            assert list_containers(state) == []
            assert overlay_mod.mounts_under(engine.dir) == []

    asyncio.run(scenario())


def test_swarm_process_sigkilled_leaves_nothing_after_next_command(state, tmp_path):
    sync = tmp_path / "sync"
    sync.mkdir()
    os.mkfifo(sync / "ready")
    env = dict(os.environ, SWARM_STATE_DIR=str(state))
    proc = subprocess.Popen([sys.executable, "-m", "swarm.cli", "run", "-v", f"{sync}:/sync",
                             "py", "sh", "-c", "echo up > /sync/ready; exec sleep 1000"],
                            env=env, start_new_session=True)
    try:
        with open(sync / "ready") as f:
            assert f.read() == "up\n"
        assert len(list_containers(state)) == 1
        assert len(fs_mounts.swarm_mounts(state)) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    ps = json.loads(run_cli(["ps", "--json"], state_dir=state).stdout)
    assert ps == []
    # the autouse fixture checks mounts, overlays, containers and engine dirs are gone


def test_hot_tree_serves_hot_files_without_the_daemon(state, tmp_path):
    """After a run records the hot set, later starts stack a plain directory of the hot
    files above the FUSE mount: same bytes and metadata, and no FUSE open for them."""
    from swarm.fs import images
    from swarm.fs.hotdir import hot_tree_dir, remove_hot_trees
    from treecmp import snapshot

    script = "import json, email.parser; print(json.dumps({'ok': 1}))"

    async def scenario() -> None:
        async with Engine(state, mount_idle_s=60) as engine:
            image_id = images.resolve(engine.store, "py")
            await engine.mounts.acquire(image_id)
            try:
                out = tmp_path / "out1"
                with open(out, "wb") as f:
                    assert await engine.async_run("py", RunOptions(
                        args=["python3", "-c", script]), stdout=f) == 0
                saved = await engine.mounts.control(image_id, "save-hotset")
                assert saved["hot_set"], saved
                await engine.mounts.control(image_id, "reset")
                with open(tmp_path / "out2", "wb") as f:
                    assert await engine.async_run("py", RunOptions(
                        args=["python3", "-c", script]), stdout=f) == 0
                ops = (await engine.mounts.stats(image_id))["ops"]
                assert (tmp_path / "out2").read_bytes() == out.read_bytes() == b'{"ok": 1}\n'
                tree = hot_tree_dir(state, image_id, images.hot_set(engine.store, image_id))
                # python reads the cached bytecode (and only stats the source)
                assert (tree / "usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc"
                        ).is_file()
                assert ops.get("open", 0) == 0, ops  # every file python opened was local
                # the tree's entries carry the image's exact metadata and content
                image_root = fs_mounts.swarm_mounts(engine.dir)[0].mountpoint
                hot = snapshot(tree)
                full = snapshot(image_root)
                for path, attrs in hot.items():
                    if path == b"/":
                        continue
                    # hard-link classes may differ (a tree holds only part of a group)
                    assert attrs[:9] == full[path][:9], path
            finally:
                await engine.mounts.release(image_id)
            assert remove_hot_trees(state, image_id) == 1
            assert not tree.exists()

    asyncio.run(scenario())


def test_ctrl_c_stops_the_container(state, tmp_path):
    sync = tmp_path / "sync"
    sync.mkdir()
    os.mkfifo(sync / "ready")
    env = dict(os.environ, SWARM_STATE_DIR=str(state))
    proc = subprocess.Popen([sys.executable, "-m", "swarm.cli", "run", "-v", f"{sync}:/sync",
                             "py", "sh", "-c",
                             # pid 1 stays this shell, its trap set before it says it is
                             # up: the signal never meets a half-exec'd process
                             "trap 'exit 130' INT; echo up > /sync/ready; sleep 1000 & wait"],
                            env=env)
    try:
        with open(sync / "ready") as f:
            assert f.read() == "up\n"
        proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C delivers
        assert proc.wait(timeout=30) == 128 + signal.SIGINT
    finally:
        proc.kill()
        proc.wait()
