"""Quantization: simulated min/max quantization (paper 001), QAT, and real int8 inference on CPU.

Paper 001 (section VII-A) quantizes a trained VGG16 with TensorFlow's range mapping: a tensor is
stored as its float `min` and `max`, and every element as an integer in `[0, 2**bits - 1]`
spread linearly between them (Table II: min -15.0, max 25.0 -> -15.0 is 0, 5.0 is 128, 25.0 is
255). The quantized values are dequantized again, so inference still runs in float: the accuracy
drop is exactly the quantization error. This module offers three levels of it:

| function | what it gives | runs on |
|---|---|---|
| `quantize_model_simulated` | paper 001's post-training simulation, calibrated min/max | any device, float |
| `prepare_qat`, `convert_to_simulated` | QAT: fake-quant, STE gradients, EMA ranges | any device, trainable |
| `export_int8_onnx`, `OnnxRuntimeModel` (`quantization_onnx`) | real int8 kernels: ONNX Runtime (QDQ) | CPU, ORT |

Where fake quantization sits (one scheme for both simulation and QAT): every `Conv1d/2d/3d` and
`Linear` gets its *weight* and its *input activation* quantized, i.e. exactly the two operands an
int8 GEMM/convolution kernel consumes (paper 001 Fig. 8 (b)). Biases stay float (int8 backends
keep them in int32 at scale `input_scale * weight_scale`, which is practically lossless);
BatchNorm stays float (int8 backends fold it into the preceding convolution); the network's
output (logits) is left float. Weights use their own current min/max (per tensor, or per output
channel with `per_channel=True`); activations use ranges observed on calibration batches (running
min/max) or, under QAT, an exponential moving average of batch min/max.

Range mapping (`quantization_params`): the range is first widened to include 0 (so zero padding
and ReLU zeros are exact), `scale = (max - min) / (2**bits - 1)`, and the zero point is the
integer `round(-min / scale)`. Because the zero point is an integer, the representable range is
shifted by at most `scale / 2`; the error of any value inside `[min, max]` is at most `scale / 2`.

PyTorch pieces used, checked on torch 2.13: `torch.fake_quantize_per_tensor_affine` and
`torch.fake_quantize_per_channel_affine` (core ATen ops, not deprecated, integer ranges up to
16 bits, straight-through gradients that are zero outside the clamp range). Not used: the
`torch.ao.quantization` flows (`prepare`, `convert`, `quantize_dynamic`, `prepare_qat`,
`prepare_fx`, `convert_fx`) are decorated `@deprecated` in torch 2.13 ("torch.ao.quantization is
deprecated and will be removed in 2.10 ... migrate to torchao"), and PT2E
(`prepare_pt2e`/`convert_pt2e`, X86InductorQuantizer/XNNPACKQuantizer) now lives in torchao,
which is not installed. The observer classes of that namespace are not decorated but share its
announced removal, so the few lines of min/max and EMA tracking are written here instead.

Real int8 (`compresslight.compression.quantization_onnx`): ONNX Runtime `quantize_static` (QDQ
format, uint8 activations, int8 weights, MinMax calibration, optional per-channel weights) on the
model exported with the torch.export-based `torch.onnx.export` (the TorchScript exporter is
deprecated). The result is one self-contained `.onnx` file that any process reloads with
`OnnxRuntimeModel(path)` or a plain `onnxruntime.InferenceSession(path)`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compresslight.compression.record import CompressionRecord, register_record

log = logging.getLogger(__name__)

MIN_BITS = 2
MAX_BITS = 16
DEFAULT_QAT_AVERAGING_CONSTANT = 0.01

__all__ = [
    "ActivationQuantizer",
    "FakeQuantConv1d",
    "FakeQuantConv2d",
    "FakeQuantConv3d",
    "FakeQuantLinear",
    "FakeQuantRecord",
    "calibrate",
    "convert_to_simulated",
    "fake_quant_record",
    "fake_quantize",
    "float_only_layers",
    "insert_fake_quant",
    "prepare_qat",
    "quantization_params",
    "quantize_model_simulated",
    "strip_fake_quant",
]


# --------------------------------------------------------------------------------------------
# Range mapping and fake quantization of one tensor
# --------------------------------------------------------------------------------------------


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"`bits` must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}.")
    return bits


def quantization_params(min_val: Tensor, max_val: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Scale and zero point of paper 001's min/max range mapping (TensorFlow style, Table II).

    Works elementwise, so per-channel ranges give per-channel parameters.

    Args:
        min_val: smallest value to represent (a scalar tensor, or one per channel).
        max_val: largest value to represent, same shape as `min_val`.
        bits: integer width; quantized values are `0 .. 2**bits - 1`.

    Returns:
        `(scale, zero_point)`: float32 scale and int32 zero point, shaped like `min_val`.
        A value `x` is stored as `clamp(round(x / scale) + zero_point, 0, 2**bits - 1)`.

    Raises:
        ValueError: if `bits` is outside [2, 16] or the shapes differ.
    """
    _check_bits(bits)
    if min_val.shape != max_val.shape:
        raise ValueError(
            f"`min_val` and `max_val` must have the same shape, got {tuple(min_val.shape)} and {tuple(max_val.shape)}."
        )
    quant_max = 2**bits - 1
    # Widening to include 0 makes zero (padding, ReLU output, pruned weights) exactly representable.
    min_val = torch.clamp(min_val.detach().float(), max=0.0)
    max_val = torch.clamp(max_val.detach().float(), min=0.0)
    scale = (max_val - min_val) / quant_max
    # An all-zero tensor has no range; any positive scale maps it to the zero point exactly.
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(torch.float32).eps))
    zero_point = torch.clamp(torch.round(-min_val / scale), 0, quant_max).to(torch.int32)
    return scale, zero_point


def fake_quantize(
    x: Tensor, min_val: Tensor, max_val: Tensor, bits: int = 8, channel_axis: int | None = None
) -> Tensor:
    """Quantizes `x` to `bits` with the range `[min_val, max_val]` and dequantizes it again.

    Gradients pass straight through (1 inside the range, 0 where the value was clamped).

    Args:
        x: tensor to quantize.
        min_val: range minimum: a scalar tensor (per tensor) or one value per channel.
        max_val: range maximum, same shape as `min_val`.
        bits: integer width, 2 to 16.
        channel_axis: the axis `min_val`/`max_val` index when they are per channel; None for a
            per-tensor range.

    Raises:
        ValueError: for `bits` outside [2, 16], or per-channel ranges that do not match `x`.
    """
    scale, zero_point = quantization_params(min_val, max_val, bits)
    quant_max = 2**bits - 1
    # The ATen kernels are float32 kernels; mixed-precision activations round-trip through it.
    x32 = x if x.dtype == torch.float32 else x.float()
    if channel_axis is None:
        out = torch.fake_quantize_per_tensor_affine(x32, scale.reshape(1), zero_point.reshape(1), 0, quant_max)
    else:
        channels = x.shape[channel_axis]
        if scale.dim() != 1 or scale.numel() != channels:
            raise ValueError(
                f"Per-channel `min_val` must hold one value per channel of axis {channel_axis} "
                f"({channels}), got shape {tuple(min_val.shape)}."
            )
        out = torch.fake_quantize_per_channel_affine(x32, scale, zero_point, channel_axis, 0, quant_max)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _check_averaging_constant(averaging_constant: float | None) -> float | None:
    if averaging_constant is not None and not (
        isinstance(averaging_constant, (int, float)) and 0.0 < averaging_constant <= 1.0
    ):
        raise ValueError(f"`averaging_constant` must be None or in (0, 1], got {averaging_constant!r}.")
    return averaging_constant


def _weight_range(weight: Tensor, per_channel: bool) -> tuple[Tensor, Tensor]:
    weight = weight.detach()
    if per_channel:
        return torch.aminmax(weight.reshape(weight.shape[0], -1), dim=1)
    return torch.aminmax(weight)


# --------------------------------------------------------------------------------------------
# Fake-quant modules
# --------------------------------------------------------------------------------------------


class ActivationQuantizer(nn.Module):
    """Observes the range of the activations passing through and fake-quantizes them.

    Two switches: `observer_enabled` (update the range from each batch, only while this module
    is in training mode) and `fake_quant_enabled` (quantize-dequantize with the stored range).
    Post-training calibration observes without quantizing; QAT does both; a frozen model only
    quantizes. The range and the switches are buffers, so a state_dict carries them; the
    switches are mirrored in Python bools so that no forward pass waits on the GPU to read them.

    Args:
        bits: integer width, 2 to 16.
        averaging_constant: None for the running min/max over all observed batches
            (calibration); a value in (0, 1] for an exponential moving average of batch
            min/max (QAT), where 1 means "the last batch".

    Raises:
        ValueError: for `bits` outside [2, 16] or `averaging_constant` outside (0, 1].
    """

    min_val: Tensor
    max_val: Tensor
    flags: Tensor

    def __init__(self, bits: int = 8, averaging_constant: float | None = None) -> None:
        super().__init__()
        self.bits = _check_bits(bits)
        self.averaging_constant = _check_averaging_constant(averaging_constant)
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        # observer_enabled, fake_quant_enabled, is_calibrated
        self.register_buffer("flags", torch.tensor([True, False, False]))
        self._flags = [True, False, False]

    def _set_flag(self, index: int, value: bool) -> None:
        self._flags[index] = bool(value)
        self.flags[index] = bool(value)

    @property
    def observer_enabled(self) -> bool:
        """Whether training-mode forward passes update the range."""
        return self._flags[0]

    @observer_enabled.setter
    def observer_enabled(self, value: bool) -> None:
        self._set_flag(0, value)

    @property
    def fake_quant_enabled(self) -> bool:
        """Whether forward passes quantize-dequantize."""
        return self._flags[1]

    @fake_quant_enabled.setter
    def fake_quant_enabled(self, value: bool) -> None:
        self._set_flag(1, value)

    @property
    def is_calibrated(self) -> bool:
        """Whether a range has been observed."""
        return self._flags[2]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._flags = [bool(flag) for flag in self.flags.tolist()]

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Updates the stored range with the batch `x`."""
        batch_min, batch_max = (value.float() for value in torch.aminmax(x.detach()))
        if not self.is_calibrated:
            self.min_val.copy_(batch_min)
            self.max_val.copy_(batch_max)
            self._set_flag(2, True)
        elif self.averaging_constant is None:
            torch.minimum(self.min_val, batch_min, out=self.min_val)
            torch.maximum(self.max_val, batch_max, out=self.max_val)
        else:
            self.min_val.add_(self.averaging_constant * (batch_min - self.min_val))
            self.max_val.add_(self.averaging_constant * (batch_max - self.max_val))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.observer_enabled:
            self.observe(x)
        if not self.fake_quant_enabled:
            return x
        if self.is_calibrated:
            return fake_quantize(x, self.min_val, self.max_val, self.bits)
        # Quantizing before any range was observed (e.g. validation before the first QAT step):
        # the batch's own range is the only sensible one, and nothing is stored.
        return fake_quantize(x, *torch.aminmax(x.detach()), self.bits)

    def extra_repr(self) -> str:
        observed = f"[{self.min_val.item():.4g}, {self.max_val.item():.4g}]" if self.is_calibrated else "unobserved"
        return (
            f"bits={self.bits}, averaging_constant={self.averaging_constant}, range={observed}, "
            f"observer_enabled={self.observer_enabled}, fake_quant_enabled={self.fake_quant_enabled}"
        )


class _FakeQuantMixin:
    """Turns a Conv/Linear class into its fake-quant form: weight and input quantized.

    Args (keyword, after the float layer's own):
        bits: integer width, 2 to 16.
        per_channel: one weight range per output channel (dim 0) instead of one per tensor.
        averaging_constant: how `input_quantizer` tracks its range (see `ActivationQuantizer`).
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self,
        *args: Any,
        bits: int = 8,
        per_channel: bool = False,
        averaging_constant: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.bits = _check_bits(bits)
        self.per_channel = per_channel
        self.input_quantizer = ActivationQuantizer(bits, averaging_constant)

    @classmethod
    def from_float(
        cls, layer: nn.Module, bits: int = 8, per_channel: bool = False, averaging_constant: float | None = None
    ) -> Any:
        """The fake-quant form of `layer`, holding `layer`'s own parameters (shared, not copied)."""
        new = cls(
            **_layer_kwargs(layer),
            bits=bits,
            per_channel=per_channel,
            averaging_constant=averaging_constant,
            device="meta",  # no memory for a weight that is replaced at once
        )
        _adopt_parameters(new, layer)
        return new.to(layer.weight.device)

    def quantized_weight(self) -> Tensor:
        """The weight quantized-dequantized with its own current min/max (STE gradients)."""
        min_val, max_val = _weight_range(self.weight, self.per_channel)
        return fake_quantize(self.weight, min_val, max_val, self.bits, 0 if self.per_channel else None)

    @property
    def weight_scale(self) -> Tensor:
        """Quantization step of the weight (scalar, or one per output channel)."""
        return quantization_params(*_weight_range(self.weight, self.per_channel), self.bits)[0]


def _layer_kwargs(layer: nn.Module) -> dict[str, Any]:
    """Constructor arguments that rebuild `layer`'s structure (Conv1d/2d/3d or Linear)."""
    if isinstance(layer, nn.Linear):
        return dict(in_features=layer.in_features, out_features=layer.out_features, bias=layer.bias is not None)
    return dict(
        in_channels=layer.in_channels,
        out_channels=layer.out_channels,
        kernel_size=layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
    )


def _adopt_parameters(new: nn.Module, old: nn.Module) -> None:
    # The same Parameter objects (not copies): an optimizer built before the swap keeps stepping
    # them, and the state_dict keys `weight`/`bias` are unchanged.
    new.weight = old.weight
    new.bias = old.bias
    new.train(old.training)


class FakeQuantConv1d(_FakeQuantMixin, nn.Conv1d):
    """`nn.Conv1d` whose weight and input are fake-quantized."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class FakeQuantConv2d(_FakeQuantMixin, nn.Conv2d):
    """`nn.Conv2d` whose weight and input are fake-quantized."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class FakeQuantConv3d(_FakeQuantMixin, nn.Conv3d):
    """`nn.Conv3d` whose weight and input are fake-quantized."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class FakeQuantLinear(_FakeQuantMixin, nn.Linear):
    """`nn.Linear` whose weight and input are fake-quantized."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


# Exact types only: a subclass of nn.Conv2d may have its own forward, which the swap would lose.
_FAKE_QUANT_CLASSES: dict[type[nn.Module], type[_FakeQuantMixin]] = {
    nn.Conv1d: FakeQuantConv1d,
    nn.Conv2d: FakeQuantConv2d,
    nn.Conv3d: FakeQuantConv3d,
    nn.Linear: FakeQuantLinear,
}
_FAKE_QUANT_TYPES = tuple(_FAKE_QUANT_CLASSES.values())
_FLOAT_CLASSES: dict[type[_FakeQuantMixin], type[nn.Module]] = {
    fake: float_cls for float_cls, fake in _FAKE_QUANT_CLASSES.items()
}


def _fake_quant_layers(model: nn.Module) -> dict[str, _FakeQuantMixin]:
    return {name: module for name, module in model.named_modules() if isinstance(module, _FAKE_QUANT_TYPES)}


def _activation_quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, ActivationQuantizer)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


# --------------------------------------------------------------------------------------------
# Inserting, calibrating, freezing, removing fake quantization
# --------------------------------------------------------------------------------------------


@register_record
@dataclasses.dataclass
class FakeQuantRecord(CompressionRecord):
    """Which layers carry fake quantization and how; replaying it rebuilds the structure.

    The observed ranges and the observer/fake-quant switches are buffers: they come back with
    the state_dict that is loaded after the replay.
    """

    kind: ClassVar[str] = "fake_quant"
    layers: list[str]
    bits: int = 8
    per_channel: bool = False
    averaging_constant: float | None = None

    def apply(self, model: nn.Module) -> None:
        _check_bits(self.bits)
        modules = dict(model.named_modules())
        missing = [name for name in self.layers if name not in modules]
        if missing:
            raise ValueError(f"FakeQuantRecord `layers` {missing} are not submodules of the model.")
        wrong = {
            name: type(modules[name]).__name__ for name in self.layers if type(modules[name]) not in _FAKE_QUANT_CLASSES
        }
        if wrong:
            raise ValueError(
                f"FakeQuantRecord `layers` must be plain {[c.__name__ for c in _FAKE_QUANT_CLASSES]}, got {wrong}."
            )
        for name in self.layers:
            float_layer = modules[name]
            fake_cls = _FAKE_QUANT_CLASSES[type(float_layer)]
            fake_layer = fake_cls.from_float(float_layer, self.bits, self.per_channel, self.averaging_constant)
            _set_submodule(model, name, fake_layer)


def insert_fake_quant(
    model: nn.Module, *, bits: int = 8, per_channel: bool = False, averaging_constant: float | None = None
) -> FakeQuantRecord:
    """Swaps every plain Conv1d/2d/3d and Linear of `model`, in place, for its fake-quant form.

    The new layers share the old parameters (an existing optimizer keeps working) and start in
    the observing state: activation ranges are recorded while a quantizer is in training mode,
    nothing is quantized yet. `calibrate` then `convert_to_simulated` finish post-training
    quantization; `prepare_qat` switches fake quantization on for training.

    Other weighted layers (ConvTranspose, Embedding, subclasses of Conv2d/Linear with their own
    forward) stay float; a warning names them.

    Args:
        model: the network; edited in place.
        bits: integer width of weights and activations, 2 to 16.
        per_channel: one weight range per output channel instead of one per tensor.
        averaging_constant: None for running min/max activation ranges, a value in (0, 1] for an
            exponential moving average.

    Returns:
        The record that replays this edit on a fresh copy of the architecture.

    Raises:
        ValueError: for `bits` outside [2, 16], `averaging_constant` outside (0, 1], a model that
            is already fake-quantized or has no Conv/Linear layer.
    """
    _check_bits(bits)
    _check_averaging_constant(averaging_constant)
    if _fake_quant_layers(model):
        raise ValueError(
            f"`model` already has fake-quant layers {sorted(_fake_quant_layers(model))}; "
            "quantize the float model, or use `strip_fake_quant` first."
        )
    layers = [name for name, module in model.named_modules() if type(module) in _FAKE_QUANT_CLASSES]
    if not layers:
        raise ValueError("`model` has no Conv1d/Conv2d/Conv3d/Linear layer to quantize.")
    left_float = float_only_layers(model)
    if left_float:
        log.warning("Quantization leaves these weighted layers in float (unsupported type): %s", left_float)
    record = FakeQuantRecord(layers=layers, bits=bits, per_channel=per_channel, averaging_constant=averaging_constant)
    record.apply(model)
    return record


def float_only_layers(model: nn.Module) -> list[str]:
    """Weighted layers that quantization leaves in float, as "name (Type)" strings.

    Every layer with a weight of 2 or more dimensions that is not a plain Conv1d/2d/3d or Linear
    (ConvTranspose, Embedding, a subclass of Conv2d with its own forward, ...): neither the
    simulated path nor, for most of them, ONNX Runtime's int8 kernels quantize it. Fake-quant
    layers count as quantized.
    """
    return [
        f"{name} ({type(module).__name__})"
        for name, module in model.named_modules()
        # Norm layers have 1-d weights and are folded or kept float by every int8 backend.
        if type(module) not in _FAKE_QUANT_CLASSES
        and not isinstance(module, _FAKE_QUANT_TYPES)
        and isinstance(getattr(module, "weight", None), nn.Parameter)
        and module.weight.dim() >= 2
    ]


def fake_quant_record(model: nn.Module) -> FakeQuantRecord:
    """The record that rebuilds `model`'s fake-quant layers on a fresh copy of its architecture.

    Raises:
        ValueError: if `model` has no fake-quant layer or its layers disagree on the settings.
    """
    layers = _fake_quant_layers(model)
    if not layers:
        raise ValueError("`model` has no fake-quant layer; nothing to record.")
    settings = {(m.bits, m.per_channel, m.input_quantizer.averaging_constant) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(
            "`model`'s fake-quant layers mix settings (bits, per_channel, averaging_constant): "
            f"{sorted(settings, key=str)}."
        )
    bits, per_channel, averaging_constant = settings.pop()
    return FakeQuantRecord(
        layers=list(layers), bits=bits, per_channel=per_channel, averaging_constant=averaging_constant
    )


def _batch_input(batch: Any) -> Tensor:
    # DataLoaders yield (inputs, targets); plain tensors are accepted too.
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise ValueError(
            f"`calibration_batches` must yield tensors or (inputs, targets) pairs, got {type(batch).__name__}."
        )
    if not batch.is_floating_point():
        # Raw uint8 images would calibrate ranges 255x too wide: the batches must be what the
        # model sees in training (after the datamodule's normalization).
        raise ValueError(
            f"`calibration_batches` must hold float model inputs (normalized as in training), got dtype {batch.dtype}."
        )
    return batch


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def calibrate(model: nn.Module, calibration_batches: Iterable[Tensor | Sequence[Tensor]]) -> int:
    """Observes activation ranges of a fake-quant `model` on `calibration_batches`.

    The model runs in eval mode (BatchNorm uses running statistics, dropout is off) while its
    activation quantizers observe; all training flags are restored afterwards.

    Args:
        model: a model with fake-quant layers (`insert_fake_quant`).
        calibration_batches: tensors, or (inputs, targets) pairs as a DataLoader yields; moved to
            the model's device.

    Returns:
        The number of batches seen.

    Raises:
        ValueError: if `model` has no activation quantizer, a batch is not a tensor, or there
            is no batch.
    """
    quantizers = _activation_quantizers(model)
    if not quantizers:
        raise ValueError("`model` has no fake-quant layer to calibrate; call `insert_fake_quant` first.")
    training = {module: module.training for module in model.modules()}
    device = _model_device(model)
    count = 0
    try:
        model.eval()
        for quantizer in quantizers.values():
            quantizer.train()  # training mode is what makes a quantizer observe
        for batch in calibration_batches:
            model(_batch_input(batch).to(device))
            count += 1
    finally:
        for module, was_training in training.items():
            module.training = was_training
    if count == 0:
        raise ValueError("`calibration_batches` is empty; give at least one batch.")
    return count


def _set_quantizer_state(model: nn.Module, *, observe: bool, fake_quant: bool) -> None:
    for quantizer in _activation_quantizers(model).values():
        quantizer.observer_enabled = observe
        quantizer.fake_quant_enabled = fake_quant


def convert_to_simulated(model: nn.Module) -> nn.Module:
    """Freezes the fake quantization of `model` in place: ranges fixed, weights and inputs quantized.

    Ends QAT (or post-training calibration): from here on the model computes what paper 001's
    simulated quantized network computes, in train and eval mode alike.

    Returns:
        `model` itself.

    Raises:
        ValueError: if `model` has no fake-quant layer, or a layer's input range was never observed.
    """
    layers = _fake_quant_layers(model)
    if not layers:
        raise ValueError("`model` has no fake-quant layer; call `quantize_model_simulated` or `prepare_qat` first.")
    uncalibrated = [name for name, layer in layers.items() if not layer.input_quantizer.is_calibrated]
    if uncalibrated:
        raise ValueError(
            f"Layers {uncalibrated} never saw an input during calibration/training, so their activation "
            "range is unknown; calibrate with batches that reach them."
        )
    _set_quantizer_state(model, observe=False, fake_quant=True)
    return model


def quantize_model_simulated(
    model: nn.Module,
    *,
    calibration_batches: Iterable[Tensor | Sequence[Tensor]],
    bits: int = 8,
    per_channel: bool = False,
) -> nn.Module:
    """Paper 001's post-training simulated quantization, on a copy of `model`.

    Weights of every Conv/Linear and their input activations are quantized to `bits` with
    min/max ranges (activations: observed on `calibration_batches` in eval mode) and dequantized.

    Args:
        model: a trained float model; not modified.
        calibration_batches: tensors or (inputs, targets) pairs; a few training batches suffice.
        bits: integer width, 2 to 16.
        per_channel: one weight range per output channel.

    Returns:
        A new model in the frozen simulated state; `fake_quant_record(result)` replays its
        structure on a fresh architecture before loading its state_dict.

    Raises:
        ValueError: for `bits` outside [2, 16], empty calibration data, a model without
            Conv/Linear layers, or layers no calibration batch reached.
    """
    _check_bits(bits)
    quantized = copy.deepcopy(model)
    insert_fake_quant(quantized, bits=bits, per_channel=per_channel)
    batches = calibrate(quantized, calibration_batches)
    convert_to_simulated(quantized)
    log.info("Simulated %d-bit quantization calibrated on %d batches.", bits, batches)
    return quantized


def prepare_qat(
    model: nn.Module,
    bits: int = 8,
    per_channel: bool = False,
    *,
    averaging_constant: float = DEFAULT_QAT_AVERAGING_CONSTANT,
    inplace: bool = False,
) -> nn.Module:
    """Prepares `model` for quantization-aware training.

    Every Conv/Linear quantizes its weight (current min/max) and its input (EMA of batch
    min/max, updated in training mode only) in the forward pass; gradients pass straight through
    the rounding. Train as usual, then `convert_to_simulated` to freeze the ranges.

    Args:
        model: a float model.
        bits: integer width, 2 to 16.
        per_channel: one weight range per output channel.
        averaging_constant: weight of the newest batch in the activation range EMA, (0, 1].
        inplace: edit `model` itself (its parameters stay the same objects, so an existing
            optimizer keeps working) instead of a deep copy.

    Returns:
        The prepared model; `fake_quant_record(result)` replays its structure.

    Raises:
        ValueError: for `bits` outside [2, 16], `averaging_constant` outside (0, 1], or a model
            without Conv/Linear layers or already fake-quantized.
    """
    _check_bits(bits)
    if averaging_constant is None:
        raise ValueError("`averaging_constant` must be in (0, 1] for QAT, got None.")
    _check_averaging_constant(averaging_constant)
    prepared = model if inplace else copy.deepcopy(model)
    insert_fake_quant(prepared, bits=bits, per_channel=per_channel, averaging_constant=averaging_constant)
    _set_quantizer_state(prepared, observe=True, fake_quant=True)
    return prepared


def strip_fake_quant(model: nn.Module) -> nn.Module:
    """A float copy of `model`: fake-quant layers turned back into plain Conv/Linear layers.

    The weights are the (possibly QAT-trained) float weights, not their quantized values.
    `model` is not modified.
    """
    stripped = copy.deepcopy(model)
    for name, layer in _fake_quant_layers(stripped).items():
        plain = _FLOAT_CLASSES[type(layer)](**_layer_kwargs(layer), device="meta")
        _adopt_parameters(plain, layer)
        _set_submodule(stripped, name, plain.to(layer.weight.device))
    return stripped
