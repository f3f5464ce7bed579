"""Sweeps of compression parameters toward latency and accuracy (paper 002), on Optuna.

`python cli.py sweep --config configs/sweeps/NAME.yaml` reads a sweep file (`spec`), runs every
trial as a `cli.py fit` subprocess (`engine`), collects what the trial wrote (`results`) and
writes tables, the Pareto front and a top-1 vs latency plot (`report`). Config paths (`paths`)
address any value of a fit config, including one init arg of one callback of the YAML list;
`fitconfig.expand_path_overrides` makes them usable as `--path=value` arguments (W&B sweeps).
"""

from compresslight.sweep.command import sweep_command
from compresslight.sweep.engine import TrialOutcome, run_sweep, run_trial
from compresslight.sweep.fitconfig import (
    expand_path_overrides,
    resolve_fit_config,
    split_path_overrides,
    write_fit_config,
)
from compresslight.sweep.paths import (
    close_matches,
    format_path,
    get_at_path,
    has_path,
    leaf_paths,
    parse_path,
    set_at_path,
)
from compresslight.sweep.report import pareto_front, plot_accuracy_vs_latency, results_table, write_reports
from compresslight.sweep.results import SweepResultsCallback, read_progress, read_results
from compresslight.sweep.spec import (
    Budget,
    Engine,
    Objective,
    Parameter,
    SweepSpec,
    load_sweep_spec,
    sweep_spec_from_dict,
)
from compresslight.sweep.storage import open_storage, setup_lock

__all__ = [
    "Budget",
    "Engine",
    "Objective",
    "Parameter",
    "SweepResultsCallback",
    "SweepSpec",
    "TrialOutcome",
    "close_matches",
    "expand_path_overrides",
    "format_path",
    "get_at_path",
    "has_path",
    "leaf_paths",
    "load_sweep_spec",
    "open_storage",
    "pareto_front",
    "parse_path",
    "plot_accuracy_vs_latency",
    "read_progress",
    "read_results",
    "resolve_fit_config",
    "results_table",
    "run_sweep",
    "run_trial",
    "set_at_path",
    "setup_lock",
    "split_path_overrides",
    "sweep_command",
    "sweep_spec_from_dict",
    "write_fit_config",
    "write_reports",
]
