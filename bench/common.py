"""Small helpers shared by the benchmark's parent and worker processes."""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections.abc import Sequence

__all__ = ["START_VARIABLE", "memory", "progress", "spread", "started_at"]

# The environment variable through which workers learn when the run started.
START_VARIABLE = "KITCI_BENCH_START"
_START = float(os.environ.get(START_VARIABLE, time.time()))


def started_at() -> float:
    """Return the wall-clock time the benchmark run started."""
    return _START


def progress(message: str) -> None:
    """Print `message` on stderr, prefixed by the seconds since the run started."""
    print(f"[{time.time() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def memory() -> dict[str, int]:
    """Return this process's resident set now and at its peak, in bytes.

    Reads `/proc/self/status` (VmRSS, VmHWM); elsewhere falls back to
    `getrusage`, which only knows the peak.
    """
    found: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    if "VmHWM" not in found:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Kilobytes on Linux, bytes on macOS.
        found["VmHWM"] = peak if sys.platform == "darwin" else peak * 1024
    return {"rss": found.get("VmRSS", found["VmHWM"]), "peak": found["VmHWM"]}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Return the median, p10, p90, min and max of `values` (not empty)."""
    if not values:
        raise ValueError("values must not be empty")
    ordered = sorted(values)

    def quantile(q: float) -> float:
        # Linear interpolation between the closest ranks.
        pos = q * (len(ordered) - 1)
        low = math.floor(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    return {
        "median": quantile(0.5),
        "p10": quantile(0.1),
        "p90": quantile(0.9),
        "min": ordered[0],
        "max": ordered[-1],
    }
