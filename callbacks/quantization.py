"""`QuantizationCallback`: paper 001's 8-bit quantization of the trained model, next to real int8.

Post-training (the default, paper 001 section VII-A): when fitting ends (`on_fit_end`) and when a
test run starts (`on_test_start`, e.g. `python cli.py test --config X.yaml --ckpt_path best.ckpt`)
the callback

1. takes `calibration_batches` training batches, as the model sees them in evaluation
   (through the datamodule's batch transform: normalized, not augmented);
2. builds the simulated quantized model (`quantize_model_simulated`: weights and input
   activations of every Conv/Linear quantized to `bits` with min/max ranges, then dequantized);
3. with `int8=True`, exports the float model to ONNX and quantizes it with ONNX Runtime's static
   int8 quantization (`export_int8_onnx`, calibrated on the same batches);
4. evaluates float, simulated and int8 top-1 on the validation set (fit) or the test set (test)
   in one pass over the same batches;
5. measures CPU inference latency (`measure_latency`, paper 000's protocol) of the float model
   in eager PyTorch and in ONNX Runtime, of the simulated model, and of the int8 model, at
   `latency_batch_sizes`, plus the size of the ONNX files.

Quantization-aware training (`qat_epochs > 0`): at the start of epoch `max_epochs - qat_epochs`
every Conv/Linear of the model is swapped, in place, for its fake-quant form (`prepare_qat`: the
same parameters, weights and inputs quantized in the forward pass, straight-through gradients,
EMA activation ranges). The swap is a structural edit with a `fake_quant` record, so checkpoints
replay it. At fit end the ranges are frozen (`convert_to_simulated`) and step 4 compares the
QAT model ("sim") with its own float weights ("float").

What is saved, and what reloads in a new process:

- `<log_dir>/model_int8.onnx`: the real int8 model (QDQ, int8 weights, uint8 activations); reload with
  `OnnxRuntimeModel(path)` or `onnxruntime.InferenceSession(path)`, any process;
- `<log_dir>/model_float.onnx`: the float model, for a same-runtime latency comparison; reload: the same;
- Lightning checkpoints of a QAT run: the fake-quant model (`fake_quant` record + ranges); reload with
  `ImageClassifier.load_from_checkpoint(path)` / `load_compressed_checkpoint`;
- `<log_dir>/quantization.json`: every number below, latency min/median/max included; reload with `json.load`.

The post-training simulated model is not saved: it is a deterministic function of the float
checkpoint and the calibration batches (rerun `quantize_model_simulated`).

Logged keys (`{split}` is `val` at fit end, `test` at test start; accuracies are fractions):

| key | value |
|---|---|
| `quant/{split}_top1_float` | float model |
| `quant/{split}_top1_sim{bits}` | simulated `bits`-bit model |
| `quant/{split}_top1_drop_sim{bits}` | float minus simulated |
| `quant/{split}_top1_int8` | int8 ONNX Runtime model |
| `quant/latency_ms/{model}/bs{B}` | median CPU latency; model: see below |
| `quant/int8_speedup/bs{B}` | ONNX Runtime float latency / int8 latency |
| `quant/size_bytes/onnx_float`, `quant/size_bytes/onnx_int8` | file sizes |

In the latency keys, model: `torch_float`, `torch_sim{bits}`, `ort_float`, `ort_int8`.

Under DDP the evaluation runs on global rank 0 only (with a datamodule it sees the whole
validation or test set; loaders given directly to `fit` are the rank's shard); the QAT edit and
the final freeze run on every rank. Real int8 runs on the CPU only (ONNX Runtime's CPU kernels),
so every latency here is a CPU latency, whatever device the model was trained on.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from compresslight.callbacks.structural_edit import StructuralCompressionCallback, find_example_inputs
from torch import nn
from typing_extensions import override

from compresslight import lightning_compat as pl
from compresslight.compression.quantization import (
    DEFAULT_QAT_AVERAGING_CONSTANT,
    MAX_BITS,
    MIN_BITS,
    ActivationQuantizer,
    OnnxRuntimeModel,
    convert_to_simulated,
    export_int8_onnx,
    export_onnx,
    fake_quant_record,
    float_only_layers,
    prepare_qat,
    quantize_model_simulated,
    strip_fake_quant,
)
from compresslight.compression.record import CompressionRecord
from compresslight.evaluation import LogitsOutput, evaluate_top1, logits_of
from compresslight.lightning_compat import RunningStage, TrainerFn
from compresslight.optional import require_extra
from compresslight.profiling.timing import LatencyStats, measure_latency, num_threads

log = logging.getLogger(__name__)

INT8_FILE = "model_int8.onnx"
FLOAT_ONNX_FILE = "model_float.onnx"
REPORT_FILE = "quantization.json"
STAGES = ("fit", "test")


class QuantizationCallback(StructuralCompressionCallback):
    """Quantizes the trained model (simulated and real int8) and reports accuracy, latency, size.

    Args:
        bits: integer width of the simulated quantization (and of QAT), 2 to 16 (paper 001: 8).
            The int8 model is 8-bit whatever this is.
        per_channel: one weight range per output channel instead of one per tensor (paper 001:
            per tensor); applies to the simulated, QAT and int8 models.
        calibration_batches: training batches that set the activation ranges.
        eval_batches: batches of the validation/test set to evaluate on; None: all of them.
        int8: also export and evaluate the real int8 ONNX Runtime model.
        allow_float_layers: let the int8 export keep layers it cannot quantize in float
            (named in a warning) instead of raising.
        qat_epochs: quantization-aware training during the last `qat_epochs` epochs; 0: none.
        qat_averaging_constant: weight of the newest batch in QAT's activation range EMA, (0, 1].
        stages: when to quantize and report: "fit" (at fit end) and/or "test" (at test start).
        latency_batch_sizes: batch sizes of the CPU latency measurement; empty: no latency.
        latency_warmup: untimed calls before timing.
        latency_iters: timed calls (the median is reported).
        threads: CPU threads for the latency measurement (torch and ONNX Runtime); None keeps
            the current setting.
        device: where to evaluate the float and simulated models; None: the trainer's device.
        output_dir: where to write the ONNX files and `quantization.json`; None: the run's log dir.
        module_path: the submodule to quantize (see `StructuralCompressionCallback`).

    Raises:
        ValueError: for `bits` outside [2, 16], a count out of range, an unknown stage, or
            `qat_averaging_constant` outside (0, 1].
    """

    def __init__(
        self,
        bits: int = 8,
        per_channel: bool = False,
        calibration_batches: int = 10,
        eval_batches: int | None = None,
        int8: bool = True,
        allow_float_layers: bool = False,
        qat_epochs: int = 0,
        qat_averaging_constant: float = DEFAULT_QAT_AVERAGING_CONSTANT,
        stages: Sequence[str] = STAGES,
        latency_batch_sizes: Sequence[int] = (1, 128),
        latency_warmup: int = 5,
        latency_iters: int = 50,
        threads: int | None = None,
        device: str | None = None,
        output_dir: str | Path | None = None,
        module_path: str | None = None,
    ) -> None:
        super().__init__(module_path=module_path)
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"`bits` must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}.")
        _check_int("calibration_batches", calibration_batches, 1)
        if eval_batches is not None:
            _check_int("eval_batches", eval_batches, 1)
        _check_int("qat_epochs", qat_epochs, 0)
        if isinstance(qat_averaging_constant, bool) or not 0.0 < qat_averaging_constant <= 1.0:
            raise ValueError(f"`qat_averaging_constant` must be in (0, 1], got {qat_averaging_constant!r}.")
        stages = [stages] if isinstance(stages, str) else list(stages)
        if not set(stages) <= set(STAGES):
            raise ValueError(f"`stages` must be a list of {list(STAGES)}, got {stages!r}.")
        if isinstance(latency_batch_sizes, int):
            latency_batch_sizes = [latency_batch_sizes]
        latency_batch_sizes = list(latency_batch_sizes)
        for size in latency_batch_sizes:
            _check_int("latency_batch_sizes", size, 1)
        _check_int("latency_warmup", latency_warmup, 0)
        _check_int("latency_iters", latency_iters, 1)
        if threads is not None:
            _check_int("threads", threads, 1)
        if int8:
            require_extra("onnx", "`QuantizationCallback(int8=True)` (`int8=False`: the simulated model only)")
        self.bits = bits
        self.per_channel = per_channel
        self.calibration_batches = calibration_batches
        self.eval_batches = eval_batches
        self.int8 = int8
        self.allow_float_layers = allow_float_layers
        self.qat_epochs = qat_epochs
        self.qat_averaging_constant = float(qat_averaging_constant)
        self.stages = stages
        self.latency_batch_sizes = latency_batch_sizes
        self.latency_warmup = latency_warmup
        self.latency_iters = latency_iters
        self.threads = threads
        self.device = None if device is None else torch.device(device)
        self.output_dir = None if output_dir is None else Path(output_dir)
        #: The last report's numbers (the logged metrics), for use after `fit`/`test` returns.
        self.results: dict[str, float] = {}
        self._log_dir: Path | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(module_path=self.module_path, bits=self.bits, per_channel=self.per_channel)

    # --- checks before any work ------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # `trainer.log_dir` broadcasts under DDP: resolve it where every rank runs.
        self._log_dir = self.output_dir or Path(trainer.log_dir or trainer.default_root_dir)
        target = self.target_module(pl_module)
        _check_logits_output(trainer, pl_module, target)
        if self.int8 and not self.allow_float_layers:
            # Fail before training, not after it: the int8 export would refuse these at fit end.
            left_float = float_only_layers(target)
            if left_float:
                raise ValueError(
                    f"QuantizationCallback(int8=True) cannot quantize these layers of the model: {left_float}. "
                    "Replace them with plain Conv/Linear layers, set `allow_float_layers: true` to run them in "
                    "float inside the int8 model, or `int8: false`."
                )
        if stage == "fit" and self.qat_epochs:
            max_epochs = trainer.max_epochs
            if max_epochs is None or max_epochs < self.qat_epochs:
                raise ValueError(
                    f"`qat_epochs` ({self.qat_epochs}) counts back from the last epoch and needs "
                    f"`trainer.max_epochs` >= {self.qat_epochs}, got {max_epochs!r}."
                )

    # --- quantization-aware training ---------------------------------------------------------

    @override
    def pending_epochs(self, trainer: pl.Trainer) -> list[int]:
        # QAT starts `qat_epochs` before `max_epochs`; `max_steps` may end the run before that.
        if not self.qat_epochs or trainer.max_epochs is None or trainer.max_epochs < self.qat_epochs:
            return []  # `setup` refuses these with its own message
        return [trainer.max_epochs - self.qat_epochs]

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.qat_epochs or trainer.max_epochs is None:
            return
        if trainer.current_epoch < trainer.max_epochs - self.qat_epochs:
            return
        target = self.target_module(pl_module)
        if _has_fake_quant(target):  # prepared earlier, or restored from a checkpoint of the QAT phase
            return
        self.apply_edit(trainer, pl_module, self._prepare_qat)
        # Other DDP ranks rebuilt the layers by replaying the record, which makes them in the
        # observing-only state: switch quantization on everywhere, not only where prepare_qat ran.
        for quantizer in target.modules():
            if isinstance(quantizer, ActivationQuantizer):
                quantizer.observer_enabled = True
                quantizer.fake_quant_enabled = True
        log.info(
            "QuantizationCallback: quantization-aware training (%d bits) for the last %d epochs.",
            self.bits, self.qat_epochs,
        )  # fmt: skip

    def _prepare_qat(self, module: nn.Module) -> CompressionRecord:
        prepare_qat(
            module,
            bits=self.bits,
            per_channel=self.per_channel,
            averaging_constant=self.qat_averaging_constant,
            inplace=True,  # same parameter objects: the optimizer and its momentum carry over
        )
        return fake_quant_record(module)

    # --- quantize and report -----------------------------------------------------------------

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = self.target_module(pl_module)
        if _has_fake_quant(target):
            convert_to_simulated(target)  # every rank: the ranges are final from here on
        if "fit" in self.stages and trainer.is_global_zero:
            self.report(trainer, pl_module, split="val")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.stages and trainer.is_global_zero:
            self.report(trainer, pl_module, split="test")

    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> dict[str, float]:
        """Quantizes, evaluates on `split` ("val" or "test"), measures, logs and writes the report.

        Returns:
            The logged metrics (also kept in `self.results`).

        Raises:
            ValueError: if there are no training batches to calibrate on or no `split` batches.
        """
        started = time.perf_counter()
        target = self.target_module(pl_module)
        device = self.device or trainer.strategy.root_device
        log_dir = self._log_dir or Path(trainer.default_root_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        bits = self.bits
        with _restored(target), _evaluation_stage(trainer):
            target.to(device).eval()
            calibration = [images for images, _ in self._batches(trainer, "train", device, self.calibration_batches)]
            qat = _has_fake_quant(target)
            float_model = strip_fake_quant(target).eval() if qat else target
            sim_model = (
                target
                if qat
                else quantize_model_simulated(
                    target, calibration_batches=calibration, bits=bits, per_channel=self.per_channel
                ).eval()
            )
            # A model returning a ModelOutput / tuple / dict is read, exported and timed by its logits.
            float_model, sim_model = LogitsOutput(float_model).eval(), LogitsOutput(sim_model).eval()
            models: dict[str, nn.Module] = {"float": float_model, f"sim{bits}": sim_model}
            results: dict[str, float] = {}
            input_shape = tuple(calibration[0].shape[1:])
            # ONNX export and latency on the CPU: int8 runs there, and the comparison must be same-device.
            cpu_float = copy.deepcopy(float_model).cpu().eval()
            runners: dict[str, nn.Module] = {
                "torch_float": cpu_float,
                f"torch_sim{bits}": copy.deepcopy(sim_model).cpu().eval(),
            }
            paths: dict[str, str] = {}
            if self.int8:
                float_path = export_onnx(cpu_float, (1, *input_shape), log_dir / FLOAT_ONNX_FILE)
                int8_path = export_int8_onnx(
                    cpu_float,
                    (1, *input_shape),
                    calibration,
                    log_dir / INT8_FILE,
                    per_channel=self.per_channel,
                    allow_float_layers=self.allow_float_layers,
                )
                models["int8"] = runners["ort_int8"] = OnnxRuntimeModel(int8_path, num_threads=self.threads)
                runners["ort_float"] = OnnxRuntimeModel(float_path, num_threads=self.threads)
                results["quant/size_bytes/onnx_float"] = float(float_path.stat().st_size)
                results["quant/size_bytes/onnx_int8"] = float(int8_path.stat().st_size)
                paths = {"onnx_float": str(float_path), "onnx_int8": str(int8_path)}

            top1 = evaluate_top1(models, self._batches(trainer, split, device, self.eval_batches))
            for name, accuracy in top1.items():
                results[f"quant/{split}_top1_{name}"] = accuracy
            results[f"quant/{split}_top1_drop_sim{bits}"] = top1["float"] - top1[f"sim{bits}"]

            latency = measure_cpu_latency(
                runners,
                input_shape,
                self.latency_batch_sizes,
                warmup=self.latency_warmup,
                iters=self.latency_iters,
                threads=self.threads,
            )
        for name, per_batch in latency.items():
            for batch_size, stats in per_batch.items():
                results[f"quant/latency_ms/{name}/bs{batch_size}"] = stats.median_s * 1e3
        if "ort_int8" in latency:
            for batch_size in self.latency_batch_sizes:
                results[f"quant/int8_speedup/bs{batch_size}"] = (
                    latency["ort_float"][batch_size].median_s / latency["ort_int8"][batch_size].median_s
                )
        self.results = results
        self._write(trainer, log_dir, split, qat, calibration, latency, paths, time.perf_counter() - started)
        return results

    def _batches(
        self, trainer: pl.Trainer, split: str, device: torch.device, limit: int | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) of `split` as the model sees them in evaluation, on `device`."""
        loader = _loader(trainer, split)
        count = 0
        for batch in loader:
            if limit is not None and count >= limit:
                break
            # The Trainer's own batch pipeline: device transfer, then the datamodule's and the
            # module's `on_after_batch_transfer` (normalization for compresslight datamodules).
            batch = trainer.strategy.batch_to_device(batch, device)
            count += 1
            yield batch[0], batch[1]
        if count == 0:
            raise ValueError(f"QuantizationCallback found no {split} batch: the {split} dataloader is empty.")

    def _write(
        self,
        trainer: pl.Trainer,
        log_dir: Path,
        split: str,
        qat: bool,
        calibration: list[torch.Tensor],
        latency: dict[str, dict[int, LatencyStats]],
        paths: dict[str, str],
        seconds: float,
    ) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(self.results, step=trainer.global_step)
            logger.save()
        report = {
            "split": split,
            "bits": self.bits,
            "per_channel": self.per_channel,
            "qat": qat,
            "calibration_batches": len(calibration),
            "calibration_images": sum(len(batch) for batch in calibration),
            "eval_batches": self.eval_batches,
            "metrics": self.results,
            "latency": {
                name: {str(batch_size): stats.to_dict() for batch_size, stats in per_batch.items()}
                for name, per_batch in latency.items()
            },
            "threads": self.threads or torch.get_num_threads(),
            "files": paths,
            "seconds": seconds,
        }
        (log_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        top1 = {key.rsplit("_top1_", 1)[1]: value for key, value in self.results.items() if f"{split}_top1_" in key}
        log.info(
            "QuantizationCallback (%s, %d bits%s): %s top-1 %s; wrote %s (%.1f s).",
            "QAT" if qat else "post-training", self.bits, ", per channel" if self.per_channel else "", split,
            ", ".join(f"{name} {value:.4f}" for name, value in top1.items()), log_dir / REPORT_FILE, seconds,
        )  # fmt: skip


# --- pure helpers (also used by benchmarks/paper001_table.py) ---------------------------------


@torch.no_grad()
def measure_cpu_latency(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    batch_sizes: Sequence[int],
    *,
    warmup: int = 5,
    iters: int = 50,
    threads: int | None = None,
) -> dict[str, dict[int, LatencyStats]]:
    """CPU inference latency of each model at each batch size, with the one timing loop.

    Args:
        models: name -> model on the CPU in eval mode (eager torch or `OnnxRuntimeModel`).
        input_shape: one input without the batch dimension.
        batch_sizes: batch sizes to time.
        warmup: untimed calls first.
        iters: timed calls.
        threads: `torch.set_num_threads` during the measurement; None keeps the current one.
            (`OnnxRuntimeModel` has its own thread count, set when it is built.)

    Returns:
        name -> batch size -> `LatencyStats`.
    """
    generator = torch.Generator().manual_seed(0)
    results: dict[str, dict[int, LatencyStats]] = {}
    with num_threads(threads), torch.inference_mode():
        for name, model in models.items():
            results[name] = {}
            for batch_size in batch_sizes:
                example = torch.randn(batch_size, *input_shape, generator=generator)
                # The call is bound now (`model(example)`), not looked up when `measure_latency` calls it.
                results[name][batch_size] = measure_latency(
                    functools.partial(model, example), device="cpu", warmup=warmup, iters=iters
                )
    return results


def _loader(trainer: pl.Trainer, split: str) -> Iterable[Any]:
    """The unsharded `split` loader of the datamodule, else the one the Trainer was given."""
    datamodule = trainer.datamodule
    if datamodule is not None:
        if split == "train" and trainer.state.fn != TrainerFn.FITTING:
            # `trainer.test` sets the datamodule up for testing only; calibration needs training data.
            datamodule.setup("fit")
        return getattr(datamodule, f"{split}_dataloader")()
    loaders = {"train": trainer.train_dataloader, "val": trainer.val_dataloaders, "test": trainer.test_dataloaders}[
        split
    ]
    if isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    elif isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        what = "calibrates on training batches" if split == "train" else f"evaluates on the {split} set"
        raise ValueError(
            f"QuantizationCallback {what} but the Trainer has no {split} dataloader; use a datamodule "
            f"(its `{split}_dataloader` is used) or pass {split} data to the Trainer."
        )
    return loaders


@contextlib.contextmanager
def _evaluation_stage(trainer: pl.Trainer) -> Iterator[None]:
    # At fit end the Trainer still says "training", and datamodules augment training-stage batches
    # in `on_after_batch_transfer`: calibration and evaluation want evaluation-stage batches.
    stage = trainer.state.stage
    if stage == RunningStage.TRAINING:
        trainer.state.stage = type(stage).VALIDATING  # the Trainer's own namespace's enum
    try:
        yield
    finally:
        trainer.state.stage = stage


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


def _check_logits_output(trainer: pl.Trainer, pl_module: pl.LightningModule, target: nn.Module) -> None:
    """Fails before training if the report at its end could not read logits from `target`'s output.

    One eval-mode forward at batch 1 (no running statistic moves); skipped when there are no
    example inputs to run it on.
    """
    try:
        inputs = find_example_inputs(trainer, pl_module)[:1]
    except ValueError:
        return
    was_training = target.training
    target.eval()
    try:
        with torch.no_grad():
            output = target(inputs)
    finally:
        target.train(was_training)
    try:
        logits_of(output)
    except TypeError as error:
        raise ValueError(
            f"QuantizationCallback evaluates {type(target).__name__} by its logits: {error} Return logits from "
            "`forward`, or set `module_path` to a submodule that does."
        ) from None


def _has_fake_quant(module: nn.Module) -> bool:
    return any(isinstance(submodule, ActivationQuantizer) for submodule in module.modules())


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
