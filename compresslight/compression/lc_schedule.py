"""The LC algorithm laid over a training run's epochs (paper 003), without a Trainer.

`LowRankLC` (`lc.py`) is the algorithm's steps; this module says *when* they happen in a run
of epochs and keeps the account of what they did:

- epochs `[t E, (t + 1) E)`, t = 0..T-1, **L step** t: ordinary training with the penalty
  `mu_t/2 ||W - Theta||^2` (augmented Lagrangian: `- lambda_t/mu_t` inside the norm) added to
  the gradients;
- start of epoch `(t + 1) E`, **C step** t: per layer, SVD and the exact rank
  `argmin_r lam C_k(r) + mu_t/2 sum_{i>r} s_i^2`; then `mu_{t+1} = a b^{t+1}`;
- start of epoch `T E` (or right after the C step that reached `tolerance`): every layer is
  replaced by its factorized form `Sequential(v, u)` at the learned rank with the Theta factors
  as weights (layers whose dense form is cheaper stay dense);
- epochs `[T E, max_epochs)`: fine-tuning of the factorized network.

(`E` = `epochs_per_step`, `T` = `steps`, `mu_t = mu_init * mu_growth^t`.) A C step runs at the
*start* of the epoch after its L step: the same point of the algorithm as the end of the L step's
last epoch, and the point where a resumed fit re-enters, so a C step is never skipped or repeated
on resume (`c_step_due` counts the C steps due by an epoch; a resumed fit catches up).

- `LCOptions`: the algorithm's validated options (what `LCCallback` takes and checks once);
- `RuntimeMeasurement`: how a runtime model is measured (or which loaded one is accepted);
- `select_layers`, `make_cost`: the layers and the rank cost of a run;
- `calibrate_lam`: the `lam` whose first C step aims at a fraction of the dense layers' predicted
  latency, so runs priced by different costs aim at one latency;
- `LCReport`: the C steps and the factorization of a run, with `to_dict()` / `to_markdown()` and
  the `lc/...` logger metrics of each step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from compresslight.checks import check_int
from compresslight.checks import select_layers as select_matching
from compresslight.compression.lc import (
    FlopsCost,
    LCState,
    LCStepReport,
    LowRankLC,
    RankCost,
    StorageCost,
    choose_rank,
    squared_singular_values,
)
from compresslight.compression.lowrank import compressible_layers
from compresslight.compression.runtime_model import BACKENDS, STATISTICS, RuntimeModel

__all__ = [
    "COSTS",
    "LCOptions",
    "LamCalibration",
    "LCReport",
    "RuntimeMeasurement",
    "c_step_due",
    "calibrate_lam",
    "cpu_state_dict",
    "make_cost",
    "select_layers",
]

COSTS = ("runtime", "flops", "storage")


def _check_number(name: str, value: Any, minimum: float, text: str, strict: bool = False) -> float:
    """`value` as a float; raises ValueError naming `name` unless it is a number >= `minimum` (> if `strict`)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not (value > minimum if strict else value >= minimum):
        raise ValueError(f"`{name}`{text}, got {value!r}.")
    return float(value)


@dataclasses.dataclass
class LCOptions:
    """What an LC run is asked to do, validated on construction.

    Attributes:
        lam: `lambda` of paper 003 eq. 3, the weight of the cost (>= 0); its scale depends on the
            cost's unit (paper 003: 5e-3..2e-2 with runtimes in ms). None: set by `latency_target`.
        latency_target: instead of `lam`, aim the first C step at this fraction (0, 1] of the dense
            layers' time predicted by a runtime model (`calibrate_lam` on the weights LC starts
            from), whatever the cost: runs with the runtime, FLOPs or storage cost then aim at one
            latency, and can be compared there (paper 003, Fig. 2). Give `lam` or this, not both.
        cost: `"runtime"` (a device's measured `RuntimeModel`, ms, paper 003), `"flops"` (MMACs) or
            `"storage"` (M params), the LC toolbox's proxies.
        mu_init: `a` of `mu_t = a * b^t` (> 0). Paper 003: 1e-5 (VGG16), 1e-4 (AlexNet).
        mu_growth: `b` (>= 1). Paper 003: 1.2.
        steps: T, the number of L/C steps (>= 1). Paper 003: 60 (VGG16), 30 (AlexNet).
        epochs_per_step: epochs of each L step (>= 1). Paper 003: 20 (VGG16), 5 (AlexNet).
        tolerance: stop the L/C steps early once `||W - Theta||` <= this (0: run all T steps).
        augmented_lagrangian: use Lagrange multipliers (paper 003's practice) on top of the
            quadratic penalty.
        layers: glob patterns of the layers to compress. Default: every `nn.Linear` and
            `nn.Conv2d` with `groups == 1`, as the authors' LC toolbox runs (`vgg16_all`); no
            layer needs excluding by hand, since the C step keeps a layer dense wherever its
            factorized form costs more (e.g. VGG16's first conv, over 3 input channels).
        ignored_layers: glob patterns of layers never compressed.
        runtime_model: a runtime model file (cost "runtime" only).

    Raises:
        ValueError: for a value out of range, an unknown cost, or a runtime model file with a cost
            other than "runtime".
    """

    lam: float | None = None
    cost: str = "runtime"
    mu_init: float = 1e-5
    mu_growth: float = 1.2
    steps: int = 60
    epochs_per_step: int = 20
    tolerance: float = 0.0
    augmented_lagrangian: bool = True
    layers: list[str] | None = None
    ignored_layers: list[str] = dataclasses.field(default_factory=list)
    runtime_model: str | None = None
    latency_target: float | None = None

    def __post_init__(self) -> None:
        if (self.lam is None) == (self.latency_target is None):
            raise ValueError(
                "Give `lam` (the cost's weight) or `latency_target` (a fraction of the dense layers' predicted "
                f"latency that sets lam), exactly one; got lam={self.lam!r}, latency_target={self.latency_target!r}."
            )
        if self.lam is not None:
            self.lam = _check_number("lam", self.lam, 0.0, " must be a number >= 0")
        if self.latency_target is not None:
            self.latency_target = _check_number(
                "latency_target", self.latency_target, 0.0, " must be a fraction in (0, 1]", strict=True
            )
            if self.latency_target > 1.0:
                raise ValueError(f"`latency_target` must be a fraction in (0, 1], got {self.latency_target!r}.")
        if self.cost not in COSTS:
            raise ValueError(f"`cost` must be one of {list(COSTS)}, got {self.cost!r}.")
        self.mu_init = _check_number("mu_init", self.mu_init, 0.0, " (a of mu_t = a * b^t) must be > 0", strict=True)
        self.mu_growth = _check_number(
            "mu_growth", self.mu_growth, 1.0, " (b of mu_t = a * b^t) must be >= 1 so mu grows"
        )
        check_int("steps", self.steps, 1)
        check_int("epochs_per_step", self.epochs_per_step, 1)
        self.tolerance = _check_number("tolerance", self.tolerance, 0.0, " must be >= 0")
        if self.runtime_model is not None and self.cost != "runtime" and self.latency_target is None:
            raise ValueError(
                "`runtime_model` prices ranks by runtime; it needs `cost`='runtime' (or a `latency_target`), "
                f"got cost={self.cost!r}."
            )
        self.layers = None if self.layers is None else list(self.layers)
        self.ignored_layers = list(self.ignored_layers)

    @property
    def needs_runtime_model(self) -> bool:
        """Whether a run needs a runtime model: to price ranks, or to calibrate `lam`."""
        return self.cost == "runtime" or self.latency_target is not None

    def algorithm(self, model: nn.Module, cost: RankCost, layers: Sequence[str], lam: float | None = None) -> LowRankLC:
        """The `LowRankLC` of these options over `layers` of `model`, priced by `cost`, with `lam`
        (a calibrated one) or the options' own."""
        lam = self.lam if lam is None else lam
        if lam is None:
            raise ValueError("`latency_target` is set: pass the calibrated `lam` (`calibrate_lam`).")
        return LowRankLC(
            model,
            cost,
            lam=lam,
            mu_init=self.mu_init,
            mu_growth=self.mu_growth,
            steps=self.steps,
            tolerance=self.tolerance,
            augmented_lagrangian=self.augmented_lagrangian,
            layers=list(layers),
        )

    @property
    def lc_epochs(self) -> int:
        """Epochs of the T L steps: the factorization happens at the start of this epoch at the latest."""
        return self.steps * self.epochs_per_step


def c_step_due(options: LCOptions, state: LCState, epoch: int) -> bool:
    """Whether a C step is due at the start of `epoch`: one per finished L step, none after the T-th."""
    return state.step < min(epoch // options.epochs_per_step, options.steps)


@dataclasses.dataclass
class RuntimeMeasurement:
    """How a runtime model is measured when none is loaded, and what a loaded one must match.

    Attributes:
        threads: CPU threads (measured with, or required of a loaded model).
        batch_size: batch size (paper 003: 1).
        backend: `"torch"` or `"onnxruntime"`.
        grid_points: ranks measured per layer (>= 2).
        iters: timed calls per measurement (>= 1).
        statistic: `"min"` (robust on a shared machine) or `"median"` latency per measurement.
        check_device: refuse a loaded model measured on another device (type and hardware name);
            False only to use one measured on the deployment target, not here.

    Fields left None take the measuring default (threads: torch's setting, batch 1, backend
    "torch") and accept any value in a loaded model.

    Raises:
        ValueError: for a value out of range or an unknown backend or statistic.
    """

    threads: int | None = None
    batch_size: int | None = None
    backend: str | None = None
    grid_points: int = 8
    iters: int = 50
    statistic: str = "min"
    check_device: bool = True

    def __post_init__(self) -> None:
        check_int("measure_iters", self.iters, 1)
        check_int("grid_points", self.grid_points, 2)
        for name, value in (("threads", self.threads), ("batch_size", self.batch_size)):
            if value is not None:
                check_int(name, value, 1)
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {list(BACKENDS)} or None, got {self.backend!r}.")
        if self.statistic not in STATISTICS:
            raise ValueError(f"`statistic` must be one of {list(STATISTICS)}, got {self.statistic!r}.")

    def measure(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        layers: Sequence[str],
        device: torch.device,
        progress: bool | None = None,
    ) -> RuntimeModel:
        """Measures the runtime model of `layers` on `device`."""
        return RuntimeModel.build(
            model,
            inputs,
            device=device,
            backend=self.backend or "torch",
            threads=self.threads,
            batch_size=self.batch_size or 1,
            grid_points=self.grid_points,
            layers=list(layers),
            iters=self.iters,
            statistic=self.statistic,
            progress=progress,
        )

    def check(
        self,
        runtime_model: RuntimeModel,
        model: nn.Module,
        inputs: torch.Tensor,
        layers: Sequence[str],
        device: torch.device,
    ) -> None:
        """Refuses a runtime model of another architecture, input size, device or setting.

        Raises:
            ValueError: saying what differs, or naming the layers it does not model.
        """
        runtime_model.check_compatible(
            model,
            example_inputs=inputs,
            device=device if self.check_device else None,
            threads=self.threads,
            backend=self.backend,
            batch_size=self.batch_size,
        )
        missing = [name for name in layers if name not in runtime_model.layers]
        if missing:
            raise ValueError(
                f"The runtime model does not model layers {missing} that LCCallback compresses; build it for "
                "every compressed layer or restrict `layers`."
            )


def select_layers(model: nn.Module, layers: Sequence[str] | None, ignored_layers: Sequence[str]) -> list[str]:
    """Compressible layers of `model` matching a `layers` glob pattern (default: all) and no `ignored_layers` one.

    Raises:
        ValueError: for a model without compressible layers, a pattern that matches no compressible
            layer, or no layer left.
    """
    available = list(compressible_layers(model))
    if not available:
        raise ValueError(f"{type(model).__name__} has no compressible layer (nn.Linear or nn.Conv2d with groups=1).")
    kind = "compressible layer"
    chosen = available if layers is None else select_matching("layers", layers, available, kind)
    ignored = set(select_matching("ignored_layers", ignored_layers, available, kind))
    names = [name for name in chosen if name not in ignored]
    if not names:
        raise ValueError(f"`layers` {layers} minus `ignored_layers` {ignored_layers} leaves no layer to compress.")
    return names


def make_cost(
    cost: str, model: nn.Module, inputs: torch.Tensor, layers: Sequence[str], runtime_model: RuntimeModel | None
) -> RankCost:
    """The rank cost named `cost`: FLOPs or storage of `layers`, or `runtime_model` (needed for "runtime").

    Raises:
        ValueError: for cost "runtime" without a runtime model.
    """
    if cost == "flops":
        return FlopsCost(model, inputs, layers)
    if cost == "storage":
        return StorageCost(model, layers)
    if runtime_model is None:
        raise ValueError("The cost 'runtime' needs a runtime model (loaded or measured).")
    return runtime_model


@dataclasses.dataclass(frozen=True)
class LamCalibration:
    """What `calibrate_lam` found: `lam` and the predicted latency of the ranks it chooses."""

    lam: float
    mu: float
    target: float
    predicted_s: float
    dense_s: float

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def calibrate_lam(
    model: nn.Module,
    layers: Sequence[str],
    cost: RankCost,
    runtime_model: RuntimeModel,
    mu: float,
    target: float,
) -> LamCalibration:
    """The smallest `lam` whose C step at `mu` on `model`'s current weights chooses ranks that
    `runtime_model` predicts at most `target` x the dense layers' time.

    Why: `lam` is in the cost's unit (ms, MMACs, M params), so one value means another latency per
    cost, and the C step's choice is monotone in `lam`: a log-bisection over 1e-12..1e6 finds it
    (0 when `mu` alone already drops that much; 1e6, short of the target, when no lam reaches it).
    With a proxy cost (FLOPs, storage) the predicted latency need not fall monotonically with
    `lam`; the bisection then returns a `lam` where it crosses the target.
    Calibrate at the *first* mu: the first Theta then has the target ranks, and later C steps keep
    them where the L steps made the dropped singular values small. (At the last mu every earlier C
    step chooses rank ~0, and with BatchNorm after a conv the L steps can shrink the weights to 0 at
    no loss: measured on ResNet20, that run collapsed to rank 1 everywhere.) The rest of the network
    takes the same time whatever the ranks, so only the modelled layers' time is aimed at.

    Raises:
        ValueError: for a `target` outside (0, 1] or a layer the runtime model does not hold.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"`target` must be a fraction in (0, 1], got {target!r}.")
    unknown = [name for name in layers if name not in runtime_model.layers]
    if unknown:
        raise ValueError(f"The runtime model does not hold these layers to compress: {unknown}.")
    spectra = {name: squared_singular_values(model.get_submodule(name).weight) for name in layers}
    costs = {name: cost.layer_costs(name) for name in layers}
    dense_s = runtime_model.predict({})
    target_s = target * dense_s

    def predicted_s(lam: float) -> float:
        ranks = {}
        for name, spectrum in spectra.items():
            choice = choose_rank(spectrum, costs[name], mu=mu, lam=lam)
            ranks[name] = None if choice.dense else max(choice.rank, 1)  # rank 0 runs as rank 1
        return runtime_model.predict(ranks)

    if predicted_s(0.0) <= target_s:
        # mu alone drops enough (small singular values): any lam > 0 would only aim lower.
        return LamCalibration(lam=0.0, mu=mu, target=target, predicted_s=predicted_s(0.0), dense_s=dense_s)
    low, high = -12.0, 6.0  # log10 lam
    if predicted_s(10**high) <= target_s:
        for _ in range(50):
            middle = (low + high) / 2
            low, high = (low, middle) if predicted_s(10**middle) <= target_s else (middle, high)
    # else: no lam reaches the target (layers the cost never factorizes); the largest one comes closest.
    return LamCalibration(lam=10**high, mu=mu, target=target, predicted_s=predicted_s(10**high), dense_s=dense_s)


def cpu_state_dict(state: LCState) -> dict[str, Any]:
    """`state.state_dict()` with its tensors on the CPU (a CUDA tensor unpickles onto the sender's device)."""
    return {
        key: {name: tensor.cpu() for name, tensor in value.items()} if key in ("thetas", "multipliers") else value
        for key, value in state.state_dict().items()
    }


@dataclasses.dataclass
class LCReport:
    """What an LC run did: one entry per C step, then the factorization.

    Attributes:
        c_steps: per C step, `LCStepReport.to_dict()` plus its `epoch`, `global_step` and, with a
            runtime model, the whole network's `predicted_network_ms`.
        final_ranks: rank of every factorized layer (layers kept dense are absent); empty before
            the factorization.
        factorized_at_epoch: the epoch at whose start the network was factorized (None before).
        converged: whether `||W - Theta||` reached the tolerance before the T steps.
        kept_dense: layers the last C step kept dense.
    """

    c_steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    final_ranks: dict[str, int] = dataclasses.field(default_factory=dict)
    factorized_at_epoch: int | None = None
    converged: bool = False
    kept_dense: list[str] = dataclasses.field(default_factory=list)

    def add_c_step(
        self, report: LCStepReport, epoch: int, global_step: int, runtime_model: RuntimeModel | None = None
    ) -> dict[str, Any]:
        """Records one C step and returns its entry (the `lc_log.jsonl` line, `event` "c_step")."""
        entry: dict[str, Any] = {"event": "c_step", "epoch": epoch, "global_step": global_step, **report.to_dict()}
        if runtime_model is not None:
            # Whole network: the modelled layers at these ranks (dense where kept dense) plus the
            # rank-independent rest; rank 0 is built as rank 1 (`LowRankLC.compress`).
            dense = set(report.dense)
            ranks = {name: None if name in dense else max(rank, 1) for name, rank in report.ranks.items()}
            entry["predicted_network_ms"] = runtime_model.predict_network(ranks) * 1e3
        self.c_steps.append(entry)
        return entry

    def add_factorization(self, ranks: dict[str, int], state: LCState, epoch: int, global_step: int) -> dict[str, Any]:
        """Records the factorization (`ranks`: the structure made) and returns its `lc_log.jsonl` entry."""
        self.final_ranks = dict(ranks)
        self.factorized_at_epoch = epoch
        self.converged = state.converged
        self.kept_dense = [name for name, dense in state.dense.items() if dense]
        return {
            "event": "factorize",
            "epoch": epoch,
            "global_step": global_step,
            "c_steps": state.step,
            "converged": state.converged,
            "ranks": dict(self.final_ranks),
            "dense": list(self.kept_dense),
        }

    @staticmethod
    def metrics(entry: dict[str, Any]) -> dict[str, float]:
        """The `lc/...` logger metrics of one C step's entry."""
        metrics = {
            "lc/step": float(entry["step"]),
            "lc/mu": entry["mu"],
            "lc/predicted_cost": entry["cost"],
            "lc/distance": entry["distance"],
            "lc/c_step_seconds": entry["seconds"],
            "lc/dense_layers": float(len(entry["dense"])),
        }
        metrics.update({f"lc/rank/{name}": float(rank) for name, rank in entry["ranks"].items()})
        if "predicted_network_ms" in entry:
            metrics["lc/predicted_network_ms"] = entry["predicted_network_ms"]
        return metrics

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able; kept in checkpoints)."""
        return {
            "c_steps": [dict(entry) for entry in self.c_steps],
            "final_ranks": dict(self.final_ranks),
            "factorized_at_epoch": self.factorized_at_epoch,
            "converged": self.converged,
            "kept_dense": list(self.kept_dense),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LCReport:
        """The inverse of `to_dict`."""
        return cls(
            c_steps=[dict(entry) for entry in data.get("c_steps", [])],
            final_ranks=dict(data.get("final_ranks", {})),
            factorized_at_epoch=data.get("factorized_at_epoch"),
            converged=bool(data.get("converged", False)),
            kept_dense=list(data.get("kept_dense", [])),
        )

    def to_markdown(self) -> str:
        """The C steps as a table, then the factorization's ranks."""
        lines = ["# LC low-rank compression", ""]
        if not self.c_steps:
            return "\n".join([*lines, "No C step yet."]) + "\n"
        unit = self.c_steps[-1]["cost_unit"]
        lines += [
            f"| C step | epoch | mu | cost ({unit}) | network ms | ||W - Theta|| | dense layers | seconds |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for entry in self.c_steps:
            network = entry.get("predicted_network_ms")
            lines.append(
                f"| {entry['step']} | {entry['epoch']} | {entry['mu']:.3g} | {entry['cost']:.4g} | "
                f"{'-' if network is None else f'{network:.4g}'} | {entry['distance']:.4g} | {len(entry['dense'])} | "
                f"{entry['seconds']:.2f} |"
            )
        lines.append("")
        if self.factorized_at_epoch is None and not self.final_ranks:
            lines.append("Not factorized yet.")
            return "\n".join(lines) + "\n"
        how = "converged (tolerance reached)" if self.converged else "after all C steps"
        # "?": restored from a checkpoint written before the report kept the epoch.
        epoch = "?" if self.factorized_at_epoch is None else self.factorized_at_epoch
        lines += [f"Factorized at the start of epoch {epoch}, {how}.", ""]
        lines += ["| layer | rank |", "|---|---:|"]
        lines += [f"| {name} | {rank} |" for name, rank in self.final_ranks.items()]
        lines += [f"| {name} | dense |" for name in self.kept_dense]
        return "\n".join(lines) + "\n"
