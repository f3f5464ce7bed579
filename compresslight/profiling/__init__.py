"""Measuring what compression bought: params, FLOPs, memory and latency (paper 000, section III).

`profile(model, input_shape)` measures one model on this machine and returns a plain-data
`ModelProfile`; `compare(baseline, compressed)` turns two profiles into a `SpeedupReport`
(memory compression, theoretical speedup from FLOPs, observed speedup from latency);
`profile_and_report` does both and writes profile.json / profile.md / profile.png (the `profile`
CLI command and `ProfileCallback` use the same writer).
"""

from compresslight.profiling.backends import BACKENDS
from compresslight.profiling.compare import (
    MemoryCompression,
    ObservedSpeedup,
    SpeedupReport,
    compare,
    compare_matching,
    plot_speedups,
    speedup_markdown,
)
from compresslight.profiling.environment import Environment, resolve_device
from compresslight.profiling.profiler import profile
from compresslight.profiling.report import profile_and_report, profile_settings, read_report, write_report
from compresslight.profiling.results import LatencyEntry, LayerCost, MemoryProfile, ModelProfile, ParameterCount
from compresslight.profiling.timing import LatencyStats, measure_latency, num_threads

__all__ = [
    "BACKENDS",
    "Environment",
    "LatencyEntry",
    "LatencyStats",
    "LayerCost",
    "MemoryCompression",
    "MemoryProfile",
    "ModelProfile",
    "ObservedSpeedup",
    "ParameterCount",
    "SpeedupReport",
    "compare",
    "compare_matching",
    "measure_latency",
    "num_threads",
    "plot_speedups",
    "profile",
    "profile_and_report",
    "profile_settings",
    "read_report",
    "resolve_device",
    "speedup_markdown",
    "write_report",
]
