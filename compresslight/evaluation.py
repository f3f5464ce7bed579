"""Accuracy of models on batches: the one top-1 loop the commands, callbacks and benchmarks share."""

from __future__ import annotations

from itertools import islice
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn


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
                predictions = model(images).argmax(dim=-1)
                correct[name] += int((predictions == targets.to(predictions.device)).sum())
            total += len(targets)
    if total == 0:
        raise ValueError("`batches` is empty: nothing to evaluate.")
    return {name: count / total for name, count in correct.items()}


def validation_batches(datamodule: Any, limit_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The datamodule's validation batches as the model sees them (evaluation transform applied)."""
    datamodule.setup("validate")
    for batch in islice(datamodule.val_dataloader(), limit_batches):
        yield datamodule.on_after_batch_transfer(batch, 0)
