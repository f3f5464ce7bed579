"""What torch-pruning's dependency graph says about a model: which layers can lose output channels,
which are coupled into one group, which produce the output, and what records cannot replay.

`prune_filters` (`compression/pruning.py`) and the latency-budget problem (`compression/budget.py`)
trace a model through here once per edit. `ZeroPadShortcutPruner` teaches torch-pruning the
parameter-free shortcut of option-A ResNets.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops as tp_ops

from compresslight.models.resnet_a import ZeroPadShortcut

__all__ = [
    "CUSTOMIZED_PRUNERS",
    "ROOT_TYPES",
    "PruningStructure",
    "ZeroPadShortcutPruner",
    "analyze_structure",
    "channel_summary",
    "prunable_groups",
    "prunable_layers",
]

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]

# The layer kinds a record can replay and map to parameter indices. torch-pruning knows more
# (LayerNorm, attention, LSTM, embeddings, bare nn.Parameters); a group touching one of those is
# refused before anything is edited, rather than recorded half.
REPLAYABLE_KINDS = frozenset(
    {tp_ops.OPTYPE.CONV, tp_ops.OPTYPE.DEPTHWISE_CONV, tp_ops.OPTYPE.LINEAR, tp_ops.OPTYPE.BN, tp_ops.OPTYPE.PRELU}
)
# Layers that can be the root of a pruning group (whose output channels a ratio refers to).
ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


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
CUSTOMIZED_PRUNERS: dict[type[nn.Module], tp.pruner.BasePruningFunc] = {ZeroPadShortcut: ZeroPadShortcutPruner()}


@dataclasses.dataclass
class PruningStructure:
    """What the dependency graph says about a model: which layers can be pruned, and together."""

    names: dict[nn.Module, str]
    output_layers: list[str]
    groups: list[tuple[nn.Module, list[nn.Module]]]  # root, members (output-channel side)

    @property
    def prunable(self) -> list[str]:
        found = {self.names[m] for _, members in self.groups for m in members if isinstance(m, ROOT_TYPES)}
        return [name for name in self.names.values() if name in found]


def prunable_layers(model: nn.Module, example_inputs: ExampleInputs, ignored_layers: Sequence[str] = ()) -> list[str]:
    """Names of the layers `prune_filters` can prune (the names patterns are matched against).

    The layers producing the model's output and the `ignored_layers` patterns' modules keep
    their output channels, and so does every layer coupled to them.

    Raises:
        ValueError: for an `ignored_layers` pattern that matches no module.
    """
    work = traceable_copy(model)
    ignored = match_ignored(work, ignored_layers)
    return analyze_structure(work, inputs_on(work, example_inputs), ignored).prunable


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
    work = traceable_copy(model)
    structure = analyze_structure(work, inputs_on(work, example_inputs), match_ignored(work, ignored_layers))
    groups = []
    for root, members in structure.groups:
        root_name = structure.names[root]
        others = [structure.names[m] for m in members if isinstance(m, ROOT_TYPES) and m is not root]
        groups.append([root_name, *others])
    return groups


def traceable_copy(model: nn.Module) -> nn.Module:
    # The dependency graph is traced through autograd: frozen layers would leave no trace.
    work = copy.deepcopy(model)
    for parameter in work.parameters():
        parameter.requires_grad_(True)
    return work


def inputs_on(model: nn.Module, example_inputs: ExampleInputs) -> ExampleInputs:
    parameter = next(model.parameters(), None)
    if parameter is None or not isinstance(example_inputs, torch.Tensor):
        return example_inputs
    return example_inputs.to(parameter.device)


def match_ignored(model: nn.Module, patterns: Sequence[str]) -> list[nn.Module]:
    if isinstance(patterns, str):
        raise ValueError(f"`ignored_layers` must be a list of patterns, got the string {patterns!r}.")
    named = dict(model.named_modules())
    modules = []
    for pattern in patterns:
        matched = [module for name, module in named.items() if name and fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            layers = [name for name, module in named.items() if isinstance(module, ROOT_TYPES)]
            raise ValueError(f"`ignored_layers` pattern {pattern!r} matches no module; layers are {layers}.")
        modules.extend(matched)
    return modules


def analyze_structure(model: nn.Module, inputs: ExampleInputs, ignored: Sequence[nn.Module]) -> PruningStructure:
    """Traces `model` once and reads its prunable groups and output layers off the graph."""
    _check_recurrent_layers(model, inputs, ignored)
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=inputs, verbose=False, customized_pruners=CUSTOMIZED_PRUNERS
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
        if isinstance(node.module, ROOT_TYPES):
            output_modules.append(node.module)
        else:
            stack.extend(node.inputs)

    excluded = [sub for module in [*ignored, *output_modules] for sub in module.modules()]
    groups = []
    for group in graph.get_all_groups(ignored_layers=excluded, root_module_types=list(ROOT_TYPES)):
        members = [
            item.dep.target.module
            for item in group.items
            if isinstance(item.dep.target.module, nn.Module)
            and item.dep.target.module in names
            and graph.is_out_channel_pruning_fn(item.dep.handler)
        ]
        groups.append((group.items[0].dep.target.module, list(dict.fromkeys(members))))
    return PruningStructure(names=names, output_layers=[names[m] for m in output_modules], groups=groups)


def out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def check_replayable(group: tp.dependency.Group, names: Mapping[nn.Module, str], graph: tp.DependencyGraph) -> None:
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
        if module not in names or not item.idxs or type(module) in CUSTOMIZED_PRUNERS:
            continue  # torch-pruning's placeholders for adds, reshapes, ...; our own parameter-free layers
        kind = tp_ops.module2type(module)
        grouped = isinstance(module, nn.modules.conv._ConvNd) and kind == tp_ops.OPTYPE.CONV and module.groups > 1
        is_output = graph.is_out_channel_pruning_fn(item.dep.handler)
        if kind not in REPLAYABLE_KINDS or grouped:
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
        if isinstance(module, ROOT_TYPES):
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


def channel_summary(model: nn.Module) -> dict[str, int]:
    """Output channels of every convolution and linear layer, by name (for before/after logs)."""
    return {name: out_channels(module) for name, module in model.named_modules() if isinstance(module, ROOT_TYPES)}
