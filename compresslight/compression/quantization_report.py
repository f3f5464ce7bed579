"""The quantization report: simulate, export int8, evaluate, time; one pure function and its data.

`quantization_report` takes a trained model, calibration batches and evaluation batches, builds
the simulated `bits`-bit model (or, for a QAT model, uses it as it is), optionally exports the
float and the int8 ONNX models, evaluates every model on the same batches in one pass and
measures their CPU latency. It returns a `QuantizationReport` (`to_dict()` is the
`quantization.json` schema, `to_markdown()` a readable summary); it never sees a Trainer.
`QuantizationCallback` is the Lightning adapter that feeds it batches and logs the result.

Steps:

1. takes the calibration batches, as the model sees them in evaluation (normalized, not augmented);
2. builds the simulated quantized model (`quantize_model_simulated`: weights and input
   activations of every Conv/Linear quantized to `bits` with min/max ranges, then dequantized);
3. with `int8=True`, exports the float model to ONNX and quantizes it with ONNX Runtime's static
   int8 quantization (`export_int8_onnx`, calibrated on the same batches);
4. evaluates float, simulated and int8 top-1 on the evaluation batches, in one pass over them;
5. measures CPU inference latency of the float model in eager PyTorch and in ONNX Runtime, of the
   simulated model, and of the int8 model, at `latency_batch_sizes`, side by side (all of them
   alternate in `latency_rounds` rounds, `compresslight.profiling.side_by_side`), so the int8
   speedup over ONNX Runtime float is paired per round and has an interval; plus the ONNX file sizes.

What is written (`output_dir`; the callback's log dir), and what reloads in a new process:

- `<output_dir>/model_int8.onnx`: the real int8 model (QDQ, int8 weights, uint8 activations); reload
  with `OnnxRuntimeModel(path)` or `onnxruntime.InferenceSession(path)`, any process;
- `<output_dir>/model_float.onnx`: the float model, for a same-runtime latency comparison; reload: the same;
- `quantization.json` (written by the caller, `QuantizationReport.to_dict()`): every number below, latency
  min/median/max included; reload with `json.load`.

The post-training simulated model is not saved: it is a deterministic function of the float
checkpoint and the calibration batches (rerun `quantize_model_simulated`).

`QuantizationReport.metrics` keys (the callback logs them; `{split}` is `val` at fit end, `test` at
test start; accuracies are fractions):

| key | value |
|---|---|
| `quant/{split}_top1_float` | float model |
| `quant/{split}_top1_sim{bits}` | simulated `bits`-bit model |
| `quant/{split}_top1_drop_sim{bits}` | float minus simulated |
| `quant/{split}_top1_int8` | int8 ONNX Runtime model |
| `quant/latency_ms/{model}/bs{B}` | median over rounds of each round's median CPU latency; model: see below |
| `quant/int8_speedup/bs{B}` | ONNX Runtime float latency / int8 latency, paired per round (geometric mean) |
| `quant/int8_speedup_low/bs{B}`, `quant/int8_speedup_high/bs{B}` | its 95% bootstrap interval |
| `quant/size_bytes/onnx_float`, `quant/size_bytes/onnx_int8` | file sizes |

In the latency keys, model: `torch_float`, `torch_sim{bits}`, `ort_float`, `ort_int8`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import statistics
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from compresslight.checks import check_int
from compresslight.compression.quantization import (
    MAX_BITS,
    MIN_BITS,
    ActivationQuantizer,
    quantize_model_simulated,
    strip_fake_quant,
)
from compresslight.compression.quantization_onnx import OnnxRuntimeModel, export_int8_onnx
from compresslight.evaluation import LogitsOutput, evaluate_top1
from compresslight.profiling.side_by_side import PairedSpeedup, SideBySide, format_speedup
from compresslight.profiling.timing import LatencyStats, num_threads

INT8_FILE = "model_int8.onnx"
FLOAT_ONNX_FILE = "model_float.onnx"

__all__ = [
    "FLOAT_ONNX_FILE",
    "INT8_FILE",
    "QuantizationReport",
    "QuantizationReportOptions",
    "has_fake_quant",
    "measure_cpu_latency",
    "quantization_report",
]


@dataclasses.dataclass(frozen=True)
class QuantizationReportOptions:
    """What `quantization_report` builds and measures; checked when made.

    Args:
        bits: integer width of the simulated quantization, 2 to 16 (paper 001: 8).
        per_channel: one weight range per output channel instead of one per tensor.
        calibration_batches: training batches that set the activation ranges.
        eval_batches: batches of the evaluation set; None: all of them.
        int8: also export and evaluate the real int8 ONNX Runtime model.
        allow_float_layers: let the int8 export keep layers it cannot quantize in float.
        latency_batch_sizes: batch sizes of the CPU latency measurement; empty: no latency.
        latency_warmup: untimed calls before timing.
        latency_iters: timed calls per turn of a model in a round (their median is the round's latency).
        latency_rounds: rounds in which all the models alternate (>= 2; paired speedups need two).
        threads: CPU threads for the latency measurement; None keeps the current setting.

    Raises:
        ValueError: for `bits` outside [2, 16] or a count out of range.
    """

    bits: int = 8
    per_channel: bool = False
    calibration_batches: int = 10
    eval_batches: int | None = None
    int8: bool = True
    allow_float_layers: bool = False
    latency_batch_sizes: tuple[int, ...] = (1, 128)
    latency_warmup: int = 5
    latency_iters: int = 10
    latency_rounds: int = 5
    threads: int | None = None

    def __post_init__(self) -> None:
        bits = self.bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"`bits` must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}.")
        check_int("calibration_batches", self.calibration_batches, 1)
        if self.eval_batches is not None:
            check_int("eval_batches", self.eval_batches, 1)
        sizes = self.latency_batch_sizes
        sizes = (sizes,) if isinstance(sizes, int) else tuple(sizes)
        object.__setattr__(self, "latency_batch_sizes", sizes)  # frozen: a list given by a config becomes a tuple
        for size in sizes:
            check_int("latency_batch_sizes", size, 1)
        check_int("latency_warmup", self.latency_warmup, 0)
        check_int("latency_iters", self.latency_iters, 1)
        check_int("latency_rounds", self.latency_rounds, 2)
        if self.threads is not None:
            check_int("threads", self.threads, 1)


@dataclasses.dataclass
class QuantizationReport:
    """Accuracy, latency and size of the float, simulated and int8 models (see `quantization_report`).

    `metrics` holds the logged numbers (`quant/...` keys, accuracies as fractions, latency medians
    in ms); `latency` the statistics of the round medians: model name -> batch size -> `LatencyStats`;
    `speedups` batch size -> each model's paired speedup over the side-by-side baseline
    (`ort_float` with int8, else `torch_float`), `PairedSpeedup.to_dict()`.
    """

    split: str
    bits: int
    per_channel: bool
    qat: bool
    calibration_batches: int
    calibration_images: int
    eval_batches: int | None
    metrics: dict[str, float]
    latency: dict[str, dict[int, LatencyStats]]
    threads: int
    files: dict[str, str]
    seconds: float
    speedups: dict[int, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)

    def top1(self) -> dict[str, float]:
        """Model name ("float", "sim8", "int8") -> top-1 on `split`."""
        marker = f"{self.split}_top1_"
        return {
            key.rsplit(marker, 1)[1]: value
            for key, value in self.metrics.items()
            if marker in key and "_top1_drop_" not in key
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form written to `quantization.json`."""
        return {
            "split": self.split,
            "bits": self.bits,
            "per_channel": self.per_channel,
            "qat": self.qat,
            "calibration_batches": self.calibration_batches,
            "calibration_images": self.calibration_images,
            "eval_batches": self.eval_batches,
            "metrics": self.metrics,
            "latency": {
                name: {str(batch_size): stats.to_dict() for batch_size, stats in per_batch.items()}
                for name, per_batch in self.latency.items()
            },
            "speedups": {str(batch_size): speedups for batch_size, speedups in self.speedups.items()},
            "threads": self.threads,
            "files": self.files,
            "seconds": self.seconds,
        }

    def to_markdown(self) -> str:
        """Top-1 per model, then median CPU latency per model and batch size."""
        kind = "QAT" if self.qat else "post-training"
        lines = [
            f"# Quantization ({kind}, {self.bits} bits{', per channel' if self.per_channel else ''})",
            "",
            f"{self.calibration_images} calibration images in {self.calibration_batches} batches; "
            f"{self.split} set; {self.seconds:.1f} s.",
            "",
            f"| model | {self.split} top-1 |",
            "|---|---:|",
        ]
        lines += [f"| {name} | {value:.4f} |" for name, value in self.top1().items()]
        if self.latency:
            sizes = list(dict.fromkeys(size for per_batch in self.latency.values() for size in per_batch))
            lines += ["", f"CPU latency, median ms ({self.threads} threads), models alternating in rounds:", ""]
            lines += ["| model | " + " | ".join(f"bs{size}" for size in sizes) + " |", "|---|" + "---:|" * len(sizes)]
            for name, per_batch in self.latency.items():
                cells = [f"{per_batch[size].median_s * 1e3:.3f}" if size in per_batch else "-" for size in sizes]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            for size, speedups in self.speedups.items():
                cells = [f"{s['candidate']} {format_speedup(s['estimate'], s['low'], s['high'])}" for s in speedups]
                lines += ["", f"bs{size}, paired speedup over {speedups[0]['baseline']}: " + ", ".join(cells)]
        return "\n".join(lines) + "\n"


def has_fake_quant(module: nn.Module) -> bool:
    """Whether `module` holds QAT's fake-quant layers (`prepare_qat`)."""
    return any(isinstance(submodule, ActivationQuantizer) for submodule in module.modules())


def quantization_report(
    model: nn.Module,
    calibration_batches: Iterable[Tensor],
    eval_batches: Iterable[tuple[Tensor, Tensor]],
    output_dir: str | Path,
    options: QuantizationReportOptions,
    *,
    split: str = "val",
    device: torch.device | str | None = None,
) -> QuantizationReport:
    """Quantizes `model`, evaluates every form of it on `eval_batches` and times them on the CPU.

    A model with fake-quant layers (QAT) is the simulated model itself and its stripped float
    weights the float model; any other model is quantized post-training
    (`quantize_model_simulated`). `model` ends on its device with its train/eval flags.

    Args:
        model: the trained network; returns logits (or a ModelOutput / tuple / dict holding them).
        calibration_batches: input batches as the model sees them in evaluation (normalized).
        eval_batches: (inputs, targets) pairs; read once, every model sees the same ones.
        output_dir: where the ONNX files go (`options.int8`).
        options: what to build and measure.
        split: the name of the evaluation set in the metric keys ("val", "test").
        device: where to evaluate the float and simulated models; None: `model`'s device.

    Raises:
        ValueError: if there is no calibration batch or no evaluation batch.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with _restored(model):
        if device is not None:
            model.to(device)
        model.eval()
        calibration = list(calibration_batches)
        if not calibration:
            raise ValueError("`calibration_batches` is empty; give at least one batch.")
        qat = has_fake_quant(model)
        models = _float_and_simulated(model, calibration, options, qat)
        input_shape = tuple(calibration[0].shape[1:])
        # ONNX export and latency on the CPU: int8 runs there, and the comparison must be same-device.
        runners: dict[str, nn.Module] = {f"torch_{name}": copy.deepcopy(m).cpu().eval() for name, m in models.items()}
        metrics: dict[str, float] = {}
        files: dict[str, str] = {}
        if options.int8:
            files = _export_onnx_models(runners["torch_float"], input_shape, calibration, output_dir, options)
            models["int8"] = runners["ort_int8"] = OnnxRuntimeModel(files["onnx_int8"], num_threads=options.threads)
            runners["ort_float"] = OnnxRuntimeModel(files["onnx_float"], num_threads=options.threads)
            for key, path in files.items():
                metrics[f"quant/size_bytes/{key}"] = float(Path(path).stat().st_size)
        top1 = evaluate_top1(models, eval_batches)
        sim = f"sim{options.bits}"
        metrics.update({f"quant/{split}_top1_{name}": accuracy for name, accuracy in top1.items()})
        metrics[f"quant/{split}_top1_drop_{sim}"] = top1["float"] - top1[sim]
        latency, speedups = measure_cpu_latency(
            runners,
            input_shape,
            options.latency_batch_sizes,
            baseline="ort_float" if options.int8 else "torch_float",
            warmup=options.latency_warmup,
            iters=options.latency_iters,
            rounds=options.latency_rounds,
            threads=options.threads,
        )
    metrics.update(_latency_metrics(latency, speedups))
    return QuantizationReport(
        split=split,
        bits=options.bits,
        per_channel=options.per_channel,
        qat=qat,
        calibration_batches=len(calibration),
        calibration_images=sum(len(batch) for batch in calibration),
        eval_batches=options.eval_batches,
        metrics=metrics,
        latency=latency,
        threads=options.threads or torch.get_num_threads(),
        files=files,
        seconds=time.perf_counter() - started,
        speedups={size: [speedup.to_dict() for speedup in found] for size, found in speedups.items()},
    )


def _float_and_simulated(
    model: nn.Module, calibration: list[Tensor], options: QuantizationReportOptions, qat: bool
) -> dict[str, nn.Module]:
    """{"float": ..., "sim{bits}": ...}, each read by its logits, in eval mode."""
    float_model = strip_fake_quant(model).eval() if qat else model
    sim_model = (
        model
        if qat
        else quantize_model_simulated(
            model, calibration_batches=calibration, bits=options.bits, per_channel=options.per_channel
        ).eval()
    )
    # A model returning a ModelOutput / tuple / dict is read, exported and timed by its logits.
    return {"float": LogitsOutput(float_model).eval(), f"sim{options.bits}": LogitsOutput(sim_model).eval()}


def _export_onnx_models(
    cpu_float: nn.Module,
    input_shape: tuple[int, ...],
    calibration: list[Tensor],
    output_dir: Path,
    options: QuantizationReportOptions,
) -> dict[str, str]:
    """Writes the float and the int8 ONNX models; returns {"onnx_float": path, "onnx_int8": path}."""
    float_path = output_dir / FLOAT_ONNX_FILE
    int8_path = export_int8_onnx(
        cpu_float,
        (1, *input_shape),
        calibration,
        output_dir / INT8_FILE,
        per_channel=options.per_channel,
        allow_float_layers=options.allow_float_layers,
        float_path=float_path,
    )
    return {"onnx_float": str(float_path), "onnx_int8": str(int8_path)}


def _latency_metrics(
    latency: Mapping[str, Mapping[int, LatencyStats]], speedups: Mapping[int, Sequence[PairedSpeedup]]
) -> dict[str, float]:
    """`quant/latency_ms/{model}/bs{B}` medians and, with int8, `quant/int8_speedup[_low|_high]/bs{B}`."""
    metrics = {
        f"quant/latency_ms/{name}/bs{batch_size}": stats.median_s * 1e3
        for name, per_batch in latency.items()
        for batch_size, stats in per_batch.items()
    }
    for batch_size, found in speedups.items():
        for speedup in found:
            if speedup.candidate == "ort_int8" and speedup.baseline == "ort_float":
                metrics[f"quant/int8_speedup/bs{batch_size}"] = speedup.estimate
                metrics[f"quant/int8_speedup_low/bs{batch_size}"] = speedup.low
                metrics[f"quant/int8_speedup_high/bs{batch_size}"] = speedup.high
    return metrics


@torch.no_grad()
def measure_cpu_latency(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    batch_sizes: Sequence[int],
    *,
    baseline: str,
    warmup: int = 5,
    iters: int = 50,
    rounds: int = 5,
    threads: int | None = None,
) -> tuple[dict[str, dict[int, LatencyStats]], dict[int, list[PairedSpeedup]]]:
    """CPU inference latency of each model at each batch size, side by side: the models alternate
    in `rounds` rounds (`SideBySide`), so a load change hits them all and the speedups over
    `baseline` are paired per round (two separate timings on a shared machine differ by 20-50%).

    Args:
        models: name -> model on the CPU in eval mode (eager torch or `OnnxRuntimeModel`); >= 2.
        input_shape: one input without the batch dimension.
        batch_sizes: batch sizes to time.
        baseline: the model the speedups are over.
        warmup: untimed calls at the start of each turn.
        iters: timed calls per turn (their median is the round's latency).
        rounds: rounds (>= 2).
        threads: `torch.set_num_threads` during the measurement; None keeps the current one.
            (`OnnxRuntimeModel` has its own thread count, set when it is built.)

    Returns:
        (name -> batch size -> `LatencyStats` of its round medians, batch size -> paired speedups).
    """
    options = SideBySide(
        warmup=warmup, iters=iters, min_rounds=rounds, max_rounds=rounds, target_width=None, time_budget_s=None
    )
    generator = torch.Generator().manual_seed(0)
    latency: dict[str, dict[int, LatencyStats]] = {name: {} for name in models}
    speedups: dict[int, list[PairedSpeedup]] = {}
    with num_threads(threads), torch.inference_mode():
        for batch_size in batch_sizes:
            example = torch.randn(batch_size, *input_shape, generator=generator)
            # Each call is bound now (`model(example)`), not looked up when it is timed.
            calls = {name: functools.partial(model, example) for name, model in models.items()}
            result = options.run(
                calls, baseline, setting={"batch_size": batch_size, "threads": threads}, progress=False
            )
            for name, medians in result.round_latencies_s.items():
                latency[name][batch_size] = LatencyStats(
                    min_s=min(medians), median_s=statistics.median(medians), max_s=max(medians), iters=iters * rounds
                )
            speedups[batch_size] = list(result.speedups)
    return latency, speedups


@contextlib.contextmanager
def _restored(module: nn.Module) -> Iterator[None]:
    """Puts back `module`'s device and every submodule's train/eval flag."""
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    training = {submodule: submodule.training for submodule in module.modules()}
    try:
        yield
    finally:
        module.to(device)
        for submodule, was_training in training.items():
            submodule.training = was_training
