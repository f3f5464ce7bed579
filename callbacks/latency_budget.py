"""Latency-budget steps of `PruningCallback` (`target_speedup` / `target_latency_ms`).

The Trainer side of `compresslight.compression.budget`: measures (or reuses) the latency table on
the unpruned model in `setup` and refuses an unreachable target there; at each scheduled epoch
allocates widths and removed blocks for that step's budget, applies them through
`StructuralCompressionCallback.apply_edit` (block removal, then channel pruning: two records),
then measures the whole model against the unpruned baseline side by side
(`compresslight.profiling.side_by_side`: alternating rounds, paired ratios), and corrects
the next step's budget by the prediction's error:

    budget_s = network_s / (wanted_speedup * correction),  correction = predicted_speedup / measured_speedup

so a table that is optimistic by 10% asks the next step for 10% more predicted speedup (the
correction is clipped to [1/2, 2] per step: one disturbed measurement must not derail the run).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from compresslight.callbacks.structural_edit import find_example_inputs
from torch import nn

from compresslight import lightning_compat as pl
from compresslight.compression.budget import METHODS, Allocation, BudgetProblem, allocate, step_ratios
from compresslight.compression.depth import remove_blocks
from compresslight.compression.latency_table import LatencyTable, measure_speedup
from compresslight.compression.pruning import prune_filters
from compresslight.compression.runtime_model import BACKENDS

if TYPE_CHECKING:
    from compresslight.callbacks.structural_edit import StructuralCompressionCallback

log = logging.getLogger(__name__)

MAX_CORRECTION = 2.0


class LatencyBudget:
    """Target, table and correction of one latency-budget pruning schedule (see module docstring).

    Raises:
        ValueError: for neither or both targets, a target speedup <= 1 or latency <= 0, an unknown
            backend or allocation method, or a count < 1.
    """

    def __init__(
        self,
        *,
        target_speedup: float | None,
        target_latency_ms: float | None,
        backend: str,
        batch_size: int,
        threads: int,
        table_path: str | None,
        grid_points: int,
        iters: int,
        remove_blocks: bool,
        allocation: str,
        measure_rounds: int,
        ignored_layers: list[str],
    ) -> None:
        if (target_speedup is None) == (target_latency_ms is None):
            raise ValueError(
                "Give one of `target_speedup` and `target_latency_ms`, "
                f"got {target_speedup!r} and {target_latency_ms!r}."
            )
        if target_speedup is not None and not target_speedup > 1:
            raise ValueError(f"`target_speedup` must be > 1, got {target_speedup!r}.")
        if target_latency_ms is not None and not target_latency_ms > 0:
            raise ValueError(f"`target_latency_ms` must be > 0, got {target_latency_ms!r}.")
        if backend not in BACKENDS:
            raise ValueError(f"`latency_backend` must be one of {list(BACKENDS)}, got {backend!r}.")
        if allocation not in METHODS:
            raise ValueError(f"`allocation` must be one of {list(METHODS)}, got {allocation!r}.")
        counts = {
            "latency_batch_size": batch_size,
            "latency_threads": threads,
            "latency_iters": iters,
            "measure_rounds": measure_rounds,
            "latency_grid_points": grid_points,
        }
        for name, value in counts.items():
            minimum = 2 if name in ("latency_grid_points", "measure_rounds") else 1  # an interval needs 2 rounds
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
        self.target_speedup = target_speedup
        self.target_latency_ms = target_latency_ms
        self.table_settings = {
            "backend": backend,
            "batch_size": batch_size,
            "threads": threads,
            "grid_points": grid_points,
            "iters": iters,
            "statistic": "min",  # the undisturbed latency: this runs on machines shared with training
        }
        self.table_path = table_path
        self.remove_blocks = remove_blocks
        self.allocation = allocation
        self.measure_rounds = measure_rounds
        self.ignored_layers = ignored_layers
        self.table: LatencyTable | None = None
        self.baseline: nn.Module | None = None
        self.correction = 1.0  # predicted / measured speedup of the last step, clipped
        self.history: list[dict[str, Any]] = []

    @property
    def speedup(self) -> float:
        """The target as a speedup over the unpruned model (`target_latency_ms` against the table's
        measured network)."""
        if self.target_speedup is not None:
            return self.target_speedup
        assert self.table is not None, "prepare() first"
        return self.table.network_dense_s * 1e3 / self.target_latency_ms

    def prepare(self, model: nn.Module, example_inputs: torch.Tensor) -> None:
        """Measures (or loads) the table on the unpruned `model` and keeps a copy as the baseline.

        Raises:
            ValueError: if the target is below the minimum reachable predicted latency (the message
                says the minimum).
        """
        if self.table is not None:
            return
        inputs = example_inputs.detach().cpu()[:1]
        model_cpu = copy.deepcopy(model).cpu().eval()
        self.table = LatencyTable.load_or_build(self.table_path, model_cpu, inputs, **self.table_settings)
        problem = BudgetProblem.from_model(
            model_cpu, inputs, self.table, ignored_layers=self.ignored_layers, remove_blocks=self.remove_blocks
        )
        minimum_s = problem.latency_s(problem.minimum())
        if self.speedup <= 1:
            raise ValueError(
                f"`target_latency_ms`={self.target_latency_ms} is not below the unpruned model's "
                f"{self.table.network_dense_s * 1e3:.4g} ms: nothing to prune."
            )
        if self.table.network_dense_s / self.speedup < minimum_s:
            wanted = (
                f"`target_speedup`={self.target_speedup}"
                if self.target_speedup is not None
                else f"`target_latency_ms`={self.target_latency_ms}"
            )
            raise ValueError(
                f"{wanted} cannot be reached: the minimum reachable predicted latency is {minimum_s * 1e3:.4g} ms, a "
                f"speedup of {self.table.network_dense_s / minimum_s:.3g}x over the unpruned "
                f"{self.table.network_dense_s * 1e3:.4g} ms ({self.table.environment.backend}, batch "
                f"{self.table.environment.batch_size}, {self.table.environment.threads} threads"
                f"{'' if self.remove_blocks else ', `remove_blocks` off'})."
            )
        self.baseline = model_cpu

    def step(
        self,
        callback: StructuralCompressionCallback,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        goal: float,
    ) -> None:
        """One step to `speedup ** goal`, corrected by the last step's prediction error."""
        assert self.table is not None and self.baseline is not None, "prepare() runs in setup"
        table = self.table
        target = callback.target_module(pl_module)
        inputs = find_example_inputs(trainer, pl_module)
        wanted = self.speedup**goal
        budget_s = table.network_dense_s / (wanted * self.correction)
        allocation: Allocation | None = None
        if trainer.is_global_zero:
            problem = BudgetProblem.from_model(
                target, inputs, table, ignored_layers=self.ignored_layers, remove_blocks=self.remove_blocks
            )
            minimum_s = problem.latency_s(problem.minimum())
            if budget_s < minimum_s:
                log.warning(
                    "Latency budget %.3f ms (corrected by the measured error %.3f) is below the minimum reachable "
                    "%.3f ms: pruning to the minimum.",
                    budget_s * 1e3, self.correction, minimum_s * 1e3,
                )  # fmt: skip
                budget_s = minimum_s
            allocation = allocate(problem, budget_s, method=self.allocation)
        allocation = trainer.strategy.broadcast(allocation, src=0)  # every rank edits the same
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
                    ignored_layers=self.ignored_layers,
                    example_inputs=inputs,
                ),
                example_inputs=inputs,
            )
        predicted_s = table.predict_model(target)
        measured = None
        if trainer.is_global_zero:
            measured = measure_speedup(
                self.baseline, target, table.environment, table.input_shape, rounds=self.measure_rounds
            )
        measured = trainer.strategy.broadcast(measured, src=0)
        measured_speedup, rounds = measured.estimate, measured.round_speedups
        predicted_speedup = table.network_dense_s / predicted_s
        error = predicted_speedup / measured_speedup
        # One disturbed measurement on a shared machine must not derail the schedule: correct by
        # at most a factor MAX_CORRECTION per step (logged when it binds).
        self.correction = min(max(error, 1 / MAX_CORRECTION), MAX_CORRECTION)
        if self.correction != error:
            log.warning("Prediction error %.3f clipped to %.3f for the next step's budget.", error, self.correction)
        entry = {
            "epoch": trainer.current_epoch,
            "wanted_speedup": wanted,
            "budget_ms": budget_s * 1e3,
            "predicted_ms": predicted_s * 1e3,
            "predicted_speedup": predicted_speedup,
            "measured_speedup": measured_speedup,
            "measured_interval": [measured.low, measured.high],
            "measured_verdict": measured.verdict,
            "measured_rounds": rounds,
            "prediction_error": error,
            "correction": self.correction,
            "removed_blocks": list(allocation.removed_blocks),
            "kept": dict(allocation.kept),
            "allocation": allocation.method,
        }
        self.history.append(entry)
        metrics = {
            f"compression/latency/{key}": float(entry[key])
            for key in ("wanted_speedup", "predicted_speedup", "measured_speedup", "prediction_error")
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        log.info(
            "Latency-budget step at epoch %d: wanted %.2fx, predicted %.2fx, measured %.2fx (%s, rounds %s).",
            trainer.current_epoch, wanted, predicted_speedup, measured_speedup, table.environment.backend,
            ", ".join(f"{r:.2f}" for r in rounds),
        )  # fmt: skip

    def report(self, trainer: pl.Trainer) -> None:
        """Writes `latency_budget.json` (target, table environment, every step) to the log dir and
        warns when the last measured speedup fell short of the target."""
        if not self.history or self.table is None:
            return
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # every rank: a collective under DDP
        if not trainer.is_global_zero:
            return
        final = self.history[-1]["measured_speedup"]
        if final < self.speedup:
            log.warning("Latency-budget pruning measured %.2fx, short of the %.2fx target.", final, self.speedup)
        log_dir.mkdir(parents=True, exist_ok=True)
        summary = {
            "target_speedup": self.speedup,
            "environment": self.table.to_dict()["environment"],
            "network_ms": self.table.network_dense_s * 1e3,
            "steps": self.history,
        }
        (log_dir / "latency_budget.json").write_text(json.dumps(summary, indent=1))

    def state_dict(self) -> dict[str, Any]:
        return {"correction": self.correction, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.correction = float(state.get("correction", 1.0))
        self.history = list(state.get("history", []))
