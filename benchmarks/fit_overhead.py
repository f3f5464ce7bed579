"""Train-step throughput of the `cli.py fit` path vs a plain PyTorch loop (DESIGN.md: >= 0.95x).

Both train ResNet20 at batch 128 on the real CIFAR-10 tensors with the same augmentation, the
same optimizer and the same thread count; they alternate in one process, round after round
(`compresslight.profiling.side_by_side`; the ratio is paired per round, with a confidence
interval), so machine noise hits both alike. The Lightning side is built from `configs/resnet20_baseline.yaml`
exactly as `python cli.py fit` builds it (callbacks, logger, metrics and all); only the timed
window differs from a real run: steps after `--warmup` until the last one, validation off.

    python benchmarks/fit_overhead.py --data_dir ../shared/data/cifar10 --steps 40 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import pytorch_lightning as pl
import torch
from compresslight.datamodules import CIFAR10DataModule
from torch.nn import functional as F

from compresslight import create_model
from compresslight.cli import build_from_config
from compresslight.profiling.side_by_side import SideBySide


class StepTimer(pl.Callback):
    """Wall time from the start of batch `warmup` to the end of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.started = 0.0
        self.ended = 0.0
        self.timed_images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.ended = time.perf_counter()
            self.timed_images += batch[1].numel()


def lightning_images_per_second(args: argparse.Namespace, log_dir: str) -> float:
    model, datamodule, trainer = build_from_config(
        [
            "--config",
            "configs/resnet20_baseline.yaml",
            f"--data.data_dir={args.data_dir}",
            "--trainer.max_epochs=1",
            f"--trainer.limit_train_batches={args.warmup + args.steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={log_dir}",
        ]
    )
    timer = StepTimer(args.warmup)
    trainer.callbacks.append(timer)
    trainer.fit(model, datamodule=datamodule)
    return timer.timed_images / (timer.ended - timer.started)


def plain_images_per_second(args: argparse.Namespace, datamodule: CIFAR10DataModule) -> float:
    model = create_model("resnet20")
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images, labels = datamodule.train_images, datamodule.train_labels
    order = torch.randperm(len(labels))
    started, timed_images = 0.0, 0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            started = time.perf_counter()
        index = order[step * args.batch_size : (step + 1) * args.batch_size]
        inputs = datamodule.transform_batch(images[index], train=True)
        targets = labels[index]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        if step >= args.warmup:
            timed_images += targets.numel()
    return timed_images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data/cifar10")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="side-by-side rounds (>= 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch_size", type=int, default=128, help="plain loop's batch (the config uses 128)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    datamodule = CIFAR10DataModule(data_dir=args.data_dir, batch_size=args.batch_size)
    datamodule.setup("fit")
    images = args.steps * args.batch_size
    # Each contender returns its own seconds per image over the timed window (its warm-up steps
    # are not timed), so the side-by-side measurement gets them through its `timer`.
    options = SideBySide(min_rounds=args.rounds, max_rounds=args.rounds, target_width=None, time_budget_s=None)
    with tempfile.TemporaryDirectory() as log_dir:
        contenders = {
            "plain PyTorch loop": lambda: plain_images_per_second(args, datamodule),
            "`cli.py fit` (Lightning)": lambda: lightning_images_per_second(args, log_dir),
        }
        result = options.run(contenders, "plain PyTorch loop", timer=lambda run: 1.0 / run(), progress=None)

    print()
    print(
        f"ResNet20, batch 128, real CIFAR-10, {args.threads} threads, {args.steps} timed steps "
        f"x {result.rounds} rounds "
        f"({images} images per turn), side by side; machine: {result.load.summary()}"
    )
    print()
    print("| path | images/s (median) | min | max |")
    print("|---|---|---|---|")
    for name, seconds in result.round_latencies_s.items():
        rates = [1.0 / s for s in seconds]
        print(f"| {name} | {statistics.median(rates):.1f} | {min(rates):.1f} | {max(rates):.1f} |")
    print()
    speedup = result.speedup_of("`cli.py fit` (Lightning)")
    print(
        f"throughput `cli.py fit` / plain, paired per round: {speedup.label()} ({speedup.verdict}; per round: "
        f"{', '.join(f'{r:.3f}' for r in speedup.round_speedups)})"
    )


if __name__ == "__main__":
    main()
