"""`DistillationCallback`: train the model against a frozen teacher's softened outputs (Hinton et al. 2015).

The training loss becomes

    alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + (1 - alpha) * L

where `L` is the LightningModule's own training loss (for `ImageClassifier`, the cross-entropy
with its label smoothing). Paper 001 surveys distillation; the two uses here are (a) training the
compact VGG16 from a trained VGG16 and (b) fine-tuning a pruned or decomposed model with its own
uncompressed self as the teacher (`teacher_ckpt="self"`).

How it reaches the loss without any change to the LightningModule: at fit start the callback
puts a forward hook on the student network (`module_path`, default `model`) and wraps the
module's `training_step` (an instance attribute, removed at train end; Lightning's own
forward redirection patches methods the same way). The hook keeps the input and output of the
student's forward inside `training_step`; the wrapper runs the teacher on that same input and
returns the mixed loss, so Lightning's backward, gradient accumulation, AMP scaling and DDP all
see the real objective, and the student runs forward once. The module's `train/loss` stays its
own loss; the callback logs `train/distill_loss` (what is optimized) and `train/distill_soft_loss`.

The teacher lives on the callback, not in the LightningModule: Lightning does not train it, save
it in checkpoints, switch it to train mode, or wrap it in DDP (each rank holds its own copy, on
its own device). It is frozen (`requires_grad=False`) and in eval mode.

Teachers (`teacher_ckpt`):

- a checkpoint path: built as the student's LightningModule class from the checkpoint's
  hyperparameters (any `arch`), its compression records replayed, its weights loaded
  (`load_compressed_checkpoint`), so compressed teachers work;
- `"self"`: the student as it starts the run, before any compression. With
  `--model.init_from ckpt` (the papers' "compress a trained baseline, then fine-tune") the teacher
  is loaded from that checkpoint, which makes it independent of callback order. Without
  `init_from` it is a copy of the student taken in `setup`: put `DistillationCallback` before
  every compression callback in `trainer.callbacks` (an edit made earlier is detected and is an
  error), and such a run cannot resume from a checkpoint (the starting weights are not in it).

Only the training loss changes; validation and test report the module's own metrics.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from compresslight.callbacks._trainer import find_example_inputs, target_module, target_path
from compresslight.callbacks.divergence_guard import DivergenceGuard
from compresslight.callbacks.structural_edit import _EDIT_COUNT_ATTR
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from compresslight import lightning_compat as pl
from compresslight.checkpoint import load_compressed_checkpoint, read_checkpoint
from compresslight.compression.distillation import (
    DistillationOptions,
    StudentTap,
    check_same_classes,
    freeze_teacher,
    mix_with_soft_targets,
)

log = logging.getLogger(__name__)

SELF_TEACHER = "self"


class DistillationCallback(DivergenceGuard):
    """Adds a distillation term from a frozen teacher to the LightningModule's training loss.

    Args:
        teacher_ckpt: checkpoint of the teacher (a LightningModule of the student's class, any
            architecture, compressed or not), or "self" for the student's own starting weights.
            Required; None (a config's placeholder for a path given on the command line) is an
            error when fitting starts.
        alpha: weight of the soft (teacher) term, in [0, 1]; the module's loss gets `1 - alpha`.
        temperature: softening temperature T > 0.
        module_path: the student network inside the LightningModule, whose output are the
            logits and whose input the teacher also gets. Default: `model` when the module has an
            `nn.Module` attribute of that name (as `ImageClassifier` does), else the module itself.

    Raises:
        ValueError: for a `teacher_ckpt` file that does not exist, `alpha` outside [0, 1] or
            `temperature` <= 0.
    """

    def __init__(
        self,
        teacher_ckpt: str | Path | None = None,
        alpha: float = 0.5,
        temperature: float = 4.0,
        module_path: str | None = None,
    ) -> None:
        teacher_ckpt = str(teacher_ckpt) if teacher_ckpt is not None else None
        # None is accepted here so that a config can leave the path to the command line; `setup`
        # refuses it.
        if teacher_ckpt not in (None, SELF_TEACHER) and not Path(teacher_ckpt).is_file():
            raise ValueError(
                f"`teacher_ckpt` must be an existing checkpoint file or {SELF_TEACHER!r}, got {teacher_ckpt!r} "
                "(no such file)."
            )
        self.options = DistillationOptions(alpha, temperature)
        self.teacher_ckpt = teacher_ckpt
        self.module_path = module_path
        #: Where the teacher came from (a path, or "copy of the student at setup").
        self.teacher_source: str | None = None
        self._teacher: nn.Module | None = None
        self._tap = StudentTap()
        self._tap_handle: RemovableHandle | None = None
        self._tapped: nn.Module | None = None
        self._wrapped_module: pl.LightningModule | None = None

    @property
    def alpha(self) -> float:
        """Weight of the soft (teacher) term."""
        return self.options.alpha

    @property
    def temperature(self) -> float:
        """Softening temperature."""
        return self.options.temperature

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher network (None before `setup`)."""
        return self._teacher

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(teacher_ckpt=self.teacher_ckpt, module_path=self.module_path)

    def target_path(self, pl_module: pl.LightningModule) -> str:
        """The resolved `module_path`."""
        return target_path(pl_module, self.module_path)

    def _student(self, pl_module: pl.LightningModule) -> nn.Module:
        return target_module(pl_module, self.module_path)

    # --- teacher ---------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.teacher_ckpt is None:
            raise ValueError(
                f"DistillationCallback needs `teacher_ckpt`: a checkpoint path or {SELF_TEACHER!r}, got None (on the "
                "command line: `--trainer.callbacks.init_args.teacher_ckpt path/to/teacher.ckpt`)."
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"DistillationCallback changes the loss `training_step` returns, which needs automatic optimization; "
                f"{type(pl_module).__name__} has `automatic_optimization = False`."
            )
        student = self._student(pl_module)
        teacher = self._load_teacher(pl_module, student)
        teacher = freeze_teacher(teacher.to(trainer.strategy.root_device))
        check_same_classes(student, teacher, find_example_inputs(trainer, pl_module), str(self.teacher_source))
        self._teacher = teacher
        log.info(
            "DistillationCallback: teacher %s (%d parameters), alpha %.3g, temperature %.3g.",
            self.teacher_source, sum(p.numel() for p in teacher.parameters()), self.alpha, self.temperature,
        )  # fmt: skip

    def _load_teacher(self, pl_module: pl.LightningModule, student: nn.Module) -> nn.Module:
        path = self.target_path(pl_module)
        source = self.teacher_ckpt
        if source == SELF_TEACHER:
            init_from = getattr(pl_module, "hparams", {}).get("init_from")
            if not init_from:
                if getattr(pl_module, _EDIT_COUNT_ATTR, 0):
                    raise ValueError(
                        "DistillationCallback(teacher_ckpt='self') found the model already compressed in this process: "
                        "the teacher must be the uncompressed model. Put DistillationCallback before the compression "
                        "callbacks in `trainer.callbacks`, or start from a checkpoint (`--model.init_from`), which is "
                        "then the teacher whatever the order."
                    )
                self.teacher_source = "copy of the student at setup"
                # A copy, not a reference: compression callbacks edit the student in place.
                return copy.deepcopy(student)
            source = str(init_from)
        self.teacher_source = source
        return _load_module(source, type(pl_module)).get_submodule(path)

    # --- the loss ----------------------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._teacher is None:
            raise RuntimeError("DistillationCallback has no teacher: `setup` was not called for fitting.")
        if self.teacher_source == "copy of the student at setup" and trainer.ckpt_path is not None:
            raise ValueError(
                "DistillationCallback(teacher_ckpt='self') without `init_from` cannot resume from a checkpoint: the "
                "student's starting weights are not in it. Pass the starting checkpoint as `teacher_ckpt`."
            )
        parameter = next(self._student(pl_module).parameters(), None)
        if parameter is not None:
            # The student's device (each DDP rank its own) and, under "-true" precisions, its dtype.
            self._teacher.to(device=parameter.device, dtype=parameter.dtype if parameter.is_floating_point() else None)
        self._install(pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._uninstall()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._uninstall()  # also after an exception, when on_train_end did not run

    def _install(self, pl_module: pl.LightningModule) -> None:
        self._uninstall()
        original = pl_module.training_step
        callback = self

        def training_step(*args: Any, **kwargs: Any) -> Any:
            return callback._distill_step(pl_module, original, *args, **kwargs)

        pl_module.training_step = training_step  # instance attribute: the class is untouched
        self._wrapped_module = pl_module

    def _uninstall(self) -> None:
        if self._wrapped_module is not None:
            self._wrapped_module.__dict__.pop("training_step", None)
            self._wrapped_module = None
        if self._tap_handle is not None:
            self._tap_handle.remove()
            self._tap_handle = self._tapped = None

    def _ensure_tap(self, pl_module: pl.LightningModule) -> None:
        student = self._student(pl_module)
        if student is not self._tapped:  # first step, or something replaced the student network
            if self._tap_handle is not None:
                self._tap_handle.remove()
            self._tap_handle = student.register_forward_hook(self._tap)
            self._tapped = student

    def _distill_step(
        self, pl_module: pl.LightningModule, original: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        self._ensure_tap(pl_module)
        self._tap.arm()
        try:
            output = original(*args, **kwargs)
        finally:
            inputs, student_logits = self._tap.disarm()
        if output is None:  # the module skipped this batch
            return None
        loss = output["loss"] if isinstance(output, Mapping) else output
        if student_logits is None:
            raise RuntimeError(
                f"DistillationCallback: {type(pl_module).__name__}.training_step never called the student network "
                f"{self.target_path(pl_module) or type(pl_module).__name__!r}; set `module_path` to the network that "
                "computes the logits."
            )
        if not isinstance(student_logits, torch.Tensor):
            raise RuntimeError(
                "DistillationCallback needs the student network to return a logits tensor, got "
                f"{type(student_logits).__name__}."
            )
        assert self._teacher is not None
        with torch.no_grad():
            teacher_logits = self._teacher(inputs)
        total, soft = mix_with_soft_targets(loss, student_logits, teacher_logits, self.options)
        pl_module.log("train/distill_soft_loss", soft.detach(), on_step=True, on_epoch=True)
        pl_module.log("train/distill_loss", total.detach(), on_step=True, on_epoch=True, prog_bar=True)
        return {**output, "loss": total} if isinstance(output, Mapping) else total

    @override
    def state_dict(self) -> dict[str, Any]:
        # Where the teacher came from, not its weights: the teacher is never part of a checkpoint.
        return {"teacher_source": self.teacher_source}


def _load_module(path: str, module_class: type[pl.LightningModule]) -> pl.LightningModule:
    """Builds `module_class` from a checkpoint's hyperparameters and loads it, records replayed.

    Raises:
        ValueError: if the checkpoint's hyperparameters do not build `module_class`.
    """
    checkpoint = read_checkpoint(path)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    # The weights come from this checkpoint: a saved `init_from` (ImageClassifier) must not load another.
    hparams.pop("init_from", None)
    parameters = inspect.signature(module_class.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        hparams = {key: value for key, value in hparams.items() if key in parameters}
    try:
        module = module_class(**hparams)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"Could not build the teacher {module_class.__name__} from the hyperparameters in `teacher_ckpt` "
            f"{path!r}: {error}"
        ) from error
    return load_compressed_checkpoint(module, path)
