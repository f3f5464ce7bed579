"""Learning-Compression (LC) algorithm for low-rank compression with a rank cost (paper 003, sec. 3).

Problem (eq. 3): `min_{W, r} L(W) + lam * C(r)  s.t. rank(W_k) = r_k`, where `C(r) = sum_k C_k(r_k)`
is a device runtime model (paper 003), FLOPs or storage (the LC toolbox's costs; Idelbayev &
Carreira-Perpinan, CVPR 2020). The LC algorithm alternates, for `mu_t = a * b^t`, t = 0..T-1:

- **L step** (training, done by the caller): minimize `L(W) + penalty`, where `penalty` is
  `mu/2 ||W_k - Theta_k||^2` (quadratic penalty, eq. 4) or, with the augmented Lagrangian the
  paper uses in practice, `mu/2 ||W_k - Theta_k - lambda_k/mu||^2`;
- **C step** (`LowRankLC.c_step`): per layer, SVD of the target `W_k` (augmented Lagrangian:
  `W_k - lambda_k/mu`; conv weights reshaped by scheme 2) and the exact rank by enumeration
  (eq. 5): `r_k = argmin_r lam * C_k(r) + mu/2 sum_{i>r} s_i^2`, `Theta_k` = rank-`r_k` truncation;
  then the multipliers `lambda_k <- lambda_k - mu (W_k - Theta_k)` (LC papers' notation:
  Carreira-Perpinan 2017, "Model compression as constrained optimization", sec. 4);
- stop after T steps or once `||W - Theta||` <= `tolerance`.

Keeping a layer dense is one more option of the enumeration, with zero error and the dense
cost: it is chosen at full rank whenever the dense layer is no costlier than its factorized form
(a factorization slower than the dense layer is never worth having).

`LowRankLC.compress` finally replaces each factorized layer by its low-rank form with the Theta
factors as weights and returns the replayable `LowRankRecord`.

Rank 0 (eq. 5 allows it: the layer outputs its bias) has no PyTorch conv with 0 channels, so
`compress` builds it as rank 1 with zero factors: the same function, at rank-1 cost.

Usage (what a Lightning callback does):
    >>> lc = LowRankLC(model, runtime_model, lam=1e-2, mu_init=1e-5, mu_growth=1.2, steps=60)
    >>> state = lc.init_state(model)
    >>> while not lc.finished(state):
    ...     train_some_epochs(loss=task_loss + lc.penalty(model, state))   # L step
    ...     report = lc.c_step(model, state)                               # C step, mu raised
    >>> record = lc.compress(model, state)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from compresslight.compression.lowrank import (
    LowRankRecord,
    compressible_layers,
    factorize_model,
    from_matrix,
    layer_io_shapes,
    max_rank,
    to_matrix,
)
from compresslight.profiling.progress import progress_bar

log = logging.getLogger(__name__)

__all__ = [
    "FlopsCost",
    "LCState",
    "LCStepReport",
    "LayerCStep",
    "LayerCosts",
    "LowRankLC",
    "RankChoice",
    "RankCost",
    "StorageCost",
    "c_step_layer",
    "choose_rank",
    "lc_penalty",
    "mu_schedule",
    "penalty_gradient",
    "squared_singular_values",
    "update_multiplier",
]


class LayerCosts(NamedTuple):
    """Cost of one layer for the C step.

    Attributes:
        factorized: cost of the rank-r factorized layer for r = 0..full rank (index = rank).
        dense: cost of leaving the layer uncompressed.
    """

    factorized: np.ndarray
    dense: float


@runtime_checkable
class RankCost(Protocol):
    """What the C step needs of a cost: per-layer costs over all ranks, in one `unit`.

    Implemented by `runtime_model.RuntimeModel` (ms, paper 003), `FlopsCost` and `StorageCost`.
    A cost may also define `check_compatible(model)`, which `LowRankLC` calls.
    """

    unit: str

    def layer_costs(self, name: str) -> LayerCosts: ...


class FlopsCost:
    """Forward multiply-accumulates per sample, in millions (the papers' "MFLOPs" are MACs).

    Factorized linear: `r (in + out)` per token. Factorized conv (scheme 2), input `H x W`, output
    `H' x W'`: the `1 x kw` conv makes `r c kw H W'` MACs (it keeps the input height), the `kh x 1`
    conv `n r kh H' W'`; the dense conv `n c kh kw H' W'`.
    """

    unit = "MMACs"

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, layers: Sequence[str] | None = None) -> None:
        """
        Args:
            model: the dense network.
            example_inputs: one input batch (gives each layer's spatial size).
            layers: layers to price; default every compressible layer.

        Raises:
            ValueError: if a named layer is not a compressible layer of `model`.
        """
        available = compressible_layers(model)
        names = _check_layer_names(available, layers)
        shapes = layer_io_shapes(model, example_inputs, names)
        self._costs: dict[str, LayerCosts] = {}
        for name in names:
            layer = available[name]
            (input_shape, output_shape) = shapes[name]
            ranks = np.arange(max_rank(layer) + 1, dtype=np.float64)
            if isinstance(layer, nn.Linear):
                tokens = math.prod(input_shape[1:-1])
                factorized = tokens * ranks * (layer.in_features + layer.out_features)
                dense = tokens * layer.in_features * layer.out_features
            else:
                n, c, kh, kw = layer.weight.shape
                in_height = input_shape[2]
                out_height, out_width = output_shape[2], output_shape[3]
                factorized = ranks * (c * kw * in_height * out_width + n * kh * out_height * out_width)
                dense = n * c * kh * kw * out_height * out_width
            self._costs[name] = LayerCosts(factorized=factorized / 1e6, dense=float(dense) / 1e6)

    def layer_costs(self, name: str) -> LayerCosts:
        """Costs of layer `name`.

        Raises:
            ValueError: if `name` was not priced.
        """
        return _lookup(self._costs, name)


class StorageCost:
    """Parameters, in millions: `r (c kw + n kh)` (conv) or `r (in + out)` (linear), plus the bias."""

    unit = "M params"

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None) -> None:
        """
        Args:
            model: the dense network.
            layers: layers to price; default every compressible layer.

        Raises:
            ValueError: if a named layer is not a compressible layer of `model`.
        """
        available = compressible_layers(model)
        self._costs: dict[str, LayerCosts] = {}
        for name in _check_layer_names(available, layers):
            layer = available[name]
            matrix_rows, matrix_cols = to_matrix(layer.weight.detach()).shape
            bias = 0 if layer.bias is None else layer.bias.numel()
            ranks = np.arange(max_rank(layer) + 1, dtype=np.float64)
            factorized = ranks * (matrix_rows + matrix_cols) + bias
            self._costs[name] = LayerCosts(factorized=factorized / 1e6, dense=float(layer.weight.numel() + bias) / 1e6)

    def layer_costs(self, name: str) -> LayerCosts:
        """Costs of layer `name`.

        Raises:
            ValueError: if `name` was not priced.
        """
        return _lookup(self._costs, name)


# --------------------------------------------------------------------------- pure steps


def mu_schedule(mu_init: float, mu_growth: float, steps: int) -> list[float]:
    """`mu_t = a * b^t` for t = 0..steps-1 (paper 003: a = `mu_init`, b = `mu_growth`).

    Raises:
        ValueError: if `mu_init` <= 0, `mu_growth` < 1 or `steps` < 1.
    """
    _check_schedule(mu_init, mu_growth, steps)
    return [mu_init * mu_growth**t for t in range(steps)]


@dataclasses.dataclass
class LayerCStep:
    """Solution of one layer's C step.

    Attributes:
        theta: the rank-`rank` truncation of the target, in the layer's weight shape.
        rank: chosen rank in [0, full rank].
        dense: whether the layer stays uncompressed (then `rank` is the full rank).
        cost: the chosen option's cost.
        error: `||target - theta||^2` = sum of the discarded squared singular values.
        objective: `lam * cost + mu / 2 * error`.
    """

    theta: torch.Tensor
    rank: int
    dense: bool
    cost: float
    error: float
    objective: float


class RankChoice(NamedTuple):
    """The solution of paper 003 eq. 5 for one layer, without Theta.

    Attributes:
        rank: chosen rank in [0, full rank].
        dense: whether the layer stays uncompressed (then `rank` is the full rank).
        cost: the chosen option's cost.
        error: sum of the discarded squared singular values.
        objective: `lam * cost + mu / 2 * error`.
    """

    rank: int
    dense: bool
    cost: float
    error: float
    objective: float


def choose_rank(spectrum: np.ndarray, costs: LayerCosts, *, mu: float, lam: float) -> RankChoice:
    """The rank minimizing `lam * C(r) + mu/2 * sum_{i>r} s_i^2` by enumeration (paper 003 eq. 5).

    Only the spectrum matters, so callers that try many `lam` or `mu` (e.g. to aim at a cost
    budget) compute the SVD once.

    Args:
        spectrum: the squared singular values `s_i^2` of the layer's matrix, in descending order
            (`squared_singular_values`).
        costs: the layer's costs; `costs.factorized` has one entry per rank 0..full rank.
        mu: penalty parameter, > 0.
        lam: cost weight `lambda` of eq. 3, >= 0.

    Raises:
        ValueError: if `mu` <= 0, `lam` < 0 or `costs` does not have one entry per rank.
    """
    if not mu > 0:
        raise ValueError(f"`mu` must be > 0, got {mu!r}.")
    if not lam >= 0:
        raise ValueError(f"`lam` must be >= 0, got {lam!r}.")
    squared = np.asarray(spectrum, dtype=np.float64)
    full = squared.size
    factorized = np.asarray(costs.factorized, dtype=np.float64)
    if factorized.shape != (full + 1,):
        raise ValueError(
            f"`costs.factorized` must have {full + 1} entries (ranks 0..{full}), got shape {factorized.shape}."
        )
    # tail[r] = sum_{i > r} s_i^2 (1-based), the squared error of the rank-r truncation.
    tail = np.concatenate([np.cumsum(squared[::-1])[::-1], [0.0]])
    option_costs = factorized.copy()
    dense_cheaper = costs.dense <= factorized[full]
    option_costs[full] = min(factorized[full], costs.dense)
    objective = lam * option_costs + 0.5 * mu * tail
    rank = int(np.argmin(objective))  # ties go to the lower rank
    return RankChoice(
        rank=rank,
        dense=bool(rank == full and dense_cheaper),
        cost=float(option_costs[rank]),
        error=float(tail[rank]),
        objective=float(objective[rank]),
    )


def squared_singular_values(weight: torch.Tensor) -> np.ndarray:
    """`s_i^2` (descending) of the weight's low-rank matrix (`lowrank.to_matrix`), as float64."""
    return torch.linalg.svdvals(to_matrix(weight.detach())).double().cpu().numpy() ** 2


def c_step_layer(target: torch.Tensor, costs: LayerCosts, *, mu: float, lam: float) -> LayerCStep:
    """Exact C step of one layer (paper 003 eq. 5) by SVD and enumeration over every rank.

    Args:
        target: the weight to compress (`W_k`, or `W_k - lambda_k / mu` with multipliers).
        costs: the layer's costs; `costs.factorized` has one entry per rank 0..full rank.
        mu: penalty parameter, > 0.
        lam: cost weight `lambda` of eq. 3, >= 0.

    Raises:
        ValueError: if `mu` <= 0, `lam` < 0 or `costs` has the wrong length.
    """
    if not mu > 0:
        raise ValueError(f"`mu` must be > 0, got {mu!r}.")
    if not lam >= 0:
        raise ValueError(f"`lam` must be >= 0, got {lam!r}.")
    matrix = to_matrix(target.detach())
    full = min(matrix.shape)
    if np.shape(costs.factorized) != (full + 1,):
        raise ValueError(
            f"`costs.factorized` must have {full + 1} entries (ranks 0..{full}) for weight shape "
            f"{tuple(target.shape)}, got shape {np.shape(costs.factorized)}."
        )
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    choice = choose_rank(s.detach().double().cpu().numpy() ** 2, costs, mu=mu, lam=lam)
    rank = choice.rank
    if rank == full:
        theta = target.detach().clone()  # exact: no float error from re-multiplying the SVD
    else:
        theta = from_matrix((u[:, :rank] * s[:rank]) @ vh[:rank], target.shape)
    return LayerCStep(
        theta=theta, rank=rank, dense=choice.dense, cost=choice.cost, error=choice.error, objective=choice.objective
    )


def lc_penalty(
    weight: torch.Tensor, theta: torch.Tensor, mu: float, multiplier: torch.Tensor | None = None
) -> torch.Tensor:
    """L-step penalty `mu/2 ||W - Theta||^2`, or `mu/2 ||W - Theta - lambda/mu||^2` with a multiplier.

    Differentiable in `weight`; add it to the task loss.
    """
    difference = weight - theta
    if multiplier is not None:
        difference = difference - multiplier / mu
    return 0.5 * mu * difference.pow(2).sum()


def penalty_gradient(
    weight: torch.Tensor, theta: torch.Tensor, mu: float, multiplier: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient of `lc_penalty` in `weight`: `mu (W - Theta) - lambda`."""
    gradient = mu * (weight.detach() - theta)
    return gradient if multiplier is None else gradient - multiplier


def update_multiplier(multiplier: torch.Tensor, weight: torch.Tensor, theta: torch.Tensor, mu: float) -> torch.Tensor:
    """Augmented-Lagrangian multiplier step after a C step: `lambda - mu (W - Theta)`."""
    return multiplier - mu * (weight.detach() - theta)


# --------------------------------------------------------------------------- state


@dataclasses.dataclass
class LCState:
    """Where the LC algorithm is: plain data, checkpointable with `state_dict`.

    Attributes:
        step: C steps done; the next L step uses `mu_t` with t = `step`.
        mu: penalty parameter of the next L and C step.
        ranks: layer name -> rank chosen by the last C step (0 before the first).
        dense: layer name -> whether the last C step kept it uncompressed.
        thetas: layer name -> Theta (weight shape; zeros before the first C step, as in the paper).
        multipliers: layer name -> Lagrange multipliers (empty without augmented Lagrangian).
        converged: whether `||W - Theta||` reached the tolerance.
        history: one `LCStepReport.to_dict()` per C step.
    """

    step: int
    mu: float
    ranks: dict[str, int]
    dense: dict[str, bool]
    thetas: dict[str, torch.Tensor]
    multipliers: dict[str, torch.Tensor]
    converged: bool = False
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        """Plain data (tensors cloned) for a checkpoint."""
        return {
            "step": self.step,
            "mu": self.mu,
            "ranks": dict(self.ranks),
            "dense": dict(self.dense),
            "thetas": {name: theta.detach().clone() for name, theta in self.thetas.items()},
            "multipliers": {name: value.detach().clone() for name, value in self.multipliers.items()},
            "converged": self.converged,
            "history": [dict(entry) for entry in self.history],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores the output of `state_dict`.

        Raises:
            ValueError: if a key is missing or the layers of thetas and ranks differ.
        """
        required = {"step", "mu", "ranks", "dense", "thetas", "multipliers", "converged", "history"}
        missing = required - set(state_dict)
        if missing:
            raise ValueError(f"LC `state_dict` is missing keys {sorted(missing)}.")
        if set(state_dict["thetas"]) != set(state_dict["ranks"]):
            raise ValueError(
                f"LC `state_dict` holds thetas for {sorted(state_dict['thetas'])} but ranks for "
                f"{sorted(state_dict['ranks'])}."
            )
        self.step = int(state_dict["step"])
        self.mu = float(state_dict["mu"])
        self.ranks = {name: int(rank) for name, rank in state_dict["ranks"].items()}
        self.dense = {name: bool(dense) for name, dense in state_dict["dense"].items()}
        self.thetas = {name: theta.detach().clone() for name, theta in state_dict["thetas"].items()}
        self.multipliers = {name: value.detach().clone() for name, value in state_dict["multipliers"].items()}
        self.converged = bool(state_dict["converged"])
        self.history = [dict(entry) for entry in state_dict["history"]]


@dataclasses.dataclass
class LCStepReport:
    """What one C step did, for logging.

    Attributes:
        step: index t of the C step (0-based).
        mu: the `mu_t` it used.
        ranks: chosen rank per layer.
        dense: layers kept uncompressed.
        cost: `C(r) = sum_k C_k(r_k)` of the chosen ranks (predicted runtime R(r) with a runtime model).
        cost_unit: unit of `cost`.
        distance: `||W - Theta||` over all layers (Frobenius) after the step.
        seconds: wall time of the step.
    """

    step: int
    mu: float
    ranks: dict[str, int]
    dense: list[str]
    cost: float
    cost_unit: str
    distance: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- algorithm


class LowRankLC:
    """The LC algorithm's configuration and steps for a set of layers of one model.

    Holds no tensors: the evolving state is an `LCState`, so a callback can checkpoint it.
    """

    def __init__(
        self,
        model: nn.Module,
        cost: RankCost,
        *,
        lam: float,
        mu_init: float,
        mu_growth: float,
        steps: int,
        tolerance: float = 0.0,
        augmented_lagrangian: bool = True,
        layers: Sequence[str] | None = None,
    ) -> None:
        """
        Args:
            model: the network to compress (its compressible layers are looked up by name).
            cost: per-layer rank cost (`RuntimeModel`, `FlopsCost`, `StorageCost`).
            lam: `lambda` of eq. 3, the weight of the cost, >= 0.
            mu_init: `a` of `mu_t = a * b^t`, > 0.
            mu_growth: `b`, >= 1 (the LC algorithm drives mu to infinity).
            steps: T, the number of L/C steps, >= 1.
            tolerance: stop early once `||W - Theta||` <= this (0: never stop early).
            augmented_lagrangian: use multipliers (the paper's practice) instead of the
                quadratic penalty alone.
            layers: names of the layers to compress; default every compressible layer of
                `model` (the cost must price each).

        Raises:
            ValueError: for a value out of range, a layer that is not compressible, or a cost
                that does not fit the model (another architecture).
        """
        if not isinstance(lam, numbers.Real) or isinstance(lam, bool) or not lam >= 0:
            raise ValueError(f"`lam` must be a number >= 0, got {lam!r}.")
        _check_schedule(mu_init, mu_growth, steps)
        if not tolerance >= 0:
            raise ValueError(f"`tolerance` must be >= 0, got {tolerance!r}.")
        if not isinstance(cost, RankCost):
            raise ValueError(
                f"`cost` must implement `layer_costs(name)` and `unit` (RankCost), got {type(cost).__name__}."
            )
        check_compatible = getattr(cost, "check_compatible", None)
        if callable(check_compatible):
            check_compatible(model)
        available = compressible_layers(model)
        self.layer_names = _check_layer_names(available, layers)
        self.full_ranks = {name: max_rank(available[name]) for name in self.layer_names}
        self.weight_shapes = {name: tuple(available[name].weight.shape) for name in self.layer_names}
        self.costs: dict[str, LayerCosts] = {}
        for name in self.layer_names:
            costs = cost.layer_costs(name)
            if np.shape(costs.factorized) != (self.full_ranks[name] + 1,):
                raise ValueError(
                    f"`cost` prices layer {name!r} at {np.shape(costs.factorized)} ranks, expected "
                    f"{self.full_ranks[name] + 1} (0..{self.full_ranks[name]}): it was made for another architecture."
                )
            self.costs[name] = costs
        self.cost_unit = cost.unit
        self.lam = float(lam)
        self.mu_init = float(mu_init)
        self.mu_growth = float(mu_growth)
        self.steps = steps
        self.tolerance = float(tolerance)
        self.augmented_lagrangian = augmented_lagrangian

    def mu_at(self, step: int) -> float:
        """`mu_t = a * b^t`."""
        return self.mu_init * self.mu_growth**step

    def init_state(self, model: nn.Module) -> LCState:
        """Paper 003's start: ranks 0, Theta = 0, multipliers 0, `mu = mu_init`.

        (Calling `c_step` before the first L step instead starts from the direct compression
        of the reference weights, as the LC toolbox does.)
        """
        weights = self._weights(model)
        return LCState(
            step=0,
            mu=self.mu_at(0),
            ranks={name: 0 for name in self.layer_names},
            dense={name: False for name in self.layer_names},
            thetas={name: torch.zeros_like(weight.detach()) for name, weight in weights.items()},
            multipliers=(
                {name: torch.zeros_like(weight.detach()) for name, weight in weights.items()}
                if self.augmented_lagrangian
                else {}
            ),
        )

    def finished(self, state: LCState) -> bool:
        """Whether the T steps are done or `||W - Theta||` reached the tolerance."""
        return state.step >= self.steps or state.converged

    def penalty(self, model: nn.Module, state: LCState) -> torch.Tensor:
        """The L-step term to add to the task loss (differentiable in the weights)."""
        weights = self._check_state(state, model)
        terms = [
            lc_penalty(weights[name], state.thetas[name], state.mu, state.multipliers.get(name))
            for name in self.layer_names
        ]
        return torch.stack(terms).sum()

    @torch.no_grad()
    def add_penalty_gradient(self, model: nn.Module, state: LCState, layers: Sequence[str] | None = None) -> None:
        """Adds the penalty's gradient to each weight's `.grad` (after `backward()` of the task loss).

        Equivalent to adding `penalty` to the loss, for callers that cannot change the loss.

        Args:
            model: the network being trained.
            state: the current LC state.
            layers: only these of the algorithm's layers (e.g. those one optimizer steps); default all.

        Raises:
            ValueError: if `layers` names a layer the algorithm does not compress, or `state`
                does not fit `model`.
        """
        weights = self._check_state(state, model)
        if layers is not None:
            unknown = [name for name in layers if name not in weights]
            if unknown:
                raise ValueError(f"`layers` must be among the compressed layers {self.layer_names}, got {unknown}.")
            weights = {name: weights[name] for name in layers}
        for name, weight in weights.items():
            gradient = penalty_gradient(weight, state.thetas[name], state.mu, state.multipliers.get(name))
            if weight.grad is None:
                weight.grad = gradient
            else:
                weight.grad.add_(gradient)

    @torch.no_grad()
    def c_step(self, model: nn.Module, state: LCState, progress: bool | None = False) -> LCStepReport:
        """C step on every layer at `state.mu`, then the multiplier step, then `mu` is raised.

        Updates `state` in place and returns what it did. `progress`: None shows a bar over the
        layers when stdout is a terminal (a C step on VGG16 takes seconds); False (default) none.
        """
        weights = self._check_state(state, model)
        start = time.perf_counter()
        mu = state.mu
        squared_distance = 0.0
        total_cost = 0.0
        bar = progress_bar(len(weights), f"LC C step {state.step}", enabled=progress)
        for name, weight in weights.items():
            bar.update(1)
            weight = weight.detach()
            multiplier = state.multipliers.get(name)
            target = weight if multiplier is None else weight - multiplier / mu
            result = c_step_layer(target, self.costs[name], mu=mu, lam=self.lam)
            state.thetas[name] = result.theta
            state.ranks[name] = result.rank
            state.dense[name] = result.dense
            if multiplier is not None:
                state.multipliers[name] = update_multiplier(multiplier, weight, result.theta, mu)
            squared_distance += float((weight - result.theta).double().pow(2).sum())
            total_cost += result.cost
        bar.close()
        distance = math.sqrt(squared_distance)
        report = LCStepReport(
            step=state.step,
            mu=mu,
            ranks=dict(state.ranks),
            dense=[name for name, dense in state.dense.items() if dense],
            cost=total_cost,
            cost_unit=self.cost_unit,
            distance=distance,
            seconds=time.perf_counter() - start,
        )
        state.history.append(report.to_dict())
        state.step += 1
        state.mu = self.mu_at(state.step)
        state.converged = self.tolerance > 0 and distance <= self.tolerance
        log.info(
            "LC C step %d: mu=%.3g cost=%.4g %s ||W-Theta||=%.4g (%.2f s)",
            report.step, mu, total_cost, self.cost_unit, distance, report.seconds,
        )  # fmt: skip
        return report

    def compress(self, model: nn.Module, state: LCState) -> LowRankRecord:
        """Replaces each factorized layer of `model` by its low-rank form with the Theta factors.

        Layers the last C step kept dense are left as they are (their weights W). A rank-0
        layer becomes rank 1 with zero factors (module docstring). Validates before editing.

        Raises:
            ValueError: if no C step has run yet, or the state does not fit this model.
        """
        self._check_state(state, model)  # also checks the layers are still there, dense, with their shapes
        if state.step == 0:
            raise ValueError("`state` has no C step yet (step 0): run `c_step` before `compress`.")
        ranks = {name: max(state.ranks[name], 1) for name in self.layer_names if not state.dense[name]}
        zero_rank = [name for name in ranks if state.ranks[name] == 0]
        if zero_rank:
            log.info("LC: layers %s have rank 0; built as rank 1 with zero factors (bias only).", zero_rank)
        record = factorize_model(model, ranks, weights={name: state.thetas[name] for name in ranks})
        kept_dense = [name for name in self.layer_names if state.dense[name]]
        log.info("LC: factorized %d layers %s; kept dense: %s", len(ranks), ranks, kept_dense)
        return record

    def _weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        weights = {}
        for name in self.layer_names:
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                layer = None
            if not isinstance(layer, (nn.Linear, nn.Conv2d)) or tuple(layer.weight.shape) != self.weight_shapes[name]:
                raise ValueError(
                    f"Layer {name!r} must be a dense layer with weight shape {self.weight_shapes[name]}, "
                    f"got {type(layer).__name__ if layer is not None else 'nothing'}; was the model already compressed?"
                )
            weights[name] = layer.weight
        return weights

    def _check_state(self, state: LCState, model: nn.Module) -> dict[str, torch.Tensor]:
        """Checks `state` fits these layers, moves its tensors to the weights' devices, returns the weights."""
        weights = self._weights(model)
        if set(state.thetas) != set(self.layer_names):
            raise ValueError(
                f"`state` holds layers {sorted(state.thetas)}, the algorithm compresses {sorted(self.layer_names)}."
            )
        for name, theta in state.thetas.items():
            if tuple(theta.shape) != self.weight_shapes[name]:
                raise ValueError(
                    f"`state.thetas[{name!r}]` must have shape {self.weight_shapes[name]}, got {tuple(theta.shape)}."
                )
        if self.augmented_lagrangian and set(state.multipliers) != set(self.layer_names):
            raise ValueError(
                f"`state` holds multipliers for {sorted(state.multipliers)}, expected {sorted(self.layer_names)} "
                "(augmented Lagrangian)."
            )
        # A state restored from a checkpoint may sit on another device than the model.
        for name, weight in weights.items():
            state.thetas[name] = state.thetas[name].to(device=weight.device, dtype=weight.dtype)
            if name in state.multipliers:
                state.multipliers[name] = state.multipliers[name].to(device=weight.device, dtype=weight.dtype)
        return weights


def _check_schedule(mu_init: float, mu_growth: float, steps: int) -> None:
    if not mu_init > 0:
        raise ValueError(f"`mu_init` (a of mu_t = a * b^t) must be > 0, got {mu_init!r}.")
    if not mu_growth >= 1:
        raise ValueError(f"`mu_growth` (b of mu_t = a * b^t) must be >= 1 so mu grows, got {mu_growth!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` (T) must be an int >= 1, got {steps!r}.")


def _check_layer_names(available: Mapping[str, nn.Module], layers: Sequence[str] | None) -> list[str]:
    if layers is None:
        if not available:
            raise ValueError("The model has no compressible layer (nn.Linear or nn.Conv2d with groups=1).")
        return list(available)
    names = list(layers)
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        raise ValueError(f"`layers` must name compressible layers of the model {list(available)}, got {names}.")
    return names


def _lookup(costs: Mapping[str, LayerCosts], name: str) -> LayerCosts:
    if name not in costs:
        raise ValueError(f"Layer {name!r} is not priced by this cost; priced layers: {list(costs)}.")
    return costs[name]
