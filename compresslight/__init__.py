"""compresslight: Keras-style training on PyTorch Lightning where compression is a callback.

The public face: `ImageClassifier`, the model registry (`create_model`, `list_models`,
`register_model`), `load_compressed_checkpoint`, and the profiler (`profile`, `compare`).
Callbacks are in `compresslight.callbacks`, datamodules in `compresslight.datamodules`.
"""

import os

# The CPU memory measurement runs the PyTorch profiler, whose Kineto backend prints start/stop
# lines to stderr unless told otherwise before torch loads.
os.environ.setdefault("KINETO_LOG_LEVEL", "3")

import compresslight.models  # noqa: F401  (the built-in architectures register themselves)
from compresslight.checkpoint import load_compressed_checkpoint
from compresslight.classifier import ImageClassifier
from compresslight.profiling import compare, profile
from compresslight.registry import create_model, list_models, register_model

__all__ = [
    "ImageClassifier",
    "compare",
    "create_model",
    "list_models",
    "load_compressed_checkpoint",
    "profile",
    "register_model",
]
__version__ = "0.1.0"
