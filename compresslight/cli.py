"""`python cli.py <command> --config configs/X.yaml`: the command line.

Lightning's own subcommands (fit, validate, test, predict) come from `LightningCLI`. The
compresslight commands build the same model and datamodule from the same config and then do
their own work instead of training:

    profile        profile a model or a compressed checkpoint; `--baseline` compares two
    sensitivity    prune each layer alone at several ratios and report validation top-1
    runtime-model  measure a per-layer runtime model for LC compression (paper 003)
    sweep          search compression parameters toward latency and accuracy (paper 002)
"""

from __future__ import annotations

import logging
import os
import sys
from netrc import netrc
from typing import Any, Callable

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from compresslight.classifier import ImageClassifier

log = logging.getLogger(__name__)


class CompressLightCLI(LightningCLI):
    """LightningCLI for `ImageClassifier` and any LightningDataModule (class_path in YAML).

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
        kwargs.setdefault("trainer_defaults", {"plugins": [{"class_path": "compresslight.atomic_io.AtomicCheckpointIO"}]})
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        # As a list, the form a YAML config gives: the model's and the datamodule's recorded
        # hyperparameters must agree for Lightning to log them.
        parser.link_arguments("data.input_shape", "model.input_shape", compute_fn=list, apply_on="instantiate")


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
    cli = CompressLightCLI(args=args, run=False)
    return cli.model, cli.datamodule, cli.trainer


# Commands beside Lightning's; each takes the arguments after its name.
def _extra_commands() -> dict[str, Callable[[list[str]], None]]:
    from compresslight import commands

    return {
        "profile": commands.profile_command,
        "sensitivity": commands.sensitivity_command,
        "runtime-model": commands.runtime_model_command,
        "sweep": commands.sweep_command,
    }


def main(args: list[str] | None = None) -> None:
    """Entry point of `python cli.py` and the `compresslight` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command_line = list(sys.argv[1:] if args is None else args)
    extra = _extra_commands()
    if command_line and command_line[0] in extra:
        extra[command_line[0]](command_line[1:])
        return
    if not command_line or command_line[0] in ("-h", "--help"):
        print(f"compresslight commands beside Lightning's: {', '.join(extra)} (`<command> --help` for each).\n")
    from compresslight.sweep.fitconfig import expand_path_overrides

    # `--trainer.callbacks[PruningCallback].init_args.ratios["layer1.*.conv1"]=0.5` (what W&B
    # sweep agents pass) addresses keys jsonargparse cannot; untouched when no key has one.
    if any("[" in arg for arg in command_line):
        args = expand_path_overrides(command_line)
    CompressLightCLI(args=args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
