"""The optional parts of compresslight and the clear error when one is missing.

Core features need only the core dependencies; int8 export and ONNX Runtime latency need the
`onnx` extra, `cli.py sweep` the `sweep` extra, a `WandbLogger` the `wandb` extra. What needs one
checks it up front (before training), so a missing extra is an error that says what to install
rather than a `ModuleNotFoundError` from deep inside a run.
"""

from __future__ import annotations

import importlib.util

#: extra -> the modules it installs (setup.py's `EXTRAS` installs their packages).
EXTRAS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "sweep": ("optuna",),
    "wandb": ("wandb",),
}


def require_extra(extra: str, needed_by: str) -> None:
    """Raises unless every module of `extra` is installed; checks without importing them.

    Args:
        extra: a key of `EXTRAS`.
        needed_by: what needs it, for the message ("`QuantizationCallback(int8=True)`").

    Raises:
        ImportError: naming the missing modules and the install command.
    """
    missing = [module for module in EXTRAS[extra] if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(
            f"{needed_by} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f'`pip install "compresslight[{extra}]"`.'
        )
