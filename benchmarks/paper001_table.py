"""Paper 001 Table V measured on this machine: VGG16, compact VGG16, and VGG16 quantized to 8 bits.

Paper 001 (section VII, Table V) reports accuracy, parameters, MACs and model size of a VGG16, its
depthwise-separable compact form and its 8-bit quantized form (simulated: quantize-dequantize,
still float). This script measures the same columns from trained checkpoints, plus what the
paper could not: the CPU latency at batch 1 and 128 and the real int8 model (ONNX Runtime static
quantization). Rows (row: what runs):

- VGG16: the `--vgg16` checkpoint, float, eager PyTorch;
- VGG16, ONNX Runtime float: the same model exported to ONNX: the same-runtime reference for int8;
- VGG16 8-bit simulated: paper 001's quantization (min/max per tensor, calibrated on training batches), eager
  PyTorch, float arithmetic;
- VGG16 int8, ONNX Runtime: real int8 kernels (QDQ, int8 weights, uint8 activations), same calibration;
- VGG16 compact: the `--compact` checkpoint, float, eager PyTorch;
- VGG16 compact, distilled: the `--compact-distill` checkpoint (optional), e.g. from
  configs/vgg16_compact_distill.yaml.

Columns: top-1 on the CIFAR-10 test set (10,000 images; evaluation transform: normalize only),
parameters, MACs of one forward pass at batch 1 (the papers' "MACs"; FLOPs = 2 x MACs), size on
disk (`torch.save` of the state dict for PyTorch rows, the `.onnx` file for ONNX Runtime rows),
median CPU inference latency over `--iters` timed calls after `--warmup` (paper 000's protocol,
`compresslight.profiling.timing.measure_latency`), with `--threads` threads for torch and ONNX
Runtime alike.

    python benchmarks/paper001_table.py --vgg16 runs/vgg16_baseline/version_0/checkpoints/last.ckpt \\
        --compact runs/vgg16_compact/version_0/checkpoints/last.ckpt \\
        [--compact-distill runs/vgg16_compact_distill/version_0/checkpoints/last.ckpt] --out results/paper001_table.md
    python benchmarks/paper001_table.py --quick   # untrained models, 256 test images, 3 timed calls:
                                                  # checks the script end to end, measures nothing meaningful

It writes the Markdown table to stdout (and `--out`), and every number, latency min/median/max
included, to the `.json` beside `--out`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from compresslight.datamodules import CIFAR10DataModule
from torch import nn

from compresslight.classifier import ImageClassifier
from compresslight.compression.quantization import quantize_model_simulated
from compresslight.compression.quantization_onnx import OnnxRuntimeModel, export_int8_onnx
from compresslight.evaluation import evaluate_top1
from compresslight.profiling.counting import count_macs, count_parameters
from compresslight.profiling.environment import cpu_model_name
from compresslight.profiling.side_by_side import SideBySide, SideBySideResult
from compresslight.profiling.timing import LatencyStats, num_threads

log = logging.getLogger("paper001_table")

INPUT_SHAPE = (3, 32, 32)

# Paper 001, Table V (CIFAR-10; "MACs" as the paper counts them; its "MB" are MiB of float32
# weights: 14.73M x 4 bytes = 58.9e6 bytes = 56.2 MiB).
PAPER_TABLE_V = [
    ("Baseline (VGG16)", "90.03%", "14.73M", "313.2M", "56.2 MB"),
    ("Compact", "89.98%", "1.70M", "38M", "6.53 MB"),
    ("Quantized (8-bit, simulated)", "88.13%", "14.73M", "313.2M", "56.2 MB"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vgg16", type=Path, help="checkpoint of the trained VGG16 (configs/vgg16_baseline.yaml)")
    parser.add_argument(
        "--compact", type=Path, help="checkpoint of the trained compact VGG16 (configs/vgg16_compact.yaml)"
    )
    parser.add_argument("--compact-distill", type=Path, help="checkpoint of the distilled compact VGG16 (optional)")
    parser.add_argument("--data-dir", default="../shared/data/cifar10", help="folder holding cifar-10-batches-py/")
    parser.add_argument("--bits", type=int, default=8, help="width of the simulated quantization (paper 001: 8)")
    parser.add_argument("--per-channel", action="store_true", help="per-channel weight ranges (paper 001: per tensor)")
    parser.add_argument(
        "--calibration-batches", type=int, default=10, help="training batches of 128 that set the ranges"
    )
    parser.add_argument(
        "--test-images", type=int, default=None, help="evaluate on the first N test images (default: all)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128], help="latency batch sizes")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    parser.add_argument("--iters", type=int, default=50, help="timed calls; the median is reported")
    parser.add_argument("--rounds", type=int, default=5, help="side-by-side rounds (at least) over all models")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (torch and ONNX Runtime); default: torch's"
    )
    parser.add_argument("--device", default="cpu", help="where the PyTorch models are evaluated for accuracy")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here (and .json beside it)")
    parser.add_argument(
        "--quick", action="store_true",
        help="tiny setting to check the script: untrained models where no checkpoint is given, 256 test images, "
        "2 calibration batches, batch sizes 1 and 8, 1 warm-up and 3 timed calls",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.test_images = args.test_images or 256
        args.calibration_batches = min(args.calibration_batches, 2)
        args.batch_sizes, args.warmup, args.iters, args.rounds = [1, 8], 1, 3, 2
    elif args.vgg16 is None or args.compact is None:
        parser.error("--vgg16 and --compact checkpoints are required (or --quick to check the script)")
    for name in ("vgg16", "compact", "compact_distill"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            parser.error(f"--{name.replace('_', '-')} {str(path)!r} is not a file")
    return args


def load_network(path: Path | None, arch: str) -> tuple[nn.Module, str]:
    """The network of a checkpoint (compression records replayed), or an untrained `arch` for --quick."""
    if path is None:
        return ImageClassifier(arch=arch, num_classes=10).model.eval(), f"untrained {arch}"
    return ImageClassifier.load_from_checkpoint(path, map_location="cpu").model.eval(), str(path)


def model_batches(datamodule: CIFAR10DataModule, split: str, device: torch.device, limit: int | None) -> Iterator[Any]:
    """(normalized images, labels) of a split, as the model sees them in evaluation."""
    loader = datamodule.train_dataloader() if split == "train" else datamodule.test_dataloader()
    seen = 0
    for images, labels in loader:
        if limit is not None and seen >= limit:
            return
        if limit is not None:
            images, labels = images[: limit - seen], labels[: limit - seen]
        seen += len(labels)
        yield datamodule.transform_batch(images.to(device), train=False), labels.to(device)


def side_by_side_latency(
    models: dict[str, Any], batch_sizes: list[int], threads: int, args: argparse.Namespace
) -> tuple[dict[str, dict[int, LatencyStats]], dict[int, SideBySideResult]]:
    """Every model (eager and ONNX Runtime) side by side at each batch size
    (`compresslight.profiling.side_by_side`): at least `--rounds` rounds in which all models
    alternate. On this VM one measurement of a model can be 50% off (measured: the two compact
    rows, one architecture, 3.29 vs 5.08 ms in a single round); paired rounds share the load.

    Returns:
        name -> batch size -> latency over the rounds' medians (min / median / max), and batch
        size -> the side-by-side result (speedups over eager VGG16, with intervals).
    """
    options = SideBySide(
        warmup=args.warmup, iters=args.iters, min_rounds=args.rounds, max_rounds=max(args.rounds, 2 * args.rounds)
    )
    generator = torch.Generator().manual_seed(0)
    latency: dict[str, dict[int, LatencyStats]] = {name: {} for name in models}
    results = {}
    with num_threads(threads), torch.inference_mode():
        for batch_size in batch_sizes:
            example = torch.randn(batch_size, *INPUT_SHAPE, generator=generator)
            calls = {name: functools.partial(model, example) for name, model in models.items()}
            result = options.run(calls, "vgg16", setting={"batch_size": batch_size, "threads": threads})
            results[batch_size] = result
            for name, medians in result.round_latencies_s.items():
                latency[name][batch_size] = LatencyStats(
                    min_s=min(medians), median_s=statistics.median(medians), max_s=max(medians), iters=args.iters
                )
    return latency, results


def state_dict_bytes(model: nn.Module, directory: Path) -> int:
    path = directory / "weights.pt"
    torch.save(model.state_dict(), path)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    threads = args.threads or torch.get_num_threads()

    datamodule = CIFAR10DataModule(data_dir=args.data_dir, batch_size=128, eval_batch_size=256, shuffle=False)
    datamodule.setup(None)
    calibration = [images for images, _ in model_batches(datamodule, "train", device, 128 * args.calibration_batches)]

    vgg16, vgg16_source = load_network(args.vgg16, "vgg16")
    compact, compact_source = load_network(args.compact, "vgg16_compact")
    sources = {"vgg16": vgg16_source, "compact": compact_source}
    float_models: dict[str, nn.Module] = {"vgg16": vgg16, "compact": compact}
    if args.compact_distill is not None:
        float_models["compact_distill"], sources["compact_distill"] = load_network(
            args.compact_distill, "vgg16_compact"
        )
    for model in float_models.values():
        model.to(device)
    sim_name = f"vgg16_sim{args.bits}"
    simulated = quantize_model_simulated(
        vgg16, calibration_batches=calibration, bits=args.bits, per_channel=args.per_channel
    )

    work = Path(tempfile.mkdtemp(prefix="paper001_"))
    out_dir = args.out.parent if args.out is not None else work
    out_dir.mkdir(parents=True, exist_ok=True)
    vgg16_cpu = copy.deepcopy(vgg16).cpu()
    float_onnx = out_dir / "vgg16_float.onnx"
    int8_onnx = export_int8_onnx(
        vgg16_cpu,
        (1, *INPUT_SHAPE),
        [x.cpu() for x in calibration],
        out_dir / "vgg16_int8.onnx",
        per_channel=args.per_channel,
        float_path=float_onnx,
    )
    ort_models = {
        "vgg16_ort_float": OnnxRuntimeModel(float_onnx, num_threads=threads),
        "vgg16_ort_int8": OnnxRuntimeModel(int8_onnx, num_threads=threads),
    }

    log.info("Evaluating on %s CIFAR-10 test images ...", args.test_images or "all")
    top1 = evaluate_top1(
        {**float_models, sim_name: simulated, **ort_models}, model_batches(datamodule, "test", device, args.test_images)
    )
    log.info("Measuring CPU latency (%d threads, batch sizes %s) ...", threads, args.batch_sizes)
    cpu_models = {
        name: copy.deepcopy(model).cpu().eval() for name, model in {**float_models, sim_name: simulated}.items()
    }
    latency, side_by_side = side_by_side_latency({**cpu_models, **ort_models}, args.batch_sizes, threads, args)

    example = torch.zeros(1, *INPUT_SHAPE)
    rows = [
        ("VGG16", "PyTorch eager, float", "vgg16", "vgg16", None),
        ("VGG16", "ONNX Runtime, float", "vgg16_ort_float", "vgg16", float_onnx),
        (f"VGG16 {args.bits}-bit simulated", "PyTorch eager, float", sim_name, sim_name, None),
        ("VGG16 int8", "ONNX Runtime, int8", "vgg16_ort_int8", "vgg16", int8_onnx),
        ("VGG16 compact", "PyTorch eager, float", "compact", "compact", None),
    ]
    if "compact_distill" in float_models:
        rows.append(("VGG16 compact, distilled", "PyTorch eager, float", "compact_distill", "compact_distill", None))
    counted = {name: cpu_models[name] for name in cpu_models}
    results = []
    for label, runtime, name, counted_as, onnx_file in rows:
        model = counted[counted_as]
        with torch.no_grad():
            macs = count_macs(model, example)[0]
        size = onnx_file.stat().st_size if onnx_file is not None else state_dict_bytes(model, work)
        results.append(
            dict(
                model=label, runtime=runtime, name=name, top1=top1[name], params=count_parameters(model).total,
                macs=macs, size_bytes=size,
                latency={str(b): latency[name][b].to_dict() for b in args.batch_sizes},
                speedup_vs_vgg16={
                    str(b): side_by_side[b].speedup_of(name).to_dict() for b in args.batch_sizes if name != "vgg16"
                },
            )
        )  # fmt: skip

    table = markdown(results, args, threads)
    print(table)
    report = dict(
        rows=results, sources=sources, bits=args.bits, per_channel=args.per_channel,
        calibration_images=sum(len(x) for x in calibration),
        test_images=args.test_images or len(datamodule.test_labels),
        threads=threads, cpu=cpu_model_name(), torch=torch.__version__, quick=args.quick,
        seconds=time.perf_counter() - started,
    )  # fmt: skip
    if args.out is not None:
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        log.info("Wrote %s and %s.", args.out, args.out.with_suffix(".json"))
    return report


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, threads: int) -> str:
    latency_headers = [f"Latency bs{b} (ms)" for b in args.batch_sizes]
    latency_headers += [f"Speedup over VGG16 eager, bs{b}" for b in args.batch_sizes]
    lines = [
        "| Model | Runtime | Top-1 | Params | MACs | Size on disk (MiB) | " + " | ".join(latency_headers) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(latency_headers),
    ]
    for row in results:
        latencies = [f"{row['latency'][str(b)]['median_s'] * 1e3:.2f}" for b in args.batch_sizes]
        latencies += [
            row["speedup_vs_vgg16"][str(b)]["label"] if str(b) in row["speedup_vs_vgg16"] else "-"
            for b in args.batch_sizes
        ]
        lines.append(
            f"| {row['model']} | {row['runtime']} | {row['top1'] * 100:.2f}% | {row['params'] / 1e6:.2f}M | "
            f"{row['macs'] / 1e6:.1f}M | {row['size_bytes'] / 2**20:.2f} | " + " | ".join(latencies) + " |"
        )
    test_images = args.test_images or 10_000
    lines += [
        "",
        f"CIFAR-10 test set ({test_images} images); {args.bits}-bit "
        f"{'per-channel' if args.per_channel else 'per-tensor'} min/max quantization calibrated on "
        f"{args.calibration_batches} training batches of 128; CPU latency: side by side, "
        f"median over >= {args.rounds} rounds "
        f"(all models alternate in each) of the median of {args.iters} calls after {args.warmup} warm-up, "
        f"{threads} threads; "
        "speedups paired per round, with 95% intervals "
        f"({cpu_model_name()}); MACs at batch 1; sizes: torch.save of "
        'the state dict, or the .onnx file, in MiB as paper 001\'s "MB".'
        + (" QUICK RUN: untrained models, not results." if args.quick else ""),
        "",
        "Paper 001, Table V (for reference):",
        "",
        "| Model | Accuracy | Parameters | MACs | Model Size |",
        "|---|---|---|---|---|",
        *[f"| {' | '.join(row)} |" for row in PAPER_TABLE_V],
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
