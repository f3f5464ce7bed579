"""DistillationCallback in real Trainer runs: the optimized loss is exactly
`alpha * T^2 * KL + (1 - alpha) * module loss`, the teacher stays frozen, in eval mode and out of
the LightningModule, a teacher for other classes is refused, and the "self" teacher is the
uncompressed model next to a PruningCallback."""

import textwrap

import pytest
import torch
from compresslight.callbacks.distillation import DistillationCallback
from compresslight.callbacks.pruning import PruningCallback
from helpers import TESTS_DIR, classifier, conv_widths, run_ddp_script, tiny_loaders, tiny_trainer
from pytorch_lightning.callbacks import Callback
from torch.nn import functional as F

from compresslight.classifier import ImageClassifier
from compresslight.compression.distillation import distillation_loss


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory):
    """A resnet20 trained for one short epoch: a teacher that disagrees with a fresh student."""
    directory = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(1)
    teacher = classifier()
    trainer = tiny_trainer(directory, max_epochs=1)
    trainer.fit(teacher, *tiny_loaders())
    path = directory / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


class LossWatcher(Callback):
    """Recomputes the distillation loss from the batch right before Lightning's backward."""

    def __init__(self, distillation: DistillationCallback) -> None:
        self.distillation = distillation
        self.pairs: list[tuple[float, float, float]] = []  # (optimized, expected, plain cross-entropy)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch

    def on_before_backward(self, trainer, pl_module, loss):
        images, targets = self.batch
        with torch.no_grad():
            # Same weights, same batch, train mode: the student's logits of this very step.
            student = pl_module.model(images)
            teacher = self.distillation.teacher(images)
        expected = distillation_loss(
            student, teacher, targets, alpha=self.distillation.alpha, temperature=self.distillation.temperature
        )
        self.pairs.append((loss.item(), expected.item(), F.cross_entropy(student, targets).item()))


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_optimized_loss_is_the_distillation_loss(tmp_path, teacher_ckpt, alpha):
    distillation = DistillationCallback(teacher_ckpt, alpha=alpha, temperature=3.0)
    watcher = LossWatcher(distillation)
    model = classifier()
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[distillation, watcher])
    trainer.fit(model, *tiny_loaders())

    assert len(watcher.pairs) == 4
    for optimized, expected, cross_entropy in watcher.pairs:
        assert optimized == pytest.approx(expected, rel=1e-4, abs=1e-5)
        if alpha == 0.0:
            assert optimized == pytest.approx(cross_entropy, rel=1e-4)
        else:
            assert abs(optimized - cross_entropy) > 1e-3
    assert "train/distill_loss_epoch" in trainer.callback_metrics
    assert "train/distill_soft_loss_epoch" in trainer.callback_metrics
    # The wrapper is gone after fit: the module's own training_step again.
    assert "training_step" not in model.__dict__


def test_teacher_is_frozen_in_eval_mode_and_not_part_of_the_module(tmp_path, teacher_ckpt):
    distillation = DistillationCallback(teacher_ckpt, alpha=0.5)
    model = classifier()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[distillation])
    trainer.fit(model, *tiny_loaders())

    teacher = distillation.teacher
    reference = ImageClassifier.load_from_checkpoint(teacher_ckpt).model
    # No step reached it: same weights and batch-norm statistics as in the checkpoint, no gradients.
    for (name, value), (_, saved) in zip(teacher.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(value, saved), name
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not any(module.training for module in teacher.modules())
    # Not a submodule: Lightning neither trains it nor saves it.
    assert all(module is not teacher for module in model.modules())
    checkpoint = tmp_path / "student.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)
    assert set(saved["state_dict"]) == set(classifier().state_dict())
    assert ImageClassifier.load_from_checkpoint(checkpoint).model.fc.out_features == 4


def test_teacher_for_another_number_of_classes_is_refused(tmp_path):
    other = classifier(num_classes=3)
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.strategy.connect(other)
    path = tmp_path / "three_classes.ckpt"
    trainer.save_checkpoint(path)
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[DistillationCallback(path)])
    with pytest.raises(ValueError, match=r"predicts 3 classes but the student predicts 4"):
        trainer.fit(classifier(), *tiny_loaders())


def test_self_teacher_comes_from_init_from_whatever_the_callback_order(tmp_path, teacher_ckpt):
    pruning = PruningCallback(amount=0.25, epochs=[0])
    distillation = DistillationCallback("self", alpha=0.5)
    model = classifier(init_from=str(teacher_ckpt))
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[pruning, distillation])  # pruning first
    trainer.fit(model, *tiny_loaders())

    full = conv_widths(classifier().model)
    assert conv_widths(model.model)["layer1.0.conv1"] == 12  # the student was pruned in setup ...
    assert conv_widths(distillation.teacher) == full  # ... the teacher is its uncompressed start
    assert distillation.teacher_source == str(teacher_ckpt)
    reference = ImageClassifier.load_from_checkpoint(teacher_ckpt).model
    torch.testing.assert_close(distillation.teacher.state_dict(), reference.state_dict())
    assert "train/distill_loss_epoch" in trainer.callback_metrics


def test_self_teacher_without_init_from_is_copied_before_compression(tmp_path):
    distillation = DistillationCallback("self", alpha=0.5)
    model = classifier()
    start = {key: value.clone() for key, value in model.model.state_dict().items()}
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[distillation, PruningCallback(amount=0.25)])
    trainer.fit(model, *tiny_loaders())
    assert conv_widths(distillation.teacher) == conv_widths(classifier().model)
    torch.testing.assert_close(distillation.teacher.state_dict(), start)
    assert conv_widths(model.model)["layer1.0.conv1"] == 12


def test_missing_teacher_is_an_error_when_fitting_starts(tmp_path):
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[DistillationCallback()])
    with pytest.raises(
        ValueError, match=r"DistillationCallback needs `teacher_ckpt`: a checkpoint path or 'self', got None"
    ):
        trainer.fit(classifier(), *tiny_loaders())


def test_self_teacher_after_a_compression_callback_is_an_error(tmp_path):
    trainer = tiny_trainer(
        tmp_path, max_epochs=1, callbacks=[PruningCallback(amount=0.25), DistillationCallback("self")]
    )
    with pytest.raises(ValueError, match="Put DistillationCallback before the compression callbacks"):
        trainer.fit(classifier(), *tiny_loaders())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(teacher_ckpt="missing.ckpt"),
            r"`teacher_ckpt` must be an existing checkpoint file or 'self', got 'missing.ckpt' \(no such file\)",
        ),
        (dict(teacher_ckpt="self", alpha=1.5), r"`alpha` must be in \[0, 1\], got 1.5"),
        (dict(teacher_ckpt="self", temperature=0.0), "`temperature` must be > 0, got 0.0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillationCallback(**kwargs)


# Each rank writes `rank{N}.json` after fit. Lightning's DDP launcher re-executes the script for
# rank 1, so it must be a real file.
DDP_DISTILL_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    from pathlib import Path
    sys.path.insert(0, {tests_dir!r})
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback
    from torch import nn
    from helpers import classifier, tiny_loaders
    from compresslight.callbacks.distillation import DistillationCallback

    out_dir, teacher_ckpt = Path(sys.argv[1]), sys.argv[2]

    def digest(module):
        hasher = hashlib.sha256()
        for name, value in module.state_dict().items():
            hasher.update(name.encode() + value.detach().contiguous().numpy().tobytes())
        return hasher.hexdigest()

    class Watcher(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            wrapped = trainer.strategy.model
            self.ddp_wraps_student_only = (
                isinstance(wrapped, nn.parallel.DistributedDataParallel)
                and wrapped.module is pl_module
                and all(module is not distillation.teacher for module in wrapped.modules())
            )
            self.teacher_in_eval = not any(module.training for module in distillation.teacher.modules())

    pl.seed_everything(0)
    distillation = DistillationCallback(teacher_ckpt, alpha=0.5)
    watcher = Watcher()
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_epochs=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(out_dir), callbacks=[distillation, watcher],
    )
    model = classifier()
    trainer.fit(model, *tiny_loaders())
    report = dict(
        student=digest(model), teacher=digest(distillation.teacher),
        ddp_wraps_student_only=watcher.ddp_wraps_student_only, teacher_in_eval=watcher.teacher_in_eval,
        logged="train/distill_loss_epoch" in trainer.callback_metrics,
    )
    (out_dir / f"rank{{trainer.global_rank}}.json").write_text(json.dumps(report))
    """
)


@pytest.mark.slow
def test_ddp_each_rank_has_its_own_frozen_teacher_and_ranks_agree(tmp_path, teacher_ckpt):
    reports = run_ddp_script(tmp_path, DDP_DISTILL_SCRIPT.format(tests_dir=str(TESTS_DIR)), str(teacher_ckpt))
    assert all(r["ddp_wraps_student_only"] and r["teacher_in_eval"] and r["logged"] for r in reports)
    assert reports[0]["student"] == reports[1]["student"]  # gradients of the distillation loss were all-reduced
    assert reports[0]["teacher"] == reports[1]["teacher"]  # and no rank's teacher moved
