"""Timing loops, latency statistics and memory readings. No heavy imports.

A measurement is: ``warmup`` untimed calls, then up to ``iters`` timed calls, each timed alone, so
the figures are per-call latencies and their percentiles mean what they say. A time budget may stop
the timed loop early, but never before ``min_iters`` calls.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipdeploy.benchmarks.environment import nvidia_smi
from clipdeploy.errors import UsageError
from clipdeploy.options import integer, opt, positive_number


@dataclass(frozen=True)
class TimingConfig:
    """How long each (contender, tower, batch, length) case is measured."""

    iters: int = field(default=30, metadata=opt("timed calls per case, at most", metavar="N", parse=integer(1)))
    warmup: int = field(  # lazy allocation, kernel selection, torch.compile
        default=5, metadata=opt("untimed calls first", metavar="N", parse=integer(0))
    )
    max_seconds: float | None = field(  # None: never
        default=None,
        metadata=opt("stop timing a case after S seconds, once 3 calls are timed", metavar="S", parse=positive_number,
                     default_text="no limit"),
    )  # fmt: skip
    min_iters: int = 3  # ...but time at least this many calls, whatever the budget

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise UsageError(f"--iters {self.iters} must be 1 or more")
        if self.warmup < 0:
            raise UsageError(f"--warmup {self.warmup} must be 0 or more")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise UsageError(f"--max-seconds {self.max_seconds} must be positive; leave it out for no budget")
        if self.min_iters < 1:
            raise UsageError(f"min_iters={self.min_iters} must be 1 or more")


@dataclass(frozen=True)
class Stats:
    """Latency figures of one case, in milliseconds, and its throughput."""

    iters: int  # timed calls
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    items_per_s: float  # batch / mean latency: the sustained rate of back-to-back calls

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarize(samples_s: Sequence[float], batch: int) -> Stats:
    """Statistics of per-call latencies given in seconds. Percentiles interpolate linearly."""
    x = np.asarray(samples_s, dtype=np.float64) * 1e3
    if x.size == 0:
        raise ValueError("no timed samples to summarize")
    if batch < 1:
        raise ValueError(f"batch {batch} must be 1 or more")
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    mean = float(x.mean())
    return Stats(
        iters=int(x.size),
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        mean_ms=mean,
        std_ms=float(x.std(ddof=1)) if x.size > 1 else 0.0,
        min_ms=float(x.min()),
        max_ms=float(x.max()),
        items_per_s=batch / (mean / 1e3) if mean > 0 else float("inf"),
    )


# A timer runs ``fn`` once and returns how long it took, in seconds.
Timer = Callable[[Callable[[], Any]], float]


def perf_counter_timer(fn: Callable[[], Any]) -> float:
    """Wall time of one call. Exact for calls that return host arrays, which are synchronous."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cuda_event_timer(torch: Any) -> Timer:
    """A timer for work queued on the current CUDA stream: CUDA events, then a synchronize.

    The device is synchronized before the start event, so earlier work is not counted, and the end
    event is waited on, so all the work of this call is.
    """

    def timer(fn: Callable[[], Any]) -> float:
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3

    return timer


def measure(
    fn: Callable[[], Any],
    cfg: TimingConfig,
    timer: Timer = perf_counter_timer,
    clock: Callable[[], float] = time.monotonic,
) -> list[float]:
    """Call ``fn`` ``cfg.warmup`` times untimed, then time up to ``cfg.iters`` calls; seconds per call."""
    for _ in range(cfg.warmup):
        fn()
    samples: list[float] = []
    deadline = None if cfg.max_seconds is None else clock() + cfg.max_seconds
    while len(samples) < cfg.iters:
        samples.append(timer(fn))
        if deadline is not None and clock() >= deadline and len(samples) >= min(cfg.min_iters, cfg.iters):
            break
    return samples


# ---- memory -----------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux ``clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB: since the last reset where Linux allows one."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def gpu_memory_mb(pid: int | None = None) -> float | None:
    """GPU memory held by a process (this one by default) per ``nvidia-smi``, in MiB; None where unknown."""
    rows = nvidia_smi("--query-compute-apps=pid,used_memory", "nounits")
    if rows is None:
        return None
    pid = os.getpid() if pid is None else pid
    total = None
    for parts in rows:
        if len(parts) == 2 and parts[0] == str(pid):
            try:
                total = (total or 0.0) + float(parts[1])
            except ValueError:
                continue
    return total
