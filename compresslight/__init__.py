"""compresslight: Keras-style training on PyTorch Lightning where compression is a callback."""

from compresslight.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
__version__ = "0.1.0"
