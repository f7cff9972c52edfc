"""Shared fixtures. Marks: ``root`` (needs root), ``slow``, ``cluster``.

Tests that need a Debian tree use ``debian_rootfs``: a debootstrap minbase built once per
machine and cached (see swarm.build.debootstrap).
"""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def debian_rootfs() -> Path:
    """A debootstrap bookworm minbase tree (read-only by convention: never modify it)."""
    from swarm.build.debootstrap import ensure_rootfs

    return ensure_rootfs()
