"""Structured filter pruning (torch-pruning), its replayable record, unstructured masks, sensitivity."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

import compresslight
from compresslight.compression.pruning import prune_filters
from compresslight.compression.pruning_graph import channel_summary, prunable_layers
from compresslight.compression.pruning_record import PruningRecord, rollback_on_error
from compresslight.compression.record import CompressionRecord, replay
from compresslight.compression.sensitivity import sensitivity_analysis
from compresslight.compression.unstructured import make_pruning_permanent, prune_unstructured, sparsity

# --- tiny models -------------------------------------------------------------------------------


class TinyBlock(nn.Module):
    """A ResNet BasicBlock with a 1x1 conv + BN projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            projection = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
            self.shortcut = nn.Sequential(projection, nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem 8, layer1: two blocks of 8 (identity residuals), layer2: one block 8 -> 16 (projection)."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(TinyBlock(8, 8), TinyBlock(8, 8))
        self.layer2 = nn.Sequential(TinyBlock(8, 16, stride=2))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean((2, 3)))


class TinyVGG(nn.Module):
    """Conv-BN-ReLU-pool twice, flatten of a 2x2 map (channel indices expand into features), 2 linears."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TinyMobile(nn.Module):
    """Depthwise-separable: conv 8, depthwise 3x3 (groups=8), pointwise 16, global pool, linear."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.depthwise = nn.Sequential(depthwise, nn.BatchNorm2d(8), nn.ReLU())
        self.pointwise = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pointwise(self.depthwise(self.stem(x))).mean((2, 3)))


MODELS = {"resnet": TinyResNet, "vgg": TinyVGG, "mobile": TinyMobile}
OUTPUT_LAYER = {"resnet": "fc", "vgg": "classifier.3", "mobile": "head"}


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[kind]()
    # Non-trivial BatchNorm statistics and affine parameters, so replays are really checked.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    return model.eval()


def inputs(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].shape == tensor.shape, name
        assert torch.equal(after[name], tensor), name


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- structured pruning ------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("amount", [0.25, 0.5])
@pytest.mark.parametrize("kind", ["resnet", "vgg", "mobile"])
def test_every_layer_loses_its_share_and_the_classifier_keeps_its_outputs(kind: str, amount: float, norm: int) -> None:
    model = make_model(kind)
    before = channel_summary(model)
    record = prune_filters(model, amount, norm=norm, example_inputs=inputs())
    after = channel_summary(model)

    output_layer = OUTPUT_LAYER[kind]
    assert after[output_layer] == before[output_layer]
    for name, channels in before.items():
        if name != output_layer:
            assert after[name] == int(channels * (1 - amount)), name
    assert params(model) < sum(p.numel() for p in make_model(kind).parameters())
    assert model(inputs(2)).shape == (2, 5)
    assert output_layer not in record.kept_out_channels
    assert record.settings["amount"] == amount and record.settings["norm"] == norm


@pytest.mark.parametrize("round_to", [None, 4])
@pytest.mark.parametrize("amount", [0.25, 0.4])
@pytest.mark.parametrize("kind", ["resnet", "vgg", "mobile"])
def test_record_replays_on_a_fresh_model_after_a_json_round_trip(
    kind: str, amount: float, round_to: int | None
) -> None:
    model = make_model(kind, seed=0)
    record = prune_filters(model, amount, round_to=round_to, example_inputs=inputs())
    if round_to:
        assert all(n % round_to == 0 for name, n in channel_summary(model).items() if name != OUTPUT_LAYER[kind])

    loaded = CompressionRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert isinstance(loaded, PruningRecord) and loaded == record
    fresh = make_model(kind, seed=1)  # other weights: the record needs none
    loaded.apply(fresh)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    fresh.load_state_dict(model.state_dict())
    x = inputs(4)
    torch.testing.assert_close(fresh(x), model(x))


@pytest.mark.parametrize("kind", ["resnet", "vgg", "mobile"])
def test_two_records_in_sequence_replay_and_refuse_the_wrong_order(kind: str) -> None:
    model = make_model(kind)
    first = prune_filters(model, 0.25, example_inputs=inputs())
    between = channel_summary(model)
    second = prune_filters(model, 0.25, example_inputs=inputs())
    # The second record's indices refer to the model as the first left it.
    for name, channels in second.original_out_channels.items():
        if name in between:
            assert channels == between[name], name
    assert all(len(kept) < between[name] for name, kept in second.kept_out_channels.items() if name in between)

    fresh = make_model(kind, seed=3)
    replay(fresh, [first.to_dict(), second.to_dict()])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(inputs(2)), model(inputs(2)))

    other = make_model(kind, seed=3)
    untouched = snapshot(other)
    with pytest.raises(ValueError, match="Are the records replayed in the order they were made"):
        second.apply(other)
    assert_unchanged(other, untouched)


@pytest.mark.parametrize("amount", [0.25, 0.5])
@pytest.mark.parametrize("kind", ["resnet", "vgg", "mobile"])
def test_parameter_index_map_slices_the_original_tensors(kind: str, amount: float) -> None:
    model = make_model(kind)
    original = dict(copy.deepcopy(model).named_parameters())
    original_buffers = dict(copy.deepcopy(model).named_buffers())
    record = prune_filters(model, amount, example_inputs=inputs())
    index_map = record.parameter_index_map()

    pruned = dict(model.named_parameters())
    for name, parameter in pruned.items():
        expected = original[name]
        for dim, kept in index_map.get(name, {}).items():
            expected = expected.index_select(dim, torch.tensor(kept))
        assert torch.equal(parameter, expected), name  # shrunk ones sliced, the others identical
    assert {name for name in index_map if name in pruned} == {
        name for name, p in pruned.items() if p.shape != original[name].shape
    }
    for name, buffer in model.named_buffers():  # BatchNorm statistics follow their channels
        if buffer.dim() == 1 and buffer.shape != original_buffers[name].shape:
            kept = record.kept_out_channels[name.rpartition(".")[0]]
            assert torch.equal(buffer, original_buffers[name][kept]), name


@pytest.mark.parametrize(
    ("kind", "dead_layer", "dead_bn"),
    [("resnet", "layer1.1.conv1", "layer1.1.bn1"), ("vgg", "features.0", "features.1"), ("vgg", "classifier.1", None)],
)
def test_removing_dead_channels_keeps_the_outputs(kind: str, dead_layer: str, dead_bn: str | None) -> None:
    # Channels whose filters (and BN affine) are zero output zero after ReLU: they are the lowest
    # ranked, and removing them must not change what the network computes.
    model = make_model(kind)
    dead = [1, 6]
    with torch.no_grad():
        layer = model.get_submodule(dead_layer)
        layer.weight[dead] = 0
        if layer.bias is not None:
            layer.bias[dead] = 0
        if dead_bn is not None:
            model.get_submodule(dead_bn).weight[dead] = 0
            model.get_submodule(dead_bn).bias[dead] = 0
    x = inputs(3)
    expected = model(x)
    channels = channel_summary(model)[dead_layer]
    record = prune_filters(model, ratios={dead_layer: len(dead) / channels}, example_inputs=inputs())
    assert record.kept_out_channels[dead_layer] == [i for i in range(channels) if i not in dead]
    torch.testing.assert_close(model(x), expected)


def test_block_conv1_patterns_prune_only_the_matching_layers() -> None:
    model = make_model("resnet")
    before = channel_summary(model)
    record = prune_filters(model, ratios={"layer*.*.conv1": 0.5}, example_inputs=inputs())
    after = channel_summary(model)
    matched = {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"}
    for name in before:
        assert after[name] == (before[name] // 2 if name in matched else before[name]), name
    # conv1 feeds only its own bn1 and conv2's inputs: nothing else changes.
    assert set(record.kept_out_channels) == matched | {n.replace("conv1", "bn1") for n in matched}
    assert set(record.kept_in_channels) == {n.replace("conv1", "conv2") for n in matched}


def test_a_ratio_on_one_coupled_layer_prunes_its_whole_residual_group() -> None:
    model = make_model("resnet")
    prune_filters(model, ratios={"layer1.0.conv2": 0.5}, example_inputs=inputs())
    after = channel_summary(model)
    # The stem and every layer1 conv2 meet at the residual adds: they lose channels together.
    assert after["conv1"] == after["layer1.0.conv2"] == after["layer1.1.conv2"] == 4
    assert after["layer1.0.conv1"] == 8 and after["layer2.0.conv1"] == after["layer2.0.conv2"] == 16
    assert model.layer2[0].shortcut[0].in_channels == 4


def test_later_patterns_override_earlier_ones_and_zero_protects() -> None:
    model = make_model("resnet")
    prune_filters(model, 0.5, ratios={"layer1.*": 0.25, "layer1.1.conv1": 0.0}, example_inputs=inputs())
    after = channel_summary(model)
    assert after["layer1.0.conv1"] == 6  # 0.25 from the layer1 pattern
    assert after["layer1.1.conv1"] == 8  # protected
    assert after["conv1"] == 6  # coupled with layer1's conv2s: the pattern's ratio
    assert after["layer2.0.conv1"] == 8 and after["layer2.0.conv2"] == 8  # the default amount


def test_ignored_layers_keep_their_outputs() -> None:
    model = make_model("resnet")
    prune_filters(model, 0.5, ignored_layers=["layer2.*"], example_inputs=inputs())
    after = channel_summary(model)
    assert after["layer2.0.conv1"] == 16 and after["layer2.0.conv2"] == 16 and after["layer2.0.shortcut.0"] == 16
    assert after["layer1.0.conv1"] == 4
    assert model.layer2[0].conv1.in_channels == 4  # inputs follow the pruned stage before


def test_filter_importance_keeps_the_largest_filters() -> None:
    model = make_model("vgg")
    weight = model.features[0].weight.detach().clone()
    record = prune_filters(model, ratios={"features.0": 0.5}, norm=1, importance="filter", example_inputs=inputs())
    largest = weight.abs().flatten(1).sum(1).topk(4).indices.sort().values.tolist()
    assert record.kept_out_channels["features.0"] == largest


def test_global_pruning_ranks_across_layers_and_replays() -> None:
    model = make_model("vgg")
    record = prune_filters(model, 0.3, global_pruning=True, example_inputs=inputs())
    after = channel_summary(model)
    # 30% of all 8 + 16 + 32 prunable channels go, ranked together (torch-pruning's count).
    assert after["features.0"] + after["features.4"] + after["classifier.1"] == int(56 * 0.7)
    assert after["classifier.3"] == 5
    fresh = make_model("vgg", seed=5)
    record.apply(fresh)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(inputs(2)), model(inputs(2)))


def test_pruning_keeps_the_training_mode_and_frozen_layers() -> None:
    model = make_model("resnet").train()
    model.conv1.requires_grad_(False)  # a frozen stem is still traced (on the copy) and pruned
    prune_filters(model, 0.25, example_inputs=inputs())
    assert model.training and all(m.training for m in model.modules())
    assert model.conv1.out_channels == 6 and not model.conv1.weight.requires_grad
    assert model.layer1[0].conv1.weight.requires_grad


def test_prunable_layers_exclude_the_classifier_and_ignored_layers() -> None:
    names = prunable_layers(make_model("resnet"), inputs(), ignored_layers=["layer2.0.conv1"])
    assert "fc" not in names and "layer2.0.conv1" not in names
    assert names[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"amount": 1.0}, "`amount` must be in [0, 1), got 1.0."),
        ({"amount": -0.1}, "`amount` must be in [0, 1), got -0.1."),
        ({"amount": "0.5"}, "`amount` must be in [0, 1), got '0.5'."),
        ({"ratios": {"layer1.*.conv1": 1.5}}, "`ratios['layer1.*.conv1']` must be in [0, 1), got 1.5."),
        ({}, "Give `amount` (every layer) or `ratios` (layer patterns), got neither."),
        ({"amount": 0.5, "norm": 3}, "`norm` must be 1 or 2, got 3."),
        ({"amount": 0.5, "round_to": 0}, "`round_to` must be None or an integer >= 1, got 0."),
        ({"amount": 0.5, "importance": "taylor"}, "`importance` must be 'group' or 'filter', got 'taylor'."),
        (
            {"ratios": {"layer9.*": 0.5}},
            "`ratios` pattern 'layer9.*' matches no prunable layer; prunable layers are ['conv1'",
        ),
        ({"ratios": {"fc": 0.5}}, "`ratios` pattern 'fc' matches no prunable layer"),
        ({"amount": 0.5, "ignored_layers": ["head*"]}, "`ignored_layers` pattern 'head*' matches no module"),
        ({"ratios": {"conv1": 0.25, "layer1.0.conv2": 0.5}}, "are coupled (they share channels"),
        ({"amount": 0.9}, "Ratio 0.9 would remove every one of the 8 channels of layer 'conv1'"),
        ({"amount": 0.5, "round_to": 8}, "Ratio 0.5 with round_to=8 would remove every one of the 8 channels"),
    ],
)
def test_bad_input_is_refused_and_the_model_is_untouched(kwargs: dict, message: str) -> None:
    model = make_model("resnet")
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(message)):
        prune_filters(model, example_inputs=inputs(), **kwargs)
    assert_unchanged(model, before)


def test_a_model_with_unstructured_masks_is_refused() -> None:
    model = make_model("vgg")
    prune_unstructured(model, 0.5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape("holds unstructured pruning masks (['features.0.weight'")):
        prune_filters(model, 0.25, example_inputs=inputs())
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("vgg", "does not exist. Is this the architecture the record was made on?"),
        ("wide", "layer 'conv1' must have 8 output channels (as when the record was made), found 12"),
        ("renamed", "layer 'fc' must be a Linear, found Conv2d"),
    ],
)
def test_replay_on_the_wrong_architecture_is_refused_untouched(target: str, message: str) -> None:
    source = make_model("resnet")
    record = prune_filters(source, 0.25, example_inputs=inputs())
    if target == "vgg":
        model = make_model("vgg")
    elif target == "wide":
        model = make_model("resnet")
        model.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
    else:
        model = make_model("resnet")
        model.fc = nn.Conv2d(16, 5, 1)  # the record shrank fc's inputs
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(message)):
        record.apply(model)
    assert_unchanged(model, before)


def test_a_failing_edit_is_rolled_back() -> None:
    model = make_model("resnet")
    record = prune_filters(copy.deepcopy(model), 0.5, example_inputs=inputs())
    modules = {name: model.get_submodule(name) for name in record.layer_names}
    # A last "layer" torch-pruning cannot handle: the edit fails after every real layer changed.
    modules["bogus"] = nn.ReLU()
    record.kept_out_channels["bogus"] = [0]
    before = snapshot(model)
    with pytest.raises(AttributeError):
        with rollback_on_error(modules.values()):
            record._edit(modules)
    assert_unchanged(model, before)
    assert model.layer2[0].conv1.in_channels == 8 and model.conv1.out_channels == 8
    torch.testing.assert_close(model(inputs()), make_model("resnet")(inputs()))


# --- the real architectures (paper 000's counts) -------------------------------------------------

needs_resnets = pytest.mark.skipif(
    "resnet20" not in compresslight.list_models(), reason="compresslight.models has no resnet20 yet"
)


@needs_resnets
@pytest.mark.parametrize(
    ("amount", "round_to", "expected"), [(0.125, None, 208_904), (0.25, None, 153_766), (0.25, 8, 148_322)]
)
def test_resnet20_counts_match_paper_000(amount: float, round_to: int | None, expected: int) -> None:
    # Paper 000, Table I: 208K / 153K parameters after pruning every conv by 12.5% / 25% (L2).
    model = compresslight.create_model("resnet20")
    record = prune_filters(model, amount, norm=2, round_to=round_to, example_inputs=torch.randn(1, 3, 32, 32))
    assert params(model) == expected
    assert model.fc.out_features == 10
    fresh = compresslight.create_model("resnet20")
    record.apply(fresh)
    assert params(fresh) == expected


@needs_resnets
def test_resnet56_distiller_schedule_of_paper_002() -> None:
    model = compresslight.create_model("resnet56")
    ratios = {
        "layer1.*.conv1": 0.7,
        "layer2.[1-4].conv1": 0.6,
        "layer2.[67].conv1": 0.6,
        "layer3.1.conv1": 0.2,
        "layer3.[235-8].conv1": 0.4,
    }
    before = channel_summary(model)
    prune_filters(model, ratios=ratios, norm=1, example_inputs=torch.randn(1, 3, 32, 32))
    after = channel_summary(model)
    changed = {name for name in before if after[name] != before[name]}
    assert len(changed) == 9 + 6 + 1 + 6
    assert after["layer1.4.conv1"] == int(16 * 0.3) and after["layer2.5.conv1"] == 32 and after["layer3.1.conv1"] == 51
    assert all(name.endswith("conv1") for name in changed)


# --- unstructured pruning --------------------------------------------------------------------------


@pytest.mark.parametrize("global_pruning", [True, False])
@pytest.mark.parametrize("amount", [0.3, 0.6])
def test_unstructured_masks_reach_the_target_sparsity_through_training(amount: float, global_pruning: bool) -> None:
    model = make_model("vgg").train()
    prune_unstructured(model, amount, global_pruning=global_pruning)
    assert sparsity(model) == pytest.approx(amount, abs=0.01)
    if not global_pruning:
        assert sparsity(model, ["features.0"]) == pytest.approx(amount, abs=0.02)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(inputs(4)).sum().backward()
    optimizer.step()
    assert sparsity(model) == pytest.approx(amount, abs=0.01)  # masked weights stay zero

    prune_unstructured(model, amount / 2, global_pruning=global_pruning)  # a lower target changes nothing
    assert sparsity(model) == pytest.approx(amount, abs=0.01)
    prune_unstructured(model, 0.8, global_pruning=global_pruning)  # cumulative
    assert sparsity(model) == pytest.approx(0.8, abs=0.01)

    names = make_pruning_permanent(model)
    assert names == ["features.0.weight", "features.4.weight", "classifier.1.weight", "classifier.3.weight"]
    assert not any(key.endswith(("_orig", "_mask")) for key in model.state_dict())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert sparsity(model) == pytest.approx(0.8, abs=0.01)
    assert make_pruning_permanent(model) == []


def test_unstructured_patterns_select_layers() -> None:
    model = make_model("vgg")
    prune_unstructured(model, 0.5, layer_patterns=["classifier.*"])
    assert sparsity(model, ["classifier.*"]) == pytest.approx(0.5, abs=0.01)
    assert sparsity(model, ["features.*"]) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"amount": 1.0}, "`amount` must be in [0, 1), got 1.0."),
        ({"amount": 0.5, "layer_patterns": ["blocks.*"]}, "pattern 'blocks.*' matches no conv / linear layer"),
        ({"amount": 0.5, "layer_patterns": "features.*"}, "`layer_patterns` must be a list of patterns, got the"),
    ],
)
def test_unstructured_bad_input(kwargs: dict, message: str) -> None:
    model = make_model("vgg")
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(message)):
        prune_unstructured(model, **kwargs)
    assert_unchanged(model, before)


# --- sensitivity analysis ----------------------------------------------------------------------


def agreement_with(reference: nn.Module) -> Callable[[nn.Module], float]:
    """A stand-in for validation top-1: how often a model predicts what `reference` predicts."""
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = reference(x).argmax(1)

    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model.eval()(x).argmax(1) == labels).float().mean())

    return evaluate


def test_sensitivity_prunes_each_group_alone_and_leaves_the_model(tmp_path) -> None:
    model = make_model("resnet")
    before = snapshot(model)
    evaluate = agreement_with(model)
    report = sensitivity_analysis(model, evaluate, inputs(), ratios=(0.25, 0.5, 0.9), metric_name="agreement")

    assert_unchanged(model, before)
    # One unit per coupled group: the stem with layer1's conv2s, each conv1, layer2's conv2 + shortcut.
    assert report.layers == ["conv1", "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.conv2"]
    # 0.9 would empty the 8-channel groups: skipped; the 16-channel ones keep 1 channel.
    assert {(row.layer, row.ratio) for row in report.rows if row.ratio == 0.9} == {
        ("layer2.0.conv1", 0.9),
        ("layer2.0.conv2", 0.9),
    }
    assert len(report.rows) == 5 * 2 + 2
    assert report.baseline_metric == 1.0 and report.baseline_params == params(model)
    for layer in report.layers:
        counts = [row.params for row in sorted(report.rows, key=lambda r: r.ratio) if row.layer == layer]
        assert counts == sorted(counts, reverse=True) and counts[0] < params(model)
    assert all(0.0 <= row.metric <= 1.0 for row in report.rows)

    table = report.to_markdown()
    assert "| layer | 0.25 | 0.5 | 0.9 |" in table and "| layer1.0.conv1 |" in table and "agreement" in table
    assert json.loads(json.dumps(report.to_dict()))["rows"][0]["layer"] == "conv1"
    path = report.plot(tmp_path / "plots" / "sensitivity.png")
    assert path.exists() and path.stat().st_size > 1000


def test_sensitivity_with_patterns_prunes_each_pattern_as_one() -> None:
    model = make_model("resnet")
    evaluate = agreement_with(model)
    report = sensitivity_analysis(model, evaluate, inputs(), layer_patterns=["layer1.*.conv1"], ratios=(0.5,), norm=1)
    (row,) = report.rows
    # Per block: half of conv1's 8x8x3x3 filters, of bn1's 2x8 parameters, of conv2's inputs.
    assert row.layer == "layer1.*.conv1" and params(model) - row.params == 2 * (288 + 8 + 288)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratios": (0.5, 1.0)}, "`ratios` must each be in (0, 1), got 1.0."),
        ({"ratios": (0.0,)}, "`ratios` must each be in (0, 1), got 0.0."),
        ({"ratios": ()}, "`ratios` must hold at least one ratio, got none."),
        ({"norm": 0}, "`norm` must be 1 or 2, got 0."),
        ({"layer_patterns": ["layer7.*"]}, "`layer_patterns` pattern 'layer7.*' matches no prunable layer"),
    ],
)
def test_sensitivity_bad_input(kwargs: dict, message: str) -> None:
    model = make_model("resnet")
    with pytest.raises(ValueError, match=re.escape(message)):
        sensitivity_analysis(model, lambda m: 0.0, inputs(), **kwargs)
