"""How many epochs a fit will start, from the Trainer's `max_epochs`, `max_steps` and loader length.

`max_epochs: -1` with `max_steps` is a legitimate way to bound a run. Whatever counts in epochs
(epoch-based LR schedules, compression epochs) must then derive the epoch count from the steps
and the train loader's length; taking `max_epochs` alone makes a cosine schedule swing between
its peak and 0 every epoch, and a compression epoch silently never come.
"""

from __future__ import annotations

import math
from typing import Any


def optimizer_steps_per_epoch(trainer: Any, load_data: bool = False) -> int | None:
    """Optimizer steps of one epoch (batches / gradient accumulation, rounded up, as Lightning steps).

    Args:
        trainer: the Trainer (either Lightning namespace).
        load_data: set up the train loader if the Trainer has not yet (as
            `trainer.estimated_stepping_batches` does; safe in `configure_optimizers`).

    Returns:
        None when the train loader is not set up yet or has no length (an iterable dataset).
    """
    if load_data and trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches <= 0:
        return None
    return math.ceil(batches / trainer.accumulate_grad_batches)


def planned_epochs(trainer: Any, load_data: bool = False) -> int | None:
    """Epochs the fit will start: the fewer of `max_epochs` and the epochs `max_steps` allows.

    Epoch e starts while e x steps-per-epoch < `max_steps`. Epochs that `max_steps` allows are
    only known once the train loader's length is (`load_data`, or after the loader is set up).

    Returns:
        None when neither limit is known (an endless run, or `max_steps` with a loader of unknown length).
    """
    limits = []
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        limits.append(trainer.max_epochs)
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        per_epoch = optimizer_steps_per_epoch(trainer, load_data=load_data)
        if per_epoch is not None:
            limits.append(math.ceil(trainer.max_steps / per_epoch))
    return min(limits) if limits else None


def describe_limits(trainer: Any) -> str:
    """`max_epochs=..., max_steps=...` as the Trainer has them, for error messages."""
    return f"max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}"
