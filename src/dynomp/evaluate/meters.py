"""Time and memory meters: wall time, peak resident memory of the process, peak GPU memory."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import psutil
import torch


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far, in bytes (getrusage: kB on Linux, B on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_child_rss_bytes() -> int:
    """The largest peak resident set size of any waited-for child process (e.g. antsRegistration)."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """The process's resident set size now, in bytes."""
    return int(psutil.Process().memory_info().rss)


@dataclass
class ResourceMeter:
    """Measures one block: wall seconds, peak RSS (and the RSS at the start), peak GPU memory."""

    device: str = "cpu"
    wall_seconds: float = 0.0
    baseline_rss_bytes: int = 0
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int | None = None
    peak_child_rss_bytes: int = 0
    _start: float = field(default=0.0, repr=False)

    def __enter__(self) -> ResourceMeter:
        self.baseline_rss_bytes = current_rss_bytes()
        if torch.device(self.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize()
            self.peak_gpu_bytes = int(torch.cuda.max_memory_allocated())
        self.wall_seconds = time.perf_counter() - self._start
        self.peak_rss_bytes = peak_rss_bytes()
        self.peak_child_rss_bytes = peak_child_rss_bytes()

    def as_dict(self) -> dict[str, float | int | None]:
        """The measurements, for metrics.json."""
        return {
            "wall_seconds": self.wall_seconds,
            "baseline_rss_bytes": self.baseline_rss_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_gpu_bytes": self.peak_gpu_bytes,
            "peak_child_rss_bytes": self.peak_child_rss_bytes,
        }
