"""Trainer concerns every callback shares, written once: rank 0 decides, the run's log dir, JSONL logs.

- `run_on_rank_zero`: run a computation on rank 0 only and give every rank its result, or raise
  the same error on every rank when it fails (a failure that stays on rank 0 would leave the other
  ranks waiting forever in the broadcast).
- `resolve_log_dir`: the run's log dir, as `trainer.log_dir` gives it. It is a collective under
  DDP (rank 0's path is broadcast): resolve it once, in a hook every rank runs (`setup`), and keep
  it; calling it from rank-zero-only code hangs the run.
- `append_jsonl`: one JSON line appended to a log file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from compresslight import lightning_compat as pl

__all__ = ["append_jsonl", "resolve_log_dir", "run_on_rank_zero"]

T = TypeVar("T")


def run_on_rank_zero(trainer: pl.Trainer, compute: Callable[[], T], what: str) -> T:
    """`compute()` on rank 0, its result broadcast to every rank.

    Measurement-driven decisions (a pruning allocation, an SVD's last bits, a runtime model) may
    differ between processes: rank 0 decides and the others follow. With one process this is
    just `compute()`, and its exception propagates unchanged.

    Args:
        trainer: the running Trainer.
        compute: the computation; its result must be picklable (plain data, CPU tensors: a CUDA
            tensor unpickles onto rank 0's device).
        what: what is computed, for the error message ("PruningCallback's edit").

    Raises:
        RuntimeError: on every rank, naming `what` and rank 0's error, when `compute` fails on
            rank 0 under several processes.
    """
    if trainer.world_size == 1:
        return compute()
    result: T | None = None
    failure: str | None = None
    if trainer.is_global_zero:
        try:
            result = compute()
        except Exception as error:
            failure = f"{type(error).__name__}: {error}"
    result, failure = trainer.strategy.broadcast((result, failure), src=0)
    if failure is not None:
        raise RuntimeError(f"{what} failed on rank 0: {failure}")
    return result  # type: ignore[return-value]


def resolve_log_dir(trainer: pl.Trainer) -> Path:
    """The run's log dir: the first logger's (`trainer.log_dir`), else `default_root_dir`.

    A collective under DDP: call it on every rank, once (in `setup`), and keep the path.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


def append_jsonl(path: Path, entry: dict[str, Any]) -> None:
    """Appends `entry` as one JSON line to `path`, creating its folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")
