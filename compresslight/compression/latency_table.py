"""Per-layer latency tables: measured latency of every conv / linear layer as a function of its
input and output channels, on the target (backend, batch size, threads).

Channel pruning changes a layer's two widths (its inputs follow the group before it, its outputs
the group it belongs to), so each layer gets a 2-D table: the layer, with the BatchNorm that
follows it, is timed alone at a grid of (input, output) channel counts and interpolated
bilinearly in between. The grid is multiples of a step counted down from the full width (64, 56,
..., 8): the counts a pruner may choose, and the ones where the table can show which widths are
fast. Layers with the same hyperparameters and input size share measurements.

Depth pruning removes whole residual blocks (`compresslight.compression.depth`): with the block's
layers, the elementwise work joining its branches goes too. That is priced by `block_overhead_s`,
the measured `relu(x) + y` at the block's output shape. The rest of the network (pooling, the
other activations) is `rest_s`: the whole network's measured latency minus its layers and block
overheads at full width, as in paper 003's runtime model (`runtime_model.RuntimeModel`, whose
environment, timing and ONNX Runtime runner this module reuses).

`load_or_build` reuses a saved table when the environment (backend, device and its hardware name,
threads, batch size, torch / ONNX Runtime versions, timing settings), the architecture and the
grid match, and measures a new one otherwise.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compresslight.compression.depth import ShortcutBlock, removable_blocks
from compresslight.compression.runtime_model import BACKENDS, STATISTICS, RuntimeEnvironment, _latency
from compresslight.profiling.backends import _import_onnxruntime, validate_backends
from compresslight.profiling.environment import resolve_device
from compresslight.profiling.side_by_side import PairedSpeedup, SideBySide, compare_models
from compresslight.profiling.timing import measure_latency, num_threads

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

__all__ = ["LatencyTable", "LayerTable", "channel_grid", "measure_speedup"]


def channel_grid(channels: int, points: int) -> list[int]:
    """Multiples of `ceil(channels / points)` counted down from `channels`, ascending.

    `channel_grid(64, 8)` is [8, 16, ..., 64]; `channel_grid(3, 8)` is [1, 2, 3].
    """
    step = max(1, -(-channels // points))
    return sorted(range(channels, 0, -step))


@dataclasses.dataclass
class LayerTable:
    """Measured latency (seconds) of one layer over a grid of (input, output) channels.

    Attributes:
        config: the layer's hyperparameters at full width (`lowrank.layer_config`).
        input_size: the spatial size of its input per sample ([] for a linear layer).
        norm: whether the following BatchNorm was timed with it.
        in_grid: measured input channel counts, ascending.
        out_grid: measured output channel counts, ascending.
        latencies_s: `latencies_s[i][j]` at (`in_grid[i]`, `out_grid[j]`).
    """

    config: dict[str, Any]
    input_size: list[int]
    norm: bool
    in_grid: list[int]
    out_grid: list[int]
    latencies_s: list[list[float]]

    def predict_s(self, in_channels: float, out_channels: float) -> float:
        """Bilinear interpolation inside the grid, linear extrapolation below its first point,
        the last value above it. Plain Python: the allocation calls this ~10^5 times."""
        i0, i1, wi = _segment(self.in_grid, in_channels)
        o0, o1, wo = _segment(self.out_grid, out_channels)
        rows = self.latencies_s
        low = rows[i0][o0] * (1 - wo) + rows[i0][o1] * wo
        high = rows[i1][o0] * (1 - wo) + rows[i1][o1] * wo
        return max(low * (1 - wi) + high * wi, 0.0)


def _segment(grid: Sequence[int], x: float) -> tuple[int, int, float]:
    """Indices of the grid segment holding `x` and its weight toward the upper end."""
    last = len(grid) - 1
    if last == 0 or x >= grid[-1]:
        return last, last, 0.0
    # below the grid (e.g. 1 channel of a 64-wide layer): extend the first segment
    index = 0 if x < grid[0] else bisect.bisect_right(grid, x) - 1
    return index, index + 1, (x - grid[index]) / (grid[index + 1] - grid[index])


class LatencyTable:
    """Latency of a network as a function of its layers' widths and removed blocks.

    Attributes:
        layers: conv / linear name -> `LayerTable`.
        block_overhead_s: removable block name -> seconds its removal saves besides its layers.
        environment: where it was measured.
        input_shape: network input shape (batch dimension = `environment.batch_size`).
        network_dense_s: measured latency of the whole network as built.
        grid_points: grid points per channel dimension.
    """

    def __init__(
        self,
        layers: dict[str, LayerTable],
        block_overhead_s: dict[str, float],
        environment: RuntimeEnvironment,
        input_shape: list[int],
        network_dense_s: float,
        grid_points: int,
    ) -> None:
        self.layers = layers
        self.block_overhead_s = block_overhead_s
        self.environment = environment
        self.input_shape = list(input_shape)
        self.network_dense_s = network_dense_s
        self.grid_points = grid_points

    # ---------------------------------------------------------------- building

    @classmethod
    def build(
        cls,
        model: nn.Module,
        example_inputs: torch.Tensor,
        *,
        backend: str = "torch",
        batch_size: int = 1,
        threads: int = 1,
        device: torch.device | str = "cpu",
        grid_points: int = 8,
        warmup: int = 5,
        iters: int = 50,
        statistic: str = "median",
    ) -> LatencyTable:
        """Measures every conv / linear layer of `model` at a grid of widths, and the whole model.

        Args:
            model: the network at full width (not modified).
            example_inputs: one input batch; only its per-sample shape matters.
            backend: `"torch"` (eager) or `"onnxruntime"`.
            batch_size: batch size of the measured inputs.
            threads: CPU threads (torch intra-op, or the ONNX Runtime session's).
            device: where to measure.
            grid_points: widths measured per channel dimension (`channel_grid`).
            warmup: untimed calls per measurement.
            iters: timed calls per measurement.
            statistic: `"median"` or `"min"` of the timed calls.

        Raises:
            ValueError: for an unknown backend or statistic, or a bad count.
        """
        device = _check_table_arguments(backend, device, batch_size, threads, grid_points, statistic)
        environment = RuntimeEnvironment.current(
            backend=backend,
            device=device,
            threads=threads,
            batch_size=batch_size,
            warmup=warmup,
            iters=iters,
            statistic=statistic,
        )
        trace = _trace(model, example_inputs)
        cache: dict[str, float] = {}  # one measurement per distinct layer configuration, by its JSON key
        started = time.perf_counter()
        with num_threads(threads):
            layers = {
                name: _measure_layer_table(layer, input_size, norm, grid_points, environment, device, cache)
                for name, (layer, input_size, norm) in trace.layers.items()
            }
            overheads = {}
            for name, output_shape in trace.block_outputs.items():
                text = json.dumps({"join": output_shape[1:]}, sort_keys=True)
                if text not in cache:
                    cache[text] = _join_latency([batch_size, *output_shape[1:]], environment, device)
                overheads[name] = cache[text]
            input_shape = [batch_size, *example_inputs.shape[1:]]
            network_dense_s = _latency(model, input_shape, environment, device)
        log.info(
            "latency table: %d layers, %d distinct measurements in %.1f s; network %.3f ms",
            len(layers),
            len(cache),
            time.perf_counter() - started,
            network_dense_s * 1e3,
        )
        return cls(layers, overheads, environment, input_shape, network_dense_s, grid_points)

    # ---------------------------------------------------------------- prediction

    @property
    def rest_s(self) -> float:
        """What no width changes: the network minus its layers and block overheads at full width."""
        full = sum(table.latencies_s[-1][-1] for table in self.layers.values())  # grids end at full width
        return self.network_dense_s - full - sum(self.block_overhead_s.values())

    def predict_s(self, widths: Mapping[str, tuple[float, float]], removed_blocks: Sequence[str] = ()) -> float:
        """Predicted network latency with layer name -> (input, output) channels.

        Layers absent from `widths` are gone (inside a removed block); removed blocks also lose
        their overhead.

        Raises:
            ValueError: for a layer or block the table does not hold.
        """
        unknown = [name for name in widths if name not in self.layers]
        unknown += [name for name in removed_blocks if name not in self.block_overhead_s]
        if unknown:
            raise ValueError(f"The latency table holds no layer or block named {unknown}; was it built for this model?")
        total = self.rest_s + sum(self.block_overhead_s.values())
        total -= sum(self.block_overhead_s[name] for name in removed_blocks)
        return total + sum(self.layers[name].predict_s(*pair) for name, pair in widths.items())

    def predict_model(self, model: nn.Module) -> float:
        """Predicted latency of `model`: the table's network after pruning and block removal.

        Raises:
            ValueError: if `model` has a layer the table does not hold.
        """
        # A removed block's layers are gone from the model; its shortcut's keep their names.
        widths = {
            name: _widths(module)
            for name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear))
        }
        return self.predict_s(widths, _removed(model))

    # ---------------------------------------------------------------- compatibility

    def mismatch(
        self, model: nn.Module, example_inputs: torch.Tensor, environment: RuntimeEnvironment, grid_points: int
    ) -> str | None:
        """Why this table does not price `model` in `environment`, or None if it does."""
        wanted = dataclasses.asdict(environment)
        recorded = dataclasses.asdict(self.environment)
        different = {key: (recorded[key], wanted[key]) for key in wanted if wanted[key] != recorded[key]}
        if different:
            return f"environment differs (field: (table, now)): {different}"
        if grid_points != self.grid_points:
            return f"grid_points differs: table {self.grid_points}, now {grid_points}"
        if list(example_inputs.shape[1:]) != self.input_shape[1:]:
            return f"input shape differs: table {self.input_shape[1:]}, now {list(example_inputs.shape[1:])}"
        found = {name: _config(layer) for name, (layer, _, _) in _trace(model, example_inputs).layers.items()}
        expected = {name: table.config for name, table in self.layers.items()}
        if found != expected:
            differing = sorted(name for name in found.keys() | expected.keys() if found.get(name) != expected.get(name))
            return f"architecture differs in layers {differing[:8]}"
        return None

    # ---------------------------------------------------------------- persistence

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "environment": dataclasses.asdict(self.environment),
            "input_shape": self.input_shape,
            "network_dense_s": self.network_dense_s,
            "grid_points": self.grid_points,
            "block_overhead_s": self.block_overhead_s,
            "layers": {name: dataclasses.asdict(table) for name, table in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        """Rebuilds a table from `to_dict()` output.

        Raises:
            ValueError: for another format version or missing fields.
        """
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"Latency table `format_version` must be {FORMAT_VERSION}, got {data.get('format_version')!r}."
            )
        try:
            return cls(
                layers={name: LayerTable(**table) for name, table in data["layers"].items()},
                block_overhead_s=dict(data["block_overhead_s"]),
                environment=RuntimeEnvironment(**data["environment"]),
                input_shape=data["input_shape"],
                network_dense_s=data["network_dense_s"],
                grid_points=data["grid_points"],
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"Not a latency table: {error}.") from error

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the table as JSON (to a temporary file first: a crash never leaves half a table)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyTable:
        """Reads a file written by `save`.

        Raises:
            FileNotFoundError: if `path` does not exist.
            ValueError: if it is not a latency table.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Latency table file {str(path)!r} does not exist.")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise ValueError(f"Latency table file {str(path)!r} is not JSON: {error}.") from error

    @classmethod
    def load_or_build(
        cls, path: str | os.PathLike[str] | None, model: nn.Module, example_inputs: torch.Tensor, **settings: Any
    ) -> LatencyTable:
        """The table saved at `path` if it was measured for this model and environment, else a new
        one (saved there). `settings` are `build`'s keyword arguments.
        """
        if path is not None and Path(path).is_file():
            table = cls.load(path)
            device = resolve_device(settings.get("device", "cpu"))
            environment = RuntimeEnvironment.current(
                backend=settings.get("backend", "torch"), device=device, threads=settings.get("threads", 1),
                batch_size=settings.get("batch_size", 1), warmup=settings.get("warmup", 5),
                iters=settings.get("iters", 50), statistic=settings.get("statistic", "median"),
            )  # fmt: skip
            reason = table.mismatch(model, example_inputs, environment, settings.get("grid_points", 8))
            if reason is None:
                log.info("latency table: reusing %s", path)
                return table
            log.info("latency table: measuring again, %s does not apply: %s", path, reason)
        table = cls.build(model, example_inputs, **settings)
        if path is not None:
            table.save(path)
        return table


# --- tracing and measured modules --------------------------------------------------------------


@dataclasses.dataclass
class _Trace:
    layers: dict[str, tuple[nn.Module, list[int], bool]]  # name -> (layer, input spatial size, BN follows)
    block_outputs: dict[str, list[int]]  # removable block -> output shape


def _trace(model: nn.Module, example_inputs: torch.Tensor) -> _Trace:
    """One forward pass with hooks: each layer's input size, whether a BatchNorm consumes its
    output directly (timed together: ONNX Runtime folds them), each removable block's output shape."""
    named = dict(model.named_modules())
    blocks = set(removable_blocks(model))
    inputs: dict[str, list[int]] = {}
    outputs: dict[int, str] = {}  # id of a layer's output tensor -> layer name
    normed: set[str] = set()
    block_outputs: dict[str, list[int]] = {}

    def hook(name: str, module: nn.Module):
        def record(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                inputs.setdefault(name, list(args[0].shape[2:]))
                outputs[id(output)] = name
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and id(args[0]) in outputs:
                normed.add(outputs[id(args[0])])
            elif name in blocks:
                block_outputs.setdefault(name, list(output.shape))

        return record

    handles = [module.register_forward_hook(hook(name, module)) for name, module in named.items() if name]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_inputs[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    layers = {name: (named[name], size, name in normed) for name, size in inputs.items()}
    return _Trace(layers, {name: block_outputs[name] for name in blocks if name in block_outputs})


def _widths(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def _config(layer: nn.Module) -> dict[str, Any]:
    if isinstance(layer, nn.Linear):
        return {"type": "linear", "in": layer.in_features, "out": layer.out_features, "bias": layer.bias is not None}
    return {
        "type": type(layer).__name__, "in": layer.in_channels, "out": layer.out_channels,
        "kernel_size": list(layer.kernel_size), "stride": list(layer.stride),
        "padding": layer.padding if isinstance(layer.padding, str) else list(layer.padding),
        "dilation": list(layer.dilation), "groups": layer.groups, "bias": layer.bias is not None,
    }  # fmt: skip


def _resized(layer: nn.Module, in_channels: int, out_channels: int, norm: bool) -> nn.Module:
    """A fresh layer like `layer` with other widths (and its BatchNorm)."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(in_channels, out_channels, bias=layer.bias is not None)
    conv = nn.Conv2d(
        in_channels, out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
        dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
    )  # fmt: skip
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels)) if norm else conv


def _check_table_arguments(
    backend: str, device: torch.device | str, batch_size: int, threads: int, grid_points: int, statistic: str
) -> torch.device:
    """Validates `LatencyTable.build`'s settings; returns the resolved device."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {backend!r}.")
    device = resolve_device(device)
    validate_backends(backend, device)
    for name, value, minimum in (
        ("batch_size", batch_size, 1),
        ("threads", threads, 1),
        ("grid_points", grid_points, 2),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    if statistic not in STATISTICS:
        raise ValueError(f"`statistic` must be one of {list(STATISTICS)}, got {statistic!r}.")
    return device


def _measure_layer_table(
    layer: nn.Module,
    input_size: list[int],
    norm: bool,
    grid_points: int,
    environment: RuntimeEnvironment,
    device: torch.device,
    cache: dict[str, float],
) -> LayerTable:
    """One layer's latency at every (input, output) width of its grid; `cache` shares equal cells
    between layers of the same configuration."""
    config = _config(layer)
    in_full, out_full = _widths(layer)
    in_grid = channel_grid(in_full, grid_points)
    out_grid = channel_grid(out_full, grid_points) if not isinstance(layer, nn.Linear) else [out_full]
    if getattr(layer, "groups", 1) != 1:  # grouped / depthwise convs: full width only
        in_grid, out_grid = [in_full], [out_full]
    rows = []
    for in_channels in in_grid:
        row = []
        for out_channels in out_grid:
            key = {"config": config, "size": input_size, "norm": norm, "in": in_channels, "out": out_channels}
            shape = [environment.batch_size, in_channels, *input_size]
            text = json.dumps(key, sort_keys=True)
            if text not in cache:
                cache[text] = _cell_latency(layer, in_channels, out_channels, norm, shape, environment, device)
            row.append(cache[text])
        rows.append(row)
    return LayerTable(config, input_size, norm, in_grid, out_grid, rows)


def _cell_latency(
    layer: nn.Module,
    in_channels: int,
    out_channels: int,
    norm: bool,
    shape: list[int],
    environment: RuntimeEnvironment,
    device: torch.device,
) -> float:
    """Seconds of one forward of `layer` at these widths (with its BatchNorm) in `environment`."""
    if environment.backend == "onnxruntime" and _direct_onnx(layer):
        run = _onnx_layer_runner(layer, in_channels, out_channels, norm, shape, environment.threads)
        return _onnx_seconds(run, shape, environment)
    return _latency(_resized(layer, in_channels, out_channels, norm), shape, environment, device)


def _onnx_seconds(run: Callable[[], Any], shape: list[int], environment: RuntimeEnvironment) -> float:
    """Seconds of `run` minus those of a session that only passes its input through, timed right
    after: a one-node session's call, feed and fetch cost as much as a small layer, and inside the
    exported network they are paid once, not per layer."""
    from onnx import TensorProto, helper

    value = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("input", "output")]
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "call", value[:1], value[1:])
    seconds = []
    for function in (run, _onnx_graph_runner(graph, shape, environment.threads)):
        stats = measure_latency(function, device="cpu", warmup=environment.warmup, iters=environment.iters)
        seconds.append(stats.min_s if environment.statistic == "min" else stats.median_s)
    return max(seconds[0] - seconds[1], 0.0)


def _join_latency(shape: list[int], environment: RuntimeEnvironment, device: torch.device) -> float:
    """Seconds of a residual block's join (`relu(x) + x`) at `shape` in `environment`."""
    if environment.backend == "onnxruntime":
        from onnx import TensorProto, helper

        nodes = [
            helper.make_node("Relu", ["input"], ["active"]),
            helper.make_node("Add", ["active", "input"], ["output"]),
        ]
        value = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("input", "output")]
        graph = helper.make_graph(nodes, "join", value[:1], value[1:])
        return _onnx_seconds(_onnx_graph_runner(graph, shape, environment.threads), shape, environment)
    return _latency(_Join(), shape, environment, device)


def _direct_onnx(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (
        isinstance(layer, nn.Conv2d) and not isinstance(layer.padding, str) and layer.padding_mode == "zeros"
    )


def _onnx_layer_runner(
    layer: nn.Module, in_channels: int, out_channels: int, norm: bool, shape: list[int], threads: int
) -> Callable[[], Any]:
    """An ONNX Runtime session of one conv or linear layer, built with `onnx.helper`.

    Hand-built rather than exported: `torch.onnx.export` takes seconds per call and a table needs
    hundreds of cells. The graph is what ONNX Runtime runs for the exported network's layer: its
    optimizer folds the BatchNorm into the convolution's weights and bias, so a normed (or biased)
    layer is a Conv with a bias.
    """
    from onnx import TensorProto, helper, numpy_helper

    generator = np.random.default_rng(0)
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)]
    biased = norm or layer.bias is not None
    if isinstance(layer, nn.Linear):
        weight = generator.standard_normal((out_channels, in_channels), dtype=np.float32)
        names = ["input", "weight", *(["bias"] if biased else [])]
        node = helper.make_node("Gemm", names, ["output"], transB=1)
    else:
        groups = layer.groups if layer.groups == 1 else in_channels  # depthwise stays depthwise
        weight = generator.standard_normal((out_channels, in_channels // groups, *layer.kernel_size), dtype=np.float32)
        names = ["input", "weight", *(["bias"] if biased else [])]
        padding = list(layer.padding)
        node = helper.make_node(
            "Conv", names, ["output"], kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
            pads=padding + padding, dilations=list(layer.dilation), group=groups,
        )  # fmt: skip
    initializers = [numpy_helper.from_array(weight, "weight")]
    if biased:
        initializers.append(numpy_helper.from_array(generator.standard_normal(out_channels, dtype=np.float32), "bias"))
    outputs = [
        helper.make_tensor_value_info(
            "output", TensorProto.FLOAT, [shape[0], out_channels, *([None] * (len(shape) - 2))]
        )
    ]
    graph = helper.make_graph([node], "layer", inputs, outputs, initializer=initializers)
    return _onnx_graph_runner(graph, shape, threads)


def _onnx_graph_runner(graph: Any, shape: list[int], threads: int) -> Callable[[], Any]:
    """A session of a hand-built graph with one float input `input` of `shape` (settings as
    `compresslight.profiling.backends.onnxruntime_runner`)."""
    import onnx
    from onnx import helper

    ort = _import_onnxruntime()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)  # readable by older ONNX Runtime releases too
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"input": np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    return lambda: session.run(None, feed)


class _Join(nn.Module):
    """The elementwise work of a residual block besides its layers: an activation and the add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) + x


def _removed(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, ShortcutBlock)]


# --- measuring the whole model against the baseline --------------------------------------------


def measure_speedup(
    baseline: nn.Module, model: nn.Module, environment: RuntimeEnvironment, input_shape: Sequence[int], rounds: int = 3
) -> PairedSpeedup:
    """Measured inference speedup baseline / model in `environment` (backend, threads, batch size,
    timing), side by side (`compresslight.profiling.side_by_side`): `rounds` alternating rounds,
    paired per-round ratios, their geometric mean and bootstrap interval.

    Raises:
        ValueError: if `rounds` < 2 (an interval needs two).
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 2:
        raise ValueError(f"`rounds` must be an int >= 2, got {rounds!r}.")
    options = SideBySide(
        warmup=environment.warmup, iters=environment.iters, min_rounds=rounds, max_rounds=rounds,
        target_width=None, time_budget_s=None,
    )  # fmt: skip
    report = compare_models(
        {"baseline": baseline, "pruned": model}, list(input_shape[1:]), "baseline",
        batch_sizes=[input_shape[0]], threads=[environment.threads], modes=["inference"],
        backends=[environment.backend], device=environment.device, options=options, progress=False,
    )  # fmt: skip
    return report.results[0].speedup_of("pruned")
