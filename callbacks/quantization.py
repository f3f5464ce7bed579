"""`QuantizationCallback`: paper 001's 8-bit quantization of the trained model, next to real int8.

Post-training (the default, paper 001 section VII-A): when fitting ends (`on_fit_end`) and when a
test run starts (`on_test_start`, e.g. `python cli.py test --config X.yaml --ckpt_path best.ckpt`)
the callback calibrates on `calibration_batches` training batches (as the model sees them in
evaluation: normalized, not augmented) and runs
`compresslight.compression.quantization_report.quantization_report` on the validation set (fit)
or the test set (test): simulated `bits`-bit model, int8 ONNX Runtime model (`int8=True`), top-1
of each, CPU latency and file sizes. That module's docstring lists the files and the logged
`quant/...` keys; the callback logs the metrics to every logger and writes `quantization.json`
(`QuantizationReport.to_dict()`) in the run's log dir.

Quantization-aware training (`qat_epochs > 0`): at the start of epoch `max_epochs - qat_epochs`
every Conv/Linear of the model is swapped, in place, for its fake-quant form (`prepare_qat`: the
same parameters, weights and inputs quantized in the forward pass, straight-through gradients,
EMA activation ranges). The swap is a structural edit with a `fake_quant` record, so checkpoints
replay it. At fit end the ranges are frozen (`convert_to_simulated`) and the report compares the
QAT model ("sim") with its own float weights ("float").

A QAT run's Lightning checkpoints hold the fake-quant model (`fake_quant` record + ranges);
reload with `ImageClassifier.load_from_checkpoint(path)` / `load_compressed_checkpoint`.

Under DDP the evaluation runs on global rank 0 only (with a datamodule it sees the whole
validation or test set; loaders given directly to `fit` are the rank's shard); the QAT edit and
the final freeze run on every rank. Real int8 runs on the CPU only (ONNX Runtime's CPU kernels),
so every latency here is a CPU latency, whatever device the model was trained on.
"""

from __future__ import annotations

import contextlib
import json
import logging
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
    ActivationQuantizer,
    convert_to_simulated,
    fake_quant_record,
    float_only_layers,
    prepare_qat,
)
from compresslight.compression.quantization_report import (
    FLOAT_ONNX_FILE,
    INT8_FILE,
    QuantizationReport,
    QuantizationReportOptions,
    has_fake_quant,
    quantization_report,
)
from compresslight.compression.record import CompressionRecord
from compresslight.evaluation import logits_of
from compresslight.lightning_compat import RunningStage, TrainerFn
from compresslight.optional import require_extra

log = logging.getLogger(__name__)

REPORT_FILE = "quantization.json"
STAGES = ("fit", "test")

__all__ = ["FLOAT_ONNX_FILE", "INT8_FILE", "REPORT_FILE", "QuantizationCallback"]


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
        latency_warmup: untimed calls at the start of each model's turn.
        latency_iters: timed calls per turn (their median is the round's latency).
        latency_rounds: rounds in which the float, simulated and int8 models alternate (>= 2):
            the int8 speedup over ONNX Runtime float is paired per round, with a 95% interval.
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
        latency_iters: int = 10,
        latency_rounds: int = 5,
        threads: int | None = None,
        device: str | None = None,
        output_dir: str | Path | None = None,
        module_path: str | None = None,
    ) -> None:
        super().__init__(module_path=module_path)
        #: What the report builds and measures (checked here, before any training).
        self.options = QuantizationReportOptions(
            bits=bits,
            per_channel=per_channel,
            calibration_batches=calibration_batches,
            eval_batches=eval_batches,
            int8=int8,
            allow_float_layers=allow_float_layers,
            latency_batch_sizes=latency_batch_sizes,  # type: ignore[arg-type]  # any sequence; stored as a tuple
            latency_warmup=latency_warmup,
            latency_iters=latency_iters,
            latency_rounds=latency_rounds,
            threads=threads,
        )
        if isinstance(qat_epochs, bool) or not isinstance(qat_epochs, int) or qat_epochs < 0:
            raise ValueError(f"`qat_epochs` must be an int >= 0, got {qat_epochs!r}.")
        if isinstance(qat_averaging_constant, bool) or not 0.0 < qat_averaging_constant <= 1.0:
            raise ValueError(f"`qat_averaging_constant` must be in (0, 1], got {qat_averaging_constant!r}.")
        stages = [stages] if isinstance(stages, str) else list(stages)
        if not set(stages) <= set(STAGES):
            raise ValueError(f"`stages` must be a list of {list(STAGES)}, got {stages!r}.")
        if int8:
            require_extra("onnx", "`QuantizationCallback(int8=True)` (`int8=False`: the simulated model only)")
        self.qat_epochs = qat_epochs
        self.qat_averaging_constant = float(qat_averaging_constant)
        self.stages = stages
        self.device = None if device is None else torch.device(device)
        self.output_dir = None if output_dir is None else Path(output_dir)
        #: The last report's numbers (the logged metrics), for use after `fit`/`test` returns.
        self.results: dict[str, float] = {}
        self._log_dir: Path | None = None

    @property
    def bits(self) -> int:
        return self.options.bits

    @property
    def per_channel(self) -> bool:
        return self.options.per_channel

    @property
    def int8(self) -> bool:
        return self.options.int8

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
        if self.options.int8 and not self.options.allow_float_layers:
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
        if has_fake_quant(target):  # prepared earlier, or restored from a checkpoint of the QAT phase
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
        if has_fake_quant(target):
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
        device = self.device or trainer.strategy.root_device
        log_dir = self._log_dir or Path(trainer.default_root_dir)
        with _evaluation_stage(trainer):
            report = quantization_report(
                self.target_module(pl_module),
                (images for images, _ in self._batches(trainer, "train", device, self.options.calibration_batches)),
                self._batches(trainer, split, device, self.options.eval_batches),
                log_dir,
                self.options,
                split=split,
                device=device,
            )
        self.results = report.metrics
        self._write(trainer, log_dir, report)
        return report.metrics

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

    def _write(self, trainer: pl.Trainer, log_dir: Path, report: QuantizationReport) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(report.metrics, step=trainer.global_step)
            logger.save()
        (log_dir / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        log.info("QuantizationCallback wrote %s.\n%s", log_dir / REPORT_FILE, report.to_markdown())


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
