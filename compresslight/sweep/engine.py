"""The sweep loop: Optuna proposes, a `cli.py fit` subprocess runs, the results go back to the study.

Every trial is a real fit in its own process (`python -m compresslight.cli fit --config
trial.yaml`) with its own folder `output_dir/trial_NNNN/` (config, log, metrics), so a crash,
an out-of-memory kill or a bad value fails that trial only: it is marked FAIL with the end of
its log in the user attribute `error`, and the sweep goes on.

The study lives in the storage (a SQLite file by default), so:
- an interrupted sweep resumes where it stopped when run again (`budget.n_trials` counts the
  trials the study holds, not those of one run); a trial whose worker was killed is found by
  its stale heartbeat (or, on the same machine, its missing process), marked failed and its
  parameters retried once;
- several workers, on one machine or many, share one study by pointing at one database URL
  (`--storage postgresql+psycopg://...` across machines; SQLite is for one machine).
- a trial's fit dies with its worker, even one killed with SIGKILL, and a worker started on the
  same machine reclaims the trial at once (`compresslight.sweep.workers`); workers that start
  together set the study up one at a time (`compresslight.sweep.storage.setup_lock`).

Hopeless trials stop early: the trial writes its validation metrics after every epoch
(`compresslight.sweep.results`) and the sweep reads them while the fit runs. With
`pruner: chance` a trial whose top-1 is at chance level (1/num_classes + margin) after
`chance_after_epochs` epochs is stopped and marked PRUNED (paper 002: pruned nets stuck at
100/n % never recovered); with `pruner: median` Optuna's MedianPruner judges the objective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from compresslight.sweep.fitconfig import write_fit_config
from compresslight.sweep.progress import SweepProgress, sweep_progress
from compresslight.sweep.report import BASE_ATTR, write_reports
from compresslight.sweep.results import CALLBACK_CLASS_PATH, read_progress, read_results
from compresslight.sweep.spec import SweepSpec
from compresslight.sweep.storage import open_storage, setup_lock
from compresslight.sweep.workers import (
    WORKER_ATTR,
    die_with_parent,
    fail_and_retry,
    fail_stale_trials,
    reclaim_dead_trials,
    this_worker,
)

log = logging.getLogger(__name__)

_POLL_S = 0.5
_ERROR_TAIL_CHARS = 3000


@dataclasses.dataclass
class TrialOutcome:
    """How one trial ended.

    Attributes:
        state: COMPLETE, PRUNED or FAIL.
        values: the objectives, in order (COMPLETE only).
        metrics: every scalar the trial reported (final, or the last intermediate ones).
        error: why it failed or was pruned, None if it completed.
        duration_s: wall-clock seconds of the fit.
    """

    state: TrialState
    values: list[float] | None
    metrics: dict[str, float]
    error: str | None
    duration_s: float


def run_sweep(spec: SweepSpec) -> optuna.Study:
    """Runs trials until the study holds `spec.budget.n_trials` or the time budget is spent.

    Returns:
        The study (its trials, Pareto front `study.best_trials`); the reports in
        `spec.output_dir` are written after every trial.

    Raises:
        ValueError: if the storage already holds a study of that name with other objectives or
            another search space.
    """
    storage = open_storage(spec.storage, heartbeat_s=spec.engine.heartbeat_s)
    # One worker at a time: two that start together would both see an empty study and both
    # queue the base schedule.
    with setup_lock(spec.storage):
        study = optuna.create_study(
            storage=storage,
            study_name=spec.study_name,
            directions=spec.directions,
            pruner=_pruner(spec),
            load_if_exists=True,
        )
        _check_same_study(study, spec)
        if spec.engine.include_base and not study.trials:
            study.enqueue_trial(spec.base_params, user_attrs={BASE_ATTR: True}, skip_if_exists=True)
    # A resumed sweep with a fixed seed would redraw the points it drew before: offset the seed
    # by the trials the study holds (still reproducible for a given history).
    study.sampler = _sampler(spec, seed_offset=len(study.trials))
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    distributions = {parameter.path: parameter.distribution for parameter in spec.parameters}
    started = time.monotonic()
    log.info(
        "Sweep %r: %d trials wanted, %d in the study (%s), output in %s.",
        spec.study_name, spec.budget.n_trials, len(study.trials), spec.storage, spec.output_dir,
    )  # fmt: skip
    with _sigterm_as_interrupt(), sweep_progress(spec.budget.n_trials, spec.objectives) as progress:
        _loop(spec, study, storage, distributions, started, progress)
    write_reports(study, spec)
    return study


def _loop(
    spec: SweepSpec,
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    distributions: dict[str, optuna.distributions.BaseDistribution],
    started: float,
    progress: SweepProgress,
) -> None:
    while True:
        reclaim_dead_trials(study)
        fail_stale_trials(study)
        counted = _counted_trials(study)
        progress.update(study, done=sum(trial.state != TrialState.RUNNING for trial in counted))
        held = len(counted)
        if held >= spec.budget.n_trials:
            log.info("Sweep %r holds %d trials (budget %d): done.", spec.study_name, held, spec.budget.n_trials)
            break
        if spec.budget.timeout_s is not None and time.monotonic() - started >= spec.budget.timeout_s:
            log.info("Sweep %r: time budget of %.0f s spent.", spec.study_name, spec.budget.timeout_s)
            break
        with warnings.catch_warnings():
            # Optuna warns that heartbeats are meant for `optimize`; this loop records them itself.
            warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
            trial = study.ask(distributions)
        # Who runs it, at once: a worker killed from here on leaves a trial that can be reclaimed.
        trial.set_user_attr(WORKER_ATTR, this_worker(trial.number))
        storage.record_heartbeat(trial._trial_id)
        try:
            outcome = run_trial(spec, study, trial, storage=storage)
        except KeyboardInterrupt:
            # The fit was killed with the sweep: record it now, and queue its parameters to run
            # first when the sweep resumes (as for a trial whose worker died, found by heartbeat).
            fail_and_retry(study, trial._trial_id, "interrupted: the sweep was stopped while this trial ran")
            write_reports(study, spec)
            log.warning("Sweep %r interrupted during trial %d; run it again to resume.", spec.study_name, trial.number)
            raise
        _record(study, trial, outcome)
        write_reports(study, spec)


def run_trial(
    spec: SweepSpec,
    study: optuna.Study,
    trial: optuna.Trial,
    storage: optuna.storages.RDBStorage | None = None,
) -> TrialOutcome:
    """Runs one trial's fit in a subprocess and reads its results.

    The subprocess is killed (with its process group) when the trial is pruned, runs past
    `budget.trial_timeout_s`, or this process is interrupted.

    Args:
        spec: the sweep.
        study: the study the trial belongs to.
        trial: the asked trial (its params are set).
        storage: the study's storage with heartbeats enabled, to keep the trial alive there.
    """
    trial_dir = (spec.output_dir / f"trial_{trial.number:04d}").resolve()
    trial_dir.mkdir(parents=True, exist_ok=True)
    for stale in (trial_dir / "results.json", trial_dir / "progress.jsonl"):
        stale.unlink(missing_ok=True)
    config = _trial_config(spec, trial.params, trial_dir)
    config_path = write_fit_config(config, trial_dir / "trial.yaml")
    trial.set_user_attr("trial_dir", str(trial_dir))
    command = [sys.executable, "-m", "compresslight.cli", "fit", "--config", str(config_path)]
    log.info("Trial %d: %s", trial.number, ", ".join(f"{p.label}={trial.params[p.path]!r}" for p in spec.parameters))
    started = time.monotonic()
    with (trial_dir / "fit.log").open("w") as fit_log:
        # Its own process group, and killed when this process dies: see `workers.die_with_parent`.
        # preexec_fn can deadlock when another thread holds a lock at fork; this one only calls
        # prctl and getppid (its library is loaded before the fork), and Python offers no other
        # way to set the parent-death signal.
        process = subprocess.Popen(
            command,
            stdout=fit_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # noqa: PLW1509
        )
        trial.set_user_attr("fit_pid", process.pid)
        try:
            stop_reason = _watch(spec, trial, process, trial_dir, started, storage)
        except BaseException:
            _kill(process)
            raise
    duration = time.monotonic() - started
    progress = read_progress(trial_dir)
    last_metrics = dict(progress[-1]["metrics"]) if progress else {}
    if stop_reason is not None:
        state = TrialState.PRUNED if stop_reason.startswith("pruned") else TrialState.FAIL
        return TrialOutcome(state, None, last_metrics, stop_reason, duration)
    if process.returncode != 0:
        return TrialOutcome(
            TrialState.FAIL,
            None,
            last_metrics,
            f"fit exited with code {process.returncode}:\n{_log_tail(trial_dir)}",
            duration,
        )
    results = read_results(trial_dir)
    if results is None:
        return TrialOutcome(
            TrialState.FAIL, None, last_metrics, f"fit wrote no results.json:\n{_log_tail(trial_dir)}", duration
        )
    metrics = results["metrics"]
    values = []
    for objective in spec.objectives:
        value = _objective_value(objective.name, metrics)
        if isinstance(value, str):
            return TrialOutcome(TrialState.FAIL, None, metrics, value, duration)
        values.append(value)
    return TrialOutcome(TrialState.COMPLETE, values, metrics, None, duration)


def _trial_config(spec: SweepSpec, params: dict[str, Any], trial_dir: Path) -> dict[str, Any]:
    config = spec.trial_config(params)
    trainer = config.setdefault("trainer", {})
    if trainer.get("default_root_dir") is None:
        # Runs without their own logger folder (logger: false, or the default logger) keep
        # their files in the trial folder instead of the working directory.
        trainer["default_root_dir"] = str(trial_dir)
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = logger.get("init_args") if isinstance(logger, dict) else None
        if isinstance(init_args, dict) and "save_dir" in init_args:
            # Each trial logs (metrics, profile.json, checkpoints) into its own folder.
            init_args["save_dir"] = str(trial_dir)
    callbacks = list(trainer.get("callbacks") or [])
    callbacks.append({"class_path": CALLBACK_CLASS_PATH, "init_args": {"output_dir": str(trial_dir)}})
    trainer["callbacks"] = callbacks
    return config


def _watch(
    spec: SweepSpec,
    trial: optuna.Trial,
    process: subprocess.Popen,
    trial_dir: Path,
    started: float,
    storage: optuna.storages.RDBStorage | None,
) -> str | None:
    """Polls the running fit; returns why it was stopped, None if it ended by itself."""
    reported_steps: set[int] = set()
    last_heartbeat = -math.inf
    while process.poll() is None:
        _raise_if_stopped()
        now = time.monotonic()
        if storage is not None and now - last_heartbeat >= spec.engine.heartbeat_s / 2:
            storage.record_heartbeat(trial._trial_id)  # what Optuna's own optimize loop records
            last_heartbeat = now
        if spec.budget.trial_timeout_s is not None and now - started > spec.budget.trial_timeout_s:
            _kill(process)
            return (
                f"stopped after {spec.budget.trial_timeout_s:.0f} s (`budget.trial_timeout_s`):\n{_log_tail(trial_dir)}"
            )
        reason = _read_new_progress(spec, trial, trial_dir, reported_steps)
        if reason is not None:
            _kill(process)
            log.info("Trial %d %s.", trial.number, reason)
            return reason
        time.sleep(_POLL_S)
    _raise_if_stopped()  # a stop that arrived while the fit ended (or was being started) still counts
    # Epochs that ended between the last poll and the exit still inform the median pruner.
    _read_new_progress(spec, trial, trial_dir, reported_steps)
    return None


def _read_new_progress(spec: SweepSpec, trial: optuna.Trial, trial_dir: Path, reported_steps: set[int]) -> str | None:
    """Judges the validation passes not seen yet; returns why the trial should stop, if it should."""
    for record in read_progress(trial_dir):
        step = int(record["step"])
        if step in reported_steps:
            continue
        reported_steps.add(step)
        reason = _prune_reason(spec, trial, record)
        if reason is not None:
            return reason
    return None


def _prune_reason(spec: SweepSpec, trial: optuna.Trial, record: dict[str, Any]) -> str | None:
    step, metrics = int(record["step"]), record.get("metrics", {})
    max_epochs = record.get("max_epochs")
    finished = max_epochs is not None and max_epochs >= 0 and step >= max_epochs
    if finished:
        return None  # nothing left to save: let the run end and report its result
    if spec.engine.pruner == "chance" and step == spec.engine.chance_after_epochs:
        top1, num_classes = metrics.get("val/top1"), record.get("num_classes")
        if top1 is not None and num_classes:
            chance = 1.0 / num_classes
            if top1 <= chance + spec.engine.chance_margin:
                return (
                    f"pruned: val/top1={top1:.4f} at chance level (1/{num_classes}={chance:.4f} + margin "
                    f"{spec.engine.chance_margin}) after {step} epoch(s)"
                )
    if spec.engine.pruner == "median":
        value = metrics.get(spec.objectives[0].name)
        if value is not None:
            trial.report(value, step)
            if trial.should_prune():
                return (
                    f"pruned: {spec.objectives[0].name}={value:.4f} at step {step} "
                    "is worse than the median of earlier trials"
                )
    return None


def _objective_value(name: str, metrics: dict[str, float]) -> float | str:
    """The objective's value, or a message saying why there is none."""
    if name in metrics:
        value = metrics[name]
    else:
        matches = sorted(key for key in metrics if fnmatch.fnmatchcase(key, name))
        if len(matches) != 1:
            produced = sorted(key for key in metrics if key.split("/")[0] == name.split("/")[0]) or sorted(metrics)
            found = f"{len(matches)} keys match it ({matches})" if matches else "no key matches it"
            return f"objective {name!r} not in the trial's results: {found}; produced keys: {produced}"
        value = metrics[matches[0]]
    if not math.isfinite(value):
        return f"objective {name!r} is {value} (diverged?)"
    return float(value)


def _record(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome) -> None:
    trial.set_user_attr("duration_s", round(outcome.duration_s, 2))
    trial.set_user_attr("metrics", outcome.metrics)
    # Bounded: a header and the log's last characters. A retried trial inherited its original's
    # attributes, so an error is cleared when the retry completes.
    trial.set_user_attr("error", outcome.error)
    if outcome.state == TrialState.COMPLETE:
        study.tell(trial, outcome.values)
        log.info("Trial %d complete in %.1f s: %s", trial.number, outcome.duration_s, outcome.values)
    else:
        study.tell(trial, state=outcome.state)
        log.warning(
            "Trial %d %s in %.1f s: %s",
            trial.number,
            outcome.state.name,
            outcome.duration_s,
            (outcome.error or "")[-500:],
        )


def _kill(process: subprocess.Popen) -> None:
    """Stops the fit and its children (data-loader workers): SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def _log_tail(trial_dir: Path) -> str:
    path = trial_dir / "fit.log"
    return path.read_text(errors="replace")[-_ERROR_TAIL_CHARS:] if path.is_file() else "(no log)"


def _sampler(spec: SweepSpec, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    engine = spec.engine
    seed = None if engine.seed is None else engine.seed + seed_offset
    if engine.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=engine.population_size)
    if engine.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # multivariate TPE models the groups' joint effect; constant_liar keeps parallel workers
    # from proposing the same point while their trials run.
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=engine.n_startup_trials, multivariate=True, constant_liar=True
    )


def _pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    if spec.engine.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


def _check_same_study(study: optuna.Study, spec: SweepSpec) -> None:
    described = spec.describe()
    stored = study.user_attrs.get("sweep")
    if stored is None:
        study.set_user_attr("sweep", described)
        return
    if stored != described:
        raise ValueError(
            f"`study_name`={spec.study_name!r} in {spec.storage} holds a sweep with another search space or other "
            f"objectives ({stored}); give this one another `--study_name` or another `--storage`."
        )


def _counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count toward `budget.n_trials`: finished, failed or running.

    A running trial counts, so parallel workers stop together; a failed trial whose parameters
    were queued again (its worker was interrupted or died) does not: its retry counts instead.
    """
    trials = study.get_trials(deepcopy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retried = {
            number for t in trials for number in optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(t)
        }
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return [t for t in trials if t.state in finished or (t.state == TrialState.FAIL and t.number not in retried)]


#: The SIGTERM received while a sweep runs, if any. The handler's KeyboardInterrupt can be lost:
#: a signal that lands while an at-fork callback runs (e.g. logging's lock release after the fork
#: that starts a trial's fit) is raised there and swallowed ("Exception ignored in ..."). The
#: loops check this flag too (`_raise_if_stopped`), so such a stop still ends the sweep.
_stop_signal: int | None = None


def _raise_if_stopped() -> None:
    if _stop_signal is not None:
        raise KeyboardInterrupt(f"signal {_stop_signal}")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turns SIGTERM (`kill`, a job scheduler's stop) into KeyboardInterrupt, so the running fit is
    stopped and recorded instead of left running, orphaned."""
    global _stop_signal
    _stop_signal = None

    def interrupt(signum: int, frame: Any) -> None:
        global _stop_signal
        _stop_signal = signum
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
