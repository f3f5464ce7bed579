"""Counting what a model costs without a stopwatch: parameters, MACs, memory.

MACs come from `torch.utils.flop_counter.FlopCounterMode`, which has exact formulas for the ops
that dominate a conv net (convolution, matmul/linear, attention) and counts FLOPs as 2 x MACs.
Element-wise ops (batch norm, ReLU, pooling, residual adds) are not counted, as in the papers,
whose "MFLOPs" are MACs of convolutions and linear layers.

Memory estimates count tensors, as paper 000's estimator (torchinfo) does; `measure_peak_bytes`
measures the same step where the platform allows it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from compresslight.profiling.progress import quiet_profiler_output
from compresslight.profiling.results import LayerCost, ParameterCount
from compresslight.profiling.timing import synchronize

log = logging.getLogger(__name__)

FLOP_COUNTER = "torch.utils.flop_counter.FlopCounterMode (conv, matmul/linear, attention; FLOPs = 2 x MACs)"
CUDA_PEAK = "torch.cuda.max_memory_allocated"
CPU_PEAK = "torch.profiler memory events"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Counts parameters (shared ones once), trainable parameters and buffer bytes."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    return ParameterCount(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in trainable),
        bytes=sum(_nbytes(p) for p in params),
        trainable_bytes=sum(_nbytes(p) for p in trainable),
        buffers_bytes=sum(_nbytes(b) for b in model.buffers()),
    )


def count_macs(model: nn.Module, example: torch.Tensor) -> tuple[int, list[LayerCost], int]:
    """Counts the MACs of one forward pass on `example`, in total and per leaf module.

    The model runs as it is (the caller sets eval mode) under `torch.inference_mode`.

    Returns:
        (total MACs, one `LayerCost` per leaf module in definition order, MACs not inside any
        leaf module).
    """
    leaves = _leaf_modules(model)
    output_shapes: dict[str, list[int] | None] = {}

    def record_shape(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            tensors = _tensors(output)
            output_shapes[name] = list(tensors[0].shape) if tensors else None

        return hook

    handles = [module.register_forward_hook(record_shape(name)) for name, module in leaves]
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with torch.inference_mode(), counter:
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    # FlopCounterMode names modules "<RootClass>.<qualified name>"; it counts FLOPs = 2 x MACs.
    per_module = counter.get_flop_counts()
    prefix = f"{type(model).__name__}."
    total_macs = counter.get_total_flops() // 2
    layers = []
    for name, module in leaves:
        macs = sum(per_module.get(prefix + name, {}).values()) // 2
        layers.append(
            LayerCost(
                name=name,
                type=type(module).__name__,
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                macs=macs,
                flops=2 * macs,
                output_shape=output_shapes.get(name),
            )
        )
    return total_macs, layers, total_macs - sum(layer.macs for layer in layers)


def forward_activation_bytes(model: nn.Module, example: torch.Tensor) -> int:
    """Sum of the outputs of every leaf module in one forward pass (paper 000's activation term).

    A module called twice counts twice, an in-place module's output counts again, as in
    torchinfo: this is the upper bound that keeping every layer output would need.
    """
    total = 0

    def add_output(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal total
        total += sum(_nbytes(t) for t in _tensors(output))

    handles = [module.register_forward_hook(add_output) for _, module in _leaf_modules(model)]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return total


def train_saved_bytes(model: nn.Module, example: torch.Tensor, loss_fn: Callable[[Any], torch.Tensor]) -> int:
    """Bytes autograd keeps from forward for backward in one train step (forward + loss).

    Saved tensors are seen through `torch.autograd.graph.saved_tensors_hooks` and deduplicated
    by storage (a tensor saved by two ops, or a view of another, counts once). Parameters,
    buffers and the input are excluded: they are alive anyway and counted on their own.
    The graph is dropped without running backward.
    """
    static = {_storage_key(t) for t in (*model.parameters(), *model.buffers(), example)}
    seen: dict[tuple[str, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in static and key not in seen:
            seen[key] = _storage_nbytes(tensor)
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(model(example))
    del loss
    return sum(seen.values())


def measure_peak_bytes(step: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated while `step()` runs, on top of what was allocated before it.

    CUDA: `torch.cuda.max_memory_allocated` after resetting the peak. CPU: the PyTorch
    profiler's memory events (every allocation and free, in order), whose running total's
    maximum is the peak; the profiler only sums them per op, so the running total is computed
    here. Other devices: None.
    """
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type == "cpu":
        return _cpu_peak_bytes(step)
    return None


def _cpu_peak_bytes(step: Callable[[], Any]) -> int | None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    with quiet_profiler_output(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        step()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:
        # kineto_results is how torch 2.x exposes the raw event list; if a later torch moves
        # it, report "not measured" rather than a wrong number.
        log.warning("This torch's profiler does not expose raw memory events; CPU peak memory not measured.")
        return None
    allocations = sorted(
        (event.start_ns(), event.nbytes())
        for event in events
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in allocations:
        running += nbytes
        peak = max(peak, running)
    return peak


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if name and not list(module.children())]


def _tensors(value: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    try:
        return (str(tensor.device), tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        # Opaque tensors (e.g. mkldnn layouts) have no storage to share; key them by identity.
        return ("opaque", id(tensor))


def _storage_nbytes(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return _nbytes(tensor)
