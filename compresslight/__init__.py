"""compresslight: Keras-style training on PyTorch Lightning where compression is a callback."""

import os

# The CPU memory measurement runs the PyTorch profiler, whose Kineto backend prints start/stop
# lines to stderr unless told otherwise before torch loads.
os.environ.setdefault("KINETO_LOG_LEVEL", "3")

from compresslight.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
__version__ = "0.1.0"
