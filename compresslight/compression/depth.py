"""Depth pruning: a residual block becomes its shortcut.

At batch 1 on a CPU much of a small network's latency is per-layer overhead that no channel count
removes; removing a whole residual block removes that overhead too. A block computing
`relu(residual(x) + shortcut(x))` (the BasicBlock of `compresslight.models.resnet` and of the
option-A CIFAR ResNets) becomes `ShortcutBlock(shortcut)`, which computes `relu(shortcut(x))`:
exactly the block with its residual branch zeroed. The shortcut is the identity when shapes match,
the projection (1x1 conv + BN) or the option-A subsample-and-zero-pad when they do not, so the
output shape is always the block's.

`remove_blocks` returns a `BlockRemovalRecord` (the block names); `record.apply(fresh_model)`
replays it, so a checkpoint of a shallower model loads in any process. Parameters of the shortcut
keep their names (`layer2.0.shortcut.0.weight`), so optimizer state follows them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from compresslight.compression.record import CompressionRecord, register_record

__all__ = ["BlockRemovalRecord", "ShortcutBlock", "removable_blocks", "remove_blocks"]

# Attribute names a residual block's shortcut goes by: `shortcut` (CIFAR ResNets), `downsample`
# (torchvision's BasicBlock, None when it is the identity).
_SHORTCUT_ATTRIBUTES = ("shortcut", "downsample")


class ShortcutBlock(nn.Module):
    """What a removed residual block computes: `relu(shortcut(x))`.

    The ReLU keeps the block's output exact for any input (a ReLU of a post-ReLU identity is a
    no-op, but a projection's BN output is not non-negative).

    Args:
        shortcut: the removed block's shortcut module (identity, projection, zero-pad).
        removed: class name of the block this replaces (for `repr` and replay checks).
    """

    def __init__(self, shortcut: nn.Module, removed: str = "") -> None:
        super().__init__()
        self.shortcut = shortcut
        self.removed = removed

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.shortcut(x))

    def extra_repr(self) -> str:
        return f"removed={self.removed!r}"


def _shortcut_of(block: nn.Module) -> nn.Module | None:
    """The block's shortcut module (Identity for a `None` downsample), or None if not a residual block."""
    for attribute in _SHORTCUT_ATTRIBUTES:
        if hasattr(block, attribute):
            shortcut = getattr(block, attribute)
            if shortcut is None:
                return nn.Identity()
            if isinstance(shortcut, nn.Module):
                return shortcut
    return None


def removable_blocks(model: nn.Module) -> list[str]:
    """Names of the residual blocks `remove_blocks` can remove, in module order.

    A removable block has a shortcut (`shortcut` or `downsample` attribute), a residual branch of
    two convolutions (`conv1`, `conv2`) and a ReLU child (its output activation).
    """
    names = []
    for name, module in model.named_modules():
        if not name or isinstance(module, ShortcutBlock) or _shortcut_of(module) is None:
            continue
        convs = [getattr(module, attribute, None) for attribute in ("conv1", "conv2")]
        has_relu = any(isinstance(child, nn.ReLU) for child in module.children())
        if all(isinstance(conv, nn.Conv2d) for conv in convs) and has_relu:
            names.append(name)
    return names


@register_record
@dataclasses.dataclass
class BlockRemovalRecord(CompressionRecord):
    """Residual blocks replaced by their shortcuts.

    Attributes:
        blocks: dotted names of the removed blocks (relative to the record's target).
        module_types: block name -> class name, checked on replay.
    """

    kind: ClassVar[str] = "remove_blocks"

    blocks: list[str] = dataclasses.field(default_factory=list)
    module_types: dict[str, str] = dataclasses.field(default_factory=dict)

    def apply(self, model: nn.Module) -> None:
        """Replaces every recorded block of `model` by its `ShortcutBlock`.

        Raises:
            ValueError: if a block is missing, of another type or not removable; `model` is untouched.
        """
        removable = set(removable_blocks(model))
        named = dict(model.named_modules())
        for name in self.blocks:
            where = f"Cannot replay the block removal on {type(model).__name__}: block {name!r}"
            if name not in named:
                raise ValueError(f"{where} does not exist. Is this the architecture the record was made on?")
            found = type(named[name]).__name__
            if found != self.module_types.get(name):
                raise ValueError(f"{where} must be a {self.module_types.get(name)}, found {found}.")
            if name not in removable:
                raise ValueError(f"{where} is not a residual block with a shortcut (removable: {sorted(removable)}).")
        for name in self.blocks:  # all validated: nothing below can fail halfway
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            block = named[name]
            parent._modules[child] = ShortcutBlock(_shortcut_of(block), removed=type(block).__name__)


def remove_blocks(model: nn.Module, blocks: Sequence[str]) -> BlockRemovalRecord:
    """Replaces the named residual blocks of `model` by their shortcuts, in place.

    Args:
        model: the network, edited in place.
        blocks: names from `removable_blocks(model)`.

    Returns:
        The record; replay with `record.apply(fresh_model)`.

    Raises:
        ValueError: for an empty list, a repeated name or a name that is not a removable block;
            `model` is untouched.
    """
    if isinstance(blocks, str):
        raise ValueError(f"`blocks` must be a list of block names, got the string {blocks!r}.")
    blocks = list(blocks)
    if not blocks or len(set(blocks)) != len(blocks):
        raise ValueError(f"`blocks` must be a non-empty list of distinct block names, got {blocks!r}.")
    removable = removable_blocks(model)
    unknown = [name for name in blocks if name not in removable]
    if unknown:
        raise ValueError(f"`blocks` names {unknown}, which are not removable residual blocks; removable: {removable}.")
    named = dict(model.named_modules())
    record = BlockRemovalRecord(blocks=blocks, module_types={name: type(named[name]).__name__ for name in blocks})
    record.apply(model)
    return record
