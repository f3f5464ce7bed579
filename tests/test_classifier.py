"""ImageClassifier: training, schedules, and checkpoints that replay compression records."""

import math
import textwrap

import pytest
import pytorch_lightning as pl
import torch
from helpers import INPUT_SHAPE, TESTS_DIR, classifier, run_python, tiny_loaders, tiny_trainer
from record_kinds import SplitLinearRecord

from compresslight.checkpoint import load_compressed_checkpoint
from compresslight.classifier import ImageClassifier


@pytest.mark.parametrize("lr_schedule", ["multistep", "cosine", "onecycle", "exponential", "constant"])
def test_fit_runs_and_schedule_moves_lr(tmp_path, lr_schedule):
    model = classifier(lr_schedule=lr_schedule, milestones=(0.5,), gamma=0.5)
    trainer = tiny_trainer(tmp_path)
    trainer.fit(model, *tiny_loaders())
    assert trainer.state.finished
    for key in ("train/loss_epoch", "train/top1", "train/f1", "val/top1", "val/loss"):
        assert key in trainer.callback_metrics, key
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    if lr_schedule == "constant":
        assert lr == pytest.approx(0.05)
    else:
        assert lr != pytest.approx(0.05)


def test_multistep_milestones_are_fractions_of_max_epochs(tmp_path):
    model = classifier(milestones=(0.5, 0.75))
    trainer = tiny_trainer(tmp_path, max_epochs=8)
    model.trainer = trainer
    scheduler = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert sorted(scheduler.milestones) == [4, 6]


class EpochLearningRates(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize(
    ("lr_schedule", "expected"),
    [
        # 3 epochs of 4 steps from max_steps=12: cosine over 3 epochs, the milestone at round(0.5 x 3) = 2.
        ("cosine", [0.05 * (1 + math.cos(math.pi * epoch / 3)) / 2 for epoch in range(3)]),
        ("multistep", [0.05, 0.05, 0.005]),
    ],
)
def test_epoch_schedules_take_their_length_from_max_steps(tmp_path, lr_schedule, expected):
    lrs = EpochLearningRates()
    model = classifier(lr_schedule=lr_schedule, milestones=(0.5,), gamma=0.1)
    trainer = tiny_trainer(tmp_path, max_epochs=-1, max_steps=12, limit_train_batches=4, callbacks=[lrs])
    trainer.fit(model, *tiny_loaders())
    assert trainer.current_epoch == 3
    assert lrs.lrs == pytest.approx(expected)  # before: one-epoch schedules, cosine 0.05, 0.0, 0.05


def test_epoch_schedule_of_an_endless_run_is_refused(tmp_path):
    trainer = tiny_trainer(tmp_path, max_epochs=-1, max_steps=-1)
    with pytest.raises(ValueError, match=r"`lr_schedule`='cosine' counts epochs .*max_epochs=-1, max_steps=-1"):
        trainer.fit(classifier(lr_schedule="cosine"), *tiny_loaders())


def test_top5_is_logged_only_with_more_than_five_classes(tmp_path):
    model = classifier(num_classes=10)
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, *tiny_loaders(num_classes=10))
    assert "val/top5" in trainer.callback_metrics
    assert set(classifier(num_classes=4).val_metrics.keys(keep_base=False)) == {"val/top1", "val/f1"}


def test_top5_is_right_on_a_class_ordered_validation_set(tmp_path):
    """Image-folder validation sets come ordered by class; the first batch is all class 0.

    The head prefers class 0, then 1, 2, ...: the first batch is all right at top-1, which made
    torchmetrics' compute groups merge top-5 into the top-1 statistics (top-5 logged = top-1).
    """
    num_classes, per_class = 10, 8
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, num_classes))
    with torch.no_grad():
        head[1].weight.mul_(0.01)
        head[1].bias.copy_(-torch.arange(num_classes, dtype=torch.float))
    images = torch.randn(num_classes * per_class, *INPUT_SHAPE)
    targets = torch.arange(num_classes).repeat_interleave(per_class)  # class-ordered
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size=per_class)
    model = ImageClassifier(arch=head, num_classes=num_classes, input_shape=INPUT_SHAPE)
    logged = tiny_trainer(tmp_path, limit_val_batches=None).validate(model, loader, verbose=False)[0]

    with torch.no_grad():
        top5 = head(images).topk(5, dim=1).indices
        top1 = top5[:, 0]
    expected_top5 = (top5 == targets[:, None]).any(dim=1).float().mean().item()
    expected_top1 = (top1 == targets).float().mean().item()
    assert expected_top5 > expected_top1 + 0.2  # the data makes top-5 and top-1 differ
    assert logged["val/top5"] == pytest.approx(expected_top5)
    assert logged["val/top1"] == pytest.approx(expected_top1)


def split_head(model: ImageClassifier, width: int = 5) -> None:
    record = SplitLinearRecord(layer="fc", width=width, target="model")
    record.apply(model.model)
    model.compression_records.append(record)


def test_checkpoint_replays_records_in_a_new_process(tmp_path):
    model = classifier()
    split_head(model)
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, *tiny_loaders())
    path = tmp_path / "compressed.ckpt"
    trainer.save_checkpoint(path)
    inputs = torch.randn(2, *INPUT_SHAPE)
    torch.save(inputs, tmp_path / "inputs.pt")
    expected = model.eval()(inputs)
    torch.save(expected, tmp_path / "expected.pt")

    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(TESTS_DIR)!r})
        import record_kinds  # a user-defined record kind must be importable
        from compresslight.classifier import ImageClassifier
        model = ImageClassifier.load_from_checkpoint({str(path)!r}).eval()
        assert model.model.fc[0].out_features == 5, model.model.fc
        outputs = model(torch.load({str(tmp_path / "inputs.pt")!r}))
        torch.testing.assert_close(outputs, torch.load({str(tmp_path / "expected.pt")!r}))
        print("OK", len(model.compression_records))
        """
    )
    result = run_python("-c", script, cwd=tmp_path, timeout=120)
    assert "OK 1" in result.stdout


def test_load_compressed_checkpoint_helper_and_prefix_replay(tmp_path):
    model = classifier()
    split_head(model)
    path = tmp_path / "model.ckpt"
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, *tiny_loaders())
    trainer.save_checkpoint(path)
    fresh = load_compressed_checkpoint(classifier(), path)
    assert isinstance(fresh.model.fc, torch.nn.Sequential)
    # A model that already holds the record (test after fit, same process) is not edited twice.
    model.on_load_checkpoint(torch.load(path, weights_only=False))
    assert len(model.compression_records) == 1


def test_checkpoint_with_other_history_is_refused(tmp_path):
    model = classifier()
    split_head(model, width=5)
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, *tiny_loaders())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    other = classifier()
    split_head(other, width=7)
    with pytest.raises(ValueError, match="does not start with"):
        other.on_load_checkpoint(torch.load(tmp_path / "a.ckpt", weights_only=False))


def test_checkpoint_from_another_architecture_fails_clearly(tmp_path):
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(classifier(), *tiny_loaders())
    trainer.save_checkpoint(tmp_path / "resnet20.ckpt")
    with pytest.raises(ValueError, match="holds a 'resnet20' model but this ImageClassifier has `arch`='resnet56'"):
        classifier(arch="resnet56").on_load_checkpoint(torch.load(tmp_path / "resnet20.ckpt", weights_only=False))
    with pytest.raises(ValueError, match="holds a 'resnet20' model"):
        classifier(arch="resnet56", init_from=str(tmp_path / "resnet20.ckpt"))


def test_init_from_copies_weights_and_records(tmp_path):
    source = classifier()
    split_head(source)
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(source, *tiny_loaders())
    trainer.save_checkpoint(tmp_path / "baseline.ckpt")
    model = classifier(init_from=str(tmp_path / "baseline.ckpt"))
    assert len(model.compression_records) == 1
    for (name, a), b in zip(source.model.state_dict().items(), model.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # The new run's checkpoints must not depend on the baseline file any more.
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, *tiny_loaders())
    trainer.save_checkpoint(tmp_path / "finetuned.ckpt")
    (tmp_path / "baseline.ckpt").unlink()
    reloaded = ImageClassifier.load_from_checkpoint(tmp_path / "finetuned.ckpt")
    assert reloaded.hparams.init_from is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(arch="resnet21"), r"`arch` must be one of \[.*'resnet20'.*\], got 'resnet21'"),
        (dict(lr=0.0), r"`lr` must be > 0, got 0.0"),
        (dict(momentum=1.0), r"`momentum` must be in \[0, 1\), got 1.0"),
        (dict(label_smoothing=-0.1), r"`label_smoothing` must be in \[0, 1\)"),
        (dict(lr_schedule="linear"), r"`lr_schedule` must be one of"),
        (dict(milestones=(0.5, 1.5)), r"`milestones` must be fractions of max_epochs in \(0, 1\)"),
        (dict(input_shape=(32, 32)), r"`input_shape` must be \(channels, height, width\)"),
        (dict(init_from="missing.ckpt"), r"`init_from` must be an existing checkpoint file, got 'missing.ckpt'"),
    ],
)
def test_bad_arguments_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        classifier(**kwargs)
