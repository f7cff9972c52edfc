"""swarm.runtime.runc and swarm.runtime.overlay: real containers over an overlay (root).

Every container runs over an overlay of ``debian_rootfs``, never on the tree itself, and
after every test the runc state root must be empty and no overlay may remain mounted
under the test's directory. Nothing here sleeps to wait: tests wait for the container's
own output ("ready") and for process exit.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swarm.errors import MountError, RuntimeFailure
from swarm.runtime import overlay
from swarm.runtime.runc import (
    LOG_FILE,
    OWNER_PID_LABEL,
    PID_FILE,
    STOP_GRACE_S,
    Runc,
    _Stop,
    cleanup_leftovers,
    find_init_binary,
    init_would_die,
    process_start_time,
)
from swarm.runtime.spec import ContainerSpec

PROMPT_EXIT_S = 10.0  # a generous ceiling for "promptly"; the wait ends on exit, not on this
READY = b"ready\n"
READY_THEN_SLEEP = ["sh", "-c", "echo ready; exec sleep 1000"]

# A process that owns a container: runs the sync API in its main thread, as the CLI does.
OWNER_SCRIPT = """
import json, sys
from pathlib import Path
from swarm.runtime.runc import Runc
from swarm.runtime.spec import ContainerSpec
opts = json.loads(sys.argv[1])
spec = ContainerSpec(rootfs=Path(opts["rootfs"]), args=opts["args"], stdin=opts["stdin"])
runtime = Runc(Path(opts["state"]), stop_grace_s=opts["grace_s"])
sys.exit(runtime.run(spec, forward_signals=opts["forward"]))
"""
QUICK_GRACE_S = 0.2  # a test's stop grace: the test waits for exit, never for this


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def runtime(state_dir: Path) -> Runc:
    return Runc(state_dir)


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path, state_dir: Path) -> Iterator[None]:
    """After each test: no container in the test's runc root, no overlay under tmp_path."""
    yield
    runc_root = state_dir / "runc"
    if runc_root.is_dir():
        listed = subprocess.run(["runc", "--root", str(runc_root), "list", "-q"],
                                capture_output=True, text=True, check=True).stdout
        assert listed.strip() == "", f"containers left behind: {listed}"
    mounts = Path("/proc/mounts").read_text().splitlines()
    left = [m for m in mounts if m.split()[2] == "overlay" and str(tmp_path) in m]
    assert not left, f"overlays left behind: {left}"


@pytest.fixture
def rootfs(debian_rootfs: Path, tmp_path: Path) -> Iterator[overlay.Overlay]:
    """A private writable overlay over the shared (read-only by convention) Debian tree."""
    with overlay.overlay([debian_rootfs], tmp_path / "container") as ov:
        yield ov


def run_capture(runtime: Runc, spec: ContainerSpec, **kw: Any) -> tuple[int, str]:
    """Run to completion; return the exit code and stdout."""
    with tempfile.TemporaryFile() as out:
        code = runtime.run(spec, stdout=out, **kw)
        out.seek(0)
        return code, out.read().decode()


class Owners:
    """Starts processes that own a container; kills any still running at teardown."""

    def __init__(self, state_dir: Path, rootfs: Path) -> None:
        self.state_dir = state_dir
        self.rootfs = rootfs
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, args: list[str], forward: bool = True, stdin: bool = False,
              grace_s: float = STOP_GRACE_S) -> subprocess.Popen[bytes]:
        """Start an owner and wait until its container has printed its first line.

        With ``stdin`` the container gets the owner's stdin: the caller writes a line
        that the command (``cat``) echoes, proving the command itself is running.
        """
        opts = {"state": str(self.state_dir), "rootfs": str(self.rootfs), "args": args,
                "forward": forward, "stdin": stdin, "grace_s": grace_s}
        proc = subprocess.Popen(
            [sys.executable, "-c", OWNER_SCRIPT, json.dumps(opts)],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
            cwd=Path(__file__).parent.parent)
        self.procs.append(proc)
        assert proc.stdout is not None
        if stdin:
            assert proc.stdin is not None
            proc.stdin.write(READY)
            proc.stdin.flush()
        assert proc.stdout.readline() == READY
        return proc

    def close(self) -> None:
        killed = False
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                killed = True
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        if killed:  # a test failed midway: its containers must not outlive it
            cleanup_leftovers(self.state_dir)


@pytest.fixture
def owners(state_dir: Path, rootfs: overlay.Overlay) -> Iterator[Owners]:
    owners = Owners(state_dir, rootfs.merged)
    yield owners
    owners.close()


# ------------------------------------------------------------------ pure helpers


def test_overlay_options_escape_separators(tmp_path: Path) -> None:
    opts = overlay.overlay_options([Path("/a,b"), Path("/c:d")], Path("/u"), Path("/w"))
    assert opts.startswith("lowerdir=/a\\,b:/c\\:d,upperdir=/u,workdir=/w,")
    assert "index=off" in opts and "metacopy=off" in opts and "redirect_dir=off" in opts
    with pytest.raises(MountError):
        overlay.overlay_options([Path("/x" * 1500), Path("/y" * 1500)], Path("/u"),
                                Path("/w"))
    with pytest.raises(MountError):
        overlay.overlay_options([], Path("/u"), Path("/w"))


def test_mounts_under_parses_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 27 0:21 / /proc rw - proc proc rw\n"
        "90 27 0:50 / /srv/state/c1/merged rw,relatime - overlay overlay rw,lowerdir=/l\n"
        "91 27 0:51 / /srv/state/with\\040space/merged rw shared:5 - overlay overlay rw\n"
        "92 27 0:52 / /srv/stateful/merged rw - overlay overlay rw\n"
        "93 90 0:53 / /srv/state/c1/merged/sub rw - overlay overlay rw\n"
        "94 27 0:54 / /srv/state/fuse rw - fuse pt rw\n"
    )
    found = overlay.mounts_under(Path("/srv/state"), mountinfo=info)
    assert found[0] == Path("/srv/state/c1/merged/sub")  # deepest first
    assert set(found) == {Path("/srv/state/c1/merged"), Path("/srv/state/with space/merged"),
                          Path("/srv/state/c1/merged/sub")}


def test_process_start_time_names_a_process() -> None:
    assert process_start_time(os.getpid()) == process_start_time(os.getpid())
    done = subprocess.Popen(["true"])
    done.wait()
    assert process_start_time(done.pid) is None


def test_init_would_die_reads_signal_dispositions() -> None:
    sleeper = subprocess.Popen(["sleep", "1000"])
    try:
        assert init_would_die(sleeper.pid, signal.SIGINT)
        assert init_would_die(sleeper.pid, signal.SIGTERM)
    finally:
        sleeper.kill()
        sleeper.wait()
    # this Python process handles SIGINT (KeyboardInterrupt)
    assert not init_would_die(os.getpid(), signal.SIGINT)


def test_runc_failures_become_docker_exit_codes(runtime: Runc, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()

    def code_for(message: str | None, returncode: int = 1) -> int:
        log = bundle / LOG_FILE
        log.write_text("" if message is None else json.dumps(
            {"level": "error", "msg": message}) + "\n")
        return runtime._exit_code(returncode, bundle, _Stop())

    assert code_for('exec: "nope": executable file not found in $PATH') == 127
    assert code_for('exec: "/etc": permission denied') == 126
    assert code_for(None, 3) == 3
    with pytest.raises(RuntimeFailure, match="cgroup"):
        code_for("cannot set cgroup limit")
    (bundle / PID_FILE).write_text("1234")  # it started: 1 is the command's own status
    assert code_for("some late error") == 1
    assert runtime._exit_code(-9, bundle, _Stop()) == 137
    assert runtime._exit_code(0, bundle, _Stop(signals=1, exit_code=130)) == 130


def test_cleanup_keeps_bundles_of_living_owners(runtime: Runc, tmp_path: Path) -> None:
    fake_root = tmp_path / "fake-rootfs"
    fake_root.mkdir()
    spec = ContainerSpec(rootfs=fake_root, args=["true"])
    mine = runtime.create_bundle("mine", spec)
    orphan = runtime.create_bundle("orphan", spec)
    config = json.loads((orphan / "config.json").read_text())
    gone = subprocess.Popen(["true"])
    gone.wait()
    config["annotations"][OWNER_PID_LABEL] = str(gone.pid)
    (orphan / "config.json").write_text(json.dumps(config))
    assert runtime.cleanup_leftovers() == ["orphan"]
    assert mine.is_dir()
    assert not orphan.exists()
    shutil.rmtree(mine)


# ------------------------------------------------------------------ containers


@pytest.mark.root
def test_echo(runtime: Runc, rootfs: overlay.Overlay) -> None:
    assert run_capture(runtime, ContainerSpec(rootfs=rootfs.merged, args=["echo", "hi"])) == (
        0, "hi\n")


@pytest.mark.root
def test_image_cmd_and_stdin_closed_by_default(runtime: Runc, rootfs: overlay.Overlay) -> None:
    spec = ContainerSpec(rootfs=rootfs.merged)
    image = {"Entrypoint": ["sh", "-c"], "Cmd": ["cat; echo done"]}
    assert run_capture(runtime, spec, image_config=image) == (0, "done\n")


@pytest.mark.root
def test_exit_code_passes_through(runtime: Runc, rootfs: overlay.Overlay) -> None:
    assert runtime.run(ContainerSpec(rootfs=rootfs.merged, args=["sh", "-c", "exit 7"])) == 7


@pytest.mark.root
def test_command_not_found_is_127(runtime: Runc, rootfs: overlay.Overlay) -> None:
    spec = ContainerSpec(rootfs=rootfs.merged, args=["no-such-command"])
    assert runtime.run(spec, stderr=subprocess.DEVNULL) == 127


@pytest.mark.root
@pytest.mark.skipif(find_init_binary() is None, reason="needs tini-static (apt-get install tini)")
def test_signal_death_under_init_is_128_plus_signo(runtime: Runc,
                                                   rootfs: overlay.Overlay) -> None:
    spec = ContainerSpec(rootfs=rootfs.merged, args=["sh", "-c", "kill -9 $$"], init=True)
    assert runtime.run(spec) == 137


@pytest.mark.root
def test_pid1_cannot_kill_itself_without_init(runtime: Runc, rootfs: overlay.Overlay) -> None:
    # The kernel protects a pid namespace's init from its own namespace, SIGKILL included;
    # docker without --init behaves the same. This pins the behaviour down.
    spec = ContainerSpec(rootfs=rootfs.merged, args=["sh", "-c", "kill -9 $$"])
    assert runtime.run(spec) == 0


@pytest.mark.root
def test_signal_death_from_outside_is_137(runtime: Runc, rootfs: overlay.Overlay) -> None:
    async def scenario() -> int:
        read_fd, write_fd = os.pipe()
        spec = ContainerSpec(rootfs=rootfs.merged, args=READY_THEN_SLEEP)
        task = asyncio.create_task(
            runtime.async_run(spec, container_id="victim", stdout=write_fd))
        with os.fdopen(read_fd, "rb") as reader:
            line = await asyncio.get_running_loop().run_in_executor(None, reader.readline)
            os.close(write_fd)
            assert line == READY
            await runtime.async_kill("victim", signal.SIGKILL)
            return await task

    assert asyncio.run(scenario()) == 137


@pytest.mark.root
def test_env_workdir_user(runtime: Runc, rootfs: overlay.Overlay) -> None:
    spec = ContainerSpec(
        rootfs=rootfs.merged,
        args=["sh", "-c", 'id -u; id -g; pwd; echo "$FOO $KEEP"; echo $HOME'],
        env={"FOO": "flag"}, cwd="/var/tmp", user="nobody")
    image = {"Env": ["FOO=image", "KEEP=image"]}
    assert run_capture(runtime, spec, image_config=image) == (
        0, "65534\n65534\n/var/tmp\nflag image\n/nonexistent\n")
    numeric = ContainerSpec(rootfs=rootfs.merged, args=["sh", "-c", "id -u; id -g"],
                            user="1234:5678")
    assert run_capture(runtime, numeric) == (0, "1234\n5678\n")


@pytest.mark.root
def test_network_none_has_only_loopback(runtime: Runc, rootfs: overlay.Overlay) -> None:
    spec = ContainerSpec(rootfs=rootfs.merged, args=["cat", "/proc/net/dev"], network="none")
    code, out = run_capture(runtime, spec)
    assert code == 0
    interfaces = [line.split(":")[0].strip() for line in out.splitlines()[2:]]
    assert interfaces == ["lo"]


@pytest.mark.root
def test_memory_limit_is_in_the_cgroup(runtime: Runc, rootfs: overlay.Overlay) -> None:
    limit = 64 * 1024 * 1024
    spec = ContainerSpec(rootfs=rootfs.merged, memory_bytes=limit, cpus=0.5,
                         args=["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                               "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"])
    assert run_capture(runtime, spec) == (0, f"{limit}\n50000\n")


@pytest.mark.root
def test_writes_land_in_the_upper_dir(runtime: Runc, rootfs: overlay.Overlay,
                                      debian_rootfs: Path) -> None:
    spec = ContainerSpec(rootfs=rootfs.merged, args=[
        "sh", "-c", "echo data > /root/newfile && rm /etc/debian_version"])
    assert runtime.run(spec) == 0
    assert (rootfs.upper / "root/newfile").read_text() == "data\n"
    assert not (debian_rootfs / "root/newfile").exists()
    whiteout = os.lstat(rootfs.upper / "etc/debian_version")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert (debian_rootfs / "etc/debian_version").is_file()


@pytest.mark.root
def test_readonly_rootfs(runtime: Runc, rootfs: overlay.Overlay) -> None:
    spec = ContainerSpec(rootfs=rootfs.merged, readonly_rootfs=True,
                         args=["sh", "-c", "touch /x 2>/dev/null; echo $?; touch /tmp/x"])
    assert run_capture(runtime, spec) == (0, "1\n")


@pytest.mark.root
def test_sigint_stops_a_container_promptly(state_dir: Path, runtime: Runc,
                                           owners: Owners) -> None:
    # `cat` as pid 1 has no SIGINT handler, so the kernel would drop the signal: the
    # wrapper stands in for it and reports a SIGINT death.
    owner = owners.spawn(["cat"], stdin=True)
    owner.send_signal(signal.SIGINT)
    assert owner.wait(timeout=PROMPT_EXIT_S) == 130
    assert runtime.list_containers() == []
    assert list(runtime.bundles.iterdir()) == []


@pytest.mark.root
def test_sigint_reaches_an_init_that_handles_it(owners: Owners) -> None:
    owner = owners.spawn(["sh", "-c", "trap 'exit 3' INT; echo ready; sleep 1000 & wait"])
    owner.send_signal(signal.SIGINT)
    assert owner.wait(timeout=PROMPT_EXIT_S) == 3


@pytest.mark.root
def test_ignored_sigint_is_followed_by_a_kill(runtime: Runc, owners: Owners) -> None:
    # As docker stop: a container that ignores the signal is killed after the grace time.
    owner = owners.spawn(["sh", "-c", "trap '' INT; echo ready; exec sleep 1000"],
                         grace_s=QUICK_GRACE_S)
    owner.send_signal(signal.SIGINT)
    assert owner.wait(timeout=PROMPT_EXIT_S) == 137
    assert runtime.list_containers() == []


@pytest.mark.root
def test_keyboard_interrupt_deletes_the_container(runtime: Runc, owners: Owners) -> None:
    # Without forwarding, Ctrl-C is Python's KeyboardInterrupt, raised inside run().
    owner = owners.spawn(READY_THEN_SLEEP, forward=False)
    owner.send_signal(signal.SIGINT)
    assert owner.wait(timeout=PROMPT_EXIT_S) == -signal.SIGINT
    assert runtime.list_containers() == []
    assert list(runtime.bundles.iterdir()) == []


@pytest.mark.root
def test_cancelling_async_run_deletes_the_container(runtime: Runc,
                                                    rootfs: overlay.Overlay) -> None:
    async def scenario() -> None:
        read_fd, write_fd = os.pipe()
        spec = ContainerSpec(rootfs=rootfs.merged, args=READY_THEN_SLEEP)
        task = asyncio.create_task(runtime.async_run(spec, stdout=write_fd))
        with os.fdopen(read_fd, "rb") as reader:
            line = await asyncio.get_running_loop().run_in_executor(None, reader.readline)
            os.close(write_fd)
            assert line == READY
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
    assert runtime.list_containers() == []
    assert list(runtime.bundles.iterdir()) == []


@pytest.mark.root
def test_async_run_forwards_sigint(runtime: Runc, rootfs: overlay.Overlay) -> None:
    async def scenario() -> int:
        in_read, in_write = os.pipe()
        out_read, out_write = os.pipe()
        spec = ContainerSpec(rootfs=rootfs.merged, args=["cat"], stdin=True)
        task = asyncio.create_task(runtime.async_run(
            spec, stdin=in_read, stdout=out_write, forward_signals=True))
        os.write(in_write, READY)
        with os.fdopen(out_read, "rb") as reader:
            line = await asyncio.get_running_loop().run_in_executor(None, reader.readline)
            assert line == READY
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does to the caller
            try:
                return await task
            finally:
                for fd in (in_read, in_write, out_write):
                    os.close(fd)

    assert asyncio.run(scenario()) == 130
    assert runtime.list_containers() == []


@pytest.mark.root
def test_leftovers_of_a_killed_owner_are_cleaned(state_dir: Path, runtime: Runc,
                                                 owners: Owners) -> None:
    owner = owners.spawn(READY_THEN_SLEEP)
    owner.kill()  # no finally runs: the container and its bundle stay behind
    owner.wait()
    (left,) = runtime.list_containers()
    assert left["status"] == "running"
    assert cleanup_leftovers(state_dir) == [left["id"]]
    assert runtime.list_containers() == []
    assert list(runtime.bundles.iterdir()) == []


@pytest.mark.root
def test_overlay_cleanup_leftovers(debian_rootfs: Path, tmp_path: Path) -> None:
    state = tmp_path / "ovstate"
    first = overlay.mount_overlay([debian_rootfs], state / "c1")
    overlay.mount_overlay([debian_rootfs], state / "c2")
    (first.merged / "scratch").write_text("x")
    assert len(overlay.mounts_under(state)) == 2
    (line,) = [m for m in Path("/proc/mounts").read_text().splitlines()
               if m.split()[1] == str(first.merged)]
    assert "nosuid" not in line.split()[3]  # setuid binaries of the image keep working
    assert len(overlay.cleanup_leftovers(state)) == 2
    assert overlay.mounts_under(state) == []
    assert list(state.iterdir()) == []
    assert not (debian_rootfs / "scratch").exists()


@pytest.mark.root
def test_unmount_twice_is_harmless(debian_rootfs: Path, tmp_path: Path) -> None:
    ov = overlay.mount_overlay([debian_rootfs], tmp_path / "c")
    ov.unmount()
    ov.unmount(remove=True)
    assert not ov.container_dir.exists()


@pytest.mark.root
def test_tty(runtime: Runc, rootfs: overlay.Overlay) -> None:
    master, slave = os.openpty()
    try:
        spec = ContainerSpec(rootfs=rootfs.merged, args=["sh", "-c", "tty; echo $TERM"],
                             tty=True)
        assert runtime.run(spec, stdin=slave, stdout=slave, stderr=slave) == 0
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every slave end is closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert out.decode().split() == ["/dev/pts/0", "xterm"]
