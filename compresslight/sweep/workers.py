"""Which worker runs a trial, whether that worker still lives, and fits that die with their worker.

A sweep worker (`cli.py sweep`) runs each trial's fit as a child process. Killed with SIGKILL
(the out-of-memory killer, `kill -9`, a lost SSH session's scheduler) it can neither stop its fit
nor record its trial, so:

- the fit asks Linux to kill it when its parent dies (`die_with_parent`), instead of training on,
  orphaned, and loading the machine while later trials are timed;
- the trial stays RUNNING in the study. Each trial records its worker (`WORKER_ATTR`: host, boot,
  pid namespace, pid and the pid's start time), so a worker started on the same machine sees at once that the
  trial's worker is gone and reclaims it (`reclaim_dead_trials`: FAIL, parameters queued again).
  A trial whose worker ran on another machine is judged by Optuna's heartbeat instead
  (`fail_stale_trials`), which can only decide after its grace period (2 x `engine.heartbeat_s`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

log = logging.getLogger(__name__)

WORKER_ATTR = "worker"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def this_worker(trial_number: int) -> dict[str, Any]:
    """This process as the worker of trial `trial_number` (stored in the trial's user attrs).

    The trial number is part of the record because a retried trial inherits its original's user
    attrs: the record of the dead worker must not describe the retry.
    """
    pid = os.getpid()
    return {
        "trial": trial_number,
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid_namespace": _pid_namespace(),
        "pid": pid,
        "started": _process_start(pid),
    }


def worker_is_gone(worker: Mapping[str, Any]) -> bool:
    """Whether the worker described by `worker` (see `this_worker`) has certainly stopped.

    Only a worker of this machine whose pids this process sees can be judged (False otherwise; a
    container may share the host name but not the pids): gone if the machine rebooted since, or
    its pid runs no process, or runs another one (a reused pid has another start time).
    """
    if worker.get("host") != socket.gethostname():
        return False
    if worker.get("pid_namespace") not in (None, _pid_namespace()):
        return False
    boot_id = _boot_id()
    if boot_id is not None and worker.get("boot_id") not in (None, boot_id):
        return True
    started = _process_start(int(worker["pid"]))
    if started is None:
        return True
    return worker.get("started") is not None and started != worker["started"]


def reclaim_dead_trials(study: optuna.Study) -> list[int]:
    """Fails the RUNNING trials whose worker ran on this machine and is gone; queues their parameters again.

    The same as Optuna does for a trial with a stale heartbeat (`RetryHeartbeatStaleTrialCallback`,
    one retry), without waiting for the grace period.

    Returns:
        The numbers of the reclaimed trials.
    """
    reclaimed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if not isinstance(worker, dict) or worker.get("trial") != trial.number or not worker_is_gone(worker):
            continue
        error = f"interrupted: its worker (pid {worker['pid']} on {worker['host']}) was killed while this trial ran"
        if fail_and_retry(study, trial._trial_id, error):
            reclaimed.append(trial.number)
            log.warning("Trial %d: %s; marked failed, its parameters will run again.", trial.number, error)
    return reclaimed


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's heartbeat check: trials silent for the grace period are failed and retried once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def fail_and_retry(study: optuna.Study, trial_id: int, error: str) -> bool:
    """Marks a RUNNING trial failed with `error` and queues its parameters once more.

    Returns:
        False if the trial had already finished (another worker got there first).
    """
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial_id, "error", error)
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(study, storage.get_trial(trial_id))
    return True


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child process get SIGKILL when this process dies (Linux).

    A trial's fit runs in its own process group (`start_new_session`), so that the sweep can stop
    it together with its data-loader workers (`os.killpg`) and a Ctrl-C in the terminal reaches
    the sweep only, which then stops and records the trial. The price: nothing stops the fit when
    the sweep itself is killed with SIGKILL. `prctl(PR_SET_PDEATHSIG)` closes that gap. The fit's
    own children then go too: data-loader workers exit when their parent does (PyTorch's watchdog),
    DDP ranks when rank 0's connection drops.

    Hand-written with ctypes because no maintained library exposes prctl for `preexec_fn`.
    Linux sends the signal when the *thread* that started the child ends: the sweep waits for the
    fit in the thread that started it, so that thread outlives the fit.

    Returns:
        The function, or None where prctl does not exist (not Linux): there a killed worker's fit
        runs to its end, and the trial is reclaimed as on Linux.
    """
    if not sys.platform.startswith("linux"):
        return None
    # Loaded here, in the parent: between fork and exec the child should do as little as possible.
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return set_parent_death_signal


def _boot_id() -> str | None:
    """This boot's id (Linux): pids of a worker recorded before a reboot name nothing now."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux), e.g. "pid:[4026531836]": pids mean something only within it."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), None if no such live process.

    Read from /proc by hand: psutil would do it but is not a dependency for one field. Without
    /proc (not Linux) the start is "unknown" for any live pid.
    """
    if not Path("/proc/self/stat").is_file():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # it exists, owned by someone else
        return "unknown"
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces and parentheses): state is the 3rd
    # field of the line, starttime the 22nd (proc(5)).
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # a zombie or dead process runs nothing
        return None
    return fields[19]


__all__ = [
    "WORKER_ATTR",
    "die_with_parent",
    "fail_and_retry",
    "fail_stale_trials",
    "reclaim_dead_trials",
    "this_worker",
    "worker_is_gone",
]
