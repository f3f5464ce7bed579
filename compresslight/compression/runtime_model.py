"""Device runtime model of a low-rank network (paper 003, section 2).

The inference time of a network whose layer `k` is factorized at rank `r_k` is modelled as
`R(r) = sum_k R_k(r_k)` (eq. 2): each compressible layer is timed *alone*, on this device, in its
low-rank form (`lowrank.factorized_structure`) at a grid of ranks, and an l1-fitted line
`R_k(r) = intercept + slope * r` (robust to the outliers a noisy machine produces) replaces the
lookup table, so only a few ranks per layer need measuring. The dense layer is timed too: keeping
a layer uncompressed is always an option, and the only sensible one where its factorized form is
slower (`layer_costs`).

The rest of the network (activations, pooling, normalization) does not depend on the ranks; its
time is the whole dense network's measured latency minus the sum of the dense layers'
(`rest_s`, possibly negative because eq. 1 is an upper bound), and `predict_network` adds it so
whole-network predictions can be checked against measurements (`evaluate`, paper Fig. 1 right).

Every latency is one statistic of `compresslight.profiling.timing.measure_latency`: the median
(paper 000's protocol, the default) or the minimum, the better estimate of the undisturbed
latency on a machine shared with other work (`statistic="min"`).

Backends: `"torch"` (eager PyTorch, on `device`) and `"onnxruntime"` (each variant exported with
`compresslight.profiling.backends.onnxruntime_runner`, as in the paper: ONNX Runtime).

Example:
    >>> runtime = RuntimeModel.build(model, torch.randn(1, 3, 32, 32), threads=1)
    >>> runtime.save("rm.json")
    >>> runtime = RuntimeModel.load("rm.json")
    >>> runtime.check_compatible(model, device="cpu", threads=1)
    >>> runtime.predict({"features.0": 12})  # seconds, other layers dense
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linprog
from torch import nn

from compresslight.compression.lc import LayerCosts
from compresslight.compression.lowrank import (
    LowRankRecord,
    compressible_layers,
    config_differences,
    factorized_structure,
    layer_config,
    layer_io_shapes,
    max_rank,
)
from compresslight.profiling.backends import backend_version, onnxruntime_runner, validate_backends
from compresslight.profiling.environment import device_name, resolve_device
from compresslight.profiling.progress import progress_bar
from compresslight.profiling.side_by_side import PairedSpeedup, SideBySide
from compresslight.profiling.timing import measure_latency, num_threads

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")  # the profiler's backends (compresslight.profiling.backends)
STATISTICS = ("median", "min")
FORMAT_VERSION = 1

__all__ = ["LayerRuntime", "RuntimeEnvironment", "RuntimeModel", "RuntimeModelEvaluation", "l1_line_fit"]


def l1_line_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-absolute-deviations line `y ~ intercept + slope * x`, as paper 003 fits `R_k`.

    Solved exactly as a linear program (scipy's HiGHS; scipy comes with tensorly):
    minimize `sum t_i` subject to `-t_i <= y_i - intercept - slope * x_i <= t_i`. Inputs are
    scaled to O(1) first because latencies of 1e-5 s are below the solver's tolerances.

    Args:
        x: at least one abscissa (ranks).
        y: as many ordinates (seconds).

    Returns:
        (intercept, slope). One distinct `x`: the median of `y` and slope 0.

    Raises:
        ValueError: if the lengths differ or are 0.
    """
    x_arr = np.asarray(x, dtype=np.float64)
    y_arr = np.asarray(y, dtype=np.float64)
    if x_arr.shape != y_arr.shape or x_arr.ndim != 1 or x_arr.size == 0:
        raise ValueError(f"`x` and `y` must be 1-D of the same non-zero length, got {x_arr.shape} and {y_arr.shape}.")
    if np.unique(x_arr).size < 2:
        return float(np.median(y_arr)), 0.0
    x_scale = float(np.abs(x_arr).max()) or 1.0
    y_scale = float(np.abs(y_arr).max()) or 1.0
    xs, ys = x_arr / x_scale, y_arr / y_scale
    m = xs.size
    # variables: intercept, slope, t_1..t_m
    c = np.concatenate([[0.0, 0.0], np.ones(m)])
    ones, eye = np.ones((m, 1)), np.eye(m)
    a_ub = np.block([[-ones, -xs[:, None], -eye], [ones, xs[:, None], -eye]])
    b_ub = np.concatenate([-ys, ys])
    bounds = [(None, None), (None, None)] + [(0, None)] * m
    result = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
    if not result.success:  # pragma: no cover - a bounded feasible LP always solves
        raise RuntimeError(f"l1 line fit failed: {result.message}")
    intercept, slope = result.x[:2]
    return float(intercept * y_scale), float(slope * y_scale / x_scale)


@dataclasses.dataclass
class RuntimeEnvironment:
    """Where and how a runtime model was measured; a model is only valid there."""

    backend: str
    device: str
    device_name: str
    threads: int
    batch_size: int
    torch_version: str
    onnxruntime_version: str | None
    warmup: int
    iters: int
    statistic: str = "median"

    @classmethod
    def current(
        cls,
        *,
        backend: str,
        device: torch.device | str,
        threads: int,
        batch_size: int,
        warmup: int,
        iters: int,
        statistic: str,
    ) -> RuntimeEnvironment:
        return cls(
            backend=backend,
            device=torch.device(device).type,
            device_name=device_name(torch.device(device)),
            threads=threads,
            batch_size=batch_size,
            torch_version=str(torch.__version__),  # a TorchVersion would not load with weights_only
            onnxruntime_version=backend_version("onnxruntime") if backend == "onnxruntime" else None,
            warmup=warmup,
            iters=iters,
            statistic=statistic,
        )


@dataclasses.dataclass
class LayerRuntime:
    """Measurements and fitted line of one layer (seconds)."""

    config: dict[str, Any]
    input_shape: list[int]
    max_rank: int
    ranks: list[int]
    latencies_s: list[float]
    dense_s: float
    intercept_s: float
    slope_s: float

    def factorized_s(self, ranks: np.ndarray) -> np.ndarray:
        """Fitted latency of the factorized layer at each of `ranks`, clipped at 0."""
        return np.maximum(self.intercept_s + self.slope_s * np.asarray(ranks, dtype=np.float64), 0.0)

    def predict_s(self, rank: int | None) -> float:
        """`R_k(rank)`; `None` means the layer stays dense (its measured latency)."""
        return self.dense_s if rank is None else float(self.factorized_s(np.asarray(rank)))


@dataclasses.dataclass
class RuntimeModelEvaluation:
    """Predicted vs measured whole-network latency on random rank configurations (seconds).

    Attributes:
        configurations: the sampled ranks, one dict per sample.
        predicted_s: `RuntimeModel.predict_network` of each.
        measured_s: measured whole-network latency of each (median over its side-by-side rounds).
        dense_measured_s: the dense network, measured in the same rounds as the samples (median);
            compared with `dense_built_s` (measured when the runtime model was built) it shows
            whether the machine's speed drifted in between (e.g. other work on a shared machine).
        dense_built_s: `RuntimeModel.network_dense_s`.
        measured_speedup: each sample's speedup over the dense network, measured side by side
            (paired rounds; `compresslight.profiling.side_by_side`): free of the drift between
            building the model and evaluating it.
        measured_speedup_low: lower bounds of their confidence intervals.
        measured_speedup_high: upper bounds.
        busy: whether any sample was measured on a busy machine.
    """

    configurations: list[dict[str, int]]
    predicted_s: list[float]
    measured_s: list[float]
    dense_measured_s: float
    dense_built_s: float
    measured_speedup: list[float] = dataclasses.field(default_factory=list)
    measured_speedup_low: list[float] = dataclasses.field(default_factory=list)
    measured_speedup_high: list[float] = dataclasses.field(default_factory=list)
    busy: bool = False

    @property
    def predicted_speedup(self) -> list[float]:
        """`dense_built_s / predicted_s` of each sample: the speedup the runtime model promises."""
        return [self.dense_built_s / p for p in self.predicted_s]

    @property
    def mean_speedup_error(self) -> float:
        """Mean of |predicted - measured speedup| / measured speedup: the model's error as a ratio."""
        if not self.measured_speedup:
            return math.nan
        predicted, measured = np.asarray(self.predicted_speedup), np.asarray(self.measured_speedup)
        return float(np.mean(np.abs(predicted - measured) / measured))

    @property
    def mean_absolute_error_s(self) -> float:
        return float(np.mean(np.abs(np.subtract(self.predicted_s, self.measured_s))))

    @property
    def mean_relative_error(self) -> float:
        """Mean of |predicted - measured| / measured."""
        return float(np.mean(np.abs(np.subtract(self.predicted_s, self.measured_s)) / np.asarray(self.measured_s)))

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "mean_absolute_error_s": self.mean_absolute_error_s,
            "mean_relative_error": self.mean_relative_error,
            "predicted_speedup": self.predicted_speedup,
            "mean_speedup_error": self.mean_speedup_error,
        }


class RuntimeModel:
    """Per-layer latency as a function of rank on one device: `R(r) = sum_k R_k(r_k)`.

    Build with `RuntimeModel.build`, or `load` a saved one. As the LC algorithm's cost
    (`compresslight.compression.lc.RankCost`), costs are in **milliseconds**.

    Attributes:
        layers: measured layer name -> `LayerRuntime`.
        environment: where it was measured.
        input_shape: the network input's shape (batch dimension = `environment.batch_size`).
        network_dense_s: measured latency of the whole uncompressed network.
        architecture: name -> `layer_config` of every compressible layer of the network
            (measured or not): the fingerprint `check_compatible` compares.
    """

    unit = "ms"

    def __init__(
        self,
        layers: dict[str, LayerRuntime],
        environment: RuntimeEnvironment,
        input_shape: list[int],
        network_dense_s: float,
        architecture: dict[str, dict[str, Any]],
    ) -> None:
        self.layers = layers
        self.environment = environment
        self.input_shape = list(input_shape)
        self.network_dense_s = network_dense_s
        self.architecture = architecture

    # ---------------------------------------------------------------- building

    @classmethod
    def build(
        cls,
        model: nn.Module,
        example_inputs: torch.Tensor,
        *,
        device: torch.device | str = "cpu",
        backend: str = "torch",
        threads: int | None = None,
        batch_size: int = 1,
        grid_points: int = 8,
        rank_grid: Mapping[str, Sequence[int]] | None = None,
        layers: Sequence[str] | None = None,
        warmup: int = 5,
        iters: int = 50,
        statistic: str = "median",
        progress: bool | None = None,
    ) -> RuntimeModel:
        """Measures every compressible layer of `model`, dense and at a grid of ranks.

        Args:
            model: the network (not modified; layers are copied to `device`).
            example_inputs: one input batch; only its shape per sample matters (the batch
                dimension becomes `batch_size`).
            device: where to measure (`"cpu"`, `"cuda"`, ...).
            backend: `"torch"` (eager) or `"onnxruntime"` (CPU).
            threads: CPU threads during measurement (`torch.set_num_threads`, or the ONNX
                Runtime session's intra-op threads); default: the current torch setting.
            batch_size: batch size of the measured inputs (paper 003: 1).
            grid_points: ranks measured per layer, evenly spaced in [1, full rank].
            rank_grid: explicit ranks for some layers (name -> ranks), overriding `grid_points`.
            layers: names of the layers to model; default every compressible layer.
            warmup: untimed calls per measurement.
            iters: timed calls per measurement.
            statistic: which of them a measurement keeps: `"median"` or `"min"` (module docstring).
            progress: False: no progress bar; None: one when stdout is a terminal.

        Raises:
            ValueError: for an unknown backend, a bad count, a layer that is not compressible, or a
                rank grid outside a layer's dimensions.
        """
        device = _check_build_arguments(backend, device, threads, batch_size, grid_points, statistic, example_inputs)
        available = compressible_layers(model)
        names, grids = _rank_grids(available, layers, grid_points, rank_grid)
        threads = torch.get_num_threads() if threads is None else threads
        environment = RuntimeEnvironment.current(
            backend=backend,
            device=device,
            threads=threads,
            batch_size=batch_size,
            warmup=warmup,
            iters=iters,
            statistic=statistic,
        )
        io_shapes = layer_io_shapes(model, example_inputs, names)
        start = time.perf_counter()
        measured: dict[str, LayerRuntime] = {}
        with num_threads(threads), progress_bar(len(names), "Building the runtime model", progress) as bar:
            for name in names:
                bar.update(1)
                input_shape = [batch_size, *io_shapes[name][0][1:]]
                measured[name] = _measure_layer(name, available[name], input_shape, grids[name], environment, device)
            input_shape = [batch_size, *example_inputs.shape[1:]]
            network_dense_s = _latency(model, input_shape, environment, device)
        log.info("runtime model built in %.1f s for %d layers", time.perf_counter() - start, len(names))
        architecture = {name: layer_config(layer) for name, layer in available.items()}
        return cls(measured, environment, input_shape, network_dense_s, architecture)

    # ---------------------------------------------------------------- prediction

    @property
    def rest_s(self) -> float:
        """Rank-independent part of the network: dense network minus its dense layers."""
        return self.network_dense_s - sum(layer.dense_s for layer in self.layers.values())

    def predict(self, ranks: Mapping[str, int | None]) -> float:
        """`R(r) = sum_k R_k(r_k)` in seconds over the modelled layers; absent or `None` = dense.

        Raises:
            ValueError: for a layer that is not modelled or a rank outside [1, full rank].
        """
        unknown = set(ranks) - set(self.layers)
        if unknown:
            raise ValueError(f"`ranks` names layers the runtime model does not hold: {sorted(unknown)}.")
        total = 0.0
        for name, layer in self.layers.items():
            rank = ranks.get(name)
            if rank is not None and not 1 <= rank <= layer.max_rank:
                raise ValueError(f"Rank of layer {name!r} must be in [1, {layer.max_rank}], got {rank!r}.")
            total += layer.predict_s(rank)
        return total

    def predict_network(self, ranks: Mapping[str, int | None]) -> float:
        """Whole-network latency in seconds: `rest_s + R(r)`."""
        return self.rest_s + self.predict(ranks)

    def layer_costs(self, name: str) -> LayerCosts:
        """The LC C step's cost of layer `name` in milliseconds (`lc.RankCost` interface).

        `factorized[r]` for r = 0..full rank is the fitted line (rank 0 extrapolates it); `dense`
        is the measured uncompressed layer.

        Raises:
            ValueError: if `name` is not modelled.
        """
        if name not in self.layers:
            raise ValueError(f"Layer {name!r} is not in the runtime model; modelled layers: {list(self.layers)}.")
        layer = self.layers[name]
        factorized = layer.factorized_s(np.arange(layer.max_rank + 1)) * 1e3
        return LayerCosts(factorized=factorized, dense=layer.dense_s * 1e3)

    # ---------------------------------------------------------------- compatibility

    def check_compatible(
        self,
        model: nn.Module,
        *,
        example_inputs: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        threads: int | None = None,
        backend: str | None = None,
        batch_size: int | None = None,
    ) -> None:
        """Refuses to price `model` (or this machine) with a runtime model measured for another.

        The architecture (every compressible layer's name and hyperparameters) is always
        compared; input shapes if `example_inputs` is given; the device type *and* this
        machine's hardware name for it if `device` is given; the others if given.

        Raises:
            ValueError: saying what differs.
        """
        found = {name: layer_config(layer) for name, layer in compressible_layers(model).items()}
        if found != self.architecture:
            raise ValueError(
                "The runtime model was measured for another architecture: "
                + _describe_difference(self.architecture, found)
            )
        if example_inputs is not None:
            io_shapes = layer_io_shapes(model, example_inputs, list(self.layers))
            for name, layer in self.layers.items():
                if list(io_shapes[name][0][1:]) != layer.input_shape[1:]:
                    raise ValueError(
                        f"The runtime model was measured for other input shapes: layer {name!r} had inputs "
                        f"{layer.input_shape[1:]} per sample, got {list(io_shapes[name][0][1:])}."
                    )
        env = self.environment
        if device is not None:
            resolved = resolve_device(device)
            device_type, name_here = resolved.type, device_name(resolved)
            if device_type != env.device or name_here != env.device_name:
                raise ValueError(
                    f"The runtime model was measured on device {env.device!r} ({env.device_name}), "
                    f"not on {device_type!r} ({name_here}); build one on this device."
                )
        settings = (
            ("threads", threads, env.threads),
            ("backend", backend, env.backend),
            ("batch_size", batch_size, env.batch_size),
        )
        for arg, wanted, recorded in settings:
            if wanted is not None and wanted != recorded:
                raise ValueError(f"The runtime model was measured with {arg}={recorded!r}, not {arg}={wanted!r}.")

    # ---------------------------------------------------------------- evaluation

    def evaluate(
        self,
        model: nn.Module,
        n_samples: int = 20,
        seed: int = 0,
        device: torch.device | str | None = None,
        rounds: int = 3,
        progress: bool | None = None,
    ) -> RuntimeModelEvaluation:
        """Measures random low-rank versions of `model` against `predict_network` (paper Fig. 1 right).

        Each sample draws every modelled layer's rank uniformly from [1, full rank], factorizes a
        copy of `model` at those ranks and measures the whole network side by side with the dense
        one (`rounds` alternating rounds, `compresslight.profiling.side_by_side`) in the
        environment the model was built in (backend, threads, batch size, statistic). The paired
        speedup is compared with the predicted one (`mean_speedup_error`), which the machine's
        drift since the build does not touch; the absolute errors are kept as well.

        Args:
            model: the architecture the runtime model was built for (not modified).
            n_samples: random configurations.
            seed: of the rank sampler.
            device: where to measure; default the recorded device type.
            rounds: side-by-side rounds per sample (>= 2).
            progress: False: no progress bar; None: one when stdout is a terminal.

        Raises:
            ValueError: if `n_samples` < 1, `rounds` < 2 or the model / device is not the one measured.
        """
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"`n_samples` must be an int >= 1, got {n_samples!r}.")
        env = self.environment
        options = SideBySide(
            warmup=env.warmup,
            iters=env.iters,
            min_rounds=rounds,
            max_rounds=rounds,
            target_width=None,
            time_budget_s=None,
        )
        device = resolve_device(env.device if device is None else device)
        self.check_compatible(model, device=device)
        timing_device = device if env.backend == "torch" else torch.device("cpu")

        def timer(run: Callable[[], Any]) -> float:
            stats = measure_latency(run, device=timing_device, warmup=env.warmup, iters=env.iters)
            return stats.min_s if env.statistic == "min" else stats.median_s

        rng = random.Random(seed)
        configurations, predicted, measured, dense = [], [], [], []
        speedups: list[PairedSpeedup] = []
        busy = False
        with num_threads(env.threads), progress_bar(n_samples, "Evaluating the runtime model", progress) as bar:
            dense_run = _runner(model, self.input_shape, env, device)
            for _ in range(n_samples):
                ranks = {name: rng.randint(1, layer.max_rank) for name, layer in self.layers.items()}
                variant = copy.deepcopy(model).cpu()
                LowRankRecord.from_layers(variant, ranks).apply(variant)
                contenders = {"dense": dense_run, "low-rank": _runner(variant, self.input_shape, env, device)}
                result = options.run(contenders, "dense", device=timing_device, timer=timer, progress=False)
                speedups.append(result.speedup_of("low-rank"))
                dense += result.round_latencies_s["dense"]
                measured.append(speedups[-1].candidate_median_s)
                busy = busy or result.load.busy
                predicted.append(self.predict_network(ranks))
                configurations.append(ranks)
                bar.update(1)
        result = RuntimeModelEvaluation(
            configurations, predicted, measured, float(np.median(dense)), self.network_dense_s,
            measured_speedup=[s.estimate for s in speedups], measured_speedup_low=[s.low for s in speedups],
            measured_speedup_high=[s.high for s in speedups], busy=busy,
        )  # fmt: skip
        log.info(
            "runtime model error on %d random configurations: %.3f ms mean absolute (%.1f%%); speedup over dense "
            "(side by side) %.1f%% off the predicted one%s",
            n_samples, result.mean_absolute_error_s * 1e3, result.mean_relative_error * 100,
            result.mean_speedup_error * 100, " (measured on a BUSY machine)" if busy else "",
        )  # fmt: skip
        return result

    # ---------------------------------------------------------------- persistence

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "environment": dataclasses.asdict(self.environment),
            "input_shape": self.input_shape,
            "network_dense_s": self.network_dense_s,
            "architecture": self.architecture,
            "layers": {name: dataclasses.asdict(layer) for name, layer in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RuntimeModel:
        """Rebuilds a runtime model from `to_dict()` output.

        Raises:
            ValueError: for another format version or missing fields.
        """
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"Runtime model `format_version` must be {FORMAT_VERSION}, got {data.get('format_version')!r}."
            )
        try:
            return cls(
                layers={name: LayerRuntime(**layer) for name, layer in data["layers"].items()},
                environment=RuntimeEnvironment(**data["environment"]),
                input_shape=data["input_shape"],
                network_dense_s=data["network_dense_s"],
                architecture=data["architecture"],
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"Not a runtime model file: {error}.") from error

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the runtime model, with its environment and architecture, as JSON (atomically: it is
        reused as an input, so a failed write must not leave half a file)."""
        from compresslight.atomic_io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RuntimeModel:
        """Reads a file written by `save`.

        Raises:
            FileNotFoundError: if `path` does not exist.
            ValueError: if it is not a runtime model.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Runtime model file {str(path)!r} does not exist; build one with `compresslight runtime-model`."
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"Runtime model file {str(path)!r} is not JSON: {error}.") from error
        return cls.from_dict(data)


def _check_build_arguments(
    backend: str,
    device: torch.device | str,
    threads: int | None,
    batch_size: int,
    grid_points: int,
    statistic: str,
    example_inputs: Any,
) -> torch.device:
    """Validates `RuntimeModel.build`'s settings; returns the resolved device."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {backend!r}.")
    device = resolve_device(device)
    validate_backends(backend, device)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"`threads` must be an int >= 1 or None, got {threads!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
    if isinstance(grid_points, bool) or not isinstance(grid_points, int) or grid_points < 2:
        raise ValueError(f"`grid_points` must be an int >= 2 (a line needs two ranks), got {grid_points!r}.")
    if statistic not in STATISTICS:
        raise ValueError(f"`statistic` must be one of {list(STATISTICS)}, got {statistic!r}.")
    if not isinstance(example_inputs, torch.Tensor):
        raise ValueError(f"`example_inputs` must be a tensor, got {type(example_inputs).__name__}.")
    return device


def _rank_grids(
    available: Mapping[str, nn.Module],
    layers: Sequence[str] | None,
    grid_points: int,
    rank_grid: Mapping[str, Sequence[int]] | None,
) -> tuple[list[str], dict[str, list[int]]]:
    """The modelled layers and the ranks measured for each (`grid_points` evenly, or `rank_grid`'s)."""
    names = list(available) if layers is None else list(layers)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"`layers` must name compressible layers of the model {list(available)}, got {unknown}.")
    grids = {name: _even_grid(max_rank(available[name]), grid_points) for name in names}
    for name, ranks in (rank_grid or {}).items():
        if name not in grids:
            raise ValueError(f"`rank_grid` names {name!r}, which is not a modelled layer; modelled layers: {names}.")
        full = max_rank(available[name])
        ranks = sorted({int(r) for r in ranks})
        if not ranks or ranks[0] < 1 or ranks[-1] > full:
            raise ValueError(
                f"`rank_grid[{name!r}]` must hold ranks within [1, {full}] (the layer's dimensions), "
                f"got {list(rank_grid[name])}."
            )
        grids[name] = ranks
    return names, grids


def _measure_layer(
    name: str,
    layer: nn.Module,
    input_shape: list[int],
    ranks: list[int],
    environment: RuntimeEnvironment,
    device: torch.device,
) -> LayerRuntime:
    """One layer dense and factorized at each of `ranks`, with the L1 line through the latter."""
    dense_s = _latency(layer, input_shape, environment, device)
    latencies = [_latency(factorized_structure(layer, rank), input_shape, environment, device) for rank in ranks]
    intercept, slope = l1_line_fit(ranks, latencies)
    log.info(
        "runtime model %s: dense %.3f ms, factorized %.4f + %.5f r ms (%d ranks)",
        name,
        dense_s * 1e3,
        intercept * 1e3,
        slope * 1e3,
        len(ranks),
    )
    return LayerRuntime(
        config=layer_config(layer),
        input_shape=input_shape,
        max_rank=max_rank(layer),
        ranks=ranks,
        latencies_s=latencies,
        dense_s=dense_s,
        intercept_s=intercept,
        slope_s=slope,
    )


def _even_grid(full_rank: int, points: int) -> list[int]:
    return sorted({int(r) for r in np.rint(np.linspace(1, full_rank, min(points, full_rank)))})


def _latency(
    module: nn.Module, input_shape: Sequence[int], environment: RuntimeEnvironment, device: torch.device
) -> float:
    """Seconds of one forward pass of `module` on a random input of `input_shape` (`environment.statistic`)."""
    run = _runner(module, input_shape, environment, device)
    timing_device = device if environment.backend == "torch" else torch.device("cpu")
    stats = measure_latency(run, device=timing_device, warmup=environment.warmup, iters=environment.iters)
    return stats.min_s if environment.statistic == "min" else stats.median_s


def _runner(
    module: nn.Module, input_shape: Sequence[int], environment: RuntimeEnvironment, device: torch.device
) -> Callable[[], Any]:
    module = copy.deepcopy(module).to(device).eval()
    x = torch.randn(*input_shape, device=device)
    if environment.backend == "torch":

        def run() -> Any:
            with torch.inference_mode():
                return module(x)

        return run
    return onnxruntime_runner(module, x, environment.threads)


def _describe_difference(expected: Mapping[str, Any], found: Mapping[str, Any]) -> str:
    missing = [name for name in expected if name not in found]
    extra = [name for name in found if name not in expected]
    parts = []
    if missing:
        parts.append(f"layers {missing} are missing")
    if extra:
        parts.append(f"layers {extra} are not in the measured architecture")
    for name in expected:
        if name in found and expected[name] != found[name]:
            fields = config_differences(expected[name], found[name])
            parts.append(f"layer {name!r} differs (field: (measured, found)): {fields}")
    return "; ".join(parts) + "."
