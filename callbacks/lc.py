"""`LCCallback`: low-rank compression that learns each layer's rank with the LC algorithm (paper 003).

One `fit` runs paper 003's pipeline on a trained network (start from a baseline with
`--model.init_from`): T L steps, a C step at the start of the epoch after each, the factorization,
then fine-tuning. The algorithm is `compression.lc.LowRankLC`; when each step happens, the options
and the report are in `compression.lc_schedule`. This callback places them in the Trainer's hooks:

- the penalty gradient is added in `on_before_optimizer_step`, once per optimizer step, after
  Lightning has accumulated the micro-batches' gradients and unscaled them under mixed precision
  (after each `backward` it would count `accumulate_grad_batches` times, on still-scaled gradients);
- C steps and a runtime-model measurement run on rank 0 and are broadcast;
- the factorization is a structural edit (`apply_edit`): a replayable `LowRankRecord`.

Logged per C step: `lc/...` metrics (`LCReport.metrics`) and a line of `lc_log.jsonl` in the log
dir. The algorithm's state is in `state_dict`: a fit resumes mid-algorithm.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from compresslight.callbacks._trainer import append_jsonl, run_on_rank_zero
from compresslight.callbacks.structural_edit import (
    StructuralCompressionCallback,
    find_example_inputs,
    rebuild_optimizers,
)
from torch import nn
from typing_extensions import override

from compresslight import lightning_compat as pl
from compresslight.compression.lc import LCState, LCStepReport, LowRankLC, RankCost
from compresslight.compression.lc_schedule import (
    COSTS,
    LCOptions,
    LCReport,
    RuntimeMeasurement,
    c_step_due,
    calibrate_lam,
    cpu_state_dict,
    make_cost,
    select_layers,
)
from compresslight.compression.runtime_model import RuntimeModel
from compresslight.lightning_compat import rank_zero_only

log = logging.getLogger(__name__)

LOG_FILE = "lc_log.jsonl"

__all__ = ["COSTS", "LCCallback"]


class LCCallback(StructuralCompressionCallback):
    """Learns per-layer ranks and low-rank weights with the LC algorithm, then factorizes and fine-tunes.

    The arguments are detailed, and validated, by `LCOptions` and `RuntimeMeasurement`.

    Args:
        lam: `lambda` of paper 003 eq. 3, the weight of the cost (>= 0; paper 003: 5e-3..2e-2, ms).
            Give it or `latency_target`.
        cost: `"runtime"` (measured device runtime, paper 003), `"flops"` (MACs) or `"storage"` (parameters).
        runtime_model: JSON file of `cli.py runtime-model` (cost "runtime"); without one it is measured
            on `runtime_device` when the fit starts and written to `runtime_model.json` in the log dir.
        mu_init: `a` of `mu_t = a * b^t` (> 0). Paper 003: 1e-5 (VGG16), 1e-4 (AlexNet).
        mu_growth: `b` (>= 1). Paper 003: 1.2.
        steps: T, the number of L/C steps (>= 1). Paper 003: 60 (VGG16), 30 (AlexNet).
        epochs_per_step: epochs of each L step (>= 1). Paper 003: 20 (VGG16), 5 (AlexNet).
        tolerance: stop the L/C steps early once `||W - Theta||` <= this (0: run all T steps).
        restart_lr: fresh optimizers and LR schedulers (initial lr, no momentum) at the start of every
            L step and of the fine-tuning, as the LC toolbox's `restart_on_l`; else the schedule runs on.
        augmented_lagrangian: Lagrange multipliers (paper 003's practice) on top of the quadratic penalty.
        layers: glob patterns of the layers to compress (default: every `nn.Linear` and `nn.Conv2d`
            with `groups == 1`; the C step keeps a layer dense where its factorized form costs more).
        ignored_layers: glob patterns of layers never compressed.
        runtime_device: the device whose runtime is optimized (default: the Trainer's root device).
        check_device: refuse a loaded runtime model measured on another device (False: e.g. one
            measured on the deployment target).
        threads: CPU threads of the runtime model (measured with, or required of a loaded one;
            default: torch's setting when measuring, any when loading).
        batch_size: its batch size (default: 1 when measuring, paper 003; any when loading).
        backend: `"torch"` or `"onnxruntime"` (default: `"torch"` when measuring; any when loading).
        grid_points: ranks measured per layer when measuring a runtime model (>= 2).
        measure_iters: timed calls per measurement when measuring a runtime model (>= 1).
        statistic: `"min"` (default: robust on a shared machine) or `"median"` latency per measurement.
        module_path: the submodule to compress (see `StructuralCompressionCallback`).
        latency_target: instead of `lam`: the fraction (0, 1] of the dense layers' predicted latency
            that the first C step aims at. `lam` is calibrated to it when LC starts (`calibrate_lam`;
            logged as `lc/lam`, kept in checkpoints) with a runtime model whatever the cost, so runs
            with the runtime and the FLOPs cost aim at one latency (paper 003 compares them there).

    Attributes:
        options: the validated `LCOptions`; measurement: the `RuntimeMeasurement`.
        lc, lc_state: the algorithm (`LowRankLC`) and its state, built when training starts; None once factorized.
        compressed: whether the network has been factorized.
        report: the `LCReport` (C steps, final ranks); `history` and `final_ranks` are its entries.
        runtime_model: the `RuntimeModel` pricing the ranks (cost "runtime") or calibrating `lam`.
        lam: the `lam` in use: the given one, or the one calibrated to `latency_target`.
        measured_runtime_model: the runtime model measured by this callback, as plain data (kept
            in checkpoints so a resumed fit prices ranks as before); None if loaded from a file.

    Raises:
        ValueError: for a value out of range, an unknown cost/backend/statistic, a runtime model
            file with another cost, or an unreadable runtime model file.
        FileNotFoundError: if `runtime_model` does not exist.
    """

    def __init__(
        self,
        lam: float | None = None,
        cost: Literal["runtime", "flops", "storage"] = "runtime",
        runtime_model: str | None = None,
        mu_init: float = 1e-5,
        mu_growth: float = 1.2,
        steps: int = 60,
        epochs_per_step: int = 20,
        tolerance: float = 0.0,
        restart_lr: bool = False,
        augmented_lagrangian: bool = True,
        layers: Sequence[str] | None = None,
        ignored_layers: Sequence[str] = (),
        runtime_device: str | None = None,
        check_device: bool = True,
        threads: int | None = None,
        batch_size: int | None = None,
        backend: Literal["torch", "onnxruntime"] | None = None,
        grid_points: int = 8,
        measure_iters: int = 50,
        statistic: Literal["min", "median"] = "min",
        module_path: str | None = None,
        latency_target: float | None = None,
    ) -> None:
        super().__init__(module_path=module_path)
        self.options = LCOptions(
            lam=lam,
            cost=cost,
            mu_init=mu_init,
            mu_growth=mu_growth,
            steps=steps,
            epochs_per_step=epochs_per_step,
            tolerance=tolerance,
            augmented_lagrangian=augmented_lagrangian,
            runtime_model=runtime_model,
            layers=None if layers is None else list(layers),
            ignored_layers=list(ignored_layers),
            latency_target=latency_target,
        )
        self.measurement = RuntimeMeasurement(
            threads=threads,
            batch_size=batch_size,
            backend=backend,
            grid_points=grid_points,
            iters=measure_iters,
            statistic=statistic,
            check_device=check_device,
        )
        # Read now: a missing or malformed file fails when the config is parsed, not hours later.
        self.loaded_runtime_model = RuntimeModel.load(runtime_model) if runtime_model is not None else None
        self.restart_lr = restart_lr
        self.runtime_device = runtime_device

        self.layer_names: list[str] = []
        self.lc: LowRankLC | None = None
        self.lc_state: LCState | None = None
        self.compressed = False
        self.report = LCReport()
        self.runtime_model: RuntimeModel | None = None  # the one in use (loaded, measured or restored)
        self.lam: float | None = self.options.lam  # calibrated in `on_train_start` for a latency_target
        self.measured_runtime_model: dict[str, Any] | None = None  # measured here, kept in checkpoints
        self._restored_lc_state: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        key = {"module_path": self.module_path, "cost": self.options.cost, "lam": self.options.lam}
        if self.options.latency_target is not None:  # absent otherwise: earlier checkpoints keep their key
            key["latency_target"] = self.options.latency_target
        return self._generate_state_key(**key)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per C step (its epoch, mu, ranks, cost, distance, seconds)."""
        return self.report.c_steps

    @property
    def final_ranks(self) -> dict[str, int]:
        """Rank of every factorized layer (layers kept dense are absent)."""
        return self.report.final_ranks

    # --- setup: validate everything that can be, before any training ----------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        max_epochs, lc_epochs = trainer.max_epochs, self.options.lc_epochs
        if stage == "fit" and max_epochs is not None and 0 <= max_epochs <= lc_epochs:
            raise ValueError(
                f"LCCallback needs `trainer.max_epochs` > `steps` x `epochs_per_step` = {self.options.steps} x "
                f"{self.options.epochs_per_step} = {lc_epochs} (the L steps; the epochs after them fine-tune the "
                f"factorized network), got max_epochs={max_epochs}."
            )
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        target = self.target_module(pl_module)
        self.layer_names = select_layers(target, self.options.layers, self.options.ignored_layers)
        if self.loaded_runtime_model is not None:
            self._check_runtime_model(self.loaded_runtime_model, trainer, pl_module)

    def _device(self, trainer: pl.Trainer) -> torch.device:
        return torch.device(self.runtime_device) if self.runtime_device is not None else trainer.strategy.root_device

    def _check_runtime_model(
        self, runtime_model: RuntimeModel, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        inputs = find_example_inputs(trainer, pl_module)
        target = self.target_module(pl_module)
        self.measurement.check(runtime_model, target, inputs, self.layer_names, self._device(trainer))

    # --- start: the cost and the algorithm, once any checkpoint has been restored --------------

    @override
    def pending_epochs(self, trainer: pl.Trainer) -> list[int]:
        return [] if self.compressed else [self.options.lc_epochs]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # After restore: a resumed fit brings the LC state (and a runtime model measured earlier),
        # or says the network is already factorized.
        if self.compressed:
            log.info("LCCallback: the network was factorized before this checkpoint; fine-tuning continues.")
            return
        target = self.target_module(pl_module)
        inputs = find_example_inputs(trainer, pl_module)
        if self.options.needs_runtime_model:
            self.runtime_model = self._runtime_model(trainer, pl_module, target, inputs)
        cost = make_cost(self.options.cost, target, inputs, self.layer_names, self.runtime_model)
        if self.lam is None:  # a latency_target, not yet calibrated (a resumed fit restores its lam)
            self.lam = self._calibrate_lam(trainer, target, cost)
        self.lc = self.options.algorithm(target, cost, self.layer_names, lam=self.lam)
        previous = self._restored_lc_state
        if previous is None and self.lc_state is not None:
            previous = self.lc_state.state_dict()  # another `fit` with this callback: carry on
        self.lc_state = self.lc.init_state(target)
        if previous is not None:
            self.lc_state.load_state_dict(previous)
            self._restored_lc_state = None
            log.info("LCCallback: resumed at C step %d (mu=%.3g).", self.lc_state.step, self.lc_state.mu)

    def _calibrate_lam(self, trainer: pl.Trainer, target: nn.Module, cost: RankCost) -> float:
        """`lam` for the latency target, on rank 0 and broadcast (every rank must penalize alike)."""
        assert self.runtime_model is not None and self.options.latency_target is not None

        def calibrate() -> dict[str, float]:
            mu = self.options.mu_init  # the first C step's mu
            found = calibrate_lam(target, self.layer_names, cost, self.runtime_model, mu, self.options.latency_target)
            return found.to_dict()

        found = run_on_rank_zero(trainer, calibrate, "LCCallback's lam calibration")
        self._log_lam_calibration(trainer, found)
        return float(found["lam"])

    @rank_zero_only
    def _log_lam_calibration(self, trainer: pl.Trainer, found: dict[str, float]) -> None:
        log.info(
            "LCCallback: lam=%.4g aims the first C step at %.2f ms, %.0f%% of the dense layers' %.2f ms "
            "(latency_target %.2f).",
            found["lam"], found["predicted_s"] * 1e3, 100 * found["predicted_s"] / found["dense_s"],
            found["dense_s"] * 1e3, found["target"],
        )  # fmt: skip
        self._emit(trainer, {"lc/lam": found["lam"]}, {"event": "lam_calibration", **found})

    def _runtime_model(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: nn.Module, inputs: torch.Tensor
    ) -> RuntimeModel:
        """The loaded runtime model, the one measured before the checkpoint we resume from, or a new
        measurement on rank 0 (ranks measuring at once would disturb each other)."""
        if self.loaded_runtime_model is not None:
            return self.loaded_runtime_model
        if self.measured_runtime_model is not None:
            runtime_model = RuntimeModel.from_dict(self.measured_runtime_model)
            self._check_runtime_model(runtime_model, trainer, pl_module)
            return runtime_model
        progress = None if trainer.progress_bar_callback is not None else False

        def measure() -> tuple[dict[str, Any], float]:
            started = time.perf_counter()
            built = self.measurement.measure(target, inputs, self.layer_names, self._device(trainer), progress)
            return built.to_dict(), time.perf_counter() - started

        data, seconds = run_on_rank_zero(trainer, measure, "LCCallback's runtime model measurement")
        # Plain JSON data: checkpoints must load with `torch.load(weights_only=True)`.
        self.measured_runtime_model = json.loads(json.dumps(data))
        runtime_model = RuntimeModel.from_dict(self.measured_runtime_model)
        self._log_runtime_model(trainer, runtime_model, seconds)
        return runtime_model

    @rank_zero_only
    def _log_runtime_model(self, trainer: pl.Trainer, runtime_model: RuntimeModel, seconds: float) -> None:
        path = self._log_path("runtime_model.json")
        runtime_model.save(path)
        env = runtime_model.environment
        log.info(
            "LCCallback: measured the runtime model of %d layers on %s (%s, %d threads, batch %d) in %.1f s; "
            "saved to %s (pass it as `runtime_model` to reuse it).",
            len(runtime_model.layers), env.device, env.device_name, env.threads, env.batch_size, seconds, path,
        )  # fmt: skip
        for logger in trainer.loggers:
            logger.log_metrics({"lc/runtime_model_seconds": seconds}, step=trainer.global_step)
        append_jsonl(self._log_path(LOG_FILE), {"event": "runtime_model", "seconds": seconds, "path": str(path)})

    # --- L step: the penalty gradient -------------------------------------------------------------

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.lc is None or self.lc_state is None or self.compressed or self.lc.finished(self.lc_state):
            return
        target = self.target_module(pl_module)
        stepped = {id(param) for group in optimizer.param_groups for param in group["params"]}
        # Only the layers this optimizer steps: with several optimizers each adds its own share.
        layers = [name for name in self.lc.layer_names if id(target.get_submodule(name).weight) in stepped]
        if layers:
            self.lc.add_penalty_gradient(target, self.lc_state, layers=layers)

    # --- C steps and the factorization, at epoch starts --------------------------------------------

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.compressed or self.lc is None or self.lc_state is None:
            return
        epoch = trainer.current_epoch
        new_phase = False
        # A loop: a resumed fit catches up on the C steps due by now.
        while not self.lc.finished(self.lc_state) and c_step_due(self.options, self.lc_state, epoch):
            report = self._c_step(trainer, pl_module)
            entry = self.report.add_c_step(report, epoch, trainer.global_step, self.runtime_model)
            self._emit(trainer, LCReport.metrics(entry), entry)
            new_phase = True
        if self.lc.finished(self.lc_state):
            self._factorize(trainer, pl_module)
            new_phase = True
        if new_phase and self.restart_lr:
            # A new L step (or the fine-tuning) starts: fresh optimizers and schedulers.
            rebuild_optimizers(trainer, pl_module)
            log.info("LCCallback: optimizers and LR schedulers restarted at epoch %d.", epoch)

    def _c_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> LCStepReport:
        """One C step on rank 0, its state broadcast, so every rank penalizes toward the same Theta
        (a last-bit difference would let the replicas' weights drift apart)."""
        lc, state = self.lc, self.lc_state
        assert lc is not None and state is not None
        # Diverged weights would otherwise surface as an SVD failure deep in the C step.
        self.check_finite_weights(trainer, pl_module, f"before LC C step {state.step}")
        target = self.target_module(pl_module)
        progress = None if trainer.progress_bar_callback is not None else False

        def c_step() -> tuple[dict[str, Any], dict[str, Any] | None]:
            report = lc.c_step(target, state, progress=progress)
            return report.to_dict(), cpu_state_dict(state) if trainer.world_size > 1 else None

        report, new_state = run_on_rank_zero(trainer, c_step, "LCCallback's C step")
        if not trainer.is_global_zero:
            state.load_state_dict(new_state)
        return LCStepReport(**report)

    def _factorize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lc, state = self.lc, self.lc_state
        assert lc is not None and state is not None
        record = self.apply_edit(trainer, pl_module, lambda module: lc.compress(module, state))
        self.compressed = True
        # The structure made (a rank-0 layer runs as rank 1 with zero factors).
        entry = self.report.add_factorization(record.ranks, state, trainer.current_epoch, trainer.global_step)
        # Theta and the multipliers have served their purpose; checkpoints need not carry them.
        self.lc_state = None
        self._log_factorize(trainer, entry)

    @rank_zero_only
    def _log_factorize(self, trainer: pl.Trainer, entry: dict[str, Any]) -> None:
        log.info(
            "LCCallback: factorized %d layers at epoch %d after %d C steps; kept dense: %s.",
            len(entry["ranks"]), entry["epoch"], entry["c_steps"], entry["dense"],
        )  # fmt: skip
        append_jsonl(self._log_path(LOG_FILE), entry)

    @rank_zero_only
    def _emit(self, trainer: pl.Trainer, metrics: dict[str, float], entry: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        append_jsonl(self._log_path(LOG_FILE), entry)

    def _log_path(self, name: str) -> Path:
        assert self.log_dir is not None, "resolved in setup"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self.log_dir / name

    # --- checkpoints -------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        lc_state = self.lc_state.state_dict() if self.lc_state is not None else self._restored_lc_state
        report = self.report.to_dict()
        return {
            **super().state_dict(),
            "compressed": self.compressed,
            "lc_state": None if self.compressed else lc_state,
            # `history` and `final_ranks` under their names of earlier checkpoints.
            "history": report.pop("c_steps"),
            "final_ranks": report.pop("final_ranks"),
            "report": report,
            "measured_runtime_model": self.measured_runtime_model,
            "lam": self.lam,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.compressed = bool(state_dict.get("compressed", False))
        self.report = LCReport.from_dict(
            {
                **state_dict.get("report", {}),
                "c_steps": state_dict.get("history", []),
                "final_ranks": state_dict.get("final_ranks", {}),
            }
        )
        self.measured_runtime_model = state_dict.get("measured_runtime_model")
        # A calibrated lam is the checkpoint's; a given one is the options' (as before `latency_target`).
        self.lam = self.options.lam if self.options.lam is not None else state_dict.get("lam")
        # Applied in `on_train_start`, once the algorithm is rebuilt for this process's module.
        self._restored_lc_state = state_dict.get("lc_state")
        if self.compressed:
            self.lc, self.lc_state = None, None
