"""Measuring what compression bought: params, FLOPs, memory and latency (paper 000, section III).

`profile(model, input_shape)` measures one model on this machine and returns a plain-data
`ModelProfile`. A speedup is measured side by side (`side_by_side`: `compare_models` for models,
`SideBySide.run` for any calls): the contenders alternate in rounds in one process and the
speedup is paired per round, with a confidence interval and a verdict, and the machine's load is
recorded (`load`). `compare(baseline, compressed, side_by_side=...)` turns two profiles and that
measurement into a `SpeedupReport` (memory compression, theoretical speedup from FLOPs, observed
speedup); `profile_and_report` does it all and writes profile.json / profile.md / profile.png
(the `profile` CLI command and `ProfileCallback` use the same writer). The `profile/...` metric
keys are defined once, in `keys`.
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
    speedup_summary,
)
from compresslight.profiling.environment import Environment, resolve_device
from compresslight.profiling.load import LoadMonitor, MachineLoad
from compresslight.profiling.profiler import profile
from compresslight.profiling.report import profile_and_report, profile_settings, read_report, write_report
from compresslight.profiling.results import LatencyEntry, LayerCost, MemoryProfile, ModelProfile, ParameterCount
from compresslight.profiling.side_by_side import (
    PairedSpeedup,
    SideBySide,
    SideBySideReport,
    SideBySideResult,
    compare_models,
    paired_speedup,
)
from compresslight.profiling.timing import LatencyStats, measure_latency, num_threads

__all__ = [
    "BACKENDS",
    "Environment",
    "LatencyEntry",
    "LatencyStats",
    "LayerCost",
    "LoadMonitor",
    "MachineLoad",
    "MemoryCompression",
    "MemoryProfile",
    "ModelProfile",
    "ObservedSpeedup",
    "PairedSpeedup",
    "ParameterCount",
    "SideBySide",
    "SideBySideReport",
    "SideBySideResult",
    "SpeedupReport",
    "compare",
    "compare_matching",
    "compare_models",
    "measure_latency",
    "num_threads",
    "paired_speedup",
    "plot_speedups",
    "profile",
    "profile_and_report",
    "profile_settings",
    "read_report",
    "resolve_device",
    "speedup_markdown",
    "speedup_summary",
    "write_report",
]
