"""Real int8 inference on CPU: ONNX Runtime static quantization of a float (or QAT) model.

The third level of `compresslight.compression.quantization` (see its docstring): the float model is
exported with the one ONNX exporter (`compresslight.profiling.backends.export_onnx`, the
torch.export-based `torch.onnx.export`), pre-processed and quantized by ONNX Runtime's
`quantize_static` (QDQ format, uint8 activations, int8 weights, MinMax calibration). The result is
one self-contained `.onnx` file that any process reloads with `OnnxRuntimeModel(path)` or a plain
`onnxruntime.InferenceSession(path)`.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from compresslight.compression.quantization import _batch_input, _fake_quant_layers, _model_device, strip_fake_quant
from compresslight.profiling import backends as onnx_backend

log = logging.getLogger(__name__)

__all__ = ["OnnxRuntimeModel", "export_int8_onnx"]

_ONNX_INPUT = "input"
_ONNX_OUTPUT = "logits"
# Float forms of the compute-heavy ops in a graph ONNX Runtime has optimized (its fused variants
# included); their int8 forms are QLinearConv, QGemm, QLinearMatMul, MatMulIntegerToFloat, ...
_ONNX_FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def _check_input_shape(example_input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(example_input_shape)
    if len(shape) < 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(
            "`example_input_shape` must be a full input shape with a batch dimension, e.g. "
            f"(1, 3, 32, 32), of positive integers; got {example_input_shape!r}."
        )
    return shape


def _export_float_onnx(model: nn.Module, example_input_shape: Sequence[int], path: Path) -> Path:
    """Exports `model` (float, eval mode) to one self-contained ONNX file with a dynamic batch axis.

    The one exporter (`profiling.backends.export_onnx`) with what ONNX Runtime's quantizer needs:
    fake-quant layers stripped first (the float weights are exported), a free batch axis, input
    name "input", output name "logits".

    Args:
        model: the network; its training flag is restored afterwards.
        example_input_shape: full input shape, e.g. (1, 3, 32, 32); the batch size is dynamic
            in the exported graph, its value here is ignored.
        path: the `.onnx` file to write.

    Returns:
        `path` as a Path.

    Raises:
        ValueError: for a malformed `example_input_shape`.
        RuntimeError: if torch.onnx cannot export the model (the exporter's message is included).
    """
    shape = _check_input_shape(example_input_shape)
    if _fake_quant_layers(model):
        model = strip_fake_quant(model)
    device = _model_device(model)
    # Batch 2, not 1: torch.export specializes dimensions of size 1, which would pin the batch.
    example = torch.randn((2, *shape[1:]), device=device)
    was_training = model.training
    model.eval()
    try:
        onnx_backend.export_onnx(
            model, example, path, dynamic_batch=True, input_name=_ONNX_INPUT, output_name=_ONNX_OUTPUT
        )
    except ValueError as error:
        raise RuntimeError(f"torch.onnx.export could not export `model` ({type(model).__name__}): {error}") from error
    finally:
        model.train(was_training)
    return path


def _calibration_reader(batches: Iterable[Tensor | Sequence[Tensor]]) -> Any:
    """Wraps `batches` as the `CalibrationDataReader` ONNX Runtime's calibrator expects."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[Any] = iter(batches)
            self.count = 0

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.count += 1
            return {_ONNX_INPUT: _batch_input(batch).detach().float().cpu().contiguous().numpy()}

    return _Reader()


def _float_compute_layers(onnx_path: Path, optimized_path: Path) -> list[str]:
    """Conv/Gemm/MatMul layers that ONNX Runtime would still run in float after loading `onnx_path`.

    ONNX Runtime fuses each DequantizeLinear -> op -> QuantizeLinear group into an int8 kernel
    (QLinearConv, QGemm, QLinearMatMul, ...) when it loads the model; an op it has no int8 kernel
    for (ConvTranspose, for one) keeps its float form between the QDQ pairs. Inspecting the
    graph ONNX Runtime actually runs is the only reliable test.
    """
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized_path)
    options.log_severity_level = 3  # the "hardware-specific optimized model" notice is expected
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    left_float = []
    for node in onnx.load(str(optimized_path)).graph.node:
        if node.op_type not in _ONNX_FLOAT_COMPUTE_OPS:
            continue
        # The exporter names weight initializers after the torch parameter ("features.0.weight").
        weight = node.input[1] if len(node.input) > 1 else node.name
        layer = weight.removesuffix("_DequantizeLinear_Output").removesuffix("_quantized").removesuffix(".weight")
        left_float.append(f"{layer} ({node.op_type})")
    return left_float


def export_int8_onnx(
    model: nn.Module,
    example_input_shape: Sequence[int],
    calibration_batches: Iterable[Tensor | Sequence[Tensor]],
    path: str | os.PathLike,
    *,
    per_channel: bool = False,
    allow_float_layers: bool = False,
    float_path: str | os.PathLike | None = None,
) -> Path:
    """Exports `model` as an int8 ONNX model for ONNX Runtime's CPU kernels.

    Float export (`profiling.backends.export_onnx`, BatchNorm folded by the exporter, fake-quant
    layers stripped, batch axis free), ONNX Runtime pre-processing
    (shape inference, graph optimization), then static quantization: QDQ format, uint8
    activations and int8 weights with min/max ranges calibrated on `calibration_batches`.
    ONNX Runtime turns the QDQ pairs around Conv/Gemm/MatMul into int8 kernels when it loads the
    file. The result is one self-contained file; reload it anywhere with
    `OnnxRuntimeModel(path)`. Nothing is written to `path` unless every step succeeds.

    Args:
        model: the float (or QAT-trained) network; not modified.
        example_input_shape: full input shape, e.g. (1, 3, 32, 32); batch size is dynamic.
        calibration_batches: tensors or (inputs, targets) pairs; a few training batches.
        path: the `.onnx` file to write.
        per_channel: one weight scale per output channel.
        allow_float_layers: write the file even if some Conv/Gemm/MatMul layers have no int8
            kernel in ONNX Runtime (they then run in float, named in a warning).
        float_path: also keep the float ONNX model (the one quantized) in this file, e.g. to compare
            float and int8 in the same runtime; None: not kept.

    Returns:
        `path` as a Path.

    Raises:
        ValueError: for a malformed shape, empty calibration data, or (unless
            `allow_float_layers`) layers ONNX Runtime cannot run in int8, named in the message.
        RuntimeError: if the model cannot be exported to ONNX.
    """
    _check_input_shape(example_input_shape)
    path = Path(path)
    batches = iter(calibration_batches)
    first = next(batches, None)
    if first is None:  # checked before the export, which takes seconds
        raise ValueError("`calibration_batches` is empty; give at least one batch.")
    reader = _calibration_reader(itertools.chain([first], batches))
    with tempfile.TemporaryDirectory(prefix="compresslight_int8_") as tmp:
        exported_path, pre_path, int8_path = (Path(tmp) / name for name in ("float.onnx", "pre.onnx", "int8.onnx"))
        _export_float_onnx(model, example_input_shape, exported_path)
        _quantize_static(exported_path, pre_path, int8_path, reader, per_channel)
        left_float = _float_compute_layers(int8_path, Path(tmp) / "optimized.onnx")
        if left_float and not allow_float_layers:
            raise ValueError(
                f"ONNX Runtime has no int8 CPU kernel for these layers of `model`, which would run in "
                f"float: {left_float}. Replace them, or pass `allow_float_layers=True` to accept that."
            )
        if left_float:
            log.warning("These layers run in float inside the int8 ONNX model: %s", left_float)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(int8_path), path)
        if float_path is not None:
            Path(float_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(exported_path), float_path)
    log.info("Wrote int8 ONNX model %s (%d calibration batches).", path, reader.count)
    return path


def _quantize_static(float_path: Path, pre_path: Path, int8_path: Path, reader: Any, per_channel: bool) -> None:
    """ONNX Runtime's pre-processing, then static QDQ quantization (uint8 activations, int8 weights, MinMax)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    with onnx_backend.quiet_onnx_logs():
        quant_pre_process(str(float_path), str(pre_path))
        quantize_static(
            str(pre_path),
            str(int8_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )


class OnnxRuntimeModel(nn.Module):
    """Runs an ONNX file (float or int8) with ONNX Runtime on CPU, as a torch module.

    `forward` takes and returns torch tensors (logits on the input's device), so accuracy code
    and the profiler use it like any model. It has no parameters and cannot be trained.

    Args:
        path: an `.onnx` file, e.g. written by `export_int8_onnx` (its `path` or `float_path`).
        num_threads: ONNX Runtime intra-op threads; None uses `torch.get_num_threads()` so
            latency compares with eager torch on equal terms.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if `num_threads` < 1.
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model `path` {str(self.path)!r} does not exist.")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"`num_threads` must be >= 1 or None, got {num_threads!r}.")
        self.num_threads = num_threads or torch.get_num_threads()
        self.session = self._open_session()
        self.input_name = self.session.get_inputs()[0].name

    def _open_session(self) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.num_threads
        # One request at a time: inter-op threads would only compete with the intra-op pool.
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def forward(self, x: Tensor) -> Tensor:
        (logits,) = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})
        return torch.from_numpy(logits).to(x.device)

    @property
    def file_size_bytes(self) -> int:
        """Size of the model file on disk."""
        return self.path.stat().st_size

    # An InferenceSession cannot be pickled or deep-copied; the file can be reopened.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("session", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.session = self._open_session()

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, num_threads={self.num_threads}"
