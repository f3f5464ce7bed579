"""Models built the way third-party libraries build them (`thirdparty_models`): each case works, or
fails before anything is edited or trained with an error naming the layer and the fix."""

import copy
import logging
import re
import sys

import pytest
import pytorch_lightning as pl
import torch
from compresslight.callbacks.profile import ProfileCallback
from compresslight.callbacks.pruning import PruningCallback
from compresslight.callbacks.quantization import QuantizationCallback
from helpers import INPUT_SHAPE, REPO, classifier, tiny_loaders, tiny_trainer
from thirdparty_models import (
    BatchNorm1dHead,
    ConcatResidual,
    ConvRNN,
    HFMobileNetStyle,
    HFStyleClassifier,
    MobileNetV2ConvLayer,
    SamePadNet,
    TinyViT,
)
from torch import nn

from compresslight.checkpoint import adapt_pretrained_weights
from compresslight.classifier import ImageClassifier
from compresslight.cli import build_from_config
from compresslight.compression.pruning import prune_filters
from compresslight.compression.tucker import SVDSplit, TuckerConv2d, TuckerRecord, decompose_model
from compresslight.evaluation import logits_of
from compresslight.profiling.profiler import profile
from compresslight.profiling.results import INFERENCE, TRAIN
from compresslight.registry import create_model


def example_batch() -> torch.Tensor:
    return torch.randn(2, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))


def weight_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


# --- pruning ---------------------------------------------------------------------------------


def test_vit_layer_norms_are_refused_with_the_group_and_both_fixes():
    model = TinyViT()
    before = weight_shapes(model)
    with pytest.raises(ValueError, match=r"output channels of 'norm' \(LayerNorm\).*add '.*' to `ignored_layers`.*"
                       r"or the layers \['norm', 'norm2', 'norm1'\]"):  # fmt: skip
        prune_filters(model, 0.25, example_inputs=example_batch())
    assert weight_shapes(model) == before


def test_vit_attention_heads_are_never_regrouped():
    model = TinyViT()
    before = weight_shapes(model)
    with pytest.raises(ValueError, match=r"'attn\.qkv' \(Linear\), whose output is reshaped next.*attention heads.*"
                       r"Add 'attn\.qkv'"):  # fmt: skip
        prune_filters(model, 0.25, example_inputs=example_batch(), ignored_layers=["norm*"])
    assert weight_shapes(model) == before


def test_vit_following_the_advice_prunes_the_mlp_and_keeps_the_heads():
    model, x = TinyViT(), example_batch()
    record = prune_filters(model, 0.25, example_inputs=x, ignored_layers=["norm*", "attn.qkv"])
    assert record.layer_names == ["mlp.0", "mlp.2"]
    assert model.mlp[0].out_features == 48 and model.attn.qkv.out_features == 96
    fresh = TinyViT()
    record.apply(fresh)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x))


@pytest.mark.parametrize("ignored", [[], ["rnn"]])
def test_gru_after_a_conv_names_the_feeding_conv(ignored):
    model = ConvRNN(rnn="gru")
    with pytest.raises(ValueError, match=r"'rnn' \(GRU\) is a recurrent layer torch-pruning cannot trace, fed by "
                       r"\['conv'\].*Add \['conv'\] to `ignored_layers`"):  # fmt: skip
        prune_filters(model, 0.25, example_inputs=example_batch(), ignored_layers=ignored)


@pytest.mark.parametrize("rnn", ["gru", "lstm"])
def test_recurrent_layer_with_its_feeder_ignored_prunes_nothing_else_and_runs(rnn):
    model, x = ConvRNN(rnn=rnn), example_batch()
    record = prune_filters(model, 0.25, example_inputs=x, ignored_layers=["conv"])
    assert record.layer_names == []  # conv feeds the RNN, fc is the output: nothing else to prune
    assert model(x).shape == (2, 4)


def test_lstm_message_names_the_feeding_layer_not_the_lstm():
    with pytest.raises(ValueError, match=r"Pruning the channels of 'conv' would change the input channels of 'rnn' "
                       r"\(LSTM\).*add 'conv' to `ignored_layers`"):  # fmt: skip
        prune_filters(ConvRNN(rnn="lstm"), 0.25, example_inputs=example_batch(), ignored_layers=["rnn"])


@pytest.mark.parametrize("epochs", [[0], [0, 1]])
def test_callback_amount_on_a_concat_feeding_a_residual_add_prunes_like_prune_filters(tmp_path, epochs):
    expected = ConcatResidual()
    prune_filters(expected, 0.25, example_inputs=torch.zeros(1, *INPUT_SHAPE))
    model = classifier(arch=ConcatResidual())
    callback = PruningCallback(amount=0.25, epochs=epochs)
    tiny_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(model, *tiny_loaders())
    assert model.model.conv.out_channels == expected.conv.out_channels == 12
    # The two branches share the 12 kept channels; which branch keeps more depends on the weights.
    assert model.model.branch_a.out_channels + model.model.branch_b.out_channels == 12
    assert len(model.compression_records) == len(epochs)


def test_callback_two_ratios_on_one_coupled_group_name_the_group(tmp_path):
    callback = PruningCallback(ratios={"conv": 0.25, "branch_*": 0.5})
    with pytest.raises(ValueError, match=r"Layers \['conv', 'branch_a', 'branch_b'\]|coupled.*different ratios"):
        tiny_trainer(tmp_path, callbacks=[callback]).fit(classifier(arch=ConcatResidual()), *tiny_loaders())


# --- the optimizer rebuild keeps what schedulers set on the param groups --------------------


class AdamOneCycle(pl.LightningModule):
    """A user's module: Adam under OneCycleLR, which cycles betas[0] with the lr."""

    def __init__(self) -> None:
        super().__init__()
        self.model = ConcatResidual()
        self.example_input_array = torch.zeros(1, *INPUT_SHAPE)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        return nn.functional.cross_entropy(self.model(images), targets)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class GroupRecorder(pl.Callback):
    """Records param group 0 at the start of epoch 1 (before the edit, when placed before the
    pruning callback) and at its first batch (after the edit, before any optimizer step)."""

    def __init__(self) -> None:
        self.before: dict = {}
        self.after: dict = {}

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.before = {k: v for k, v in trainer.optimizers[0].param_groups[0].items() if k != "params"}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 0:
            self.after = {k: v for k, v in trainer.optimizers[0].param_groups[0].items() if k != "params"}


@pytest.mark.parametrize("module_factory, key", [(AdamOneCycle, "betas"), (None, "momentum")])
def test_rebuild_after_an_edit_keeps_onecycle_momentum_and_betas(tmp_path, module_factory, key):
    module = module_factory() if module_factory else classifier(lr_schedule="onecycle")
    recorder = GroupRecorder()
    pruning = PruningCallback(amount=0.25, epochs=[1])
    tiny_trainer(tmp_path, callbacks=[recorder, pruning]).fit(module, tiny_loaders()[0])
    assert len(pruning.records) == 1
    initial = (0.95, 0.999) if key == "betas" else 0.95  # OneCycleLR's max_momentum starts the cycle
    assert recorder.before[key] != initial  # the cycle moved it during epoch 0 ...
    assert recorder.after[key] == recorder.before[key]  # ... and the rebuild kept it
    assert recorder.after["lr"] == recorder.before["lr"]


# --- the profiler's train step and BatchNorm at batch size 1 --------------------------------


def one_by_one_feature_map() -> nn.Module:
    """MobileNetV2 at 32x32 in small: the last stage's BatchNorm2d sees a 1x1 map."""
    return nn.Sequential(nn.Conv2d(3, 8, 16, stride=16), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4))


@pytest.mark.parametrize(
    "factory, layer",
    [(BatchNorm1dHead, r"'head\.1' \(BatchNorm1d\)"), (one_by_one_feature_map, r"'1' \(BatchNorm2d\)")],
)
def test_profile_skips_the_train_step_only_where_batch_norm_sees_one_value_per_channel(caplog, factory, layer):
    model = factory()
    result = profile(model, INPUT_SHAPE, batch_sizes=(1, 2), warmup=0, iters=1)
    assert {(entry.mode, entry.batch_size) for entry in result.latency} == {(INFERENCE, 1), (INFERENCE, 2), (TRAIN, 2)}
    assert [m.train_total_bytes is None for m in result.memory] == [True, False]
    assert re.search(layer + r" gets one value per channel.*batch size >= 2", caplog.text)
    assert model.training  # left as found


def test_profile_callback_default_batch_size_runs_on_a_batch_norm_head(tmp_path):
    callback = ProfileCallback(warmup=0, iters=1, threads=1)
    tiny_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(classifier(arch=BatchNorm1dHead()), *tiny_loaders())
    assert [entry.mode for entry in callback.baseline[0].latency] == [INFERENCE]
    assert [entry.mode for entry in callback.latest[0].latency] == [INFERENCE]


# --- models returning a ModelOutput, a tuple or a dict: the quantization report -------------


class HFUserModule(pl.LightningModule):
    """A user's module around a Hugging Face-style model: it reads `.logits` itself."""

    def __init__(self, returns: str) -> None:
        super().__init__()
        self.model = HFStyleClassifier(returns=returns)
        self.example_input_array = torch.zeros(1, *INPUT_SHAPE)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        return nn.functional.cross_entropy(logits_of(self.model(images)), targets)

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def check_report_reads_logits(tmp_path, returns: str, int8: bool) -> dict[str, float]:
    module = HFUserModule(returns)
    callback = QuantizationCallback(
        calibration_batches=2, int8=int8, latency_batch_sizes=[2], latency_warmup=0, latency_iters=1
    )
    train, val = tiny_loaders()
    tiny_trainer(tmp_path, max_epochs=1, callbacks=[callback], limit_val_batches=1.0).fit(module, train, val)
    with torch.no_grad():
        correct = sum(int(logits_of(module.model(x)).argmax(-1).eq(y).sum()) for x, y in val)
    assert callback.results["quant/val_top1_float"] == pytest.approx(correct / len(val.dataset))
    assert 0 <= callback.results["quant/val_top1_sim8"] <= 1
    assert callback.results["quant/latency_ms/torch_float/bs2"] > 0
    return callback.results


@pytest.mark.parametrize("returns", ["model_output", "tuple", "dict"])
def test_quantization_report_reads_logits_from_model_outputs(tmp_path, returns):
    check_report_reads_logits(tmp_path, returns, int8=False)


@pytest.mark.slow
def test_quantization_int8_export_of_a_model_output_model(tmp_path):
    results = check_report_reads_logits(tmp_path, "model_output", int8=True)
    assert 0 <= results["quant/val_top1_int8"] <= 1 and results["quant/latency_ms/ort_int8/bs2"] > 0


def test_quantization_unreadable_output_fails_before_training(tmp_path):
    module = HFUserModule("dict_without_logits")
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=r"QuantizationCallback evaluates HFStyleClassifier by its logits: .*dict "
                       r"with keys \['scores'\].*Return logits from `forward`, or set `module_path`"):  # fmt: skip
        tiny_trainer(tmp_path, callbacks=[QuantizationCallback(int8=False)]).fit(module, tiny_loaders()[0])
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # not trained


@pytest.mark.parametrize(
    "output, expected",
    [
        (torch.ones(2, 3), "tensor"),
        ({"logits": torch.ones(2, 3)}, "dict"),
        ((torch.ones(2, 3), torch.zeros(1)), "tuple"),
    ],
)
def test_logits_of_reads_each_output_kind(output, expected):
    assert torch.equal(logits_of(output), torch.ones(2, 3)), expected


def test_logits_of_names_what_it_found():
    with pytest.raises(TypeError, match=r"got str\."):
        logits_of("not logits")


# --- Tucker: conv subclasses with their own forward, parents reading the conv's attributes ---


def test_tucker_keeps_a_same_padding_conv_subclass_and_says_why(caplog):
    model, x = SamePadNet(), example_batch()
    expected = model(x)
    record = decompose_model(model, rank_method=0.5, skip_first_conv=False)
    rows = {row["name"]: row for row in record.report}
    assert rows["conv"]["decision"] == "kept" and "Conv2dSame overrides forward" in rows["conv"]["reason"]
    assert rows["stem"]["decision"] == "decomposed"
    assert type(model.conv).__name__ == "Conv2dSame" and "Conv2dSame overrides forward" in caplog.text
    assert model(x).shape == expected.shape


@pytest.mark.parametrize(
    "kwargs",
    [{"layer_patterns": ["conv"], "rank_method": 0.5}, {"rank_method": {"conv": (4, 4)}}],
)
def test_tucker_naming_a_same_padding_conv_subclass_is_an_error(kwargs):
    model = SamePadNet()
    with pytest.raises(ValueError, match=r"names 'conv': Conv2dSame overrides forward.*leave it out of"):
        decompose_model(model, **kwargs)
    assert type(model.conv).__name__ == "Conv2dSame"


def test_tucker_replacement_keeps_the_attributes_a_parent_reads():
    model, x = HFMobileNetStyle(), example_batch()
    model.eval()
    expected = model(x)
    record = decompose_model(model, rank_method=1.0, skip_first_conv=False, require_reduction=False)
    assert isinstance(model.layer.convolution, TuckerConv2d)
    conv = model.layer.convolution
    assert (conv.kernel_size, conv.stride, conv.dilation, conv.in_channels, conv.out_channels) == (
        (3, 3), (1, 1), (1, 1), 8, 16,
    )  # fmt: skip
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)  # full rank: the same function
    fresh = HFMobileNetStyle().eval()
    TuckerRecord.from_dict(record.to_dict()).apply(fresh)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x))


def test_svd_split_of_a_strided_pointwise_conv_keeps_its_attributes():
    layer, x = MobileNetV2ConvLayer(8, 16, 1, stride=2).eval(), torch.randn(2, 8, 9, 9)
    expected = layer(x)
    decompose_model(layer, rank_method=1.0, skip_first_conv=False, require_reduction=False)
    conv = layer.convolution
    assert isinstance(conv, SVDSplit)
    assert (conv.kernel_size, conv.stride, conv.padding, conv.in_channels, conv.out_channels) == (
        (1, 1), (2, 2), (0, 0), 8, 16,
    )  # fmt: skip
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)


# --- init_from with another input-channel or class count (ImageNet -> grayscale Steelpatch) --


def save_lightning_style(module: ImageClassifier, path) -> None:
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)


def test_init_from_adapts_rgb_stem_to_grayscale_and_resets_the_classifier(tmp_path, caplog):
    source = classifier(num_classes=10)
    save_lightning_style(source, tmp_path / "rgb10.ckpt")
    with caplog.at_level(logging.INFO, logger="compresslight.classifier"):
        model = classifier(num_classes=4, input_shape=(1, 16, 16), init_from=str(tmp_path / "rgb10.ckpt"))
    assert "input conv 'conv1' adapted from 3 to 1 channels (sum of the filters)" in caplog.text
    assert "classifier 'fc' reset: 10 classes in the checkpoint, 4 here" in caplog.text
    gray = torch.randn(2, 1, 16, 16)
    # A gray image gets the response the RGB filters give it as three equal channels.
    torch.testing.assert_close(model.model.conv1(gray), source.model.conv1(gray.repeat(1, 3, 1, 1)))
    torch.testing.assert_close(model.model.layer2[0].conv1.weight, source.model.layer2[0].conv1.weight)
    assert model.model.fc.out_features == 4 and model(gray).shape == (2, 4)


def test_init_from_a_plain_state_dict_repeats_and_rescales(tmp_path, caplog):
    """A plain state dict, as torchvision publishes its ImageNet weights (keys of the model itself)."""
    source = create_model("resnet20", num_classes=20)
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    with caplog.at_level(logging.INFO, logger="compresslight.classifier"):
        model = classifier(num_classes=4, input_shape=(2, 16, 16), init_from=str(tmp_path / "plain.pth"))
    assert "adapted from 3 to 2 channels (filters repeated and rescaled)" in caplog.text
    torch.testing.assert_close(model.model.conv1.weight, source.conv1.weight[:, :2] * 1.5)
    torch.testing.assert_close(model.model.layer3[2].conv2.weight, source.layer3[2].conv2.weight)
    assert model.model.fc.out_features == 4


def test_init_from_a_file_with_none_of_the_models_weights_is_refused(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"`init_from` .*other\.pth' holds no weight of this model"):
        classifier(init_from=str(tmp_path / "other.pth"))


def test_adapted_weights_leave_other_mismatches_to_the_shape_check():
    model = create_model("resnet20", num_classes=4)
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    weights["layer1.0.conv1.weight"] = torch.zeros(8, 16, 3, 3)
    adapted, notes = adapt_pretrained_weights(model, weights)
    assert notes == [] and adapted["layer1.0.conv1.weight"].shape == (8, 16, 3, 3)


def test_create_model_with_weights_adapts_like_init_from(tmp_path, caplog):
    source = create_model("resnet20", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "rgb10.pth")
    with caplog.at_level(logging.INFO, logger="compresslight.checkpoint"):
        model = create_model("resnet20", num_classes=4, in_channels=1, weights=str(tmp_path / "rgb10.pth"))
    assert "input conv 'conv1' adapted from 3 to 1 channels" in caplog.text and "classifier 'fc' reset" in caplog.text
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.layer3[2].bn2.running_var, source.layer3[2].bn2.running_var)


def test_create_model_with_weights_of_another_architecture_names_the_tensors(tmp_path):
    torch.save(create_model("resnet56").state_dict(), tmp_path / "resnet56.pth")
    with pytest.raises(ValueError, match=r"do not fit CifarResNet: layer1\.3\.conv1\.weight: not in the model"):
        create_model("resnet20", weights=str(tmp_path / "resnet56.pth"))


@pytest.mark.slow  # two full-size resnet18s (~4 s)
def test_steelpatch_baseline_config_starts_from_rgb_imagenet_style_weights(tmp_path, monkeypatch, caplog):
    """The config's `--model.init_from` with a 3-channel, 1000-class resnet18 state dict."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    imagenet_style = create_model("resnet18", num_classes=1000)
    torch.save(imagenet_style.state_dict(), tmp_path / "resnet18_imagenet.pth")
    config = REPO / "configs" / "resnet18_steelpatch_baseline.yaml"
    with caplog.at_level(logging.INFO, logger="compresslight.classifier"):
        model, datamodule, _ = build_from_config(
            ["--config", str(config), "--data.num_classes", "6", "--model.init_from", "resnet18_imagenet.pth"]
        )
    assert "input conv 'conv1' adapted from 3 to 1 channels" in caplog.text
    assert "classifier 'fc' reset: 1000 classes in the checkpoint, 6 here" in caplog.text
    torch.testing.assert_close(model.model.conv1.weight, imagenet_style.conv1.weight.sum(1, keepdim=True))
    assert datamodule.input_shape[0] == 1 and model.model.fc.out_features == 6
