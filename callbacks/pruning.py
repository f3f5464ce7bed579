"""`PruningCallback`: structured filter pruning that really removes channels, on a schedule.

Schedules (all expressible in YAML):

- one-shot (`epochs: [0]`, the default): applied in `setup`, before optimizers and DDP exist —
  papers 000/002's "compress a trained baseline (`--model.init_from`), then fine-tune";
- iterative at a list of epochs with cumulative targets (`epochs: [2, 4, 6]`,
  `targets: [0.1, 0.2, 0.25]`, fractions of the original channels removed by each step);
- Distiller-style (`start_epoch`, `end_epoch`, `frequency`, `ramp: constant | agp`): the target
  rises to `amount` (or to each group's ratio) in equal steps ("constant") or along the cubic
  automated-gradual-pruning ramp of Zhu & Gupta 2017 ("agp").

`mode: unstructured` zeroes individual weights by magnitude instead (what Lightning's
`ModelPruning` does): masks are kept through training and made permanent at the end. It is
there for comparison: it removes no channel, so the profile shows it buys no speed.

The algorithms are `compresslight.compression.pruning` (with its validated `PruningOptions`),
`compresslight.compression.schedules` and `compresslight.compression.unstructured`; the Trainer
plumbing (optimizer rebuild, DDP, records in checkpoints, logging) is `StructuralCompressionCallback`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from compresslight.callbacks.latency_budget import LatencyBudget
from compresslight.callbacks.structural_edit import StructuralCompressionCallback, find_example_inputs
from typing_extensions import override

from compresslight import lightning_compat as pl
from compresslight.compression.latency_budget import LatencyBudgetOptions
from compresslight.compression.pruning import PruningOptions, match_ratios, prune_filters
from compresslight.compression.pruning_graph import prunable_groups
from compresslight.compression.schedules import PruningSchedule, final_group_ratios, step_ratios_toward
from compresslight.compression.unstructured import (
    fold_pruning_masks,
    make_pruning_permanent,
    prune_unstructured,
    sparsity,
)

log = logging.getLogger(__name__)


class PruningCallback(StructuralCompressionCallback):
    """Prunes filters (or weights) of the LightningModule's model at scheduled epochs.

    Args:
        amount: fraction of the channels of every prunable conv to remove, in [0, 1)
            (paper 000: 0.125 or 0.25). The final target of a multi-step schedule.
        ratios: layer-name glob pattern -> fraction, e.g. `{"layer1.*.conv1": 0.7}` (paper 002's
            groups). Layers matching no pattern use `amount` (or are left alone if it is None).
        norm: 1 or 2: the filter-norm ranking (paper 002: L1; paper 000: L2).
        importance: "group" ranks a channel by the mean norm over every layer coupled to it
            (torch-pruning's default); "filter" by the pruned layer's own filter norm only, as
            Distiller's `L1RankedStructureParameterPruner` (paper 002) and Li et al. do.
        round_to: keep channel counts multiples of this (hardware-friendly widths).
        ignored_layers: glob patterns of layers never pruned (the classifier's outputs never are).
        epochs: epochs at whose start to prune; 0 means once in `setup`, before training.
        targets: cumulative fraction of the final target reached at each of `epochs` (default:
            the ramp), e.g. `[0.5, 1.0]`; multiplies `amount` and each ratio.
        start_epoch: first pruning epoch of a Distiller-style schedule (instead of `epochs`).
        end_epoch: last pruning epoch of that schedule.
        frequency: epochs between its steps.
        ramp: "constant" (equal increments) or "agp" (cubic, fast first) when `targets` is None.
        mode: "structured" (remove channels) or "unstructured" (zero weights, for comparison).
        module_path: the submodule to prune (see `StructuralCompressionCallback`).
        target_speedup: prune to this *measured* speedup instead of a ratio (latency-budget
            pruning, `compresslight.compression.budget`): each of `epochs` is a step toward it
            (`targets` as fractions of the log-speedup), every group's width and which residual
            blocks to remove chosen on a latency table measured on this machine.
        target_latency_ms: the target as a latency instead (a speedup over the unpruned model's
            latency measured for the table); give this or `target_speedup`.
        latency_backend: "torch" or "onnxruntime": where the latency is measured.
        latency_batch_size: batch size of the latency measurements.
        latency_threads: CPU threads of the latency measurements.
        latency_table: JSON file of the latency table, reused when it was measured for this model
            and environment (None: measured each run, not saved).
        latency_grid_points: widths measured per channel dimension.
        latency_iters: timed calls per latency measurement.
        remove_blocks: whether a residual block may become its shortcut.
        allocation: "auto", "dp" or "greedy" (`compresslight.compression.budget.allocate`).
        measure_rounds: alternating rounds of the after-step measurement against the baseline.

    Raises:
        ValueError: for a ratio outside [0, 1), an unknown norm, importance, ramp or mode, or an
            inconsistent schedule.
    """

    def __init__(
        self,
        amount: float | None = None,
        ratios: Mapping[str, float] | None = None,
        norm: int = 2,
        importance: Literal["group", "filter"] = "group",
        round_to: int | None = None,
        ignored_layers: Sequence[str] = (),
        epochs: Sequence[int] | None = None,
        targets: Sequence[float] | None = None,
        start_epoch: int | None = None,
        end_epoch: int | None = None,
        frequency: int = 1,
        ramp: Literal["constant", "agp"] = "constant",
        mode: Literal["structured", "unstructured"] = "structured",
        module_path: str | None = None,
        target_speedup: float | None = None,
        target_latency_ms: float | None = None,
        latency_backend: Literal["torch", "onnxruntime"] = "onnxruntime",
        latency_batch_size: int = 1,
        latency_threads: int = 1,
        latency_table: str | None = None,
        latency_grid_points: int = 8,
        latency_iters: int = 50,
        remove_blocks: bool = True,
        allocation: Literal["auto", "dp", "greedy"] = "auto",
        measure_rounds: int = 3,
    ) -> None:
        super().__init__(module_path=module_path)
        self.latency_budget: LatencyBudget | None = None
        if target_speedup is not None or target_latency_ms is not None:
            if amount is not None or ratios or mode != "structured":
                raise ValueError(
                    "`target_speedup` / `target_latency_ms` choose the widths themselves: give neither `amount` nor "
                    f"`ratios` and keep `mode`='structured', got amount={amount!r}, ratios={ratios!r}, mode={mode!r}."
                )
            options = LatencyBudgetOptions(
                target_speedup=target_speedup,
                target_latency_ms=target_latency_ms,
                backend=latency_backend,
                batch_size=latency_batch_size,
                threads=latency_threads,
                table_path=latency_table,
                grid_points=latency_grid_points,
                iters=latency_iters,
                remove_blocks=remove_blocks,
                allocation=allocation,
                measure_rounds=measure_rounds,
                ignored_layers=ignored_layers,
            )
            self.latency_budget = LatencyBudget(options)
        elif amount is None and not ratios:
            raise ValueError(
                "PruningCallback needs `amount` or `ratios` (or a latency target: `target_speedup`, "
                "`target_latency_ms`), got none."
            )
        self.options = PruningOptions(
            amount=amount,
            ratios=ratios or {},
            norm=norm,
            round_to=round_to,
            ignored_layers=ignored_layers,
            importance=importance,
        )
        if mode not in ("structured", "unstructured"):
            raise ValueError(f"`mode` must be 'structured' or 'unstructured', got {mode!r}.")
        if mode == "unstructured" and ratios:
            raise ValueError("`ratios` (per-group structured pruning) cannot be used with `mode`='unstructured'.")
        self.mode = mode
        self.schedule = PruningSchedule.build(epochs, targets, start_epoch, end_epoch, frequency, ramp)
        self.completed_epochs: list[int] = []
        # Prunable layer -> (original width, final ratio), fixed at the first step.
        self.original_channels: dict[str, tuple[int, float]] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            module_path=self.module_path, amount=self.options.amount, ratios=self.options.ratios
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.latency_budget is not None and stage == "fit":
            # Measured on the unpruned model, before any edit; an unreachable target fails here.
            self.latency_budget.prepare(self.target_module(pl_module), find_example_inputs(trainer, pl_module))
        # On resume, a restored checkpoint replaces this edit with its own records (see
        # `StructuralCompressionCallback`), and the restored state marks epoch 0 done.
        if stage == "fit" and 0 in self.schedule.epochs and 0 not in self.completed_epochs:
            self._prune(trainer, pl_module, 0)
        elif stage == "fit" and self.options.ratios:
            # A pattern that matches nothing fails now, not after the epochs before the first pruning one.
            inputs = find_example_inputs(trainer, pl_module)
            groups = prunable_groups(self.target_module(pl_module), inputs, self.options.ignored_layers)
            match_ratios(self.options.ratios, [name for group in groups for name in group])

    @override
    def pending_epochs(self, trainer: pl.Trainer) -> list[int]:
        return [epoch for epoch in self.schedule.epochs if epoch not in self.completed_epochs]

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch in self.schedule.epochs and epoch not in self.completed_epochs:
            self._prune(trainer, pl_module, epoch)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "unstructured":
            make_pruning_permanent(self.target_module(pl_module))
        if self.latency_budget is not None:
            self.latency_budget.report(trainer)

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        target = self.target_module(pl_module)
        goal = self.schedule(epoch)
        if self.mode == "unstructured":
            prune_unstructured(target, amount=self.options.amount * goal)  # weight magnitude: the norm is moot
            sparsity_now = sparsity(target)
            for logger in trainer.loggers:
                logger.log_metrics({"compression/sparsity": sparsity_now}, step=trainer.global_step)
            log.info("Unstructured pruning at epoch %d: sparsity %.3f.", epoch, sparsity_now)
        elif self.latency_budget is not None:
            self.latency_budget.step(self, trainer, pl_module, goal)
        else:
            inputs = find_example_inputs(trainer, pl_module)
            if not self.original_channels:
                groups = prunable_groups(target, inputs, self.options.ignored_layers)
                self.original_channels = final_group_ratios(target, groups, self.options.ratios, self.options.amount)
            ratios = step_ratios_toward(target, self.original_channels, goal)
            if ratios:
                step = dataclasses.replace(self.options, amount=None, ratios=ratios)
                self.apply_edit(
                    trainer,
                    pl_module,
                    lambda module: prune_filters(module, example_inputs=inputs, **step.to_dict()),
                    example_inputs=inputs,
                )
        self.completed_epochs.append(epoch)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "completed_epochs": list(self.completed_epochs),
            "original_channels": {name: list(value) for name, value in self.original_channels.items()},
            **({"latency_budget": self.latency_budget.state_dict()} if self.latency_budget is not None else {}),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.completed_epochs = sorted(set(self.completed_epochs) | set(state_dict.get("completed_epochs", [])))
        self.original_channels = {
            name: (int(width), float(ratio)) for name, (width, ratio) in state_dict.get("original_channels", {}).items()
        }
        if self.latency_budget is not None and "latency_budget" in state_dict:
            self.latency_budget.load_state_dict(state_dict["latency_budget"])

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)  # refuses non-finite weights
        if self.mode == "unstructured":
            # Save plain weights (mask applied), loadable by a model without pruning hooks.
            checkpoint["state_dict"] = fold_pruning_masks(checkpoint["state_dict"])
