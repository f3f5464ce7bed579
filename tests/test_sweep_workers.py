"""Sweeps under faults and across workers: killed workers, workers that start together, PostgreSQL.

Real processes and real kills throughout. The storage-level tests run small scripts that load
`compresslight/sweep/storage.py` by its path (it imports nothing of compresslight), so that two
processes start in about a second and really race. The PostgreSQL tests need a server:
`.ci/start_postgres` starts one on loopback and prints the URL to put in
`COMPRESSLIGHT_TEST_POSTGRES_URL` (CI does); without it they are skipped.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState
from test_sweep import LATENCY, REPO, tiny_sweep, write_sweep

from compresslight.sweep.progress import best_so_far, sweep_progress
from compresslight.sweep.spec import Objective
from compresslight.sweep.storage import open_storage
from compresslight.sweep.workers import (
    WORKER_ATTR,
    die_with_parent,
    reclaim_dead_trials,
    this_worker,
    worker_is_gone,
)

POSTGRES_URL = os.environ.get("COMPRESSLIGHT_TEST_POSTGRES_URL")
STORAGE_PY = REPO / "compresslight" / "sweep" / "storage.py"


def process_is_running(pid: int) -> bool:
    """Whether `pid` runs a process that is not a zombie (an orphan's zombie may wait for init)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


# --- item 12: a fit dies with its worker; a dead worker's trial is reclaimed -------------------


def _start_sleeper(pid_pipe, die: bool) -> None:
    """A stand-in worker: starts a long child as the sweep starts a fit, reports its pid, waits."""
    preexec = die_with_parent() if die else None
    child = subprocess.Popen(["sleep", "60"], start_new_session=True, preexec_fn=preexec)  # noqa: PLW1509
    pid_pipe.send(child.pid)
    time.sleep(60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
@pytest.mark.parametrize("die", [True, False], ids=["die_with_parent", "without"])
def test_child_dies_when_its_parent_is_killed(die: bool) -> None:
    receive, send = multiprocessing.Pipe(duplex=False)
    worker = multiprocessing.get_context("fork").Process(target=_start_sleeper, args=(send, die))
    worker.start()
    child_pid = receive.recv()
    assert process_is_running(child_pid)
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    try:
        if die:
            wait_until(lambda: not process_is_running(child_pid), 5, f"child {child_pid} to die")
        else:  # the control: a child in its own session outlives a killed parent
            time.sleep(0.5)
            assert process_is_running(child_pid)
    finally:
        if process_is_running(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_worker_is_gone_only_when_certain() -> None:
    me = this_worker(0)
    assert not worker_is_gone(me)
    assert worker_is_gone({**me, "pid": dead_pid()})
    assert worker_is_gone({**me, "started": "0"})  # this pid, but another process (pid reused)
    assert worker_is_gone({**me, "boot_id": "another-boot"})  # recorded before a reboot
    assert not worker_is_gone({**me, "host": "another-machine", "pid": dead_pid()})  # left to the heartbeat
    assert not worker_is_gone({**me, "pid_namespace": "pid:[1]", "pid": dead_pid()})  # another container's pids


def test_reclaim_fails_and_requeues_running_trials_of_dead_workers_only(tmp_path: Path) -> None:
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/s.db", heartbeat_s=60))
    distributions = {"x": optuna.distributions.FloatDistribution(0, 1)}
    trials = [study.ask(distributions) for _ in range(5)]
    me, gone = this_worker(0), dead_pid()
    workers = [
        {**me, "trial": 0, "pid": gone},  # dead worker: reclaimed
        {**me, "trial": 1},  # this process: alive
        {**me, "trial": 2, "pid": gone, "host": "another-machine"},  # heartbeat's call
        {**me, "trial": 0, "pid": gone},  # a record inherited from trial 0, not this trial's
    ]
    for trial, worker in zip(trials, workers):
        trial.set_user_attr(WORKER_ATTR, worker)
    # trials[4] has no record yet (asked a moment ago): left alone

    assert reclaim_dead_trials(study) == [0]
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL] + [TrialState.RUNNING] * 4 + [TrialState.WAITING]
    assert (
        study.trials[0].user_attrs["error"]
        == f"interrupted: its worker (pid {gone} on {me['host']}) was killed while this trial ran"
    )
    assert study.trials[5].params == study.trials[0].params  # its parameters run again, once
    assert reclaim_dead_trials(study) == []  # a second worker finds nothing left to reclaim


@pytest.mark.slow
def test_sigkilled_sweep_takes_its_fit_along_and_resumes_at_once(tmp_path: Path) -> None:
    sweep_file = write_sweep(tmp_path, tiny_sweep(tmp_path, budget={"n_trials": 1}))
    storage = f"sqlite:///{tmp_path}/study.db"
    killed = kill_while_fitting(start_worker(sweep_file, LONG_FIT), storage)
    finish(start_worker(sweep_file))  # at once: no waiting for a heartbeat to go stale
    check_rerun(optuna.load_study(study_name="tiny", storage=storage), killed)


LONG_FIT = "--trainer.max_epochs=100000"  # a fit that runs until it is killed


def start_worker(sweep_file: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), "sweep", "--config", str(sweep_file), *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(worker: subprocess.Popen) -> str:
    output = worker.communicate(timeout=600)[0]
    assert worker.returncode == 0, output[-3000:]
    return output


def running_fit(worker: subprocess.Popen, storage: str) -> optuna.trial.FrozenTrial | None:
    """The trial whose fit `worker` runs now, if any."""
    try:
        study = optuna.load_study(study_name="tiny", storage=storage)
    except KeyError:  # the study is not created yet
        return None
    for trial in study.get_trials(states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(WORKER_ATTR, {}).get("pid") == worker.pid and "fit_pid" in trial.user_attrs:
            return trial
    return None


def kill_while_fitting(worker: subprocess.Popen, storage: str) -> optuna.trial.FrozenTrial:
    """SIGKILLs `worker` once its trial's fit runs; the fit must die with it. Returns the trial."""
    wait_until(lambda: running_fit(worker, storage) is not None or worker.poll() is not None, 300, "a running fit")
    trial = running_fit(worker, storage)
    assert trial is not None and worker.poll() is None, worker.communicate()[0][-3000:]
    fit_pid = trial.user_attrs["fit_pid"]
    assert process_is_running(fit_pid)
    worker.kill()  # SIGKILL: the worker can record nothing
    worker.communicate()
    wait_until(lambda: not process_is_running(fit_pid), 10, f"the fit (pid {fit_pid}) to die with its worker")
    return trial


def check_rerun(study: optuna.Study, killed: optuna.trial.FrozenTrial) -> None:
    """The killed worker's trial is failed, and its parameters ran again, once, to completion."""
    failed = study.trials[killed.number]
    assert failed.state == TrialState.FAIL and "was killed while this trial ran" in failed.user_attrs["error"]
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params and retries[0].user_attrs["error"] is None
    assert all(t.state != TrialState.RUNNING for t in study.trials)


# --- item 13: workers that start together on a new storage ----------------------------------

RACE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("sweep_storage", sys.argv[1])
    storage_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(storage_module)
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = sys.argv[2]
    print("ready", flush=True)
    sys.stdin.readline()  # every process opens the new storage when the test says go
    storage = storage_module.open_storage(url, heartbeat_s=60)
    with storage_module.setup_lock(url):  # what run_sweep does: one worker queues the base trial
        study = optuna.create_study(storage=storage, study_name="race", load_if_exists=True)
        if not study.trials:
            time.sleep(0.3)  # widens the check-then-act window a missing lock would let others into
            study.enqueue_trial({"x": 0.5})
    """
)


def race_to_set_up(url: str, workers: int = 3) -> optuna.Study:
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_SCRIPT, str(STORAGE_PY), url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    for process in processes:  # a barrier: all have imported everything
        assert process.stdout.readline() == "ready\n", process.communicate()[1][-3000:]
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    errors = [process.communicate(timeout=120)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * workers, "\n".join(errors)[-3000:]
    return optuna.load_study(study_name="race", storage=url)


def test_workers_starting_together_on_a_new_sqlite_file_all_start(tmp_path: Path) -> None:
    study = race_to_set_up(f"sqlite:///{tmp_path}/new.db")
    assert len(study.trials) == 1  # exactly one queued base trial


# --- item 14: PostgreSQL ----------------------------------------------------------------------


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, empty database on the test server (dropped after the test)."""
    if not POSTGRES_URL:
        pytest.skip(
            "COMPRESSLIGHT_TEST_POSTGRES_URL is not set: no PostgreSQL server (bash .ci/start_postgres starts one)"
        )
    name = f"compresslight_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sqlalchemy.engine.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def test_workers_starting_together_on_a_new_postgres_database_all_start(postgres_url: str) -> None:
    study = race_to_set_up(postgres_url)
    assert len(study.trials) == 1


def test_two_workers_share_one_postgres_study_and_a_killed_one_is_resumed(tmp_path: Path, postgres_url: str) -> None:
    """Not marked slow on purpose: CI's default test command must run PostgreSQL for real (3 workers, 3 fits)."""
    sweep = tiny_sweep(tmp_path, budget={"n_trials": 2}, objectives=[{"name": "val/top1", "direction": "maximize"}])
    sweep["engine"] = {
        "sampler": "tpe",
        "pruner": "none",
    }  # no seed: workers of one study must not draw the same points
    sweep["storage"] = postgres_url
    sweep_file = write_sweep(tmp_path, sweep)
    long_worker = start_worker(sweep_file, LONG_FIT)
    wait_until(
        lambda: running_fit(long_worker, postgres_url) is not None or long_worker.poll() is not None, 300, "a fit"
    )
    finish(start_worker(sweep_file))  # runs the other trial while the first one's fit runs, then stops (budget 2)
    killed = kill_while_fitting(long_worker, postgres_url)
    finish(start_worker(sweep_file))  # reclaims the killed worker's trial and runs its parameters again

    study = optuna.load_study(study_name="tiny", storage=postgres_url)
    assert [t.number for t in study.trials] == [0, 1, 2]  # none lost, none twice
    check_rerun(study, killed)
    other = next(t for t in study.trials if t.number not in (killed.number, study.trials[-1].number))
    assert other.state == TrialState.COMPLETE and other.params != killed.params
    assert sum(bool(t.user_attrs.get("base_schedule")) for t in study.trials if t.state == TrialState.COMPLETE) == 1


# --- issue 13 item 4: the progress bar --------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def study_with(values: list[tuple[float, float]]) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    distributions = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for top1, latency in values:
        study.add_trial(
            optuna.trial.create_trial(params={"x": 0.5}, distributions=distributions, values=[top1, latency])
        )
    return study


OBJECTIVES = [Objective("val/top1", "maximize"), Objective(LATENCY, "minimize")]


def test_best_so_far_names_each_objective_and_the_front() -> None:
    assert best_so_far(study_with([]), OBJECTIVES) == "no complete trial yet"
    study = study_with([(0.40, 5.0), (0.30, 3.0), (0.20, 6.0)])
    assert (
        best_so_far(study, OBJECTIVES)
        == f"best val/top1=0.4 (trial 0), {LATENCY}=3 (trial 1); Pareto front: 2 trial(s)"
    )
    single = optuna.create_study(direction="minimize")
    single.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=2.5))
    assert best_so_far(single, [Objective("val/loss", "minimize")]) == "best val/loss=2.5 (trial 0)"


def test_progress_bar_shows_trials_and_best_on_a_terminal_only() -> None:
    study = study_with([(0.40, 5.0), (0.30, 3.0)])
    terminal, log_file = Terminal(), io.StringIO()
    for stream in (terminal, log_file):
        with sweep_progress(5, OBJECTIVES, file=stream) as progress:
            progress.update(study, done=2)
    assert "Sweep:  40%" in terminal.getvalue() and "2/5" in terminal.getvalue()
    assert "best val/top1=0.4 (trial 0)" in terminal.getvalue()
    assert log_file.getvalue() == ""
