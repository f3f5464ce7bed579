"""A diverging fit stops with a clear error in every compression callback, and the last good
checkpoint survives: no NaN model is ever saved over it."""

import pytest
import pytorch_lightning as pl
import torch
from compresslight.callbacks.distillation import DistillationCallback
from compresslight.callbacks.lc import LCCallback
from compresslight.callbacks.pruning import PruningCallback
from compresslight.callbacks.quantization import QuantizationCallback
from compresslight.callbacks.tucker import TuckerVBMFCallback
from helpers import INPUT_SHAPE, classifier, tiny_convnet, tiny_loaders, tiny_trainer
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch.nn import functional as F

from compresslight.checkpoint import read_checkpoint
from compresslight.divergence import TrainingDivergedError, nonfinite_tensors


class LearningRateSpike(Callback):
    """From `epoch` on, every optimizer runs at `lr`: a real divergence, after good epochs."""

    def __init__(self, epoch: int, lr: float = 1e30) -> None:
        self.epoch = epoch
        self.lr = lr

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch >= self.epoch:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.lr


class UserModule(pl.LightningModule):
    """A user's own module; its training_step returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = tiny_convnet()
        self.example_input_array = torch.zeros(1, *INPUT_SHAPE)

    def forward(self, x):
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        return {"loss": F.cross_entropy(self(images), targets)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


# Each compression callback, scheduled so that its work happens before the spike at epoch 2.
CALLBACKS = {
    "pruning": (lambda: classifier(arch=tiny_convnet()), lambda: PruningCallback(amount=0.25, epochs=[1])),
    "tucker": (lambda: classifier(arch=tiny_convnet()), lambda: TuckerVBMFCallback(rank_method=0.5, epoch=1)),
    "lc": (
        lambda: classifier(arch=tiny_convnet()),
        lambda: LCCallback(lam=1.0, cost="flops", mu_init=1e-2, steps=2, epochs_per_step=2),
    ),
    "quantization": (
        lambda: classifier(arch=tiny_convnet()),
        lambda: QuantizationCallback(qat_epochs=3, calibration_batches=2, int8=False, latency_batch_sizes=[]),
    ),
    "distillation": (lambda: classifier(arch=tiny_convnet()), lambda: DistillationCallback("self")),
    "user_module": (UserModule, lambda: PruningCallback(amount=0.25, epochs=[1], module_path="backbone")),
}


def checkpointing(tmp_path):
    # Lightning's default rotation: keep the newest epoch's file only, deleting the previous one.
    return ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_last=True)


@pytest.mark.parametrize("kind", list(CALLBACKS))
def test_diverging_fit_stops_and_keeps_the_last_good_checkpoint(tmp_path, kind):
    build, callback = CALLBACKS[kind]
    trainer = tiny_trainer(
        tmp_path, max_epochs=5, callbacks=[callback(), LearningRateSpike(epoch=2), checkpointing(tmp_path)]
    )
    with pytest.raises(
        TrainingDivergedError, match=r"Training diverged: .* at epoch 2.*Lower the learning rate \(current lr: 1e\+30\)"
    ):
        trainer.fit(build(), *tiny_loaders())
    saved = sorted(path.name for path in (tmp_path / "ckpt").iterdir())
    assert saved == ["epoch=1.ckpt", "last.ckpt"]
    for name in saved:
        checkpoint = read_checkpoint(tmp_path / "ckpt" / name)
        assert checkpoint["epoch"] == 1
        assert nonfinite_tensors(checkpoint["state_dict"].items()) == []


def test_lc_with_a_huge_lr_says_it_diverged_instead_of_failing_in_the_svd(tmp_path):
    lc = LCCallback(lam=1.0, cost="flops", mu_init=1e-2, steps=2, epochs_per_step=1)
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[lc, checkpointing(tmp_path)])
    with pytest.raises(TrainingDivergedError, match=r"Training diverged: .*epoch 0.*LCCallback stopped the fit"):
        trainer.fit(classifier(arch=tiny_convnet(), lr=1e30), *tiny_loaders())
    assert lc.history == []  # no C step ran on diverged weights
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").iterdir())


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tmp_path):
    model = classifier(arch=tiny_convnet())

    def poison():
        if model.current_epoch == 1:
            with torch.no_grad():
                model.model[0].weight[0, 0, 0, 0] = float("nan")

    model.on_train_epoch_end = poison
    trainer = tiny_trainer(
        tmp_path, max_epochs=3, callbacks=[PruningCallback(amount=0.25, epochs=[2]), checkpointing(tmp_path)]
    )
    with pytest.raises(
        TrainingDivergedError,
        match=r"Refusing to save a checkpoint whose weights are not finite \(model\.0\.weight\) at epoch 1",
    ):
        trainer.fit(model, *tiny_loaders())
    saved = sorted(path.name for path in (tmp_path / "ckpt").iterdir())
    assert saved == ["epoch=0.ckpt", "last.ckpt"]
    for name in saved:
        checkpoint = read_checkpoint(tmp_path / "ckpt" / name)
        assert checkpoint["epoch"] == 0
        assert nonfinite_tensors(checkpoint["state_dict"].items()) == []


DDP_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests_dir!r})
import pytorch_lightning as pl
from helpers import classifier, tiny_loaders
from compresslight.callbacks.pruning import PruningCallback
from compresslight.divergence import TrainingDivergedError

class NanOnRankOne(type(classifier())):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == 1 and self.current_epoch == 1 and batch_idx == 1:
            loss = loss * float("nan")  # this rank only: the other's loss stays finite at this step
        return loss

out_dir = Path(sys.argv[1])
trainer = pl.Trainer(
    strategy="ddp", accelerator="cpu", devices=2, max_epochs=3, limit_train_batches=4, limit_val_batches=0,
    logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out_dir),
    callbacks=[PruningCallback(amount=0.25, epochs=[1])],
)
model = NanOnRankOne(**dict(arch="resnet20", num_classes=4, input_shape=(3, 16, 16), lr=0.05))
try:
    trainer.fit(model, *tiny_loaders())
    error = None
except TrainingDivergedError as raised:
    error = str(raised)
(out_dir / f"rank{{trainer.global_rank}}.json").write_text(json.dumps({{"error": error, "step": trainer.global_step}}))
"""


@pytest.mark.slow
def test_ddp_ranks_stop_together_when_one_rank_diverges(tmp_path):
    """Without agreement the rank that saw the NaN would stop and the other wait forever in the
    next gradient all-reduce (the subprocess would time out)."""
    from pathlib import Path

    from helpers import run_ddp_script

    reports = run_ddp_script(tmp_path, DDP_SCRIPT.format(tests_dir=str(Path(__file__).parent)), timeout=240)
    assert reports[1]["error"].startswith("Training diverged: the training loss is nan at epoch 1, batch 1")
    assert "non-finite on another rank at epoch 1, batch 1" in reports[0]["error"]
    assert reports[0]["step"] == reports[1]["step"] == 4  # 2 batches per rank and epoch
