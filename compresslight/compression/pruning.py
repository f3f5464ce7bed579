"""Structured filter pruning that physically removes channels (papers 000 and 002).

`prune_filters` ranks each layer's output channels by the L1 or L2 norm of their weights and
removes the weakest, so the layers really get narrower and faster on commodity hardware. It is
built on torch-pruning's dependency graph (`compression/pruning_graph.py`): layers whose channels
are coupled (the convolutions feeding one residual add, a convolution and its BatchNorm, the next
layer's inputs) are pruned together as one *group*. It returns a `PruningRecord`
(`compression/pruning_record.py`) holding the kept channel indices of every layer whose shape
changed; `record.apply(fresh_model)` replays the edit with torch-pruning's low-level pruning
functions, giving the same shapes (and, with the saved weights, the same outputs) in any process.

Beside it: the schedules that turn one target into steps (`compression/schedules.py`), unstructured
masks for comparison (`compression/unstructured.py`) and sensitivity analysis
(`compression/sensitivity.py`).

Layer patterns are `fnmatch` globs over `model.named_modules()` names, as in paper 002's
Distiller schedule: `layer1.*.conv1` selects the first convolution of every block of stage 1.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from compresslight.compression.pruning_graph import (
    CUSTOMIZED_PRUNERS,
    ROOT_TYPES,
    ExampleInputs,
    PruningStructure,
    analyze_structure,
    check_replayable,
    inputs_on,
    match_ignored,
    out_channels,
    traceable_copy,
)
from compresslight.compression.pruning_record import PruningRecord, rollback_on_error
from compresslight.compression.unstructured import check_fraction, masked_parameters

log = logging.getLogger(__name__)

__all__ = ["EmptiesLayerError", "PruningOptions", "match_ratios", "prune_filters"]


@dataclasses.dataclass(frozen=True)
class PruningOptions:
    """The validated arguments of `prune_filters` (see there); `PruningCallback` builds one in
    `__init__` so a bad argument fails before training.

    Raises:
        ValueError: for an amount / ratio outside [0, 1), a ratio key that is not a non-empty
            pattern, a norm other than 1 or 2, a bad `round_to` or `importance`, or
            `ignored_layers` given as one string.
    """

    amount: float | None = None
    ratios: Mapping[str, float] = dataclasses.field(default_factory=dict)
    norm: int = 2
    round_to: int | None = None
    ignored_layers: Sequence[str] = ()
    importance: Literal["group", "filter"] = "group"
    global_pruning: bool = False

    def __post_init__(self) -> None:
        check_fraction("amount", self.amount, allow_none=True)
        ratios = dict(self.ratios or {})
        for pattern, ratio in ratios.items():
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"`ratios` keys must be non-empty layer-name patterns, got {pattern!r}.")
            check_fraction(f"ratios[{pattern!r}]", ratio)
        if self.norm not in (1, 2) or isinstance(self.norm, bool):
            raise ValueError(f"`norm` must be 1 or 2, got {self.norm!r}.")
        if self.round_to is not None and (
            isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1
        ):
            raise ValueError(f"`round_to` must be None or an integer >= 1, got {self.round_to!r}.")
        if self.importance not in ("group", "filter"):
            raise ValueError(f"`importance` must be 'group' or 'filter', got {self.importance!r}.")
        if isinstance(self.ignored_layers, str):
            raise ValueError(f"`ignored_layers` must be a list of patterns, got the string {self.ignored_layers!r}.")
        object.__setattr__(self, "ratios", ratios)
        object.__setattr__(self, "ignored_layers", list(self.ignored_layers))

    @property
    def has_target(self) -> bool:
        """Whether these options prune anything (an `amount` or some `ratios`)."""
        return self.amount is not None or bool(self.ratios)

    def to_dict(self) -> dict[str, Any]:
        """The options as `prune_filters` keyword arguments (also the record's `settings`)."""
        return dataclasses.asdict(self)


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
    options = PruningOptions(amount, ratios or {}, norm, round_to, ignored_layers, importance, global_pruning)
    if not options.has_target:
        raise ValueError("Give `amount` (every layer) or `ratios` (layer patterns), got neither.")
    _refuse_masks(model)
    # torch-pruning traces and prunes a copy: `model` stays as it is until the record is known.
    work = traceable_copy(model)
    record = _prune_copy(work, inputs_on(work, example_inputs), options)
    record.settings = options.to_dict()
    _replay_on(model, record, work)
    return record


def _refuse_masks(model: nn.Module) -> None:
    masked = masked_parameters(model)
    if masked:
        raise ValueError(
            f"`model` holds unstructured pruning masks ({masked[:5]}); call `make_pruning_permanent(model)` "
            "before structured pruning."
        )


def _prune_copy(work: nn.Module, inputs: ExampleInputs, options: PruningOptions) -> PruningRecord:
    """Prunes `work` (a traceable copy) with torch-pruning, checked against the plan, and records it."""
    ignored = match_ignored(work, options.ignored_layers)
    structure = analyze_structure(work, inputs, ignored)
    explicit = match_ratios(options.ratios, structure.prunable)
    plans = _plan_groups(
        structure, explicit, options.amount or 0.0, options.round_to, check_kept=not options.global_pruning
    )
    pruner = _build_pruner(work, inputs, options, structure, explicit, ignored)
    record = _prune_and_record(pruner, structure.names)
    if not options.global_pruning:
        _check_plan(plans, {name: module for module, name in structure.names.items()})
    return record


def _build_pruner(
    work: nn.Module,
    inputs: ExampleInputs,
    options: PruningOptions,
    structure: PruningStructure,
    explicit: Mapping[str, tuple[str, float]],
    ignored: Sequence[nn.Module],
) -> tp.pruner.BasePruner:
    """torch-pruning's pruner for `options` on `work`; the output layers and ignored ones keep their channels."""
    by_name = {name: module for module, name in structure.names.items()}
    pattern_scopes: dict[str, list[nn.Module]] = {}
    for name, (pattern, _) in explicit.items():
        pattern_scopes.setdefault(pattern, []).append(by_name[name])
    # A tuple key shares its ratio among its layers: each its own ranking scope when local,
    # one joint scope when global (torch-pruning's semantics of `pruning_ratio_dict`).
    pruning_ratio_dict = {tuple(modules): options.ratios[pattern] for pattern, modules in pattern_scopes.items()}
    output_modules = [by_name[name] for name in structure.output_layers]
    with torch.enable_grad():  # the dependency graph is traced through autograd
        return tp.pruner.BasePruner(
            work,
            inputs,
            importance=tp.importance.MagnitudeImportance(
                p=options.norm, group_reduction="mean" if options.importance == "group" else "first"
            ),
            global_pruning=options.global_pruning,
            pruning_ratio=options.amount or 0.0,
            pruning_ratio_dict=pruning_ratio_dict,
            ignored_layers=[*ignored, *output_modules],
            round_to=options.round_to,
            # torch-pruning's default roots include nn.LSTM, whose hidden units records cannot replay.
            root_module_types=list(ROOT_TYPES),
            customized_pruners=CUSTOMIZED_PRUNERS,
        )


def _replay_on(model: nn.Module, record: PruningRecord, work: nn.Module) -> None:
    """Replays `record` on `model`, checked against torch-pruning's result `work`, rolled back on any error."""
    params_before = sum(p.numel() for p in model.parameters())
    modules = record._validate(model)
    with rollback_on_error(modules.values()):
        record._edit(modules)
        _check_same_shapes(model, work)
    log.info(
        "Pruned %d layers (%s): params %d -> %d.",
        len(record.layer_names),
        ", ".join(f"{k}={v}" for k, v in record.settings.items() if v not in (None, {}, [], False)),
        params_before,
        sum(p.numel() for p in model.parameters()),
    )


@dataclasses.dataclass
class _GroupPlan:
    """One torch-pruning group as `prune_filters` will prune it (local pruning)."""

    root: str
    ratio: float
    channels: int
    kept: int


def match_ratios(
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
    structure: PruningStructure,
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
        channels = out_channels(root)
        kept = int(channels * (1 - ratio))  # torch-pruning's count
        if round_to and kept < channels:
            kept -= kept % round_to
        if check_kept and ratio > 0 and kept < 1:
            raise EmptiesLayerError(
                f"Ratio {ratio!r}{f' with round_to={round_to}' if round_to else ''} would remove every one of the "
                f"{channels} channels of layer {structure.names[root]!r} (coupled: {member_names})."
            )
        plans.append(_GroupPlan(structure.names[root], ratio, channels, kept))
    return plans


class EmptiesLayerError(ValueError):
    """A ratio that would remove every channel of a layer (sensitivity analysis skips those)."""


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
        check_replayable(group, names, graph)
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


def _check_plan(plans: Sequence[_GroupPlan], by_name: Mapping[str, nn.Module]) -> None:
    for plan in plans:
        found = out_channels(by_name[plan.root])
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
