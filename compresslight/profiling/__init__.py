"""Measuring what compression bought: params, FLOPs, memory and latency."""

from compresslight.profiling.timing import LatencyStats, measure_latency

__all__ = ["LatencyStats", "measure_latency"]
