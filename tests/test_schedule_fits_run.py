"""A compression scheduled at or beyond the run's last epoch fails before any training step,
whether `max_epochs` or `max_steps` ends the run (before: rc 0, an uncompressed model)."""

import re

import pytest
import pytorch_lightning as pl
import torch
from compresslight.callbacks.lc import LCCallback
from compresslight.callbacks.pruning import PruningCallback
from compresslight.callbacks.quantization import QuantizationCallback
from compresslight.callbacks.tucker import TuckerVBMFCallback
from helpers import classifier, tiny_loaders, tiny_trainer


class StepCounter(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1


def fit_fails_before_training(tmp_path, callback, match: str, **trainer_options) -> None:
    model = classifier()
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    counter = StepCounter()
    trainer = tiny_trainer(tmp_path, callbacks=[callback, counter], **trainer_options)
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, *tiny_loaders())
    assert counter.steps == 0
    assert all(torch.equal(weights[key], value) for key, value in model.state_dict().items())


@pytest.mark.parametrize(
    ("callback", "epochs"),
    [
        (lambda: PruningCallback(amount=0.25, epochs=[1, 3]), "[3]"),
        (lambda: PruningCallback(amount=0.25, start_epoch=2, end_epoch=4), "[3, 4]"),
        (lambda: TuckerVBMFCallback(rank_method=0.5, epoch=3), "[3]"),
    ],
)
def test_compression_epoch_beyond_max_epochs_fails_in_setup(tmp_path, callback, epochs):
    message = rf"compresses at the start of epoch\(s\) {re.escape(epochs)}, but this run trains 3 epoch\(s\) "
    message += r"\(0..2; max_epochs=3, max_steps=-1\)"
    fit_fails_before_training(tmp_path, callback(), message, max_epochs=3)


@pytest.mark.parametrize(
    ("callback", "trainer_options", "epoch"),
    [
        (lambda: PruningCallback(amount=0.25, epochs=[2]), {"max_epochs": -1}, 2),
        (lambda: TuckerVBMFCallback(rank_method=0.5, epoch=2), {"max_epochs": -1}, 2),
        (lambda: LCCallback(steps=2, lam=1.0, cost="flops", epochs_per_step=1), {"max_epochs": -1}, 2),
        # QAT starts max_epochs - qat_epochs = 3 into the run, but max_steps ends it after epoch 1.
        (lambda: QuantizationCallback(qat_epochs=1, calibration_batches=2, int8=False, latency_batch_sizes=[]),
         {"max_epochs": 4}, 3),
    ],
)  # fmt: skip
def test_compression_epoch_beyond_max_steps_fails_before_the_first_step(tmp_path, callback, trainer_options, epoch):
    # 4 batches per epoch, 8 steps: epochs 0 and 1 run.
    message = rf"epoch\(s\) \[{epoch}\], but this run trains 2 epoch\(s\) \(0..1; max_epochs=-?\d, max_steps=8\)"
    fit_fails_before_training(tmp_path, callback(), message, max_steps=8, limit_train_batches=4, **trainer_options)


def test_a_schedule_inside_the_run_still_trains(tmp_path):
    pruning = PruningCallback(amount=0.25, epochs=[1])
    trainer = tiny_trainer(tmp_path, max_epochs=-1, max_steps=8, limit_train_batches=4, callbacks=[pruning])
    model = classifier()
    trainer.fit(model, *tiny_loaders())
    assert pruning.completed_epochs == [1]
    assert len(model.compression_records) == 1
