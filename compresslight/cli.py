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

import itertools
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from compresslight import commands
from compresslight.lightning_cli import (
    CompressLightCLI,
    build_from_config,
    check_checkpoint_fits_model,
    cli_class,
    config_namespace,
    find_last_checkpoint,
    use_wandb_offline_without_account,
)
from compresslight.optional import require_extra

__all__ = [
    "CompressLightCLI",
    "build_from_config",
    "check_checkpoint_fits_model",
    "cli_class",
    "config_namespace",
    "find_last_checkpoint",
    "main",
    "sweep_command",
    "use_wandb_offline_without_account",
]


def sweep_command(args: list[str]) -> None:
    """`cli.py sweep --config configs/sweeps/X.yaml`: search compression parameters (paper 002)."""
    require_extra("sweep", "`cli.py sweep`")  # before Optuna is imported, for a clear message without it
    from compresslight.sweep.command import sweep_command as run_sweep_command

    run_sweep_command(args)


#: Commands beside Lightning's; each takes the arguments after its name.
EXTRA_COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "profile": commands.profile_command,
    "sensitivity": commands.sensitivity_command,
    "runtime-model": commands.runtime_model_command,
    "sweep": sweep_command,
}


def main(args: list[str] | None = None) -> None:
    """Entry point of `python cli.py` and the `compresslight` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command_line = list(sys.argv[1:] if args is None else args)
    extra = EXTRA_COMMANDS
    if command_line and command_line[0] in extra:
        extra[command_line[0]](command_line[1:])
        return
    if not command_line or command_line[0] in ("-h", "--help"):
        print(f"compresslight commands beside Lightning's: {', '.join(extra)} (`<command> --help` for each).\n")
    from compresslight.sweep.fitconfig import expand_path_overrides

    # `--trainer.callbacks[PruningCallback].init_args.ratios["layer1.*.conv1"]=0.5` (what W&B
    # sweep agents pass) addresses keys jsonargparse cannot; untouched when no key has one.
    materialized: list[str] = []
    if any("[" in arg for arg in command_line):
        args = expand_path_overrides(command_line)
        # The materialized config is a temporary file; the run keeps its own copy (config.yaml).
        materialized = [path for path in _config_files(args) if path not in _config_files(command_line)]
    try:
        cli = cli_class(config_namespace(command_line))
    except (ValueError, ImportError) as error:
        sys.exit(f"error: {error}")
    try:
        cli(args=args)  # None: LightningCLI reads sys.argv itself
    finally:
        for path in materialized:
            Path(path).unlink(missing_ok=True)


def _config_files(args: list[str]) -> list[str]:
    """The values of `--config` in a command line."""
    files = [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
    return files + [value for flag, value in itertools.pairwise(args) if flag == "--config"]


if __name__ == "__main__":
    main()
