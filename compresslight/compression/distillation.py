"""Knowledge distillation (Hinton et al. 2015, surveyed in paper 001).

A student is trained on a mix of the usual cross-entropy with the labels and a term that pulls
its softened class distribution toward a frozen teacher's:

    loss = alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE(z_s, targets)
    p_teacher = softmax(z_t / T),  p_student = softmax(z_s / T)

The `T^2` factor keeps the soft term's gradient magnitude independent of the temperature.

Notation: issue 7 writes the soft term as `KL(softmax(z_s/T) || softmax(z_t/T))`. The standard
Hinton loss, implemented here, takes the teacher's distribution as the target, i.e.
`sum p_teacher * (log p_teacher - log p_student)`, which is what `F.kl_div(log p_student,
log p_teacher, log_target=True)` computes. Both directions are zero exactly when the two
distributions agree; the teacher-as-target form is the one whose gradient with respect to the
student logits is `(p_student - p_teacher) / T`, as in the paper.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DistillationOptions",
    "StudentTap",
    "check_same_classes",
    "distillation_loss",
    "freeze_teacher",
    "mix_with_soft_targets",
    "soft_target_loss",
]


@dataclasses.dataclass(frozen=True)
class DistillationOptions:
    """The distillation loss's options, validated on construction.

    Attributes:
        alpha: weight of the soft (teacher) term, in [0, 1]; the hard term gets `1 - alpha`.
        temperature: softening temperature T > 0.

    Raises:
        ValueError: for `alpha` outside [0, 1] or `temperature` <= 0.
    """

    alpha: float = 0.5
    temperature: float = 4.0

    def __post_init__(self) -> None:
        alpha, temperature = self.alpha, self.temperature
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}.")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0.0:
            raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "temperature", float(temperature))


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float = 0.5,
    temperature: float = 4.0,
) -> Tensor:
    """Hinton distillation loss, averaged over the batch.

    Args:
        student_logits: `(batch, classes)` logits of the model being trained.
        teacher_logits: `(batch, classes)` logits of the teacher; treated as constants
            (detached), so no gradient reaches the teacher.
        targets: `(batch,)` class indices for the cross-entropy term.
        alpha: weight of the soft (teacher) term, in [0, 1]; 0 is plain cross-entropy.
        temperature: softening temperature T > 0 applied to both logits in the soft term.

    Returns:
        Scalar `alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE(student, targets)`.

    Raises:
        ValueError: for `alpha` outside [0, 1], `temperature` <= 0, or student and teacher
            logits of different shapes (e.g. a teacher trained for another number of classes).
    """
    options = DistillationOptions(alpha, temperature)
    soft = soft_target_loss(student_logits, teacher_logits, options.temperature)
    hard = F.cross_entropy(student_logits, targets)
    return options.alpha * soft + (1.0 - options.alpha) * hard


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """The soft term of the distillation loss alone: `T^2 * KL(p_teacher || p_student)`, batch mean.

    `DistillationCallback` adds it to the LightningModule's own loss (which plays the part of the
    cross-entropy term), so label smoothing or any other loss the module uses is kept.

    Args:
        student_logits: `(batch, classes)` logits of the model being trained.
        teacher_logits: `(batch, classes)` logits of the teacher; detached, no gradient reaches it.
        temperature: softening temperature T > 0.

    Raises:
        ValueError: for `temperature` <= 0, or student and teacher logits of different shapes.
    """
    if not temperature > 0.0:
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"`student_logits` and `teacher_logits` must have the same shape (batch, classes), got "
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}; "
            "was the teacher trained for another number of classes?"
        )
    return F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits.detach() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)


def freeze_teacher(model: nn.Module) -> nn.Module:
    """Puts `model` in eval mode with no trainable parameters, in place, and returns it.

    Eval mode keeps BatchNorm on its running statistics and dropout off, so the teacher's
    targets do not depend on the batch; `requires_grad=False` keeps its parameters out of any
    optimizer and its activations out of the autograd graph. A Lightning callback that holds
    the teacher must still call `freeze_teacher` again after `trainer` switches modules to
    train mode if the teacher is registered as a submodule of the LightningModule.
    """
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def mix_with_soft_targets(
    loss: Tensor, student_logits: Tensor, teacher_logits: Tensor, options: DistillationOptions
) -> tuple[Tensor, Tensor]:
    """`(1 - alpha) * loss + alpha * soft_target_loss(...)`, and the soft term, for a model's own `loss`.

    The soft term is computed in float32: the softmax of T-scaled half-precision logits loses the
    small probabilities the soft targets are about.

    Returns:
        `(total, soft)`.
    """
    soft = soft_target_loss(student_logits.float(), teacher_logits.float(), options.temperature)
    return (1.0 - options.alpha) * loss + options.alpha * soft, soft


def check_same_classes(student: nn.Module, teacher: nn.Module, example_inputs: Tensor, teacher_name: str) -> None:
    """Refuses a teacher that predicts another number of classes than the student.

    Both run once on `example_inputs` in eval mode (the student's train/eval flags are restored, no
    batch-norm statistics move).

    Raises:
        ValueError: naming `teacher_name` and both numbers of classes.
    """
    training = {module: module.training for module in student.modules()}
    student.eval()
    try:
        with torch.no_grad():
            student_out = student(example_inputs.to(device_of(student)))
            teacher_out = teacher(example_inputs.to(device_of(teacher)))
    finally:
        for module, was_training in training.items():
            module.training = was_training
    if student_out.shape[-1] != teacher_out.shape[-1]:
        raise ValueError(
            f"The teacher ({teacher_name}) predicts {teacher_out.shape[-1]} classes "
            f"but the student predicts {student_out.shape[-1]}: "
            "distillation needs a teacher trained on the same classes (`teacher_ckpt`)."
        )


def device_of(module: nn.Module) -> torch.device:
    """The device of `module`'s first parameter (CPU for a module without parameters)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class StudentTap:
    """Forward hook that keeps the input and output of the student's last forward while armed.

    The teacher then runs on the very input the student saw inside the model's own step, and the
    student runs forward once.
    """

    def __init__(self) -> None:
        self.armed = False
        self.inputs: Any = None
        self.logits: Any = None

    def arm(self) -> None:
        self.armed, self.inputs, self.logits = True, None, None

    def disarm(self) -> tuple[Any, Any]:
        """Stops capturing; returns `(inputs, logits)` of the last forward while armed (None, None if none)."""
        captured = (self.inputs, self.logits)
        self.armed, self.inputs, self.logits = False, None, None
        return captured

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.armed:
            self.inputs = args[0] if len(args) == 1 else args
            self.logits = output

    def __deepcopy__(self, memo: dict[int, Any]) -> StudentTap:
        # A deep copy of the student (profiling, quantization) gets an idle tap, not this one's tensors.
        return StudentTap()
