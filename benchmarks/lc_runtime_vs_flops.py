"""Runtime-targeted vs FLOPs-targeted LC low-rank compression on CIFAR-10 (paper 003, Fig. 2).

Paper 003's claim: at the same *measured* inference time, low-rank networks whose ranks were
learned against a device runtime model are more accurate than those learned against FLOPs,
because FLOPs do not say which factorizations are fast on the device. This script checks it on
this machine, on a short schedule:

1. the runtime model of the baseline on this CPU (batch 1, `--threads`), measured once and shared
   by both runs, and its error on `--evaluate` random rank configurations (paper Fig. 1 right);
2. for each cost, `lam` is chosen so that the C step at the first `mu` (`--calibrate_at last`: the
   last) on the *baseline* weights gives ranks whose predicted time in the compressible layers,
   `R(r)`, is `--target` x theirs when dense (bisection on the singular values; for the FLOPs run
   the latency of its ranks is predicted by the same runtime model), so both runs aim at the same
   latency. Calibrating at the last `mu` makes every earlier C step (smaller `mu`, same `lam`)
   choose rank ~0, and in a network with BatchNorm after each conv the L steps can then shrink the
   weights toward 0 at no loss (the conv is scale-invariant): measured on ResNet20, 100 batches
   per L step, both costs collapsed to rank 1 everywhere and 10% top-1. At the first `mu`, the
   first Theta already has the target ranks; later C steps (larger `mu`) keep them only where the
   L steps have made the dropped singular values small, which is the algorithm's job. (The rest of the
   network, activations, pooling and normalization, takes the same time whatever the ranks, so
   a fraction of the whole network's latency may be out of reach.)
3. each run is one `fit` with `LCCallback` (T L/C steps, factorization, fine-tuning) on a few
   batches per epoch;
4. every model (the dense baseline too) is measured the same way: MMACs (multiply-accumulates,
   the papers' "MFLOPs"), params, latency at batch 1 measured side by side after all fits
   (`compresslight.profiling.side_by_side`: at least `--rounds` rounds in which the models
   alternate; median and min of the round medians, paired speedup over dense with an
   interval), top-1 on `--val_batches` test batches, and the runtime model's
   prediction.

It prints a Markdown table and writes results.json / results.md to `--out_dir`. The L steps here
are short: from a trained baseline (`--baseline`, an `ImageClassifier` checkpoint) they mainly
test which ranks each cost picks; paper 003 trains 60 x 20 epochs.

    python benchmarks/lc_runtime_vs_flops.py --baseline runs/vgg16_baseline/version_0/checkpoints/last.ckpt
    python benchmarks/lc_runtime_vs_flops.py --quick      # plumbing check, ~1-2 min, numbers meaningless
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from compresslight.callbacks.lc import LCCallback
from compresslight.datamodules import CIFAR10DataModule
from pytorch_lightning.loggers import CSVLogger

from compresslight.classifier import ImageClassifier
from compresslight.compression.lc import FlopsCost, RankCost, StorageCost
from compresslight.compression.lc_schedule import calibrate_lam
from compresslight.compression.lowrank import compressible_layers
from compresslight.compression.runtime_model import RuntimeModel
from compresslight.profiling import num_threads
from compresslight.profiling.counting import count_macs, count_parameters
from compresslight.profiling.side_by_side import SideBySide, SideBySideReport, compare_models, format_speedup

log = logging.getLogger("lc_runtime_vs_flops")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
INPUT_SHAPE = (3, 32, 32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--baseline", help="ImageClassifier checkpoint of the trained network to compress")
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA))
    parser.add_argument("--out_dir", default="runs/lc_runtime_vs_flops")
    parser.add_argument("--runtime_model", help="reuse this runtime model JSON instead of measuring one")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the runtime model and latencies")
    parser.add_argument("--train_threads", type=int, default=None, help="torch threads while training")
    parser.add_argument("--grid_points", type=int, default=8)
    parser.add_argument("--iters", type=int, default=50, help="timed calls per latency measurement")
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating latency measurements of all models at the end"
    )
    parser.add_argument("--evaluate", type=int, default=10, help="random rank configurations to check it on")
    parser.add_argument("--target", type=float, default=0.5, help="goal for R(r), fraction of the dense layers'")
    parser.add_argument("--costs", nargs="+", default=["runtime", "flops"], choices=["runtime", "flops", "storage"])
    parser.add_argument("--steps", type=int, default=4, help="T, L/C steps")
    parser.add_argument("--epochs_per_step", type=int, default=1)
    parser.add_argument("--finetune_epochs", type=int, default=2)
    parser.add_argument("--train_batches", type=int, default=6, help="training batches per epoch")
    parser.add_argument("--val_batches", type=int, default=20, help="test batches for top-1 (eval batch 100)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--mu_init", type=float, default=1e-2)
    parser.add_argument("--mu_growth", type=float, default=4.0)
    parser.add_argument(
        "--calibrate_at",
        choices=["first", "last"],
        default="first",
        help="the mu whose C step on the baseline weights aims at --target (see above)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny settings to check the script works")
    args = parser.parse_args(argv)
    if args.quick:
        args.grid_points, args.iters, args.evaluate, args.rounds = 3, 5, 2, 2
        args.steps, args.finetune_epochs, args.train_batches, args.val_batches, args.batch_size = 2, 1, 2, 2, 16
    if not 0 < args.target <= 1:
        parser.error(f"--target must be in (0, 1], got {args.target}")
    return args


# --------------------------------------------------------------------------- measuring


def build_classifier(args: argparse.Namespace) -> ImageClassifier:
    # Paper 003's L-step optimizer (SGD, momentum 0.9, x0.99 per epoch, restarted each L step by
    # LCCallback(restart_lr=True)); the lr is larger than its 7e-4 because the steps are short.
    return ImageClassifier(
        arch=args.arch, num_classes=10, input_shape=INPUT_SHAPE, lr=args.lr, momentum=0.9, nesterov=True,
        weight_decay=0.0, lr_schedule="exponential", gamma=0.99, init_from=args.baseline,
    )  # fmt: skip


def measure(
    name: str, model: ImageClassifier, datamodule: CIFAR10DataModule, args: argparse.Namespace
) -> dict[str, Any]:
    """MMACs, params and top-1 of one model (latency: `remeasure_side_by_side`, after all fits)."""
    network = model.model.eval()
    macs = count_macs(network, torch.zeros(1, *INPUT_SHAPE))[0]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=args.val_batches, enable_checkpointing=False,
    )  # fmt: skip
    top1 = trainer.validate(model, datamodule=datamodule, verbose=False)[0]["val/top1"]
    return {
        "name": name,
        "mmacs": macs / 1e6,
        "params_m": count_parameters(network).total / 1e6,
        "top1": float(top1),
    }


def remeasure_side_by_side(
    rows: list[dict[str, Any]], networks: dict[str, torch.nn.Module], args: argparse.Namespace
) -> SideBySideReport:
    """Measures all models side by side with the dense baseline (`compare_models`: at least
    `--rounds` alternating rounds, inference at batch 1): each row gets the median over rounds of
    its per-round median and min latency, and its paired speedup over dense with an interval. One
    measurement right after each fit is at the mercy of the load at that moment."""
    options = SideBySide(iters=args.iters, min_rounds=args.rounds, max_rounds=max(args.rounds, 2 * args.rounds))
    with num_threads(args.threads):
        report = compare_models(
            networks, INPUT_SHAPE, "dense baseline", threads=(args.threads,), modes=("inference",), options=options
        )
    [result] = report.results
    for row in rows:
        name = row["name"]
        medians = [t * 1e3 for t in result.round_latencies_s[name]]
        row.update(
            latency_median_ms=statistics.median(medians), latency_min_ms=min(medians), latency_round_medians_ms=medians
        )
        if name != result.baseline:
            speedup = result.speedup_of(name)
            row.update(
                speedup=speedup.estimate, speedup_low=speedup.low, speedup_high=speedup.high, verdict=speedup.verdict
            )
    return report


def run_lc(
    cost: str, lam: float, runtime_path: Path, datamodule: CIFAR10DataModule, args: argparse.Namespace
) -> tuple[ImageClassifier, LCCallback, float]:
    pl.seed_everything(args.seed)
    model = build_classifier(args)
    lc = LCCallback(
        lam=lam, cost=cost, runtime_model=str(runtime_path) if cost == "runtime" else None, mu_init=args.mu_init,
        mu_growth=args.mu_growth, steps=args.steps, epochs_per_step=args.epochs_per_step, restart_lr=True,
        threads=args.threads if cost == "runtime" else None,
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.steps * args.epochs_per_step + args.finetune_epochs,
        limit_train_batches=args.train_batches, limit_val_batches=0, num_sanity_val_steps=0,
        logger=CSVLogger(args.out_dir, name=f"lc_{cost}"), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[lc],
    )  # fmt: skip
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    return model, lc, time.perf_counter() - started


# --------------------------------------------------------------------------- report


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| model | lam | MMACs | params (M) | predicted ms | measured ms (median / min round) "
        "| speedup over dense, side by side | top-1 | factorized layers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lam = "-" if row.get("lam") is None else f"{row['lam']:.3g}"
        params = "-" if row.get("params_m") is None else f"{row['params_m']:.2f}"
        speedup = "-"
        if row.get("speedup") is not None:
            speedup = f"{format_speedup(row['speedup'], row['speedup_low'], row['speedup_high'])} {row['verdict']}"
        lines.append(
            f"| {row['name']} | {lam} | {row['mmacs']:.1f} | {params} | {row['predicted_ms']:.2f} | "
            f"{row['latency_median_ms']:.2f} / {row['latency_min_ms']:.2f} | {speedup} | {row['top1'] * 100:.2f}% | "
            f"{row.get('factorized', '-')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.train_threads is not None:
        torch.set_num_threads(args.train_threads)
    if args.baseline is None:
        log.warning("No --baseline: compressing an untrained %s; the accuracies mean nothing.", args.arch)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    datamodule = CIFAR10DataModule(args.data_dir, batch_size=args.batch_size, eval_batch_size=100)

    pl.seed_everything(args.seed)
    baseline = build_classifier(args)
    network = baseline.model.eval()
    example = torch.zeros(1, *INPUT_SHAPE)

    # 1. The runtime model, shared by both runs.
    runtime_path = out / "runtime_model.json"
    build_s = 0.0
    if args.runtime_model:
        runtime_model = RuntimeModel.load(args.runtime_model)
        runtime_model.check_compatible(network, example_inputs=example, device="cpu", threads=args.threads)
    else:
        build_started = time.perf_counter()
        runtime_model = RuntimeModel.build(
            network, example, threads=args.threads, grid_points=args.grid_points, iters=args.iters, statistic="min"
        )
        build_s = time.perf_counter() - build_started
    runtime_model.save(runtime_path)
    evaluation = runtime_model.evaluate(network, n_samples=args.evaluate) if args.evaluate else None

    # 2. Each cost's lam, aimed at the same predicted latency.
    names = list(compressible_layers(network))
    mu_calibrated = args.mu_init * (args.mu_growth ** (args.steps - 1) if args.calibrate_at == "last" else 1.0)
    target_s = args.target * runtime_model.predict({})  # of R(r) of the dense layers
    cost_models: dict[str, RankCost] = {
        "runtime": runtime_model, "flops": FlopsCost(network, example), "storage": StorageCost(network)
    }  # fmt: skip
    lams = {}
    for cost in args.costs:
        found = calibrate_lam(network, names, cost_models[cost], runtime_model, mu_calibrated, args.target)
        lams[cost] = found.lam
        log.info(
            "%s: lam=%.3g predicts %.2f ms at mu=%.3g (target %.2f ms)",
            cost, found.lam, found.predicted_s * 1e3, mu_calibrated, target_s * 1e3,
        )  # fmt: skip

    # 3-4. Measure the baseline, then each LC run.
    rows = [{**measure("dense baseline", baseline, datamodule, args), "lam": None,
             "predicted_ms": runtime_model.network_dense_s * 1e3, "factorized": 0}]  # fmt: skip
    runs = {}
    networks = {"dense baseline": network}
    for cost in args.costs:
        model, lc, fit_s = run_lc(cost, lams[cost], runtime_path, datamodule, args)
        ranks = {name: None for name in names}
        ranks.update({name: max(rank, 1) for name, rank in lc.final_ranks.items()})
        row = measure(f"LC {cost}", model, datamodule, args)
        row.update(
            lam=lams[cost], predicted_ms=runtime_model.predict_network(ranks) * 1e3, factorized=len(lc.final_ranks),
            ranks=lc.final_ranks, fit_s=fit_s, c_step_s=[entry["seconds"] for entry in lc.history],
        )  # fmt: skip
        rows.append(row)
        runs[cost] = row
        networks[row["name"]] = model.model.eval()
    side_by_side = remeasure_side_by_side(rows, networks, args)

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    header = (
        f"## LC on {args.arch}/CIFAR-10: runtime- vs FLOPs-targeted ranks, R(r) aimed at {args.target:.0%} of dense "
        f"at the {args.calibrate_at} mu\n\n"
        f"CPU {runtime_model.environment.device_name}, {args.threads} thread(s), batch 1; T={args.steps}, "
        f"mu_t={args.mu_init:g}x{args.mu_growth:g}^t, {args.epochs_per_step} epoch(s) of {args.train_batches} batches "
        f"of {args.batch_size} per L step, {args.finetune_epochs} fine-tuning epoch(s); top-1 on "
        f"{args.val_batches * 100} test images; load average {load}."
    )
    table = markdown(rows, header)
    notes = [f"runtime model: {len(runtime_model.layers)} layers measured in {build_s:.1f} s"]
    if evaluation is not None:
        notes.append(
            f"runtime model error on {args.evaluate} random rank configurations: "
            f"{evaluation.mean_absolute_error_s * 1e3:.2f} ms mean absolute ({evaluation.mean_relative_error:.1%}); "
            f"speedup over dense (side by side) {evaluation.mean_speedup_error:.1%} off the predicted one; "
            f"dense network {evaluation.dense_measured_s * 1e3:.2f} ms now vs "
            f"{evaluation.dense_built_s * 1e3:.2f} ms at build"
        )
    for cost, row in runs.items():
        steps = row["c_step_s"]
        notes.append(
            f"{cost}: fit {row['fit_s']:.0f} s, C step {sum(steps) / max(len(steps), 1):.2f} s on average "
            f"({len(steps)} steps)"
        )
    if "runtime" in runs and "flops" in runs:
        runtime_row, flops_row = runs["runtime"], runs["flops"]
        notes.append(
            "runtime vs FLOPs targeted: measured median "
            f"{runtime_row['latency_median_ms']:.2f} vs {flops_row['latency_median_ms']:.2f} ms, "
            f"top-1 {runtime_row['top1'] * 100:.2f}% vs {flops_row['top1'] * 100:.2f}%, "
            f"MMACs {runtime_row['mmacs']:.1f} vs {flops_row['mmacs']:.1f}"
        )
    notes.append(f"total {time.perf_counter() - started:.0f} s")
    report = table + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n\n" + side_by_side.to_markdown()
    print(report)
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "rows": rows,
                "side_by_side": side_by_side.to_dict(),
                "runtime_model_build_s": build_s,
                "runtime_model_evaluation": None if evaluation is None else evaluation.to_dict(),
                "lams": lams,
                "mu_calibrated": mu_calibrated,
                "target_ms": target_s * 1e3,
            },
            indent=1,
            default=str,
        )
    )
    print(f"Written to {out}/results.{{md,json}}")


if __name__ == "__main__":
    main()
