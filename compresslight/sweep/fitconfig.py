"""Fit configs as plain data: parse like `cli.py fit` does, edit values at paths, write a YAML.

`resolve_fit_config` runs the fit CLI's own parser (CompressLightCLI, so class paths, links and
defaults are exactly those of a real run) without building anything, and returns the complete
config: every argument with its value or default, nested configs and extra `--key=value`
arguments folded in. A trial's config is that dict with the searched values set (`set_at_path`)
and written to one YAML file, so the trial is reproducible with `cli.py fit --config trial.yaml`.

`expand_path_overrides` gives the command line the same power: `--<path>=<value>` arguments
whose path has a bracket (a callback selected by class or index, a quoted dictionary key) are
applied to the parsed config and replaced by one materialized `--config`. W&B sweeps pass their
parameters this way (`--key=value`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from compresslight.sweep.paths import parse_path, set_at_path

log = logging.getLogger(__name__)

# Arguments of `cli.py fit` that are not part of the config (the fit subcommand adds them) and
# pass through `expand_path_overrides` untouched.
_PASSTHROUGH = ("--ckpt_path", "--print_config")


def resolve_fit_config(args: Sequence[str]) -> dict[str, Any]:
    """Parses fit arguments (`--config X.yaml --trainer.max_epochs=0 ...`) into a complete config.

    Nothing is instantiated: no model is built, no checkpoint read, no data touched.

    Args:
        args: what follows `cli.py fit` on a command line (no subcommand).

    Returns:
        The config as plain data, with every default filled in and link targets
        (`model.num_classes`, set from the datamodule when the run starts) left out.

    Raises:
        ValueError: if the arguments do not parse (unknown key, wrong type, missing file), with
            the parser's message.
    """
    from compresslight.lightning_cli import cli_class, config_namespace  # here: it imports Lightning

    class _ParseOnlyCLI(cli_class(config_namespace(list(args)))):
        def instantiate_classes(self) -> None:
            # Checking a config must not build the model or read the checkpoint it names.
            pass

        def _set_seed(self) -> None:
            # Keep `seed_everything: true` as written so that each trial draws its own seed, as a
            # run of the same config would.
            pass

    try:
        with warnings.catch_warnings():
            # LightningCLI warns when `args` is given while sys.argv has arguments: here they are
            # the sweep's own (`cli.py sweep --config ...`), deliberately not parsed as fit's.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = _ParseOnlyCLI(args=list(args), run=False, parser_kwargs={"exit_on_error": False})
    except Exception as error:  # jsonargparse raises ArgumentError; imports and files raise others
        raise ValueError(f"The fit arguments {list(args)!r} do not parse: {error}") from error
    dumped = cli.parser.dump(cli.config, skip_unset=False, skip_link_targets=True)
    config = yaml.safe_load(dumped)
    config.pop("config", None)
    return config


def write_fit_config(config: dict[str, Any], path: str | Path) -> Path:
    """Writes `config` as the YAML that `cli.py fit --config` reads, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def split_path_overrides(args: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Separates `--<path>=<value>` arguments whose path has a bracket from the others.

    Values are read as YAML (`0.5` is a float, `true` a bool, `[1, 2]` a list), as jsonargparse
    reads command-line values. Both `--path=value` and `--path value` are accepted.

    Returns:
        The other arguments in their order, and path -> value.

    Raises:
        ValueError: for a malformed path or a path override without a value.
    """
    rest: list[str] = []
    overrides: dict[str, Any] = {}
    items = list(args)
    position = 0
    while position < len(items):
        arg = items[position]
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "[" not in key:
            rest.append(arg)
            position += 1
            continue
        if "=" in arg:
            text = arg.split("=", 1)[1]
            position += 1
        elif position + 1 < len(items):
            text = items[position + 1]
            position += 2
        else:
            raise ValueError(f"The config-path argument {arg!r} has no value: write --{key}=VALUE.")
        parse_path(key)
        overrides[key] = yaml.safe_load(text) if text.strip() else text
    return rest, overrides


def expand_path_overrides(args: Sequence[str]) -> list[str]:
    """Applies config-path arguments to the config they edit; other arguments are unchanged.

    `cli.py fit --config base.yaml --trainer.callbacks[PruningCallback].init_args.ratios["layer1.*.conv1"]=0.5`
    becomes `cli.py fit --config <materialized.yaml>`, where the YAML is the parsed config of all
    other arguments with the path's value replaced. Path arguments apply after all others,
    whatever their position. Without such arguments the list is returned as it is, unparsed.

    Args:
        args: a command line after `cli.py`: the subcommand (e.g. `fit`) and its arguments.

    Returns:
        The arguments to give `CompressLightCLI`. The materialized config is a file in the
        temporary folder (the run saves its own copy of the config in its log dir).

    Raises:
        ValueError: for a malformed path, a path that names nothing in the config (with close
            matches), or arguments that do not parse.
    """
    args = list(args)
    rest, overrides = split_path_overrides(args)
    if not overrides:
        return args
    subcommand = [rest.pop(0)] if rest and not rest[0].startswith("-") else []
    passthrough: list[str] = []
    config_args: list[str] = []
    position = 0
    while position < len(rest):
        arg = rest[position]
        if arg.split("=", 1)[0] in _PASSTHROUGH or arg.startswith("--print_config"):
            passthrough.append(arg)
            takes_value = arg in ("--ckpt_path",) and position + 1 < len(rest)
            if takes_value:
                passthrough.append(rest[position + 1])
            position += 2 if takes_value else 1
            continue
        config_args.append(arg)
        position += 1
    config = resolve_fit_config(config_args)
    for path, value in overrides.items():
        config = set_at_path(config, path, value)
    handle, name = tempfile.mkstemp(prefix="compresslight-config-", suffix=".yaml")
    os.close(handle)
    write_fit_config(config, name)
    log.info(
        "Applied %d config-path arguments (%s); the run's config is %s.", len(overrides), ", ".join(overrides), name
    )
    return subcommand + ["--config", name] + passthrough
