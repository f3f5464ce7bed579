"""Quantization: paper 001's min/max simulation, QAT, and int8 ONNX Runtime inference."""

from __future__ import annotations

import copy
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn

from compresslight.compression.quantization import (
    ActivationQuantizer,
    FakeQuantConv2d,
    FakeQuantLinear,
    FakeQuantRecord,
    calibrate,
    convert_to_simulated,
    fake_quant_record,
    fake_quantize,
    insert_fake_quant,
    prepare_qat,
    quantization_params,
    quantize_model_simulated,
    strip_fake_quant,
)
from compresslight.compression.quantization_onnx import OnnxRuntimeModel, export_int8_onnx
from compresslight.compression.record import CompressionRecord, replay

INPUT_SHAPE = (1, 3, 16, 16)


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise, as in the compact VGG16
            nn.ReLU(),
            nn.Conv2d(8, 16, 1),
            nn.ReLU(),
        )
        self.head = nn.Linear(16 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    # A few training-mode passes give BatchNorm non-trivial running statistics.
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16) * 2 + 0.5)
    return model.eval()


def batches(count: int = 4, batch_size: int = 16, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, 3, 16, 16, generator=generator) for _ in range(count)]


# ---- range mapping ------------------------------------------------------------------------


def test_range_mapping_matches_paper_001_table_ii() -> None:
    scale, zero_point = quantization_params(torch.tensor(-15.0), torch.tensor(25.0), bits=8)
    stored = torch.tensor([-15.0, 5.0, 25.0])
    quantized = torch.clamp(torch.round(stored / scale) + zero_point, 0, 255)
    assert quantized.tolist() == [0, 128, 255]
    assert scale.item() == pytest.approx(40.0 / 255.0)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_range_includes_zero_exactly(bits: int) -> None:
    x = torch.tensor([0.0, 0.3, 0.9, 1.7])  # all >= 0: the range is widened down to 0
    out = fake_quantize(x, x.min(), x.max(), bits)
    assert out[0].item() == 0.0


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_error_bounded_by_half_scale(bits: int, per_channel: bool) -> None:
    torch.manual_seed(0)
    layer = FakeQuantConv2d.from_float(nn.Conv2d(4, 6, 3), bits=bits, per_channel=per_channel)
    error = (layer.quantized_weight() - layer.weight).abs().detach()
    scale = layer.weight_scale
    bound = scale.view(-1, 1, 1, 1) / 2 if per_channel else scale / 2
    assert torch.all(error <= bound * (1 + 1e-5))
    assert error.max() > 0  # something was actually rounded
    levels = torch.unique(layer.quantized_weight().detach()[0]).numel()
    assert levels <= 2**bits


def test_per_channel_beats_per_tensor_on_mixed_channel_ranges() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([100.0, 1.0, 0.01, 0.1]).view(-1, 1, 1, 1))
    errors = {}
    for per_channel in (False, True):
        layer = FakeQuantConv2d.from_float(conv, bits=8, per_channel=per_channel)
        # Relative error per output channel, averaged: the big channel must not hide the others.
        difference = (layer.quantized_weight() - conv.weight).flatten(1)
        channel_errors = difference.norm(dim=1) / conv.weight.flatten(1).norm(dim=1)
        errors[per_channel] = channel_errors.mean().item()
        small_channel_error = (layer.quantized_weight() - conv.weight)[2].abs().max().item()
        if not per_channel:
            # One range for all channels: the tiny channel is rounded away entirely.
            assert torch.all(layer.quantized_weight()[2] == 0)
        else:
            assert small_channel_error < 0.01 * conv.weight[2].abs().max().item()
    assert errors[True] < errors[False] / 10


def test_fake_quantize_keeps_low_precision_dtype() -> None:
    x = torch.randn(10).bfloat16()
    out = fake_quantize(x, x.min(), x.max(), 8)
    assert out.dtype == torch.bfloat16


# ---- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 17, 0, 8.0, True, "8"])
def test_bits_outside_2_to_16_is_rejected(bits: object) -> None:
    model = tiny_net()
    with pytest.raises(ValueError, match=r"`bits` must be an integer in \[2, 16\], got"):
        quantization_params(torch.tensor(-1.0), torch.tensor(1.0), bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`bits` must be an integer in \[2, 16\]"):
        quantize_model_simulated(model, calibration_batches=batches(1), bits=bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`bits` must be an integer in \[2, 16\]"):
        prepare_qat(model, bits=bits)  # type: ignore[arg-type]
    assert not any(isinstance(m, FakeQuantConv2d) for m in model.modules())


@pytest.mark.parametrize("averaging_constant", [0.0, 1.5, -0.1])
def test_averaging_constant_is_validated(averaging_constant: float) -> None:
    with pytest.raises(ValueError, match=r"`averaging_constant` must be .*in \(0, 1\]"):
        prepare_qat(tiny_net(), averaging_constant=averaging_constant)
    with pytest.raises(ValueError, match=r"`averaging_constant` must be None or in \(0, 1\]"):
        ActivationQuantizer(8, averaging_constant)


def test_model_without_conv_or_linear_is_rejected() -> None:
    with pytest.raises(ValueError, match="has no Conv1d/Conv2d/Conv3d/Linear layer"):
        quantize_model_simulated(nn.Sequential(nn.ReLU()), calibration_batches=batches(1))


def test_quantizing_twice_is_rejected() -> None:
    model = prepare_qat(tiny_net())
    with pytest.raises(ValueError, match="already has fake-quant layers"):
        insert_fake_quant(model)


def test_empty_calibration_is_rejected() -> None:
    with pytest.raises(ValueError, match="`calibration_batches` is empty"):
        quantize_model_simulated(tiny_net(), calibration_batches=[])


def test_bad_calibration_batch_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="`calibration_batches` must yield tensors or"):
        quantize_model_simulated(tiny_net(), calibration_batches=[{"x": 1}])
    raw_images = torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"must hold float model inputs .*got dtype torch.uint8"):
        quantize_model_simulated(tiny_net(), calibration_batches=[raw_images])


def test_layer_no_batch_reached_is_named() -> None:
    class SkipsALayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 2)
            self.unused = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(ValueError, match=r"Layers \['unused'\] never saw an input"):
        quantize_model_simulated(SkipsALayer(), calibration_batches=[torch.randn(3, 4)])


# ---- simulated post-training quantization -------------------------------------------------


def test_simulated_8bit_is_close_to_float_and_leaves_original_untouched() -> None:
    model = tiny_net()
    before = copy.deepcopy(model.state_dict())
    quantized = quantize_model_simulated(model, calibration_batches=batches())

    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fake = [m for m in quantized.modules() if isinstance(m, (FakeQuantConv2d, FakeQuantLinear))]
    assert len(fake) == 4
    assert quantized.features[0].weight is not model.features[0].weight

    x = batches(1, seed=7)[0]
    with torch.no_grad():
        reference, simulated = model(x), quantized(x)
    relative_error = (simulated - reference).norm() / reference.norm()
    assert 0 < relative_error < 0.05
    assert (simulated.argmax(1) == reference.argmax(1)).float().mean() >= 0.9


def test_fewer_bits_give_larger_error() -> None:
    model = tiny_net()
    x = batches(1, seed=7)[0]
    with torch.no_grad():
        reference = model(x)
        errors = [
            (quantize_model_simulated(model, calibration_batches=batches(), bits=bits)(x) - reference).norm().item()
            for bits in (3, 5, 8, 12)
        ]
    assert errors == sorted(errors, reverse=True)


def test_activations_are_quantized_to_2_to_the_bits_levels() -> None:
    quantizer = ActivationQuantizer(bits=3)
    quantizer.train()
    quantizer(torch.linspace(-1.0, 2.0, 50))  # calibrate
    quantizer.observer_enabled, quantizer.fake_quant_enabled = False, True
    out = quantizer(torch.linspace(-3.0, 5.0, 1000))
    assert torch.unique(out).numel() <= 8
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 2.0 + 3.0 / 7  # clamped to the calibrated range


def test_calibration_tracks_running_min_max_in_eval_mode() -> None:
    model = tiny_net()
    model.train()  # calibrate must not update BatchNorm statistics, whatever mode it was in
    running_mean = model.features[1].running_mean.clone()
    insert_fake_quant(model)
    data = batches(3)
    assert calibrate(model, [(x, torch.zeros(len(x))) for x in data]) == 3
    first = model.features[0].input_quantizer
    assert first.min_val.item() == pytest.approx(min(x.min().item() for x in data))
    assert first.max_val.item() == pytest.approx(max(x.max().item() for x in data))
    assert torch.equal(model.features[1].running_mean, running_mean)
    assert model.training and model.features[0].input_quantizer.training


def test_simulated_model_reloads_from_record_and_state_dict(tmp_path: Path) -> None:
    model = tiny_net()
    quantized = quantize_model_simulated(model, calibration_batches=batches(), bits=6, per_channel=True)
    record = fake_quant_record(quantized)
    layers = ["features.0", "features.4", "features.6", "head"]
    assert record == FakeQuantRecord(layers=layers, bits=6, per_channel=True)
    torch.save({"records": [record.to_dict()], "state_dict": quantized.state_dict()}, tmp_path / "q.pt")

    saved = torch.load(tmp_path / "q.pt")
    fresh = TinyNet()
    replay(fresh, [CompressionRecord.from_dict(r) for r in saved["records"]])
    fresh.load_state_dict(saved["state_dict"])
    fresh.eval()
    x = batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(fresh(x), quantized(x))


def test_record_naming_a_missing_layer_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"FakeQuantRecord `layers` \['nope'\] are not submodules"):
        FakeQuantRecord(layers=["nope"]).apply(tiny_net())


# ---- quantization-aware training ----------------------------------------------------------


def learnable_problem() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (64,), generator=generator)
    images = torch.randn(64, 3, 16, 16, generator=generator) * 0.5 + targets.view(-1, 1, 1, 1) * 0.5
    return images, targets


def test_qat_trains_and_gradients_flow() -> None:
    model = tiny_net().train()
    original_weight = model.features[0].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    prepared = prepare_qat(model, bits=4, inplace=True)
    assert prepared is model and model.features[0].weight is original_weight  # optimizer still valid

    images, targets = learnable_problem()
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for layer in (model.features[0], model.features[4], model.head):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert losses[-1] < 0.6 * losses[0]
    first = model.features[0].input_quantizer
    assert first.is_calibrated and first.min_val < 0 < first.max_val


def test_qat_observes_only_in_training_mode_and_freezes() -> None:
    model = prepare_qat(tiny_net(), averaging_constant=0.5)
    quantizer = model.features[0].input_quantizer
    model.train()
    model(torch.ones(2, 3, 16, 16))
    model(torch.full((2, 3, 16, 16), 3.0))
    assert quantizer.max_val.item() == pytest.approx(2.0)  # EMA: 1 + 0.5 * (3 - 1)

    model.eval()
    model(torch.full((2, 3, 16, 16), 100.0))
    assert quantizer.max_val.item() == pytest.approx(2.0)

    convert_to_simulated(model).train()
    out = model(torch.full((2, 3, 16, 16), 100.0))
    assert quantizer.max_val.item() == pytest.approx(2.0)
    assert torch.isfinite(out).all()


def test_strip_fake_quant_gives_plain_float_layers() -> None:
    prepared = prepare_qat(tiny_net())
    stripped = strip_fake_quant(prepared)
    assert type(stripped.features[0]) is nn.Conv2d and type(stripped.head) is nn.Linear
    assert torch.equal(stripped.head.weight, prepared.head.weight)
    assert isinstance(prepared.head, FakeQuantLinear)  # the input is untouched


# ---- int8 inference with ONNX Runtime -----------------------------------------------------


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyNet, Path, Path]:
    directory = tmp_path_factory.mktemp("onnx")
    model = tiny_net()
    float_path = directory / "float.onnx"
    int8_path = export_int8_onnx(
        model, INPUT_SHAPE, batches(), directory / "int8.onnx", per_channel=True, float_path=float_path
    )
    return model, float_path, int8_path


def test_int8_onnx_is_close_to_float(int8_export: tuple[TinyNet, Path, Path]) -> None:
    model, float_path, int8_path = int8_export
    x = batches(2, batch_size=32, seed=11)
    int8_model, float_model = OnnxRuntimeModel(int8_path, num_threads=1), OnnxRuntimeModel(float_path, num_threads=1)
    with torch.no_grad():
        for batch in x:
            reference = model(batch)
            torch.testing.assert_close(float_model(batch), reference, atol=1e-4, rtol=1e-4)
            int8_logits = int8_model(batch)
            assert int8_logits.shape == reference.shape and int8_logits.dtype == torch.float32
            assert (int8_logits - reference).norm() / reference.norm() < 0.1
            assert (int8_logits.argmax(1) == reference.argmax(1)).float().mean() >= 0.9
    # Any batch size: batch 1 was never seen during export or calibration.
    assert int8_model(x[0][:1]).shape == (1, 5)


def test_int8_onnx_reloads_in_a_fresh_session_and_is_smaller(int8_export: tuple[TinyNet, Path, Path]) -> None:
    model, float_path, int8_path = int8_export
    session = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    x = batches(1, seed=12)[0]
    (logits,) = session.run(None, {"input": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), OnnxRuntimeModel(int8_path)(x))
    # int8 weights save 3 bytes per weight element (biases stay 32-bit, scales add a little).
    weight_elements = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert float_path.stat().st_size - int8_path.stat().st_size > 2.5 * weight_elements
    assert OnnxRuntimeModel(int8_path).file_size_bytes == int8_path.stat().st_size


def test_onnx_runtime_model_survives_deepcopy_and_pickle(
    int8_export: tuple[TinyNet, Path, Path], tmp_path: Path
) -> None:
    _, _, int8_path = int8_export
    runner = OnnxRuntimeModel(int8_path, num_threads=1)
    x = batches(1, seed=13)[0]
    torch.save(runner, tmp_path / "runner.pt")
    for clone in (copy.deepcopy(runner), torch.load(tmp_path / "runner.pt", weights_only=False)):
        torch.testing.assert_close(clone(x), runner(x))


@pytest.mark.slow
def test_qat_model_exports_to_int8(int8_export: tuple[TinyNet, Path, Path], tmp_path: Path) -> None:
    model, _, _ = int8_export
    prepared = prepare_qat(model)
    prepared.train()
    prepared(batches(1)[0])
    convert_to_simulated(prepared).eval()
    path = export_int8_onnx(prepared, INPUT_SHAPE, batches(2), tmp_path / "qat.onnx")
    x = batches(1, seed=14)[0]
    with torch.no_grad():
        reference = prepared(x)
    assert (OnnxRuntimeModel(path)(x).argmax(1) == reference.argmax(1)).float().mean() >= 0.9
    assert isinstance(prepared.head, FakeQuantLinear)  # export strips a copy, not the model


def convtranspose_net() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 2), nn.Flatten(), nn.Linear(4 * 15 * 15, 3)]
    return nn.Sequential(*layers).eval()


def test_int8_onnx_names_a_layer_without_int8_kernel(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no int8 CPU kernel .*\['1 \(ConvTranspose\)'\]"):
        export_int8_onnx(convtranspose_net(), INPUT_SHAPE, batches(2), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.slow
def test_int8_onnx_can_keep_layers_without_int8_kernel_in_float(tmp_path: Path) -> None:
    path = export_int8_onnx(convtranspose_net(), INPUT_SHAPE, batches(2), tmp_path / "ok.onnx", allow_float_layers=True)
    assert OnnxRuntimeModel(path)(batches(1)[0]).shape == (16, 3)


def test_int8_onnx_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`calibration_batches` is empty"):
        export_int8_onnx(tiny_net(), INPUT_SHAPE, [], tmp_path / "x.onnx")
    with pytest.raises(ValueError, match=r"`example_input_shape` must be a full input shape"):
        export_int8_onnx(tiny_net(), (3, 0, 16), batches(1), tmp_path / "x.onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OnnxRuntimeModel(tmp_path / "missing.onnx")


def test_onnx_runtime_model_validates_threads(int8_export: tuple[TinyNet, Path, Path]) -> None:
    with pytest.raises(ValueError, match="`num_threads` must be >= 1 or None, got 0"):
        OnnxRuntimeModel(int8_export[2], num_threads=0)
