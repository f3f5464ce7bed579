"""Trainer concerns every callback shares, written once: rank 0 decides, the run's log dir, JSONL logs.

- `run_on_rank_zero`: run a computation on rank 0 only and give every rank its result, or raise
  the same error on every rank when it fails (a failure that stays on rank 0 would leave the other
  ranks waiting forever in the broadcast).
- `resolve_log_dir`: the run's log dir, as `trainer.log_dir` gives it. It is a collective under
  DDP (rank 0's path is broadcast): resolve it once, in a hook every rank runs (`setup`), and keep
  it; calling it from rank-zero-only code hangs the run.
- `append_jsonl`: one JSON line appended to a log file.
- `target_path` / `target_module`: the submodule a callback works on (`module_path`).
- `find_example_inputs`: one input batch for tracing the model.
- `OptimizerSnapshot` / `rebuild_optimizers`: the one optimizer rebuild after a structural edit
  (or a fresh start of the optimizers, LC's `restart_lr`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from compresslight import lightning_compat as pl
from compresslight.compression.record import CompressionRecord

__all__ = [
    "OptimizerSnapshot",
    "append_jsonl",
    "find_example_inputs",
    "rebuild_optimizers",
    "resolve_log_dir",
    "run_on_rank_zero",
    "target_module",
    "target_path",
]

log = logging.getLogger(__name__)

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


def target_path(pl_module: pl.LightningModule, module_path: str | None) -> str:
    """`module_path`, or by default `model` when the LightningModule has an `nn.Module` attribute of
    that name (as `ImageClassifier` does), else "" (the LightningModule itself)."""
    if module_path is not None:
        return module_path
    return "model" if isinstance(getattr(pl_module, "model", None), nn.Module) else ""


def target_module(pl_module: pl.LightningModule, module_path: str | None) -> nn.Module:
    """The submodule `target_path` names.

    Raises:
        ValueError: if `module_path` names no submodule.
    """
    path = target_path(pl_module, module_path)
    try:
        return pl_module.get_submodule(path)
    except AttributeError:
        children = [name for name, _ in pl_module.named_children()]
        raise ValueError(
            f"`module_path` must name a submodule of {type(pl_module).__name__} (children: {children}), got {path!r}."
        ) from None


def find_example_inputs(trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor:
    """One input batch for tracing: `example_input_array`, the datamodule's `input_shape`, or a
    float copy of the first training batch.

    Raises:
        ValueError: when none of those is available.
    """
    if isinstance(pl_module.example_input_array, torch.Tensor):
        return pl_module.example_input_array.to(pl_module.device)
    datamodule = getattr(trainer, "datamodule", None)
    input_shape = getattr(datamodule, "input_shape", None)
    if input_shape is not None:
        return torch.zeros(1, *input_shape, device=pl_module.device)
    if datamodule is not None:
        batch = next(iter(datamodule.train_dataloader()))
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return images[:1].float().to(pl_module.device)
    raise ValueError(
        "Compression needs example inputs to trace the model: set `example_input_array` on the "
        "LightningModule or use a datamodule with an `input_shape`."
    )


@dataclasses.dataclass
class OptimizerSnapshot:
    """Optimizer state by parameter *name* (parameter objects do not survive an edit), plus the
    LR schedulers' states and each param group's current hyperparameters (lr, and the momentum /
    betas that schedules such as OneCycleLR cycle too)."""

    states: list[dict[str, dict[str, Any]]]
    group_hyperparameters: list[list[dict[str, Any]]]
    scheduler_states: list[dict[str, Any]]

    @classmethod
    def take(cls, trainer: pl.Trainer, pl_module: pl.LightningModule) -> OptimizerSnapshot:
        names = {id(param): name for name, param in pl_module.named_parameters()}
        states = []
        for optimizer in trainer.optimizers:
            states.append(
                {
                    names[id(param)]: dict(optimizer.state[param])
                    for group in optimizer.param_groups
                    for param in group["params"]
                    if id(param) in names and param in optimizer.state
                }
            )
        group_hyperparameters = [
            [copy.deepcopy({key: value for key, value in group.items() if key != "params"}) for group in o.param_groups]
            for o in trainer.optimizers
        ]
        scheduler_states = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
        return cls(states=states, group_hyperparameters=group_hyperparameters, scheduler_states=scheduler_states)


def rebuild_optimizers(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    snapshot: OptimizerSnapshot | None = None,
    record: CompressionRecord | None = None,
) -> None:
    """Gives the Trainer optimizers over the module's current parameters.

    After an edit (`snapshot` taken before it): re-wraps the model under DDP, calls
    `configure_optimizers` again, carries each surviving parameter's state (sliced with the
    `record`'s kept indices where its shape shrank) and restores the LR schedulers' position and the
    param groups' current hyperparameters. A stale optimizer would keep stepping the removed tensors
    and silently never update the new ones.

    Without a snapshot: fresh optimizers and schedulers, as Lightning makes them at the start of fit
    (initial lr, no momentum; LC's `restart_lr`). The structure is unchanged: no DDP re-wrap.
    """
    strategy = trainer.strategy
    if snapshot is None:
        strategy.setup_optimizers(trainer)
        return
    if pl.is_ddp_strategy(strategy):
        # DDP keeps its own view of the parameters (buckets, hooks): wrap the edited module anew.
        # The new wrapper broadcasts rank 0's weights, so every rank starts the same.
        strategy.model = pl_module
        strategy.configure_ddp()
    strategy.setup_optimizers(trainer)

    index_map = {}
    if record is not None:
        prefix = f"{record.target}." if record.target else ""
        index_map = {prefix + name: dims for name, dims in record.parameter_index_map().items()}
    names = {id(param): name for name, param in pl_module.named_parameters()}
    for optimizer, old_states in zip(trainer.optimizers, snapshot.states):
        for group in optimizer.param_groups:
            for param in group["params"]:
                name = names.get(id(param))
                if name in old_states:
                    carried = _carry_state(old_states[name], param, index_map.get(name, {}))
                    if carried:
                        optimizer.state[param] = carried
    for config, state in zip(trainer.lr_scheduler_configs, snapshot.scheduler_states):
        config.scheduler.load_state_dict(state)
    # A scheduler's state_dict does not carry what it set on the param groups: without this the
    # next step would use the initial lr, and under OneCycleLR the initial momentum / Adam betas.
    for optimizer, groups in zip(trainer.optimizers, snapshot.group_hyperparameters):
        if len(groups) != len(optimizer.param_groups):
            log.warning(
                "configure_optimizers returned %d param groups after the edit, %d before: hyperparameters not "
                "restored (the schedule restarts from its initial values).", len(optimizer.param_groups), len(groups),
            )  # fmt: skip
            continue
        for group, hyperparameters in zip(optimizer.param_groups, groups):
            group.update(hyperparameters)


def _carry_state(old_state: dict[str, Any], param: torch.Tensor, kept: dict[int, list[int]]) -> dict[str, Any]:
    """The old state of one parameter, sliced to its new shape; empty if it cannot be mapped."""
    carried: dict[str, Any] = {}
    for key, value in old_state.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            carried[key] = value
            continue
        for dim, indices in kept.items():
            if value.shape != param.shape:
                value = value.index_select(int(dim), torch.as_tensor(indices, device=value.device))
        if value.shape != param.shape:
            return {}
        carried[key] = value
    return carried
