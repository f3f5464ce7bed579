"""Accuracy of models on batches: the one top-1 loop the commands, callbacks and benchmarks share,
and the one way to read logits from a model's output (`logits_of`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import torch
from torch import nn


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor, the `logits` of a dict or of a Hugging Face
    `ModelOutput`, or the first element of a tuple / list (HF's `return_dict=False`).

    Raises:
        TypeError: for any other output, naming what was found.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        keys = f" with keys {list(output)}" if isinstance(output, Mapping) else ""
        raise TypeError(
            "The model's output must be logits: a tensor, a tuple / list starting with them, or a dict / "
            f"ModelOutput with a `logits` entry; got {type(output).__name__}{keys}."
        )
    return logits


class LogitsOutput(nn.Module):
    """`model` with its output reduced to the logits (`logits_of`): what ONNX export, int8
    quantization and latency loops need from a model returning a `ModelOutput`, tuple or dict."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(inputs))


def evaluate_top1(
    models: Mapping[str, nn.Module], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, float]:
    """Top-1 accuracy of several models over the same batches, in one pass over them.

    Args:
        models: name -> model, already in eval mode; each gets the inputs on the batch's device
            (`OnnxRuntimeModel` moves them to the CPU itself).
        batches: (inputs, targets) pairs.

    Returns:
        name -> fraction of correct top-1 predictions.

    Raises:
        ValueError: if `batches` is empty.
    """
    correct = dict.fromkeys(models, 0)
    total = 0
    with torch.inference_mode():
        for images, targets in batches:
            for name, model in models.items():
                predictions = logits_of(model(images)).argmax(dim=-1)
                correct[name] += int((predictions == targets.to(predictions.device)).sum())
            total += len(targets)
    if total == 0:
        raise ValueError("`batches` is empty: nothing to evaluate.")
    return {name: count / total for name, count in correct.items()}


def validation_batches(
    datamodule: Any, limit_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The datamodule's validation batches as the model sees them (evaluation transform applied)."""
    datamodule.setup("validate")
    for batch in islice(datamodule.val_dataloader(), limit_batches):
        yield datamodule.on_after_batch_transfer(batch, 0)
