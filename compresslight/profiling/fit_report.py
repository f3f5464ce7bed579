"""The pure side of `ProfileCallback`: its validated options and the steps of a fit's profile.

`ProfileOptions` validates and normalises the callback's arguments once (so a bad one fails
before training); `profile_model` and `measure_against_baseline` profile a module and measure it
side by side against the frozen baseline from `frozen_copy`; `resolve_input_shape` picks the
input shape; `measurements_table` is the per-measurement table logged to W&B. None of this sees a
Trainer.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from compresslight.profiling.backends import validate_backends
from compresslight.profiling.environment import resolve_device
from compresslight.profiling.report import measure_side_by_side, profile_settings
from compresslight.profiling.results import ModelProfile
from compresslight.profiling.side_by_side import SideBySide, SideBySideReport

log = logging.getLogger(__name__)

__all__ = [
    "ProfileOptions",
    "frozen_copy",
    "measure_against_baseline",
    "measurements_table",
    "profile_model",
    "resolve_input_shape",
]


@dataclasses.dataclass
class ProfileOptions:
    """What to measure (see `ProfileCallback` for each argument), validated and normalised to lists.

    Raises:
        ValueError: for a batch size <= 0, an unknown backend, a device that does not exist here,
            a thread count < 1, `warmup` < 0, `iters` < 1, an invalid `input_shape` or invalid
            side-by-side options (see `SideBySide`).
    """

    batch_sizes: Sequence[int] | int = (1,)
    devices: Sequence[str] | str | None = None
    threads: Sequence[int] | int | None = None
    warmup: int = 5
    iters: int = 50
    backends: Sequence[str] | str = ("torch",)
    input_shape: Sequence[int] | None = None
    min_rounds: int = 5
    max_rounds: int = 20
    target_width: float | None = 0.10
    time_budget_s: float | None = 60.0
    confidence: float = 0.95
    rounds: SideBySide = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        batch_sizes = [self.batch_sizes] if isinstance(self.batch_sizes, int) else list(self.batch_sizes)
        if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in batch_sizes):
            raise ValueError(f"`batch_sizes` must be a non-empty list of ints > 0, got {batch_sizes!r}.")
        devices = [self.devices] if isinstance(self.devices, (str, torch.device)) else self.devices
        devices = None if devices is None else [str(resolve_device(d)) for d in devices]
        threads = self.threads
        thread_list = [threads] if threads is None or isinstance(threads, int) else list(threads)
        if not thread_list or any(
            t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1) for t in thread_list
        ):
            raise ValueError(f"`threads` must be an int >= 1, a list of them, or None, got {threads!r}.")
        backends = [self.backends] if isinstance(self.backends, str) else self.backends
        validate_backends(backends)
        for device in devices or ():
            validate_backends(backends, torch.device(device))
        if self.warmup < 0:
            raise ValueError(f"`warmup` must be >= 0, got {self.warmup!r}.")
        if self.iters < 1:
            raise ValueError(f"`iters` must be >= 1, got {self.iters!r}.")
        shape = self.input_shape
        if shape is not None and (
            not list(shape) or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape)
        ):
            raise ValueError(
                f"`input_shape` must be positive ints without the batch dimension, e.g. (3, 32, 32), got {shape!r}."
            )
        self.rounds = SideBySide(
            warmup=self.warmup,
            iters=self.iters,
            min_rounds=self.min_rounds,
            max_rounds=self.max_rounds,
            target_width=self.target_width,
            time_budget_s=self.time_budget_s,
            confidence=self.confidence,
        )
        self.batch_sizes = batch_sizes
        self.devices = devices
        self.threads = thread_list
        self.backends = list(dict.fromkeys(backends))
        self.input_shape = None if shape is None else list(shape)


def profile_model(
    module: nn.Module,
    input_shape: Sequence[int],
    options: ProfileOptions,
    *,
    devices: Sequence[str],
    train: bool,
    name: str,
    progress: bool,
) -> list[ModelProfile]:
    """`profile_settings` of `module` in every setting of `options` on `devices`."""
    return profile_settings(
        module,
        input_shape,
        devices=devices,
        threads=options.threads,
        batch_sizes=options.batch_sizes,
        warmup=options.warmup,
        iters=options.iters,
        backends=options.backends,
        train=train,
        name=name,
        progress=progress,
    )


def measure_against_baseline(
    baseline_model: nn.Module,
    module: nn.Module,
    input_shape: Sequence[int],
    options: ProfileOptions,
    *,
    baseline_name: str,
    name: str,
    devices: Sequence[str],
    train: bool,
    progress: bool,
) -> SideBySideReport:
    """`module` against the frozen `baseline_model`, side by side, in every setting of `options`."""
    return measure_side_by_side(
        baseline_model,
        module,
        input_shape,
        baseline_name=baseline_name,
        name=name,
        devices=devices,
        threads=options.threads,
        options=options.rounds,
        progress=progress,
        batch_sizes=options.batch_sizes,
        backends=options.backends,
        train=train,
    )


def resolve_input_shape(
    input_shape: Sequence[int] | None, datamodule_shape: Sequence[int] | None, example_input_array: Any
) -> list[int]:
    """The given shape, else the datamodule's `input_shape`, else the example input's (without the batch).

    Raises:
        ValueError: if none of the three gives a shape.
    """
    if input_shape is not None:
        return list(input_shape)
    if datamodule_shape is not None:
        return list(datamodule_shape)
    example = example_input_array
    if isinstance(example, (tuple, list)) and example:
        example = example[0]
    if isinstance(example, torch.Tensor):
        return list(example.shape[1:])
    raise ValueError(
        "ProfileCallback needs an input shape: pass `input_shape=(C, H, W)`, or use a datamodule with an "
        "`input_shape` attribute, or set `example_input_array` on the LightningModule; found none."
    )


def frozen_copy(module: nn.Module) -> nn.Module | None:
    """A CPU copy of `module` as it is now (the side-by-side baseline), or None if it cannot be copied."""
    try:
        # LightningModule.__getstate__ drops the trainer, so this copies the network only.
        frozen = copy.deepcopy(module)
    except Exception as error:  # noqa: BLE001 - any copy failure means: fall back, and say why
        log.warning(
            "ProfileCallback: could not copy the baseline model (%s: %s); the comparison at fit end will be TWO-TIME.",
            type(error).__name__,
            error,
        )
        return None
    return frozen.cpu()


def measurements_table(
    baseline: Sequence[ModelProfile], latest: Sequence[ModelProfile]
) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows: one row per latency measurement of every profile (the W&B `profile/table`)."""
    columns = ["model", "setting", "backend", "mode", "batch_size", "median_ms", "min_ms", "max_ms"]
    columns += ["images_per_s", "params", "macs"]
    rows = [
        [
            p.name,
            p.environment.label,
            e.backend,
            e.mode,
            e.batch_size,
            e.median_ms,
            e.stats.min_s * 1e3,
            e.stats.max_s * 1e3,
            e.images_per_s,
            p.params.total,
            p.macs,
        ]
        for p in (*baseline, *latest)
        for e in p.latency
    ]
    return columns, rows
