"""Latency-budget pruning schedule: options, planning and correction arithmetic (no Trainer).

`PruningCallback(target_speedup=...)` (through `callbacks/latency_budget.py`) measures (or reuses)
the latency table on the unpruned model (`prepare_latency_budget`, which refuses an unreachable
target), then at each scheduled epoch plans that step's widths and removed blocks
(`plan_step`), applies them, measures the whole model side by side against the unpruned baseline,
and corrects the next step's budget by the prediction's error (`clipped_correction`):

    budget_s = network_s / (wanted_speedup * correction),  correction = predicted_speedup / measured_speedup

so a table that is optimistic by 10% asks the next step for 10% more predicted speedup (the
correction is clipped to [1/2, 2] per step: one disturbed measurement must not derail the run).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from compresslight.compression.budget import METHODS, Allocation, BudgetProblem, allocate
from compresslight.compression.latency_table import LatencyTable
from compresslight.compression.runtime_model import BACKENDS
from compresslight.profiling.side_by_side import PairedSpeedup

log = logging.getLogger(__name__)

__all__ = [
    "MAX_CORRECTION",
    "LatencyBudgetOptions",
    "budget_summary",
    "clipped_correction",
    "plan_step",
    "prepare_latency_budget",
    "step_entry",
]

MAX_CORRECTION = 2.0


@dataclasses.dataclass(frozen=True)
class LatencyBudgetOptions:
    """The validated settings of a latency-budget schedule (named in errors as `PruningCallback`'s
    arguments: `latency_backend`, `latency_batch_size`, ...).

    Raises:
        ValueError: for neither or both targets, a target speedup <= 1 or latency <= 0, an unknown
            backend or allocation method, or a count < 1 (< 2 for grid points and rounds).
    """

    target_speedup: float | None = None
    target_latency_ms: float | None = None
    backend: str = "onnxruntime"
    batch_size: int = 1
    threads: int = 1
    table_path: str | None = None
    grid_points: int = 8
    iters: int = 50
    remove_blocks: bool = True
    allocation: str = "auto"
    measure_rounds: int = 3
    ignored_layers: Sequence[str] = ()

    def __post_init__(self) -> None:
        if (self.target_speedup is None) == (self.target_latency_ms is None):
            raise ValueError(
                "Give one of `target_speedup` and `target_latency_ms`, "
                f"got {self.target_speedup!r} and {self.target_latency_ms!r}."
            )
        if self.target_speedup is not None and not self.target_speedup > 1:
            raise ValueError(f"`target_speedup` must be > 1, got {self.target_speedup!r}.")
        if self.target_latency_ms is not None and not self.target_latency_ms > 0:
            raise ValueError(f"`target_latency_ms` must be > 0, got {self.target_latency_ms!r}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"`latency_backend` must be one of {list(BACKENDS)}, got {self.backend!r}.")
        if self.allocation not in METHODS:
            raise ValueError(f"`allocation` must be one of {list(METHODS)}, got {self.allocation!r}.")
        counts = {
            "latency_batch_size": self.batch_size,
            "latency_threads": self.threads,
            "latency_iters": self.iters,
            "measure_rounds": self.measure_rounds,
            "latency_grid_points": self.grid_points,
        }
        for name, value in counts.items():
            minimum = 2 if name in ("latency_grid_points", "measure_rounds") else 1  # an interval needs 2 rounds
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
        object.__setattr__(self, "ignored_layers", list(self.ignored_layers))

    @property
    def table_settings(self) -> dict[str, Any]:
        """`LatencyTable.load_or_build` keyword arguments."""
        return {
            "backend": self.backend,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "grid_points": self.grid_points,
            "iters": self.iters,
            "statistic": "min",  # the undisturbed latency: this runs on machines shared with training
        }

    def speedup(self, table: LatencyTable) -> float:
        """The target as a speedup over the unpruned model (`target_latency_ms` against the table's
        measured network)."""
        if self.target_speedup is not None:
            return self.target_speedup
        return table.network_dense_s * 1e3 / self.target_latency_ms


def prepare_latency_budget(
    model: nn.Module, example_inputs: torch.Tensor, options: LatencyBudgetOptions
) -> tuple[LatencyTable, nn.Module]:
    """Measures (or loads) the latency table on the unpruned `model`; returns it with a CPU copy of
    `model` (the side-by-side baseline of every step).

    Raises:
        ValueError: if the target is below the minimum reachable predicted latency (the message
            says the minimum).
    """
    inputs = example_inputs.detach().cpu()[:1]
    model_cpu = copy.deepcopy(model).cpu().eval()
    table = LatencyTable.load_or_build(options.table_path, model_cpu, inputs, **options.table_settings)
    problem = BudgetProblem.from_model(
        model_cpu, inputs, table, ignored_layers=options.ignored_layers, remove_blocks=options.remove_blocks
    )
    minimum_s = problem.latency_s(problem.minimum())
    speedup = options.speedup(table)
    if speedup <= 1:
        raise ValueError(
            f"`target_latency_ms`={options.target_latency_ms} is not below the unpruned model's "
            f"{table.network_dense_s * 1e3:.4g} ms: nothing to prune."
        )
    if table.network_dense_s / speedup < minimum_s:
        wanted = (
            f"`target_speedup`={options.target_speedup}"
            if options.target_speedup is not None
            else f"`target_latency_ms`={options.target_latency_ms}"
        )
        raise ValueError(
            f"{wanted} cannot be reached: the minimum reachable predicted latency is {minimum_s * 1e3:.4g} ms, a "
            f"speedup of {table.network_dense_s / minimum_s:.3g}x over the unpruned "
            f"{table.network_dense_s * 1e3:.4g} ms ({table.environment.backend}, batch "
            f"{table.environment.batch_size}, {table.environment.threads} threads"
            f"{'' if options.remove_blocks else ', `remove_blocks` off'})."
        )
    return table, model_cpu


def plan_step(
    model: nn.Module,
    example_inputs: torch.Tensor,
    table: LatencyTable,
    options: LatencyBudgetOptions,
    budget_s: float,
    correction: float,
) -> tuple[Allocation, float]:
    """The allocation of one step's `budget_s` on `model` as it is now, and the budget used (raised
    to the minimum reachable latency when below it, with a warning)."""
    problem = BudgetProblem.from_model(
        model, example_inputs, table, ignored_layers=options.ignored_layers, remove_blocks=options.remove_blocks
    )
    minimum_s = problem.latency_s(problem.minimum())
    if budget_s < minimum_s:
        log.warning(
            "Latency budget %.3f ms (corrected by the measured error %.3f) is below the minimum reachable "
            "%.3f ms: pruning to the minimum.",
            budget_s * 1e3,
            correction,
            minimum_s * 1e3,
        )
        budget_s = minimum_s
    return allocate(problem, budget_s, method=options.allocation), budget_s


def clipped_correction(predicted_speedup: float, measured_speedup: float) -> tuple[float, float]:
    """The prediction error (predicted / measured speedup) and the next step's correction: the error
    clipped to [1 / MAX_CORRECTION, MAX_CORRECTION] (logged when it binds).

    One disturbed measurement on a shared machine must not derail the schedule.
    """
    error = predicted_speedup / measured_speedup
    correction = min(max(error, 1 / MAX_CORRECTION), MAX_CORRECTION)
    if correction != error:
        log.warning("Prediction error %.3f clipped to %.3f for the next step's budget.", error, correction)
    return error, correction


def step_entry(
    *,
    epoch: int,
    wanted_speedup: float,
    budget_s: float,
    predicted_s: float,
    predicted_speedup: float,
    measured: PairedSpeedup,
    error: float,
    correction: float,
    allocation: Allocation,
) -> dict[str, Any]:
    """One step of the schedule's history (JSON-able: kept in checkpoints and `latency_budget.json`)."""
    return {
        "epoch": epoch,
        "wanted_speedup": wanted_speedup,
        "budget_ms": budget_s * 1e3,
        "predicted_ms": predicted_s * 1e3,
        "predicted_speedup": predicted_speedup,
        "measured_speedup": measured.estimate,
        "measured_interval": [measured.low, measured.high],
        "measured_verdict": measured.verdict,
        "measured_rounds": measured.round_speedups,
        "prediction_error": error,
        "correction": correction,
        "removed_blocks": list(allocation.removed_blocks),
        "kept": dict(allocation.kept),
        "allocation": allocation.method,
    }


def budget_summary(speedup: float, table: LatencyTable, history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The content of `latency_budget.json`: target, table environment and every step."""
    return {
        "target_speedup": speedup,
        "environment": table.to_dict()["environment"],
        "network_ms": table.network_dense_s * 1e3,
        "steps": list(history),
    }
