"""The `profile/...` metric keys: their one definition, used by `ProfileCallback` and the sweeps.

`{setting}` is `bs{B}_t{T}_{backend}`, e.g. `bs1_t2_torch`, `bs32_t1_onnxruntime`; when several
devices are profiled it ends in `_{device}`, e.g. `bs1_t1_torch_cuda0`.

| key | value |
|---|---|
| `profile/params` | parameters |
| `profile/params_bytes` | parameter bytes |
| `profile/macs` | forward MACs at batch size 1 |
| `profile/flops` | forward FLOPs at batch size 1 (2 x MACs) |
| `profile/memory_estimate_bytes/{inference,train}/bs{B}` | estimated total memory |
| `profile/memory_measured_bytes/{inference,train}/bs{B}` | measured peak (where the platform allows) |
| `profile/inference_latency_ms/{setting}` | median inference latency |
| `profile/train_latency_ms/{setting}` | median train-step latency (torch only) |
| `profile/inference_images_per_s/{setting}`, `profile/train_images_per_s/{setting}` | throughput |
| `profile/params_compression` | parameter bytes, baseline / now |
| `profile/memory_compression/bs{B}` | estimated train-step memory, baseline / now |
| `profile/theoretical_speedup` | FLOPs, baseline / now |
| `profile/observed_speedup/{inference,train}/{setting}` | speedup, baseline / now (side by side: paired estimate) |
| `profile/observed_speedup_low/{inference,train}/{setting}` | lower bound of its confidence interval (side by side) |
| `profile/observed_speedup_high/{inference,train}/{setting}` | upper bound (side by side) |
| `profile/observed_speedup_verdict/{inference,train}/{setting}` | 1 faster, 0 not distinguishable, -1 slower |
| `profile/observed_over_theoretical/{inference,train}/{setting}` | observed / theoretical |
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from compresslight.profiling.compare import SpeedupReport
from compresslight.profiling.results import ModelProfile
from compresslight.profiling.side_by_side import FASTER, SLOWER

PREFIX = "profile/"
FAMILIES = (
    "params", "params_bytes", "macs", "flops", "memory_estimate_bytes", "memory_measured_bytes",
    "inference_latency_ms", "train_latency_ms", "inference_images_per_s", "train_images_per_s",
    "params_compression", "memory_compression", "theoretical_speedup", "observed_speedup",
    "observed_speedup_low", "observed_speedup_high", "observed_speedup_verdict", "observed_over_theoretical",
)  # fmt: skip
"""Every `profile/<family>/...` the ProfileCallback logs."""

SETTING_PATTERN = re.compile(r"^bs(?P<batch>\d+)_t(?P<threads>\d+)_(?P<backend>[a-z]+)(?:_.+)?$")
"""A `{setting}` suffix: batch size, threads, backend (and a device suffix)."""

VERDICT_VALUES = {FASTER: 1.0, SLOWER: -1.0}


def setting_suffix(batch_size: int, threads: int, backend: str, device_suffix: str = "") -> str:
    """`bs1_t2_torch` (+ `device_suffix`, e.g. `_cuda0`)."""
    return f"bs{batch_size}_t{threads}_{backend}{device_suffix}"


def profile_metrics(profiles: Sequence[ModelProfile], reports: Sequence[SpeedupReport] = ()) -> dict[str, float]:
    """The `profile/...` scalars of `profiles` (one per setting) and their comparisons."""
    multi_device = len({p.environment.device for p in profiles}) > 1

    def device_suffix(profile: ModelProfile) -> str:
        return "_" + profile.environment.device.replace(":", "") if multi_device else ""

    metrics: dict[str, float] = {}
    for p in profiles:
        suffix = device_suffix(p)
        metrics[PREFIX + "params"] = p.params.total
        metrics[PREFIX + "params_bytes"] = p.params.bytes
        metrics[PREFIX + "macs"] = p.macs
        metrics[PREFIX + "flops"] = p.flops
        for m in p.memory:
            for mode, estimate, measured in (
                ("inference", m.inference_total_bytes, m.measured_inference_peak_bytes),
                ("train", m.train_total_bytes, m.measured_train_peak_bytes),
            ):
                if estimate is not None:
                    metrics[f"{PREFIX}memory_estimate_bytes/{mode}/bs{m.batch_size}{suffix}"] = estimate
                if measured is not None:
                    metrics[f"{PREFIX}memory_measured_bytes/{mode}/bs{m.batch_size}{suffix}"] = measured
        for e in p.latency:
            setting = setting_suffix(e.batch_size, p.environment.threads, e.backend, suffix)
            metrics[f"{PREFIX}{e.mode}_latency_ms/{setting}"] = e.median_ms
            metrics[f"{PREFIX}{e.mode}_images_per_s/{setting}"] = e.images_per_s
    for r in reports:
        profile = next(p for p in profiles if p.environment.label == r.setting)
        metrics[PREFIX + "params_compression"] = r.params_compression
        metrics[PREFIX + "theoretical_speedup"] = r.theoretical_speedup
        for m in r.memory_compression:
            metrics[f"{PREFIX}memory_compression/bs{m.batch_size}"] = m.train if m.train is not None else m.inference
        for s in r.speedups:
            setting = setting_suffix(s.batch_size, profile.environment.threads, s.backend, device_suffix(profile))
            metrics[f"{PREFIX}observed_speedup/{s.mode}/{setting}"] = s.observed
            metrics[f"{PREFIX}observed_over_theoretical/{s.mode}/{setting}"] = s.observed_over_theoretical
            if s.low is not None and s.high is not None:
                metrics[f"{PREFIX}observed_speedup_low/{s.mode}/{setting}"] = s.low
                metrics[f"{PREFIX}observed_speedup_high/{s.mode}/{setting}"] = s.high
            if s.verdict is not None:
                metrics[f"{PREFIX}observed_speedup_verdict/{s.mode}/{setting}"] = VERDICT_VALUES.get(s.verdict, 0.0)
    return metrics
