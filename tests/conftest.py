"""Shared fixtures. Marks: ``root`` (needs root), ``slow``, ``cluster``.

Tests that need a Debian tree use ``debian_rootfs``: a debootstrap minbase built once per
machine and cached (see swarm.build.debootstrap).

Every test cleans up what it starts. As a last line of defence, when the session ends,
whatever is still mounted or running under this session's temporary directory (a test
that failed half-way, or a bug) is removed, and reported: a leftover is a bug to fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def _mounts_under(base: str) -> list[str]:
    """Mountpoints below ``base``, deepest (most recently stacked) first."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mnt = os.fsdecode(line.split(b" ")[4].replace(b"\\040", b" "))
            if mnt.startswith(base + os.sep):
                out.append(mnt)
    return sorted(out, key=lambda m: (-m.count(os.sep), m))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    if not IS_ROOT or factory is None or factory._basetemp is None:
        return
    base = str(factory.getbasetemp())
    left = []
    # containers first (they hold the overlays), then overlays, then the image mounts
    for state in Path(base).glob("**/runc/*/state.json"):
        root, cid = state.parent.parent, state.parent.name
        subprocess.run(["runc", "--root", str(root), "delete", "--force", cid],
                       capture_output=True)
        left.append(f"container {cid}")
    for mnt in _mounts_under(base):
        subprocess.run(["umount", "-l", mnt], capture_output=True)
        left.append(f"mount {mnt}")
    if left:
        print(f"\nconftest: removed {len(left)} leftovers (a bug): " + "; ".join(left[:10]),
              file=sys.stderr)


@pytest.fixture(scope="session")
def debian_rootfs() -> Path:
    """A debootstrap bookworm minbase tree (read-only by convention: never modify it)."""
    from swarm.build.debootstrap import ensure_rootfs

    return ensure_rootfs()


@pytest.fixture(scope="session")
def debian_python_rootfs() -> Path:
    """A debootstrap bookworm minbase with python3 (read-only by convention)."""
    from swarm.build.debootstrap import ensure_rootfs

    return ensure_rootfs(include=["python3"])


class CliResult:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.exit_code = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr


def run_cli(args: list[str], exit_code: int = 0, *, state_dir: Path | None = None,
            env: dict[str, str] | None = None, input: str | None = None) -> CliResult:
    """Run ``swarm ARGS`` as a user would (a real process) and check its exit code."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    if state_dir is not None:
        full_env["SWARM_STATE_DIR"] = str(state_dir)
    proc = subprocess.run([sys.executable, "-m", "swarm.cli", *args], capture_output=True,
                          text=True, env=full_env, input=input, timeout=600)
    res = CliResult(proc)
    assert proc.returncode == exit_code, (
        f"swarm {' '.join(args)} exited {proc.returncode}, want {exit_code}\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")
    if exit_code != 0:
        assert "Traceback" not in proc.stderr, proc.stderr
    return res


def python_image_state(tmp_path_factory: pytest.TempPathFactory, rootfs: Path, name: str) -> Path:
    """A new state dir whose store holds ``rootfs`` imported as image ``py``."""
    from swarm.build.importer import import_directory
    from swarm.store import Store

    state = tmp_path_factory.mktemp(name) / "state"
    with Store(state / "store") as s:
        import_directory(s, rootfs, ["py"])
    return state


def assert_nothing_left(state: Path) -> None:
    """No image mount, overlay, container or engine directory remains under ``state``."""
    from swarm.fs import mounts as fs_mounts
    from swarm.node import list_containers
    from swarm.runtime import overlay as overlay_mod

    assert fs_mounts.swarm_mounts(state) == []
    assert overlay_mod.mounts_under(state) == []
    assert list_containers(state) == []
    engines = state / "engines"
    assert not engines.exists() or list(engines.iterdir()) == []
