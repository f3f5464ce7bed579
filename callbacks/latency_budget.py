"""Latency-budget steps of `PruningCallback` (`target_speedup` / `target_latency_ms`).

The Trainer side of `compresslight.compression.latency_budget` (options, planning, correction):
measures (or reuses) the latency table on the unpruned model in `setup` and refuses an
unreachable target there; at each scheduled epoch plans that step on rank 0 and broadcasts the
plan, applies it through `StructuralCompressionCallback.apply_edit` (block removal, then channel
pruning: two records), measures the whole model against the unpruned baseline side by side on
rank 0 (broadcast too), and corrects the next step's budget by the prediction's error.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import torch
from compresslight.callbacks._trainer import find_example_inputs, resolve_log_dir, run_on_rank_zero
from torch import nn

from compresslight import lightning_compat as pl
from compresslight.compression.budget import Allocation, step_ratios
from compresslight.compression.depth import remove_blocks
from compresslight.compression.latency_budget import (
    LatencyBudgetOptions,
    budget_summary,
    clipped_correction,
    plan_step,
    prepare_latency_budget,
    step_entry,
)
from compresslight.compression.latency_table import LatencyTable, measure_speedup
from compresslight.compression.pruning import prune_filters

if TYPE_CHECKING:
    from compresslight.callbacks.structural_edit import StructuralCompressionCallback

log = logging.getLogger(__name__)


class LatencyBudget:
    """Table, baseline and correction of one latency-budget pruning schedule (see module docstring)."""

    def __init__(self, options: LatencyBudgetOptions) -> None:
        self.options = options
        self.table: LatencyTable | None = None
        self.baseline: nn.Module | None = None
        self.correction = 1.0  # predicted / measured speedup of the last step, clipped
        self.history: list[dict[str, Any]] = []

    @property
    def speedup(self) -> float:
        """The target as a speedup over the unpruned model."""
        assert self.table is not None, "prepare() first"
        return self.options.speedup(self.table)

    def prepare(self, model: nn.Module, example_inputs: torch.Tensor) -> None:
        """Measures (or loads) the table on the unpruned `model` and keeps a copy as the baseline.

        Raises:
            ValueError: if the target cannot be reached (see `prepare_latency_budget`).
        """
        if self.table is None:
            self.table, self.baseline = prepare_latency_budget(model, example_inputs, self.options)

    def step(
        self,
        callback: StructuralCompressionCallback,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        goal: float,
    ) -> None:
        """One step to `speedup ** goal`, corrected by the last step's prediction error."""
        assert self.table is not None and self.baseline is not None, "prepare() runs in setup"
        target = callback.target_module(pl_module)
        inputs = find_example_inputs(trainer, pl_module)
        wanted = self.speedup**goal
        budget_s = self.table.network_dense_s / (wanted * self.correction)
        table, options, correction = self.table, self.options, self.correction
        allocation, budget_s = run_on_rank_zero(  # every rank edits the same
            trainer,
            lambda: plan_step(target, inputs, table, options, budget_s, correction),
            "PruningCallback's latency-budget plan",
        )
        self._apply(callback, trainer, pl_module, target, allocation, inputs)
        predicted_s = self.table.predict_model(target)
        baseline, environment, shape = self.baseline, table.environment, table.input_shape
        measured = run_on_rank_zero(
            trainer,
            lambda: measure_speedup(baseline, target, environment, shape, rounds=options.measure_rounds),
            "PruningCallback's side-by-side measurement",
        )
        predicted_speedup = self.table.network_dense_s / predicted_s
        error, self.correction = clipped_correction(predicted_speedup, measured.estimate)
        entry = step_entry(
            epoch=trainer.current_epoch,
            wanted_speedup=wanted,
            budget_s=budget_s,
            predicted_s=predicted_s,
            predicted_speedup=predicted_speedup,
            measured=measured,
            error=error,
            correction=self.correction,
            allocation=allocation,
        )
        self.history.append(entry)
        self._log(trainer, entry)

    def _apply(
        self,
        callback: StructuralCompressionCallback,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        target: nn.Module,
        allocation: Allocation,
        inputs: torch.Tensor,
    ) -> None:
        """Removes the planned blocks, then prunes to the planned widths: one edit (and record) each."""
        if allocation.removed_blocks:
            blocks = list(allocation.removed_blocks)
            callback.apply_edit(trainer, pl_module, lambda module: remove_blocks(module, blocks), example_inputs=inputs)
        if step_ratios(target, allocation):
            callback.apply_edit(
                trainer,
                pl_module,
                lambda module: prune_filters(
                    module,
                    ratios=step_ratios(module, allocation),
                    norm=2,
                    importance="group",
                    ignored_layers=self.options.ignored_layers,
                    example_inputs=inputs,
                ),
                example_inputs=inputs,
            )

    def _log(self, trainer: pl.Trainer, entry: dict[str, Any]) -> None:
        metrics = {
            f"compression/latency/{key}": float(entry[key])
            for key in ("wanted_speedup", "predicted_speedup", "measured_speedup", "prediction_error")
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rounds = ", ".join(f"{r:.2f}" for r in entry["measured_rounds"])
        log.info(
            "Latency-budget step at epoch %d: wanted %.2fx, predicted %.2fx, measured %.2fx (%s, rounds %s).",
            entry["epoch"],
            entry["wanted_speedup"],
            entry["predicted_speedup"],
            entry["measured_speedup"],
            self.table.environment.backend,
            rounds,
        )

    def report(self, trainer: pl.Trainer) -> None:
        """Writes `latency_budget.json` (target, table environment, every step) to the log dir and
        warns when the last measured speedup fell short of the target."""
        if not self.history or self.table is None:
            return
        log_dir = resolve_log_dir(trainer)  # every rank: a collective under DDP
        if not trainer.is_global_zero:
            return
        final = self.history[-1]["measured_speedup"]
        if final < self.speedup:
            log.warning("Latency-budget pruning measured %.2fx, short of the %.2fx target.", final, self.speedup)
        log_dir.mkdir(parents=True, exist_ok=True)
        summary = budget_summary(self.speedup, self.table, self.history)
        (log_dir / "latency_budget.json").write_text(json.dumps(summary, indent=1))

    def state_dict(self) -> dict[str, Any]:
        return {"correction": self.correction, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.correction = float(state.get("correction", 1.0))
        self.history = list(state.get("history", []))
