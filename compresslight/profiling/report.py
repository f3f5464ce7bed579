"""Report writers: Markdown for one profile, and profile.json / profile.md / profile.png for a run.

`write_report` is the one writer both `ProfileCallback` and `cli.py profile` use;
`profile_and_report` is the entry point for the CLI: profile a model (and optionally its
baseline) under every requested setting, write the files, return the Markdown.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresslight.profiling.compare import SpeedupReport, compare_matching, plot_speedups, speedup_markdown
from compresslight.profiling.profiler import profile
from compresslight.profiling.progress import progress_bar
from compresslight.profiling.results import ModelProfile, profile_markdown
from compresslight.profiling.side_by_side import SideBySide, SideBySideReport, compare_models

log = logging.getLogger(__name__)

REPORT_FORMAT_VERSION = 1
JSON_NAME = "profile.json"
MARKDOWN_NAME = "profile.md"
PLOT_NAME = "profile.png"


def profile_settings(
    model: nn.Module,
    input_shape: Sequence[int],
    devices: Sequence[str | torch.device] = ("cpu",),
    threads: Sequence[int | None] = (None,),
    progress: bool | None = None,
    **profile_kwargs: Any,
) -> list[ModelProfile]:
    """Profiles `model` once per (device, threads) setting, e.g. multi- and single-thread CPU.

    Args:
        model: the network.
        input_shape: one input without the batch dimension.
        devices: devices to profile on.
        threads: thread counts to profile with (None: the current setting).
        progress: False: no progress bar; None: one when stdout is a terminal.
        **profile_kwargs: the other arguments of `profile` (batch_sizes, warmup, iters, ...).

    Raises:
        ValueError: as `profile`.
    """
    settings = [(device, count) for device in devices for count in threads]
    profiles = []
    name = profile_kwargs.get("name") or type(model).__name__
    with progress_bar(len(settings), f"Profiling {name}", enabled=progress) as bar:
        for device, count in settings:
            profiles.append(profile(model, input_shape, device=device, threads=count, **profile_kwargs))
            bar.update(1)
    return profiles


def write_report(
    out_dir: str | Path | None,
    baselines: Sequence[ModelProfile],
    current: Sequence[ModelProfile] = (),
    reports: Sequence[SpeedupReport] = (),
    title: str = "Profile",
) -> str:
    """Renders profiles and comparisons as Markdown and, given `out_dir`, writes the run's files.

    Files: `profile.json` ({"baseline": [...], "current": [...], "comparisons": [...]}),
    `profile.md` (the returned Markdown) and, when there is a comparison and matplotlib is
    installed, `profile.png` (observed vs theoretical speedup).

    Args:
        out_dir: folder to write into (created); None writes nothing.
        baselines: baseline profiles (one per setting).
        current: profiles of the model now (compressed), if any.
        reports: comparisons of `current` against `baselines`.
        title: the Markdown's top heading.

    Returns:
        The Markdown.
    """
    sections = [f"# {title}", ""]
    if reports:
        sections += ["## Compression ratios and speedup", "", speedup_markdown(reports)]
    measured = [r for r in reports if r.side_by_side]
    if measured:
        sections += ["## Side-by-side measurement", ""]
        sections.append(
            SideBySideReport(
                [x for r in measured for x in SideBySideReport.from_dict(r.side_by_side).results]
            ).to_markdown()
        )
    for heading, profiles in (("Baseline", baselines), ("Current model", current)):
        for model_profile in profiles:
            sections += [f"## {heading}: {model_profile.name} on {model_profile.environment.label}", ""]
            sections.append(profile_markdown(model_profile, max_layers=20))
    markdown = "\n".join(sections)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "format_version": REPORT_FORMAT_VERSION,
            "baseline": [p.to_dict() for p in baselines],
            "current": [p.to_dict() for p in current],
            "comparisons": [r.to_dict() for r in reports],
        }
        (out / JSON_NAME).write_text(json.dumps(payload, indent=2))
        (out / MARKDOWN_NAME).write_text(markdown)
        if any(r.speedups for r in reports):
            try:
                plot_speedups(reports, out / PLOT_NAME)
            except ImportError as error:
                log.warning("%s Skipping %s.", error, PLOT_NAME)
    return markdown


def read_report(path: str | Path) -> tuple[list[ModelProfile], list[ModelProfile], list[SpeedupReport]]:
    """Reads a `profile.json` written by `write_report` (a file or its folder).

    Returns:
        (baselines, current, comparisons).

    Raises:
        FileNotFoundError: if there is no such file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / JSON_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"`path` must be a {JSON_NAME} written by write_report (or its folder), got {str(path)!r}."
        )
    data = json.loads(path.read_text())
    return (
        [ModelProfile.from_dict(p) for p in data["baseline"]],
        [ModelProfile.from_dict(p) for p in data["current"]],
        [SpeedupReport.from_dict(r) for r in data["comparisons"]],
    )


def profile_and_report(
    model: nn.Module,
    input_shape: Sequence[int],
    baseline_model: nn.Module | None = None,
    out_dir: str | Path | None = None,
    *,
    baseline_profiles: Sequence[ModelProfile] | None = None,
    devices: Sequence[str | torch.device] | str | torch.device = "cpu",
    threads: Sequence[int | None] | int | None = None,
    name: str = "model",
    baseline_name: str = "baseline",
    allow_environment_mismatch: bool = False,
    side_by_side: SideBySide | None = None,
    two_time: bool = False,
    progress: bool | None = None,
    **profile_kwargs: Any,
) -> str:
    """Profiles `model` (and its baseline) and writes profile.json/.md/.png: the `profile` CLI command.

    Without a baseline, the model's profile is the report's baseline section. With
    `baseline_model`, both are profiled here and then measured side by side (`compare_models`:
    alternating rounds, paired speedups with an interval and a verdict) in every setting; with
    `baseline_profiles` (e.g. read from an earlier run's profile.json with `read_report`) only
    a two-time comparison is possible, and the report says so.

    Args:
        model: the model to profile (e.g. a compressed checkpoint, records replayed).
        input_shape: one input without the batch dimension, e.g. (3, 32, 32).
        baseline_model: the uncompressed model to compare against.
        out_dir: folder for the files; None writes nothing.
        baseline_profiles: already measured baseline profiles (instead of `baseline_model`).
        devices: one device or several (`device=` is accepted too).
        threads: one thread count, several (e.g. [1, 2]: single and multi-thread), or None.
        name: the model's label (the "Method" column).
        baseline_name: the baseline's label.
        allow_environment_mismatch: compare against `baseline_profiles` from another
            environment anyway (the report carries a warning).
        side_by_side: rounds, stopping rules and statistics of the side-by-side measurement
            (default `SideBySide()`, with this call's `warmup` and `iters`).
        two_time: divide the two profiles' medians instead of measuring side by side (labelled
            "two-time" in the report).
        progress: False: no progress bars; None: on a terminal.
        **profile_kwargs: the other arguments of `profile`: batch_sizes, warmup, iters,
            backends, train, measure_memory.

    Returns:
        The Markdown written to profile.md.

    Raises:
        ValueError: as `profile`; if both `baseline_model` and `baseline_profiles` are given;
            if the environments differ and `allow_environment_mismatch` is False.
    """
    if baseline_model is not None and baseline_profiles is not None:
        raise ValueError("Pass `baseline_model` or `baseline_profiles`, not both.")
    if baseline_name == name:  # e.g. two runs' `last.ckpt`: the side-by-side needs a name per model
        baseline_name = f"{baseline_name} (baseline)"
    if "device" in profile_kwargs:  # `profile`'s spelling, for callers that forward its arguments
        devices = profile_kwargs.pop("device")
    device_list = [devices] if isinstance(devices, (str, torch.device)) else list(devices)
    thread_list = [threads] if threads is None or isinstance(threads, int) else list(threads)
    settings = dict(devices=device_list, threads=thread_list, **profile_kwargs)
    current = profile_settings(model, input_shape, name=name, progress=progress, **settings)
    if baseline_model is not None:
        baseline_profiles = profile_settings(
            baseline_model, input_shape, name=baseline_name, progress=progress, **settings
        )
    if not baseline_profiles:
        return write_report(out_dir, current)
    paired = None
    if baseline_model is not None and not two_time:
        paired = measure_side_by_side(
            baseline_model, model, input_shape, baseline_name=baseline_name, name=name, options=side_by_side,
            progress=progress, **settings,
        )  # fmt: skip
    reports = compare_matching(
        baseline_profiles, current, allow_environment_mismatch=allow_environment_mismatch, side_by_side=paired
    )
    return write_report(out_dir, baseline_profiles, current, reports)


def measure_side_by_side(
    baseline_model: nn.Module,
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    baseline_name: str,
    name: str,
    devices: Sequence[str | torch.device],
    threads: Sequence[int | None],
    options: SideBySide | None = None,
    progress: bool | None = None,
    batch_sizes: Sequence[int] = (1,),
    backends: Sequence[str] = ("torch",),
    train: bool = True,
    warmup: int | None = None,
    iters: int | None = None,
    **_: Any,
) -> SideBySideReport:
    """`compare_models` of the two models in every device and the profile settings (one report).

    `warmup` and `iters` (the profile's) set the per-turn timing unless `options` is given.
    """
    if options is None:
        timing = {k: v for k, v in (("warmup", warmup), ("iters", iters)) if v is not None}
        options = SideBySide(**timing)
    modes = ("inference", "train") if train else ("inference",)
    results = []
    for device in devices:
        report = compare_models(
            {baseline_name: baseline_model, name: model}, input_shape, baseline_name, batch_sizes=batch_sizes,
            threads=threads, modes=modes, backends=backends, device=device, options=options, progress=progress,
        )  # fmt: skip
        results += report.results
    return SideBySideReport(results)
