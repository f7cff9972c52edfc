"""``swarm.Image``: image recipes in Python, the way Modal users write them.

An :class:`Image` is an immutable recipe: a base and a list of steps. Every method
returns a new recipe with one more step, and every step is built and cached exactly like
a Dockerfile step (``swarm.build.builder``): same keys, so a recipe rebuilt unchanged
starts no container, and a changed step rebuilds only itself and what follows::

    image = (swarm.Image.debian_slim(python_packages=["requests"])
             .apt_install("curl")
             .env({"MODE": "prod"})
             .workdir("/app")
             .add_local_dir("src", "/app/src"))
    image_id = image.build()
"""

from __future__ import annotations

import asyncio
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from swarm.build.builder import Builder, DockerfileBuild, State, set_env
from swarm.build.dockerfile import parse_file
from swarm.fs import images

APT_ENV = "DEBIAN_FRONTEND=noninteractive"
# pip refuses to touch a Debian python3 (PEP 668) unless told; images are disposable.
PIP_INSTALL = ("python3 -m pip install --break-system-packages --no-cache-dir "
               "--root-user-action=ignore")
ENSURE_PIP = ("python3 -m pip --version >/dev/null 2>&1 || { apt-get update -qq && "
              f"{APT_ENV} apt-get install -y -qq --no-install-recommends python3-pip && "
              "rm -rf /var/lib/apt/lists/*; }")


@dataclass(frozen=True)
class _Step:
    kind: str  # run | env | workdir | copy
    args: tuple[Any, ...]
    label: str


@dataclass(frozen=True)
class Image:
    """A recipe: ``base`` (kind, args) and ``steps``. Build it with :meth:`build`."""

    base: tuple[str, tuple[Any, ...]]
    steps: tuple[_Step, ...] = ()

    # ----------------------------------------------------------------- bases
    @staticmethod
    def debian_slim(python_packages: Sequence[str] | None = None) -> Image:
        """Debian bookworm (debootstrap minbase with python3), built once per recipe;
        ``python_packages`` are pip-installed in one more step."""
        img = Image(("debian_slim", ()))
        return img.pip_install(*python_packages) if python_packages else img

    @staticmethod
    def from_registry(ref: str) -> Image:
        """An image pulled through the Docker Registry HTTP API v2 (linux/amd64)."""
        return Image(("registry", (ref,)))

    @staticmethod
    def from_dockerfile(path: str | os.PathLike[str], context: str | os.PathLike[str] |
                        None = None, *, build_args: Mapping[str, str] | None = None,
                        target: str | None = None) -> Image:
        """The image a Dockerfile builds (context: the Dockerfile's directory)."""
        p = Path(path).absolute()
        ctx = Path(context).absolute() if context is not None else p.parent
        return Image(("dockerfile", (str(p), str(ctx), tuple(sorted(
            (build_args or {}).items())), target)))

    # ----------------------------------------------------------------- steps
    def _with(self, kind: str, args: tuple[Any, ...], label: str) -> Image:
        return replace(self, steps=(*self.steps, _Step(kind, args, label)))

    def apt_install(self, *packages: str) -> Image:
        """``apt-get install`` packages (no recommends; apt lists removed after)."""
        cmd = (f"apt-get update -qq && {APT_ENV} apt-get install -y -qq "
               f"--no-install-recommends {shlex.join(packages)} && rm -rf /var/lib/apt/lists/*")
        return self._with("run", (cmd,), f"apt_install {' '.join(packages)}")

    def pip_install(self, *packages: str) -> Image:
        """``pip install`` packages into the image's python3 (pip is added if missing)."""
        cmd = f"{ENSURE_PIP} && {PIP_INSTALL} {shlex.join(packages)}"
        return self._with("run", (cmd,), f"pip_install {' '.join(packages)}")

    def run_commands(self, *commands: str) -> Image:
        """Shell commands, one step each (as consecutive RUN lines)."""
        img = self
        for c in commands:
            img = img._with("run", (c,), f"run {c}")
        return img

    def env(self, vars: Mapping[str, str]) -> Image:
        return self._with("env", (tuple(sorted(vars.items())),), f"env {dict(vars)}")

    def workdir(self, path: str) -> Image:
        return self._with("workdir", (path,), f"workdir {path}")

    def add_local_dir(self, local_path: str | os.PathLike[str], remote_path: str) -> Image:
        """Copy a local directory's contents to ``remote_path`` (``.dockerignore`` in it
        applies)."""
        return self._with("copy", (str(Path(local_path).absolute()), remote_path),
                          f"add_local_dir {local_path} {remote_path}")

    def add_local_file(self, local_path: str | os.PathLike[str], remote_path: str) -> Image:
        return self._with("copy", (str(Path(local_path).absolute()), remote_path),
                          f"add_local_file {local_path} {remote_path}")

    # ----------------------------------------------------------------- building
    async def async_build(self, state_dir: str | os.PathLike[str] | None = None, *,
                          name: str | None = None, no_cache: bool = False,
                          out: TextIO | None = None, quiet: bool = True) -> bytes:
        """Build (or find in the layer cache) this image; returns its image id."""
        if state_dir is None:
            from swarm.cli import default_state_dir

            state_dir = default_state_dir()
        names = [images.parse_name(name)] if name else []
        async with Builder(state_dir, no_cache=no_cache, out=out, quiet=quiet) as b:
            state = await self._base_state(b)
            for i, step in enumerate(self.steps, 1):
                where = f"Image step {i} ({step.label[:60]})"
                b.say(f"[{i}/{len(self.steps)}] {step.label}")
                state = await self._apply(b, state, step, where)
            image_id = b.materialize(state, "api:Image")
            if names:
                images.register(b.store, b.load(image_id), names, source="api:Image")
            return image_id

    def build(self, state_dir: str | os.PathLike[str] | None = None, **kw: Any) -> bytes:
        """:meth:`async_build` for code outside an event loop."""
        return asyncio.run(self.async_build(state_dir, **kw))

    async def _base_state(self, b: Builder) -> State:
        kind, args = self.base
        if kind == "debian_slim":
            image_id = await asyncio.to_thread(b.debian_slim)
        elif kind == "registry":
            image_id = await asyncio.to_thread(b.resolve_image, args[0], "Image.from_registry")
        else:
            path, ctx, build_args, target = args
            df = DockerfileBuild(b, parse_file(path), Path(ctx), build_args=dict(build_args),
                                 target=target)
            return await df.run()
        return State(image_id, dict(b.load(image_id).config))

    async def _apply(self, b: Builder, st: State, step: _Step, where: str) -> State:
        if step.kind == "run":
            shell = list(st.config.get("Shell") or ["/bin/sh", "-c"])
            return await b.run_step(st, [*shell, step.args[0]], {}, label=step.label,
                                    where=where)
        if step.kind == "env":
            cfg = dict(st.config)
            for k, v in step.args[0]:
                set_env(cfg, k, v)
            return State(st.image_id, cfg, st.name, st.args, st.cmd_set)
        if step.kind == "workdir":
            cfg = dict(st.config)
            wd = os.path.normpath(os.path.join(cfg.get("WorkingDir") or "/", step.args[0]))
            cfg["WorkingDir"] = wd
            return await asyncio.to_thread(
                b.ensure_dir, State(st.image_id, cfg, st.name, st.args, st.cmd_set), wd, where)
        return await asyncio.to_thread(b.copy_local, st, Path(step.args[0]), step.args[1],
                                       where)
