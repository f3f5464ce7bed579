"""Reading compressed checkpoints, with or without `ImageClassifier`.

A compressed model's checkpoint holds its structural edits as records: `ImageClassifier` keeps
them under `checkpoint["compression_records"]`; on any other LightningModule the compression
callbacks keep them in their own callback state. `load_compressed_checkpoint` reads either,
replays the edits on a freshly built module, then loads the weights: the one call a user needs
outside a Trainer.

`adapt_pretrained_weights` fits weights trained with another input-channel or class count (an
ImageNet checkpoint for grayscale Steelpatch) to a model: `ImageClassifier(init_from=...)` uses it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, TypeVar

import torch
from torch import nn

from compresslight.compression.record import replay

log = logging.getLogger(__name__)

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


def read_model_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(checkpoint, model weights) of an `ImageClassifier` checkpoint (its `model.*` weights, keys
    relative to the model), or ({}, the weights) of a plain state dict of the model, as torchvision
    publishes its ImageNet weights.

    Raises:
        FileNotFoundError: if `path` is not a file.
        ValueError: if it is neither.
    """
    try:
        checkpoint = read_checkpoint(path)
    except ValueError:
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure means "not weights"
            raise ValueError(f"{str(path)!r} is neither a Lightning checkpoint nor a state dict: {error}") from None
        if not (isinstance(weights, dict) and weights and all(isinstance(v, torch.Tensor) for v in weights.values())):
            raise ValueError(f"{str(path)!r} is neither a Lightning checkpoint nor a state dict of tensors.") from None
        return {}, dict(weights)
    state = checkpoint["state_dict"]
    return checkpoint, {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}


def load_pretrained_weights(model: M, path: str | Path) -> M:
    """Loads `read_model_weights(path)` into `model`, adapted by `adapt_pretrained_weights` (logged).

    What `create_model(..., weights=path)` does; `ImageClassifier(init_from=path)` also replays
    the checkpoint's compression records first.

    Raises:
        ValueError: if, after the adaptation, a tensor has another shape, the file has tensors the
            model lacks, or the model has tensors the file lacks (other than a reset classifier).
    """
    _, weights = read_model_weights(path)
    adapted, notes = adapt_pretrained_weights(model, weights)
    reset = set(weights) - set(adapted)
    own = model.state_dict()
    problems = [
        *(f"{key}: {tuple(value.shape)} in the file vs {tuple(own[key].shape)} here"
          for key, value in adapted.items() if key in own and own[key].shape != value.shape),
        *(f"{key}: not in the model" for key in adapted if key not in own),
        *(f"{key}: not in the file" for key in own if key not in adapted and key not in reset),
    ]  # fmt: skip
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise ValueError(f"The weights in {str(path)!r} do not fit {type(model).__name__}: {shown}.")
    model.load_state_dict(adapted, strict=False)
    for note in notes:
        log.info("Weights from %s: %s.", path, note)
    return model


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


def adapt_pretrained_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fits pretrained weights to `model` when its input channels or classes differ, as timm does.

    - The input conv (the model's first `nn.Conv2d`) with another input-channel count: timm's
      `adapt_input_conv` rule. To 1 channel, the filters are summed over the input channels (a
      gray image then gets the response the RGB filters give it as three equal channels); to any
      other count, the filters are repeated and rescaled by old / new channels.
    - The classifier (the model's last `nn.Linear`) with another output count: its weight and bias
      are left out, so the model keeps its fresh initialization there.

    Any other shape difference is left in the result for the caller's shape check to report.
    Hand-written rather than imported: timm is not a dependency, and its rule is a few lines.

    Args:
        model: the model the weights are for (keys relative to it, as its `state_dict()`).
        state_dict: the pretrained weights.

    Returns:
        The adapted weights, and one sentence per adaptation for the log.
    """
    own = model.state_dict()
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    adapted = dict(state_dict)
    notes = []
    if convs:
        key = _key(convs[0], "weight")
        found, wanted = adapted.get(key), own.get(key)
        if found is not None and wanted is not None and found.dim() == 4 and found.shape[1] != wanted.shape[1]:
            if found.shape[0] == wanted.shape[0] and found.shape[2:] == wanted.shape[2:]:
                adapted[key] = _adapt_input_conv(found, wanted.shape[1])
                rule = "sum of the filters" if wanted.shape[1] == 1 else "filters repeated and rescaled"
                notes.append(
                    f"input conv {convs[0]!r} adapted from {found.shape[1]} to {wanted.shape[1]} channels ({rule})"
                )
    if linears:
        key = _key(linears[-1], "weight")
        found, wanted = adapted.get(key), own.get(key)
        if found is not None and wanted is not None and found.shape[0] != wanted.shape[0]:
            if found.shape[1:] == wanted.shape[1:]:
                adapted.pop(key)
                adapted.pop(_key(linears[-1], "bias"), None)
                notes.append(
                    f"classifier {linears[-1]!r} reset: {found.shape[0]} classes in the checkpoint, "
                    f"{wanted.shape[0]} here (freshly initialized)"
                )
    return adapted, notes


def _key(module_name: str, tensor: str) -> str:
    return f"{module_name}.{tensor}" if module_name else tensor


def _adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """timm's `adapt_input_conv` rule, for any checkpoint channel count."""
    dtype = weight.dtype
    weight = weight.float()
    if in_channels == 1:
        weight = weight.sum(dim=1, keepdim=True)
    else:
        repeats = -(-in_channels // weight.shape[1])  # ceil
        weight = weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)
    return weight.to(dtype)
