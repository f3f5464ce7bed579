"""`CompressLightCLI`: Lightning's `LightningCLI` for `ImageClassifier` and any datamodule.

The class and what builds it from a command line (`cli_class`, `config_namespace`,
`build_from_config`); `compresslight.cli` dispatches commands and imports this, never the
other way round, so the commands and the sweep can build models from a config without a cycle.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
from netrc import netrc
from pathlib import Path
from typing import Any

from typing_extensions import override

import compresslight.lightning_compat as pl
from compresslight.classifier import ImageClassifier

# Named as before this module was split from `compresslight.cli`: users filter on it.
log = logging.getLogger("compresslight.cli")


class CompressLightCLIMixin:
    """What `CompressLightCLI` adds to a `LightningCLI`, for `ImageClassifier` and any
    LightningDataModule (class_path in YAML).

    Links the datamodule's `num_classes` and `input_shape` into the model, overwrites the
    saved `config.yaml` when a run reuses a log dir, and puts W&B offline when there is no
    account to log to.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        use_wandb_offline_without_account()
        kwargs.setdefault("model_class", ImageClassifier)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Checkpoints whole or absent: a disk full mid-save keeps the previous file (see atomic_io).
        kwargs.setdefault(
            "trainer_defaults", {"plugins": [{"class_path": "compresslight.atomic_io.AtomicCheckpointIO"}]}
        )
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        # As a list, the form a YAML config gives: the model's and the datamodule's recorded
        # hyperparameters must agree for Lightning to log them.
        parser.link_arguments("data.input_shape", "model.input_shape", compute_fn=list, apply_on="instantiate")

    @override
    def _parse_ckpt_path(self) -> None:
        """Keeps the model the config and command line describe.

        LightningCLI would replace it by the checkpoint's hyperparameters, silently training
        another architecture than `--model.arch` says; `after_instantiate_classes` refuses a
        checkpoint of another architecture instead and names any other difference.
        """

    @override
    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self.subcommand is None:
            return
        arguments = self.config_init[self.subcommand]
        ckpt_path = arguments.get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = arguments["ckpt_path"] = str(find_last_checkpoint(self.trainer))
            log.info("`--ckpt_path last`: resuming from %s.", ckpt_path)
        if ckpt_path and Path(ckpt_path).is_file() and isinstance(self.model, ImageClassifier):
            check_checkpoint_fits_model(self.model, ckpt_path)


def check_checkpoint_fits_model(model: ImageClassifier, ckpt_path: str) -> None:
    """Refuses a checkpoint of another architecture before anything runs; warns about other
    hyperparameters that differ from the config and command line.

    Raises:
        ValueError: naming the checkpoint's architecture and `--model.arch`.
    """
    from compresslight.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(ckpt_path)
    model._check_architecture(checkpoint, source=f"`--ckpt_path` {ckpt_path!r}")  # the one arch check
    saved = checkpoint.get("hyper_parameters", {})
    differences = {
        key: (saved[key], value)
        for key, value in model.hparams.items()
        if key in saved and key != "init_from" and _as_plain(saved[key]) != _as_plain(value)
    }
    if differences:
        log.warning(
            "`--ckpt_path` %s was saved with other model hyperparameters than this run's config and command line; "
            "the model is built from the config (%s). On `fit`, the optimizer and LR scheduler states (the lr "
            "included) are still restored from the checkpoint.",
            ckpt_path,
            ", ".join(f"{key}: checkpoint {old!r}, here {new!r}" for key, (old, new) in differences.items()),
        )


def _as_plain(value: Any) -> Any:
    """Tuples as lists, as YAML and checkpoints give them, so `(3, 32, 32)` equals `[3, 32, 32]`."""
    if isinstance(value, (list, tuple)):
        return [_as_plain(item) for item in value]
    return value


def find_last_checkpoint(trainer: pl.Trainer) -> Path:
    """The newest last checkpoint of this run's name, whichever `version_N` wrote it.

    Lightning looks for `--ckpt_path last` only in this run's own checkpoint folder, which a
    logger makes anew for every run (`runs/<name>/version_<N+1>/checkpoints`): it finds
    nothing and trains from scratch with a warning. This looks where earlier runs of the same
    name saved, and in any `dirpath` a ModelCheckpoint was given.

    Raises:
        ValueError: when no earlier run left a last checkpoint, naming where it looked.
    """
    folders = [Path(callback.dirpath) for callback in trainer.checkpoint_callbacks if callback.dirpath]
    if trainer.loggers:
        logger = trainer.loggers[0]
        run_root = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name)
        folders += sorted(run_root.glob("*/checkpoints"))
        looked_in = f"{run_root}/*/checkpoints"
    else:
        folders.append(Path(trainer.default_root_dir) / "checkpoints")
        looked_in = str(folders[-1])
    names = {getattr(callback, "CHECKPOINT_NAME_LAST", "last") for callback in trainer.checkpoint_callbacks} or {"last"}
    found = [
        path
        for folder in folders
        if folder.is_dir()
        for path in folder.glob("*.ckpt")
        if any(name in path.name for name in names)  # Lightning's own test for a last checkpoint
    ]
    if not found:
        raise ValueError(
            f"`--ckpt_path last` found no last checkpoint of an earlier run (looked in {looked_in}"
            f"{''.join(f', {callback.dirpath}' for callback in trainer.checkpoint_callbacks if callback.dirpath)}): "
            "give the checkpoint's path, or save last checkpoints (a `ModelCheckpoint` with `save_last: true` "
            "or `filename: last`, as the configs in configs/ have)."
        )
    return max(found, key=lambda path: path.stat().st_mtime)


@functools.cache
def cli_class(namespace: str = pl.NAMESPACES[0].__name__) -> type:
    """`CompressLightCLI` on the `LightningCLI` of `namespace` ("pytorch_lightning" or
    "lightning.pytorch"): its Trainer takes that namespace's callbacks and loggers only."""
    base = importlib.import_module(f"{pl.import_namespace(namespace).__name__}.cli").LightningCLI
    return type(
        "CompressLightCLI",
        (CompressLightCLIMixin, base),
        {"__module__": __name__, "__doc__": CompressLightCLIMixin.__doc__},
    )


#: The CLI on the first installed namespace (`pytorch_lightning` when installed).
CompressLightCLI = cli_class()

_NAMESPACE_PATTERN = re.compile(r"(?<![\w.])(pytorch_lightning|lightning\.pytorch)\.")


def config_namespace(args: list[str]) -> str:
    """The Lightning namespace a command line's config names in its class paths, read from the
    arguments and the YAML files they name; the first installed namespace when it names none
    (short names such as `ModelCheckpoint` resolve in either).

    Raises:
        ValueError: if the config names classes of both namespaces (a Trainer takes the callbacks
            and loggers of its own namespace only).
    """
    texts = list(args)
    for arg in args:
        candidate = arg.split("=", 1)[-1]
        if candidate.endswith((".yaml", ".yml", ".json")) and Path(candidate).is_file():
            texts.append(Path(candidate).read_text())
    text = re.sub(r"(^|\s)#.*", "", "\n".join(texts))  # comments name no class
    found = sorted(set(_NAMESPACE_PATTERN.findall(text)))
    if len(found) > 1:
        raise ValueError(
            f"The config names classes of both Lightning namespaces ({' and '.join(found)}): a Trainer takes the "
            "callbacks and loggers of its own namespace only. Use one, or short names (`ModelCheckpoint`) that "
            "resolve in either."
        )
    return found[0] if found else pl.NAMESPACES[0].__name__


def use_wandb_offline_without_account() -> None:
    """Sets `WANDB_MODE=offline` unless the user chose a mode or has W&B credentials.

    Without this a `WandbLogger` asks for a login or waits for the network.
    """
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return
    try:
        has_login = netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, OSError, ValueError):
        has_login = False
    if not has_login:
        os.environ["WANDB_MODE"] = "offline"
        log.info("No W&B credentials found: W&B runs are written offline (`wandb sync` uploads them later).")


def build_from_config(args: list[str]) -> tuple[ImageClassifier, pl.LightningDataModule, pl.Trainer]:
    """Instantiates model, datamodule and Trainer from fit-style arguments (`--config X.yaml ...`)."""
    cli = cli_class(config_namespace(args))(args=args, run=False)
    return cli.model, cli.datamodule, cli.trainer
