"""Loading a checkpoint runs no code: every checkpoint compresslight writes loads with
`torch.load(weights_only=True)`, a planted one whose unpickling would run code is refused with a
clear error on every loading path, and a truncated one is named."""

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from compresslight.callbacks.lc import LCCallback
from compresslight.callbacks.pruning import PruningCallback
from compresslight.callbacks.quantization import QuantizationCallback
from compresslight.callbacks.tucker import TuckerVBMFCallback
from helpers import INPUT_SHAPE, classifier, tiny_convnet, tiny_loaders, tiny_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.nn import functional as F

from compresslight.checkpoint import UnsafeCheckpointError, load_compressed_checkpoint, read_checkpoint
from compresslight.classifier import ImageClassifier


class UserModule(pl.LightningModule):
    """A user's own LightningModule: nothing from compresslight in it."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = tiny_convnet()
        self.example_input_array = torch.zeros(1, *INPUT_SHAPE)

    def forward(self, x):
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        return F.cross_entropy(self(images), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class RunsCode:
    """Unpickling this runs `os.system`: the planted payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# (module, callbacks) of each kind of checkpoint compresslight writes.
KINDS = {
    "pruned": (lambda: classifier(arch=tiny_convnet()), lambda: [PruningCallback(amount=0.25, epochs=[1])]),
    "tucker": (lambda: classifier(arch=tiny_convnet()), lambda: [TuckerVBMFCallback(rank_method=0.5, epoch=1)]),
    "lc": (
        lambda: classifier(arch=tiny_convnet()),
        lambda: [LCCallback(lam=1.0, steps=1, epochs_per_step=1, cost="runtime", grid_points=2, measure_iters=2)],
    ),
    "qat": (
        lambda: classifier(arch=tiny_convnet()),
        lambda: [QuantizationCallback(qat_epochs=1, calibration_batches=2, int8=False, latency_batch_sizes=[])],
    ),
    "user_module": (UserModule, lambda: [PruningCallback(amount=0.25, epochs=[1], module_path="backbone")]),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_checkpoint_compresslight_writes_loads_weights_only(tmp_path, kind):
    build, callbacks = KINDS[kind]
    trainer = tiny_trainer(tmp_path, callbacks=[*callbacks(), ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    trainer.fit(build(), *tiny_loaders())
    path = tmp_path / "last.ckpt"
    # torch's own weights-only unpickler, no allow-list: the file holds tensors and plain data only.
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["callbacks"], "the callbacks' state (records) must be in the checkpoint"
    # And the model loads through the project's weights-only paths, its compression replayed.
    fresh = build()
    loaded = load_compressed_checkpoint(fresh, path)
    saved = checkpoint["state_dict"]
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in saved.items())
    if isinstance(fresh, ImageClassifier):
        reloaded = ImageClassifier.load_from_checkpoint(path, arch=tiny_convnet())
        assert [r.to_dict() for r in reloaded.compression_records] == [r.to_dict() for r in fresh.compression_records]


@pytest.fixture
def planted(tmp_path):
    """A checkpoint of a real trained classifier with a payload next to its weights."""
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    model = classifier()
    trainer.fit(model, *tiny_loaders())
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    checkpoint = torch.load(tmp_path / "good.ckpt", weights_only=True)
    marker = tmp_path / "code_ran"
    checkpoint["hyper_parameters"]["payload"] = RunsCode(marker)
    torch.save(checkpoint, tmp_path / "planted.ckpt")
    return tmp_path / "planted.ckpt", marker


REFUSED = r"'.*planted\.ckpt' holds objects that a weights-only load refuses \(.*posix\.system.*\): unpickling it"


def test_planted_checkpoint_is_refused_on_every_loading_path(tmp_path, planted):
    path, marker = planted
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        read_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        load_compressed_checkpoint(classifier(), path)
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        ImageClassifier.load_from_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        classifier(init_from=str(path))
    # Resuming goes through Lightning's loader, weights-only under torch >= 2.6 (not ours to word).
    with pytest.raises(Exception, match="Weights only load failed"):
        tiny_trainer(tmp_path, max_epochs=2).fit(classifier(), *tiny_loaders(), ckpt_path=path)
    assert not marker.exists()


def test_unsafe_load_is_an_explicit_logged_opt_in(planted, caplog):
    path, marker = planted
    # The payload is real: the opt-in runs it. Hence the default.
    checkpoint = read_checkpoint(path, weights_only=False)
    assert marker.exists()
    assert "state_dict" in checkpoint
    assert "weights_only=False: unpickling it can run arbitrary code" in caplog.text


@pytest.mark.parametrize("keep", [0.5, 0.99, 100])
def test_truncated_checkpoint_is_named(tmp_path, keep):
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(classifier(), *tiny_loaders())
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    message = r"Checkpoint '.*cut\.ckpt' is truncated or corrupt and cannot be read \(RuntimeError: .*\)\. Was its save"
    with pytest.raises(ValueError, match=message):
        read_checkpoint(cut)
    with pytest.raises(ValueError, match=message):
        ImageClassifier.load_from_checkpoint(cut)
