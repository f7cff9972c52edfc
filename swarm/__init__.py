"""swarm: run Python in containers on a peer-to-peer cluster, cold-starting in about a second.

User code writes ``swarm.Image.debian_slim(...)``; the API is loaded on first use, so the
CLI and the FUSE daemons do not pay for importing it.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Image", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Image":
        from swarm.api import Image

        return Image
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")
