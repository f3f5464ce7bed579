"""`ProfileCallback`: profile the model before training and after, and report what compression bought.

At `on_fit_start` it profiles the LightningModule as it is (the baseline, before any compression
scheduled later), at `on_fit_end` again, and, with `after_compression=True`, whenever a
compression callback calls `on_compression`. Each time it writes `profile.json`, `profile.md`
and (once there is a comparison) `profile.png` into the run's log dir, and logs scalars to every
logger. The heavy lifting is `compresslight.profiling` (`profile`, `compare`, `write_report`).

At fit end (and after a compression event) the observed speedup is measured **side by side**:
a frozen CPU copy of the model taken when the baseline was profiled and the model now alternate
in rounds in one process (`compresslight.profiling.side_by_side`), and the report gives each
speedup with its confidence interval and a verdict (faster / not distinguishable / slower).
`side_by_side=False` falls back to the old two-time comparison (two profiles taken at different
times, divided; labelled "two-time" in every report) for models too big to keep twice; so does
a run resumed from a checkpoint, which holds the baseline's profile but not its copy.

The console gets a short summary (the speedup rows); the full tables go to the files. Profiling
and the side-by-side rounds show progress bars when the Trainer's progress bar is on.

Logged keys: `compresslight.profiling.keys` (one definition, shared with the sweeps), e.g.
`profile/inference_latency_ms/bs1_t2_torch`, `profile/observed_speedup/inference/bs1_t2_torch` and
its interval `profile/observed_speedup_low/...`, `profile/observed_speedup_high/...`. The
comparison keys appear once there is something to compare (at fit end and after a compression
event). Values are logged at `trainer.global_step`; with a `WandbLogger` the callback also logs
`profile/table` (a table of every measurement) and `profile/plot` (the observed vs theoretical
speedup plot, with error bars).

Under DDP only global rank 0 profiles; the others skip, and nothing here is a collective
(the log dir, whose lookup broadcasts, is resolved in `setup`, which every rank runs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from typing_extensions import override

from compresslight import lightning_compat as pl
from compresslight.lightning_compat import Callback
from compresslight.profiling import ModelProfile, SpeedupReport, compare_matching, write_report
from compresslight.profiling.compare import speedup_summary
from compresslight.profiling.fit_report import (
    ProfileOptions,
    frozen_copy,
    measure_against_baseline,
    measurements_table,
    profile_model,
    resolve_input_shape,
)
from compresslight.profiling.keys import profile_metrics
from compresslight.profiling.report import PLOT_NAME

log = logging.getLogger(__name__)


class ProfileCallback(Callback):
    """Profiles the model at fit start (baseline) and fit end, and reports the speedup.

    Args:
        batch_sizes: batch sizes to measure memory and latency at.
        devices: devices to profile on; None: the trainer's device.
        threads: CPU thread counts to profile with, e.g. [1, 2] for single- and multi-thread
            as in paper 000; an int for one; None keeps the current setting.
        warmup: untimed calls before timing.
        iters: timed calls (the median is reported).
        backends: "torch" and/or "onnxruntime".
        input_shape: one input without the batch dimension; None takes
            `trainer.datamodule.input_shape`, else the shape of `pl_module.example_input_array`.
        on_fit_start: profile the baseline when fitting starts.
        on_fit_end: profile again when fitting ends and compare with the baseline.
        after_compression: profile again whenever a compression callback calls `on_compression`.
        output_dir: where to write profile.json/.md/.png; None: `trainer.log_dir`.
        side_by_side: measure the speedup side by side against a frozen CPU copy of the
            baseline (kept from fit start); False: the old two-time comparison (labelled so).
        min_rounds: side-by-side rounds before a stopping rule applies (>= 2).
        max_rounds: side-by-side rounds at most, per setting.
        target_width: stop once every interval's (high - low) / estimate is at most this.
        time_budget_s: stop once a setting's rounds took this long (None: no budget).
        confidence: the intervals' level.

    Raises:
        ValueError: for a batch size <= 0, an unknown backend, a device that does not exist
            here, a thread count < 1, `warmup` < 0, `iters` < 1, an invalid `input_shape` or
            invalid side-by-side options (see `SideBySide`).
    """

    def __init__(
        self,
        batch_sizes: Sequence[int] = (1,),
        devices: Sequence[str] | str | None = None,
        threads: Sequence[int] | int | None = None,
        warmup: int = 5,
        iters: int = 50,
        backends: Sequence[str] = ("torch",),
        input_shape: Sequence[int] | None = None,
        on_fit_start: bool = True,
        on_fit_end: bool = True,
        after_compression: bool = False,
        output_dir: str | Path | None = None,
        side_by_side: bool = True,
        min_rounds: int = 5,
        max_rounds: int = 20,
        target_width: float | None = 0.10,
        time_budget_s: float | None = 60.0,
        confidence: float = 0.95,
    ) -> None:
        super().__init__()
        self.options = ProfileOptions(
            batch_sizes=batch_sizes,
            devices=devices,
            threads=threads,
            warmup=warmup,
            iters=iters,
            backends=backends,
            input_shape=input_shape,
            min_rounds=min_rounds,
            max_rounds=max_rounds,
            target_width=target_width,
            time_budget_s=time_budget_s,
            confidence=confidence,
        )
        self.side_by_side = side_by_side
        self.profile_on_fit_start = on_fit_start
        self.profile_on_fit_end = on_fit_end
        self.after_compression = after_compression
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.baseline: list[ModelProfile] = []
        self.latest: list[ModelProfile] = []
        self.reports: list[SpeedupReport] = []
        self.baseline_model: torch.nn.Module | None = None
        self._log_dir: Path | None = None
        self._progress = True

    @property
    @override
    def state_key(self) -> str:
        options = self.options
        return self._generate_state_key(
            batch_sizes=options.batch_sizes, devices=options.devices, threads=options.threads, backends=options.backends
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # `trainer.log_dir` broadcasts under DDP: resolve it here, where every rank runs, so the
        # rank-0-only hooks below never call a collective alone.
        self._log_dir = self.output_dir if self.output_dir is not None else Path(trainer.log_dir or ".")
        self._progress = getattr(trainer, "progress_bar_callback", None) is not None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.profile_on_fit_start or not trainer.is_global_zero:
            return
        if self.baseline:
            log.info(
                "ProfileCallback: keeping the baseline profiled before compression (or restored from the checkpoint)."
            )
            return
        self._profile_baseline(trainer, pl_module)

    def before_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Profiles the baseline before the first structural edit, if not done yet.

        A one-shot compression edits the model in `setup`, before `on_fit_start`; compression
        callbacks call this on every `ProfileCallback` first, on every rank, whatever the order
        of the callbacks, so the baseline is the model as it was.
        """
        if self._log_dir is None:
            self.setup(trainer, pl_module, stage="fit")
        if self.profile_on_fit_start and not self.baseline and trainer.is_global_zero:
            self._profile_baseline(trainer, pl_module)

    def _profile_baseline(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.baseline = self._profile(trainer, pl_module, name="baseline")
        if self.side_by_side:
            self.baseline_model = frozen_copy(pl_module)
        self._log_metrics(trainer, self.baseline, [])
        self._write(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.profile_on_fit_end or not trainer.is_global_zero:
            return
        self._profile_and_compare(trainer, pl_module, name="after fit")

    def on_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Re-profiles after a compression callback edited the model (if `after_compression`).

        Compression callbacks call this on every `ProfileCallback` in `trainer.callbacks` after
        each structural edit, on every rank; only global rank 0 acts.
        """
        if not self.after_compression or not trainer.is_global_zero:
            return
        self._profile_and_compare(
            trainer, pl_module, name=f"after compression (epoch {trainer.current_epoch}, step {trainer.global_step})"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        # The baseline survives a resume, so a resumed (already compressed) run still compares
        # against the original model rather than against itself.
        return {"baseline": [p.to_dict() for p in self.baseline]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline = [ModelProfile.from_dict(p) for p in state_dict.get("baseline", [])]

    def _profile_and_compare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
        self.latest = self._profile(trainer, pl_module, name=name)
        paired = None
        if self.side_by_side and self.baseline_model is None and self.baseline:
            log.warning(
                "ProfileCallback: no copy of the baseline model (resumed from a checkpoint, or it could not be "
                "copied); falling back to the TWO-TIME comparison, labelled so in the report."
            )
        elif self.side_by_side and self.baseline:
            paired = measure_against_baseline(
                self.baseline_model,
                pl_module,
                self._resolve_input_shape(trainer, pl_module),
                self.options,
                baseline_name=self.baseline[0].name,
                name=name,
                devices=self._devices(trainer),
                train=not _has_synced_batch_norm(trainer, pl_module),
                progress=self._progress,
            )
        # A run resumed on another machine has a baseline from elsewhere: compare anyway, with
        # the warning `compare` emits and the differences written into the report.
        self.reports = compare_matching(
            self.baseline, self.latest, allow_environment_mismatch=True, side_by_side=paired
        )
        self._log_metrics(trainer, self.latest, self.reports)
        self._write(trainer, pl_module)

    def _profile(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> list[ModelProfile]:
        # `pl_module` is the bare module, not the DDP wrapper: its forward runs no collective, and
        # DDP's gradient hooks stay idle outside a wrapped forward/backward (the reducer only
        # expects gradients after DDP's own forward), so rank 0 can run train steps alone.
        return profile_model(
            pl_module,
            self._resolve_input_shape(trainer, pl_module),
            self.options,
            devices=self._devices(trainer),
            train=not _has_synced_batch_norm(trainer, pl_module),
            name=name,
            progress=self._progress,
        )

    def _devices(self, trainer: pl.Trainer) -> list[str]:
        return self.options.devices or [str(trainer.strategy.root_device)]

    def _resolve_input_shape(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[int]:
        datamodule_shape = getattr(trainer.datamodule, "input_shape", None)
        return resolve_input_shape(self.options.input_shape, datamodule_shape, pl_module.example_input_array)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out_dir = self._log_dir if self._log_dir is not None else Path(self.output_dir or trainer.default_root_dir)
        # The full tables go to the files; the console gets the speedup rows only.
        write_report(out_dir, self.baseline, self.latest, self.reports, title=f"Profile of {type(pl_module).__name__}")
        summary = f"\n{speedup_summary(self.reports)}" if self.reports else ""
        log.info("ProfileCallback wrote %s.%s", out_dir / "profile.md", summary)
        for logger in trainer.loggers:
            if pl.is_wandb_logger(logger):
                columns, rows = measurements_table(self.baseline, self.latest)
                logger.log_table(key="profile/table", columns=columns, data=rows)
                plot = out_dir / PLOT_NAME
                if self.reports and plot.is_file():
                    logger.log_image(key="profile/plot", images=[str(plot)])

    def _log_metrics(self, trainer: pl.Trainer, profiles: list[ModelProfile], reports: list[SpeedupReport]) -> None:
        metrics = profile_metrics(profiles, reports)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()


def _has_synced_batch_norm(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    # A train-mode SyncBatchNorm all-reduces its statistics: on rank 0 alone that would hang.
    synced = trainer.world_size > 1 and any(isinstance(m, torch.nn.SyncBatchNorm) for m in pl_module.modules())
    if synced:
        log.warning("ProfileCallback: SyncBatchNorm under DDP; profiling inference only (a train step would hang).")
    return synced


__all__ = ["ProfileCallback"]
