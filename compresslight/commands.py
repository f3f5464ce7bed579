"""The compresslight commands beside Lightning's fit/validate/test/predict.

Each builds the model and datamodule from a fit config (`--config X.yaml` plus any fit
overrides), optionally loads a checkpoint (replaying its compression records), and then
measures instead of training. Options of the command itself come first or anywhere; every
argument the command does not know is passed on to the config parser.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    options, config_args = parser.parse_known_args(args)
    if not any(arg == "--config" or arg.startswith("--config=") for arg in config_args):
        parser.error("a fit config is required: --config configs/X.yaml")
    return options, config_args


def _model_from_config(config_args: list[str], ckpt_path: str | None) -> tuple[nn.Module, Any]:
    from compresslight.checkpoint import load_compressed_checkpoint
    from compresslight.lightning_cli import build_from_config

    model, datamodule, _ = build_from_config(config_args)
    if ckpt_path is not None:
        load_compressed_checkpoint(model, ckpt_path)
    return model.eval(), datamodule


def profile_command(args: list[str]) -> None:
    """`cli.py profile --config X.yaml [--ckpt_path c.ckpt] [--baseline b.ckpt]`: profile without training."""
    from compresslight.profiling.compare import speedup_summary
    from compresslight.profiling.report import profile_and_report, read_report
    from compresslight.profiling.side_by_side import SideBySide

    parser = argparse.ArgumentParser(prog="cli.py profile", description=profile_command.__doc__)
    parser.add_argument("--ckpt_path", help="checkpoint to profile (compression records are replayed)")
    parser.add_argument("--baseline", help="checkpoint (or 'init' for the config's model as built) to compare against")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--threads", type=int, nargs="+", default=None)
    parser.add_argument("--devices", nargs="+", default=["cpu"])
    parser.add_argument("--backends", nargs="+", default=["torch"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--no_train", action="store_true", help="measure inference only")
    parser.add_argument("--output_dir", default=None, help="where to write profile.json/.md/.png")
    parser.add_argument("--min_rounds", type=int, default=5, help="side-by-side rounds before any stopping rule")
    parser.add_argument("--max_rounds", type=int, default=20, help="side-by-side rounds at most, per setting")
    parser.add_argument("--target_width", type=float, default=0.10, help="stop when (high-low)/estimate <= this")
    parser.add_argument("--time_budget_s", type=float, default=60.0, help="stop a setting's rounds after this long")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the speedup intervals")
    parser.add_argument(
        "--two_time", action="store_true", help="divide two separate profiles instead of measuring side by side"
    )
    options, config_args = _parse(parser, args)
    try:
        rounds = SideBySide(
            warmup=options.warmup, iters=options.iters, min_rounds=options.min_rounds, max_rounds=options.max_rounds,
            target_width=options.target_width, time_budget_s=options.time_budget_s, confidence=options.confidence,
        )  # fmt: skip
    except ValueError as error:
        parser.error(str(error))

    model, datamodule = _model_from_config(config_args, options.ckpt_path)
    baseline = None
    if options.baseline is not None:
        baseline, _ = _model_from_config(config_args, None if options.baseline == "init" else options.baseline)
    markdown = profile_and_report(
        model,
        datamodule.input_shape,
        baseline_model=baseline,
        out_dir=options.output_dir,
        devices=options.devices,
        threads=options.threads,
        name=Path(options.ckpt_path).stem if options.ckpt_path else "model",
        baseline_name=Path(options.baseline).stem if options.baseline else "baseline",
        batch_sizes=options.batch_sizes,
        backends=options.backends,
        warmup=options.warmup,
        iters=options.iters,
        train=not options.no_train,
        side_by_side=rounds,
        two_time=options.two_time,
    )
    if options.output_dir is None:  # nothing written: the console is the only place for the tables
        print(markdown)
        return
    reports = read_report(options.output_dir)[2]
    if reports:
        print(speedup_summary(reports))
    print(f"Full tables in {Path(options.output_dir) / 'profile.md'}")


def evaluate_top1(model: nn.Module, datamodule: Any, limit_batches: int | None = None) -> float:
    """Validation top-1 of `model` on the datamodule's validation loader (eval transform)."""
    from compresslight.evaluation import evaluate_top1 as top1_of
    from compresslight.evaluation import validation_batches

    return top1_of({"model": model.eval()}, validation_batches(datamodule, limit_batches))["model"]


def sensitivity_command(args: list[str]) -> None:
    """`cli.py sensitivity --config X.yaml --ckpt_path c.ckpt`: prune each layer alone, no retraining."""
    from compresslight.compression.sensitivity import sensitivity_analysis

    parser = argparse.ArgumentParser(prog="cli.py sensitivity", description=sensitivity_command.__doc__)
    parser.add_argument("--ckpt_path", help="the trained model to analyse")
    parser.add_argument("--layers", nargs="+", default=None, help="layer-name glob patterns (default: each group)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[round(0.1 * i, 1) for i in range(1, 10)])
    parser.add_argument("--norm", type=int, default=2, choices=(1, 2))
    parser.add_argument("--limit_batches", type=int, default=None, help="validation batches per evaluation")
    parser.add_argument("--output_dir", default="runs/sensitivity")
    options, config_args = _parse(parser, args)

    model, datamodule = _model_from_config(config_args, options.ckpt_path)
    network = getattr(model, "model", model)
    report = sensitivity_analysis(
        network,
        evaluate=lambda pruned: evaluate_top1(pruned, datamodule, options.limit_batches),
        example_inputs=torch.zeros(1, *datamodule.input_shape),
        layer_patterns=options.layers,
        ratios=options.ratios,
        norm=options.norm,
        metric_name="val top-1",
    )
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity.json").write_text(json.dumps(report.to_dict(), indent=2))
    markdown = report.to_markdown()
    (out / "sensitivity.md").write_text(markdown)
    try:
        report.plot(out / "sensitivity.png")
    except ImportError as error:
        log.warning("%s No plot written.", error)
    print(markdown)
    print(f"\nWritten to {out}/sensitivity.{{json,md,png}}")


def runtime_model_command(args: list[str]) -> None:
    """`cli.py runtime-model --config X.yaml --output rm.json`: measure a per-layer runtime model."""
    from compresslight.compression.runtime_model import RuntimeModel

    parser = argparse.ArgumentParser(prog="cli.py runtime-model", description=runtime_model_command.__doc__)
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"))
    parser.add_argument("--grid_points", type=int, default=8, help="ranks measured per layer")
    parser.add_argument("--evaluate", type=int, default=0, help="random rank configurations to check the model on")
    options, config_args = _parse(parser, args)

    model, datamodule = _model_from_config(config_args, None)
    network = getattr(model, "model", model)
    runtime_model = RuntimeModel.build(
        network,
        torch.zeros(1, *datamodule.input_shape),
        device=options.device,
        backend=options.backend,
        threads=options.threads,
        batch_size=options.batch_size,
        grid_points=options.grid_points,
        statistic="min",
    )
    runtime_model.save(options.output)
    print(f"Runtime model written to {options.output}")
    if options.evaluate:
        print(json.dumps(runtime_model.evaluate(network, n_samples=options.evaluate).to_dict(), indent=2))
