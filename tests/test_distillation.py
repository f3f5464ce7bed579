"""Knowledge distillation loss (Hinton) and teacher freezing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compresslight.compression.distillation import (
    DistillationOptions,
    StudentTap,
    check_same_classes,
    distillation_loss,
    freeze_teacher,
    mix_with_soft_targets,
    soft_target_loss,
)


def logits(seed: int, batch: int = 6, classes: int = 10) -> torch.Tensor:
    return torch.randn(batch, classes, generator=torch.Generator().manual_seed(seed)) * 3


TARGETS = torch.tensor([0, 3, 9, 1, 1, 5])


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_alpha_zero_is_cross_entropy(temperature: float) -> None:
    student, teacher = logits(0), logits(1)
    loss = distillation_loss(student, teacher, TARGETS, alpha=0.0, temperature=temperature)
    torch.testing.assert_close(loss, F.cross_entropy(student, TARGETS))


@pytest.mark.parametrize("temperature", [1.0, 2.5, 8.0])
def test_alpha_one_is_t_squared_kl_teacher_to_student(temperature: float) -> None:
    student, teacher = logits(0), logits(1)
    p_teacher = torch.softmax(teacher / temperature, dim=1)
    p_student = torch.softmax(student / temperature, dim=1)
    kl = (p_teacher * (p_teacher.log() - p_student.log())).sum(dim=1).mean()
    loss = distillation_loss(student, teacher, TARGETS, alpha=1.0, temperature=temperature)
    torch.testing.assert_close(loss, temperature**2 * kl)


def test_alpha_mixes_both_terms() -> None:
    student, teacher = logits(0), logits(1)
    soft = distillation_loss(student, teacher, TARGETS, alpha=1.0, temperature=3.0)
    hard = distillation_loss(student, teacher, TARGETS, alpha=0.0, temperature=3.0)
    mixed = distillation_loss(student, teacher, TARGETS, alpha=0.3, temperature=3.0)
    torch.testing.assert_close(mixed, 0.3 * soft + 0.7 * hard)


def test_kl_term_is_zero_when_student_equals_teacher() -> None:
    same = logits(0)
    loss = distillation_loss(same.clone(), same, TARGETS, alpha=1.0, temperature=4.0)
    assert loss.abs().item() < 1e-6
    assert distillation_loss(logits(2), same, TARGETS, alpha=1.0, temperature=4.0) > 0.01


def test_gradient_is_hinton_soft_target_gradient() -> None:
    # d/dz_s of T^2 * KL(p_t || p_s) is T * (p_s - p_t); averaged over the batch.
    temperature = 3.0
    student = logits(0).requires_grad_(True)
    teacher = logits(1)
    distillation_loss(student, teacher, TARGETS, alpha=1.0, temperature=temperature).backward()
    p_student, p_teacher = torch.softmax(student / temperature, 1), torch.softmax(teacher / temperature, 1)
    expected = temperature * (p_student - p_teacher) / len(student)
    torch.testing.assert_close(student.grad, expected.detach())


def test_gradient_reaches_only_the_student() -> None:
    torch.manual_seed(0)
    student_model, teacher_model = nn.Linear(8, 10), nn.Linear(8, 10)
    x = torch.randn(6, 8)
    loss = distillation_loss(student_model(x), teacher_model(x), TARGETS, alpha=0.7, temperature=2.0)
    loss.backward()
    assert student_model.weight.grad is not None and student_model.weight.grad.abs().sum() > 0
    assert teacher_model.weight.grad is None and teacher_model.bias.grad is None


def test_class_count_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"got student \(6, 10\) and teacher \(6, 5\); was the teacher trained"):
        distillation_loss(logits(0), logits(1, classes=5), TARGETS)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval_is_rejected(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\], got"):
        distillation_loss(logits(0), logits(1), TARGETS, alpha=alpha)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_non_positive_temperature_is_rejected(temperature: float) -> None:
    with pytest.raises(ValueError, match=r"`temperature` must be > 0, got"):
        distillation_loss(logits(0), logits(1), TARGETS, temperature=temperature)


def test_freeze_teacher_is_eval_and_not_trainable() -> None:
    teacher = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    assert freeze_teacher(teacher) is teacher
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    running_mean = teacher[1].running_mean.clone()
    x = torch.randn(8, 4)
    out = teacher(x)
    assert not out.requires_grad
    torch.testing.assert_close(teacher(x), out)  # dropout off
    assert torch.equal(teacher[1].running_mean, running_mean)  # BatchNorm statistics untouched


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(alpha=True), r"`alpha` must be in \[0, 1\], got True"),
        (dict(alpha="0.5"), r"`alpha` must be in \[0, 1\], got '0.5'"),
        (dict(temperature=0), r"`temperature` must be > 0, got 0"),
    ],
)
def test_options_are_validated_once(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        DistillationOptions(**kwargs)
    assert DistillationOptions(alpha=1, temperature=2) == DistillationOptions(alpha=1.0, temperature=2.0)


def test_mix_with_soft_targets_weights_the_model_loss_and_the_soft_term_in_float32() -> None:
    student, teacher = logits(0).half(), logits(1).half()
    own = torch.tensor(2.0)
    total, soft = mix_with_soft_targets(own, student, teacher, DistillationOptions(alpha=0.25, temperature=3.0))
    expected_soft = soft_target_loss(student.float(), teacher.float(), 3.0)
    assert soft.dtype == torch.float32
    torch.testing.assert_close(soft, expected_soft)
    torch.testing.assert_close(total, 0.75 * own + 0.25 * expected_soft)


def test_check_same_classes_refuses_another_head_and_keeps_the_students_mode() -> None:
    student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 10)).train()
    running_mean = student[1].running_mean.clone()
    check_same_classes(student, nn.Linear(4, 10), torch.randn(3, 4), "teacher.ckpt")
    assert student.training and all(module.training for module in student.modules())
    assert torch.equal(student[1].running_mean, running_mean)
    with pytest.raises(ValueError, match=r"\(teacher.ckpt\) predicts 5 classes but the student predicts 10"):
        check_same_classes(student, nn.Linear(4, 5), torch.randn(3, 4), "teacher.ckpt")
    assert student.training


def test_student_tap_captures_only_while_armed() -> None:
    student, tap = nn.Linear(4, 3), StudentTap()
    student.register_forward_hook(tap)
    x = torch.randn(2, 4)
    student(x)
    assert tap.disarm() == (None, None)
    tap.arm()
    out = student(x)
    inputs, captured = tap.disarm()
    assert inputs is x and captured is out
    student(x)
    assert tap.inputs is None and tap.logits is None
    tap.arm()
    student(x)
    assert copy.deepcopy(tap).inputs is None  # a copied student does not carry this tap's tensors
