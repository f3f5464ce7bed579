"""PruningCallback in real Trainer runs: one-shot, mid-fit with optimizer rebuild, resume in a new
process, a foreign LightningModule, unstructured mode and bad input."""

import json
import textwrap

import pytest
import pytorch_lightning as pl
import torch
from compresslight.callbacks.pruning import PruningCallback
from helpers import INPUT_SHAPE, TESTS_DIR, classifier, conv_widths, run_python, tiny_loaders, tiny_trainer
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.nn import functional as F

from compresslight.checkpoint import load_compressed_checkpoint
from compresslight.classifier import ImageClassifier
from compresslight.compression.unstructured import sparsity


def test_one_shot_prunes_in_setup_before_optimizers_exist(tmp_path):
    before = conv_widths(classifier().model)
    pruning = PruningCallback(amount=0.25, norm=2)
    model = classifier()
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[pruning])
    trainer.fit(model, *tiny_loaders())
    after = conv_widths(model.model)
    assert after["conv1"] == before["conv1"] - before["conv1"] // 4
    assert after["layer3.2.conv1"] == 48
    assert model.model.fc.out_features == 4  # the classifier's outputs are never pruned
    assert len(model.compression_records) == 1
    # The optimizer holds exactly the pruned model's parameters.
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in model.parameters()}
    entries = [json.loads(line) for line in (tmp_path / "compression_log.jsonl").read_text().splitlines()]
    assert entries[0]["after"]["params"] < entries[0]["before"]["params"]
    assert entries[0]["after"]["channels"]["conv1"] == after["conv1"]


class StepWatcher(Callback):
    """Records, right after the pruning callback's epoch-start edit, the optimizer's view."""

    def __init__(self) -> None:
        self.at_start: dict[str, torch.Tensor] = {}
        self.lr_before_prune: float | None = None
        self.lr_after_prune: float | None = None
        self.momentum_after_prune: dict[str, torch.Tensor] = {}

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            self.lr_before_prune = trainer.optimizers[0].param_groups[0]["lr"]
            optimizer = trainer.optimizers[0]
            self.momentum_before = {
                name: optimizer.state[param]["momentum_buffer"].clone()
                for name, param in pl_module.named_parameters()
                if param in optimizer.state
            }

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            optimizer = trainer.optimizers[0]
            self.lr_after_prune = optimizer.param_groups[0]["lr"]
            self.at_start = {name: param.detach().clone() for name, param in pl_module.named_parameters()}
            self.momentum_after_prune = {
                name: optimizer.state[param]["momentum_buffer"].clone()
                for name, param in pl_module.named_parameters()
                if param in optimizer.state
            }


def test_mid_fit_prune_rebuilds_optimizer_keeps_schedule_and_momentum(tmp_path):
    pruning = PruningCallback(amount=0.5, epochs=[1])
    watcher = StepWatcher()  # after the pruning callback: sees the rebuilt optimizer
    model = classifier(lr_schedule="multistep", milestones=(0.5,), gamma=0.1)
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[pruning, watcher])
    trainer.fit(model, *tiny_loaders())

    assert conv_widths(model.model)["layer1.0.conv1"] == 8
    # The schedule kept its position: lr decayed once at epoch 1 (milestone round(0.5 * 3) = 2
    # is not reached yet at the start of epoch 1), so it is still the initial lr after the edit.
    assert watcher.lr_after_prune == pytest.approx(watcher.lr_before_prune)
    # Momentum survived for the surviving channels: the pruned buffer is the old one, sliced.
    record = model.compression_records[0]
    kept = record.parameter_index_map()["layer1.0.conv1.weight"]
    old = watcher.momentum_before["model.layer1.0.conv1.weight"]
    for dim, indices in kept.items():
        old = old.index_select(int(dim), torch.tensor(indices))
    torch.testing.assert_close(watcher.momentum_after_prune["model.layer1.0.conv1.weight"], old)
    # The new optimizer really steps the new parameters (a stale one would update nothing).
    moved = [
        name for name, param in model.named_parameters() if not torch.equal(param.detach(), watcher.at_start[name])
    ]
    assert "model.layer1.0.conv1.weight" in moved
    assert len(moved) == len(watcher.at_start)


def test_iterative_schedule_with_cumulative_targets(tmp_path):
    pruning = PruningCallback(amount=0.5, epochs=[0, 1, 2], ramp="agp")
    model = classifier()
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[pruning])
    trainer.fit(model, *tiny_loaders())
    assert pruning.completed_epochs == [0, 1, 2]
    assert len(model.compression_records) == 3
    # Cumulative: half of the original 16 channels are gone after the last step.
    assert conv_widths(model.model)["layer1.0.conv1"] == 8


def test_resume_in_a_new_process_replays_and_continues_the_schedule(tmp_path):
    model = classifier()

    class StopAfterEpoch1(Callback):  # the run is interrupted mid-schedule
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            trainer.should_stop = trainer.current_epoch == 1

    callbacks = [PruningCallback(amount=0.25, epochs=[1, 3]), StopAfterEpoch1()]
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=callbacks)
    train, val = tiny_loaders()
    trainer.fit(model, train, val)
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    expected_val = trainer.validate(model, val, verbose=False)[0]

    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from helpers import classifier, tiny_loaders, tiny_trainer
        from compresslight.callbacks.pruning import PruningCallback
        from compresslight.classifier import ImageClassifier
        train, val = tiny_loaders()
        # Without the callback: the checkpoint alone describes the pruned model.
        loaded = ImageClassifier.load_from_checkpoint({str(path)!r})
        val_metrics = tiny_trainer({str(tmp_path)!r}).validate(loaded, val, verbose=False)[0]
        # With it: resume mid-schedule, the next step (epoch 3) happens once.
        pruning = PruningCallback(amount=0.25, epochs=[1, 3])
        model = classifier()
        trainer = tiny_trainer({str(tmp_path)!r}, max_epochs=4, callbacks=[pruning])
        trainer.fit(model, train, val, ckpt_path={str(path)!r})
        print(json.dumps(dict(
            val=val_metrics, completed=pruning.completed_epochs, records=len(model.compression_records),
            width=model.model.layer1[0].conv1.out_channels,
        )))
        """
    )
    result = run_python("-c", script, cwd=tmp_path)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["val"]["val/loss"] == pytest.approx(expected_val["val/loss"], rel=1e-5)
    assert report["val"]["val/top1"] == pytest.approx(expected_val["val/top1"])
    assert report["completed"] == [1, 3]
    assert report["records"] == 2
    # Constant ramp to 25% of the original 16 channels: 14 kept at epoch 1, 12 at epoch 3.
    assert report["width"] == 12


class UserModule(pl.LightningModule):
    """A user's own LightningModule: a backbone and a head, nothing from compresslight."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, 4)
        self.example_input_array = torch.zeros(1, *INPUT_SHAPE)

    def forward(self, images):
        return self.head(self.backbone(images))

    def training_step(self, batch, batch_idx):
        images, targets = batch
        return F.cross_entropy(self(images), targets)

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        self.log("val_loss", F.cross_entropy(self(images), targets))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_foreign_module_prune_resume_and_load_outside_a_trainer(tmp_path):
    pruning = PruningCallback(amount=0.5, epochs=[1], module_path="backbone")
    module = UserModule()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[pruning])
    trainer.fit(module, *tiny_loaders())
    # The backbone's output feeds the head, outside the pruned submodule: its width is kept.
    assert module.backbone[0].out_channels == 8 and module.backbone[3].out_channels == 32
    path = tmp_path / "user.ckpt"
    trainer.save_checkpoint(path)
    inputs = torch.randn(2, *INPUT_SHAPE)
    expected = module.eval()(inputs)

    # Outside a Trainer: one call rebuilds the pruned structure and loads the weights.
    loaded = load_compressed_checkpoint(UserModule(), path)
    torch.testing.assert_close(loaded(inputs), expected)

    # Resume with the callback present: it replays its record in `setup`, before the weights load.
    resumed = UserModule()
    trainer = tiny_trainer(
        tmp_path, max_epochs=3, callbacks=[PruningCallback(amount=0.5, epochs=[1], module_path="backbone")]
    )
    trainer.fit(resumed, *tiny_loaders(), ckpt_path=path)
    assert resumed.backbone[0].out_channels == 8


def test_unstructured_mode_zeroes_weights_and_saves_plain_checkpoints(tmp_path):
    pruning = PruningCallback(amount=0.5, mode="unstructured", norm=1)
    model = classifier()
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[pruning])
    trainer.fit(model, *tiny_loaders())
    assert sparsity(model.model) == pytest.approx(0.5, abs=0.01)
    assert conv_widths(model.model)["layer1.0.conv1"] == 16  # no channel removed
    trainer.save_checkpoint(tmp_path / "sparse.ckpt")
    reloaded = ImageClassifier.load_from_checkpoint(tmp_path / "sparse.ckpt")
    assert sparsity(reloaded.model) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(amount=1.0), r"`amount` must be in \[0, 1\), got 1.0"),
        (dict(amount=-0.1), r"`amount` must be in \[0, 1\)"),
        (dict(ratios={"layer1.*.conv1": 1.2}), r"`ratios\['layer1.\*.conv1'\]` must be in \[0, 1\)"),
        (dict(amount=0.2, norm=3), r"`norm` must be 1 or 2, got 3"),
        (dict(), r"needs `amount` or `ratios`"),
        (dict(amount=0.2, epochs=[2, 1]), r"`epochs` must be increasing"),
        (dict(amount=0.2, epochs=[1, 2], targets=[0.5]), r"`targets` must be 2 increasing fractions"),
        (dict(amount=0.2, start_epoch=3, end_epoch=1), r"0 <= start_epoch <= end_epoch"),
        (dict(amount=0.2, ramp="cubic", epochs=[1, 2]), r"`ramp` must be 'constant' or 'agp'"),
        (dict(amount=0.2, mode="random"), r"`mode` must be 'structured' or 'unstructured'"),
        (dict(amount=0.2, importance="l1"), r"`importance` must be 'group' or 'filter'"),
    ],
)
def test_bad_arguments_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningCallback(**kwargs)


def test_pattern_matching_nothing_fails_before_training_and_leaves_model_untouched(tmp_path):
    model = classifier()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[PruningCallback(ratios={"layer9.*.conv1": 0.5})])
    with pytest.raises(ValueError, match="layer9"):
        trainer.fit(model, *tiny_loaders())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize("schedule", [{"epochs": [2]}, {"start_epoch": 1, "end_epoch": 2}])
def test_pattern_matching_nothing_in_a_later_epoch_fails_before_any_training_step(tmp_path, schedule):
    class StepCounter(Callback):
        steps = 0

        def on_train_batch_end(self, *args) -> None:
            self.steps += 1

    counter = StepCounter()
    pruning = PruningCallback(ratios={"layer1.*.conv1": 0.5, "layer9.*.conv1": 0.5}, **schedule)
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[pruning, counter])
    with pytest.raises(ValueError, match=r"`ratios` pattern 'layer9\.\*\.conv1' matches no prunable layer; prunable"):
        trainer.fit(classifier(), *tiny_loaders())
    assert counter.steps == 0  # before: the error came at epoch 2, after 8 training steps
