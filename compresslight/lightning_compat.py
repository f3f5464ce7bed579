"""Both Lightning namespaces, `lightning.pytorch` and `pytorch_lightning`, from one code base.

Users bring their own Lightning: the unified `lightning` package (`import lightning.pytorch as pl`,
what Lightning's docs use today) or the standalone `pytorch_lightning`. The two are the same code
under two names, but their classes are distinct: a `lightning.pytorch.Trainer` refuses a
`pytorch_lightning.Callback` and the other way round. Everything in compresslight imports Lightning
from here, never from one namespace:

- `Callback`, `LightningModule`, `LightningDataModule` and `TorchCheckpointIO` subclass the class of
  that name in *every* installed namespace, so compresslight's callbacks, `ImageClassifier`,
  datamodules and `AtomicCheckpointIO` pass either Trainer's (and either `LightningCLI`'s) type
  checks. A Trainer asks `is_overridden(hook, obj)`, which compares code objects with its own
  namespace's: the two copies' code compares equal for most hooks at matching versions
  (`constraints.txt` pins both), not for those whose docstrings name the namespace. The no-op hooks
  among those that a Trainer queries are set to None below (read as "not overridden" by both
  Trainers, never called); `optimizer_step` and `lr_scheduler_step` have real defaults and stay:
  under the second namespace they read as overridden, which only matters to
  `GradientAccumulationScheduler` (it refuses such a module).
- a user's own objects (module, strategy, loggers) are checked by behaviour (`is_lightning_module`,
  `is_ddp_strategy`, `is_wandb_logger`, `logger_log_dir`), never against one namespace's class.
- `import_namespace` gives the namespace a YAML config names (the CLI builds on its `LightningCLI`).

`pytorch_lightning` comes first in the classes' MRO (the package compresslight declares), so its
Trainer is the one that reads `optimizer_step` and `lr_scheduler_step` as inherited.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from lightning_utilities.core.rank_zero import rank_zero_only  # what both namespaces re-export

#: Import names of the Lightning namespaces compresslight supports, in MRO order.
NAMESPACE_NAMES: tuple[str, ...] = ("pytorch_lightning", "lightning.pytorch")


def _installed_namespaces() -> tuple[ModuleType, ...]:
    found = []
    for name in NAMESPACE_NAMES:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    if not found:
        raise ImportError(
            "compresslight needs PyTorch Lightning: `pip install pytorch-lightning` (or `pip install lightning`); "
            f"found neither of {', '.join(NAMESPACE_NAMES)}."
        )
    return tuple(found)


#: The installed namespaces (modules), in MRO order.
NAMESPACES: tuple[ModuleType, ...] = _installed_namespaces()
_primary = NAMESPACES[0]

# For annotations only: compresslight never type-checks a Trainer, strategy or logger against these.
Trainer = _primary.Trainer
Logger = _primary.loggers.Logger
RunningStage = _primary.trainer.states.RunningStage  # LightningEnums: compare equal across namespaces by value
TrainerFn = _primary.trainer.states.TrainerFn


class Callback(*(namespace.Callback for namespace in NAMESPACES)):  # type: ignore[misc]
    """Base of compresslight's callbacks: a `Callback` of every installed Lightning namespace."""


class LightningModule(*(namespace.LightningModule for namespace in NAMESPACES)):  # type: ignore[misc]
    """Base of `ImageClassifier`: a `LightningModule` of every installed Lightning namespace."""

    # No-op hooks whose code differs between the namespaces (see the module docstring). Inherited,
    # the second namespace's Trainer reads them as overridden: it refuses the module ("Both
    # `configure_model` and `configure_sharded_model` are overridden") or calls the default
    # `val_dataloader`, which raises, when fit gets no validation data. None reads as "not
    # overridden" to both Trainers (`is_overridden` is False for a None hook) and neither calls it.
    configure_sharded_model = None  # type: ignore[assignment]
    configure_model = None  # type: ignore[assignment]
    train_dataloader = None  # type: ignore[assignment]
    val_dataloader = None  # type: ignore[assignment]
    test_dataloader = None  # type: ignore[assignment]
    predict_dataloader = None  # type: ignore[assignment]


class LightningDataModule(*(namespace.LightningDataModule for namespace in NAMESPACES)):  # type: ignore[misc]
    """Base of compresslight's datamodules: a `LightningDataModule` of every installed namespace."""

    # As on `LightningModule`: a datamodule without a loader for a stage must read as "not defined".
    train_dataloader = None  # type: ignore[assignment]
    val_dataloader = None  # type: ignore[assignment]
    test_dataloader = None  # type: ignore[assignment]
    predict_dataloader = None  # type: ignore[assignment]


class TorchCheckpointIO(*(namespace.plugins.io.TorchCheckpointIO for namespace in NAMESPACES)):  # type: ignore[misc]
    """Base of `AtomicCheckpointIO`: Lightning's checkpoint writer, a plugin of every installed namespace."""


def import_namespace(name: str) -> ModuleType:
    """The namespace module `name` ("pytorch_lightning" or "lightning.pytorch").

    Raises:
        ValueError: for another name.
        ImportError: if that namespace is not installed, saying which package provides it.
    """
    if name not in NAMESPACE_NAMES:
        raise ValueError(f"Lightning namespace must be one of {NAMESPACE_NAMES}, got {name!r}.")
    for namespace in NAMESPACES:
        if namespace.__name__ == name:
            return namespace
    package = "lightning" if name == "lightning.pytorch" else "pytorch-lightning"
    raise ImportError(f"The config uses `{name}`, which is not installed: `pip install {package}`.")


def is_lightning_module(obj: Any) -> bool:
    """Whether `obj` is a LightningModule of any installed namespace."""
    return isinstance(obj, tuple(namespace.LightningModule for namespace in NAMESPACES))


def is_ddp_strategy(strategy: Any) -> bool:
    """Whether `strategy` wraps the module in DistributedDataParallel (by behaviour: it can re-wrap it).

    `DDPStrategy` of either namespace and its subclasses have `configure_ddp`, which a mid-fit
    structural edit must call again.
    """
    return callable(getattr(strategy, "configure_ddp", None))


def is_wandb_logger(logger: Any) -> bool:
    """Whether `logger` is a W&B logger of any namespace (by behaviour: it logs tables and images)."""
    return callable(getattr(logger, "log_table", None)) and callable(getattr(logger, "log_image", None))


def logger_log_dir(logger: Any) -> str | None:
    """Where `logger` writes this run's files: its versioned `log_dir` (CSV, TensorBoard), else its
    `save_dir` (W&B, and loggers without a version dir), else None."""
    return getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)


__all__ = [
    "NAMESPACES",
    "NAMESPACE_NAMES",
    "Callback",
    "LightningDataModule",
    "LightningModule",
    "Logger",
    "RunningStage",
    "TorchCheckpointIO",
    "Trainer",
    "TrainerFn",
    "import_namespace",
    "is_ddp_strategy",
    "is_lightning_module",
    "is_wandb_logger",
    "logger_log_dir",
    "rank_zero_only",
]
