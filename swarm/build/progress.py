"""Progress of long operations (imports, exports, verifies): counts that a CLI renders.

Library code only calls ``advance``; rendering is the CLI's business (rich, on a tty).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Progress:
    """Counts files and bytes; ``on_update`` (if set) is called at most every ``interval_s``."""

    label: str = ""
    files: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    interval_s: float = 0.2
    on_update: object = None  # Callable[[Progress], None] | None
    _last: float = 0.0

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        self.files += files
        self.bytes += nbytes
        cb = self.on_update
        if cb is not None:
            now = time.monotonic()
            if now - self._last >= self.interval_s:
                self._last = now
                cb(self)  # type: ignore[operator]

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate_bytes_per_s(self) -> float:
        return self.bytes / max(self.elapsed_s, 1e-9)

    def summary(self) -> str:
        mb = self.bytes / 1e6
        return (f"{self.files} files, {mb:.1f} MB in {self.elapsed_s:.2f} s "
                f"({self.rate_bytes_per_s / 1e6:.1f} MB/s)")


NULL_PROGRESS_LABEL = ""


def null_progress() -> Progress:
    return Progress()
