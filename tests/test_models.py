"""The registered architectures: sizes against the papers, gradients, registry errors, pruning graphs."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compresslight.models.alexnet import MIN_INPUT_SIZE
from compresslight.registry import create_model, list_models

# Smallest convenient input per architecture for the fast tests; the ImageNet layouts get 64x64
# so that no BatchNorm normalizes a single value per channel (its gradient would be ~0).
TEST_INPUT_SIZE = {"alexnet": 64, "resnet18": 64}


def _macs(model: nn.Module, in_channels: int, size: int) -> int:
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, in_channels, size, size))
    return counter.get_total_flops() // 2


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@pytest.mark.parametrize(
    ("name", "num_classes", "size", "reference_params", "reference_macs"),
    [
        # Paper 000 (272K), MACs as commonly reported for ResNet20 (41M).
        ("resnet20", 10, 32, 272_474, 41.0e6),
        # STYLE.md's table: 0.85M params, 125M MACs.
        ("resnet56", 10, 32, 0.85e6, 125e6),
        # torchvision's ResNet18: 11,689,512 params, 1.814G MACs.
        ("resnet18", 1000, 224, 11_689_512, 1.814e9),
        # Paper 001, Table V (and VII/VIII): 14.73M / 313.2M and 1.70M / 38M.
        ("vgg16", 10, 32, 14.73e6, 313.2e6),
        ("vgg16_compact", 10, 32, 1.70e6, 38e6),
        # Paper 003, section 4: 62.3M params, 1140 MFLOPs (MACs).
        ("alexnet", 1000, 224, 62.3e6, 1140e6),
    ],
)
def test_size_matches_reference(
    name: str, num_classes: int, size: int, reference_params: float, reference_macs: float
) -> None:
    model = create_model(name, num_classes=num_classes)

    assert _num_params(model) == pytest.approx(reference_params, rel=0.02)
    assert _macs(model, 3, size) == pytest.approx(reference_macs, rel=0.02)


@pytest.mark.parametrize(
    ("name", "num_classes", "exact_params"),
    [
        ("resnet20", 10, 272_474),
        ("resnet18", 1000, 11_689_512),
        ("vgg16", 10, 14_728_266),
        ("vgg16_compact", 10, 1_698_378),
    ],
)
def test_exact_parameter_counts(name: str, num_classes: int, exact_params: int) -> None:
    # ResNet20 with projection shortcuts is paper 000's 272K; the VGG totals are paper 001's
    # Tables VII and VIII to the unit.
    assert _num_params(create_model(name, num_classes=num_classes)) == exact_params


@pytest.mark.parametrize(
    ("name", "size", "exact_macs"),
    [("vgg16", 32, 313_201_664), ("vgg16_compact", 32, 38_018_048)],
)
def test_vgg_macs_match_paper_tables(name: str, size: int, exact_macs: int) -> None:
    assert _macs(create_model(name), 3, size) == exact_macs


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", list_models())
def test_every_parameter_gets_a_gradient(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_channels=in_channels).train()
    size = TEST_INPUT_SIZE.get(name, 32)
    # 4 images: BatchNorm over 2 samples outputs about +-1 whatever its input, which leaves almost
    # no gradient for the layers before it.
    images = torch.randn(4, in_channels, size, size)
    labels = torch.tensor([0, 1, 2, 3])

    nn.functional.cross_entropy(model(images), labels).backward()

    without_gradient = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert without_gradient == []


@pytest.mark.parametrize("num_classes", [2, 7])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", list_models())
def test_input_channels_and_classes_shape_the_model(name: str, in_channels: int, num_classes: int) -> None:
    model = create_model(name, num_classes=num_classes, in_channels=in_channels).eval()
    size = TEST_INPUT_SIZE.get(name, 32)

    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, size, size))

    assert logits.shape == (2, num_classes)
    assert _first_conv(model).in_channels == in_channels
    assert _last_linear(model).out_features == num_classes


@pytest.mark.parametrize("size", [32, 200])
@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_global_pooling_takes_cifar_and_steelpatch_sizes(name: str, size: int) -> None:
    model = create_model(name, num_classes=6, in_channels=1).eval()

    with torch.no_grad():
        logits = model(torch.randn(1, 1, size, size))

    assert logits.shape == (1, 6)


def test_alexnet_rejects_inputs_smaller_than_its_pools_allow() -> None:
    model = create_model("alexnet").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, MIN_INPUT_SIZE, MIN_INPUT_SIZE)).shape == (1, 10)
        with pytest.raises(ValueError, match=r"at least 63x63, got \(32, 32\)"):
            model(torch.randn(1, 3, 32, 32))


def test_unknown_architecture_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"`arch` must be one of \[.*'resnet20'.*'vgg16'.*\], got 'resnet21'"):
        create_model("resnet21")


def test_registry_lists_every_family() -> None:
    assert {"resnet20", "resnet56", "resnet18", "vgg16", "vgg16_compact", "alexnet"} <= set(list_models())


@pytest.mark.parametrize(
    ("name", "pattern_names"),
    [
        # Paper 002's schedule selects `layer1.*.conv1`-style names.
        ("resnet56", ["layer1.0.conv1", "layer1.8.conv1", "layer3.8.conv1", "layer2.0.shortcut.0", "fc"]),
        ("resnet18", ["conv1", "layer1.1.conv2", "layer4.0.downsample.0", "fc"]),
        ("vgg16", ["features.0", "classifier"]),
    ],
)
def test_layer_names_are_conventional(name: str, pattern_names: list[str]) -> None:
    module_names = {n for n, _ in create_model(name).named_modules()}
    assert set(pattern_names) <= module_names


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "vgg16", "vgg16_compact", "resnet18"])
def test_torch_pruning_builds_a_dependency_graph(name: str) -> None:
    model = create_model(name).eval()

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv in graph.module2node for conv in convs)


def test_pruning_the_residual_stream_follows_every_add() -> None:
    model = create_model("resnet20").eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    names = {module: name for name, module in model.named_modules()}

    # Dropping one channel of the stem must reach every layer that reads or writes stage 1's
    # residual stream, including the projection shortcut that leaves it.
    group = graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0])
    # The group also holds torch-pruning's own nodes for the adds and ReLUs; keep our layers.
    touched = {names[item.dep.target.module] for item in group.items if item.dep.target.module in names}
    assert {"conv1", "bn1", "layer1.0.conv1", "layer1.0.bn2", "layer1.2.conv2", "layer2.0.conv1"} <= touched
    assert "layer2.0.shortcut.0" in touched

    group.prune()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.layer2[0].shortcut[0].in_channels == 15


@pytest.mark.parametrize(("ratio", "paper_params"), [(0.125, 208e3), (0.25, 153e3)])
def test_resnet20_pruned_like_paper_000_has_its_sizes(ratio: float, paper_params: float) -> None:
    # Paper 000, Table I: L2 filter pruning of every layer by 12.5% / 25% leaves 208K / 153K.
    model = create_model("resnet20").eval()
    example = torch.randn(1, 3, 32, 32)
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[model.fc],
    )

    pruner.step()

    assert _num_params(model) == pytest.approx(paper_params, rel=0.01)
