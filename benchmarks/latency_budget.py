"""Latency-targeted vs FLOPs-targeted vs uniform pruning at the same target speedup (issue 12).

For each target speedup, three pruned copies of one baseline:

- (a) uniform: every group loses the same fraction by L2 norm (paper 000), the fraction found by
  bisection so that the latency table predicts the target;
- (b) FLOPs-targeted: the same allocation (`compresslight.compression.budget`) priced by MACs
  instead of latency, no block removal, budget = MACs / target;
- (c) latency-targeted: the allocation priced by the measured latency table, with block removal.

Then every model, the baseline included, is measured side by side (`compare_models`: alternating
rounds, ONNX Runtime and torch eager, batch 1, `--threads`): the speedup of a round is the
baseline's latency over the model's in that round; the table shows their geometric mean, its 95%
bootstrap interval and the verdict. With
`--data_dir` every model is fine-tuned for `--epochs` (the same schedule for all) and evaluated.

    python benchmarks/latency_budget.py --quick                 # ResNet20, random weights, no training
    python benchmarks/latency_budget.py --arch resnet56 --init_from baseline.ckpt \
        --data_dir ../shared/data/cifar10 --epochs 5 --speedups 2.0 2.5

Random weights say nothing about accuracy: `--quick` checks the script and shows the latency side.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from compresslight.checkpoint import load_compressed_checkpoint
from compresslight.classifier import ImageClassifier
from compresslight.compression.budget import BudgetProblem, allocate, step_ratios
from compresslight.compression.depth import remove_blocks
from compresslight.compression.latency_table import LatencyTable
from compresslight.compression.pruning import prune_filters
from compresslight.compression.record import CompressionRecord
from compresslight.profiling.counting import count_macs
from compresslight.profiling.side_by_side import PairedSpeedup, SideBySide, compare_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--init_from", default=None, help="a Lightning checkpoint of the baseline (ImageClassifier)")
    parser.add_argument("--speedups", type=float, nargs="+", default=[2.0, 2.5])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid_points", type=int, default=8)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--table", default=None, help="latency table JSON (reused when it matches)")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--epochs", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--quick", action="store_true", help="grid 4, 20 iterations, 3 rounds, target 2.0 only")
    args = parser.parse_args()
    if args.quick:
        args.grid_points, args.iters, args.rounds, args.speedups = 4, 20, 3, [2.0]
    logging.basicConfig(level=logging.WARNING)

    base = ImageClassifier(arch=args.arch)
    if args.init_from:
        base = load_compressed_checkpoint(base, args.init_from)
    baseline = base.model.eval()
    x = torch.randn(1, 3, 32, 32)
    table_path = (
        args.table or f"runs/latency_tables/{args.arch}_onnxruntime_b1_t{args.threads}_g{args.grid_points}.json"
    )
    table = LatencyTable.load_or_build(
        table_path, baseline, x, backend="onnxruntime", batch_size=1, threads=args.threads,
        grid_points=args.grid_points, iters=args.iters, statistic="min",
    )  # fmt: skip
    macs = macs_table(table)
    rows: dict[str, tuple[nn.Module, list[CompressionRecord], float]] = {"baseline": (baseline, [], 1.0)}
    for speedup in args.speedups:
        budget_s = table.network_dense_s / speedup
        latency_model, records = pruned(baseline, x, table, budget_s, remove=True)
        rows[f"(c) latency {speedup:g}x"] = (
            latency_model,
            records,
            table.network_dense_s / table.predict_model(latency_model),
        )
        flops_model, records = pruned(baseline, x, macs, macs.network_dense_s / speedup, remove=False)
        rows[f"(b) FLOPs {speedup:g}x"] = (
            flops_model,
            records,
            table.network_dense_s / table.predict_model(flops_model),
        )
        uniform_model, records = uniform(baseline, x, table, budget_s)
        rows[f"(a) uniform {speedup:g}x"] = (
            uniform_model,
            records,
            table.network_dense_s / table.predict_model(uniform_model),
        )

    top1 = fine_tune_and_evaluate(rows, args) if args.data_dir else {}
    measured = measure_in_rounds({name: model for name, (model, _, _) in rows.items()}, args)
    base_macs = count_macs(baseline, x)[0]
    print(
        f"\n{args.arch}, ONNX Runtime float and torch eager, batch 1, {args.threads} thread(s); "
        f"{args.rounds} alternating rounds,"
    )
    print(
        f"geometric mean of per-round speedups [95% interval] verdict; 1-minute load average {os.getloadavg()[0]:.1f}; "
        f"table {table_path}\n"
    )
    print(
        "| model | params | MMACs | theoretical | predicted (table) | ORT measured | ORT obs/theor "
        "| torch measured | top-1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (model, _, predicted) in rows.items():
        model_macs = count_macs(model, x)[0]
        theoretical = base_macs / model_macs
        ort, torch_eager = measured.get(name, {}).get("onnxruntime"), measured.get(name, {}).get("torch")
        print(
            f"| {name} | {sum(p.numel() for p in model.parameters()):,} | {model_macs / 1e6:.2f} "
            f"| {theoretical:.2f}x | "
            f"{predicted:.2f}x | {fmt(ort)} | {ort.estimate / theoretical if ort else 1.0:.2f} | {fmt(torch_eager)} | "
            f"{top1.get(name, float('nan')):.4f} |"
        )


def fmt(speedup: PairedSpeedup | None) -> str:
    return "1.00x" if speedup is None else f"{speedup.label()} {speedup.verdict}"


def pruned(
    baseline: nn.Module, x: torch.Tensor, table: LatencyTable, budget_s: float, remove: bool
) -> tuple[nn.Module, list[CompressionRecord]]:
    model = copy.deepcopy(baseline)
    allocation = allocate(BudgetProblem.from_model(model, x, table, remove_blocks=remove), budget_s)
    records: list[CompressionRecord] = []
    if allocation.removed_blocks:
        records.append(remove_blocks(model, allocation.removed_blocks))
    ratios = step_ratios(model, allocation)
    if ratios:
        records.append(prune_filters(model, ratios=ratios, norm=2, example_inputs=x))
    return model, records


def uniform(
    baseline: nn.Module, x: torch.Tensor, table: LatencyTable, budget_s: float
) -> tuple[nn.Module, list[CompressionRecord]]:
    """Paper 000's uniform L2 pruning at the smallest amount the table predicts within `budget_s`
    (bisection; 0.95 at most, where it may still be short)."""
    low, high = 0.0, 0.95
    best = None
    for _ in range(10):
        amount = (low + high) / 2
        model = copy.deepcopy(baseline)
        record = prune_filters(model, amount, norm=2, example_inputs=x)
        if table.predict_model(model) <= budget_s:
            high, best = amount, (model, [record])
        else:
            low = amount
    if best is None:
        model = copy.deepcopy(baseline)
        best = (model, [prune_filters(model, high, norm=2, example_inputs=x)])
    return best


def macs_table(table: LatencyTable) -> LatencyTable:
    """The same grid priced by MACs (1 "second" per MAC), no rest and no block overhead: what a
    FLOPs-targeted allocation optimises."""
    priced = LatencyTable.from_dict(table.to_dict())
    for layer in priced.layers.values():
        config = layer.config
        if config["type"] == "linear":
            positions = 1
        else:
            positions = 1
            for size, kernel, stride, padding, dilation in zip(
                layer.input_size, config["kernel_size"], config["stride"], config["padding"], config["dilation"]
            ):
                positions *= (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
            positions *= config["kernel_size"][0] * config["kernel_size"][1] / config["groups"]
        layer.latencies_s = [[positions * i * o for o in layer.out_grid] for i in layer.in_grid]
    priced.block_overhead_s = dict.fromkeys(priced.block_overhead_s, 0.0)
    priced.network_dense_s = sum(layer.latencies_s[-1][-1] for layer in priced.layers.values())
    return priced


def measure_in_rounds(models: dict[str, nn.Module], args: argparse.Namespace) -> dict[str, dict[str, PairedSpeedup]]:
    """Every model against the baseline side by side (`compare_models`), ONNX Runtime and torch."""
    options = SideBySide(
        iters=args.iters, min_rounds=args.rounds, max_rounds=args.rounds, target_width=None, time_budget_s=None
    )
    report = compare_models(
        models, [3, 32, 32], "baseline", batch_sizes=[1], threads=[args.threads], modes=["inference"],
        backends=["onnxruntime", "torch"], options=options, progress=False,
    )  # fmt: skip
    return {
        name: {backend: report.find(name, backend=backend) for backend in ("onnxruntime", "torch")}
        for name in models
        if name != "baseline"
    }


def fine_tune_and_evaluate(rows: dict, args: argparse.Namespace) -> dict[str, float]:
    """The same fine-tuning for every model (SGD, cosine from `--lr`), then validation top-1."""
    from compresslight.datamodules import CIFAR10DataModule

    results = {}
    for name, (model, records, _) in rows.items():
        module = ImageClassifier(arch=copy.deepcopy(model), lr=args.lr, lr_schedule="cosine")
        module.compression_records = list(records)
        datamodule = CIFAR10DataModule(data_dir=args.data_dir, batch_size=128)
        trainer = pl.Trainer(
            max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=Path("runs") / "latency_budget_benchmark",
        )  # fmt: skip
        if args.epochs > 0 and name != "baseline":
            trainer.fit(module, datamodule=datamodule)
        results[name] = float(trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/top1"])
        rows[name] = (module.model.eval(), records, rows[name][2])
    return results


if __name__ == "__main__":
    main()
