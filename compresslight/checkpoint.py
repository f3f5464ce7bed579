"""Reading compressed checkpoints, with or without `ImageClassifier`.

A compressed model's checkpoint holds its structural edits as records: `ImageClassifier` keeps
them under `checkpoint["compression_records"]`; on any other LightningModule the compression
callbacks keep them in their own callback state. `load_compressed_checkpoint` reads either,
replays the edits on a freshly built module, then loads the weights: the one call a user needs
outside a Trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from compresslight.compression.record import replay

M = TypeVar("M", bound=nn.Module)

#: Key under which `ImageClassifier` checkpoints hold the structural edits, as plain dicts.
RECORDS_KEY = "compression_records"
#: Key of each record dict in a callback's state giving its place in the module's edit history.
EDIT_INDEX_KEY = "edit_index"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a Lightning checkpoint on the CPU.

    Raises:
        FileNotFoundError: if `path` is not a file.
        ValueError: if it is not a Lightning checkpoint.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist.")
    # Our Lightning checkpoints hold plain hyperparameters and records next to the tensors,
    # which the weights-only unpickler rejects.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict').")
    return checkpoint


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


def load_compressed_checkpoint(module: M, path: str | Path, strict: bool = True) -> M:
    """Loads a compressed checkpoint into a freshly built, uncompressed `module`.

    Works for `ImageClassifier` (records in the checkpoint) and for any other LightningModule
    trained with compresslight callbacks (records in the callbacks' state).

    Args:
        module: the module as its constructor builds it (the original architecture).
        path: the checkpoint file.
        strict: passed to `load_state_dict`.

    Returns:
        `module`, edited and loaded, in eval mode.
    """
    checkpoint = read_checkpoint(path)
    if hasattr(module, "compression_records") and hasattr(module, "on_load_checkpoint"):
        module.on_load_checkpoint(checkpoint)
    else:
        replay(module, callback_records(checkpoint))
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return module.eval()
