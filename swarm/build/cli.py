"""``swarm build``: build a Dockerfile into an image (registered in swarm/cli.py)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from swarm.digest import to_hex
from swarm.errors import UsageError


def parse_build_args(items: tuple[str, ...]) -> dict[str, str]:
    """``K=V`` pairs; a bare ``K`` takes the caller's environment value, as Docker does."""
    import os

    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not key:
            raise UsageError(f"invalid --build-arg {item!r}: want KEY=VALUE")
        if not eq:
            if key not in os.environ:
                continue
            value = os.environ[key]
        out[key] = value
    return out


@click.command("build")
@click.option("-f", "--file", "dockerfile", type=click.Path(path_type=Path), default=None,
              help="The Dockerfile (default: CONTEXT/Dockerfile).")
@click.option("-t", "--tag", "tags", multiple=True, help="NAME[:TAG] for the image.")
@click.option("--build-arg", "build_args", multiple=True, help="KEY=VALUE for an ARG.")
@click.option("--no-cache", is_flag=True, help="Run every step; use no cached layer.")
@click.option("--target", default=None, help="Build this stage (and what it needs) only.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image id.")
@click.argument("context", type=click.Path(path_type=Path))
@click.pass_obj
def build(obj: object, dockerfile: Path | None, tags: tuple[str, ...],
          build_args: tuple[str, ...], no_cache: bool, target: str | None, quiet: bool,
          context: Path) -> None:
    """Build an image from a Dockerfile and CONTEXT, like `docker build`; prints its id."""
    from swarm.build.builder import build_dockerfile

    state_dir: Path = obj.state_dir  # type: ignore[attr-defined]
    close = getattr(obj, "close", None)
    if close is not None:
        close()  # the builder opens its own store handle
    result = asyncio.run(build_dockerfile(
        state_dir, context, dockerfile=dockerfile, names=list(tags),
        build_args=parse_build_args(build_args), target=target, no_cache=no_cache,
        out=sys.stderr, quiet=quiet))
    click.echo(to_hex(result.image_id))
