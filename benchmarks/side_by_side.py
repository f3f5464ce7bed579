"""Two-time vs side-by-side speedups of a pruned ResNet20, on an idle and on a loaded machine.

The old way (`ProfileCallback` before issue 13): time the baseline, later time the compressed
model, divide the two medians. The new way (`compresslight.profiling.side_by_side`): the two
models alternate in rounds, the speedup is paired per round, with a bootstrap interval.

ResNet20 against its 25%-pruned self (L2 norm, every conv; `prune_filters`), inference, at
batch 1 / 1 thread and batch 128 / 2 threads, each way `--repetitions` times:

(i) idle: nothing but this process (other users of the machine are recorded, not controlled);
(ii) loaded: this script starts a competing busy-loop process pinned to one core, which switches
     on and off at random (on and off periods drawn uniformly from 0.2-1.5 s), so it loads a
     random part of each measurement.

It prints, per setting, condition and way: the speedups of the repetitions (median and range),
their spread ((max - min) / median), and for the side-by-side way whether each interval covers the
idle side-by-side value and whether the loaded value is within 10% of it; and the machine load
(other processes' share of the CPUs) during each condition.

    python benchmarks/side_by_side.py            # minutes (see the README for a measured run)
    python benchmarks/side_by_side.py --quick    # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from compresslight.compression.pruning import prune_filters
from compresslight.profiling.load import LoadMonitor
from compresslight.profiling.side_by_side import SideBySide
from compresslight.profiling.timing import measure_latency, num_threads
from compresslight.registry import create_model

COMPETITOR = """
import os, random, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
rng = random.Random(int(sys.argv[2]))
while True:
    end = time.monotonic() + rng.uniform(0.2, 1.5)
    while time.monotonic() < end:
        pass
    time.sleep(rng.uniform(0.2, 1.5))
"""


def start_competitor(seed: int) -> subprocess.Popen:
    """A busy loop on the machine's last core, on and off at random."""
    core = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    return subprocess.Popen([sys.executable, "-c", COMPETITOR, str(core), str(seed)])


def two_time(
    baseline: torch.nn.Module, pruned: torch.nn.Module, batch: torch.Tensor, args: argparse.Namespace
) -> float:
    """The old way: the baseline's median, then (later) the pruned model's, divided."""
    with torch.inference_mode():
        base = measure_latency(lambda: baseline(batch), warmup=args.warmup, iters=args.two_time_iters).median_s
        time.sleep(args.gap_s)  # the ProfileCallback's two measurements are a whole fit apart
        comp = measure_latency(lambda: pruned(batch), warmup=args.warmup, iters=args.two_time_iters).median_s
    return base / comp


def side_by_side(baseline: torch.nn.Module, pruned: torch.nn.Module, batch: torch.Tensor, options: SideBySide) -> Any:
    with torch.inference_mode():
        result = options.run(
            {"baseline": lambda: baseline(batch), "pruned": lambda: pruned(batch)}, "baseline", progress=False
        )
    return result.speedup_of("pruned")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    # Short turns: load that comes and goes within a round is what pairing cannot cancel.
    parser.add_argument("--iters", type=int, default=3, help="timed calls per side-by-side turn")
    parser.add_argument("--two-time-iters", type=int, default=20, help="timed calls of each two-time profile")
    parser.add_argument("--min-rounds", type=int, default=8)
    parser.add_argument("--max-rounds", type=int, default=16)
    parser.add_argument("--time-budget-s", type=float, default=12.0, help="per side-by-side measurement")
    parser.add_argument("--gap-s", type=float, default=1.0, help="pause between the two two-time profiles")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--settings", nargs="+", default=["1x1", "128x2"], help="BATCHxTHREADS settings to measure (default: 1x1 128x2)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 repetitions, few calls")
    args = parser.parse_args()
    try:
        settings = [tuple(int(part) for part in setting.split("x")) for setting in args.settings]
    except ValueError:
        parser.error(f"--settings must be BATCHxTHREADS pairs such as 1x1 128x2, got {args.settings}")
    if args.quick:
        args.repetitions, args.iters, args.two_time_iters, args.min_rounds, args.max_rounds = 2, 2, 3, 3, 3
        args.gap_s, settings = 0.1, [(1, 1), (8, 2)]
    options = SideBySide(
        warmup=args.warmup, iters=args.iters, min_rounds=args.min_rounds, max_rounds=args.max_rounds,
        target_width=0.05, time_budget_s=args.time_budget_s,
    )  # fmt: skip

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    baseline = create_model("resnet20", num_classes=10).eval()
    pruned = copy.deepcopy(baseline)
    prune_filters(pruned, 0.25, example_inputs=torch.zeros(1, 3, 32, 32), norm=2)
    pruned.eval()
    params = [sum(p.numel() for p in m.parameters()) for m in (baseline, pruned)]
    print(f"ResNet20 {params[0]:,} params vs 25%-pruned {params[1]:,}; inference; {args.repetitions} repetitions; "
          f"side by side: {args.min_rounds}-{args.max_rounds} rounds of {args.iters} calls "
          f"(budget {args.time_budget_s:.0f} s); "
          f"two-time: {args.two_time_iters} calls each, {args.gap_s:.1f} s apart.", flush=True)  # fmt: skip

    rows = []
    started = time.monotonic()
    for batch_size, threads in settings:
        batch = torch.randn(batch_size, 3, 32, 32)
        idle_value = None
        for condition in ("idle", "loaded"):
            competitor = start_competitor(args.seed) if condition == "loaded" else None
            monitor = LoadMonitor().start()
            old, new = [], []
            try:
                with num_threads(threads):
                    for _ in range(args.repetitions):
                        old.append(two_time(baseline, pruned, batch, args))
                        new.append(side_by_side(baseline, pruned, batch, options))
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
            load = monitor.stop()
            if idle_value is None:
                idle_value = statistics.median(s.estimate for s in new)
            rows.append((batch_size, threads, condition, old, new, idle_value, load))
            print(f"bs{batch_size} t{threads} {condition} done ({time.monotonic() - started:.0f} s): "
                  f"two-time {', '.join(f'{v:.2f}' for v in old)}; side by side "
                  f"{', '.join(s.label() for s in new)}; {load.summary()}", flush=True)  # fmt: skip

    print()
    print("| batch / threads | machine | way | speedup: median (range) over repetitions | spread | "
          "intervals covering the idle value | within 10% of idle |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for batch_size, threads, condition, old, new, idle_value, load in rows:
        share = "?" if load.other_cpu_share is None else f"{load.other_cpu_share:.0%}"
        machine = f"{condition} (others {share} of {load.cpu_count} CPUs)"
        for way, values in (("two-time", old), ("side by side", [s.estimate for s in new])):
            median = statistics.median(values)
            spread = (max(values) - min(values)) / median
            cover = within = "-"
            if way == "side by side":
                cover = f"{sum(s.low <= idle_value <= s.high for s in new)} of {len(new)}"
                within = "yes" if abs(median / idle_value - 1) <= 0.10 else "no"
            print(f"| {batch_size} / {threads} | {machine} | {way} | "
                  f"{median:.2f} ({min(values):.2f}-{max(values):.2f}) "
                  f"| {spread:.0%} | {cover} | {within} |")  # fmt: skip
    print(
        f"\nIdle value: the median side-by-side estimate on the idle machine. Total {time.monotonic() - started:.0f} s."
    )


if __name__ == "__main__":
    main()
