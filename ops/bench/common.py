"""Helpers shared by the benchmarks: timing, medians, and one output format.

Benchmarks print ratios against a baseline measured in the same run: this machine is shared
and noisy, so an absolute time means little on its own.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median_time(fn: Callable[[], Any], runs: int, setup: Callable[[], Any] | None = None
                ) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        if setup is not None:
            setup()
        t, _ = timed(fn)
        times.append(t)
    return statistics.median(times), times


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def row(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<46} {value:>14}  {note}")


def verdict(name: str, ok: bool, detail: str) -> None:
    print(f"  goal {name}: {'MET' if ok else 'NOT MET'} ({detail})")
