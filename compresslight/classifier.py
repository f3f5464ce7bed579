"""`ImageClassifier`: the LightningModule every compresslight config trains.

It wraps any registered architecture (or any `nn.Module`) as `self.model`, trains it with SGD and
the papers' LR schedules, and keeps the model's structural compression history
(`compression_records`) in its checkpoints so that a compressed checkpoint loads in any process:
`ImageClassifier.load_from_checkpoint(path)` rebuilds the original architecture, replays the
records, then loads the weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

import compresslight.lightning_compat as pl
from compresslight.checkpoint import (
    RECORDS_KEY,
    adapt_pretrained_weights,
    check_resumed_schedules,
    check_weights_fit,
    checkpoint_load_error,
    read_model_weights,
    schedule_lengths,
    warn_unsafe_load,
)
from compresslight.checks import check_choice, check_number, check_ratio
from compresslight.compression.record import CompressionRecord, as_record, replay
from compresslight.registry import create_model
from compresslight.run_length import describe_limits, planned_epochs

log = logging.getLogger(__name__)

LRSchedule = Literal["multistep", "cosine", "onecycle", "exponential", "constant"]


class ImageClassifier(pl.LightningModule):
    """Image classification with any registered architecture.

    Args:
        arch: a registry name (`compresslight.list_models()`) or an `nn.Module` (class_path in YAML).
        num_classes: outputs of the head; the CLI links it from the datamodule.
        input_shape: (channels, height, width) of one image; the CLI links it from the datamodule.
        lr: initial learning rate of SGD.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        nesterov: Nesterov momentum.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        lr_schedule: "multistep" (x`gamma` at `milestones`, fractions of max_epochs, papers
            000/001), "cosine", "onecycle" (per step, peak `lr`), "exponential" (x`gamma` per
            epoch, paper 003) or "constant".
        milestones: for "multistep", fractions of the run's epochs in (0, 1): `trainer.max_epochs`, or
            the epochs `trainer.max_steps` allows when that is fewer (or `max_epochs` is -1).
        gamma: LR factor for "multistep" and "exponential".
        init_from: a checkpoint to take weights (and structural edits) from before training: the
            papers' "compress a trained baseline, then fine-tune". Weights only; no optimizer state.
            A plain state dict of the model works too (torchvision's ImageNet `resnet18` weights);
            every tensor must fit, none may be missing (but a reset classifier).
        init_from_prefix: for a plain state dict whose keys all start with a prefix (`"module."`
            for weights saved from `nn.DataParallel`, as the published CIFAR ResNets in
            `../shared/pretrained/` are): the prefix is stripped (`""` reads a state dict that is
            under `"state_dict"` in the file, without a prefix). None: the file says what it is.
            With another input-channel or class count, the input conv is adapted (grayscale: sum
            of the RGB filters) and the classifier reset, as timm does; the log says so.

    Raises:
        ValueError: for an unknown architecture, hyperparameters out of range or an unreadable
            `init_from`.
    """

    def __init__(
        self,
        arch: str | nn.Module = "resnet20",
        num_classes: int = 10,
        input_shape: Sequence[int] = (3, 32, 32),
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = False,
        label_smoothing: float = 0.0,
        lr_schedule: LRSchedule = "multistep",
        milestones: Sequence[float] = (0.5, 0.75),
        gamma: float = 0.1,
        init_from: str | None = None,
        init_from_prefix: str | None = None,
    ) -> None:
        super().__init__()
        _validate_hyperparameters(lr, momentum, weight_decay, label_smoothing, lr_schedule, milestones, gamma)
        # A list before save_hyperparameters reads it, as YAML gives it: Lightning refuses to log
        # a model and datamodule whose `input_shape` hyperparameters differ, even in type only.
        input_shape = list(input_shape)
        if len(input_shape) != 3:
            raise ValueError(f"`input_shape` must be (channels, height, width), got {input_shape!r}.")
        self.save_hyperparameters(ignore=["arch"] if isinstance(arch, nn.Module) else None)
        self.model = (
            arch
            if isinstance(arch, nn.Module)
            else create_model(arch, num_classes=num_classes, in_channels=input_shape[0])
        )
        self.example_input_array = torch.zeros(1, *input_shape)
        self.compression_records: list[CompressionRecord] = []
        self.train_metrics = _classification_metrics(num_classes, prefix="train/")
        self.val_metrics = _classification_metrics(num_classes, prefix="val/")
        self.test_metrics = _classification_metrics(num_classes, prefix="test/")
        if init_from_prefix is not None and init_from is None:
            raise ValueError(
                f"`init_from_prefix` ({init_from_prefix!r}) needs `init_from` (the plain state dict to load), got None."
            )
        if init_from is not None:
            self._init_from_checkpoint(init_from)

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=-1)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        metrics = getattr(self, f"{stage}_metrics")
        # Update only; the collection computes once per epoch (per-step compute would sync and
        # cost time in the hot loop).
        metrics.update(logits.detach(), targets)
        self.log(
            f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, sync_dist=stage != "train"
        )
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov
        )
        if hp.lr_schedule == "constant":
            return optimizer
        interval = "epoch"
        if hp.lr_schedule == "onecycle":
            total_steps = self.trainer.estimated_stepping_batches
            if not math.isfinite(total_steps):
                raise ValueError(
                    "`lr_schedule`='onecycle' needs a run of known length: set `trainer.max_steps` or "
                    f"`trainer.max_epochs`, got {describe_limits(self.trainer)}."
                )
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=hp.lr, total_steps=max(1, int(total_steps))
            )
            interval = "step"
        elif hp.lr_schedule == "exponential":  # x gamma per epoch: needs no run length
            scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=hp.gamma)
        else:
            # With `max_epochs: -1` the run's length comes from `max_steps` and the loader length.
            epochs = planned_epochs(self.trainer, load_data=True)
            if epochs is None:
                raise ValueError(
                    f"`lr_schedule`={hp.lr_schedule!r} counts epochs and needs a run of known length: set "
                    f"`trainer.max_epochs`, or `trainer.max_steps` with a train loader that has a length; got "
                    f"{describe_limits(self.trainer)}."
                )
            epochs = max(1, epochs)
            if hp.lr_schedule == "multistep":
                milestones = sorted({max(1, round(fraction * epochs)) for fraction in hp.milestones})
                scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=hp.gamma)
            else:  # cosine
                scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    # --- checkpoints hold the structural edits ---------------------------------------------

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: Any, *args: Any, weights_only: bool = True, **kwargs: Any
    ) -> ImageClassifier:
        """Lightning's `load_from_checkpoint`, weights-only by default (unpickling runs no code from the
        file; see `compresslight.checkpoint.read_checkpoint`), and with errors that name the file."""
        if not weights_only:
            warn_unsafe_load(checkpoint_path)
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, weights_only=weights_only, **kwargs)
        except Exception as error:
            explained = checkpoint_load_error(checkpoint_path, error)
            if explained is error:
                raise
            raise explained from error

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORDS_KEY] = [record.to_dict() for record in self.compression_records]
        # The weights came from `init_from` already; a later load must not need that file.
        if "hyper_parameters" in checkpoint and "init_from" in checkpoint["hyper_parameters"]:
            checkpoint["hyper_parameters"]["init_from"] = None
            checkpoint["hyper_parameters"]["init_from_prefix"] = None

    @override
    def on_fit_start(self) -> None:
        # The schedules as built for this fit, before a `--ckpt_path` restore replaces their state.
        self._planned_schedules = schedule_lengths([config.scheduler for config in self.trainer.lr_scheduler_configs])

    @override
    def on_train_start(self) -> None:
        saved = getattr(self, "_resumed_scheduler_states", None)
        if saved is not None and self.trainer.ckpt_path is not None:
            check_resumed_schedules(getattr(self, "_planned_schedules", []), saved, self.trainer.ckpt_path)
        self._resumed_scheduler_states = None

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_scheduler_states = checkpoint.get("lr_schedulers")
        self._check_architecture(checkpoint)
        self._replay_missing_records(checkpoint.get(RECORDS_KEY, []))
        _check_state_dict_shapes(self, checkpoint["state_dict"], source="checkpoint")

    def _check_architecture(self, checkpoint: dict[str, Any], source: str = "The checkpoint") -> None:
        """Refuses a checkpoint of another registered architecture, naming both (also the CLI's `--ckpt_path` check).

        Raises:
            ValueError: when the checkpoint's `arch` hyperparameter differs from this model's.
        """
        saved_arch = checkpoint.get("hyper_parameters", {}).get("arch")
        own_arch = self.hparams.get("arch")
        if isinstance(saved_arch, str) and isinstance(own_arch, str) and saved_arch != own_arch:
            raise ValueError(
                f"{source} holds a {saved_arch!r} model but this ImageClassifier has `arch`={own_arch!r}: "
                f"set `--model.arch {saved_arch}` or use a checkpoint of {own_arch!r}."
            )

    def _replay_missing_records(self, saved_records: list[dict[str, Any]]) -> None:
        """Replays the records the model does not hold yet.

        The model may already hold a prefix of them (`init_from`, or a test after fit in the
        same process); any other difference cannot be undone and is an error.
        """
        saved = [as_record(record) for record in saved_records]
        held = [record.to_dict() for record in self.compression_records]
        if [record.to_dict() for record in saved[: len(held)]] != held:
            raise ValueError(
                f"The checkpoint's compression history ({len(saved)} records) does not start with the "
                f"{len(held)} edits this model already holds; load it into a fresh model with "
                "`ImageClassifier.load_from_checkpoint(path)`."
            )
        self.compression_records.extend(replay(self, saved[len(held) :]))

    def _init_from_checkpoint(self, path: str) -> None:
        if not Path(path).is_file():
            raise ValueError(f"`init_from` must be an existing checkpoint file, got {path!r} (no such file).")
        checkpoint, model_state = read_model_weights(path, self.hparams.get("init_from_prefix"))
        self._check_architecture(checkpoint)
        self._replay_missing_records(checkpoint.get(RECORDS_KEY, []))
        if not set(model_state) & set(self.model.state_dict()):
            found = list(checkpoint["state_dict"] if checkpoint else model_state)[:4]
            raise ValueError(
                f"`init_from` {path!r} holds no weight of this model: its keys are {found}..., "
                f"this model's are {list(self.model.state_dict())[:4]}.... A plain state dict whose keys carry a "
                "prefix (e.g. 'module.' from nn.DataParallel) needs `init_from_prefix`."
            )
        # Another input-channel or class count (an ImageNet checkpoint for grayscale Steelpatch):
        # adapt the stem and reset the classifier, as timm does, rather than refuse.
        adapted, notes = adapt_pretrained_weights(self.model, model_state)
        if not checkpoint:  # a plain state dict: all of the model or an error (a checkpoint may hold a pruned one)
            check_weights_fit(self.model, model_state, adapted, source=f"`init_from` {path!r}")
        model_state = adapted
        for note in notes:
            log.info("init_from %s: %s.", path, note)
        model_state = {f"model.{key}": value for key, value in model_state.items()}
        _check_state_dict_shapes(self, model_state, source=f"`init_from` {path!r}")
        self.load_state_dict(model_state, strict=False)
        log.info("Initialized weights from %s (%d compression records).", path, len(self.compression_records))


def _classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    # Paper 000 reports F1 next to top-1; top-5 only means something with more than 5 classes.
    metrics: dict[str, Any] = {
        "top1": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro"),
        "f1": MulticlassF1Score(num_classes=num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["top5"] = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
    # No compute groups: torchmetrics merges metrics whose states are equal after the first
    # update, and on a class-ordered validation set (image folders) top-5's first-batch states
    # can equal F1's, after which top-5 is computed from top-1 statistics and logged equal to it.
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


def _check_state_dict_shapes(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Fails with the mismatching tensors named, instead of a `load_state_dict` stack trace."""
    own = module.state_dict()
    mismatches = [
        f"{key}: {tuple(value.shape)} in {source} vs {tuple(own[key].shape)} here"
        for key, value in state_dict.items()
        if key in own and tuple(own[key].shape) != tuple(value.shape)
    ]
    if mismatches:
        shown = "; ".join(mismatches[:5]) + (f"; ... ({len(mismatches)} in all)" if len(mismatches) > 5 else "")
        raise ValueError(
            f"The weights in {source} do not fit this model (another architecture, or compression "
            f"records that were not saved?): {shown}."
        )


def _validate_hyperparameters(
    lr: float,
    momentum: float,
    weight_decay: float,
    label_smoothing: float,
    lr_schedule: str,
    milestones: Sequence[float],
    gamma: float,
) -> None:
    check_number("lr", lr, greater_than=0)
    check_ratio("momentum", momentum, include_zero=True, include_one=False)
    check_number("weight_decay", weight_decay, at_least=0)
    check_ratio("label_smoothing", label_smoothing, include_zero=True, include_one=False)
    check_choice("lr_schedule", lr_schedule, ("multistep", "cosine", "onecycle", "exponential", "constant"))
    if any(not 0 < fraction < 1 for fraction in milestones):
        raise ValueError(f"`milestones` must be fractions of max_epochs in (0, 1), got {list(milestones)!r}.")
    check_number("gamma", gamma, greater_than=0)
