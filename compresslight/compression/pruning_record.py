"""`PruningRecord`: the channels one structured pruning step kept, and its replay on a fresh model.

A checkpoint holds these records; loading replays them (shapes only) before the weights load.
Replay uses torch-pruning's low-level per-layer functions, so it needs no example input and no
dependency graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch_pruning as tp
from torch import nn
from torch_pruning import ops as tp_ops

from compresslight.compression.pruning_graph import CUSTOMIZED_PRUNERS, REPLAYABLE_KINDS
from compresslight.compression.record import CompressionRecord, register_record

__all__ = ["PruningRecord", "rollback_on_error"]


@register_record
@dataclasses.dataclass
class PruningRecord(CompressionRecord):
    """Channels kept by one structured pruning step, per layer whose shape changed.

    Indices refer to the model as it was before this step; several records (an iterative
    schedule) replay in order, each on the output of the previous one.

    Attributes:
        kept_out_channels: layer name -> kept output channels (BatchNorm features, depthwise
            conv channels: their inputs shrink with their outputs).
        kept_in_channels: layer name -> kept input channels (conv / linear inputs).
        module_types: layer name -> class name, checked on replay.
        original_out_channels: layer name -> output channels before the step, checked on replay.
        original_in_channels: layer name -> input channels before the step, checked on replay.
        settings: how the step was made (amount, ratios, norm, ...), for logs only.
    """

    kind: ClassVar[str] = "prune_channels"

    kept_out_channels: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    kept_in_channels: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    module_types: dict[str, str] = dataclasses.field(default_factory=dict)
    original_out_channels: dict[str, int] = dataclasses.field(default_factory=dict)
    original_in_channels: dict[str, int] = dataclasses.field(default_factory=dict)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        """Every layer this record changes, in first-seen order."""
        return list(dict.fromkeys([*self.kept_out_channels, *self.kept_in_channels]))

    def apply(self, model: nn.Module) -> None:
        """Removes the channels this record did not keep, on `model` (weights not required).

        Raises:
            ValueError: if a layer is missing, of another type or of another size than when the
                record was made (a different architecture, or records replayed out of order);
                `model` is left untouched.
        """
        modules = self._validate(model)
        with rollback_on_error(modules.values()):
            self._edit(modules)

    def parameter_index_map(self) -> dict[str, dict[int, list[int]]]:
        """For each parameter whose shape shrank: dim -> kept indices (to slice optimizer state).

        Conv weight: dim 0 output, dim 1 input (transposed conv: swapped; depthwise: dim 0
        only); Linear weight: dim 0 output, dim 1 input; biases, BatchNorm and PReLU weights:
        dim 0. BatchNorm running statistics are buffers and travel with the state dict. A
        `bias` entry for a layer built without one matches no parameter.
        """
        index_map: dict[str, dict[int, list[int]]] = {}
        for name in self.layer_names:
            prefix = f"{name}." if name else ""
            kept_out = self.kept_out_channels.get(name)
            kept_in = self.kept_in_channels.get(name)
            out_dim, in_dim = (1, 0) if self.module_types[name].startswith("ConvTranspose") else (0, 1)
            weight: dict[int, list[int]] = {}
            if kept_out is not None:
                weight[out_dim] = kept_out
                if self.module_types[name] != "PReLU":
                    index_map[prefix + "bias"] = {0: kept_out}
            if kept_in is not None:
                weight[in_dim] = kept_in
            index_map[prefix + "weight"] = weight
        return index_map

    def _validate(self, model: nn.Module) -> dict[str, nn.Module]:
        named = dict(model.named_modules())
        modules = {}
        for name in self.layer_names:
            where = f"Cannot replay the pruning record on {type(model).__name__}: layer {name!r}"
            if name not in named:
                raise ValueError(f"{where} does not exist. Is this the architecture the record was made on?")
            module = named[name]
            expected_type = self.module_types.get(name)
            if type(module).__name__ != expected_type:
                raise ValueError(f"{where} must be a {expected_type}, found {type(module).__name__}.")
            pruner = _replay_pruner(module)
            if pruner is None:
                raise ValueError(f"{where} ({type(module).__name__}) has no channels torch-pruning can remove.")
            out_side = ("output", self.kept_out_channels.get(name), self.original_out_channels, pruner.get_out_channels)
            in_side = ("input", self.kept_in_channels.get(name), self.original_in_channels, pruner.get_in_channels)
            for side, kept, originals, get_channels in (out_side, in_side):
                current = get_channels(module)
                if name in originals and current != originals[name]:
                    raise ValueError(
                        f"{where} must have {originals[name]} {side} channels (as when the record was made), "
                        f"found {current}. Are the records replayed in the order they were made?"
                    )
                if kept is None:
                    continue
                if not kept or list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= current:
                    raise ValueError(
                        f"{where}: kept {side} channels must be sorted unique indices in [0, {current}), "
                        f"got {len(kept)} indices."
                    )
            modules[name] = module
        return modules

    def _edit(self, modules: Mapping[str, nn.Module]) -> None:
        for name, module in modules.items():
            pruner = _replay_pruner(module)
            kept_out = self.kept_out_channels.get(name)
            kept_in = self.kept_in_channels.get(name)
            # torch-pruning makes new Parameters, trainable by default: keep frozen layers frozen.
            trainable = {key: p.requires_grad for key, p in module.named_parameters(recurse=False)}
            # torch-pruning's functions take the indices to remove, in the coordinates of the layer
            # as it is now; output and input are different weight dimensions, so order is free.
            if kept_out is not None:
                pruner.prune_out_channels(module, _complement(kept_out, pruner.get_out_channels(module)))
            if kept_in is not None:
                pruner.prune_in_channels(module, _complement(kept_in, pruner.get_in_channels(module)))
            for key, parameter in module.named_parameters(recurse=False):
                parameter.requires_grad_(trainable.get(key, True))


def _replay_pruner(module: nn.Module) -> tp.pruner.BasePruningFunc | None:
    if type(module) in CUSTOMIZED_PRUNERS:
        return CUSTOMIZED_PRUNERS[type(module)]
    kind = tp_ops.module2type(module)
    return tp.pruner.PrunerBox.get(kind) if kind in REPLAYABLE_KINDS else None


def _complement(kept: Sequence[int], size: int) -> list[int]:
    keep = set(kept)
    return [index for index in range(size) if index not in keep]


@contextlib.contextmanager
def rollback_on_error(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Restores the modules' attributes, parameters and buffers if the body raises.

    torch-pruning's functions replace parameters and shape attributes one layer at a time; an
    error midway (out of memory, a bug) must not leave a model with mismatched layers.
    """
    saved = [(module, dict(vars(module)), dict(module._parameters), dict(module._buffers)) for module in modules]
    try:
        yield
    except BaseException:
        for module, attributes, parameters, buffers in saved:
            module.__dict__.clear()
            module.__dict__.update(attributes)
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
        raise
