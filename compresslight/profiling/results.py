"""Plain-data results of `profile`: what a model costs, measured on one machine.

Everything here is dataclasses of numbers and strings, so a profile survives a JSON round trip,
a checkpoint (`ProfileCallback.state_dict`) and a W&B table unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from compresslight.profiling.environment import Environment
from compresslight.profiling.timing import LatencyStats

PROFILE_FORMAT_VERSION = 1

INFERENCE = "inference"
TRAIN = "train"
MODES = (INFERENCE, TRAIN)


@dataclasses.dataclass
class ParameterCount:
    """Parameters and buffers of a model.

    Attributes:
        total: number of parameters (shared parameters counted once).
        trainable: parameters with `requires_grad`.
        bytes: storage of all parameters.
        trainable_bytes: storage of the trainable ones (also the size of their gradients).
        buffers_bytes: storage of buffers (batch-norm running statistics, ...).
    """

    total: int
    trainable: int
    bytes: int
    trainable_bytes: int
    buffers_bytes: int


@dataclasses.dataclass
class LayerCost:
    """Forward cost of one leaf module at batch size 1.

    Attributes:
        name: the module's qualified name in the model (`model.get_submodule(name)`).
        type: the module's class name.
        params: parameters the module holds directly.
        macs: multiply-accumulates of its forward pass.
        flops: 2 x `macs`.
        output_shape: shape of its (first) output at batch size 1, None if it returned no tensor.
    """

    name: str
    type: str
    params: int
    macs: int
    flops: int
    output_shape: list[int] | None


@dataclasses.dataclass
class MemoryProfile:
    """Estimated and measured memory for one batch size, in bytes.

    The estimates count tensors (paper 000's method): parameters, buffers, the input, the
    activations, and for a train step the gradients and what autograd keeps for backward.
    The measurement is the same static part (parameters, buffers, input) plus the peak of the
    bytes allocated while one step runs, so both columns describe the same thing; kernels'
    workspaces and allocator caching are why they differ.

    Attributes:
        batch_size: images per step.
        params_bytes: all parameters.
        buffers_bytes: all buffers.
        input_bytes: the input batch.
        forward_activations_bytes: sum of every leaf module's outputs in one forward pass.
        train_saved_bytes: tensors autograd saves for backward in a train step (deduplicated by
            storage, parameters and input excluded), None if train steps were not profiled.
        gradients_bytes: one gradient per trainable parameter, None if not profiled.
        inference_total_bytes: params + buffers + input + forward activations.
        train_total_bytes: params + buffers + input + gradients + saved tensors, or None.
        measured_inference_peak_bytes: measured counterpart of `inference_total_bytes`.
        measured_train_peak_bytes: measured counterpart of `train_total_bytes`.
        measured_with: how the peak was measured ("torch.cuda.max_memory_allocated",
            "torch.profiler memory events"), None where the platform gives no way.
    """

    batch_size: int
    params_bytes: int
    buffers_bytes: int
    input_bytes: int
    forward_activations_bytes: int
    train_saved_bytes: int | None
    gradients_bytes: int | None
    inference_total_bytes: int
    train_total_bytes: int | None
    measured_inference_peak_bytes: int | None = None
    measured_train_peak_bytes: int | None = None
    measured_with: str | None = None


@dataclasses.dataclass
class LatencyEntry:
    """Measured latency of one (backend, mode, batch size).

    Attributes:
        backend: "torch" or "onnxruntime".
        mode: "inference" (eval mode, no autograd) or "train" (train mode, forward +
            cross-entropy + backward, no optimizer step).
        batch_size: images per call.
        stats: seconds per call: min, median, max over `stats.iters` timed calls.
        warmup: untimed calls before them.
        images_per_s: `batch_size / stats.median_s`.
    """

    backend: str
    mode: str
    batch_size: int
    stats: LatencyStats
    warmup: int
    images_per_s: float

    @property
    def median_ms(self) -> float:
        return self.stats.median_s * 1e3

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyEntry:
        return cls(**{**data, "stats": LatencyStats.from_dict(data["stats"])})


@dataclasses.dataclass
class ModelProfile:
    """What one model costs on one machine (`profile`'s result).

    Attributes:
        name: a label for tables ("baseline", "Prune 25%", the class name by default).
        input_shape: one input without the batch dimension, e.g. [3, 32, 32].
        environment: where latency and measured memory were taken.
        params: parameter and buffer counts and bytes.
        macs: multiply-accumulates of one forward pass at batch size 1.
        flops: floating-point operations of the same pass, 2 x `macs`.
        flop_counter: what counted them (and hence which ops are included).
        layers: per-leaf-module breakdown of `macs`.
        unattributed_macs: MACs of ops called outside any leaf module (functional code in a
            parent's `forward`), so that `sum(layer.macs) + unattributed_macs == macs`.
        memory: one entry per batch size.
        latency: one entry per (backend, mode, batch size).
        format_version: version of this layout, for readers of old files.
    """

    name: str
    input_shape: list[int]
    environment: Environment
    params: ParameterCount
    macs: int
    flops: int
    flop_counter: str
    layers: list[LayerCost]
    unattributed_macs: int
    memory: list[MemoryProfile]
    latency: list[LatencyEntry]
    format_version: int = PROFILE_FORMAT_VERSION

    @property
    def batch_sizes(self) -> list[int]:
        return [entry.batch_size for entry in self.memory]

    def memory_at(self, batch_size: int) -> MemoryProfile | None:
        """The memory entry for `batch_size`, None if it was not profiled."""
        return next((entry for entry in self.memory if entry.batch_size == batch_size), None)

    def latency_of(self, mode: str, batch_size: int, backend: str = "torch") -> LatencyEntry | None:
        """The latency entry for (`mode`, `batch_size`, `backend`), None if it was not measured."""
        return next(
            (
                entry
                for entry in self.latency
                if entry.mode == mode and entry.batch_size == batch_size and entry.backend == backend
            ),
            None,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelProfile:
        """Rebuilds a profile from `to_dict()` output.

        Raises:
            ValueError: if `data` was written by a newer, unknown format version.
        """
        version = data.get("format_version", PROFILE_FORMAT_VERSION)
        if version > PROFILE_FORMAT_VERSION:
            raise ValueError(
                f"`data` holds profile format version {version}, this compresslight reads up to "
                f"{PROFILE_FORMAT_VERSION}; upgrade compresslight."
            )
        return cls(
            name=data["name"],
            input_shape=list(data["input_shape"]),
            environment=Environment.from_dict(data["environment"]),
            params=ParameterCount(**data["params"]),
            macs=data["macs"],
            flops=data["flops"],
            flop_counter=data["flop_counter"],
            layers=[LayerCost(**layer) for layer in data["layers"]],
            unattributed_macs=data["unattributed_macs"],
            memory=[MemoryProfile(**entry) for entry in data["memory"]],
            latency=[LatencyEntry.from_dict(entry) for entry in data["latency"]],
            format_version=version,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelProfile:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        """Writes the profile as JSON to `path` (parent folders are created) and returns it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelProfile:
        """Reads a profile written by `save`.

        Raises:
            FileNotFoundError: if `path` does not exist.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"`path` must be a profile JSON file written by ModelProfile.save, got {str(path)!r}."
            )
        return cls.from_json(path.read_text())

    def to_markdown(self, max_layers: int | None = None) -> str:
        """Renders the profile as Markdown tables (summary, memory, latency, per-layer cost).

        Args:
            max_layers: show only the most expensive layers (by MACs); None shows all.
        """
        return profile_markdown(self, max_layers=max_layers)


def profile_markdown(model_profile: ModelProfile, max_layers: int | None = None) -> str:
    """Markdown tables for one profile: summary, memory, latency and the costliest layers."""
    p = model_profile
    env = p.environment
    versions = ", ".join(f"{name} {version}" for name, version in env.backend_versions.items())
    lines = [
        f"Measured on `{env.hostname}`: {env.label}; {versions}; input {tuple(p.input_shape)}.",
        "",
        "| Parameters | Trainable | Parameter bytes | Buffer bytes | MACs (forward, batch 1) | FLOPs (2 x MACs) |",
        "|---|---|---|---|---|---|",
        f"| {p.params.total:,} | {p.params.trainable:,} | {_mib(p.params.bytes)} | {_mib(p.params.buffers_bytes)} "
        f"| {_si(p.macs)} | {_si(p.flops)} |",
        "",
        f"MACs counted by {p.flop_counter}.",
        "",
        "Memory (MiB; estimate counts tensors, measured = parameters + buffers + input + peak allocated "
        "during one step)",
        "",
        "| Batch size | Params + buffers | Input | Forward activations | Saved for backward | Gradients "
        "| Inference estimate | Inference measured | Train estimate | Train measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in p.memory:
        lines.append(
            f"| {m.batch_size} | {_mib(m.params_bytes + m.buffers_bytes)} | {_mib(m.input_bytes)} "
            f"| {_mib(m.forward_activations_bytes)} | {_mib(m.train_saved_bytes)} | {_mib(m.gradients_bytes)} "
            f"| {_mib(m.inference_total_bytes)} | {_mib(m.measured_inference_peak_bytes)} "
            f"| {_mib(m.train_total_bytes)} | {_mib(m.measured_train_peak_bytes)} |"
        )
    measured_with = {m.measured_with for m in p.memory if m.measured_with}
    if measured_with:
        lines += ["", f"Measured with {', '.join(sorted(measured_with))}."]
    lines += [
        "",
        "Latency (ms per batch; median of timed calls after untimed warm-up)",
        "",
        "| Backend | Mode | Batch size | Median | Min | Max | Images/s | Warm-up / timed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {mode: i for i, mode in enumerate(MODES)}
    for e in sorted(p.latency, key=lambda e: (e.batch_size, order.get(e.mode, 9), e.backend)):
        lines.append(
            f"| {e.backend} | {e.mode} | {e.batch_size} | {e.stats.median_s * 1e3:.3f} | {e.stats.min_s * 1e3:.3f} "
            f"| {e.stats.max_s * 1e3:.3f} | {e.images_per_s:,.1f} | {e.warmup} / {e.stats.iters} |"
        )
    layers = sorted(p.layers, key=lambda layer: layer.macs, reverse=True)
    layers = [layer for layer in layers if layer.macs > 0][:max_layers] if max_layers else layers
    shown = "costliest layers" if max_layers and len(layers) < len(p.layers) else "layers"
    lines += [
        "",
        f"Per-layer MACs ({shown}; forward, batch 1; {_si(p.unattributed_macs)} MACs outside leaf modules)",
        "",
        "| Layer | Type | Params | MACs | Share | Output shape |",
        "|---|---|---|---|---|---|",
    ]
    for layer in layers:
        share = f"{100 * layer.macs / p.macs:.1f}%" if p.macs else "–"
        shape = "×".join(map(str, layer.output_shape)) if layer.output_shape else "–"
        lines.append(f"| {layer.name} | {layer.type} | {layer.params:,} | {_si(layer.macs)} | {share} | {shape} |")
    return "\n".join(lines) + "\n"


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.2f}"


def _si(value: int) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {suffix}"
    return str(value)
