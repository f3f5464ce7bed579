"""`DivergenceGuard`: stops a fit whose loss or weights became non-finite, before a checkpoint can hold them.

Every compression callback is one (`StructuralCompressionCallback`, `DistillationCallback`
derive from it): the first guard among the Trainer's callbacks does the checks.
"""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from compresslight import lightning_compat as pl
from compresslight.divergence import (
    TrainingDivergedError,
    describe_nonfinite,
    format_loss,
    is_finite,
    loss_value,
    nonfinite_tensors,
)
from compresslight.lightning_compat import Callback

__all__ = ["DivergenceGuard"]


class DivergenceGuard(Callback):
    """Stops a fit whose loss or weights became non-finite, before it can save them.

    Checks, by the first guard among the Trainer's callbacks only (one check, however many
    compression callbacks): the training loss after every step (one device sync; under DDP the
    ranks agree so that all stop together), the weights at the end of every training epoch and
    before every compression step (`check_finite_weights`), and every checkpoint's `state_dict`
    before it is written: a raise there happens before the file is touched, so `ModelCheckpoint`
    keeps its previous file (it removes that only after a successful save).
    """

    def _is_first_guard(self, trainer: pl.Trainer) -> bool:
        return next(callback for callback in trainer.callbacks if isinstance(callback, DivergenceGuard)) is self

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._is_first_guard(trainer):
            return
        loss = loss_value(outputs)
        diverged = loss is not None and not is_finite(loss)
        if trainer.world_size > 1:
            # A NaN on one rank only would otherwise stop that rank and hang the others.
            diverged = trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if diverged:
            shown = format_loss(loss) if loss is not None and not is_finite(loss) else "non-finite on another rank"
            raise TrainingDivergedError(
                f"Training diverged: the training loss is {shown} at epoch {trainer.current_epoch}, batch "
                f"{batch_idx} (global step {trainer.global_step}). {type(self).__name__} stopped the fit before "
                f"any checkpoint could hold the diverged model; the last checkpoint written is intact. "
                f"{_divergence_hint(trainer)}"
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._is_first_guard(trainer):
            self.check_finite_weights(trainer, pl_module, f"at the end of epoch {trainer.current_epoch}")

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self._is_first_guard(trainer):
            return
        # Parameters only: a module may keep legitimately infinite buffers (masks, observers' initial ranges).
        parameters = {name for name, _ in pl_module.named_parameters()}
        state = checkpoint.get("state_dict", {})
        bad = nonfinite_tensors((name, value) for name, value in state.items() if name in parameters)
        if bad:
            raise TrainingDivergedError(
                f"Refusing to save a checkpoint whose weights are not finite ({describe_nonfinite(bad)}) at epoch "
                f"{trainer.current_epoch}, global step {trainer.global_step}: it would replace the last good "
                f"checkpoint, which is kept. Training diverged. {_divergence_hint(trainer)}"
            )

    def check_finite_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        """Raises `TrainingDivergedError` naming the parameters that are not finite.

        Args:
            when: where in the fit, for the message ("before PruningCallback's edit").
        """
        bad = nonfinite_tensors(pl_module.named_parameters())
        if bad:
            raise TrainingDivergedError(
                f"Training diverged: the weights hold NaN or infinite values {when} (epoch {trainer.current_epoch}, "
                f"global step {trainer.global_step}): {describe_nonfinite(bad)}. {type(self).__name__} stopped the "
                f"fit; the last checkpoint written is intact. {_divergence_hint(trainer)}"
            )


def _divergence_hint(trainer: pl.Trainer) -> str:
    lrs = sorted({group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups})
    current = f" (current lr: {', '.join(f'{lr:.3g}' for lr in lrs)})" if lrs else ""
    return f"Lower the learning rate{current}, or look for bad inputs in that epoch's data."
