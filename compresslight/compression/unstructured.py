"""Unstructured magnitude pruning, for comparison (as Lightning's `ModelPruning`).

`prune_unstructured` masks single weights through `torch.nn.utils.prune`; shapes stay the same, so
it buys no speed without sparse kernels (paper 000). `make_pruning_permanent` and
`fold_pruning_masks` turn the masks back into plain weights.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.nn.utils import prune as torch_prune

from compresslight.compression.pruning_graph import ROOT_TYPES

log = logging.getLogger(__name__)

__all__ = [
    "check_fraction",
    "fold_pruning_masks",
    "make_pruning_permanent",
    "masked_parameters",
    "prune_unstructured",
    "sparsity",
]


def check_fraction(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")


def _weight_layers(model: nn.Module, layer_patterns: Sequence[str] | None) -> dict[str, nn.Module]:
    layers = {name: module for name, module in model.named_modules() if isinstance(module, ROOT_TYPES)}
    if layer_patterns is None:
        return layers
    if isinstance(layer_patterns, str):
        raise ValueError(f"`layer_patterns` must be a list of patterns, got the string {layer_patterns!r}.")
    selected: dict[str, nn.Module] = {}
    for pattern in layer_patterns:
        matched = {name: module for name, module in layers.items() if fnmatch.fnmatchcase(name, pattern)}
        if not matched:
            raise ValueError(
                f"`layer_patterns` pattern {pattern!r} matches no conv / linear layer; layers are {list(layers)}."
            )
        selected.update(matched)
    return selected


def prune_unstructured(
    model: nn.Module,
    amount: float,
    layer_patterns: Sequence[str] | None = None,
    global_pruning: bool = True,
) -> None:
    """Masks the smallest-magnitude weights of conv / linear layers (torch.nn.utils.prune).

    This is what Lightning's `ModelPruning` does: each weight becomes `weight_orig * weight_mask`,
    recomputed on every forward, so masked weights stay zero through training. Shapes do not
    change: dense kernels still multiply the zeros, so it buys no speed (and no memory, until
    stored sparse) without sparse kernels; paper 000 measured exactly that. Call
    `make_pruning_permanent` at the end to drop the masks.

    `amount` is the target fraction of masked weights, cumulative: calling again with a larger
    amount masks more (already masked weights count), a smaller one changes nothing. Ranking
    single weights by |w| is the same for every Lp norm, so there is no `norm` argument.

    Args:
        model: the network, edited in place (masks added).
        amount: target fraction of masked weights, in [0, 1).
        layer_patterns: glob patterns of the layers to mask (default: every conv and linear).
        global_pruning: rank all selected weights together (Lightning's default) instead of
            masking `amount` of each layer.

    Raises:
        ValueError: for an amount outside [0, 1) or a pattern matching no conv / linear layer.
    """
    check_fraction("amount", amount)
    layers = _weight_layers(model, layer_patterns)

    def masked_count(module: nn.Module) -> int:
        mask = getattr(module, "weight_mask", None)
        return 0 if mask is None else int((mask == 0).sum())

    # torch's pruning methods prune `amount` of the still-unmasked weights; an integer amount
    # (weights still to mask) turns that into the cumulative target.
    if global_pruning:
        total = sum(module.weight.numel() for module in layers.values())
        missing = round(amount * total) - sum(masked_count(module) for module in layers.values())
        if missing > 0:
            parameters = [(module, "weight") for module in layers.values()]
            torch_prune.global_unstructured(parameters, pruning_method=torch_prune.L1Unstructured, amount=missing)
    else:
        for module in layers.values():
            missing = round(amount * module.weight.numel()) - masked_count(module)
            if missing > 0:
                torch_prune.l1_unstructured(module, "weight", amount=missing)
    log.info("Unstructured pruning to %.1f%%: sparsity now %.4f.", 100 * amount, sparsity(model, layer_patterns))


def make_pruning_permanent(model: nn.Module) -> list[str]:
    """Folds every unstructured pruning mask into its weight and removes the mask and hook.

    The weight keeps its zeros and stays the same `nn.Parameter` object (optimizers keep working);
    the state dict returns to plain `weight` keys.

    Returns:
        The names of the parameters made permanent.
    """
    made_permanent = masked_parameters(model)
    for name in made_permanent:
        module_name, _, tensor_name = name.rpartition(".")
        torch_prune.remove(model.get_submodule(module_name), tensor_name)
    return made_permanent


def masked_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters under a `torch.nn.utils.prune` mask."""
    return [
        f"{name}.{hook._tensor_name}" if name else hook._tensor_name
        for name, module in model.named_modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, torch_prune.BasePruningMethod)
    ]


def sparsity(model: nn.Module, layer_patterns: Sequence[str] | None = None) -> float:
    """Fraction of exactly-zero weights in the conv / linear layers (masked or not).

    Raises:
        ValueError: for a pattern matching no conv / linear layer.
    """
    layers = _weight_layers(model, layer_patterns)
    total = sum(module.weight.numel() for module in layers.values())
    zeros = sum(int((module.weight == 0).sum()) for module in layers.values())
    return zeros / total if total else 0.0


# --- sensitivity analysis ----------------------------------------------------------------------


def fold_pruning_masks(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state dict with every `weight_orig` x `weight_mask` pair folded into a plain `weight`
    (loadable by a model without pruning hooks)."""
    folded = {}
    for key, value in state_dict.items():
        if key.endswith("_mask"):
            continue
        if key.endswith("_orig") and key[: -len("_orig")] + "_mask" in state_dict:
            base = key[: -len("_orig")]
            folded[base] = value * state_dict[base + "_mask"]
        else:
            folded[key] = value
    return folded
