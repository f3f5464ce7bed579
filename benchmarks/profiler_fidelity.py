"""Does `compresslight.profiling.profile` measure what independent tools measure?

For each model, batch size and thread count, in one process on the same model objects:

- latency: `profile()`'s median (paper 000's loop: 5 warm-up, 50 timed, synchronize each call)
  vs `torch.utils.benchmark.Timer(...).blocked_autorange(min_run_time=...)`, for inference
  (eval, inference mode) and the train step (forward + cross-entropy + backward); goal: the
  ratio within 5% of 1;
- MACs: `profile()` (FlopCounterMode) vs a hand formula over Conv2d/Linear modules seen by
  forward hooks (out elements x in_channels / groups x kh x kw; out elements x in_features);
- memory: `profile()`'s tensor-counting estimate vs its measured peak (CPU: profiler memory
  events; CUDA: max_memory_allocated).

Prints Markdown tables. The machine's load average is printed with them: on a shared machine,
latency ratios are only as steady as the neighbours.

This is the one script here that does not use `compresslight.profiling.side_by_side`: it compares
two *timers* of one model, not two models, so it brackets `profile()` between two Timer runs
(the Timer's own drift across the bracket is its noise floor) instead of alternating contenders.

    python benchmarks/profiler_fidelity.py                      # resnet20 3x32x32, resnet18 3x112x112
    python benchmarks/profiler_fidelity.py --resnet18-size 224 --batch-sizes 1 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

import compresslight
from compresslight.profiling import ModelProfile, num_threads, profile
from compresslight.profiling.timing import synchronize


def hand_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of Conv2d and Linear layers by formula, from output shapes seen by forward hooks."""
    total = 0

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.inference_mode():
        model(example)
    for handle in handles:
        handle.remove()
    return total


def timer_median(
    fn: Callable[[], Any], threads: int, min_run_time: float, device: torch.device
) -> benchmark.Measurement:
    """torch.utils.benchmark's estimate for `fn` (its own loop, blocks, median over blocks)."""

    def call() -> None:
        fn()
        synchronize(device)

    timer = benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time)


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()

    return step


MODES = ("inference", "train")


def timed(
    mode: str,
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    threads: int,
    min_run_time: float,
    device: torch.device,
) -> benchmark.Measurement:
    """Timer's measurement of inference (eval, inference mode) or the train step on `x`."""
    with num_threads(threads):
        if mode == "inference":
            model.eval()
            with torch.inference_mode():
                model(x)  # how long one call takes, to size the run
                start = time.perf_counter()
                model(x)
                one_call = time.perf_counter() - start
                return timer_median(lambda: model(x), threads, max(min_run_time, 20 * one_call), device)
        model.train()
        step = train_step(model, x, target)
        step()
        start = time.perf_counter()
        step()
        one_call = time.perf_counter() - start
        # At least ~20 blocks, so the Timer's median is over about as many samples as ours.
        measurement = timer_median(step, threads, max(min_run_time, 20 * one_call), device)
        model.zero_grad(set_to_none=True)
        return measurement


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    shapes = {"resnet20": (3, 32, 32), "resnet18": (3, args.resnet18_size, args.resnet18_size)}
    latency_rows, mac_rows, memory_rows = [], [], []
    environment = None
    loads = [os.getloadavg()[0]]
    for name in args.models:
        shape = shapes[name]
        model = compresslight.create_model(name, num_classes=10).to(device)
        example = torch.randn(1, *shape, device=device)
        for batch_size in args.batch_sizes:
            x = torch.randn(batch_size, *shape, device=device)
            target = torch.randint(0, 10, (batch_size,), device=device)
            for index, threads in enumerate(args.threads):
                # Timer, profile(), Timer again: on a shared machine load drifts, and comparing
                # profile() with the mean of a measurement before and after it cancels a linear
                # drift; `--repeats` rounds give the spread of the ratio itself.
                ratios: dict[str, list[float]] = {mode: [] for mode in MODES}
                # Timer after / Timer before: how much the reference disagrees with itself, the
                # noise floor below which no ratio can be trusted on this machine.
                drifts: dict[str, list[float]] = {mode: [] for mode in MODES}
                ours: dict[str, list[float]] = {mode: [] for mode in MODES}
                theirs: dict[str, list[float]] = {mode: [] for mode in MODES}
                for repeat in range(args.repeats):
                    before = {mode: timed(mode, model, x, target, threads, args.min_run_time, device) for mode in MODES}
                    result: ModelProfile = profile(
                        model, shape, batch_sizes=(batch_size,), device=device, threads=threads,
                        warmup=args.warmup, iters=args.iters, measure_memory=index == 0 and repeat == 0,
                    )  # fmt: skip
                    after = {mode: timed(mode, model, x, target, threads, args.min_run_time, device) for mode in MODES}
                    loads.append(os.getloadavg()[0])
                    if repeat == 0:
                        first = result
                    for mode in MODES:
                        reference = (before[mode].median + after[mode].median) / 2
                        ours[mode].append(result.latency_of(mode, batch_size).stats.median_s)
                        theirs[mode].extend([before[mode].median, after[mode].median])
                        ratios[mode].append(ours[mode][-1] / reference)
                        drifts[mode].append(after[mode].median / before[mode].median)
                environment = result.environment
                for mode in MODES:
                    ratio = statistics.median(ratios[mode])
                    latency_rows.append(
                        f"| {name} | {'x'.join(map(str, shape))} | {batch_size} | {threads} | {mode} "
                        f"| {_ms(ours[mode])} | {_ms(theirs[mode])} "
                        f"| {ratio:.3f} ({min(ratios[mode]):.2f}–{max(ratios[mode]):.2f}) "
                        f"| {statistics.median(drifts[mode]):.3f} ({min(drifts[mode]):.2f}–{max(drifts[mode]):.2f}) "
                        f"| {'yes' if abs(ratio - 1) <= 0.05 else 'no'} |"
                    )
                    print(latency_rows[-1], flush=True)
                result = first
                if index == 0:
                    memory = result.memory_at(batch_size)
                    memory_rows.append(
                        f"| {name} | {batch_size} | {_mib(memory.inference_total_bytes)} "
                        f"| {_mib(memory.measured_inference_peak_bytes)} "
                        f"| {_ratio(memory.measured_inference_peak_bytes, memory.inference_total_bytes)} "
                        f"| {_mib(memory.train_total_bytes)} | {_mib(memory.measured_train_peak_bytes)} "
                        f"| {_ratio(memory.measured_train_peak_bytes, memory.train_total_bytes)} |"
                    )
        model.eval()
        formula = hand_macs(model, example)
        mac_rows.append(
            f"| {name} | {'x'.join(map(str, shape))} | {result.macs:,} | {formula:,} | {result.macs / formula:.4f} "
            f"| {result.flops:,} |"
        )

    print()
    print(
        f"Environment: {environment.device_name} ({environment.device}), torch {environment.torch_version}, "
        f"host `{environment.hostname}`, {os.cpu_count()} logical CPUs; protocol {args.warmup} warm-up + "
        f"{args.iters} timed; 1-min load average during the run: min {min(loads):.1f}, median "
        f"{statistics.median(loads):.1f}, max {max(loads):.1f}."
    )
    print()
    print(
        f"Latency, ms per batch: profile()'s median vs torch.utils.benchmark.Timer.blocked_autorange's median, "
        f"measured right before and right after each profile() call; {args.repeats} round(s); cells: median over "
        f"rounds (range). ratio: profile() / mean of the Timer medians around it, median over rounds (range). "
        f"Timer drift: Timer after / Timer before, the reference's own reproducibility (noise floor)."
    )
    print()
    print("| model | input | batch | threads | mode | profile() | Timer | ratio | Timer drift | within 5% |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(latency_rows))
    print()
    print("MACs (forward, batch 1): profile() (FlopCounterMode) vs hand formula over Conv2d/Linear")
    print()
    print("| model | input | profile() MACs | hand formula MACs | ratio | profile() FLOPs |")
    print("|---|---|---|---|---|---|")
    print("\n".join(mac_rows))
    print()
    print("Memory, MiB: estimate (tensor counting) vs measured peak (static tensors + peak allocated during one step)")
    print()
    print(
        "| model | batch | inference estimate | inference measured | measured/estimate | train estimate "
        "| train measured | measured/estimate |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(memory_rows))


def _ms(seconds: list[float]) -> str:
    """Median in ms, with the range when there are several values."""
    median = statistics.median(seconds) * 1e3
    if len(seconds) == 1:
        return f"{median:.2f}"
    return f"{median:.2f} ({min(seconds) * 1e3:.2f}–{max(seconds) * 1e3:.2f})"


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.1f}"


def _ratio(measured: int | None, estimate: int | None) -> str:
    return "–" if measured is None or not estimate else f"{measured / estimate:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet18"], choices=["resnet20", "resnet18"])
    parser.add_argument("--resnet18-size", type=int, default=112, help="ResNet18 input side (224 is ImageNet's).")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--min-run-time", type=float, default=2.0, help="Timer's minimum seconds per measurement.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="Timer/profile()/Timer rounds per setting.")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}.")
    start = time.perf_counter()
    run(args)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
