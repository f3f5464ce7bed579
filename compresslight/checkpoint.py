"""Reading compressed checkpoints, with or without `ImageClassifier`.

A compressed model's checkpoint holds its structural edits as records: `ImageClassifier` keeps
them under `checkpoint["compression_records"]`; on any other LightningModule the compression
callbacks keep them in their own callback state. `load_compressed_checkpoint` reads either,
replays the edits on a freshly built module, then loads the weights: the one call a user needs
outside a Trainer.

Reading files safely and adapting pretrained weights live in `compresslight.weights` (no records
there); their names are re-exported here, where they were first written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from compresslight.compression.record import replay
from compresslight.weights import (
    LIGHTNING_VERSION_KEY,
    UnsafeCheckpointError,
    adapt_pretrained_weights,
    check_weights_fit,
    checkpoint_load_error,
    load_pretrained_weights,
    read_checkpoint,
    read_model_weights,
    read_state_dict,
    warn_unsafe_load,
)

__all__ = [
    "EDIT_INDEX_KEY",
    "LIGHTNING_VERSION_KEY",
    "RECORDS_KEY",
    "UnsafeCheckpointError",
    "adapt_pretrained_weights",
    "callback_records",
    "check_resumed_schedules",
    "check_weights_fit",
    "checkpoint_load_error",
    "load_compressed_checkpoint",
    "load_pretrained_weights",
    "read_checkpoint",
    "read_model_weights",
    "read_state_dict",
    "schedule_lengths",
    "warn_unsafe_load",
]

M = TypeVar("M", bound=nn.Module)

#: Key under which `ImageClassifier` checkpoints hold the structural edits, as plain dicts.
RECORDS_KEY = "compression_records"
#: Key of each record dict in a callback's state giving its place in the module's edit history.
EDIT_INDEX_KEY = "edit_index"


def callback_records(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """Every compression callback's records in a checkpoint, in the order they were applied."""
    records = [
        record
        for state in checkpoint.get("callbacks", {}).values()
        if isinstance(state, dict)
        for record in state.get("records", [])
        if isinstance(record, dict) and "kind" in record
    ]
    return sorted(records, key=lambda record: record.get(EDIT_INDEX_KEY, 0))


# The scheduler settings that fix a schedule's length: restored from a checkpoint they override
# the fit's own, so a fit longer (or shorter) than the saved one would run the wrong schedule.
_SCHEDULE_LENGTH_KEYS = {"OneCycleLR": "total_steps", "CosineAnnealingLR": "T_max"}


def schedule_lengths(schedulers: list[Any]) -> list[tuple[str, str, int] | None]:
    """(class name, key, value) of the length-fixing setting of each LR scheduler; None for others."""
    lengths: list[tuple[str, str, int] | None] = []
    for scheduler in schedulers:
        name = type(scheduler).__name__
        key = _SCHEDULE_LENGTH_KEYS.get(name)
        lengths.append((name, key, int(getattr(scheduler, key))) if key and hasattr(scheduler, key) else None)
    return lengths


def check_resumed_schedules(
    planned: list[tuple[str, str, int] | None], saved_states: list[dict[str, Any]], ckpt_path: Any
) -> None:
    """Refuses to resume LR schedules whose length differs from what this fit planned.

    A one-cycle schedule restored with fewer total steps than the fit takes crashes once it runs
    out (`Tried to step N times`); a cosine one restored with a shorter `T_max` climbs back up.

    Args:
        planned: `schedule_lengths` of the schedulers `configure_optimizers` built for this fit.
        saved_states: the checkpoint's `lr_schedulers` (their state dicts), in the same order.
        ckpt_path: the checkpoint, for the message.

    Raises:
        ValueError: naming the scheduler, both lengths and what to do instead.
    """
    for length, state in zip(planned, saved_states):
        if length is None or not isinstance(state, dict) or length[1] not in state:
            continue
        name, key, wanted = length
        saved = int(state[key])
        if saved != wanted:
            raise ValueError(
                f"Cannot resume {str(ckpt_path)!r}: its {name} schedule has {key}={saved}, but this fit's has "
                f"{key}={wanted} (max_epochs, max_steps or limit_train_batches changed since it was saved), and a "
                f"restored schedule keeps its old length ({name} would {_consequence(name)}). To train longer from "
                "these weights, start a new fit with a new schedule: `--model.init_from <checkpoint>` instead of "
                "`--ckpt_path`. To resume the run itself, keep the settings it was saved with."
            )


def _consequence(name: str) -> str:
    return "stop the fit with an error once it runs out" if name == "OneCycleLR" else "raise the lr again after it"


def load_compressed_checkpoint(module: M, path: str | Path, strict: bool = True, weights_only: bool = True) -> M:
    """Loads a compressed checkpoint into a freshly built, uncompressed `module`.

    Works for `ImageClassifier` (records in the checkpoint) and for any other LightningModule
    trained with compresslight callbacks (records in the callbacks' state).

    Args:
        module: the module as its constructor builds it (the original architecture).
        path: the checkpoint file.
        strict: passed to `load_state_dict`.
        weights_only: see `read_checkpoint`; False only for a file you trust.

    Returns:
        `module`, edited and loaded, in eval mode.
    """
    checkpoint = read_checkpoint(path, weights_only=weights_only)
    if hasattr(module, "compression_records") and hasattr(module, "on_load_checkpoint"):
        module.on_load_checkpoint(checkpoint)
    else:
        replay(module, callback_records(checkpoint))
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return module.eval()
