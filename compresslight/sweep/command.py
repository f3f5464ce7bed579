"""`python cli.py sweep --config configs/sweeps/NAME.yaml [--storage URL] [--n_trials N] ...`."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from compresslight.sweep.engine import run_sweep
from compresslight.sweep.spec import load_sweep_spec

log = logging.getLogger(__name__)


def sweep_command(args: Sequence[str]) -> None:
    """Runs (or resumes, or joins as one more worker) the sweep a sweep file describes.

    Args:
        args: the command line after `cli.py sweep`.

    Raises:
        FileNotFoundError: if the sweep file or its base config does not exist.
        ValueError: if the sweep file is invalid (checked before any trial runs).
    """
    parser = argparse.ArgumentParser(
        prog="cli.py sweep",
        description="Search compression parameters toward latency and accuracy (paper 002) with Optuna. "
        "Each trial is a `cli.py fit` subprocess. Run it again to resume; run it on several machines with one "
        "--storage URL to add workers.",
    )
    parser.add_argument("-c", "--config", required=True, help="sweep YAML file (see configs/sweeps/)")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///runs/sweeps/<study_name>.db)")
    parser.add_argument("--study_name", help="study name in the storage (default: the sweep file's stem)")
    parser.add_argument("--n_trials", type=int, help="trials the study should hold when this worker stops")
    parser.add_argument("--timeout_s", type=float, help="start no trial after this many seconds")
    parser.add_argument("--output_dir", help="trial folders and reports (default: runs/sweeps/<study_name>)")
    parser.add_argument("--seed", type=int, help="sampler seed (give each worker of one study its own)")
    parser.epilog = (
        "Any other --key=value is a fit argument added to the sweep file's base_args, e.g. "
        "--model.init_from=runs/baseline/last.ckpt."
    )
    options, fit_args = parser.parse_known_args(list(args))
    fit_args = [arg for arg in fit_args if arg != "--"]
    if fit_args and not fit_args[0].startswith("--"):
        parser.error(f"unexpected argument {fit_args[0]!r}: fit arguments are --key=value.")
    spec = load_sweep_spec(
        options.config,
        fit_args,
        storage=options.storage,
        study_name=options.study_name,
        n_trials=options.n_trials,
        timeout_s=options.timeout_s,
        output_dir=options.output_dir,
        seed=options.seed,
    )
    try:
        study = run_sweep(spec)
    except KeyboardInterrupt:
        log.warning("Sweep %r stopped; run the same command again to resume it.", spec.study_name)
        raise SystemExit(130) from None
    log.info("Sweep %r: %d trials; reports in %s.", spec.study_name, len(study.trials), spec.output_dir)
