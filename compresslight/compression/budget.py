"""Latency-budget pruning: choose every group's kept channels (and which residual blocks to remove)
to keep the most importance under a predicted latency budget.

The problem (`BudgetProblem`): torch-pruning's dependency groups (channels that must go together),
each with per-channel importance (group L2: torch-pruning's `MagnitudeImportance`, p=2, summed
over the group's layers, so a residual-stream channel that feeds many layers weighs more) and a
set of candidate widths (the latency table's grid). The network's predicted latency is a sum over
layers of `LatencyTable` entries at (input width, output width), plus block overheads and the
rest. A group that is the inside of a residual block (its `conv1` outputs and `conv2` inputs) may
also go to 0 channels: the block becomes its shortcut (`depth.remove_blocks`), which removes its
layers and their per-layer overhead, priced by the same table.

Two solvers (`allocate`):

- `"dp"` (HALP-style, exact on the table up to the latency discretisation): a layer's cost
  depends on two groups, so the groups that couple many others (a ResNet's residual-stream
  groups) are enumerated over their candidates, and for each choice the remaining groups are
  independent: a multiple-choice knapsack solved by dynamic programming over latency
  discretised in `resolution` bins (costs rounded *up*, so the answer is feasible). Used when
  the enumeration is at most `max_combinations` choices.
- `"greedy"`: from the current widths, repeatedly take the step down (to the next candidate that
  is faster on the table) that loses the least importance per second saved, until within the
  budget; then add back steps that still fit. Priced exactly (both widths of every layer).

`"auto"` runs the DP when it is small enough and the greedy otherwise. Candidate widths that are
no faster than a wider candidate are never chosen (they keep less importance for no time): that
is how the table's fast channel counts are preferred.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from compresslight.compression.depth import removable_blocks
from compresslight.compression.latency_table import LatencyTable, _widths

# The helpers with which `prune_filters` traces a model, and its torch-pruning handlers (the option-A
# zero-pad shortcut): the allocation must see exactly the groups `prune_filters` will prune.
from compresslight.compression.pruning_graph import (
    CUSTOMIZED_PRUNERS,
    analyze_structure,
    inputs_on,
    match_ignored,
    traceable_copy,
)

log = logging.getLogger(__name__)

__all__ = ["Allocation", "BudgetProblem", "ChannelGroup", "LayerCoupling", "allocate", "step_ratios"]

METHODS = ("auto", "dp", "greedy")


@dataclasses.dataclass
class ChannelGroup:
    """Channels that are pruned together.

    Attributes:
        name: the group's first output layer (module order).
        out_layers: layers whose output channels are the group's (conv / linear; BN follow).
        in_layers: layers whose input channels are the group's.
        channels: current width.
        scores: per-channel importance, descending.
        candidates: widths the allocation may choose, ascending, ending at `channels`; 0 first
            if the group is a removable block's inside.
        block: that block's name, or None.
    """

    name: str
    out_layers: list[str]
    in_layers: list[str]
    channels: int
    scores: list[float]
    candidates: list[int]
    block: str | None = None

    def importance(self, kept: int) -> float:
        """Importance kept with the `kept` most important channels."""
        return float(sum(self.scores[:kept]))


@dataclasses.dataclass
class LayerCoupling:
    """Which groups set a layer's widths (None: fixed at `in_channels` / `out_channels`)."""

    in_group: str | None
    out_group: str | None
    in_channels: int
    out_channels: int


@dataclasses.dataclass
class Allocation:
    """The chosen widths.

    Attributes:
        kept: group name -> kept channels (0: its block is removed).
        removed_blocks: blocks replaced by their shortcuts.
        group_layers: group name -> its output layers (to find a surviving one for `prune_filters`).
        predicted_s: predicted network latency.
        budget_s: the budget it was chosen for.
        importance_kept: importance of the kept channels.
        importance_total: importance of all current channels.
        method: the solver that chose it.
    """

    kept: dict[str, int]
    removed_blocks: list[str]
    group_layers: dict[str, list[str]]
    predicted_s: float
    budget_s: float
    importance_kept: float
    importance_total: float
    method: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class BudgetProblem:
    """Groups, their importance and candidate widths, and the latency table that prices them.

    Build from a model with `from_model`, or directly (tests: scripted tables).

    Args:
        groups: the prunable groups.
        layers: every priced layer (a name of `table.layers`) -> its coupling.
        table: the latency table.
        block_layers: removable block -> the layers inside it (gone with it).
    """

    def __init__(
        self,
        groups: Sequence[ChannelGroup],
        layers: Mapping[str, LayerCoupling],
        table: LatencyTable,
        block_layers: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.groups = {group.name: group for group in groups}
        self.layers = dict(layers)
        self.table = table
        self.block_layers = {name: list(members) for name, members in (block_layers or {}).items()}
        for name in self.layers:
            if name not in table.layers:
                raise ValueError(f"Layer {name!r} is not in the latency table; was it built for this model?")
        self._touching: dict[str, list[str]] = {name: [] for name in self.groups}
        for layer, coupling in self.layers.items():
            for group in {coupling.in_group, coupling.out_group} - {None}:
                self._touching[group].append(layer)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        example_inputs: torch.Tensor,
        table: LatencyTable,
        *,
        ignored_layers: Sequence[str] = (),
        remove_blocks: bool = True,
    ) -> BudgetProblem:
        """Reads the groups off torch-pruning's dependency graph of `model` (as `prune_filters`).

        Args:
            model: the network as it is now (possibly already pruned; not modified).
            example_inputs: a batch for tracing.
            table: latency table built on this network at full width.
            ignored_layers: glob patterns of layers whose output channels are kept.
            remove_blocks: whether a residual block may become its shortcut.

        Raises:
            ValueError: if the table does not hold a layer of `model`, or for a pattern matching nothing.
        """
        work = traceable_copy(model)
        inputs = inputs_on(work, example_inputs)
        ignored = match_ignored(work, ignored_layers)
        # `analyze_structure` is where `prune_filters` finds the output layers; the same rule applies here.
        output_layers = analyze_structure(work, inputs, ignored).output_layers
        names = {module: name for name, module in work.named_modules()}
        excluded = [
            sub for module in [*ignored, *(work.get_submodule(n) for n in output_layers)] for sub in module.modules()
        ]
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                work, example_inputs=inputs, verbose=False, customized_pruners=CUSTOMIZED_PRUNERS
            )
        importance = tp.importance.MagnitudeImportance(p=2, group_reduction="sum", normalizer=None)
        layer_types = (nn.Conv2d, nn.Linear)
        blocks = removable_blocks(work) if remove_blocks else []
        groups: list[ChannelGroup] = []
        in_group: dict[str, str] = {}
        out_group: dict[str, str] = {}
        for group in graph.get_all_groups(ignored_layers=excluded, root_module_types=list(layer_types)):
            out_layers, in_layers = [], []
            for item in group.items:
                module = item.dep.target.module
                if not isinstance(module, layer_types) or module not in names:
                    continue
                side = out_layers if graph.is_out_channel_pruning_fn(item.dep.handler) else in_layers
                side.append(names[module])
            order = {name: position for position, name in enumerate(names.values())}
            out_layers = sorted(set(out_layers), key=order.__getitem__)
            in_layers = sorted(set(in_layers), key=order.__getitem__)
            if not out_layers:
                continue
            scores = importance(group)
            scores = sorted((float(s) for s in scores), reverse=True) if scores is not None else []
            name = out_layers[0]
            channels = _widths(work.get_submodule(name))[1]
            if len(scores) != channels:
                raise ValueError(
                    f"torch-pruning scored {len(scores)} channels of group {name!r}, which has {channels}."
                )
            block = _inside_of(blocks, out_layers, in_layers, names.values())
            grid = table.layers[name].out_grid if name in table.layers else [channels]
            candidates = sorted({c for c in grid if c < channels} | {channels} | ({0} if block else set()))
            groups.append(ChannelGroup(name, out_layers, in_layers, channels, scores, candidates, block))
            for layer in out_layers:
                out_group[layer] = name
            for layer in in_layers:
                in_group[layer] = name
        layers = {}
        for module, name in names.items():
            if isinstance(module, layer_types):
                width_in, width_out = _widths(module)
                layers[name] = LayerCoupling(in_group.get(name), out_group.get(name), width_in, width_out)
        block_layers = {
            group.block: [*group.out_layers, *group.in_layers] for group in groups if group.block is not None
        }
        return cls(groups, layers, table, block_layers)

    # ---------------------------------------------------------------- pricing

    def _layer_s(self, name: str, kept: Mapping[str, int]) -> float:
        coupling = self.layers[name]
        width_in = kept.get(coupling.in_group, coupling.in_channels) if coupling.in_group else coupling.in_channels
        width_out = kept.get(coupling.out_group, coupling.out_channels) if coupling.out_group else coupling.out_channels
        return self.table.layers[name].predict_s(width_in, width_out)

    def _gone(self, kept: Mapping[str, int]) -> tuple[set[str], list[str]]:
        removed = [g.block for g in self.groups.values() if g.block is not None and kept.get(g.name, g.channels) == 0]
        return {layer for block in removed for layer in self.block_layers[block]}, removed

    def latency_s(self, kept: Mapping[str, int]) -> float:
        """Predicted network latency with group -> kept channels (absent: current width)."""
        gone, removed = self._gone(kept)
        widths = {}
        for name, coupling in self.layers.items():
            if name in gone:
                continue
            width_in = kept.get(coupling.in_group, coupling.in_channels) if coupling.in_group else coupling.in_channels
            width_out = (
                kept.get(coupling.out_group, coupling.out_channels) if coupling.out_group else coupling.out_channels
            )
            widths[name] = (width_in, width_out)
        return self.table.predict_s(widths, removed)

    def importance(self, kept: Mapping[str, int]) -> float:
        return sum(group.importance(kept.get(name, group.channels)) for name, group in self.groups.items())

    def current(self) -> dict[str, int]:
        return {name: group.channels for name, group in self.groups.items()}

    def minimum(self) -> dict[str, int]:
        """Every group at its smallest candidate (0: block removed)."""
        return {name: group.candidates[0] for name, group in self.groups.items()}

    def _allocation(self, kept: Mapping[str, int], budget_s: float, method: str) -> Allocation:
        _, removed = self._gone(kept)
        return Allocation(
            kept=dict(kept),
            removed_blocks=removed,
            group_layers={name: list(group.out_layers) for name, group in self.groups.items()},
            predicted_s=self.latency_s(kept),
            budget_s=budget_s,
            importance_kept=self.importance(kept),
            importance_total=self.importance(self.current()),
            method=method,
        )

    # ---------------------------------------------------------------- solvers

    def greedy(self, budget_s: float) -> dict[str, int]:
        """Steps down the cheapest importance per second saved until within `budget_s`, then adds back."""
        kept = self.current()
        latency = self.latency_s(kept)
        while latency > budget_s:
            best: tuple[float, str, int, float] | None = None
            for name, group in self.groups.items():
                # The nearest narrower candidate that is faster, and removing the block outright:
                # a block's overhead only goes with the whole block, which single steps do not see.
                narrower = [c for c in reversed(group.candidates) if 0 < c < kept[name]]
                removal = [0] if group.block is not None and kept[name] > 0 else []
                for widths in (narrower, removal):
                    for width in widths:
                        saved = latency - self.latency_s({**kept, name: width})
                        if saved > 0:
                            cost = (group.importance(kept[name]) - group.importance(width)) / saved
                            if best is None or cost < best[0]:
                                best = (cost, name, width, latency - saved)
                            break
            if best is None:
                break  # nothing left to remove: the caller checked the minimum
            _, name, width, latency = best
            kept[name] = width
        improved = True
        while improved:  # add back the most valuable steps that still fit
            improved = False
            options = []
            for name, group in self.groups.items():
                higher = [c for c in group.candidates if c > kept[name]]
                for width in higher:
                    trial = {**kept, name: width}
                    new_latency = self.latency_s(trial)
                    if new_latency <= budget_s:
                        gain = group.importance(width) - group.importance(kept[name])
                        options.append((gain, name, width))
            if options:
                gain, name, width = max(options)
                if gain > 0:
                    kept[name] = width
                    improved = True
        return kept

    def shared_groups(self) -> list[str]:
        """A small set of groups that, once fixed, leave every layer depending on at most one other
        group (a vertex cover of the group-coupling graph, highest degree first)."""
        edges = set()
        for coupling in self.layers.values():
            if coupling.in_group and coupling.out_group and coupling.in_group != coupling.out_group:
                edges.add(frozenset((coupling.in_group, coupling.out_group)))
        shared: list[str] = []
        while edges:
            degree: dict[str, int] = {}
            for edge in edges:
                for name in edge:
                    degree[name] = degree.get(name, 0) + 1
            top = max(sorted(degree), key=degree.__getitem__)
            shared.append(top)
            edges = {edge for edge in edges if top not in edge}
        return shared

    def combinations(self) -> int:
        return math.prod(len(self.groups[name].candidates) for name in self.shared_groups())

    def dynamic_programming(self, budget_s: float, resolution: int = 400) -> dict[str, int] | None:
        """Exact multiple-choice knapsack per choice of the shared groups (module docstring).

        Returns:
            The best widths, or None if no choice fits the budget after discretisation.
        """
        shared = self.shared_groups()
        free = [name for name in self.groups if name not in shared]
        best_value, best_kept = -math.inf, None
        for choice in itertools.product(*(self.groups[name].candidates for name in shared)):
            fixed = dict(zip(shared, choice))
            costs = []
            for name in free:
                group = self.groups[name]
                options = []
                for width in group.candidates:
                    trial = {**fixed, name: width}
                    if width == 0:
                        cost = 0.0
                    else:
                        cost = sum(self._layer_s(layer, trial) for layer in self._touching[name])
                        if group.block is not None:
                            cost += self.table.block_overhead_s[group.block]
                    options.append((width, cost, group.importance(width)))
                costs.append(options)
            full = self.latency_s({**fixed, **{name: self.groups[name].channels for name in free}})
            free_full = sum(
                next(cost for width, cost, _ in options if width == self.groups[name].channels)
                for name, options in zip(free, costs)
            )
            fixed_s = full - free_full  # rest, overheads and layers of the shared groups only
            remaining = budget_s - fixed_s
            if remaining < 0:
                continue
            bin_s = remaining / resolution if remaining > 0 else 1.0
            value = np.zeros(resolution + 1)  # best importance within b bins, before any free group
            choices = []
            for options in costs:
                new = np.full(resolution + 1, -np.inf)
                pick = np.full(resolution + 1, -1, dtype=np.int64)
                for index, (_, cost, importance) in enumerate(options):
                    bins = math.ceil(cost / bin_s - 1e-9) if cost > 0 else 0
                    if bins > resolution:
                        continue
                    shifted = np.full(resolution + 1, -np.inf)
                    shifted[bins:] = value[: resolution + 1 - bins] + importance
                    better = shifted > new
                    new[better], pick[better] = shifted[better], index
                value = new
                choices.append(pick)
            total = value[resolution] + sum(self.groups[name].importance(width) for name, width in fixed.items())
            if not np.isfinite(value[resolution]) or total <= best_value:
                continue
            kept, position = dict(fixed), resolution
            for name, options, pick in reversed(list(zip(free, costs, choices))):
                index = int(pick[position])
                width, cost, _ = options[index]
                kept[name] = width
                position -= math.ceil(cost / bin_s - 1e-9) if cost > 0 else 0
            best_value, best_kept = total, kept
        return best_kept


def allocate(
    problem: BudgetProblem,
    budget_s: float,
    method: Literal["auto", "dp", "greedy"] = "auto",
    max_combinations: int = 4096,
    resolution: int = 400,
) -> Allocation:
    """The widths (and removed blocks) keeping the most importance with predicted latency <= `budget_s`.

    Args:
        problem: groups, importance, candidates and the latency table.
        budget_s: predicted latency budget, seconds.
        method: "dp", "greedy" or "auto" (DP when its enumeration is <= `max_combinations`).
        max_combinations: largest enumeration of shared-group widths "auto" accepts for the DP.
        resolution: latency bins of the DP.

    Raises:
        ValueError: for an unknown method, or a budget below the minimum reachable latency
            (the message says the minimum); for "dp" on a problem with more than
            `max_combinations` choices.
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}, got {method!r}.")
    minimum_s = problem.latency_s(problem.minimum())
    current_s = problem.latency_s(problem.current())
    if budget_s < minimum_s:
        raise ValueError(
            f"The latency budget {budget_s * 1e3:.4g} ms cannot be reached: the minimum reachable predicted latency "
            f"is {minimum_s * 1e3:.4g} ms (every group at its narrowest candidate, removable blocks removed), a "
            f"speedup of {current_s / minimum_s:.3g}x over the current {current_s * 1e3:.4g} ms."
        )
    if budget_s >= current_s:
        return problem._allocation(problem.current(), budget_s, "none")
    combinations = problem.combinations()
    if method == "dp" and combinations > max_combinations:
        raise ValueError(
            f"`method`='dp' would enumerate {combinations} width choices (> `max_combinations`={max_combinations}); "
            "use 'greedy' or 'auto'."
        )
    use_dp = method == "dp" or (method == "auto" and combinations <= max_combinations)
    kept = problem.dynamic_programming(budget_s, resolution) if use_dp else None
    if kept is None or problem.latency_s(kept) > budget_s:
        kept, used = problem.greedy(budget_s), "greedy"
    else:
        used = "dp"
        greedy_kept = problem.greedy(budget_s) if method == "auto" else None
        # The DP is exact on the discretised problem; the greedy can still win by the rounding.
        if (
            greedy_kept is not None
            and problem.latency_s(greedy_kept) <= budget_s
            and problem.importance(greedy_kept) > problem.importance(kept)
        ):
            kept, used = greedy_kept, "greedy"
    allocation = problem._allocation(kept, budget_s, used)
    log.info(
        "latency budget %.3f ms: predicted %.3f ms (from %.3f), importance kept %.1f%%, %d blocks removed (%s)",
        budget_s * 1e3, allocation.predicted_s * 1e3, current_s * 1e3,
        100 * allocation.importance_kept / max(allocation.importance_total, 1e-12),
        len(allocation.removed_blocks),
        used,
    )  # fmt: skip
    return allocation


def step_ratios(model: nn.Module, allocation: Allocation) -> dict[str, float]:
    """`prune_filters` ratios (one exact layer name per pruned group) giving `allocation`'s widths
    on `model` after its blocks were removed.

    torch-pruning keeps `int(current * (1 - ratio))` channels; the half channel makes that land
    on the kept count despite floating-point error.
    """
    present = dict(model.named_modules())
    ratios = {}
    for name, width in allocation.kept.items():
        if width == 0:
            continue
        layer = next((layer for layer in allocation.group_layers[name] if layer in present), None)
        if layer is None:
            continue
        current = _widths(present[layer])[1]
        if width < current:
            ratios[_literal_pattern(layer)] = 1 - (width + 0.5) / current
    return ratios


def _literal_pattern(name: str) -> str:
    """`name` as an fnmatch pattern matching only itself."""
    return "".join(f"[{char}]" if char in "*?[" else char for char in name)


def _inside_of(
    blocks: Sequence[str], out_layers: Sequence[str], in_layers: Sequence[str], all_names: Iterable[str]
) -> str | None:
    """The block whose inside this group is: the group's layers are exactly the block's conv /
    linear layers outside its shortcut, with the block's `conv1` outputs and `conv2` inputs."""
    members = {*out_layers, *in_layers}
    all_names = list(all_names)
    for block in blocks:
        prefix = f"{block}."
        if f"{prefix}conv1" not in out_layers or f"{prefix}conv2" not in in_layers:
            continue
        inside = {
            name
            for name in all_names
            if name.startswith(prefix) and not name.startswith((f"{prefix}shortcut", f"{prefix}downsample"))
        }
        if members <= inside:
            return block
    return None
