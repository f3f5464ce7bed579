"""The sweep's progress bar: trials done out of the budget, and the best result so far.

The bar is `profiling.progress.progress_bar` (Lightning's bar style, one owner for every
compresslight bar), on stderr here and shown only when stderr is a terminal (a log file or CI gets
the log lines alone); log lines are printed above the bar instead of through it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import optuna
from optuna.trial import TrialState
from tqdm.contrib.logging import logging_redirect_tqdm

from compresslight.profiling.progress import progress_bar, progress_enabled
from compresslight.sweep.spec import Objective


def best_so_far(study: optuna.Study, objectives: Sequence[Objective]) -> str:
    """A short line on the best complete trial(s): the best value of each objective, and the
    size of the Pareto front when there are several objectives."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return "no complete trial yet"
    parts = []
    for position, objective in enumerate(objectives):
        pick = max if objective.direction == "maximize" else min
        best = pick(complete, key=lambda trial: trial.values[position])
        parts.append(f"{objective.name}={best.values[position]:.4g} (trial {best.number})")
    line = "best " + ", ".join(parts)
    if len(objectives) > 1:
        line += f"; Pareto front: {len(study.best_trials)} trial(s)"
    return line


class SweepProgress:
    """Shows trials done out of `n_trials` and the best result so far; `update` after each trial."""

    def __init__(self, bar: Any, objectives: Sequence[Objective]) -> None:
        self.bar = bar
        self.objectives = objectives

    def update(self, study: optuna.Study, done: int) -> None:
        """Redraws the bar: `done` trials ended (other workers' count too)."""
        self.bar.n = done
        self.bar.set_postfix_str(best_so_far(study, self.objectives), refresh=False)
        self.bar.refresh()


@contextlib.contextmanager
def sweep_progress(
    n_trials: int, objectives: Sequence[Objective], file: TextIO | None = None
) -> Iterator[SweepProgress]:
    """The progress bar of one worker's loop (disabled when `file`, stderr by default, is not a terminal)."""
    file = sys.stderr if file is None else file
    enabled = progress_enabled(file=file)
    bar = progress_bar(n_trials, "Sweep", enabled=enabled, leave=True, file=file, unit="trial")
    try:
        with logging_redirect_tqdm() if enabled else contextlib.nullcontext():
            yield SweepProgress(bar, objectives)
    finally:
        bar.close()


__all__ = ["SweepProgress", "best_so_far", "sweep_progress"]
