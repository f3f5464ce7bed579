"""Resuming (`ckpt_path`) with a longer fit than the checkpoint's LR schedule was built for is
refused before any training step, instead of crashing after one (one-cycle) or silently raising
the lr again (cosine)."""

import pytest
from helpers import classifier, tiny_convnet, tiny_loaders, tiny_trainer
from pytorch_lightning.callbacks import Callback


class StepCounter(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args):
        self.steps += 1


def finished_run(tmp_path, lr_schedule, max_epochs=1):
    trainer = tiny_trainer(tmp_path, max_epochs=max_epochs)
    trainer.fit(classifier(arch=tiny_convnet(), lr_schedule=lr_schedule), *tiny_loaders())
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    return tmp_path / "done.ckpt"


@pytest.mark.parametrize(
    ("lr_schedule", "setting"),
    [("onecycle", "OneCycleLR schedule has total_steps=4, but this fit's has total_steps=8"),
     ("cosine", "CosineAnnealingLR schedule has T_max=1, but this fit's has T_max=2")]
)  # fmt: skip
def test_extending_a_finished_run_is_refused_before_training(tmp_path, lr_schedule, setting):
    path = finished_run(tmp_path, lr_schedule)
    counter = StepCounter()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[counter])
    message = (
        rf"Cannot resume '.*done\.ckpt': its {setting} .*`--model\.init_from <checkpoint>` instead of `--ckpt_path`"
    )
    with pytest.raises(ValueError, match=message):
        trainer.fit(classifier(arch=tiny_convnet(), lr_schedule=lr_schedule), *tiny_loaders(), ckpt_path=path)
    assert counter.steps == 0


def test_a_longer_fit_from_the_weights_runs_a_new_one_cycle(tmp_path):
    path = finished_run(tmp_path, "onecycle")
    counter = StepCounter()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[counter])
    trainer.fit(classifier(arch=tiny_convnet(), lr_schedule="onecycle", init_from=str(path)), *tiny_loaders())
    assert counter.steps == 8
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == 8


def test_resuming_an_interrupted_run_with_its_own_settings_still_works(tmp_path):
    trainer = tiny_trainer(tmp_path, max_epochs=3)
    trainer.fit(classifier(arch=tiny_convnet(), lr_schedule="onecycle"), *tiny_loaders())
    full_run_lr = trainer.optimizers[0].param_groups[0]["lr"]
    # The same run, interrupted after its first epoch and resumed with the same max_epochs.
    interrupted = tiny_trainer(tmp_path / "b", max_epochs=3, callbacks=[Interrupt(after_epoch=0)])
    interrupted.fit(classifier(arch=tiny_convnet(), lr_schedule="onecycle"), *tiny_loaders())
    interrupted.save_checkpoint(tmp_path / "interrupted.ckpt")
    counter = StepCounter()
    resumed = tiny_trainer(tmp_path / "c", max_epochs=3, callbacks=[counter])
    resumed.fit(
        classifier(arch=tiny_convnet(), lr_schedule="onecycle"),
        *tiny_loaders(),
        ckpt_path=tmp_path / "interrupted.ckpt",
    )
    assert counter.steps == 8
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(full_run_lr)


class Interrupt(Callback):
    def __init__(self, after_epoch: int) -> None:
        self.after_epoch = after_epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.after_epoch:
            trainer.should_stop = True
