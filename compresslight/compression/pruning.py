"""Pruning: structured filter pruning that physically removes channels, and unstructured masks.

Structured (papers 000 and 002): `prune_filters` ranks each layer's output channels by the L1 or
L2 norm of their weights and removes the weakest, so the layers really get narrower and faster on
commodity hardware. It is built on torch-pruning's dependency graph: layers whose channels are
coupled (the convolutions feeding one residual add, a convolution and its BatchNorm, the next
layer's inputs) are pruned together as one *group*. It returns a `PruningRecord` holding the kept
channel indices of every layer whose shape changed; `record.apply(fresh_model)` replays the edit
with torch-pruning's low-level pruning functions, giving the same shapes (and, with the saved
weights, the same outputs) in any process.

Unstructured (for comparison, as Lightning's `ModelPruning`): `prune_unstructured` masks single
weights through `torch.nn.utils.prune`; shapes stay the same, so it buys no speed without sparse
kernels (paper 000).

Sensitivity (paper 002 grouped ResNet56 layers by it): `sensitivity_analysis` prunes each layer
or pattern group alone at several ratios, without retraining, and reports a metric per layer and
ratio.

Layer patterns are `fnmatch` globs over `model.named_modules()` names, as in paper 002's
Distiller schedule: `layer1.*.conv1` selects the first convolution of every block of stage 1.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch_pruning import ops as tp_ops

from compresslight.compression.record import CompressionRecord, register_record
from compresslight.models.resnet_a import ZeroPadShortcut

log = logging.getLogger(__name__)

__all__ = [
    "PruningRecord",
    "SensitivityReport",
    "SensitivityRow",
    "channel_summary",
    "make_pruning_permanent",
    "prunable_groups",
    "prunable_layers",
    "prune_filters",
    "prune_unstructured",
    "sensitivity_analysis",
    "sparsity",
]

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]

# The layer kinds a record can replay and map to parameter indices. torch-pruning knows more
# (LayerNorm, attention, LSTM, embeddings, bare nn.Parameters); a group touching one of those is
# refused before anything is edited, rather than recorded half.
_REPLAYABLE_KINDS = frozenset(
    {tp_ops.OPTYPE.CONV, tp_ops.OPTYPE.DEPTHWISE_CONV, tp_ops.OPTYPE.LINEAR, tp_ops.OPTYPE.BN, tp_ops.OPTYPE.PRELU}
)
# Layers that can be the root of a pruning group (whose output channels a ratio refers to).
_ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


# --- the record ------------------------------------------------------------------------------


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
        with _rollback_on_error(modules.values()):
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
    if type(module) in _CUSTOMIZED_PRUNERS:
        return _CUSTOMIZED_PRUNERS[type(module)]
    kind = tp_ops.module2type(module)
    return tp.pruner.PrunerBox.get(kind) if kind in _REPLAYABLE_KINDS else None


def _complement(kept: Sequence[int], size: int) -> list[int]:
    keep = set(kept)
    return [index for index in range(size) if index not in keep]


@contextlib.contextmanager
def _rollback_on_error(modules: Iterable[nn.Module]) -> Iterator[None]:
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


# --- parameter-free zero-pad shortcut (option-A ResNets) ---------------------------------------


class ZeroPadShortcutPruner(tp.pruner.BasePruningFunc):
    """torch-pruning handler for `ZeroPadShortcut`, which torch-pruning cannot trace through alone.

    The shortcut is treated like a 1x1 projection whose weight is a fixed 0/1 placement matrix:
    its output channels belong to the group of the stage it adds into (with that stage's
    `conv2`s and BatchNorms), its input channels to the group of the stage before. So removing
    a channel of a stage removes its output position here (dropping the input channel placed
    there, if any) and removing a channel of the previous stage stops forwarding it (its
    position becomes a zero channel). The stages stay separate groups, as with option-B
    projections, instead of one chain through every stage's identity channels.

    `prune_out_channels` / `prune_in_channels` are separate functions on purpose: torch-pruning
    couples a layer's inputs with its outputs only when they are the same function.
    """

    TARGET_MODULES = (ZeroPadShortcut,)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        removed = set(idxs)
        remaining = [position for position in range(layer.out_channels) if position not in removed]
        renumbered = {old: new for new, old in enumerate(remaining)}
        layer.set_placement([renumbered.get(position, -1) for position in layer.placement], len(remaining))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        removed = set(idxs)
        kept = [position for channel, position in enumerate(layer.placement) if channel not in removed]
        layer.set_placement(kept, layer.out_channels)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels


# Layers without weights that torch-pruning needs a handler for; passed to every dependency
# graph and pruner here, and used by `PruningRecord.apply` to replay their edits.
_CUSTOMIZED_PRUNERS: dict[type[nn.Module], tp.pruner.BasePruningFunc] = {ZeroPadShortcut: ZeroPadShortcutPruner()}


# --- structured filter pruning ---------------------------------------------------------------


@dataclasses.dataclass
class _GroupPlan:
    """One torch-pruning group as `prune_filters` will prune it (local pruning)."""

    root: str
    ratio: float
    channels: int
    kept: int


@dataclasses.dataclass
class _Structure:
    """What the dependency graph says about a model: which layers can be pruned, and together."""

    names: dict[nn.Module, str]
    output_layers: list[str]
    groups: list[tuple[nn.Module, list[nn.Module]]]  # root, members (output-channel side)

    @property
    def prunable(self) -> list[str]:
        found = {self.names[m] for _, members in self.groups for m in members if isinstance(m, _ROOT_TYPES)}
        return [name for name in self.names.values() if name in found]


def prunable_layers(model: nn.Module, example_inputs: ExampleInputs, ignored_layers: Sequence[str] = ()) -> list[str]:
    """Names of the layers `prune_filters` can prune (the names patterns are matched against).

    The layers producing the model's output and the `ignored_layers` patterns' modules keep
    their output channels, and so does every layer coupled to them.

    Raises:
        ValueError: for an `ignored_layers` pattern that matches no module.
    """
    work = _traceable_copy(model)
    ignored = _match_ignored(work, ignored_layers)
    return _analyze(work, _inputs_on(work, example_inputs), ignored).prunable


def prunable_groups(
    model: nn.Module, example_inputs: ExampleInputs, ignored_layers: Sequence[str] = ()
) -> list[list[str]]:
    """The prunable layers by coupled group, each group's root first (the layer whose width a
    ratio counts, as torch-pruning computes it).

    Schedules that turn one target into per-step ratios (`PruningCallback`) give one ratio per
    group, keyed by its root: per-layer ratios would differ between coupled layers of different
    widths (two 8-channel branches concatenated into a 16-channel residual add).

    Raises:
        ValueError: for an `ignored_layers` pattern that matches no module.
    """
    work = _traceable_copy(model)
    structure = _analyze(work, _inputs_on(work, example_inputs), _match_ignored(work, ignored_layers))
    groups = []
    for root, members in structure.groups:
        root_name = structure.names[root]
        others = [structure.names[m] for m in members if isinstance(m, _ROOT_TYPES) and m is not root]
        groups.append([root_name, *others])
    return groups


def prune_filters(
    model: nn.Module,
    amount: float | None = None,
    *,
    example_inputs: ExampleInputs,
    ratios: Mapping[str, float] | None = None,
    norm: int = 2,
    round_to: int | None = None,
    ignored_layers: Sequence[str] = (),
    importance: Literal["group", "filter"] = "group",
    global_pruning: bool = False,
) -> PruningRecord:
    """Removes the lowest-norm output channels of convolutions / linears, in place.

    Paper 000: `prune_filters(model, 0.25, norm=2, example_inputs=x)` removes 25% of every
    layer's filters by L2 norm (ResNet20: 272,474 -> 153,766 parameters). Paper 002's Distiller
    schedule: `ratios={"layer1.*.conv1": 0.7, ...}, norm=1`.

    Coupled layers: channels joined by a residual add (a ResNet stage's `conv2`s, its projection
    shortcut and the stem conv feeding it) or feeding a BatchNorm are one group and are removed
    together, ranked by the group's combined importance. A ratio given to any layer of a group
    applies to the whole group (the fraction of the group's channels removed); two different
    ratios within one group are an error. A block's `conv1` is coupled only to its own `bn1`
    and `conv2`'s inputs, so `layer1.*.conv1` prunes exactly the listed layers.

    The layers producing the model's output (the classifier) never lose output channels: they
    are found on the dependency graph (what the output tensor comes from), not by name.

    The model is never left half-edited: everything is validated first, torch-pruning prunes a
    deep copy (so it can fail or trace in eval mode without touching `model`), and the
    resulting record is replayed on `model`, rolled back on any error. Replaying the record is
    therefore exactly what a checkpoint load does.

    Args:
        model: the network to prune, edited in place.
        amount: fraction of output channels removed from every prunable layer (group), in
            [0, 1); with `ratios`, the default for layers no pattern matches (None: untouched).
        example_inputs: a batch (or tuple of inputs) for tracing; moved to `model`'s device.
        ratios: layer-name glob pattern -> fraction removed, in [0, 1), for the matching
            prunable layers; a later pattern overrides an earlier one for the same layer, and
            0 protects a layer from `amount`.
        norm: 1 or 2, the norm ranking channels (L1 as Distiller, L2 as paper 000).
        round_to: keep a multiple of this many channels per layer (hardware-friendly widths);
            None keeps `floor(channels * (1 - ratio))`.
        ignored_layers: glob patterns of modules whose output channels are kept, with every layer
            coupled to them (their inputs still follow a pruned layer before them).
        importance: "group" ranks a channel by the mean norm over all coupled layers
            (torch-pruning's default); "filter" by the group root's own filter norm only (Li et
            al., Distiller's L1RankedStructureParameterPruner).
        global_pruning: rank channels across all layers (with `amount`) or across each
            pattern's layers (with `ratios`) instead of per layer, so layers lose different
            fractions. torch-pruning then leaves a group intact rather than emptying it.

    Returns:
        The record of kept channels; replay it on a fresh model with `record.apply(model)`.

    Raises:
        ValueError: for an amount / ratio outside [0, 1), neither given, a norm other than 1 or
            2, a bad `round_to`, a pattern matching no (prunable) layer, two ratios on one
            coupled group, a ratio (with `round_to`) that would remove every channel of a
            layer, a model holding unstructured pruning masks, or a layer torch-pruning would
            touch that records cannot replay. `model` is untouched.
    """
    _check_ratio("amount", amount, allow_none=True)
    ratios = dict(ratios or {})
    for pattern, ratio in ratios.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"`ratios` keys must be non-empty layer-name patterns, got {pattern!r}.")
        _check_ratio(f"ratios[{pattern!r}]", ratio)
    if amount is None and not ratios:
        raise ValueError("Give `amount` (every layer) or `ratios` (layer patterns), got neither.")
    if norm not in (1, 2) or isinstance(norm, bool):
        raise ValueError(f"`norm` must be 1 or 2, got {norm!r}.")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"`round_to` must be None or an integer >= 1, got {round_to!r}.")
    if importance not in ("group", "filter"):
        raise ValueError(f"`importance` must be 'group' or 'filter', got {importance!r}.")
    masked = _masked_parameters(model)
    if masked:
        raise ValueError(
            f"`model` holds unstructured pruning masks ({masked[:5]}); call `make_pruning_permanent(model)` "
            "before structured pruning."
        )

    # torch-pruning traces and prunes a copy: `model` stays as it is until the record is known.
    work = _traceable_copy(model)
    inputs = _inputs_on(work, example_inputs)
    ignored = _match_ignored(work, ignored_layers)
    structure = _analyze(work, inputs, ignored)
    explicit = _match_ratios(ratios, structure.prunable)
    by_name = {name: module for module, name in structure.names.items()}
    plans = _plan_groups(structure, explicit, amount or 0.0, round_to, check_kept=not global_pruning)

    pattern_scopes: dict[str, list[nn.Module]] = {}
    for name, (pattern, _) in explicit.items():
        pattern_scopes.setdefault(pattern, []).append(by_name[name])
    # A tuple key shares its ratio among its layers: each its own ranking scope when local,
    # one joint scope when global (torch-pruning's semantics of `pruning_ratio_dict`).
    pruning_ratio_dict = {tuple(modules): ratios[pattern] for pattern, modules in pattern_scopes.items()}
    output_modules = [by_name[name] for name in structure.output_layers]
    with torch.enable_grad():  # the dependency graph is traced through autograd
        pruner = tp.pruner.BasePruner(
            work,
            inputs,
            importance=tp.importance.MagnitudeImportance(
                p=norm, group_reduction="mean" if importance == "group" else "first"
            ),
            global_pruning=global_pruning,
            pruning_ratio=amount or 0.0,
            pruning_ratio_dict=pruning_ratio_dict,
            ignored_layers=[*ignored, *output_modules],
            round_to=round_to,
            # torch-pruning's default roots include nn.LSTM, whose hidden units records cannot replay.
            root_module_types=list(_ROOT_TYPES),
            customized_pruners=_CUSTOMIZED_PRUNERS,
        )
    record = _prune_and_record(pruner, structure.names)
    if not global_pruning:
        _check_plan(plans, by_name)
    record.settings = {
        "amount": amount,
        "ratios": ratios,
        "norm": norm,
        "round_to": round_to,
        "ignored_layers": list(ignored_layers),
        "importance": importance,
        "global_pruning": global_pruning,
    }

    params_before = sum(p.numel() for p in model.parameters())
    modules = record._validate(model)
    with _rollback_on_error(modules.values()):
        record._edit(modules)
        _check_same_shapes(model, work)
    log.info(
        "Pruned %d layers (%s): params %d -> %d.",
        len(record.layer_names),
        ", ".join(f"{k}={v}" for k, v in record.settings.items() if v not in (None, {}, [], False)),
        params_before,
        sum(p.numel() for p in model.parameters()),
    )
    return record


def _check_ratio(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")


def _traceable_copy(model: nn.Module) -> nn.Module:
    # The dependency graph is traced through autograd: frozen layers would leave no trace.
    work = copy.deepcopy(model)
    for parameter in work.parameters():
        parameter.requires_grad_(True)
    return work


def _inputs_on(model: nn.Module, example_inputs: ExampleInputs) -> ExampleInputs:
    parameter = next(model.parameters(), None)
    if parameter is None or not isinstance(example_inputs, torch.Tensor):
        return example_inputs
    return example_inputs.to(parameter.device)


def _match_ignored(model: nn.Module, patterns: Sequence[str]) -> list[nn.Module]:
    if isinstance(patterns, str):
        raise ValueError(f"`ignored_layers` must be a list of patterns, got the string {patterns!r}.")
    named = dict(model.named_modules())
    modules = []
    for pattern in patterns:
        matched = [module for name, module in named.items() if name and fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            layers = [name for name, module in named.items() if isinstance(module, _ROOT_TYPES)]
            raise ValueError(f"`ignored_layers` pattern {pattern!r} matches no module; layers are {layers}.")
        modules.extend(matched)
    return modules


def _analyze(model: nn.Module, inputs: ExampleInputs, ignored: Sequence[nn.Module]) -> _Structure:
    """Traces `model` once and reads its prunable groups and output layers off the graph."""
    _check_recurrent_layers(model, inputs, ignored)
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=inputs, verbose=False, customized_pruners=_CUSTOMIZED_PRUNERS
        )
    names = {module: name for name, module in model.named_modules()}

    # The output comes from the graph's sink nodes (a layer, or a placeholder for a final
    # flatten / add / ...); walking back through non-root nodes finds the layers that produce it.
    output_modules: list[nn.Module] = []
    stack = [node for node in graph.module2node.values() if not node.outputs]
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if isinstance(node.module, _ROOT_TYPES):
            output_modules.append(node.module)
        else:
            stack.extend(node.inputs)

    excluded = [sub for module in [*ignored, *output_modules] for sub in module.modules()]
    groups = []
    for group in graph.get_all_groups(ignored_layers=excluded, root_module_types=list(_ROOT_TYPES)):
        members = [
            item.dep.target.module
            for item in group.items
            if isinstance(item.dep.target.module, nn.Module)
            and item.dep.target.module in names
            and graph.is_out_channel_pruning_fn(item.dep.handler)
        ]
        groups.append((group.items[0].dep.target.module, list(dict.fromkeys(members))))
    return _Structure(names=names, output_layers=[names[m] for m in output_modules], groups=groups)


def _match_ratios(
    ratios: Mapping[str, float], prunable: Sequence[str], argument: str = "ratios"
) -> dict[str, tuple[str, float]]:
    """Prunable layer name -> (pattern, ratio); later patterns override earlier ones."""
    explicit: dict[str, tuple[str, float]] = {}
    for pattern, ratio in ratios.items():
        matched = [name for name in prunable if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(
                f"`{argument}` pattern {pattern!r} matches no prunable layer; prunable layers are {list(prunable)}."
            )
        for name in matched:
            explicit.pop(name, None)  # re-insert so the overriding pattern's scope owns the layer
            explicit[name] = (pattern, float(ratio))
    return explicit


def _plan_groups(
    structure: _Structure,
    explicit: Mapping[str, tuple[str, float]],
    default: float,
    round_to: int | None,
    check_kept: bool = True,
) -> list[_GroupPlan]:
    """Each group's ratio and kept channels, computed as torch-pruning 1.6.1 will (local pruning).

    torch-pruning silently skips a group whose pruning would empty a layer; computing the
    result up front turns that into an error before anything is edited. Under global pruning
    the per-group counts are not known in advance (`check_kept=False`).
    """
    plans = []
    for root, members in structure.groups:
        member_names = [structure.names[m] for m in members]
        given = {name: explicit[name][1] for name in member_names if name in explicit}
        if len(set(given.values())) > 1:
            raise ValueError(
                f"Layers {sorted(given)} are coupled (they share channels, e.g. through a residual add) and "
                f"must be pruned together, but `ratios` gives them different ratios {given}."
            )
        ratio = next(iter(given.values())) if given else default
        channels = _out_channels(root)
        kept = int(channels * (1 - ratio))  # torch-pruning's count
        if round_to and kept < channels:
            kept -= kept % round_to
        if check_kept and ratio > 0 and kept < 1:
            raise _EmptiesLayerError(
                f"Ratio {ratio!r}{f' with round_to={round_to}' if round_to else ''} would remove every one of the "
                f"{channels} channels of layer {structure.names[root]!r} (coupled: {member_names})."
            )
        plans.append(_GroupPlan(structure.names[root], ratio, channels, kept))
    return plans


class _EmptiesLayerError(ValueError):
    """A ratio that would remove every channel of a layer (sensitivity analysis skips those)."""


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _prune_and_record(pruner: tp.pruner.BasePruner, names: Mapping[nn.Module, str]) -> PruningRecord:
    """Prunes the pruner's model group by group and composes the kept indices per layer.

    Each group's indices are in the coordinates of the layers as they are when it is pruned; a
    layer touched by two groups (e.g. inputs fed by a concatenation) composes both.
    """
    graph = pruner.DG
    present: dict[tuple[str, bool], list[int]] = {}  # (layer, is_output) -> original indices still there
    module_types: dict[str, str] = {}
    original_out: dict[str, int] = {}
    original_in: dict[str, int] = {}
    for group in pruner.step(interactive=True):
        _check_replayable(group, names, graph)
        for item in group.items:
            module = item.dep.target.module
            name = names.get(module)
            if name is None or not item.idxs:
                continue
            is_output = graph.is_out_channel_pruning_fn(item.dep.handler)
            function = graph.get_pruner_of_module(module)
            if function.get_out_channels(module) is None:
                continue  # e.g. a PReLU with one shared slope: nothing to remove
            if name not in module_types:
                module_types[name] = type(module).__name__
                original_out[name] = function.get_out_channels(module)
                if not isinstance(module, nn.modules.batchnorm._BatchNorm | nn.PReLU):
                    original_in[name] = function.get_in_channels(module)
            key = (name, is_output)
            if key not in present:
                present[key] = list(range(original_out[name] if is_output else original_in[name]))
            removed = set(item.idxs)
            present[key] = [index for position, index in enumerate(present[key]) if position not in removed]
        group.prune()
    kept_out = {name: kept for (name, out), kept in present.items() if out and len(kept) < original_out[name]}
    kept_in = {name: kept for (name, out), kept in present.items() if not out and len(kept) < original_in[name]}
    changed = set(kept_out) | set(kept_in)
    return PruningRecord(
        kept_out_channels=kept_out,
        kept_in_channels=kept_in,
        module_types={name: kind for name, kind in module_types.items() if name in changed},
        original_out_channels={name: n for name, n in original_out.items() if name in changed},
        original_in_channels={name: n for name, n in original_in.items() if name in changed},
    )


def _check_replayable(group: tp.dependency.Group, names: Mapping[nn.Module, str], graph: tp.DependencyGraph) -> None:
    """Refuses (on the copy, before `model` is edited) a group that records cannot replay.

    The fix named in the message depends on the side: a layer whose *outputs* would shrink (a
    LayerNorm in a ViT's residual stream) can be ignored itself; one whose *inputs* would shrink
    (an LSTM after a conv) only by ignoring a layer of the group (ignoring the LSTM leaves the
    conv's group as it is). Ignoring the group's root keeps the whole group's channels.
    """
    root = names.get(group.items[0].dep.target.module, "?")
    outputs: dict[str, str] = {}  # layer name -> description
    inputs: dict[str, str] = {}
    for item in group.items:
        target = item.dep.target
        if target.type == tp_ops.OPTYPE.PARAMETER:
            raise ValueError(
                f"Pruning the channels of {root!r} would change the bare parameter {target.name!r}, which pruning "
                f"records cannot replay; wrap it in a module or add {root!r} to `ignored_layers`."
            )
        module = target.module
        if module not in names or not item.idxs or type(module) in _CUSTOMIZED_PRUNERS:
            continue  # torch-pruning's placeholders for adds, reshapes, ...; our own parameter-free layers
        kind = tp_ops.module2type(module)
        grouped = isinstance(module, nn.modules.conv._ConvNd) and kind == tp_ops.OPTYPE.CONV and module.groups > 1
        is_output = graph.is_out_channel_pruning_fn(item.dep.handler)
        if kind not in _REPLAYABLE_KINDS or grouped:
            described = f"{names[module]!r} ({type(module).__name__}{', grouped' if grouped else ''})"
            (outputs if is_output else inputs)[names[module]] = described
        elif is_output and isinstance(module, nn.Linear):
            _check_not_split_into_heads(module, names[module], graph)
    if outputs or inputs:
        changed = [f"the output channels of {', '.join(outputs.values())}"] if outputs else []
        changed += [f"the input channels of {', '.join(inputs.values())}"] if inputs else []
        fix = f"add {root!r} to `ignored_layers` (it keeps the channels of every layer coupled to it)"
        if outputs and not inputs:
            fix += f", or the layers {list(outputs)}"
        raise ValueError(
            f"Pruning the channels of {root!r} would change {' and '.join(changed)}, which pruning records "
            f"cannot replay; {fix}."
        )


def _check_not_split_into_heads(module: nn.Linear, name: str, graph: tp.DependencyGraph) -> None:
    """Refuses pruning a linear whose output is reshaped next, as attention's q/k/v projections are.

    Removing single channels there regroups the heads (4 heads of 8 become 3 of the wrong width, or
    a shape error), and the attention module's head count is a plain attribute records cannot
    change. torch-pruning can prune whole heads (`num_heads`), but only with that attribute edited
    by model-specific code; ignoring the projection keeps the heads whole and prunes the rest.
    """
    node = graph.module2node.get(module)
    if node is not None and any(isinstance(out.module, tp_ops._ReshapeOp) for out in node.outputs):
        raise ValueError(
            f"Pruning would remove output channels of layer {name!r} (Linear), whose output is reshaped next "
            "(e.g. split into attention heads): that regroups the heads, and pruning records cannot change the "
            f"attention module's head count. Add {name!r} (and the other q/k/v projections) to `ignored_layers`; "
            "the rest of the model (e.g. the MLP hidden layers) is still pruned."
        )


def _check_recurrent_layers(model: nn.Module, inputs: ExampleInputs, ignored: Sequence[nn.Module]) -> None:
    """Refuses, before tracing, GRU / RNN layers fed by a prunable layer.

    torch-pruning traces nn.LSTM, but not nn.GRU or nn.RNN: a conv feeding one makes its
    dependency graph fail with a bare `IndexError`. The conv (or linear) feeding the recurrent
    layer must keep its channels; those are found by walking the autograd graph back from the
    recurrent layer's input to the nearest conv / linear output.
    """
    names = {module: name for name, module in model.named_modules()}
    # Ignoring the recurrent layer itself does not help: the failure is in its feeder's group.
    recurrent = [m for m in names if isinstance(m, (nn.GRU, nn.RNN))]
    if not recurrent:
        return
    produced_by: dict[Any, str] = {}  # grad_fn of a conv / linear output -> layer name
    feeders: dict[str, list[str]] = {}
    handles = []

    def record_output(module: nn.Module, _: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            produced_by[output.grad_fn] = names[module]

    def find_feeders(module: nn.Module, args: tuple[Any, ...]) -> None:
        stack = [a.grad_fn for a in args if isinstance(a, torch.Tensor) and a.grad_fn is not None]
        found, seen = [], set()
        while stack:
            function = stack.pop()
            if function is None or function in seen:
                continue
            seen.add(function)
            if function in produced_by:
                found.append(produced_by[function])
            else:
                stack.extend(next_function for next_function, _ in function.next_functions)
        feeders[names[module]] = sorted(set(found))

    for module in names:
        if isinstance(module, _ROOT_TYPES):
            handles.append(module.register_forward_hook(record_output))
        elif module in recurrent:
            handles.append(module.register_forward_pre_hook(find_feeders))
    try:
        with torch.enable_grad():
            model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    ignored_names = {names[m] for m in ignored if m in names}
    for rnn_name, layers in feeders.items():
        missing = [layer for layer in layers if layer not in ignored_names]
        if missing:
            rnn = model.get_submodule(rnn_name)
            raise ValueError(
                f"Layer {rnn_name!r} ({type(rnn).__name__}) is a recurrent layer torch-pruning cannot trace, fed by "
                f"{missing}: those must keep their output channels. Add {missing} to `ignored_layers`."
            )


def _check_plan(plans: Sequence[_GroupPlan], by_name: Mapping[str, nn.Module]) -> None:
    for plan in plans:
        found = _out_channels(by_name[plan.root])
        if found != plan.kept:
            raise RuntimeError(
                f"torch-pruning left layer {plan.root!r} with {found} of {plan.channels} channels, expected "
                f"{plan.kept} (ratio {plan.ratio}); the model was not changed."
            )


def _check_same_shapes(model: nn.Module, reference: nn.Module) -> None:
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if found != expected:
        diff = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
        raise RuntimeError(f"Replaying the pruning record did not reproduce torch-pruning's shapes for {diff[:10]}.")


def channel_summary(model: nn.Module) -> dict[str, int]:
    """Output channels of every convolution and linear layer, by name (for before/after logs)."""
    return {name: _out_channels(module) for name, module in model.named_modules() if isinstance(module, _ROOT_TYPES)}


# --- unstructured magnitude pruning ------------------------------------------------------------


def _weight_layers(model: nn.Module, layer_patterns: Sequence[str] | None) -> dict[str, nn.Module]:
    layers = {name: module for name, module in model.named_modules() if isinstance(module, _ROOT_TYPES)}
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
    _check_ratio("amount", amount)
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
    made_permanent = _masked_parameters(model)
    for name in made_permanent:
        module_name, _, tensor_name = name.rpartition(".")
        torch_prune.remove(model.get_submodule(module_name), tensor_name)
    return made_permanent


def _masked_parameters(model: nn.Module) -> list[str]:
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


@dataclasses.dataclass
class SensitivityRow:
    """One pruned copy: `layer` (a layer or pattern) pruned alone by `ratio`."""

    layer: str
    ratio: float
    metric: float
    params: int


@dataclasses.dataclass
class SensitivityReport:
    """The metric of the model with each layer (or group) pruned alone, per ratio."""

    baseline_metric: float
    baseline_params: int
    rows: list[SensitivityRow]
    metric_name: str = "metric"
    norm: int = 2

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(row.layer for row in self.rows))

    @property
    def ratios(self) -> list[float]:
        return sorted({row.ratio for row in self.rows})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_markdown(self) -> str:
        """A table: one row per layer, one column per ratio, cells = metric."""
        ratios = self.ratios
        cells = {(row.layer, row.ratio): row.metric for row in self.rows}
        lines = [
            f"Sensitivity (L{self.norm} filter pruning, no retraining): {self.metric_name} with each layer (group) "
            "pruned alone; "
            f"unpruned {self.baseline_metric:.4g} ({self.baseline_params:,} params).",
            "",
            "| layer | " + " | ".join(f"{ratio:g}" for ratio in ratios) + " |",
            "|---|" + "---|" * len(ratios),
        ]
        for layer in self.layers:
            values = [f"{cells[layer, r]:.4g}" if (layer, r) in cells else "-" for r in ratios]
            lines.append(f"| {layer} | " + " | ".join(values) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """Writes one curve per layer (metric vs ratio) and the unpruned metric to `path`."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure, axes = plt.subplots(figsize=(8, 5))
        for layer in self.layers:
            rows = sorted((row for row in self.rows if row.layer == layer), key=lambda row: row.ratio)
            axes.plot([row.ratio for row in rows], [row.metric for row in rows], marker="o", label=layer)
        axes.axhline(self.baseline_metric, color="black", linestyle="--", label="unpruned")
        axes.set_xlabel("fraction of channels removed")
        axes.set_ylabel(self.metric_name)
        axes.set_title(f"Pruning sensitivity (L{self.norm}, no retraining)")
        axes.legend(fontsize="small", ncol=max(1, math.ceil(len(self.layers) / 12)), loc="best")
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)
        return path


def sensitivity_analysis(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    example_inputs: ExampleInputs,
    layer_patterns: Sequence[str] | None = None,
    ratios: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    norm: int = 2,
    metric_name: str = "metric",
) -> SensitivityReport:
    """Prunes each layer (or each pattern's layers) alone on a copy, per ratio, and evaluates it.

    No retraining: this measures how much each layer's channels matter, to choose per-layer
    ratios (paper 002 grouped ResNet56's layers by it). `model` is never edited; each
    evaluation gets a fresh pruned deep copy.

    Args:
        model: the trained network.
        evaluate: returns the metric (e.g. validation top-1) of a model it is given.
        example_inputs: a batch for tracing.
        layer_patterns: the units to prune, each a glob pattern pruned as one (`layer1.*.conv1`);
            default: every prunable layer, one per coupled group (a residual stage's coupled
            layers are named by its first layer).
        ratios: fractions removed, each in (0, 1). A ratio that would empty a layer is skipped
            (logged).
        norm: 1 or 2, the channel-ranking norm.
        metric_name: the metric's name in the table and plot.

    Raises:
        ValueError: for a ratio outside (0, 1), a norm other than 1 or 2, a pattern matching no
            prunable layer, or a model holding unstructured pruning masks.
    """
    if not ratios:
        raise ValueError("`ratios` must hold at least one ratio, got none.")
    for ratio in ratios:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ValueError(f"`ratios` must each be in (0, 1), got {ratio!r}.")
    if norm not in (1, 2) or isinstance(norm, bool):
        raise ValueError(f"`norm` must be 1 or 2, got {norm!r}.")
    if _masked_parameters(model):
        raise ValueError("`model` holds unstructured pruning masks; call `make_pruning_permanent(model)` first.")

    work = _traceable_copy(model)
    structure = _analyze(work, _inputs_on(work, example_inputs), [])
    if layer_patterns is None:
        # One unit per coupled group (pruning any of its layers prunes all), named by its first
        # convolution / linear in module order.
        order = {name: position for position, name in enumerate(structure.names.values())}
        units = []
        for _, members in structure.groups:
            layers = [structure.names[m] for m in members if isinstance(m, _ROOT_TYPES)]
            if layers:
                units.append(min(layers, key=order.__getitem__))
        units.sort(key=order.__getitem__)
    else:
        if isinstance(layer_patterns, str):
            raise ValueError(f"`layer_patterns` must be a list of patterns, got the string {layer_patterns!r}.")
        _match_ratios({pattern: 0.0 for pattern in layer_patterns}, structure.prunable, "layer_patterns")
        units = list(layer_patterns)

    baseline = float(evaluate(copy.deepcopy(model)))
    rows = []
    for unit in units:
        for ratio in ratios:
            pruned = copy.deepcopy(model)
            try:
                prune_filters(pruned, ratios={unit: ratio}, norm=norm, example_inputs=example_inputs)
            except _EmptiesLayerError as error:
                log.warning("Sensitivity: skipping %s at ratio %g: %s", unit, ratio, error)
                continue
            metric = float(evaluate(pruned))
            rows.append(SensitivityRow(unit, float(ratio), metric, sum(p.numel() for p in pruned.parameters())))
            log.info("Sensitivity: %s pruned by %g -> %s %.4g.", unit, ratio, metric_name, metric)
    return SensitivityReport(
        baseline_metric=baseline,
        baseline_params=sum(p.numel() for p in model.parameters()),
        rows=rows,
        metric_name=metric_name,
        norm=norm,
    )
