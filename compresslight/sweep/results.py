"""What a sweep trial hands back to the sweep: `SweepResultsCallback` and the files it writes.

The sweep runs each trial as a separate `cli.py fit` process and adds this callback to the
trial's config. It writes into the trial's folder:

- `progress.jsonl`: one line per validation pass, written as it happens, which the sweep polls to
  stop hopeless trials early. Step 0 is a full validation before training (when
  `num_sanity_val_steps: -1`), step k the validation after training epoch k.
- `results.json`: at the end of fit, every scalar the run produced: the logged metrics
  (`val/top1`, `train/loss`, ...), the final model's `compression/params` and `compression/macs`
  (forward, batch 1), and the `ProfileCallback`'s `profile/...` keys.

When a run does not train (`max_epochs: 0`, paper 002's "no retraining" sweeps), the full
validation before training is its validation result.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from typing_extensions import override

import compresslight.lightning_compat as pl
from compresslight.lightning_compat import Callback
from compresslight.profiling.counting import count_macs, count_parameters
from compresslight.profiling.keys import profile_metrics

log = logging.getLogger(__name__)

PROGRESS_NAME = "progress.jsonl"
RESULTS_NAME = "results.json"
CALLBACK_CLASS_PATH = "compresslight.sweep.results.SweepResultsCallback"


class SweepResultsCallback(Callback):
    """Writes a trial's per-epoch validation metrics and final results into `output_dir`.

    Args:
        output_dir: the trial's folder (created if missing).
    """

    def __init__(self, output_dir: str) -> None:
        super().__init__()
        self.output_dir = Path(output_dir)
        self.before_training: dict[str, float] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if trainer.sanity_checking:
            # The sanity check's metrics are discarded after it; keep them when it covered the
            # whole validation set (num_sanity_val_steps: -1): that is the model before training.
            if list(trainer.num_sanity_val_batches) != list(trainer.num_val_batches):
                return
            self.before_training = _scalars(trainer.callback_metrics)
            step, metrics = 0, self.before_training
        else:
            step, metrics = trainer.current_epoch + 1, _scalars(trainer.callback_metrics)
        record = {
            "step": step,
            "max_epochs": trainer.max_epochs,
            "num_classes": _num_classes(trainer, pl_module),
            "metrics": {key: value for key, value in metrics.items() if key.startswith("val/")},
        }
        with (self.output_dir / PROGRESS_NAME).open("a") as progress:
            progress.write(json.dumps(record) + "\n")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # `teardown` runs after every callback's `on_fit_end`, so ProfileCallback's final
        # profile exists whatever the order of the callbacks.
        if stage != "fit" or not trainer.is_global_zero:
            return
        metrics = dict(self.before_training)
        metrics.update(_scalars(trainer.callback_metrics))
        metrics.update(_model_size(pl_module))
        for callback in trainer.callbacks:
            metrics.update(_profile_metrics(callback))
        results = {
            "metrics": metrics,
            "num_classes": _num_classes(trainer, pl_module),
            "epochs_trained": trainer.current_epoch,
            "max_epochs": trainer.max_epochs,
        }
        path = self.output_dir / RESULTS_NAME
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(results, indent=2))
        os.replace(partial, path)  # the sweep never reads a half-written file
        log.info("Sweep results written to %s.", path)


def read_results(trial_dir: str | Path) -> dict[str, Any] | None:
    """The `results.json` of a trial folder, None if the trial wrote none."""
    path = Path(trial_dir) / RESULTS_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def read_progress(trial_dir: str | Path) -> list[dict[str, Any]]:
    """The complete lines of a trial's `progress.jsonl` so far (a line being written is skipped)."""
    path = Path(trial_dir) / PROGRESS_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    scalars = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[key] = float(value)
    return scalars


def _num_classes(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
    num_classes = getattr(pl_module, "hparams", {}).get("num_classes")
    if num_classes is None:
        num_classes = getattr(trainer.datamodule, "num_classes", None)
    return None if num_classes is None else int(num_classes)


def _model_size(pl_module: pl.LightningModule) -> dict[str, float]:
    model = getattr(pl_module, "model", pl_module)
    sizes = {"compression/params": float(count_parameters(model).total)}
    example = pl_module.example_input_array
    if isinstance(example, torch.Tensor):
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        was_training = model.training
        model.eval()
        try:
            sizes["compression/macs"] = float(count_macs(model, example[:1].to(device))[0])
        finally:
            model.train(was_training)
    return sizes


def _profile_metrics(callback: Callback) -> dict[str, float]:
    """The `profile/...` scalars a ProfileCallback logged for its latest profile and comparison."""
    latest = getattr(callback, "latest", None)
    # By name: compresslight never imports the Lightning adapters in callbacks/ (DESIGN.md).
    if type(callback).__name__ != "ProfileCallback" or not latest:
        return {}
    metrics = profile_metrics(latest, callback.reports)  # the keys' one definition, profiling/keys.py
    return {key: float(value) for key, value in metrics.items() if math.isfinite(value)}


__all__ = [
    "CALLBACK_CLASS_PATH",
    "PROGRESS_NAME",
    "RESULTS_NAME",
    "SweepResultsCallback",
    "read_progress",
    "read_results",
]
