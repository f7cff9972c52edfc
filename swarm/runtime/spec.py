"""What a container is (``ContainerSpec``) and the runc ``config.json`` that runs it.

This module is pure: it reads the image's ``/etc/passwd`` and ``/etc/group`` (inside the
rootfs, never following a symlink out of it) and nothing else on the host, and it starts
nothing. ``build_oci_config`` mirrors what ``docker run`` asks of runc, so a command
behaves in a swarm container as it would under docker: the same capabilities, masked
paths, devices, mounts, environment and user resolution. Where docker's behaviour differs
between versions, the comments name the choice made.

The three small files a container gets at ``/etc/hosts``, ``/etc/hostname`` and
``/etc/resolv.conf`` are bind-mounted from the bundle directory with *relative* sources:
runc resolves a relative bind source against the bundle (it chdirs there), so the config
does not depend on where the bundle lives. Their contents come from ``support_files``.
"""

from __future__ import annotations

import errno
import math
import os
import re
import socket
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from swarm.errors import UsageError

OCI_VERSION = "1.0.2"
DEFAULT_PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CPU_PERIOD_US = 100_000
MIN_CPU_QUOTA_US = 1_000  # the kernel refuses a CFS quota under 1 ms
MIN_MEMORY_BYTES = 6 * 1024 * 1024  # docker's floor: below it runc's own init may not fit
NOFILE_LIMIT = 1_048_576
DEV_TMPFS_SIZE_KIB = 65_536
SHM_SIZE_BYTES = 64 * 1024 * 1024
MAX_ETC_FILE_BYTES = 16 * 1024 * 1024  # /etc/passwd of a hostile image may be huge
MAX_SYMLINK_HOPS = 40  # the kernel's own limit (ELOOP)
MAX_ID = 2**31 - 1

# Files in the bundle directory that become /etc/hosts, /etc/hostname, /etc/resolv.conf.
HOSTS_FILE = "hosts"
HOSTNAME_FILE = "hostname"
RESOLV_CONF_FILE = "resolv.conf"
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
HOST_HOSTS = Path("/etc/hosts")

# Where an init binary (``ContainerSpec.init``, docker's --init) is bind-mounted. Under
# /dev, the container's own tmpfs, so runc's mountpoint for it never lands in the rootfs
# (whose upper dir a build step turns into a layer); exec works there because a bind
# mount carries its own flags, not those of the tmpfs below it.
INIT_MOUNT_PATH = "/dev/init"

Network = Literal["host", "none"]

# docker's default capability set (moby oci/caps/defaults.go).
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

# docker's masked and read-only paths (moby oci/defaults.go).
MASKED_PATHS: tuple[str, ...] = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

# (path, major, minor): the character devices runc creates in every container.
DEFAULT_DEVICES: tuple[tuple[str, int, int], ...] = (
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
)
# Extra device-cgroup allowances docker/runc grant beyond the nodes above: mknod of
# anything (creating a node is harmless while opening it is denied), the console, the
# pty multiplexer and the ptys of the container's own devpts.
_EXTRA_DEVICE_RULES: tuple[dict[str, Any], ...] = (
    {"allow": True, "type": "c", "access": "m"},
    {"allow": True, "type": "b", "access": "m"},
    {"allow": True, "type": "c", "major": 5, "minor": 1, "access": "rwm"},
    {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},
)

_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_MEMORY_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}
_CONTAINER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


@dataclass(frozen=True)
class BindMount:
    """A host path bind-mounted into the container (docker's ``-v src:dst[:ro]``)."""

    source: Path
    destination: str
    readonly: bool = False

    @classmethod
    def parse(cls, text: str) -> BindMount:
        """Parse docker's ``-v SRC:DST[:ro|rw]`` (SRC must be an absolute host path)."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise UsageError(f"invalid volume {text!r}: expected SRC:DST[:ro]")
        mode = parts[2] if len(parts) == 3 else "rw"
        if mode not in ("ro", "rw"):
            raise UsageError(f"invalid volume mode {mode!r} in {text!r}: expected ro or rw")
        if not os.path.isabs(parts[0]):
            raise UsageError(f"invalid volume {text!r}: the source must be an absolute path")
        return cls(Path(parts[0]), parts[1], mode == "ro")


@dataclass
class ContainerSpec:
    """Everything about one container that the user or the scheduler chooses.

    ``args`` overrides the image's Cmd, ``entrypoint`` (when not None) its Entrypoint,
    ``cwd`` its WorkingDir and ``user`` its User, exactly as the matching ``docker run``
    arguments do. ``env`` is applied over the image's Env. ``init`` runs a small init
    (tini) as pid 1, docker's ``--init``: without it the command is pid 1, which the
    kernel shields from every signal it has no handler for, even SIGKILL sent from
    inside the container.
    """

    rootfs: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    hostname: str | None = None
    cpus: float | None = None
    memory_bytes: int | None = None
    network: Network = "host"
    tty: bool = False
    stdin: bool = False
    readonly_rootfs: bool = False
    binds: list[BindMount] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] | None = None
    init: bool = False
    tmpfs_tmp: bool = True  # a fresh tmpfs on /tmp; build steps keep /tmp in the image

    def __post_init__(self) -> None:
        if self.network not in ("host", "none"):
            raise UsageError(f"invalid network {self.network!r}: expected host or none")
        if self.cpus is not None and not (math.isfinite(self.cpus) and self.cpus > 0):
            raise UsageError(f"invalid cpus {self.cpus!r}: expected a positive number")
        if self.memory_bytes is not None and self.memory_bytes < MIN_MEMORY_BYTES:
            raise UsageError(
                f"memory limit {self.memory_bytes} bytes is below the minimum of 6m"
            )


@dataclass(frozen=True)
class ResolvedUser:
    """A container user as runc wants it, plus the home directory for ``$HOME``."""

    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


# ---------------------------------------------------------------------------- parsing


def parse_memory(text: str) -> int:
    """Parse a docker ``--memory`` size: ``512m``, ``2g``, ``1024k``, ``1.5g``, plain bytes.

    Units are binary (``1k`` is 1024 bytes) as in docker; a trailing ``b`` is accepted.
    The 6 MiB floor is checked by ``ContainerSpec``, as docker checks it in the daemon,
    so this parser also serves sizes that are not memory limits.
    """
    match = _MEMORY_RE.match(text)
    if not match:
        raise UsageError(f"invalid memory size {text!r}: expected e.g. 512m, 2g or bytes")
    number, unit = match.groups()
    size = int(float(number) * _MEMORY_UNITS[unit.lower()])
    if size <= 0:
        raise UsageError(f"invalid memory size {text!r}: expected a positive size")
    return size


def parse_cpus(text: str) -> float:
    """Parse docker's ``--cpus`` (a positive decimal number of CPUs, at least 0.01)."""
    try:
        cpus = float(text)
    except ValueError:
        raise UsageError(f"invalid cpus {text!r}: expected a number such as 1.5") from None
    if not math.isfinite(cpus) or cpus <= 0:
        raise UsageError(f"invalid cpus {text!r}: expected a positive number")
    if cpus * CPU_PERIOD_US < MIN_CPU_QUOTA_US:
        raise UsageError(f"cpus {text!r} is below the minimum of 0.01")
    return cpus


def parse_env(items: Iterable[str], host_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Parse docker ``-e`` arguments: ``K=V`` sets, bare ``K`` copies the host's value.

    A bare ``K`` that the host does not define is dropped, as docker drops it.
    """
    host_env = os.environ if host_env is None else host_env
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise UsageError(f"invalid environment variable {item!r}: empty name")
        if sep:
            env[key] = value
        elif key in host_env:
            env[key] = host_env[key]
    return env


def check_container_id(container_id: str) -> str:
    """Return ``container_id`` if runc accepts it as an id, else raise UsageError."""
    if not _CONTAINER_ID_RE.match(container_id):
        raise UsageError(f"invalid container id {container_id!r}")
    return container_id


# --------------------------------------------------------------- files inside the rootfs


def resolve_in_root(root: Path, path: str) -> Path:
    """Map ``path`` (as the container would see it) to a host path inside ``root``.

    Symlinks are followed as the container would follow them: an absolute target restarts
    at ``root`` and ``..`` never climbs above it, so an image cannot point us at a host
    file (``/etc/passwd -> /../../../etc/shadow`` stays inside). The returned path's
    components are all real directories except possibly the last, which may not exist.
    """
    root = Path(os.path.abspath(root))
    pending = [p for p in path.split("/") if p not in ("", ".")]
    pending.reverse()
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop()
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        if not stat.S_ISLNK(st.st_mode):
            resolved.append(part)
            continue
        hops += 1
        if hops > MAX_SYMLINK_HOPS:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", str(candidate))
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        pending.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
    return root.joinpath(*resolved)


def read_root_file(root: Path, path: str) -> str | None:
    """Read a small regular file of the image, or None if it is absent or not a file.

    Opened non-blocking and checked with fstat so a FIFO or device planted at
    ``/etc/passwd`` cannot hang or flood the caller.
    """
    try:
        host_path = resolve_in_root(root, path)
        fd = os.open(host_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:  # a symlink loop, or one raced in after resolution
            return None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read(MAX_ETC_FILE_BYTES).decode("utf-8", errors="replace")


def _parse_colon_file(text: str | None, min_fields: int) -> list[list[str]]:
    if not text:
        return []
    rows = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) >= min_fields:
            rows.append(fields)
    return rows


def _as_id(text: str) -> int | None:
    if text.isdigit():
        value = int(text)
        if value <= MAX_ID:
            return value
    return None


def resolve_user(rootfs: Path, user: str | None) -> ResolvedUser:
    """Resolve a docker user string against the image's ``/etc/passwd`` and ``/etc/group``.

    Accepts ``""`` (root), ``name``, ``uid``, ``name:group``, ``uid:gid`` and mixes. As in
    runc/docker: a numeric uid need not exist in passwd (its gid is then 0 and HOME is
    ``/``); a name must exist; supplementary groups come from ``/etc/group`` membership
    only when no group was given explicitly.
    """
    user = (user or "").strip()
    user_part, has_group, group_part = user.partition(":")
    if has_group and not group_part:
        raise UsageError(f"invalid user {user!r}: empty group")
    passwd = _parse_colon_file(read_root_file(rootfs, "/etc/passwd"), 7)
    uid_arg = _as_id(user_part) if user_part else 0
    if user_part and uid_arg is None and not user_part.isdigit():
        matches = [p for p in passwd if p[0] == user_part]
    elif uid_arg is None:
        raise UsageError(f"invalid user {user!r}: uid out of range")
    else:
        matches = [p for p in passwd if _as_id(p[2]) == uid_arg]
    uid: int | None
    gid: int | None
    if matches:
        entry = matches[0]
        name, uid, gid, home = entry[0], _as_id(entry[2]), _as_id(entry[3]), entry[5]
        if uid is None or gid is None:
            raise UsageError(f"user {user_part!r} has a malformed /etc/passwd entry")
    elif uid_arg is not None:
        name, uid, gid, home = "", uid_arg, 0, "/"
    else:
        raise UsageError(
            f"unable to find user {user_part}: no matching entries in the image's /etc/passwd"
        )
    groups = _parse_colon_file(read_root_file(rootfs, "/etc/group"), 4)
    additional: tuple[int, ...] = ()
    if has_group:
        gid_arg = _as_id(group_part)
        if gid_arg is None:
            if group_part.isdigit():
                raise UsageError(f"invalid user {user!r}: gid out of range")
            found = [_as_id(g[2]) for g in groups if g[0] == group_part]
            if not found or found[0] is None:
                raise UsageError(
                    f"unable to find group {group_part}: "
                    "no matching entries in the image's /etc/group"
                )
            gid_arg = found[0]
        gid = gid_arg
    elif name:
        sgids = []
        for g in groups:
            members = g[3].split(",") if g[3] else []
            g_id = _as_id(g[2])
            if name in members and g_id is not None and g_id not in sgids:
                sgids.append(g_id)
        additional = tuple(sgids)
    return ResolvedUser(uid=uid, gid=gid, additional_gids=additional, home=home or "/")


# ---------------------------------------------------------------------- the OCI config


def resolve_args(spec: ContainerSpec, image_config: Mapping[str, Any]) -> list[str]:
    """The argv docker would run: Entrypoint + Cmd, where CLI args replace Cmd.

    An overridden entrypoint (``spec.entrypoint`` not None) also discards the image's Cmd.
    """
    if spec.entrypoint is not None:
        entrypoint = list(spec.entrypoint)
        cmd = list(spec.args)
    else:
        entrypoint = list(image_config.get("Entrypoint") or [])
        cmd = list(spec.args) if spec.args else list(image_config.get("Cmd") or [])
    argv = entrypoint + cmd
    if not argv:
        raise UsageError("no command specified: the image has no Entrypoint or Cmd")
    return argv


def resolve_env(
    spec: ContainerSpec, image_config: Mapping[str, Any], hostname: str, home: str
) -> list[str]:
    """docker's environment: PATH, HOSTNAME, TERM (tty), then image Env, then ``-e``.

    Later sources replace earlier values in place; HOME comes from passwd if unset.
    """
    env: dict[str, str] = {"PATH": DEFAULT_PATH_ENV, "HOSTNAME": hostname}
    if spec.tty:
        env["TERM"] = "xterm"
    for item in image_config.get("Env") or []:
        key, sep, value = str(item).partition("=")
        if key and sep:
            env[key] = value
    env.update(spec.env)
    env.setdefault("HOME", home)
    return [f"{k}={v}" for k, v in env.items()]


def default_hostname(spec: ContainerSpec, container_id: str | None) -> str:
    """docker's choice: the host's name on the host network, else the short container id."""
    if spec.hostname:
        return spec.hostname
    if spec.network == "host":
        return socket.gethostname()
    return (container_id or "swarm")[:12]


def _mount(dest: str, mtype: str, source: str, options: Sequence[str]) -> dict[str, Any]:
    return {"destination": dest, "type": mtype, "source": source, "options": list(options)}


def build_mounts(spec: ContainerSpec, init_binary: Path | None = None) -> list[dict[str, Any]]:
    """docker's default mounts, plus a tmpfs /tmp (unless ``spec.tmpfs_tmp`` is off), the
    /etc support files and the user's binds."""
    mounts = [
        _mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        _mount("/dev", "tmpfs", "tmpfs",
               ["nosuid", "strictatime", "mode=755", f"size={DEV_TMPFS_SIZE_KIB}k"]),
        _mount("/dev/pts", "devpts", "devpts",
               ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
        _mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
        _mount("/sys/fs/cgroup", "cgroup", "cgroup",
               ["nosuid", "noexec", "nodev", "relatime", "ro"]),
        _mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        _mount("/dev/shm", "tmpfs", "shm",
               ["nosuid", "noexec", "nodev", "mode=1777", f"size={SHM_SIZE_BYTES}"]),
    ]
    if spec.tmpfs_tmp:
        mounts.append(_mount("/tmp", "tmpfs", "tmpfs", ["nosuid", "nodev", "mode=1777"]))
    # docker makes these writable unless the whole rootfs is read-only.
    support_opts = ["rbind", "rprivate"] + (["ro"] if spec.readonly_rootfs else [])
    for dest, name in (("/etc/resolv.conf", RESOLV_CONF_FILE),
                       ("/etc/hostname", HOSTNAME_FILE),
                       ("/etc/hosts", HOSTS_FILE)):
        mounts.append(_mount(dest, "bind", name, support_opts))
    for bind in spec.binds:
        if not bind.destination.startswith("/"):
            raise UsageError(f"bind destination {bind.destination!r} must be absolute")
        opts = ["rbind", "rprivate"] + (["ro"] if bind.readonly else [])
        mounts.append(_mount(bind.destination, "bind", str(bind.source), opts))
    if init_binary is not None:
        mounts.append(_mount(INIT_MOUNT_PATH, "bind", str(init_binary), ["bind", "ro"]))
    return mounts


def _device_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = [{"allow": False, "access": "rwm"}]
    rules += [dict(r) for r in _EXTRA_DEVICE_RULES]
    rules += [{"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"}
              for _, major, minor in DEFAULT_DEVICES]
    return rules


def build_oci_config(
    spec: ContainerSpec,
    image_config: Mapping[str, Any] | None = None,
    *,
    container_id: str | None = None,
    init_binary: Path | None = None,
    nofile_limit: int = NOFILE_LIMIT,
) -> dict[str, Any]:
    """The runc ``config.json`` for ``spec`` over an image with ``image_config``.

    ``image_config`` is the OCI image config's ``config`` object (Env, Cmd, Entrypoint,
    WorkingDir, User). ``container_id`` names the cgroup (``/swarm/<id>``) so the host
    can find a container's limits; ``init_binary`` is the host path of a static init,
    required when ``spec.init`` is set. ``nofile_limit`` lowers the open-files limit
    where the host cannot grant docker's (without CAP_SYS_RESOURCE runc may not raise
    the hard limit above the caller's own).
    """
    image_config = image_config or {}
    argv = resolve_args(spec, image_config)
    if spec.init:
        if init_binary is None:
            raise UsageError("--init needs a static init binary (install tini)")
        argv = [INIT_MOUNT_PATH, "--", *argv]
    cwd = spec.cwd if spec.cwd is not None else (image_config.get("WorkingDir") or "/")
    if not cwd.startswith("/"):
        raise UsageError(f"the working directory {cwd!r} is invalid: it must be absolute")
    user_text = spec.user if spec.user is not None else (image_config.get("User") or "")
    user = resolve_user(spec.rootfs, user_text)
    hostname = default_hostname(spec, container_id)
    caps = list(DEFAULT_CAPABILITIES)
    # As moby does: a non-root process gets only the bounding set, which is what execve
    # would leave it; handing it effective capabilities would make it root in all but uid.
    capabilities: dict[str, list[str]] = {"bounding": caps}
    if user.uid == 0:
        capabilities.update(effective=list(caps), permitted=list(caps))
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    sysctl: dict[str, str] = {}
    if spec.network != "host":
        namespaces.append({"type": "network"})
        # docker (20.10+) sets these in a private network namespace.
        sysctl = {"net.ipv4.ip_unprivileged_port_start": "0",
                  "net.ipv4.ping_group_range": "0 2147483647"}
    resources: dict[str, Any] = {"devices": _device_rules()}
    if spec.cpus is not None:
        quota = max(MIN_CPU_QUOTA_US, round(spec.cpus * CPU_PERIOD_US))
        resources["cpu"] = {"quota": quota, "period": CPU_PERIOD_US}
    if spec.memory_bytes is not None:
        resources["memory"] = {"limit": spec.memory_bytes}
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "devices": [
            {"path": path, "type": "c", "major": major, "minor": minor,
             "fileMode": 0o666, "uid": 0, "gid": 0}
            for path, major, minor in DEFAULT_DEVICES
        ],
        "resources": resources,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if sysctl:
        linux["sysctl"] = sysctl
    if container_id is not None:
        linux["cgroupsPath"] = f"/swarm/{check_container_id(container_id)}"
    process: dict[str, Any] = {
        "terminal": spec.tty,
        "user": {"uid": user.uid, "gid": user.gid},
        "args": argv,
        "env": resolve_env(spec, image_config, hostname, user.home),
        "cwd": cwd,
        "capabilities": capabilities,
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile_limit, "soft": nofile_limit}],
        "noNewPrivileges": False,
    }
    if user.additional_gids:
        process["user"]["additionalGids"] = list(user.additional_gids)
    return {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": str(Path(spec.rootfs).absolute()), "readonly": spec.readonly_rootfs},
        "hostname": hostname,
        "mounts": build_mounts(spec, init_binary if spec.init else None),
        "annotations": dict(spec.labels),
        "linux": linux,
    }


# ----------------------------------------------------------- /etc files of the container


def hosts_file_text(hostname: str, network: Network) -> str:
    """``/etc/hosts``: the host's own on the host network, else loopback names + hostname."""
    if network == "host":
        try:
            return HOST_HOSTS.read_text()
        except OSError:
            pass
    return (
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "fe00::0\tip6-localnet\n"
        "ff00::0\tip6-mcastprefix\n"
        "ff02::1\tip6-allnodes\n"
        "ff02::2\tip6-allrouters\n"
        f"127.0.1.1\t{hostname}\n"
    )


def support_files(config: Mapping[str, Any], spec: ContainerSpec) -> dict[str, str]:
    """Bundle-relative name -> contents of the files bind-mounted over /etc/{hosts,...}.

    resolv.conf is a copy of the host's (docker filters loopback nameservers for bridged
    networks; swarm has only host and none, where filtering changes nothing useful).
    """
    hostname = str(config["hostname"])
    try:
        resolv = HOST_RESOLV_CONF.read_text()
    except OSError:
        resolv = ""
    return {
        HOSTS_FILE: hosts_file_text(hostname, spec.network),
        HOSTNAME_FILE: hostname + "\n",
        RESOLV_CONF_FILE: resolv,
    }
