"""Runtimes a profile can measure latency on: eager PyTorch and ONNX Runtime.

Papers 002 and 003 measured deployable runtimes, not eager PyTorch; a compressed model can be
faster in one and slower in the other, so the profiler measures both side by side.

ONNX export uses `torch.onnx.export(..., dynamo=True)`, the `torch.export`-based exporter. It is
the default and maintained exporter since torch 2.9; the TorchScript exporter (`dynamo=False`)
still works on torch 2.13 but warns that it "will be removed". The dynamo exporter handles the
conv nets of this project (conv, batch norm, pooling, residual adds, linear) and, with
`optimize=True`, emits a graph ONNX Runtime fuses well. The model is exported once per batch
size with static shapes, the shape a deployed model runs at. If `torch.export` cannot capture a
model (data-dependent Python control flow), the TorchScript exporter is tried as a fallback with
a warning, while torch still ships it.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")
"""Backends `profile` knows. ONNX Runtime is measured for inference only."""


def validate_backends(backends: Sequence[str] | str, device: torch.device | None = None) -> tuple[str, ...]:
    """Checks `backends` and that each can run on `device`.

    Args:
        backends: names from `BACKENDS`.
        device: where the models will run; None skips the device check.

    Returns:
        The backends as a tuple, duplicates removed, order kept.

    Raises:
        ValueError: for an empty list, an unknown name, a backend that is not installed, or
            ONNX Runtime on a device it has no execution provider for.
    """
    if isinstance(backends, str):
        backends = (backends,)
    backends = tuple(dict.fromkeys(backends))
    if not backends:
        raise ValueError(f"`backends` must name at least one of {list(BACKENDS)}, got an empty list.")
    for backend in backends:
        if backend not in BACKENDS:
            raise ValueError(f"`backends` must contain only {list(BACKENDS)}, got unknown backend {backend!r}.")
    if "onnxruntime" in backends:
        ort = _import_onnxruntime()
        if device is not None and device.type != "cpu":
            provider = _ORT_PROVIDERS.get(device.type)
            available = ort.get_available_providers()
            if provider is None or provider not in available:
                raise ValueError(
                    f"`backends` includes 'onnxruntime' on device {str(device)!r}, but ONNX Runtime has no "
                    f"execution provider for it here (available: {available})."
                )
    return backends


def backend_version(backend: str) -> str:
    """The installed version of `backend`'s runtime."""
    # str(): torch.__version__ is a TorchVersion, which checkpoints loaded with
    # `weights_only=True` refuse to unpickle.
    if backend == "torch":
        return str(torch.__version__)
    if backend == "onnxruntime":
        return str(_import_onnxruntime().__version__)
    raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {backend!r}.")


_ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise ValueError(
            "The 'onnxruntime' backend needs the onnxruntime package: `pip install onnxruntime onnxscript`."
        ) from error
    return onnxruntime


def onnxruntime_runner(model: nn.Module, example: torch.Tensor, threads: int) -> Callable[[], Any]:
    """Exports `model` at `example`'s shape and returns a call that runs it with ONNX Runtime.

    The model must already be in eval mode on `example`'s device. The returned function runs
    one inference on a fixed copy of `example` (host memory; on CUDA the copies are included,
    as they would be in a deployment that feeds numpy arrays).

    Args:
        model: the network, in eval mode.
        example: one input batch; its shape is baked into the exported graph.
        threads: ONNX Runtime's intra-op threads.

    Raises:
        ValueError: if neither exporter can export the model.
    """
    ort = _import_onnxruntime()
    with tempfile.TemporaryDirectory(prefix="compresslight-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, example, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # One model, one request at a time: inter-op parallelism would only add threads that
        # compete with the intra-op pool the measurement is about.
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        provider = _ORT_PROVIDERS.get(example.device.type, "CPUExecutionProvider")
        # The session reads the whole file at creation, so the temporary file can go afterwards.
        session = ort.InferenceSession(str(path), options, providers=[provider])
    feed = {session.get_inputs()[0].name: example.detach().cpu().numpy()}
    return lambda: session.run(None, feed)


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    dynamic_batch: bool = False,
    input_name: str = "input",
    output_name: str = "output",
) -> None:
    """Writes `model` as a self-contained ONNX file: the one exporter of compresslight.

    Args:
        model: the network, exported as it is (the caller sets eval mode).
        example: an input batch; its shape is the graph's input shape.
        path: the `.onnx` file to write.
        dynamic_batch: leave the batch dimension free (the example's batch must then be > 1:
            torch.export specializes dimensions of size 1).
        input_name: the graph input's name.
        output_name: the graph output's name.

    Raises:
        ValueError: if neither the dynamo nor the TorchScript exporter can export the model.
    """
    names = dict(input_names=[input_name], output_names=[output_name])
    with torch.no_grad(), quiet_onnx_logs():
        try:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                external_data=False,
                verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None,
                **names,
            )
            return
        except Exception as dynamo_error:  # noqa: BLE001 - any capture failure means: try the fallback
            log.warning(
                "torch.onnx.export(dynamo=True) failed (%s: %s); falling back to the TorchScript exporter.",
                type(dynamo_error).__name__,
                dynamo_error,
            )
            try:
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamo=False,
                    dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None,
                    **names,
                )
            except Exception as legacy_error:  # noqa: BLE001
                raise ValueError(
                    f"Could not export the model to ONNX: dynamo exporter: "
                    f"{type(dynamo_error).__name__}: {dynamo_error}; TorchScript exporter: "
                    f"{type(legacy_error).__name__}: {legacy_error}."
                ) from legacy_error


# Loggers that report every pass of an export or a quantization at INFO (hundreds of lines
# under the CLI's INFO logging) and one warning per torchvision op that is not installed; none
# concern the user's model.
_NOISY_ONNX_LOGGERS = (
    "onnx_ir",
    "onnxscript",
    "onnxruntime.quantization",
    "torch.onnx._internal.exporter._registration",
)


@contextlib.contextmanager
def quiet_onnx_logs() -> Iterator[None]:
    """Silences the exporter's and ONNX Runtime's chatter and torch-internal deprecation warnings."""
    loggers = [logging.getLogger(name) for name in _NOISY_ONNX_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
