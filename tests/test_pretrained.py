"""Published baselines: option-A ResNets, third-party state dicts through `init_from`, the
datamodule's normalization, and structured pruning through the parameter-free zero-pad shortcut."""

from __future__ import annotations

import copy
import json
import textwrap
from pathlib import Path

import pytest
import torch
from compresslight.callbacks.pruning import PruningCallback
from compresslight.datamodules import CIFAR10DataModule
from compresslight.datamodules.cifar10 import CIFAR10_MEAN, CIFAR10_STD
from helpers import INPUT_SHAPE, TESTS_DIR, run_python, tiny_loaders, tiny_trainer
from torch import nn

from compresslight.classifier import ImageClassifier
from compresslight.compression.pruning import prune_filters
from compresslight.compression.pruning_graph import ZeroPadShortcutPruner
from compresslight.compression.pruning_record import PruningRecord
from compresslight.models.resnet_a import ZeroPadShortcut
from compresslight.registry import create_model

PRETRAINED = TESTS_DIR.parent.parent / "shared" / "pretrained"
PUBLISHED = {"resnet20_a": "resnet20-12fca82f.th", "resnet56_a": "resnet56-4bfd9763.th"}


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, so that no channel is trivially zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.2)
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
    return model.eval()


def save_published_style(model: nn.Module, path: Path, prefix: str = "module.") -> None:
    """Writes `model`'s weights as akamaster's files are: a dict with a prefixed state dict."""
    state = {prefix + key: value for key, value in model.state_dict().items() if "num_batches_tracked" not in key}
    torch.save({"best_prec1": 91.0, "state_dict": state}, path)


# --- the architecture --------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "params"), [("resnet20_a", 269_722), ("resnet56_a", 853_018)])
def test_option_a_resnets_have_the_published_parameter_counts(arch: str, params: int) -> None:
    model = create_model(arch)
    assert sum(p.numel() for p in model.parameters()) == params
    assert not any("shortcut" in key for key in model.state_dict())
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_the_published_files_fit_exactly(arch: str) -> None:
    path = PRETRAINED / PUBLISHED[arch]
    if not path.is_file():
        pytest.skip(f"{path} is not on this machine")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    own = create_model(arch).state_dict()
    published = {key.removeprefix("module."): tuple(value.shape) for key, value in state.items()}
    assert published == {key: tuple(v.shape) for key, v in own.items() if not key.endswith("num_batches_tracked")}


def test_zero_pad_shortcut_is_option_a() -> None:
    x = torch.randn(2, 16, 8, 8)
    out = ZeroPadShortcut(16, 32, stride=2)(x)
    # 16 -> 32 puts the subsampled input in channels 8..23, zeros around it.
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


@pytest.mark.parametrize(
    ("placement", "out_channels", "message"),
    [([0, 0], 4, "distinct output positions"), ([0, 4], 4, r"in \[0, 4\)"), ([-2, 1], 4, "or -1")],
)
def test_zero_pad_shortcut_refuses_a_bad_placement(placement: list[int], out_channels: int, message: str) -> None:
    layer = ZeroPadShortcut(2, 4)
    with pytest.raises(ValueError, match=message):
        layer.set_placement(placement, out_channels)
    assert layer.placement == [1, 2]


def test_zero_pad_shortcut_refuses_fewer_outputs_than_inputs() -> None:
    with pytest.raises(ValueError, match="in_channels <= out_channels"):
        ZeroPadShortcut(32, 16)


# --- third-party weights through init_from -------------------------------------------------------


def test_a_prefixed_plain_state_dict_loads_every_key(tmp_path: Path) -> None:
    source = randomized(create_model("resnet20_a", num_classes=4))
    path = tmp_path / "published.th"
    save_published_style(source, path)
    model = ImageClassifier(
        arch="resnet20_a", num_classes=4, input_shape=INPUT_SHAPE, init_from=str(path), init_from_prefix="module."
    ).eval()
    x = torch.randn(3, *INPUT_SHAPE)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_a_checkpoint_of_a_run_started_from_a_state_dict_loads_without_that_file(tmp_path: Path) -> None:
    path = tmp_path / "published.th"
    save_published_style(randomized(create_model("resnet20_a", num_classes=4)), path)
    model = ImageClassifier(
        arch="resnet20_a", num_classes=4, input_shape=INPUT_SHAPE, init_from=str(path), init_from_prefix="module."
    )
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model, tiny_loaders()[0])
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    path.unlink()
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "run.ckpt").eval()
    assert loaded.hparams.init_from is None and loaded.hparams.init_from_prefix is None
    x = torch.randn(2, *INPUT_SHAPE)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_a_bare_state_dict_loads_with_an_empty_prefix(tmp_path: Path) -> None:
    source = randomized(create_model("resnet20_a", num_classes=4))
    path = tmp_path / "bare.pt"
    torch.save(source.state_dict(), path)
    model = ImageClassifier(
        arch="resnet20_a", num_classes=4, input_shape=INPUT_SHAPE, init_from=str(path), init_from_prefix=""
    ).eval()
    x = torch.randn(3, *INPUT_SHAPE)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("arch", "prefix", "message"),
    [
        # option B: its projections and `fc` are missing, the file's `linear` is unexpected
        (
            "resnet20",
            "module.",
            (
                r"do not fit CifarResNet: linear.weight: not in the model; linear.bias: not in the model; "
                r"layer2.0.shortcut.0.weight: not in the file; .* \(14 in all\)"
            ),
        ),
        ("resnet20_a", "model.", r"`init_from_prefix` 'model.' must start every key.*'module.conv1.weight'"),
    ],
)
def test_weights_that_do_not_fit_are_refused_with_the_keys_listed(
    tmp_path: Path, arch: str, prefix: str, message: str
) -> None:
    path = tmp_path / "published.th"
    save_published_style(create_model("resnet20_a", num_classes=4), path)
    with pytest.raises(ValueError, match=message):
        ImageClassifier(arch=arch, num_classes=4, input_shape=INPUT_SHAPE, init_from=str(path), init_from_prefix=prefix)


def test_unexpected_keys_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "extra.th"
    model = create_model("resnet20_a", num_classes=4)
    state = {"module." + key: value for key, value in model.state_dict().items()}
    state["module.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match=r"do not fit CifarResNetA: extra.weight: not in the model\.$"):
        ImageClassifier(
            arch="resnet20_a", num_classes=4, input_shape=INPUT_SHAPE, init_from=str(path), init_from_prefix="module."
        )


def test_a_plain_state_dict_without_a_prefix_option_says_what_to_set(tmp_path: Path) -> None:
    path = tmp_path / "published.th"
    save_published_style(create_model("resnet20_a", num_classes=4), path)
    with pytest.raises(
        ValueError, match="holds no weight of this model.*'module.conv1.weight'.*needs `init_from_prefix`"
    ):
        ImageClassifier(arch="resnet20_a", num_classes=4, input_shape=INPUT_SHAPE, init_from=str(path))


def test_code_in_a_weights_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled_model.pt"
    torch.save(create_model("resnet20_a", num_classes=4), path)  # a whole pickled module, not a state dict
    with pytest.raises(ValueError, match=r"holds objects that a weights-only load refuses \(.*Unsupported global"):
        ImageClassifier(
            arch="resnet20_a", num_classes=4, input_shape=INPUT_SHAPE, init_from=str(path), init_from_prefix=""
        )


def test_a_lightning_checkpoint_with_a_prefix_is_refused(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    model = ImageClassifier(arch="resnet20_a", num_classes=4, input_shape=INPUT_SHAPE)
    trainer.fit(model, tiny_loaders()[0])
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match="is a Lightning checkpoint.*without `init_from_prefix`"):
        ImageClassifier(
            arch="resnet20_a", num_classes=4, input_shape=INPUT_SHAPE, init_from=str(path), init_from_prefix="model."
        )


def test_a_prefix_without_init_from_is_refused() -> None:
    with pytest.raises(ValueError, match="`init_from_prefix` .'module.'. needs `init_from`"):
        ImageClassifier(arch="resnet20_a", init_from_prefix="module.")


# --- normalization ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "mean", "std"),
    [
        ({}, CIFAR10_MEAN, CIFAR10_STD),
        ({"normalization": "imagenet"}, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ({"normalization": "custom", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, (0.5,) * 3, (0.25,) * 3),
    ],
)
def test_the_config_chooses_the_normalization(kwargs: dict, mean: tuple, std: tuple) -> None:
    data = CIFAR10DataModule(data_dir="unused", **kwargs)
    assert data.mean == pytest.approx(mean) and data.std == pytest.approx(std)
    images = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    out = data.transform_batch(images, train=False)
    expected = (128 / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected.expand_as(out), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"normalization": "cifar"}, r"`normalization` must be one of \['cifar10', 'imagenet', 'custom'\]"),
        ({"normalization": "imagenet", "mean": [0.5] * 3}, "are for `normalization: custom`"),
        ({"normalization": "custom", "mean": [0.5] * 3}, "needs both `mean` and `std`"),
        ({"normalization": "custom", "mean": [0.5] * 2, "std": [0.2] * 3}, "`mean` must be 3 per-channel means"),
        ({"normalization": "custom", "mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}, "`std` must be 3"),
    ],
)
def test_a_bad_normalization_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CIFAR10DataModule(data_dir="unused", **kwargs)


# --- pruning through the zero-pad shortcut ---------------------------------------------------------


def test_the_handler_edits_the_shortcut_like_a_placement_matrix() -> None:
    layer = ZeroPadShortcut(4, 8, stride=1)  # inputs at positions 2..5
    x = torch.randn(1, 4, 2, 2)
    reference = layer(x)
    pruner = ZeroPadShortcutPruner()
    pruner.prune_in_channels(layer, [1])  # input 1 (position 3) is no longer forwarded
    pruner.prune_out_channels(layer, [0, 4])  # a zero position and input 2's position go
    assert (layer.in_channels, layer.out_channels) == (3, 6)
    assert layer.placement == [1, -1, 3]
    expected = reference.clone()
    expected[:, 3] = 0
    kept_out = [1, 2, 3, 5, 6, 7]
    torch.testing.assert_close(layer(x[:, [0, 2, 3]]), expected[:, kept_out], rtol=0, atol=0)


def masked_reference(model: nn.Module, record: PruningRecord) -> nn.Module:
    """`model` with the channels `record` removes zeroed at every layer's output instead.

    A removed channel then contributes nothing anywhere, so the pruned model must compute
    exactly what this one computes: the zero-pad shortcut carries the right slice or a zero.
    """
    masked = copy.deepcopy(model)
    for name, kept in record.kept_out_channels.items():
        layer = masked.get_submodule(name)
        size = record.original_out_channels[name]
        mask = torch.zeros(size)
        mask[kept] = 1

        def zero_removed(module: nn.Module, inputs: tuple, output: torch.Tensor, mask=mask) -> torch.Tensor:
            return output * mask.view(1, -1, 1, 1)

        layer.register_forward_hook(zero_removed)
    return masked


@pytest.mark.parametrize("amount", [0.25, 0.5])
def test_pruning_removes_the_same_slice_everywhere(amount: float) -> None:
    model = randomized(create_model("resnet20_a", num_classes=4))
    original = copy.deepcopy(model)
    x = torch.randn(3, *INPUT_SHAPE)
    record = prune_filters(model, amount, example_inputs=x)
    shortcut = model.layer2[0].shortcut
    assert record.kept_in_channels["layer2.0.shortcut"] == record.kept_out_channels["conv1"]
    assert record.kept_out_channels["layer2.0.shortcut"] == record.kept_out_channels["layer2.0.conv2"]
    assert shortcut.out_channels == model.layer2[0].conv2.out_channels == int(32 * (1 - amount))
    assert shortcut.in_channels == model.conv1.out_channels == int(16 * (1 - amount))
    out = model(x)
    assert out.shape == (3, 4) and torch.isfinite(out).all()
    torch.testing.assert_close(out, masked_reference(original, record)(x), rtol=1e-4, atol=1e-5)


def test_the_zero_pad_record_replays_after_a_json_round_trip() -> None:
    model = randomized(create_model("resnet20_a", num_classes=4))
    fresh = copy.deepcopy(model)
    x = torch.randn(2, *INPUT_SHAPE)
    record = prune_filters(model, ratios={"layer2.0.conv2": 0.5, "conv1": 0.25}, example_inputs=x)
    replayed = PruningRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    replayed.apply(fresh)
    fresh.load_state_dict(model.state_dict())
    assert fresh.layer3[0].shortcut.placement == model.layer3[0].shortcut.placement
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.slow  # a fit and a fresh interpreter that imports Lightning: ~10 s idle, a minute under load
def test_pruned_option_a_checkpoint_replays_in_a_new_process(tmp_path: Path) -> None:
    model = ImageClassifier(arch="resnet20_a", num_classes=4, input_shape=INPUT_SHAPE, lr=0.05)
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[PruningCallback(amount=0.4, epochs=[1])])
    train, val = tiny_loaders()
    trainer.fit(model, train, val)
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    x = torch.randn(4, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    expected = model.eval()(x)
    script = textwrap.dedent(
        f"""
        import json, torch
        from compresslight.classifier import ImageClassifier
        model = ImageClassifier.load_from_checkpoint({str(path)!r}).eval()
        x = torch.load({str(tmp_path / "x.pt")!r})
        shortcut = model.model.layer3[0].shortcut
        print(json.dumps(dict(out=model(x).tolist(), placement=shortcut.placement, width=shortcut.out_channels)))
        """
    )
    result = run_python("-c", script, cwd=tmp_path)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["placement"] == model.model.layer3[0].shortcut.placement
    assert report["width"] == model.model.layer3[0].conv2.out_channels < 64
    torch.testing.assert_close(torch.tensor(report["out"]), expected, rtol=0, atol=1e-6)


@pytest.mark.slow  # an ONNX export: seconds
def test_a_pruned_option_a_model_exports_to_onnx_runtime(tmp_path: Path) -> None:
    from compresslight.compression.quantization_onnx import OnnxRuntimeModel
    from compresslight.profiling.backends import export_onnx

    model = randomized(create_model("resnet20_a", num_classes=4))
    x = torch.randn(2, *INPUT_SHAPE)
    prune_filters(model, 0.3, example_inputs=x)
    assert model.layer2[0].shortcut._pad is None  # the gather path, not a plain pad
    path = tmp_path / "pruned.onnx"
    export_onnx(model.eval(), x, path)
    torch.testing.assert_close(torch.as_tensor(OnnxRuntimeModel(str(path))(x)), model(x), rtol=1e-4, atol=1e-5)
