"""`profile`: what a model costs on this machine, with paper 000's protocol (section III).

Inference: eval mode under `torch.inference_mode`, a fixed random input batch. Train step: train
mode, forward + cross-entropy against a fixed random target + backward, gradients set to None
before every step, no optimizer step (as in the paper). Both timed by `timing.measure_latency`
(5 untimed warm-up calls, 50 timed, device synchronized after each, median with min and max).

The model is left as it was found: train/eval mode of every submodule, device, `requires_grad`,
gradients, buffers (train-mode batch norm updates its running statistics; they are restored)
and the global RNG state (profiling must not shift the random stream of the training it sits in).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import compresslight.profiling.counting as counting
from compresslight.checks import check_int, check_number
from compresslight.evaluation import logits_of
from compresslight.profiling.backends import onnxruntime_runner, validate_backends
from compresslight.profiling.environment import collect_environment, resolve_device
from compresslight.profiling.results import INFERENCE, TRAIN, LatencyEntry, MemoryProfile, ModelProfile
from compresslight.profiling.timing import measure_latency, num_threads

log = logging.getLogger(__name__)


def profile(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1,),
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 5,
    iters: int = 50,
    backends: Sequence[str] = ("torch",),
    train: bool = True,
    measure_memory: bool = True,
    name: str | None = None,
) -> ModelProfile:
    """Profiles `model`: parameters, MACs/FLOPs, memory (estimated and measured) and latency.

    Args:
        model: any module whose `forward(x)` takes one image batch (a LightningModule too).
        input_shape: one input without the batch dimension, e.g. (3, 32, 32).
        batch_sizes: batch sizes to measure memory and latency at (MACs are at batch size 1).
        device: where to measure ("cpu", "cuda", "cuda:1"); the model is moved there and back.
        threads: `torch.set_num_threads` (and ONNX Runtime intra-op threads) for the
            measurement, restored after; None keeps the current setting.
        warmup: untimed calls before timing each (backend, mode, batch size).
        iters: timed calls; the median is the reported latency.
        backends: "torch" (eager) and/or "onnxruntime" (exported, inference only).
        train: also measure the train step (latency and memory).
        measure_memory: also measure peak memory (CUDA, CPU), next to the estimate.
        name: a label for tables; defaults to the model's class name.

    Raises:
        ValueError: for an empty `input_shape` or one with a non-positive entry, a batch size
            <= 0, an unknown or unavailable backend, a device that does not exist here,
            `warmup` < 0, `iters` < 1, `threads` < 1, a model spread over several devices, or
            an input shape the model rejects (the message has the shape and the model's error).
    """
    shape = validate_input_shape(input_shape)
    sizes = validate_batch_sizes(batch_sizes)
    target_device = resolve_device(device)
    backends = validate_backends(backends, target_device)
    check_number("warmup", warmup, at_least=0)
    check_number("iters", iters, at_least=1)
    check_int("threads", threads, 1, optional=True)
    name = name or type(model).__name__

    with restored(model), num_threads(threads) as used_threads, _forked_rng(target_device):
        model.to(target_device)
        environment = collect_environment(target_device, used_threads, backends)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        generator = torch.Generator(device=target_device).manual_seed(0)

        def make_input(batch_size: int) -> torch.Tensor:
            return torch.randn((batch_size, *shape), generator=generator, device=target_device, dtype=dtype)

        model.eval()
        costs = _static_costs(model, make_input(1))
        do_train = train and _has_trainable_parameters(model, name)

        memory: list[MemoryProfile] = []
        latency: list[LatencyEntry] = []
        timing = _Timing(target_device, used_threads, backends, warmup, iters)
        for batch_size in sizes:
            batch = make_input(batch_size)
            loss_fn = _train_loss_or_none(model, batch, generator, name) if do_train else None
            memory.append(_memory_profile(model, batch, loss_fn, costs["params"], target_device, measure_memory))
            latency += _batch_latencies(model, batch, loss_fn, timing)
            log.info("Profiled %s at batch size %d on %s.", name, batch_size, environment.label)

    return ModelProfile(
        name=name, input_shape=list(shape), environment=environment, **costs, memory=memory, latency=latency
    )


def _static_costs(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """Parameters and forward MACs at batch size 1 (the `ModelProfile` fields no batch size changes).

    Raises:
        ValueError: if the model rejects `example` (the message has the shape and its error).
    """
    _check_input_accepted(model, example)
    params = counting.count_parameters(model)
    macs, layers, unattributed = counting.count_macs(model, example)
    return {
        "params": params,
        "macs": macs,
        "flops": 2 * macs,
        "flop_counter": counting.FLOP_COUNTER,
        "layers": layers,
        "unattributed_macs": unattributed,
    }


@dataclasses.dataclass(frozen=True)
class _Timing:
    """Where and how `profile` times each batch size."""

    device: torch.device
    threads: int
    backends: Sequence[str]
    warmup: int
    iters: int


def _train_loss_or_none(
    model: nn.Module, batch: torch.Tensor, generator: torch.Generator, name: str
) -> Callable[[Any], torch.Tensor] | None:
    """The train step's loss function, or None (logged) when a train-mode BatchNorm cannot take `batch`."""
    blocker = train_mode_batch_norm_blocker(model, batch)
    if blocker is not None:
        log.warning("%s: no train-step measurements at batch size %d: %s", name, len(batch), blocker)
        return None
    return train_loss_fn(model, batch, generator)


def _batch_latencies(
    model: nn.Module, batch: torch.Tensor, loss_fn: Callable[[Any], torch.Tensor] | None, timing: _Timing
) -> list[LatencyEntry]:
    """Inference latency on each backend, then the train step's when there is one."""
    latency = [
        _inference_latency(model, batch, backend, timing.device, timing.threads, timing.warmup, timing.iters)
        for backend in timing.backends
    ]
    if loss_fn is not None:
        latency.append(_train_latency(model, batch, loss_fn, timing.device, timing.warmup, timing.iters))
    return latency


def validate_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(
            f"`input_shape` must be a non-empty sequence of positive ints without the batch dimension, "
            f"e.g. (3, 32, 32), got {input_shape!r}."
        )
    return shape


def validate_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    if isinstance(batch_sizes, int):
        batch_sizes = (batch_sizes,)
    sizes = tuple(dict.fromkeys(batch_sizes))
    if not sizes:
        raise ValueError("`batch_sizes` must hold at least one batch size, got an empty sequence.")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"`batch_sizes` must hold ints > 0, got {size!r} in {tuple(batch_sizes)!r}.")
    return sizes


def _check_input_accepted(model: nn.Module, example: torch.Tensor) -> None:
    try:
        with torch.inference_mode():
            model(example)
    except Exception as error:  # noqa: BLE001 - whatever the model raises, the shape is the cause to report
        raise ValueError(
            f"`input_shape` {tuple(example.shape[1:])} was rejected by the model: a batch of shape "
            f"{tuple(example.shape)} raised {type(error).__name__}: {error}"
        ) from error


def _has_trainable_parameters(model: nn.Module, name: str) -> bool:
    if any(p.requires_grad for p in model.parameters()):
        return True
    log.warning("%s has no trainable parameters; skipping the train-step measurements.", name)
    return False


def train_mode_batch_norm_blocker(model: nn.Module, batch: torch.Tensor) -> str | None:
    """Why a train step cannot run at this batch size, or None.

    A train-mode BatchNorm refuses one value per channel (a `BatchNorm1d` head at batch 1, or a
    1x1 feature map at batch 1 as MobileNetV2's last stage at 32x32). Found by an eval-mode
    forward with hooks, which moves no running statistic; the caller skips the train step there
    (inference is still measured) instead of crashing the fit it profiles.
    """
    found: list[str] = []

    def check(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if not found and isinstance(x, torch.Tensor) and x.dim() >= 2 and x.numel() // max(x.shape[1], 1) <= 1:
            found.append(
                f"BatchNorm layer {names[module]!r} ({type(module).__name__}) gets one value per channel "
                f"(input shape {tuple(x.shape)}), which torch refuses in train mode; measure the train step at "
                "a batch size >= 2 (`batch_sizes`)."
            )

    names = {module: name for name, module in model.named_modules()}
    handles = [m.register_forward_pre_hook(check) for m in names if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not handles:
        return None
    model.eval()
    try:
        with torch.inference_mode():
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _logits(output: Any) -> torch.Tensor:
    with contextlib.suppress(TypeError):  # reported below, with the train step's own requirement
        output = logits_of(output)
    if not isinstance(output, torch.Tensor) or output.dim() < 2:
        raise ValueError(
            "The train-step measurement needs `model(x)` to return logits of shape (N, C, ...) (or a tuple "
            f"starting with them, or a dict / ModelOutput with `logits`), got {type(output).__name__}"
            + (f" of shape {tuple(output.shape)}." if isinstance(output, torch.Tensor) else ".")
        )
    return output


def train_loss_fn(model: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> Callable[[Any], torch.Tensor]:
    """Cross-entropy against a fixed random target shaped like the model's output."""
    model.eval()
    with torch.inference_mode():
        logits = _logits(model(batch))
    target_shape = (logits.shape[0], *logits.shape[2:])
    target = torch.randint(0, logits.shape[1], target_shape, generator=generator, device=batch.device)
    return lambda output: F.cross_entropy(_logits(output), target)


def _memory_profile(
    model: nn.Module,
    batch: torch.Tensor,
    loss_fn: Callable[[Any], torch.Tensor] | None,
    params: Any,
    device: torch.device,
    measure: bool,
) -> MemoryProfile:
    input_bytes = batch.numel() * batch.element_size()
    static = params.bytes + params.buffers_bytes + input_bytes
    model.eval()
    activations = counting.forward_activation_bytes(model, batch)
    saved = gradients = train_total = None
    if loss_fn is not None:
        model.train()
        saved = counting.train_saved_bytes(model, batch, loss_fn)
        gradients = params.trainable_bytes
        train_total = static + gradients + saved

    measured_inference = measured_train = method = None
    if measure:
        model.eval()

        def inference_step() -> None:
            with torch.inference_mode():
                model(batch)

        extra = counting.measure_peak_bytes(inference_step, device)
        if extra is not None:
            measured_inference = static + extra
            method = counting.CUDA_PEAK if device.type == "cuda" else counting.CPU_PEAK
        if loss_fn is not None:
            model.train()
            model.zero_grad(set_to_none=True)
            extra = counting.measure_peak_bytes(_train_step(model, batch, loss_fn), device)
            model.zero_grad(set_to_none=True)
            if extra is not None:
                measured_train = static + extra

    return MemoryProfile(
        batch_size=batch.shape[0],
        params_bytes=params.bytes,
        buffers_bytes=params.buffers_bytes,
        input_bytes=input_bytes,
        forward_activations_bytes=activations,
        train_saved_bytes=saved,
        gradients_bytes=gradients,
        inference_total_bytes=static + activations,
        train_total_bytes=train_total,
        measured_inference_peak_bytes=measured_inference,
        measured_train_peak_bytes=measured_train,
        measured_with=method,
    )


def _train_step(model: nn.Module, batch: torch.Tensor, loss_fn: Callable[[Any], torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(batch)).backward()

    return step


def _inference_latency(
    model: nn.Module,
    batch: torch.Tensor,
    backend: str,
    device: torch.device,
    threads: int,
    warmup: int,
    iters: int,
) -> LatencyEntry:
    model.eval()
    if backend == "onnxruntime":
        stats = measure_latency(onnxruntime_runner(model, batch, threads), device=device, warmup=warmup, iters=iters)
    else:
        with torch.inference_mode():
            stats = measure_latency(lambda: model(batch), device=device, warmup=warmup, iters=iters)
    return _entry(backend, INFERENCE, batch.shape[0], stats, warmup)


def _train_latency(
    model: nn.Module,
    batch: torch.Tensor,
    loss_fn: Callable[[Any], torch.Tensor],
    device: torch.device,
    warmup: int,
    iters: int,
) -> LatencyEntry:
    model.train()
    with torch.enable_grad():
        stats = measure_latency(_train_step(model, batch, loss_fn), device=device, warmup=warmup, iters=iters)
    model.zero_grad(set_to_none=True)
    return _entry("torch", TRAIN, batch.shape[0], stats, warmup)


def _entry(backend: str, mode: str, batch_size: int, stats: Any, warmup: int) -> LatencyEntry:
    return LatencyEntry(
        backend=backend,
        mode=mode,
        batch_size=batch_size,
        stats=stats,
        warmup=warmup,
        images_per_s=batch_size / stats.median_s,
    )


@contextlib.contextmanager
def restored(model: nn.Module) -> Iterator[None]:
    """Puts back mode, device, requires_grad, gradients and buffers of `model` on exit."""
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    if len(devices) > 1:
        raise ValueError(
            f"`model` must live on one device to be profiled, found tensors on {sorted(map(str, devices))}."
        )
    home = next(iter(devices), None)
    modes = [(module, module.training) for module in model.modules()]
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    # By name: `model.to` may replace buffer tensors, so references would go stale.
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    try:
        yield
    finally:
        if home is not None:
            model.to(home)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])
        for p, flag, grad in zip(params, requires_grad, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    cuda_devices = [device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        yield
