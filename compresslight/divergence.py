"""Non-finite values in a loss, a model or a checkpoint: the signs that training diverged.

Pure functions; the compression callbacks call them through `DivergenceGuard`
(`compresslight.callbacks.structural_edit`) at every training step, before every edit and before
every checkpoint save, so a diverged fit stops with `TrainingDivergedError` instead of running to
the end with NaN weights or writing them over the last good checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["TrainingDivergedError", "describe_nonfinite", "loss_value", "nonfinite_tensors"]


class TrainingDivergedError(FloatingPointError):
    """Training produced a non-finite loss or non-finite weights."""


def loss_value(outputs: Any) -> torch.Tensor | None:
    """The loss in what a `training_step` returned (a tensor, or a mapping with "loss"); None if none."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"]
    return None


def is_finite(value: torch.Tensor) -> bool:
    """Whether every element is finite (one device-to-host sync)."""
    return bool(torch.isfinite(value.detach()).all())


def nonfinite_tensors(named_tensors: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity (others are skipped)."""
    return [
        name
        for name, tensor in named_tensors
        if isinstance(tensor, torch.Tensor)
        and (tensor.is_floating_point() or tensor.is_complex())
        and tensor.numel()
        and not is_finite(tensor)
    ]


def describe_nonfinite(names: list[str], shown: int = 5) -> str:
    """`a, b, c, ... (12 in all)`: a message that stays short on a large model."""
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def format_loss(value: torch.Tensor) -> str:
    """`nan`, `inf` or `-inf`: the loss as a number (the mean of a loss that is not a scalar)."""
    return str(float(value.detach().float().mean())) if value.numel() else "empty"
