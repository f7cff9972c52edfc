"""What user code imports: image recipes (``Image``); App and functions come later."""

from swarm.api.image import Image

__all__ = ["Image"]
