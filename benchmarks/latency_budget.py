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
import functools
import json
import logging
import math
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
from compresslight.compression.quantization_onnx import OnnxRuntimeModel, export_int8_onnx
from compresslight.compression.record import CompressionRecord
from compresslight.evaluation import evaluate_top1, validation_batches
from compresslight.profiling.backends import onnxruntime_runner
from compresslight.profiling.counting import count_macs
from compresslight.profiling.side_by_side import PairedSpeedup, SideBySide, compare_models
from compresslight.profiling.timing import num_threads


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
    parser.add_argument("--normalization", default="cifar10", help="the datamodule's statistics (imagenet: resnet*_a)")
    parser.add_argument("--epochs", type=float, default=0, help="fine-tuning epochs per model (fractions allowed)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--int8", action="store_true", help="also export int8 ONNX Runtime models (needs --data_dir)")
    parser.add_argument("--large_batch", type=int, default=128, help="the second setting's batch size (0: skip it)")
    parser.add_argument("--large_threads", type=int, default=2, help="the second setting's threads")
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    parser.add_argument("--quick", action="store_true", help="grid 4, 20 iterations, 3 rounds, target 2.0 only")
    args = parser.parse_args()
    if args.quick:
        args.grid_points, args.iters, args.rounds, args.speedups = 4, 20, 3, [2.0]
    if args.int8 and not args.data_dir:
        parser.error("`--int8` needs `--data_dir` (calibration batches and int8 top-1).")
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
    rows = build_rows(baseline, x, table, args.speedups)
    datamodule = None
    if args.data_dir:
        from compresslight.datamodules import CIFAR10DataModule

        datamodule = CIFAR10DataModule(data_dir=args.data_dir, batch_size=128, normalization=args.normalization)
    top1 = fine_tune_and_evaluate(rows, args, datamodule) if datamodule else {}
    models = {name: model for name, (model, _, _) in rows.items()}
    int8 = export_int8(models, datamodule, Path("runs") / "latency_budget_benchmark") if args.int8 else {}
    int8_top1 = evaluate_int8(int8, datamodule, args.threads) if int8 else {}
    load_before = os.getloadavg()[0]
    small = measure_in_rounds(models, args, batch_size=1, threads=args.threads)
    large = (
        measure_in_rounds(models, args, batch_size=args.large_batch, threads=args.large_threads)
        if args.large_batch
        else {}
    )
    int8_speedups = measure_int8(models, int8, args) if int8 else {}
    print_table(args, table_path, baseline, x, rows, top1, small, large, int8_speedups, int8_top1, load_before)
    if args.json:
        write_json(args, baseline, x, rows, top1, small, large, int8_speedups, int8_top1)


def build_rows(
    baseline: nn.Module, x: torch.Tensor, table: LatencyTable, speedups: list[float]
) -> dict[str, tuple[nn.Module, list[CompressionRecord], float]]:
    """The baseline and, per target, (a) uniform, (b) FLOPs- and (c) latency-targeted copies, each
    with its records and the speedup the latency table predicts for it."""
    macs = macs_table(table)
    rows: dict[str, tuple[nn.Module, list[CompressionRecord], float]] = {"baseline": (baseline, [], 1.0)}
    for speedup in speedups:
        budget_s = table.network_dense_s / speedup
        candidates = {
            f"(a) uniform {speedup:g}x": uniform(baseline, x, table, budget_s),
            f"(b) FLOPs {speedup:g}x": pruned(baseline, x, macs, macs.network_dense_s / speedup, remove=False),
            f"(c) latency {speedup:g}x": pruned(baseline, x, table, budget_s, remove=True),
        }
        for name, (model, records) in candidates.items():
            rows[name] = (model, records, table.network_dense_s / table.predict_model(model))
    return rows


def print_table(args, table_path, baseline, x, rows, top1, small, large, int8_speedups, int8_top1, load) -> None:
    base_macs = count_macs(baseline, x)[0]
    print(
        f"\n{args.arch}: speedups over the unpruned baseline, each the geometric mean of {args.rounds} paired "
        f"alternating rounds [95% bootstrap interval]; fine-tuning: {args.epochs:g} epoch(s) each, lr {args.lr}; "
        f"1-minute load average {load:.1f} when the measurements started; table {table_path}"
    )
    large_label = f"b{args.large_batch}/t{args.large_threads}"
    header = (
        f"| model | params | MMACs | theoretical | predicted (table) | ORT b1/t{args.threads} | obs/theor "
        f"| torch b1/t{args.threads} | ORT {large_label} | torch {large_label} | top-1 | int8 ORT b1/t{args.threads} "
        "(vs float baseline) | int8 top-1 |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for name, (model, _, predicted) in rows.items():
        model_macs = count_macs(model, x)[0]
        theoretical = base_macs / model_macs
        ort = small.get(name, {}).get("onnxruntime")
        cells = [
            name,
            f"{sum(p.numel() for p in model.parameters()):,}",
            f"{model_macs / 1e6:.2f}",
            f"{theoretical:.2f}x",
            f"{predicted:.2f}x",
            fmt(ort),
            f"{ort.estimate / theoretical if ort else 1.0:.2f}",
            fmt(small.get(name, {}).get("torch")),
            fmt(large.get(name, {}).get("onnxruntime")) if large else "-",
            fmt(large.get(name, {}).get("torch")) if large else "-",
            f"{100 * top1[name]:.2f}%" if name in top1 else "-",
            fmt(int8_speedups.get(name)) if int8_speedups else "-",
            f"{100 * int8_top1[name]:.2f}%" if name in int8_top1 else "-",
        ]
        print("| " + " | ".join(cells) + " |")


def write_json(args, baseline, x, rows, top1, small, large, int8_speedups, int8_top1) -> None:
    base_macs = count_macs(baseline, x)[0]
    out = {"args": vars(args), "rows": {}}
    for name, (model, _, predicted) in rows.items():
        macs = count_macs(model, x)[0]
        out["rows"][name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "macs": macs,
            "theoretical": base_macs / macs,
            "predicted": predicted,
            "small": {k: v.to_dict() for k, v in small.get(name, {}).items() if v is not None},
            "large": {k: v.to_dict() for k, v in large.get(name, {}).items() if v is not None},
            "top1": top1.get(name),
            "int8_speedup": int8_speedups[name].to_dict() if name in int8_speedups else None,
            "int8_top1": int8_top1.get(name),
        }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


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


def measure_in_rounds(
    models: dict[str, nn.Module], args: argparse.Namespace, batch_size: int, threads: int
) -> dict[str, dict[str, PairedSpeedup]]:
    """Every model against the baseline side by side (`compare_models`), ONNX Runtime and torch."""
    options = SideBySide(
        iters=args.iters if batch_size == 1 else max(5, args.iters // 10),
        min_rounds=args.rounds, max_rounds=args.rounds, target_width=None, time_budget_s=None,
    )  # fmt: skip
    report = compare_models(
        models, [3, 32, 32], "baseline", batch_sizes=[batch_size], threads=[threads], modes=["inference"],
        backends=["onnxruntime", "torch"], options=options, progress=False,
    )  # fmt: skip
    return {
        name: {backend: report.find(name, backend=backend) for backend in ("onnxruntime", "torch")}
        for name in models
        if name != "baseline"
    }


def export_int8(models: dict[str, nn.Module], datamodule, out_dir: Path) -> dict[str, Path]:
    """Every model as an int8 ONNX Runtime file (static QDQ, per-channel weights, 10 training
    batches of calibration), as `QuantizationCallback` writes it."""
    from itertools import islice

    datamodule.setup("fit")
    calibration = [
        datamodule.on_after_batch_transfer(batch, 0)[0] for batch in islice(datamodule.train_dataloader(), 10)
    ]
    return {
        name: export_int8_onnx(model, (1, 3, 32, 32), calibration, out_dir / f"{slug(name)}.onnx", per_channel=True)
        for name, model in models.items()
    }


def evaluate_int8(paths: dict[str, Path], datamodule, threads: int) -> dict[str, float]:
    """Top-1 of the int8 files with ONNX Runtime over the whole validation set."""
    models = {name: OnnxRuntimeModel(path, num_threads=threads) for name, path in paths.items()}
    return evaluate_top1(models, validation_batches(datamodule))


def measure_int8(
    models: dict[str, nn.Module], paths: dict[str, Path], args: argparse.Namespace
) -> dict[str, PairedSpeedup]:
    """The int8 files against the *float* ONNX Runtime baseline, side by side at batch 1 (the
    float baseline and every int8 model alternate in the same rounds)."""
    example = torch.randn(1, 3, 32, 32)
    calls = {"baseline float": onnxruntime_runner(models["baseline"], example, args.threads)}
    feed = example.numpy()
    for name, path in paths.items():
        session = OnnxRuntimeModel(path, num_threads=args.threads).session
        calls[name] = functools.partial(session.run, None, {session.get_inputs()[0].name: feed})
    options = SideBySide(
        iters=args.iters, min_rounds=args.rounds, max_rounds=args.rounds, target_width=None, time_budget_s=None
    )
    with num_threads(args.threads):
        setting = {"backend": "onnxruntime int8", "batch_size": 1, "threads": args.threads}
        result = options.run(calls, "baseline float", setting=setting, progress=False)
    return {speedup.candidate: speedup for speedup in result.speedups}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def fine_tune_and_evaluate(rows: dict, args: argparse.Namespace, datamodule) -> dict[str, float]:
    """The same fine-tuning for every model (SGD, cosine from `--lr`), then validation top-1."""
    results = {}
    for name, (model, records, _) in rows.items():
        module = ImageClassifier(arch=copy.deepcopy(model), lr=args.lr, lr_schedule="cosine")
        module.compression_records = list(records)
        trainer = pl.Trainer(
            max_epochs=max(1, math.ceil(args.epochs)), limit_train_batches=args.epochs if args.epochs < 1 else 1.0,
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=Path("runs") / "latency_budget_benchmark",
        )  # fmt: skip
        if args.epochs > 0 and name != "baseline":
            module.train()  # the copies are in eval mode, and Lightning keeps a module's mode during fit
            trainer.fit(module, datamodule=datamodule)
        results[name] = float(trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/top1"])
        rows[name] = (module.model.eval(), records, rows[name][2])
    return results


if __name__ == "__main__":
    main()
