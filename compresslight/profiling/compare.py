"""`compare`: what compression bought, promised (FLOPs) vs observed (latency), as in paper 000.

Ratios are baseline / compressed, so higher is better and below 1.0 means the compressed model
is bigger or slower (the convention of paper 000's Tables II and III).

Latency is only comparable on the same machine with the same settings, so `compare` refuses
profiles whose environments differ (host, device, CPU/GPU model, threads, torch or backend
version) unless `allow_environment_mismatch=True`; then it warns and the report carries the
differences into every rendering.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compresslight.profiling.results import INFERENCE, MODES, TRAIN, ModelProfile
from compresslight.profiling.side_by_side import SideBySideReport, SideBySideResult, format_speedup, side_by_side_note

SIDE_BY_SIDE = "side-by-side"
TWO_TIME = "two-time"

log = logging.getLogger(__name__)


@dataclasses.dataclass
class MemoryCompression:
    """Memory ratios (baseline / compressed) at one batch size.

    Attributes:
        batch_size: images per step.
        inference: ratio of the estimated inference totals.
        train: ratio of the estimated train-step totals, None if either profile lacks it.
    """

    batch_size: int
    inference: float
    train: float | None


@dataclasses.dataclass
class ObservedSpeedup:
    """Measured speedup of one (backend, mode, batch size).

    Attributes:
        backend: "torch" or "onnxruntime".
        mode: "inference" or "train".
        batch_size: images per call.
        baseline_median_s: the baseline's median latency (side by side: median over rounds).
        compressed_median_s: the compressed model's median latency.
        observed: the speedup: side by side, the geometric mean of the per-round ratios;
            two-time, `baseline_median_s / compressed_median_s`.
        observed_over_theoretical: `observed / theoretical_speedup` (1.0: FLOPs told the truth).
        method: "side-by-side" (paired rounds in one process) or "two-time" (two profiles taken
            at different times divided: machine load in between lands in the ratio).
        low: lower bound of the confidence interval (side by side only).
        high: upper bound.
        confidence: the interval's level.
        verdict: "faster", "not distinguishable" or "slower" (side by side only).
        rounds: paired rounds measured.
    """

    backend: str
    mode: str
    batch_size: int
    baseline_median_s: float
    compressed_median_s: float
    observed: float
    observed_over_theoretical: float
    method: str = TWO_TIME
    low: float | None = None
    high: float | None = None
    confidence: float | None = None
    verdict: str | None = None
    rounds: int | None = None

    def label(self) -> str:
        """`1.23x [1.15, 1.31]` (side by side) or `1.23x` (two-time)."""
        return format_speedup(self.observed, self.low, self.high)


@dataclasses.dataclass
class SpeedupReport:
    """Compression ratios and speedups of one compressed model against its baseline.

    Attributes:
        baseline_name: the baseline profile's name.
        compressed_name: the compressed profile's name (the "Method" column).
        setting: the environment label the latencies were measured on (a column group).
        environment_mismatch: how the two environments differ; empty when they match.
        params_compression: parameter bytes, baseline / compressed.
        theoretical_speedup: forward FLOPs at batch size 1, baseline / compressed.
        memory_compression: one entry per batch size both profiles have.
        speedups: one entry per (backend, mode, batch size) both profiles measured.
        method: how the observed speedups were measured: "side-by-side" or "two-time".
        side_by_side: the side-by-side measurement behind them (`SideBySideReport.to_dict()` of
            this setting), None for a two-time comparison.
    """

    baseline_name: str
    compressed_name: str
    setting: str
    environment_mismatch: list[str]
    params_compression: float
    theoretical_speedup: float
    memory_compression: list[MemoryCompression]
    speedups: list[ObservedSpeedup]
    method: str = TWO_TIME
    side_by_side: dict[str, Any] | None = None

    @property
    def busy(self) -> bool:
        """Whether the side-by-side measurement ran on a busy machine."""
        return bool(self.side_by_side and self.side_by_side.get("busy"))

    def speedup(self, mode: str, batch_size: int, backend: str = "torch") -> ObservedSpeedup | None:
        """The observed speedup for (`mode`, `batch_size`, `backend`), None if not measured."""
        return next(
            (s for s in self.speedups if s.mode == mode and s.batch_size == batch_size and s.backend == backend),
            None,
        )

    def memory_at(self, batch_size: int) -> MemoryCompression | None:
        return next((m for m in self.memory_compression if m.batch_size == batch_size), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeedupReport:
        return cls(
            **{
                **data,
                "environment_mismatch": list(data["environment_mismatch"]),
                "memory_compression": [MemoryCompression(**m) for m in data["memory_compression"]],
                "speedups": [ObservedSpeedup(**s) for s in data["speedups"]],
            }
        )

    def to_markdown(self) -> str:
        """A table shaped like paper 000's Tables II/III for this one comparison."""
        return speedup_markdown([self])

    def plot(self, path: str | Path) -> Path:
        """Saves observed vs theoretical speedup (paper 000's Fig. 1) as a PNG at `path`."""
        return plot_speedups([self], path)


def compare(
    baseline: ModelProfile,
    compressed: ModelProfile,
    allow_environment_mismatch: bool = False,
    side_by_side: SideBySideReport | None = None,
) -> SpeedupReport:
    """Compares `compressed` with `baseline`: memory compression, theoretical and observed speedup.

    The observed speedup comes from `side_by_side` when given (the contenders named like the
    profiles, `compare_models`), matched by batch size, mode, backend, threads and device:
    paired rounds, with an interval and a verdict. Without it, the two profiles' median
    latencies are divided: a "two-time" comparison, which on a shared machine carries whatever
    load changed between the two measurements, and is labelled so in every rendering.

    Args:
        baseline: the uncompressed model's profile.
        compressed: the compressed model's profile, from the same machine and settings.
        allow_environment_mismatch: compare profiles from different environments anyway, with a
            warning; the report lists the differences.
        side_by_side: a side-by-side measurement of the two models.

    Raises:
        ValueError: if the input shapes differ, or the environments differ and
            `allow_environment_mismatch` is False.
    """
    mismatch = _check_comparable(baseline, compressed, allow_environment_mismatch)
    theoretical = _ratio(baseline.flops, compressed.flops)
    speedups, used = _observed_speedups(baseline, compressed, theoretical, side_by_side)
    return SpeedupReport(
        baseline_name=baseline.name,
        compressed_name=compressed.name,
        setting=compressed.environment.label,
        environment_mismatch=mismatch,
        params_compression=_ratio(baseline.params.bytes, compressed.params.bytes),
        theoretical_speedup=theoretical,
        memory_compression=_memory_compression(baseline, compressed),
        speedups=speedups,
        method=TWO_TIME if side_by_side is None else SIDE_BY_SIDE,
        side_by_side=None if side_by_side is None else SideBySideReport(used).to_dict(),
    )


def _check_comparable(baseline: ModelProfile, compressed: ModelProfile, allow_environment_mismatch: bool) -> list[str]:
    """The environment differences of the two profiles (warned about when allowed).

    Raises:
        ValueError: for different input shapes, or different environments when not allowed.
    """
    if list(baseline.input_shape) != list(compressed.input_shape):
        raise ValueError(
            f"`compressed` was profiled with input shape {compressed.input_shape}, `baseline` with "
            f"{baseline.input_shape}; FLOPs and latency are only comparable at the same input shape."
        )
    mismatch = baseline.environment.differences(compressed.environment)
    if mismatch:
        message = (
            f"Profiles of {baseline.name!r} and {compressed.name!r} come from different environments "
            f"({'; '.join(mismatch)}); their latencies are not comparable."
        )
        if not allow_environment_mismatch:
            raise ValueError(
                message + " Profile both on the same machine with the same settings, or pass "
                "`allow_environment_mismatch=True` to compare anyway."
            )
        warnings.warn(message, UserWarning, stacklevel=3)  # 3: the caller of `compare`
        log.warning(message)
    return mismatch


def _memory_compression(baseline: ModelProfile, compressed: ModelProfile) -> list[MemoryCompression]:
    """Memory ratios at each batch size both profiles measured."""
    memory = []
    for base_memory in baseline.memory:
        other = compressed.memory_at(base_memory.batch_size)
        if other is None:
            continue
        train = None
        if base_memory.train_total_bytes is not None and other.train_total_bytes is not None:
            train = _ratio(base_memory.train_total_bytes, other.train_total_bytes)
        memory.append(
            MemoryCompression(
                batch_size=base_memory.batch_size,
                inference=_ratio(base_memory.inference_total_bytes, other.inference_total_bytes),
                train=train,
            )
        )
    return memory


def _observed_speedups(
    baseline: ModelProfile, compressed: ModelProfile, theoretical: float, side_by_side: SideBySideReport | None
) -> tuple[list[ObservedSpeedup], list[SideBySideResult]]:
    """One speedup per latency setting both profiles measured, and the side-by-side results used.

    Two-time (a ratio of the two medians) without `side_by_side`; else the paired estimate of
    the matching side-by-side result (a setting it lacks is logged and left out).
    """
    speedups = []
    used = []
    env = compressed.environment
    for base_entry in baseline.latency:
        other_entry = compressed.latency_of(base_entry.mode, base_entry.batch_size, base_entry.backend)
        if other_entry is None:
            continue
        kind = dict(backend=base_entry.backend, mode=base_entry.mode, batch_size=base_entry.batch_size)
        if side_by_side is None:
            observed = _ratio(base_entry.stats.median_s, other_entry.stats.median_s)
            speedups.append(
                ObservedSpeedup(
                    **kind,
                    baseline_median_s=base_entry.stats.median_s,
                    compressed_median_s=other_entry.stats.median_s,
                    observed=observed,
                    observed_over_theoretical=_ratio(observed, theoretical),
                )
            )
            continue
        setting = dict(kind, threads=env.threads, device=env.device)
        result = side_by_side.result_for(**setting)
        paired = None if result is None else next((p for p in result.speedups if p.candidate == compressed.name), None)
        if result is None or paired is None:
            log.warning("No side-by-side measurement of %r for %s; not compared.", compressed.name, setting)
            continue
        used.append(result)
        speedups.append(
            ObservedSpeedup(
                **kind,
                baseline_median_s=paired.baseline_median_s,
                compressed_median_s=paired.candidate_median_s,
                observed=paired.estimate,
                observed_over_theoretical=_ratio(paired.estimate, theoretical),
                method=SIDE_BY_SIDE,
                low=paired.low,
                high=paired.high,
                confidence=paired.confidence,
                verdict=paired.verdict,
                rounds=paired.rounds,
            )
        )
    return speedups, used


def compare_matching(
    baselines: Sequence[ModelProfile],
    compressed: Sequence[ModelProfile],
    allow_environment_mismatch: bool = False,
    side_by_side: SideBySideReport | None = None,
) -> list[SpeedupReport]:
    """Compares each compressed profile with the baseline measured with the same device and threads.

    Args:
        baselines: baseline profiles, one per (device, threads) setting.
        compressed: compressed-model profiles, one per setting.
        allow_environment_mismatch: passed to `compare` (e.g. a run resumed on another host).
        side_by_side: passed to `compare`.

    Raises:
        ValueError: as `compare`.
    """
    reports = []
    for profile in compressed:
        key = (profile.environment.device, profile.environment.threads)
        match = next((b for b in baselines if (b.environment.device, b.environment.threads) == key), None)
        if match is None:
            log.warning(
                "No baseline profile measured on %s; %r is not compared.", profile.environment.label, profile.name
            )
            continue
        reports.append(
            compare(match, profile, allow_environment_mismatch=allow_environment_mismatch, side_by_side=side_by_side)
        )
    return reports


def speedup_markdown(reports: Sequence[SpeedupReport]) -> str:
    """Renders reports as paper 000's Tables II/III: rows (batch size, method), columns per setting.

    Each setting (device and threads) and backend gets an "Inference / Train" column, as the
    paper has one per hardware; a second table gives observed / theoretical in the same shape.
    """
    if not reports:
        return "_No comparison: no baseline profile measured with the same settings._\n"
    lines = _speedup_preamble(reports)
    for title, field in (("Observed speedup", "observed"), ("Observed / theoretical", "observed_over_theoretical")):
        lines += _speedup_table(reports, title, field)
    lines.append(
        "Params compression: parameter bytes. Memory compression: estimated total of a train step (parameters, "
        "buffers, input, gradients, saved activations; inference total where no train step was profiled). "
        "Theoretical speedup: forward FLOPs at batch size 1. Observed speedup: latency, paired per round when "
        "measured side by side (geometric mean over rounds, bootstrap interval), else the ratio of two medians. "
        "All ratios baseline / compressed; `–`: not measured (ONNX Runtime is inference only)."
    )
    return "\n".join(lines) + "\n"


def _speedup_preamble(reports: Sequence[SpeedupReport]) -> list[str]:
    """What the tables compare, how the speedups were measured, and any busy-machine or environment warning."""
    baseline_names = sorted({r.baseline_name for r in reports})
    lines = [
        f"Compression ratios and speedup against {', '.join(baseline_names)}. "
        "Higher is better, below 1.0 indicates a bigger/slower model.",
        "",
    ]
    methods = {r.method for r in reports}
    if TWO_TIME in methods:
        lines += [
            "**Two-time comparison**: the baseline and the model were profiled at different times and their "
            "median latencies divided; whatever else loaded the machine in between lands in the ratio "
            "(no interval, no verdict). Measure side by side for a speedup you can trust.",
            "",
        ]
    if SIDE_BY_SIDE in methods:
        confidence = next((s.confidence for r in reports for s in r.speedups if s.confidence), 0.95)
        lines += [
            f"Observed speedup measured **side by side**: `estimate [{confidence:.0%} confidence interval]` and "
            "the verdict (faster / ~ not distinguishable / slower).",
            "",
        ]
    busy = [r for r in reports if r.busy]
    if busy:
        results = [res for r in busy for res in SideBySideReport.from_dict(r.side_by_side).results]
        lines += [side_by_side_note(results).split("\n\n", 1)[-1], ""]
    for report in reports:
        if report.environment_mismatch:
            lines.append(
                f"**WARNING: {report.compressed_name!r} and {report.baseline_name!r} were profiled in different "
                f"environments ({'; '.join(report.environment_mismatch)}): observed speedups are not meaningful.**"
            )
            lines.append("")
    return lines


def _speedup_table(reports: Sequence[SpeedupReport], title: str, field: str) -> list[str]:
    """One table: a row per (batch size, method), an "Inference / Train" column per (setting, backend)."""
    columns = list(dict.fromkeys((r.setting, s.backend) for r in reports for s in r.speedups))
    rows = list(dict.fromkeys((m.batch_size, r.compressed_name) for r in reports for m in r.memory_compression))
    rows.sort(key=lambda row: row[0])
    header = ["Batch Size", "Method", "Params Compression", "Memory Compression", "Theoretical Speedup"]
    header += [f"{title}: Inference / Train ({setting}, {backend})" for setting, backend in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for batch_size, method in rows:
        report = next(r for r in reports if r.compressed_name == method)
        memory = report.memory_at(batch_size)
        memory_ratio = math.nan if memory is None else memory.inference if memory.train is None else memory.train
        row = [
            str(batch_size),
            method,
            f"{report.params_compression:.2f}",
            f"{memory_ratio:.2f}",
            f"{report.theoretical_speedup:.2f}",
        ]
        row += [_speedup_cell(reports, method, batch_size, setting, backend, field) for setting, backend in columns]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return lines


def _speedup_cell(
    reports: Sequence[SpeedupReport], method: str, batch_size: int, setting: str, backend: str, field: str
) -> str:
    """The "inference / train" values of `field` for one method, batch size, setting and backend."""
    report = next((r for r in reports if r.compressed_name == method and r.setting == setting), None)
    if report is None:
        return "–"
    values = []
    for mode in MODES:
        entry = report.speedup(mode, batch_size, backend)
        values.append("–" if entry is None else _cell(entry, field, report.theoretical_speedup))
    return " / ".join(values)


def speedup_summary(reports: Sequence[SpeedupReport]) -> str:
    """A few lines for the console: one per observed speedup, with interval and verdict."""
    lines = []
    for report in reports:
        how = "side by side" if report.method == SIDE_BY_SIDE else "TWO-TIME (not paired: load in between counts)"
        lines.append(
            f"{report.compressed_name} vs {report.baseline_name} on {report.setting}, {how}; "
            f"theoretical {report.theoretical_speedup:.2f}x" + (" - measured on a BUSY machine" if report.busy else "")
        )
        for s in report.speedups:
            verdict = f" {s.verdict}" if s.verdict else ""
            lines.append(f"  bs{s.batch_size} {s.backend} {s.mode}: {s.label()}{verdict}")
    return "\n".join(lines)


def plot_speedups(reports: Sequence[SpeedupReport], path: str | Path) -> Path:
    """Saves observed vs theoretical speedup with the equal-speedup diagonal (paper 000, Fig. 1).

    One point per (setting, backend, mode, batch size); points below the diagonal are slower
    than the FLOP count promised.

    Raises:
        ImportError: if matplotlib is not installed.
        ValueError: if no report has an observed speedup to plot.
    """
    points = [(r, s) for r in reports for s in r.speedups if math.isfinite(s.observed)]
    if not points:
        raise ValueError("`reports` must hold at least one observed speedup to plot, got none.")
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("Plotting speedups needs matplotlib: `pip install matplotlib`.") from error

    # A bare Figure (no pyplot) draws without touching the global backend or figure registry.
    figure = Figure(figsize=(6, 5), layout="constrained")
    axes = figure.add_subplot()
    markers = {INFERENCE: "o", TRAIN: "^"}
    groups = list(dict.fromkeys((r.compressed_name, r.setting, s.backend) for r, s in points))
    colors = [f"C{i % 10}" for i in range(len(groups))]
    for (method, setting, backend), color in zip(groups, colors):
        for mode in MODES:
            selected = [
                (r, s)
                for r, s in points
                if (r.compressed_name, r.setting, s.backend) == (method, setting, backend) and s.mode == mode
            ]
            if not selected:
                continue
            xs = [r.theoretical_speedup for r, _ in selected]
            ys = [s.observed for _, s in selected]
            # Error bars: the side-by-side confidence interval (none for a two-time comparison).
            below = [s.observed - s.low if s.low is not None else 0.0 for _, s in selected]
            above = [s.high - s.observed if s.high is not None else 0.0 for _, s in selected]
            axes.errorbar(
                xs, ys, yerr=[below, above], fmt=markers[mode], color=color, capsize=3,
                label=f"{method}, {backend}, {mode} ({setting})",
            )  # fmt: skip
            for x, y, (_, s) in zip(xs, ys, selected):
                axes.annotate(f"bs{s.batch_size}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    finite = [r.theoretical_speedup for r, _ in points if math.isfinite(r.theoretical_speedup)]
    top = max([1.0, *finite, *(s.high if s.high is not None else s.observed for _, s in points)]) * 1.1
    axes.plot([0, top], [0, top], linestyle="--", color="gray", label="equal speedup")
    axes.set_xlim(0, top)
    axes.set_ylim(0, top)
    axes.set_xlabel("Theoretical speedup (FLOPs ratio)")
    paired = any(s.low is not None for _, s in points)
    axes.set_ylabel("Observed speedup (side by side, with interval)" if paired else "Observed speedup (two-time ratio)")
    axes.set_title("Observed vs theoretical speedup")
    axes.legend(fontsize=7, loc="upper left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
    return path


_VERDICT_MARKS = {"faster": "faster", "not distinguishable": "~", "slower": "slower"}


def _cell(entry: ObservedSpeedup, field: str, theoretical: float) -> str:
    """`1.23x [1.15, 1.31] faster`, or the observed / theoretical ratio with its interval."""
    if field == "observed":
        text = entry.label()
        return f"{text} {_VERDICT_MARKS.get(entry.verdict, entry.verdict)}" if entry.verdict else text
    value = entry.observed_over_theoretical
    if entry.low is None or entry.high is None:
        return f"{value:.2f}"
    return f"{value:.2f} [{_ratio(entry.low, theoretical):.2f}, {_ratio(entry.high, theoretical):.2f}]"


def _ratio(numerator: float, denominator: float) -> float:
    # A zero denominator (e.g. a model with no conv/linear op has 0 FLOPs) has no meaningful
    # ratio; NaN survives JSON and renders as "nan" instead of crashing a report.
    return numerator / denominator if denominator else math.nan
