"""Model registry: explicit `@register_model` entrypoints, looked up by name.

Each entrypoint is a plain function `name(num_classes=..., in_channels=...) -> nn.Module` with a
one-line docstring, so `list_models()` and an unknown-name error can say what exists.

As in timm, this module imports no model: the architectures register themselves when
`compresslight.models` is imported, which `import compresslight` does (and so does any
`from compresslight.registry import ...`, which imports the package first).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from compresslight.checks import check_choice, check_number
from compresslight.weights import load_pretrained_weights

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_MODEL_ENTRYPOINTS: dict[str, ModelFactory] = {}


def register_model(factory: F) -> F:
    """Registers `factory` under its function name.

    Raises:
        ValueError: if another factory already holds that name.
    """
    name = factory.__name__
    if name in _MODEL_ENTRYPOINTS and _MODEL_ENTRYPOINTS[name] is not factory:
        raise ValueError(f"A model named {name!r} is already registered.")
    _MODEL_ENTRYPOINTS[name] = factory
    return factory


def list_models() -> list[str]:
    """Names of all registered architectures, sorted."""
    return sorted(_MODEL_ENTRYPOINTS)


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, weights: str | None = None) -> nn.Module:
    """Builds the registered architecture `name`.

    Args:
        name: a name from `list_models()`.
        num_classes: outputs of the classifier head.
        in_channels: channels of the input images (3 for RGB, 1 for grayscale).
        weights: a checkpoint or plain state dict to start from (`load_pretrained_weights`): with
            other input channels or classes, the stem is adapted and the classifier reset (logged).

    Raises:
        ValueError: for an unknown name (the message lists the known ones), a count < 1 or
            weights that do not fit.
    """
    check_choice("arch", name, sorted(_MODEL_ENTRYPOINTS))
    check_number("num_classes", num_classes, at_least=1)
    check_number("in_channels", in_channels, at_least=1)
    model = _MODEL_ENTRYPOINTS[name](num_classes=num_classes, in_channels=in_channels)
    if weights is not None:
        load_pretrained_weights(model, weights)
    return model
