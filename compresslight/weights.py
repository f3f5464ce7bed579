"""Reading weights from a file safely, and fitting pretrained weights to a model.

Every checkpoint is read with `torch.load(..., weights_only=True)`: unpickling a file from
elsewhere can run arbitrary code, and everything compresslight writes into a checkpoint (tensors,
plain hyperparameters, records as dicts) loads without that risk. `weights_only=False` is the
explicit, logged opt-in for a file you trust that holds other objects.

`adapt_pretrained_weights` fits weights trained with another input-channel or class count (an
ImageNet checkpoint for grayscale Steelpatch) to a model: `create_model(..., weights=...)` and
`ImageClassifier(init_from=...)` use it. Plain torch: this module knows nothing of compression
records (`checkpoint.py` does), so the model registry can use it without importing them.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
from torch import nn

# The logger keeps the name it had when this code lived in `checkpoint.py`: users filter on it.
log = logging.getLogger("compresslight.checkpoint")

M = TypeVar("M", bound=nn.Module)

#: Key every Lightning checkpoint holds; plain (third-party) state dicts do not.
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"


def read_checkpoint(path: str | Path, weights_only: bool = True) -> dict[str, Any]:
    """Loads a Lightning checkpoint on the CPU, running no code from the file.

    Args:
        path: the checkpoint file.
        weights_only: keep True. False unpickles any object, which can run arbitrary code from the
            file: only for a file you trust that holds objects other than tensors and plain data.

    Raises:
        FileNotFoundError: if `path` is not a file.
        ValueError: if it is truncated or corrupt, holds objects a weights-only load refuses, or is
            not a Lightning checkpoint; the message names the file.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist.")
    if not weights_only:
        warn_unsafe_load(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:
        raise checkpoint_load_error(path, error) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict').")
    return checkpoint


def read_model_weights(path: str | Path, prefix: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(checkpoint, model weights) of an `ImageClassifier` checkpoint (its `model.*` weights, keys
    relative to the model), or ({}, the weights) of a plain state dict of the model, as torchvision
    publishes its ImageNet weights.

    Args:
        path: the file.
        prefix: None to tell the two kinds apart from the file; a string for a plain state dict whose
            keys all carry it (see `read_state_dict`).

    Raises:
        FileNotFoundError: if `path` is not a file.
        ValueError: if it is neither.
    """
    if prefix is not None:
        return {}, read_state_dict(path, prefix)
    try:
        checkpoint = read_checkpoint(path)
    except UnsafeCheckpointError:
        raise
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


def read_state_dict(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Reads a plain (third-party) state dict, weights-only, and strips `prefix` from its keys.

    Accepts a file holding the state dict itself or a dict with it under `"state_dict"`, as
    `akamaster/pytorch_resnet_cifar10` publishes (`{"best_prec1": ..., "state_dict": {...}}`).

    Args:
        path: the weights file.
        prefix: removed from the start of every key (`"module."` for weights saved from
            `nn.DataParallel`); every key must carry it.

    Raises:
        FileNotFoundError: if `path` is not a file.
        ValueError: if the file is unreadable, holds objects a weights-only load refuses, is a
            Lightning checkpoint or holds no state dict, or a key lacks `prefix` (some are listed).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"Weights file {str(path)!r} does not exist.")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise checkpoint_load_error(path, error) from error
    if isinstance(content, dict) and LIGHTNING_VERSION_KEY in content:
        raise ValueError(
            f"{str(path)!r} is a Lightning checkpoint, not a plain state dict: give it to `init_from` without "
            "`init_from_prefix`."
        )
    state = content.get("state_dict", content) if isinstance(content, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = sorted(map(str, content))[:8] if isinstance(content, dict) else type(content).__name__
        raise ValueError(
            f"{str(path)!r} must hold a state dict (name -> tensor), or one under 'state_dict'; found {found}."
        )
    unprefixed = [key for key in state if not key.startswith(prefix)]
    if unprefixed:
        raise ValueError(
            f"`init_from_prefix` {prefix!r} must start every key of {str(path)!r}, but {len(unprefixed)} do not "
            f"(e.g. {unprefixed[:3]}); keys look like {list(state)[:3]}."
        )
    return {key[len(prefix) :]: value for key, value in state.items()}


def check_weights_fit(
    model: nn.Module, weights: Mapping[str, torch.Tensor], adapted: Mapping[str, torch.Tensor], source: str
) -> None:
    """Refuses weights that do not fit `model` exactly, listing every difference kind.

    Args:
        model: the model the weights are for.
        weights: the weights as read (keys relative to `model`).
        adapted: `adapt_pretrained_weights`'s result; tensors it left out (a reset classifier) may
            be missing.
        source: where the weights came from, for the message.

    Raises:
        ValueError: if a tensor has another shape, the weights have tensors the model lacks, or the
            model has tensors they lack (BatchNorm's `num_batches_tracked` may be missing: files
            from older torch versions lack it and BatchNorm fills it in).
    """
    reset = set(weights) - set(adapted)
    own = model.state_dict()
    problems = [
        *(f"{key}: {tuple(value.shape)} in the file vs {tuple(own[key].shape)} here"
          for key, value in adapted.items() if key in own and own[key].shape != value.shape),
        *(f"{key}: not in the model" for key in adapted if key not in own),
        *(f"{key}: not in the file" for key in own
          if key not in adapted and key not in reset and not key.endswith("num_batches_tracked")),
    ]  # fmt: skip
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise ValueError(f"The weights in {source} do not fit {type(model).__name__}: {shown}.")


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
    check_weights_fit(model, weights, adapted, source=repr(str(path)))
    model.load_state_dict(adapted, strict=False)
    for note in notes:
        log.info("Weights from %s: %s.", path, note)
    return model


def warn_unsafe_load(path: str | Path | IO) -> None:
    """Logs the opt-in to a full unpickling: it must never happen unnoticed."""
    log.warning(
        "Loading checkpoint %r with weights_only=False: unpickling it can run arbitrary code from the file. "
        "Do this only for a file you trust.",
        str(path),
    )


def checkpoint_load_error(path: str | Path | IO, error: Exception) -> Exception:
    """The error to raise for a `torch.load` failure: the file named and the cause in words.

    Returns `error` itself when it is not a load failure this knows (e.g. out of memory).
    """
    if isinstance(error, pickle.UnpicklingError) and "weights only load failed" in str(error).lower():
        return UnsafeCheckpointError(
            f"Checkpoint {str(path)!r} holds objects that a weights-only load refuses ({_refused_object(error)}): "
            "unpickling it could run code from the file, so it is not loaded. Checkpoints compresslight writes load "
            "weights-only; if you trust this file, load it with `weights_only=False` (`read_checkpoint`, "
            "`load_compressed_checkpoint`, `ImageClassifier.load_from_checkpoint`)."
        )
    truncated = (
        isinstance(error, (EOFError, zipfile.BadZipFile, pickle.UnpicklingError))
        or (isinstance(error, RuntimeError) and any(text in str(error) for text in _CORRUPT_ZIP_MESSAGES))
    )  # fmt: skip
    if truncated:
        return ValueError(
            f"Checkpoint {str(path)!r} is truncated or corrupt and cannot be read ({type(error).__name__}: "
            f"{str(error).split('. ')[0] or 'no detail'}). Was its save interrupted "
            "(disk full, killed process)? Use an earlier checkpoint."
        )
    return error


class UnsafeCheckpointError(ValueError):
    """A checkpoint whose unpickling could run code: refused by the weights-only load."""


# What torch's zip reader says about a file cut short or damaged.
_CORRUPT_ZIP_MESSAGES = ("PytorchStreamReader", "zip archive", "failed finding central directory")


def _refused_object(error: Exception) -> str:
    """The line of torch's ~10-line refusal that names what it refused."""
    lines = [line.strip() for line in str(error).splitlines() if "unsupported global" in line.lower()]
    return lines[0].rstrip(".") if lines else "see torch.load's weights_only documentation"


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
