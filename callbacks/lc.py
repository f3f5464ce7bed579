"""`LCCallback`: low-rank compression that learns each layer's rank with the LC algorithm (paper 003).

One `fit` runs the whole pipeline of paper 003 on a trained network (start it from a baseline with
`--model.init_from`):

- epochs `[t E, (t + 1) E)`, t = 0..T-1, **L step** t: ordinary training with the penalty
  `mu_t/2 ||W - Theta||^2` (augmented Lagrangian: `- lambda_t/mu_t` inside the norm) added to
  the gradients;
- start of epoch `(t + 1) E`, **C step** t: per layer, SVD and the exact rank
  `argmin_r lam C_k(r) + mu_t/2 sum_{i>r} s_i^2`; then `mu_{t+1} = a b^{t+1}`;
- start of epoch `T E` (or right after the C step that reached `tolerance`): every layer is
  replaced by its factorized form `Sequential(v, u)` at the learned rank with the Theta factors
  as weights (layers whose dense form is cheaper stay dense);
- epochs `[T E, max_epochs)`: fine-tuning of the factorized network.

(`E` = `epochs_per_step`, `T` = `steps`, `mu_t = mu_init * mu_growth^t`.) The C step runs at the
*start* of the epoch after its L step rather than at the end of the L step's last epoch: the two
are the same point of the algorithm, and an epoch start is where a resumed fit re-enters, whenever
the checkpoint it resumes from was written (after validation or at the end of the epoch), so a
C step is never skipped or repeated on `--ckpt_path`.

The penalty gradient is added in `on_before_optimizer_step`, once per optimizer step, after
Lightning has accumulated the micro-batches' gradients and unscaled them under mixed precision;
adding it after each `backward` would count it `accumulate_grad_batches` times and add it to
still-scaled gradients.

Costs `C(r)`: `"runtime"` (paper 003: a measured `RuntimeModel` of a device, loaded from
`runtime_model` or measured when the fit starts, ms), `"flops"` (MMACs) or `"storage"` (M params),
the LC toolbox's proxies, so the paper's runtime-vs-FLOPs comparison runs from configs.

Every C step logs `lc/mu`, `lc/predicted_cost` (`C(r)` over the compressed layers; the predicted
runtime `R(r)` with a runtime model), `lc/predicted_network_ms` (runtime model only),
`lc/distance` (`||W - Theta||`), `lc/c_step_seconds` and `lc/rank/<layer>` to every logger, and a
line to `lc_log.jsonl` in the run's log dir. The algorithm's state (step, mu, Theta, multipliers,
ranks, the runtime model measured on the fly) is in the callback's `state_dict`, so a fit resumes
mid-algorithm; the factorization itself is a replayable `LowRankRecord` (see
`StructuralCompressionCallback`), so a compressed checkpoint loads anywhere without this callback.

The algorithm is `compresslight.compression.lc.LowRankLC`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from compresslight.callbacks.structural_edit import StructuralCompressionCallback, find_example_inputs
from torch import nn
from typing_extensions import override

from compresslight import lightning_compat as pl
from compresslight.compression.lc import FlopsCost, LCState, LCStepReport, LowRankLC, RankCost, StorageCost
from compresslight.compression.lowrank import compressible_layers
from compresslight.compression.runtime_model import BACKENDS, STATISTICS, RuntimeModel
from compresslight.lightning_compat import rank_zero_only

log = logging.getLogger(__name__)

COSTS = ("runtime", "flops", "storage")
LOG_FILE = "lc_log.jsonl"

__all__ = ["COSTS", "LCCallback"]


class LCCallback(StructuralCompressionCallback):
    """Learns per-layer ranks and low-rank weights with the LC algorithm, then factorizes and fine-tunes.

    Args:
        lam: `lambda` of paper 003 eq. 3, the weight of the cost (>= 0); its scale depends on the
            cost's unit (paper 003: 5e-3..2e-2 with runtimes in ms).
        cost: `"runtime"` (measured device runtime, paper 003), `"flops"` (MACs) or `"storage"`
            (parameters).
        runtime_model: JSON file written by `cli.py runtime-model` (cost `"runtime"` only). Without
            one, a runtime model is measured on `runtime_device` when the fit starts (logged, and
            written to `runtime_model.json` in the log dir for reuse).
        mu_init: `a` of `mu_t = a * b^t` (> 0). Paper 003: 1e-5 (VGG16), 1e-4 (AlexNet).
        mu_growth: `b` (>= 1). Paper 003: 1.2.
        steps: T, the number of L/C steps (>= 1). Paper 003: 60 (VGG16), 30 (AlexNet).
        epochs_per_step: epochs of each L step (>= 1). Paper 003: 20 (VGG16), 5 (AlexNet).
        tolerance: stop the L/C steps early once `||W - Theta||` <= this (0: run all T steps).
        restart_lr: start every L step and the fine-tuning with fresh optimizers and LR schedulers
            (`configure_optimizers` again: initial lr, no momentum), as the LC toolbox's
            `restart_on_l` does for paper 003's VGG16 setting (lr 7e-4 x0.99 per epoch of each L
            step). Without it the LR schedule runs on across the whole fit.
        augmented_lagrangian: use Lagrange multipliers (paper 003's practice) on top of the
            quadratic penalty.
        layers: glob patterns of the layers to compress. Default: every `nn.Linear` and
            `nn.Conv2d` with `groups == 1`, as the authors' LC toolbox runs (`vgg16_all`); no
            layer needs excluding by hand, since the C step keeps a layer dense wherever its
            factorized form costs more (e.g. VGG16's first conv, over 3 input channels).
        ignored_layers: glob patterns of layers never compressed.
        runtime_device: the device whose runtime is optimized: where a runtime model is measured,
            and what a loaded one must have been measured on. Default: the Trainer's root device.
        check_device: refuse a loaded runtime model measured on another device (type and hardware
            name). Set False only to use one measured on the deployment target, not here.
        threads: CPU threads of the runtime model (measured with, or required of a loaded one;
            default: the current torch setting when measuring, any when loading).
        batch_size: batch size of the runtime model (default: 1 when measuring, paper 003; any
            when loading).
        backend: `"torch"` or `"onnxruntime"` (default: `"torch"` when measuring; any when loading).
        grid_points: ranks measured per layer when measuring a runtime model (>= 2).
        measure_iters: timed calls per measurement when measuring a runtime model (>= 1).
        statistic: `"min"` (default: robust on a shared machine) or `"median"` latency per measurement.
        module_path: the submodule to compress (see `StructuralCompressionCallback`).

    Attributes:
        lc: the algorithm (`LowRankLC`), built when training starts; None once factorized.
        lc_state: its state (step, mu, Theta, multipliers, ranks); None once factorized.
        compressed: whether the network has been factorized.
        history: one entry per C step (its epoch, mu, ranks, cost, distance, seconds).
        final_ranks: rank of every factorized layer (layers kept dense are absent).
        runtime_model: the `RuntimeModel` pricing the ranks (cost "runtime").
        measured_runtime_model: the runtime model measured by this callback, as plain data (kept
            in checkpoints so a resumed fit prices ranks as before); None if loaded from a file.

    Raises:
        ValueError: for a value out of range, an unknown cost/backend/statistic, a runtime model
            file with another cost, or an unreadable runtime model file.
        FileNotFoundError: if `runtime_model` does not exist.
    """

    def __init__(
        self,
        lam: float,
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
    ) -> None:
        super().__init__(module_path=module_path)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ValueError(f"`lam` must be a number >= 0, got {lam!r}.")
        if cost not in COSTS:
            raise ValueError(f"`cost` must be one of {list(COSTS)}, got {cost!r}.")
        if not (isinstance(mu_init, (int, float)) and mu_init > 0):
            raise ValueError(f"`mu_init` (a of mu_t = a * b^t) must be > 0, got {mu_init!r}.")
        if not (isinstance(mu_growth, (int, float)) and mu_growth >= 1):
            raise ValueError(f"`mu_growth` (b of mu_t = a * b^t) must be >= 1 so mu grows, got {mu_growth!r}.")
        for name, value in (("steps", steps), ("epochs_per_step", epochs_per_step), ("measure_iters", measure_iters)):
            _check_int(name, value, 1)
        _check_int("grid_points", grid_points, 2)
        if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
            raise ValueError(f"`tolerance` must be >= 0, got {tolerance!r}.")
        for name, value in (("threads", threads), ("batch_size", batch_size)):
            if value is not None:
                _check_int(name, value, 1)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {list(BACKENDS)} or None, got {backend!r}.")
        if statistic not in STATISTICS:
            raise ValueError(f"`statistic` must be one of {list(STATISTICS)}, got {statistic!r}.")
        if runtime_model is not None and cost != "runtime":
            raise ValueError(f"`runtime_model` prices ranks by runtime; it needs `cost`='runtime', got cost={cost!r}.")
        self.lam = float(lam)
        self.cost = cost
        self.runtime_model_path = runtime_model
        # Read now: a missing or malformed file fails when the config is parsed, not hours later.
        self.loaded_runtime_model = RuntimeModel.load(runtime_model) if runtime_model is not None else None
        self.mu_init = float(mu_init)
        self.mu_growth = float(mu_growth)
        self.steps = steps
        self.epochs_per_step = epochs_per_step
        self.tolerance = float(tolerance)
        self.restart_lr = restart_lr
        self.augmented_lagrangian = augmented_lagrangian
        self.layer_patterns = None if layers is None else list(layers)
        self.ignored_layers = list(ignored_layers)
        self.runtime_device = runtime_device
        self.check_device = check_device
        self.threads = threads
        self.batch_size = batch_size
        self.backend = backend
        self.grid_points = grid_points
        self.measure_iters = measure_iters
        self.statistic = statistic

        self.layer_names: list[str] = []
        self.lc: LowRankLC | None = None
        self.lc_state: LCState | None = None
        self.compressed = False
        self.history: list[dict[str, Any]] = []  # one entry per C step, with its epoch
        self.final_ranks: dict[str, int] = {}
        self.runtime_model: RuntimeModel | None = None  # the one in use (loaded, measured or restored)
        self.measured_runtime_model: dict[str, Any] | None = None  # measured here, kept in checkpoints
        self._restored_lc_state: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(module_path=self.module_path, cost=self.cost, lam=self.lam)

    @property
    def lc_epochs(self) -> int:
        """Epochs of the T L steps: the factorization happens at the start of this epoch at the latest."""
        return self.steps * self.epochs_per_step

    # --- setup: validate everything that can be, before any training ----------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        max_epochs = trainer.max_epochs
        if stage == "fit" and max_epochs is not None and 0 <= max_epochs <= self.lc_epochs:
            raise ValueError(
                f"LCCallback needs `trainer.max_epochs` > `steps` x `epochs_per_step` = {self.steps} x "
                f"{self.epochs_per_step} = {self.lc_epochs} (the L steps; the epochs after them fine-tune the "
                f"factorized network), got max_epochs={max_epochs}."
            )
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        target = self.target_module(pl_module)
        self.layer_names = self._select_layers(target)
        if self.loaded_runtime_model is not None:
            self._check_runtime_model(self.loaded_runtime_model, trainer, pl_module, target)

    def _select_layers(self, target: nn.Module) -> list[str]:
        """Compressible layers matching `layers` and no `ignored_layers` pattern.

        Raises:
            ValueError: for a pattern that matches no compressible layer, or no layer left.
        """
        available = list(compressible_layers(target))
        if not available:
            raise ValueError(
                f"{type(target).__name__} has no compressible layer (nn.Linear or nn.Conv2d with groups=1)."
            )
        for argument, patterns in (("layers", self.layer_patterns or []), ("ignored_layers", self.ignored_layers)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(name, pattern) for name in available):
                    raise ValueError(
                        f"`{argument}` pattern {pattern!r} matches no compressible layer; "
                        f"compressible layers: {available}."
                    )
        names = [
            name
            for name in available
            if (self.layer_patterns is None or _matches(name, self.layer_patterns))
            and not _matches(name, self.ignored_layers)
        ]
        if not names:
            raise ValueError(
                f"`layers` {self.layer_patterns} minus `ignored_layers` {self.ignored_layers} leaves no layer "
                "to compress."
            )
        return names

    def _device(self, trainer: pl.Trainer) -> torch.device:
        return torch.device(self.runtime_device) if self.runtime_device is not None else trainer.strategy.root_device

    def _check_runtime_model(
        self, runtime_model: RuntimeModel, trainer: pl.Trainer, pl_module: pl.LightningModule, target: nn.Module
    ) -> None:
        """Refuses a runtime model of another architecture, input size, device or setting.

        Raises:
            ValueError: saying what differs, or naming the layers it does not model.
        """
        runtime_model.check_compatible(
            target,
            example_inputs=find_example_inputs(trainer, pl_module),
            device=self._device(trainer) if self.check_device else None,
            threads=self.threads,
            backend=self.backend,
            batch_size=self.batch_size,
        )
        missing = [name for name in self.layer_names if name not in runtime_model.layers]
        if missing:
            raise ValueError(
                f"The runtime model does not model layers {missing} that LCCallback compresses; build it for "
                "every compressed layer or restrict `layers`."
            )

    # --- start: the cost and the algorithm, once any checkpoint has been restored --------------

    @override
    def pending_epochs(self, trainer: pl.Trainer) -> list[int]:
        return [] if self.compressed else [self.lc_epochs]

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
        cost = self._make_cost(trainer, pl_module, target, inputs)
        self.lc = LowRankLC(
            target,
            cost,
            lam=self.lam,
            mu_init=self.mu_init,
            mu_growth=self.mu_growth,
            steps=self.steps,
            tolerance=self.tolerance,
            augmented_lagrangian=self.augmented_lagrangian,
            layers=self.layer_names,
        )
        previous = self._restored_lc_state
        if previous is None and self.lc_state is not None:
            previous = self.lc_state.state_dict()  # another `fit` with this callback: carry on
        self.lc_state = self.lc.init_state(target)
        if previous is not None:
            self.lc_state.load_state_dict(previous)
            self._restored_lc_state = None
            log.info("LCCallback: resumed at C step %d (mu=%.3g).", self.lc_state.step, self.lc_state.mu)

    def _make_cost(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: nn.Module, inputs: torch.Tensor
    ) -> RankCost:
        if self.cost == "flops":
            return FlopsCost(target, inputs, self.layer_names)
        if self.cost == "storage":
            return StorageCost(target, self.layer_names)
        if self.loaded_runtime_model is not None:
            self.runtime_model = self.loaded_runtime_model
        elif self.measured_runtime_model is not None:  # measured before the checkpoint we resume from
            self.runtime_model = RuntimeModel.from_dict(self.measured_runtime_model)
            self._check_runtime_model(self.runtime_model, trainer, pl_module, target)
        else:
            self.runtime_model = self._measure_runtime_model(trainer, target, inputs)
        return self.runtime_model

    def _measure_runtime_model(self, trainer: pl.Trainer, target: nn.Module, inputs: torch.Tensor) -> RuntimeModel:
        """Measures the runtime model on rank 0 (ranks measuring at once would disturb each other)."""
        data: dict[str, Any] | None = None
        failure: str | None = None
        seconds = 0.0
        if trainer.is_global_zero:
            started = time.perf_counter()
            try:
                data = RuntimeModel.build(
                    target,
                    inputs,
                    device=self._device(trainer),
                    backend=self.backend or "torch",
                    threads=self.threads,
                    batch_size=self.batch_size or 1,
                    grid_points=self.grid_points,
                    layers=self.layer_names,
                    iters=self.measure_iters,
                    statistic=self.statistic,
                    progress=None if trainer.progress_bar_callback is not None else False,
                ).to_dict()
            except Exception as error:
                if trainer.world_size == 1:
                    raise
                failure = f"{type(error).__name__}: {error}"
            seconds = time.perf_counter() - started
        if trainer.world_size > 1:
            data, failure = trainer.strategy.broadcast((data, failure), src=0)
            if failure is not None:
                raise RuntimeError(f"LCCallback could not measure the runtime model on rank 0: {failure}")
        # Plain JSON data: checkpoints must load with `torch.load(weights_only=True)`.
        self.measured_runtime_model = json.loads(json.dumps(data))
        runtime_model = RuntimeModel.from_dict(self.measured_runtime_model)
        self._log_runtime_model(trainer, runtime_model, seconds)
        return runtime_model

    @rank_zero_only
    def _log_runtime_model(self, trainer: pl.Trainer, runtime_model: RuntimeModel, seconds: float) -> None:
        log_dir = _log_dir(trainer)
        path = log_dir / "runtime_model.json"
        runtime_model.save(path)
        env = runtime_model.environment
        log.info(
            "LCCallback: measured the runtime model of %d layers on %s (%s, %d threads, batch %d) in %.1f s; "
            "saved to %s (pass it as `runtime_model` to reuse it).",
            len(runtime_model.layers), env.device, env.device_name, env.threads, env.batch_size, seconds, path,
        )  # fmt: skip
        for logger in trainer.loggers:
            logger.log_metrics({"lc/runtime_model_seconds": seconds}, step=trainer.global_step)
        _append_log(trainer, {"event": "runtime_model", "seconds": seconds, "path": str(path)})

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
        # C steps due by now: one per finished L step (a loop, so a resumed fit catches up).
        due = min(epoch // self.epochs_per_step, self.steps)
        new_phase = False
        while not self.lc.finished(self.lc_state) and self.lc_state.step < due:
            report = self._c_step(trainer, pl_module)
            self._log_c_step(trainer, report, epoch)
            new_phase = True
        if self.lc.finished(self.lc_state):
            self._factorize(trainer, pl_module)
            new_phase = True
        if new_phase and self.restart_lr:
            # A new L step (or the fine-tuning) starts: fresh optimizers and schedulers, the same
            # call Lightning makes at the start of fit.
            trainer.strategy.setup_optimizers(trainer)
            log.info("LCCallback: optimizers and LR schedulers restarted at epoch %d.", epoch)

    def _c_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> LCStepReport:
        """One C step; under DDP rank 0's result is broadcast, so every rank penalizes toward the
        same Theta (a last-bit difference would let the replicas' weights drift apart)."""
        assert self.lc is not None and self.lc_state is not None
        # Diverged weights would otherwise surface as an SVD failure deep in the C step.
        self.check_finite_weights(trainer, pl_module, f"before LC C step {self.lc_state.step}")
        target = self.target_module(pl_module)
        progress = None if trainer.progress_bar_callback is not None else False
        if trainer.world_size == 1:
            return self.lc.c_step(target, self.lc_state, progress=progress)
        payload: tuple[dict[str, Any] | None, dict[str, Any] | None, str | None] = (None, None, None)
        if trainer.is_global_zero:
            try:
                report = self.lc.c_step(target, self.lc_state, progress=progress)
                payload = (_to_cpu(self.lc_state.state_dict()), report.to_dict(), None)
            except Exception as error:
                payload = (None, None, f"{type(error).__name__}: {error}")
        state, report_dict, failure = trainer.strategy.broadcast(payload, src=0)
        if failure is not None:
            raise RuntimeError(f"LCCallback C step failed on rank 0: {failure}")
        if not trainer.is_global_zero:
            self.lc_state.load_state_dict(state)
        return LCStepReport(**report_dict)

    def _factorize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.lc is not None and self.lc_state is not None
        lc, state = self.lc, self.lc_state
        record = self.apply_edit(trainer, pl_module, lambda module: lc.compress(module, state))
        # The structure made (a rank-0 layer runs as rank 1 with zero factors).
        self.final_ranks = dict(record.ranks)
        self.compressed = True
        entry = {
            "event": "factorize",
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "c_steps": state.step,
            "converged": state.converged,
            "ranks": dict(self.final_ranks),
            "dense": [name for name, dense in state.dense.items() if dense],
        }
        # Theta and the multipliers have served their purpose; checkpoints need not carry them.
        self.lc_state = None
        self._log_factorize(trainer, entry)

    @rank_zero_only
    def _log_factorize(self, trainer: pl.Trainer, entry: dict[str, Any]) -> None:
        log.info(
            "LCCallback: factorized %d layers at epoch %d after %d C steps; kept dense: %s.",
            len(entry["ranks"]), entry["epoch"], entry["c_steps"], entry["dense"],
        )  # fmt: skip
        _append_log(trainer, entry)

    def _log_c_step(self, trainer: pl.Trainer, report: LCStepReport, epoch: int) -> None:
        metrics = {
            "lc/step": float(report.step),
            "lc/mu": report.mu,
            "lc/predicted_cost": report.cost,
            "lc/distance": report.distance,
            "lc/c_step_seconds": report.seconds,
            "lc/dense_layers": float(len(report.dense)),
        }
        metrics.update({f"lc/rank/{name}": float(rank) for name, rank in report.ranks.items()})
        entry = {"event": "c_step", "epoch": epoch, "global_step": trainer.global_step, **report.to_dict()}
        if self.runtime_model is not None:
            # Whole network: the modelled layers at these ranks (dense where kept dense) plus the
            # rank-independent rest; rank 0 is built as rank 1 (`LowRankLC.compress`).
            dense = set(report.dense)
            ranks = {name: None if name in dense else max(rank, 1) for name, rank in report.ranks.items()}
            network_ms = self.runtime_model.predict_network(ranks) * 1e3
            metrics["lc/predicted_network_ms"] = network_ms
            entry["predicted_network_ms"] = network_ms
        self.history.append(entry)
        self._emit(trainer, metrics, entry)

    @rank_zero_only
    def _emit(self, trainer: pl.Trainer, metrics: dict[str, float], entry: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        _append_log(trainer, entry)

    # --- checkpoints -------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        lc_state = self.lc_state.state_dict() if self.lc_state is not None else self._restored_lc_state
        return {
            **super().state_dict(),
            "compressed": self.compressed,
            "lc_state": None if self.compressed else lc_state,
            "history": [dict(entry) for entry in self.history],
            "final_ranks": dict(self.final_ranks),
            "measured_runtime_model": self.measured_runtime_model,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.compressed = bool(state_dict.get("compressed", False))
        self.history = [dict(entry) for entry in state_dict.get("history", [])]
        self.final_ranks = dict(state_dict.get("final_ranks", {}))
        self.measured_runtime_model = state_dict.get("measured_runtime_model")
        # Applied in `on_train_start`, once the algorithm is rebuilt for this process's module.
        self._restored_lc_state = state_dict.get("lc_state")
        if self.compressed:
            self.lc, self.lc_state = None, None


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    """The state with its tensors on the CPU (a CUDA tensor unpickles onto the sender's device)."""
    return {
        key: {name: tensor.cpu() for name, tensor in value.items()} if key in ("thetas", "multipliers") else value
        for key, value in state.items()
    }


def _log_dir(trainer: pl.Trainer) -> Path:
    """The run's log dir as `trainer.log_dir` gives it, without its broadcast.

    `trainer.log_dir` is a collective under DDP (it broadcasts rank 0's path): called from
    rank-zero-only code it would wait forever for the other ranks.
    """
    path = pl.logger_log_dir(trainer.loggers[0]) if trainer.loggers else None
    log_dir = Path(path or trainer.default_root_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir


def _append_log(trainer: pl.Trainer, entry: dict[str, Any]) -> None:
    with open(_log_dir(trainer) / LOG_FILE, "a") as handle:
        handle.write(json.dumps(entry) + "\n")
