"""Latency measurement: the one timing loop every part of compresslight uses.

Paper 000's protocol: a few untimed warm-up iterations, then `iters` timed ones, synchronizing
the device after each so asynchronous CUDA kernels are counted; report the median and say how
noisy it was (min, max).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from compresslight.checks import check_int, check_number


@dataclasses.dataclass
class LatencyStats:
    """Seconds per call of one measured function."""

    min_s: float
    median_s: float
    max_s: float
    iters: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyStats:
        return cls(**data)


def synchronize(device: torch.device | str) -> None:
    """Waits for queued work on `device` (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_latency(
    fn: Callable[[], Any], *, device: torch.device | str = "cpu", warmup: int = 5, iters: int = 50
) -> LatencyStats:
    """Times `fn()` with paper 000's protocol.

    Args:
        fn: the work to time, with its inputs already bound.
        device: where `fn` runs; synchronized before and after every timed call.
        warmup: untimed calls first (allocator, caches, lazy init).
        iters: timed calls.

    Raises:
        ValueError: if `warmup` < 0 or `iters` < 1.
    """
    check_number("warmup", warmup, at_least=0)
    check_number("iters", iters, at_least=1)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return LatencyStats(min_s=min(times), median_s=statistics.median(times), max_s=max(times), iters=iters)


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Runs the body with `torch.set_num_threads(threads)`, restoring the previous count after.

    Args:
        threads: intra-op threads for the body; None keeps the current setting.

    Yields:
        The thread count in effect inside the body.

    Raises:
        ValueError: if `threads` < 1.
    """
    check_int("threads", threads, 1, optional=True)
    previous = torch.get_num_threads()
    if threads is None:
        yield previous
        return
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)
