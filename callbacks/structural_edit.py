"""The one place where a structural edit meets a running Trainer.

Every callback that changes a model's structure (pruning, Tucker, LC) derives from
`StructuralCompressionCallback` and calls `apply_edit`. It:

1. runs the pure algorithm on rank 0 and broadcasts the record, so every DDP rank makes the same
   edit (measurement-driven decisions may differ between processes);
2. stores the record where checkpoints keep it (`pl_module.compression_records` for modules that
   keep records, e.g. `ImageClassifier`; always also in the callback's own state, so it works on
   any LightningModule);
3. mid-fit, rebuilds the optimizers and LR schedulers through `rebuild_optimizers` (keeping the
   schedule's position and the momentum of surviving parameters) and re-wraps the model under DDP;
4. logs params, MACs and per-layer channels before/after to every logger and to
   `compression_log.jsonl` in the run's log dir, and tells listeners (`CompressionListener`,
   `AfterCompressionListener`, e.g. `ProfileCallback`) about the edit.

On resume (`fit(ckpt_path=...)`) the records in the checkpoint are replayed before the weights
load, on any LightningModule (see `_RestoreGuard`).

Every compression callback is also a `DivergenceGuard`: a non-finite training loss, non-finite
weights before an edit or at an epoch's end, or a checkpoint about to be saved with non-finite
values stops the fit with `TrainingDivergedError`, so the last good checkpoint is never replaced
by a NaN model.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from compresslight.callbacks._trainer import (
    OptimizerSnapshot,
    append_jsonl,
    find_example_inputs,
    rebuild_optimizers,
    resolve_log_dir,
    run_on_rank_zero,
    target_module,
    target_path,
)
from compresslight.callbacks.divergence_guard import DivergenceGuard
from torch import nn
from typing_extensions import override

from compresslight import lightning_compat as pl
from compresslight.checkpoint import EDIT_INDEX_KEY, callback_records
from compresslight.compression.record import CompressionRecord, as_record, replay
from compresslight.lightning_compat import rank_zero_only
from compresslight.profiling.counting import count_macs
from compresslight.run_length import describe_limits, planned_epochs

# Re-exported: the callbacks' one import for the base, its listeners and the Trainer helpers.
__all__ = [
    "AfterCompressionListener",
    "CompressionListener",
    "DivergenceGuard",
    "OptimizerSnapshot",
    "StructuralCompressionCallback",
    "find_example_inputs",
    "rebuild_optimizers",
]

log = logging.getLogger(__name__)


@runtime_checkable
class CompressionListener(Protocol):
    """A callback that must act before any structural edit (`apply_edit` calls it first).

    `ProfileCallback` is one: it measures the baseline before a one-shot edit in `setup`, whatever
    the order of the callbacks.
    """

    def before_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None: ...


@runtime_checkable
class AfterCompressionListener(Protocol):
    """A callback told after every structural edit (`ProfileCallback` profiles the edited model)."""

    def on_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None: ...


class StructuralCompressionCallback(DivergenceGuard):
    """Base of callbacks that edit a model's structure.

    Args:
        module_path: the submodule of the LightningModule to compress (dotted path). Default:
            `model` when the LightningModule has an `nn.Module` attribute of that name (as
            `ImageClassifier` does), else the LightningModule itself.
    """

    def __init__(self, module_path: str | None = None) -> None:
        self.module_path = module_path
        self.records: list[dict[str, Any]] = []
        #: The run's log dir, resolved in `setup` (every rank runs it; the lookup is a collective under DDP).
        self.log_dir: Path | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(module_path=self.module_path)

    def target_path(self, pl_module: pl.LightningModule) -> str:
        """The resolved `module_path`."""
        return target_path(pl_module, self.module_path)

    def target_module(self, pl_module: pl.LightningModule) -> nn.Module:
        """The submodule this callback compresses.

        Raises:
            ValueError: if `module_path` names no submodule.
        """
        return target_module(pl_module, self.module_path)

    # --- resume ------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.target_module(pl_module)  # fail early on a bad module_path
        self.log_dir = resolve_log_dir(trainer)
        if stage == "fit":
            self.check_epochs_are_reached(trainer)  # `max_epochs`; `max_steps` once the loader is known
        _RestoreGuard.install(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Any checkpoint restore has happened by now: the pre-edit copies are not needed.
        _RestoreGuard.install(pl_module).snapshots.clear()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The train loader is set up now: `max_steps` says how many epochs run. No step has run yet.
        self.check_epochs_are_reached(trainer)

    # --- the schedule must fit the run -------------------------------------------------------

    def pending_epochs(self, trainer: pl.Trainer) -> list[int]:
        """Epochs at whose start this callback still has to edit the model (subclasses with a schedule)."""
        return []

    def check_epochs_are_reached(self, trainer: pl.Trainer) -> None:
        """Fails when the run ends before an epoch at which this callback compresses.

        Without this a compression epoch at or beyond the run's last epoch silently never happens
        (rc 0, an uncompressed model, a profile saying 1.00x).

        Raises:
            ValueError: naming the epochs that are never reached and the Trainer's limits.
        """
        epochs = planned_epochs(trainer)
        if epochs is None:
            return
        never = [epoch for epoch in self.pending_epochs(trainer) if trainer.current_epoch <= epoch and epochs <= epoch]
        if never:
            raise ValueError(
                f"{type(self).__name__} compresses at the start of epoch(s) {never}, but this run trains "
                f"{epochs} epoch(s) (0..{epochs - 1}; {describe_limits(trainer)}): the compression would never "
                "happen. Raise `trainer.max_epochs` (or `max_steps`) or schedule the compression earlier."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"records": list(self.records)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict.get("records", []))

    # --- the edit ----------------------------------------------------------------------------

    def apply_edit(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        edit: Callable[[nn.Module], CompressionRecord],
        example_inputs: torch.Tensor | None = None,
    ) -> CompressionRecord:
        """Runs `edit(target_module)` and brings the Trainer up to date with the new structure.

        Args:
            trainer: the running Trainer.
            pl_module: the LightningModule being trained.
            edit: a pure algorithm bound to its arguments; edits the module in place, returns a record.
            example_inputs: inputs for the MAC count (default: `example_inputs(trainer, pl_module)`).
        """
        self.check_finite_weights(trainer, pl_module, f"before {type(self).__name__}'s edit")
        target = self.target_module(pl_module)
        path = self.target_path(pl_module)
        inputs = example_inputs if example_inputs is not None else find_example_inputs(trainer, pl_module)
        before = _structure_summary(target, inputs)
        for callback in trainer.callbacks:
            # e.g. ProfileCallback: measure the baseline before a one-shot edit in `setup`,
            # whatever the order of the callbacks.
            if callback is not self and isinstance(callback, CompressionListener):
                callback.before_compression(trainer, pl_module)
        started = time.perf_counter()  # the edit and the optimizer rebuild, not the profiling above
        optimizer_snapshot = OptimizerSnapshot.take(trainer, pl_module) if trainer.optimizers else None
        if optimizer_snapshot is None:
            # An edit before training (in `setup`) may have to be undone if Lightning then
            # restores a checkpoint: keep a copy of the module as it was.
            _RestoreGuard.install(pl_module).snapshot(path, target)

        def run_edit() -> dict[str, Any]:
            record = edit(target)
            record.target = path
            return record.to_dict()

        record_dict = run_on_rank_zero(trainer, run_edit, f"{type(self).__name__}'s edit")
        if not trainer.is_global_zero:
            replay(pl_module, [record_dict])
        record = as_record(record_dict)

        edit_index = getattr(pl_module, _EDIT_COUNT_ATTR, 0)
        setattr(pl_module, _EDIT_COUNT_ATTR, edit_index + 1)
        self.records.append({**record_dict, EDIT_INDEX_KEY: edit_index})
        if _keeps_records(pl_module):
            pl_module.compression_records.append(record)
        if optimizer_snapshot is not None:
            rebuild_optimizers(trainer, pl_module, optimizer_snapshot, record)

        after = _structure_summary(target, inputs)
        seconds = time.perf_counter() - started
        # The log dir is a collective under DDP: resolved on every rank, never inside the rank-0-only `_log_edit`,
        # where rank 0 would broadcast alone and pair with the other ranks' next collective (a hang).
        log_dir = self.log_dir if self.log_dir is not None else resolve_log_dir(trainer)
        self._log_edit(trainer, record, before, after, seconds, log_dir)
        for callback in trainer.callbacks:
            if callback is not self and isinstance(callback, AfterCompressionListener):
                callback.on_compression(trainer, pl_module)
        return record

    @rank_zero_only
    def _log_edit(
        self,
        trainer: pl.Trainer,
        record: CompressionRecord,
        before: dict[str, Any],
        after: dict[str, Any],
        seconds: float,
        log_dir: Path,
    ) -> None:
        metrics = {
            "compression/params": float(after["params"]),
            "compression/macs": float(after["macs"]),
            "compression/params_ratio": after["params"] / max(before["params"], 1),
            "compression/macs_ratio": after["macs"] / max(before["macs"], 1),
            "compression/edit_seconds": seconds,
        }
        metrics.update({f"compression/channels/{name}": float(n) for name, n in after["channels"].items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        entry = {
            "callback": type(self).__name__,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "record": record.to_dict(),
            "seconds": seconds,
            "before": before,
            "after": after,
        }
        append_jsonl(log_dir / "compression_log.jsonl", entry)
        log.info(
            "%s (%s): params %d -> %d, MACs %d -> %d, %.2f s.",
            type(self).__name__,
            record.kind,
            before["params"],
            after["params"],
            before["macs"],
            after["macs"],
            seconds,
        )


# A plain attribute on the LightningModule: how many edits it has had (orders the records of
# several callbacks).
_EDIT_COUNT_ATTR = "_compresslight_edit_count"


class _RestoreGuard:
    """Runs before a LightningModule's `on_load_checkpoint` when Lightning restores a checkpoint.

    On `fit(ckpt_path=...)`, Lightning 2.6 calls callbacks' `setup` *before* it knows the
    checkpoint (`trainer.ckpt_path` is still None there) and restores the module right after:
    its `on_load_checkpoint`, then the weights. The module's `on_load_checkpoint` is the last
    point before the weights load, so the guard wraps it (an instance attribute; the class is
    untouched) to:

    1. undo edits made in `setup` in this process (one-shot compression): the checkpoint's
       records say what the model must be;
    2. on modules that do not keep records themselves, replay every compression callback's
       records from the checkpoint, in the order they were made;
    3. call the module's own `on_load_checkpoint` (`ImageClassifier` replays its records there).
    """

    ATTR = "_compresslight_restore_guard"

    def __init__(self, pl_module: pl.LightningModule) -> None:
        self.pl_module = pl_module
        self.original_hook = pl_module.on_load_checkpoint
        self.snapshots: dict[str, dict[str, Any]] = {}  # target path -> its state before the first setup edit
        self.records_before_setup = len(pl_module.compression_records) if _keeps_records(pl_module) else 0

    @classmethod
    def install(cls, pl_module: pl.LightningModule) -> _RestoreGuard:
        guard = pl_module.__dict__.get(cls.ATTR)
        if guard is None:
            guard = cls(pl_module)
            pl_module.__dict__[cls.ATTR] = guard
            pl_module.on_load_checkpoint = guard
        return guard

    def snapshot(self, path: str, target: nn.Module) -> None:
        """Keeps a copy of `target`'s structure and weights, once per path."""
        if path in self.snapshots:
            return
        # A LightningModule's own attributes hold the Trainer: copy only what edits change.
        keys = ("_modules", "_parameters", "_buffers") if pl.is_lightning_module(target) else target.__dict__
        self.snapshots[path] = copy.deepcopy({key: target.__dict__[key] for key in keys})

    def __call__(self, checkpoint: dict[str, Any]) -> Any:
        module = self.pl_module
        saved = callback_records(checkpoint)
        for path, snapshot in self.snapshots.items():
            # Same object, the structure and weights it had before the setup edit.
            module.get_submodule(path).__dict__.update(snapshot)
            if not any(record.get("target") == path for record in saved):
                log.warning(
                    "Resuming from a checkpoint in which no compression callback had edited %r: the one-shot "
                    "compression is not applied. To compress a trained model, start a new fit from its weights "
                    "(`--model.init_from`), not `--ckpt_path`.",
                    path or type(module).__name__,
                )
        if self.snapshots and _keeps_records(module):
            del module.compression_records[self.records_before_setup :]
        self.snapshots.clear()
        if not _keeps_records(module):
            replay(module, saved)
        setattr(module, _EDIT_COUNT_ATTR, len(saved))
        return self.original_hook(checkpoint)


def _keeps_records(pl_module: pl.LightningModule) -> bool:
    return isinstance(getattr(pl_module, "compression_records", None), list)


def _structure_summary(module: nn.Module, example_inputs: torch.Tensor) -> dict[str, Any]:
    channels = {
        name: (layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features)
        for name, layer in module.named_modules()
        if isinstance(layer, (nn.Conv2d, nn.Linear))
    }
    was_training = module.training
    module.eval()  # a forward in train mode would move BatchNorm's running statistics
    try:
        macs = count_macs(module, example_inputs[:1])[0]
    finally:
        module.train(was_training)
    return {"params": sum(p.numel() for p in module.parameters()), "macs": macs, "channels": channels}
