"""Tucker-2 with VBMF ranks on a trained ResNet20: what FLOPs promise vs what the machine delivers.

Paper 000 decomposes every conv of ResNet20 with Tucker-2 at VBMF ranks (272K -> 25K params,
theoretical speedup 8.73) and observes 0.51x-1.48x. This script takes a trained ResNet20
checkpoint, decomposes it twice, and compares both with the baseline:

- plain VBMF (paper 000): every conv but the first, 1x1 shortcuts split by SVD;
- runtime-aware, layers alone: the same ranks, but each layer is timed against its factorization
  at every batch size / thread count / mode below and kept where the factorization is not
  `--margin` faster;
- runtime-aware (the default `RuntimeCheck`): then the whole decomposed model is measured side by
  side with the baseline in the same settings, and layers are put back while it is significantly
  slower (the whole confidence interval below 1) in any.

It prints the ranks chosen, params, MACs, theoretical speedup (FLOPs ratio), observed speedup for
inference and the train step at each batch size and thread count (measured side by side:
`compresslight.profiling.side_by_side.compare_models`, the models alternate in at least `--rounds`
rounds, paired speedup with a confidence interval and verdict), validation top-1 right after
decomposition (no fine-tuning), and the decomposition time of ResNet18 (ours, and a plain SVD-based
VBMF + tensorly HOOI as a reference).

    python benchmarks/tucker_speedup.py --ckpt runs/resnet20_quick/version_0/checkpoints/last.ckpt
    python benchmarks/tucker_speedup.py --quick     # random-init ResNet20, few iterations: a smoke test
    python benchmarks/tucker_speedup.py --ckpt ... --device cuda --threads 1   # paper 000's GPU case

Random weights tell nothing about VBMF (it finds rank ~1 everywhere): `--quick` only checks that the
script runs. On a shared machine latency ratios are only as steady as the neighbours: the 1-minute
load average is printed with the tables.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from compresslight.classifier import ImageClassifier
from compresslight.compression.tucker import RuntimeCheck, TuckerRecord, decompose_model
from compresslight.compression.vbmf import estimate_rank
from compresslight.profiling import ModelProfile, SpeedupReport, compare, num_threads, profile, speedup_markdown
from compresslight.profiling.side_by_side import SideBySide, SideBySideReport, compare_models, format_speedup
from compresslight.registry import create_model

CIFAR_SHAPE = (3, 32, 32)


def load_resnet20(ckpt: str | None) -> tuple[nn.Module, str]:
    """The trained model inside a checkpoint (records replayed), or a random-init ResNet20."""
    if ckpt is None:
        torch.manual_seed(0)
        return create_model("resnet20", num_classes=10), "random-init resnet20"
    module = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    if module.compression_records:
        raise SystemExit(f"{ckpt} holds an already compressed model ({len(module.compression_records)} records).")
    return module.model, f"resnet20 from {ckpt}"


def decompose(model: nn.Module, runtime_check: RuntimeCheck | None) -> tuple[nn.Module, TuckerRecord, float]:
    """A decomposed copy of `model` (paper 000's settings), its record and the seconds it took."""
    copied = copy.deepcopy(model).eval()
    started = time.perf_counter()
    record = decompose_model(
        copied, rank_method="vbmf", runtime_aware=runtime_check, example_inputs=torch.zeros(1, *CIFAR_SHAPE)
    )
    return copied, record, time.perf_counter() - started


def profile_all(
    models: dict[str, nn.Module], args: argparse.Namespace, loads: list[float]
) -> tuple[dict[int, dict[str, ModelProfile]], SideBySideReport]:
    """threads -> model name -> profile (params, MACs, latency tables), and every model measured
    side by side with the baseline (`compare_models`: alternating rounds, paired speedups with
    intervals) in every setting: on this VM two consecutive measurements of one model differ by
    up to ~20-50%, so only paired rounds can tell 0.95x from 1.05x."""
    profiles = {
        threads: {
            name: profile(
                model,
                CIFAR_SHAPE,
                batch_sizes=args.batch_sizes,
                device=args.device,
                threads=threads,
                warmup=args.warmup,
                iters=args.iters,
                measure_memory=False,
                name=name,
            )  # fmt: skip
            for name, model in models.items()
        }
        for threads in args.threads
    }
    loads.append(os.getloadavg()[0])
    options = SideBySide(
        warmup=args.warmup, iters=args.iters, min_rounds=args.rounds, max_rounds=max(args.rounds, args.max_rounds),
        time_budget_s=args.time_budget_s,
    )  # fmt: skip
    paired = compare_models(
        models, CIFAR_SHAPE, "baseline", batch_sizes=args.batch_sizes, threads=args.threads, device=args.device,
        options=options,
    )  # fmt: skip
    loads.append(os.getloadavg()[0])
    return profiles, paired


def top1(model: nn.Module, args: argparse.Namespace) -> float | None:
    """Validation top-1 on CIFAR-10's test split (None when the data is not there)."""
    from compresslight.datamodules import CIFAR10DataModule

    from compresslight.evaluation import evaluate_top1, validation_batches

    if not (Path(args.data_dir) / "cifar-10-batches-py").is_dir():
        return None
    datamodule = CIFAR10DataModule(data_dir=args.data_dir, eval_batch_size=500)
    return evaluate_top1({"model": model.eval()}, validation_batches(datamodule, args.eval_batches))["model"]


def reference_decomposition_seconds(model: nn.Module) -> float:
    """A plain implementation's time: SVD-based VBMF on both unfoldings, then tensorly's
    `partial_tucker` with its defaults (SVD initialization, up to 100 HOOI sweeps)."""
    from tensorly import backend_context
    from tensorly.decomposition import partial_tucker

    started = time.perf_counter()
    for _name, layer in model.named_modules():
        if not isinstance(layer, nn.Conv2d) or layer.kernel_size == (1, 1) or layer.in_channels <= 3:
            continue
        weight = layer.weight.detach().to(torch.float64)
        ranks = []
        for mode in (0, 1):
            unfolded = weight.movedim(mode, 0).reshape(weight.shape[mode], -1).numpy()
            ranks.append(max(estimate_rank(unfolded), 1))
        with backend_context("pytorch"):
            partial_tucker(layer.weight.detach(), rank=ranks, modes=[0, 1])
    return time.perf_counter() - started


def decompose_as_layers_alone_decided(model: nn.Module, aware: TuckerRecord) -> tuple[nn.Module, TuckerRecord]:
    """The model the layer-alone decisions of `aware` give, before its whole-model check: the same
    ranks (and, HOSVD being deterministic, the same factors) for every layer decomposed or reverted."""
    reverted = {check["reverted"] for check in aware.whole_model} - {None}
    ranks = {row["name"]: row["ranks"] for row in aware.report if row["name"] in reverted or row["name"] in aware.ranks}
    copied = copy.deepcopy(model).eval()
    if not ranks:
        return copied, TuckerRecord()
    record = decompose_model(copied, rank_method=ranks, example_inputs=torch.zeros(1, *CIFAR_SHAPE))
    return copied, record


def whole_model_table(record: TuckerRecord) -> str:
    """The runtime-aware decomposition's whole-model checks: speedup per setting, then what it did."""
    if not record.whole_model:
        return "No whole-model check (no layer was faster alone).\n"
    settings = list(
        dict.fromkeys((r["mode"], r["batch_size"], r["threads"]) for check in record.whole_model for r in check["rows"])
    )
    header = [f"{mode} bs{batch} t{threads}" for mode, batch, threads in settings]
    lines = ["| whole-model check | " + " | ".join(header) + " | then |", "|" + "---|" * (len(settings) + 2)]
    for number, check in enumerate(record.whole_model, 1):
        measured = {(r["mode"], r["batch_size"], r["threads"]): r for r in check["rows"]}
        cells = [
            "-" if setting not in measured else
            f"{format_speedup(measured[setting]['speedup'], measured[setting]['low'], measured[setting]['high'])}"
            f" {measured[setting]['verdict']}"
            for setting in settings
        ]  # fmt: skip
        if check["reverted"] is not None:
            then = f"revert {check['reverted']}"
        else:
            then = "keep the rest" if check is record.whole_model[-1] else "time every setting again"
        lines.append(f"| {number} | " + " | ".join(cells) + f" | {then} |")
    return "\n".join(lines) + "\n"


def ranks_table(records: dict[str, TuckerRecord]) -> str:
    names = list(dict.fromkeys(row["name"] for record in records.values() for row in record.report))
    rows = {method: {row["name"]: row for row in record.report} for method, record in records.items()}
    header = ["layer", "params", *[f"{method}: ranks / decision" for method in records]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        first = next(iter(rows.values()))[name]
        cells = [name, f"{first['params_before']:,}"]
        for method in records:
            row = rows[method].get(name)
            if row is None:  # not named in that decomposition's explicit ranks
                cells.append("- / kept")
                continue
            ranks = "-" if row["ranks"] is None else "x".join(map(str, row["ranks"]))
            decision = row["decision"] if row["decision"] == "decomposed" else f"kept ({row['reason']})"
            cells.append(f"{ranks} / {decision}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def worst_speedup(reports: list[SpeedupReport]) -> str:
    observed = [s for report in reports for s in report.speedups]
    if not observed:
        return "-"
    worst = min(observed, key=lambda s: s.observed)
    return f"{worst.label()} {worst.verdict}"


def run(args: argparse.Namespace) -> None:
    loads = [os.getloadavg()[0]]
    baseline, description = load_resnet20(args.ckpt)
    baseline.eval()
    print(f"# Tucker-2 VBMF on {description}\n", flush=True)

    plain, plain_record, plain_seconds = decompose(baseline, None)
    check = RuntimeCheck(
        batch_sizes=args.batch_sizes, threads=args.threads, device=args.device, margin=args.margin, train=True,
        warmup=args.check_warmup, iters=args.check_iters, rounds=args.check_rounds,
    )  # fmt: skip
    aware, aware_record, aware_seconds = decompose(baseline, check)
    loads.append(os.getloadavg()[0])
    layers_alone, layers_alone_record = decompose_as_layers_alone_decided(baseline, aware_record)
    models = {
        "baseline": baseline, "tucker-vbmf": plain, "tucker-vbmf-runtime-layers": layers_alone,
        "tucker-vbmf-runtime": aware,
    }  # fmt: skip
    records = {
        "tucker-vbmf": plain_record, "tucker-vbmf-runtime-layers": layers_alone_record,
        "tucker-vbmf-runtime": aware_record,
    }  # fmt: skip

    print("## Ranks (out x in for Tucker-2, one rank for an SVD split)\n")
    print(ranks_table(records))
    print()
    print(
        f"Decomposition time: plain VBMF {plain_seconds:.2f} s, runtime-aware {aware_seconds:.2f} s "
        f"(timing {len(args.batch_sizes)} batch sizes x {len(args.threads)} thread counts x 2 modes per layer, "
        f"then {len(aware_record.whole_model)} whole-model check(s)).\n"
    )
    print(whole_model_table(aware_record))

    profiles, paired = profile_all(models, args, loads)
    print("## Params, MACs, accuracy right after decomposition (no fine-tuning)\n")
    print(
        "| model | params | MACs (batch 1) | params ratio | theoretical speedup (FLOPs) | top-1 "
        "| worst observed speedup |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    reports: dict[str, list[SpeedupReport]] = {name: [] for name in records}
    for _threads, by_model in profiles.items():
        for name in records:
            reports[name].append(compare(by_model["baseline"], by_model[name], side_by_side=paired))
    first = profiles[args.threads[0]]
    for name, model in models.items():
        accuracy = None if args.eval_batches == 0 else top1(model, args)
        model_profile = first[name]
        ratio = first["baseline"].params.total / model_profile.params.total
        theoretical = first["baseline"].flops / model_profile.flops
        cells = [
            name, f"{model_profile.params.total:,}", f"{model_profile.macs:,}", f"{ratio:.2f}", f"{theoretical:.2f}",
            "-" if accuracy is None else f"{accuracy:.2%}", worst_speedup(reports[name]) if name in reports else "-",
        ]  # fmt: skip
        print("| " + " | ".join(cells) + " |", flush=True)
    print(
        "\nPaper 000 (ResNet20, Tucker VBMF): 272K -> 25K params, theoretical speedup 8.73, 79.35% after 100 "
        "epochs of fine-tuning; observed 0.51-1.48.\n"
    )
    print(
        "## Observed speedup (side by side: the four models alternate in rounds, >= "
        f"{args.rounds} rounds of the median of {args.iters} calls after {args.warmup} warm-up; paired per round)\n"
    )
    print(speedup_markdown([report for name in records for report in reports[name]]))
    print(paired.to_markdown())

    resnet18 = create_model("resnet18", num_classes=1000)
    size = 64 if args.quick else 224
    times = []
    with num_threads(args.decompose_threads) as threads:
        for _ in range(1 if args.quick else 3):
            _, _, seconds = decompose_resnet18(resnet18, size)
            times.append(seconds)
        reference = reference_decomposition_seconds(resnet18) if args.reference else None
    print(f"## ResNet18 decomposition time (random-init weights, VBMF ranks, {threads} thread(s))\n")
    print(
        f"compresslight: median {statistics.median(times):.2f} s over {len(times)} run(s) "
        f"(min {min(times):.2f}, max {max(times):.2f})"
        + ("" if reference is None else f"; plain SVD-VBMF + tensorly partial_tucker defaults: {reference:.2f} s")
        + ".\n"
    )
    print(
        f"1-min load average during the run: min {min(loads):.1f}, median {statistics.median(loads):.1f}, "
        f"max {max(loads):.1f} ({os.cpu_count()} logical CPUs)."
    )


def decompose_resnet18(model: nn.Module, size: int) -> tuple[nn.Module, TuckerRecord, float]:
    copied = copy.deepcopy(model).eval()
    started = time.perf_counter()
    record = decompose_model(copied, rank_method="vbmf", example_inputs=torch.zeros(1, 3, size, size))
    return copied, record, time.perf_counter() - started


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="a trained ResNet20 checkpoint (ImageClassifier, uncompressed)")
    parser.add_argument("--quick", action="store_true", help="random-init ResNet20, few iterations: a smoke test")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10"))
    parser.add_argument("--device", default="cpu", help="where to time (profiles and runtime-aware decisions)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=5, help="profile(): untimed calls (paper 000: 5)")
    parser.add_argument("--iters", type=int, default=50, help="profile(): timed calls (paper 000: 50)")
    parser.add_argument("--rounds", type=int, default=5, help="side-by-side rounds (at least) of all models")
    parser.add_argument("--max-rounds", type=int, default=10, help="side-by-side rounds at most per setting")
    parser.add_argument("--time-budget-s", type=float, default=60.0, help="side-by-side seconds per setting")
    parser.add_argument("--margin", type=float, default=0.05, help="runtime-aware: speedup a layer must reach")
    parser.add_argument("--check-warmup", type=int, default=3)
    parser.add_argument("--check-iters", type=int, default=20)
    parser.add_argument("--check-rounds", type=int, default=3, help="runtime-aware: side-by-side rounds per check")
    parser.add_argument(
        "--eval-batches", type=int, default=None, help="validation batches of 500 images (default: all; 0: skip)"
    )
    parser.add_argument("--decompose-threads", type=int, default=1, help="threads for the ResNet18 decomposition")
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the plain reference decomposition of ResNet18",
    )
    args = parser.parse_args(argv)
    if args.ckpt is None and not args.quick:
        parser.error("--ckpt is required (a trained ResNet20; VBMF on random weights finds rank ~1), or pass --quick")
    if args.quick:
        args.batch_sizes = [1, 8]
        args.warmup, args.iters, args.rounds, args.max_rounds = 1, 3, 2, 2
        args.check_warmup, args.check_iters, args.check_rounds = 1, 2, 2
        args.eval_batches = 1 if args.eval_batches is None else args.eval_batches
    return args


if __name__ == "__main__":
    run(parse_args())
