"""Re-measures trials of a finished pruning sweep side by side: is the best one really faster?

A sweep times each trial once, in its own process, under whatever load the machine had at that
moment, so a latency objective is only as steady as the machine. This script rebuilds the pruned
networks of chosen trials (the `PruningCallback` of each trial's `trial.yaml`, replayed on the
baseline checkpoint with `prune_filters`), and measures them and the unpruned baseline side by
side (`compresslight.profiling.side_by_side.compare_models`: at least `--rounds` rounds in which
all models alternate, inference and train step). It prints each model's median over rounds and
its paired speedup over the sweep's base schedule, with a confidence interval and verdict.

    python benchmarks/sweep_remeasure.py runs/sweeps/resnet56_distiller_latency \\
        --ckpt runs/resnet56_quick/version_0/checkpoints/last.ckpt

Default trials: the base schedule (the trial marked `base`) and the best trial of the first
objective in `results.csv` (lowest for a latency, highest for a top-1: `--maximize`).
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from compresslight.classifier import ImageClassifier
from compresslight.compression.pruning import prune_filters
from compresslight.profiling.side_by_side import SideBySide, compare_models

PRUNING_CALLBACK = "compresslight.callbacks.pruning.PruningCallback"


def read_trials(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def default_trials(rows: list[dict[str, str]], maximize: bool) -> tuple[list[int], str]:
    """The base trial and the best complete trial on the first objective column."""
    objective = list(rows[0])[list(rows[0]).index("base") + 1 :]
    # Columns after `base`: the parameters (labels), then the objectives; the first metric key
    # with a "/" is the first objective.
    name = next(column for column in objective if "/" in column)
    complete = [row for row in rows if row["state"] == "COMPLETE" and row[name]]
    best = (max if maximize else min)(complete, key=lambda row: float(row[name]))
    base = next(row for row in rows if row["base"] == "yes" and row["state"] == "COMPLETE")
    return [int(base["trial"]), int(best["trial"])], name


def pruning_args(trial_dir: Path) -> dict[str, Any]:
    """The `PruningCallback` init args of a trial's fit config."""
    config = yaml.safe_load((trial_dir / "trial.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        # Configs name it by its package export (`compresslight.callbacks.PruningCallback`) or its module.
        if callback["class_path"].rsplit(".", 1)[-1] == PRUNING_CALLBACK.rsplit(".", 1)[-1]:
            return callback["init_args"]
    raise ValueError(f"{trial_dir / 'trial.yaml'} has no {PRUNING_CALLBACK}.")


def pruned_copy(model: nn.Module, args: dict[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
    pruned = copy.deepcopy(model).eval()
    prune_filters(
        pruned, args.get("amount"), example_inputs=torch.zeros(1, *input_shape), ratios=args.get("ratios"),
        norm=args.get("norm", 2), round_to=args.get("round_to"), ignored_layers=args.get("ignored_layers") or (),
        importance=args.get("importance", "group"),
    )  # fmt: skip
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="the sweep's output_dir (results.csv, trial_NNNN/)")
    parser.add_argument("--ckpt", required=True, help="the baseline checkpoint the trials pruned (model.init_from)")
    parser.add_argument("--trials", type=int, nargs="+", help="trial numbers (default: base and best)")
    parser.add_argument("--maximize", action="store_true", help="the first objective is maximized (default: minimized)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5, help="side-by-side rounds (at least) of all models")
    parser.add_argument("--max-rounds", type=int, default=10, help="side-by-side rounds at most")
    args = parser.parse_args()

    rows = read_trials(args.sweep_dir)
    trials, objective = default_trials(rows, args.maximize) if args.trials is None else (args.trials, None)
    baseline = ImageClassifier.load_from_checkpoint(args.ckpt, map_location="cpu")
    input_shape = tuple(baseline.hparams.input_shape)
    models = {"unpruned baseline": baseline.model.eval()}
    swept = {int(row["trial"]): row for row in rows}
    for number in trials:
        label = f"trial {number}" + (" (base schedule)" if swept[number]["base"] == "yes" else "")
        models[label] = pruned_copy(baseline.model, pruning_args(args.sweep_dir / f"trial_{number:04d}"), input_shape)

    base_name = next((name for name in models if "base schedule" in name), "unpruned baseline")
    options = SideBySide(
        warmup=args.warmup, iters=args.iters, min_rounds=args.rounds, max_rounds=max(args.rounds, args.max_rounds)
    )
    report = compare_models(
        models, input_shape, base_name, batch_sizes=(args.batch_size,), threads=(args.threads,), options=options
    )
    inference, train = (report.result_for(mode=mode) for mode in ("inference", "train"))
    print(
        f"Side by side, at least {args.rounds} alternating rounds, batch {args.batch_size}, {args.threads} thread(s), "
        f"median of {args.iters} after {args.warmup} warm-up per turn; ms = median over rounds (range).\n"
    )
    if objective:
        print(f"Trials: the base schedule and the best by `{objective}` in {args.sweep_dir / 'results.csv'}.\n")
    print(f"| model | params | inference ms | in the sweep | train step ms | inference speedup vs {base_name} |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, model in models.items():
        rounds = inference.round_latencies_s[name]
        number = None if name == "unpruned baseline" else int(name.split()[1])
        swept_ms = (
            "-"
            if number is None or not swept[number].get(objective or "")
            else f"{float(swept[number][objective]):.2f}"
        )
        speedup = "-"
        if name != base_name:
            paired = inference.speedup_of(name)
            speedup = f"{paired.label()} {paired.verdict}"
        print(
            f"| {name} | {sum(p.numel() for p in model.parameters()):,} | {statistics.median(rounds) * 1e3:.2f} "
            f"({min(rounds) * 1e3:.2f}-{max(rounds) * 1e3:.2f}) | {swept_ms} | "
            f"{statistics.median(train.round_latencies_s[name]) * 1e3:.2f} | {speedup} |"
        )
    print()
    print(report.to_markdown())


if __name__ == "__main__":
    main()
