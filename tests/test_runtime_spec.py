"""Unit tests of swarm.runtime.spec: no root, no runc, a fake rootfs in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from swarm.errors import UsageError
from swarm.runtime.spec import (
    CPU_PERIOD_US,
    DEFAULT_CAPABILITIES,
    DEFAULT_PATH_ENV,
    INIT_MOUNT_PATH,
    MASKED_PATHS,
    NOFILE_LIMIT,
    BindMount,
    ContainerSpec,
    build_oci_config,
    hosts_file_text,
    parse_cpus,
    parse_env,
    parse_memory,
    resolve_in_root,
    resolve_user,
    support_files,
)

PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
alice:x:1000:1000:Alice:/home/alice:/bin/sh
bob:x:1001:1001::/home/bob:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
GROUP = """\
root:x:0:
daemon:x:1:
alice:x:1000:
bob:x:1001:
audio:x:29:alice,bob
video:x:44:alice
staff:x:50:
nogroup:x:65534:
"""


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    return root


def config(rootfs: Path, image: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    return build_oci_config(ContainerSpec(rootfs=rootfs, **kw), image or {"Cmd": ["sh"]})


def env_of(cfg: dict[str, Any]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in cfg["process"]["env"])


# ------------------------------------------------------------------ args, cwd, env


def test_cmd_alone(rootfs: Path) -> None:
    assert config(rootfs, {"Cmd": ["python3", "-V"]})["process"]["args"] == ["python3", "-V"]


def test_entrypoint_plus_cmd(rootfs: Path) -> None:
    image = {"Entrypoint": ["/entry.sh"], "Cmd": ["serve"]}
    assert config(rootfs, image)["process"]["args"] == ["/entry.sh", "serve"]


def test_cli_args_replace_cmd_not_entrypoint(rootfs: Path) -> None:
    image = {"Entrypoint": ["/entry.sh"], "Cmd": ["serve"]}
    cfg = config(rootfs, image, args=["migrate", "--all"])
    assert cfg["process"]["args"] == ["/entry.sh", "migrate", "--all"]


def test_entrypoint_override_drops_image_cmd(rootfs: Path) -> None:
    image = {"Entrypoint": ["/entry.sh"], "Cmd": ["serve"]}
    assert config(rootfs, image, entrypoint=["sh"])["process"]["args"] == ["sh"]
    assert config(rootfs, image, entrypoint=["sh"], args=["-c", "x"])["process"]["args"] == [
        "sh", "-c", "x"]


def test_no_command_is_a_usage_error(rootfs: Path) -> None:
    with pytest.raises(UsageError, match="no command"):
        config(rootfs, {"Cmd": None, "Entrypoint": None})


def test_init_wraps_the_command(rootfs: Path) -> None:
    spec = ContainerSpec(rootfs=rootfs, args=["sleep", "1"], init=True)
    with pytest.raises(UsageError, match="init"):
        build_oci_config(spec, {})
    cfg = build_oci_config(spec, {}, init_binary=Path("/usr/bin/tini-static"))
    assert cfg["process"]["args"] == [INIT_MOUNT_PATH, "--", "sleep", "1"]
    init_mounts = [m for m in cfg["mounts"] if m["destination"] == INIT_MOUNT_PATH]
    assert init_mounts[0]["source"] == "/usr/bin/tini-static"
    assert "ro" in init_mounts[0]["options"]


def test_cwd_from_image_then_flag(rootfs: Path) -> None:
    assert config(rootfs)["process"]["cwd"] == "/"
    assert config(rootfs, {"Cmd": ["sh"], "WorkingDir": "/app"})["process"]["cwd"] == "/app"
    image = {"Cmd": ["sh"], "WorkingDir": "/app"}
    assert config(rootfs, image, cwd="/srv")["process"]["cwd"] == "/srv"


def test_relative_cwd_is_refused(rootfs: Path) -> None:
    with pytest.raises(UsageError, match="absolute"):
        config(rootfs, cwd="app")


def test_env_image_then_flags(rootfs: Path) -> None:
    image = {"Cmd": ["sh"], "Env": ["A=image", "B=image", "PATH=/opt/bin", "BROKEN"]}
    env = env_of(config(rootfs, image, env={"B": "flag", "C": "flag"}, hostname="box"))
    assert env["A"] == "image"
    assert env["B"] == "flag"
    assert env["C"] == "flag"
    assert env["PATH"] == "/opt/bin"
    assert env["HOSTNAME"] == "box"
    assert "BROKEN" not in env
    assert "TERM" not in env


def test_env_defaults(rootfs: Path) -> None:
    env = env_of(config(rootfs, tty=True))
    assert env["PATH"] == DEFAULT_PATH_ENV
    assert env["HOME"] == "/root"
    assert env["TERM"] == "xterm"


def test_home_from_passwd_unless_set(rootfs: Path) -> None:
    assert env_of(config(rootfs, user="alice"))["HOME"] == "/home/alice"
    assert env_of(config(rootfs, user="alice", env={"HOME": "/x"}))["HOME"] == "/x"
    assert env_of(config(rootfs, user="4242"))["HOME"] == "/"


def test_parse_env() -> None:
    host = {"FROM_HOST": "h"}
    assert parse_env(["A=1", "B=", "C=x=y", "FROM_HOST", "MISSING"], host) == {
        "A": "1", "B": "", "C": "x=y", "FROM_HOST": "h"}
    with pytest.raises(UsageError):
        parse_env(["=oops"], host)


# ------------------------------------------------------------------ users


def test_user_default_is_root(rootfs: Path) -> None:
    user = resolve_user(rootfs, None)
    assert (user.uid, user.gid, user.additional_gids, user.home) == (0, 0, (), "/root")


def test_user_by_name_with_supplementary_groups(rootfs: Path) -> None:
    user = resolve_user(rootfs, "alice")
    assert (user.uid, user.gid, user.home) == (1000, 1000, "/home/alice")
    assert user.additional_gids == (29, 44)
    cfg = config(rootfs, user="alice")
    assert cfg["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [29, 44]}


def test_user_by_uid_in_passwd(rootfs: Path) -> None:
    user = resolve_user(rootfs, "1001")
    assert (user.uid, user.gid, user.additional_gids) == (1001, 1001, (29,))


def test_numeric_user_not_in_passwd(rootfs: Path) -> None:
    user = resolve_user(rootfs, "4242")
    assert (user.uid, user.gid, user.additional_gids, user.home) == (4242, 0, (), "/")


def test_user_and_group_forms(rootfs: Path) -> None:
    alice_staff = resolve_user(rootfs, "alice:staff")
    assert (alice_staff.uid, alice_staff.gid, alice_staff.additional_gids) == (1000, 50, ())
    numeric = resolve_user(rootfs, "1000:50")
    assert (numeric.uid, numeric.gid, numeric.additional_gids) == (1000, 50, ())
    mixed = resolve_user(rootfs, "4242:video")
    assert (mixed.uid, mixed.gid) == (4242, 44)


def test_missing_user_is_a_clear_error(rootfs: Path) -> None:
    with pytest.raises(UsageError, match="unable to find user mallory"):
        resolve_user(rootfs, "mallory")
    with pytest.raises(UsageError, match="unable to find user mallory"):
        config(rootfs, user="mallory")


def test_missing_group_is_a_clear_error(rootfs: Path) -> None:
    with pytest.raises(UsageError, match="unable to find group wheel"):
        resolve_user(rootfs, "alice:wheel")


def test_bad_user_strings(rootfs: Path) -> None:
    for bad in ("alice:", "99999999999"):
        with pytest.raises(UsageError):
            resolve_user(rootfs, bad)


def test_image_user_applies_unless_overridden(rootfs: Path) -> None:
    image = {"Cmd": ["sh"], "User": "bob"}
    assert config(rootfs, image)["process"]["user"]["uid"] == 1001
    assert config(rootfs, image, user="root")["process"]["user"]["uid"] == 0


def test_no_passwd_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_user(empty, "").uid == 0
    assert resolve_user(empty, "7:8").gid == 8
    with pytest.raises(UsageError, match="unable to find user"):
        resolve_user(empty, "alice")


def test_passwd_symlink_stays_inside_rootfs(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "real").mkdir()
    (root / "real/passwd").write_text("eve:x:77:77::/home/eve:/bin/sh\n")
    # Absolute and climbing targets both resolve inside the rootfs, never to the host's.
    (root / "etc/passwd").symlink_to("/../../../../real/passwd")
    assert resolve_in_root(root, "/etc/passwd") == root / "real/passwd"
    assert resolve_user(root, "eve").uid == 77
    (root / "etc/passwd").unlink()
    (root / "etc/passwd").symlink_to("../../../../../../etc/shadow")  # a host file
    assert resolve_in_root(root, "/etc/passwd") == root / "etc/shadow"
    with pytest.raises(UsageError):
        resolve_user(root, "root")  # the host has root; the image has no passwd at all


def test_symlink_loop_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").symlink_to("passwd")
    with pytest.raises(OSError):
        resolve_in_root(root, "/etc/passwd")
    assert resolve_user(root, "0").uid == 0  # an unreadable passwd counts as absent


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_fifo_passwd_does_not_hang(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    os.mkfifo(root / "etc/passwd")
    assert resolve_user(root, "0").uid == 0
    with pytest.raises(UsageError):
        resolve_user(root, "alice")


def test_capabilities_root_vs_user(rootfs: Path) -> None:
    root_caps = config(rootfs)["process"]["capabilities"]
    assert root_caps["effective"] == list(DEFAULT_CAPABILITIES)
    assert root_caps["bounding"] == list(DEFAULT_CAPABILITIES)
    user_caps = config(rootfs, user="alice")["process"]["capabilities"]
    assert user_caps == {"bounding": list(DEFAULT_CAPABILITIES)}


# ------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512m", 512 * 1024**2),
        ("2g", 2 * 1024**3),
        ("2G", 2 * 1024**3),
        ("1024k", 1024 * 1024),
        ("1.5g", int(1.5 * 1024**3)),
        ("100mb", 100 * 1024**2),
        ("123456789", 123456789),
        ("64b", 64),
    ],
)
def test_parse_memory(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "m", "12x", "-5m", "0", "1e6", "5 mm", "g2"])
def test_parse_memory_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_memory(text)


def test_memory_floor_is_checked_by_the_spec(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="minimum"):
        ContainerSpec(rootfs=tmp_path, memory_bytes=parse_memory("1024k"))


@pytest.mark.parametrize(("text", "expected"), [("1", 1.0), ("1.5", 1.5), ("0.01", 0.01)])
def test_parse_cpus(text: str, expected: float) -> None:
    assert parse_cpus(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "0", "-1", "0.001", "inf", "nan"])
def test_parse_cpus_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_cpus(text)


def test_resources(rootfs: Path) -> None:
    res = config(rootfs, cpus=1.5, memory_bytes=parse_memory("512m"))["linux"]["resources"]
    assert res["cpu"] == {"quota": 150_000, "period": CPU_PERIOD_US}
    assert res["memory"] == {"limit": 512 * 1024**2}
    plain = config(rootfs)["linux"]["resources"]
    assert "cpu" not in plain
    assert "memory" not in plain


# ------------------------------------------------------------------ namespaces, mounts


def namespaces(cfg: dict[str, Any]) -> set[str]:
    return {ns["type"] for ns in cfg["linux"]["namespaces"]}


def test_network_none_adds_a_netns(rootfs: Path) -> None:
    assert namespaces(config(rootfs, network="none")) == {
        "pid", "ipc", "uts", "mount", "network"}


def test_network_host_shares_the_hosts(rootfs: Path) -> None:
    cfg = config(rootfs, network="host")
    assert namespaces(cfg) == {"pid", "ipc", "uts", "mount"}
    assert "sysctl" not in cfg["linux"]


def test_bad_network(rootfs: Path) -> None:
    with pytest.raises(UsageError):
        ContainerSpec(rootfs=rootfs, network="bridge")  # type: ignore[arg-type]


def test_mounts(rootfs: Path) -> None:
    cfg = config(rootfs, binds=[BindMount(Path("/data"), "/mnt/data", readonly=True)])
    by_dest = {m["destination"]: m for m in cfg["mounts"]}
    assert by_dest["/proc"]["type"] == "proc"
    assert by_dest["/sys"]["type"] == "sysfs" and "ro" in by_dest["/sys"]["options"]
    assert "mode=755" in by_dest["/dev"]["options"]
    assert {"newinstance", "ptmxmode=0666"} <= set(by_dest["/dev/pts"]["options"])
    assert by_dest["/dev/shm"]["type"] == "tmpfs"
    assert by_dest["/dev/mqueue"]["type"] == "mqueue"
    assert by_dest["/tmp"]["type"] == "tmpfs"
    assert "ro" in by_dest["/sys/fs/cgroup"]["options"]
    for dest, name in (("/etc/hosts", "hosts"), ("/etc/hostname", "hostname"),
                       ("/etc/resolv.conf", "resolv.conf")):
        assert by_dest[dest]["type"] == "bind"
        assert by_dest[dest]["source"] == name  # relative: runc resolves it in the bundle
    assert by_dest["/mnt/data"]["source"] == "/data"
    assert "ro" in by_dest["/mnt/data"]["options"]
    # /dev must be mounted before what lives in it
    dests = [m["destination"] for m in cfg["mounts"]]
    assert dests.index("/dev") < dests.index("/dev/pts") < dests.index("/dev/shm")


def test_build_steps_keep_tmp_in_the_rootfs(rootfs: Path) -> None:
    dests = [m["destination"] for m in config(rootfs, tmpfs_tmp=False)["mounts"]]
    assert "/tmp" not in dests and "/dev/shm" in dests


def test_linux_defaults(rootfs: Path) -> None:
    cfg = config(rootfs, labels={"app": "x"}, hostname="h1", readonly_rootfs=True)
    assert cfg["ociVersion"] == "1.0.2"
    assert cfg["hostname"] == "h1"
    assert cfg["annotations"] == {"app": "x"}
    assert cfg["root"] == {"path": str(rootfs), "readonly": True}
    assert cfg["process"]["noNewPrivileges"] is False
    assert cfg["process"]["rlimits"] == [
        {"type": "RLIMIT_NOFILE", "hard": NOFILE_LIMIT, "soft": NOFILE_LIMIT}]
    assert cfg["linux"]["maskedPaths"] == list(MASKED_PATHS)
    assert "/proc/sys" in cfg["linux"]["readonlyPaths"]
    devices = {d["path"] for d in cfg["linux"]["devices"]}
    assert devices == {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
                       "/dev/tty"}
    rules = cfg["linux"]["resources"]["devices"]
    assert rules[0] == {"allow": False, "access": "rwm"}
    resolv = next(m for m in cfg["mounts"] if m["destination"] == "/etc/resolv.conf")
    assert "ro" in resolv["options"]  # read-only rootfs: docker makes these read-only too


def test_container_id_names_the_cgroup(rootfs: Path) -> None:
    spec = ContainerSpec(rootfs=rootfs, args=["true"], network="none")
    cfg = build_oci_config(spec, {}, container_id="abc123def4567890")
    assert cfg["linux"]["cgroupsPath"] == "/swarm/abc123def4567890"
    assert cfg["hostname"] == "abc123def456"
    with pytest.raises(UsageError):
        build_oci_config(spec, {}, container_id="../escape")


def test_support_files(rootfs: Path) -> None:
    spec = ContainerSpec(rootfs=rootfs, args=["true"], network="none", hostname="h1")
    files = support_files(build_oci_config(spec, {}), spec)
    assert files["hostname"] == "h1\n"
    assert "127.0.1.1\th1" in files["hosts"]
    assert set(files) == {"hosts", "hostname", "resolv.conf"}
    assert "localhost" in hosts_file_text("h2", "none")


def test_bind_mount_parse() -> None:
    assert BindMount.parse("/a:/b") == BindMount(Path("/a"), "/b", False)
    assert BindMount.parse("/a:/b:ro") == BindMount(Path("/a"), "/b", True)
    for bad in ("/a", "a:/b", "/a:/b:xx", ":/b"):
        with pytest.raises(UsageError):
            BindMount.parse(bad)
