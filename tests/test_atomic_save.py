"""A failed checkpoint save (disk full, file too large) leaves the previous checkpoint intact and no
temporary file behind: `AtomicCheckpointIO`, the CLI's default checkpoint writer."""

import errno
import os
import resource
import shutil
import signal

import pytest
import torch
from helpers import classifier, tiny_convnet, tiny_loaders, tiny_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from compresslight.atomic_io import AtomicCheckpointIO, atomic_write_text
from compresslight.checkpoint import read_checkpoint
from compresslight.cli import build_from_config


class FileSizeLimit:
    """A real write failure part-way through: RLIMIT_FSIZE makes any write past `limit` bytes fail
    with EFBIG, as a full disk fails with ENOSPC (SIGXFSZ ignored so the write raises instead)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __enter__(self):
        self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        self.previous = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.previous[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.previous)
        signal.signal(signal.SIGXFSZ, self.handler)


def trained(tmp_path, checkpoint_io):
    """A real fit that saved `last.ckpt` at the end of each of its 2 epochs."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = tiny_trainer(tmp_path, callbacks=[checkpoint], plugins=[checkpoint_io])
    model = classifier(arch=tiny_convnet())
    trainer.fit(model, *tiny_loaders())
    return trainer, tmp_path / "ckpt" / "last.ckpt"


def perturb(trainer):
    with torch.no_grad():
        for parameter in trainer.lightning_module.parameters():
            parameter.add_(1.0)


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, fraction):
    trainer, last = trained(tmp_path, AtomicCheckpointIO())
    before = last.read_bytes()
    perturb(trainer)  # the next save would hold other weights
    with FileSizeLimit(int(len(before) * fraction)), pytest.raises(OSError) as raised:
        trainer.save_checkpoint(last)
    assert raised.value.errno == errno.EFBIG
    assert last.read_bytes() == before
    assert sorted(path.name for path in last.parent.iterdir()) == ["last.ckpt"], "temporary file left behind"
    assert read_checkpoint(last)["global_step"] == trainer.global_step
    # And the next save that can succeed does, with the new weights.
    trainer.save_checkpoint(last)
    saved = read_checkpoint(last)["state_dict"]
    assert all(torch.equal(saved[key], value) for key, value in trainer.lightning_module.state_dict().items())


def test_failed_sync_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A full disk can also surface at `fsync` (delayed allocation, NFS)."""
    trainer, last = trained(tmp_path, AtomicCheckpointIO())
    before = last.read_bytes()
    perturb(trainer)

    def disk_full(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.save_checkpoint(last)
    assert last.read_bytes() == before
    assert sorted(path.name for path in last.parent.iterdir()) == ["last.ckpt"]


def test_lightning_default_truncates_when_its_move_across_file_systems_fails(tmp_path, monkeypatch):
    """Why the plugin exists: Lightning's writer stages the file in the system temp dir and moves
    it; with that dir on another file system the move is a copy, and a full disk during the copy
    leaves a cut file under the checkpoint's own name. The failure is simulated in the copy."""
    trainer, last = trained(tmp_path, TorchCheckpointIO())
    size = last.stat().st_size

    def disk_full_after_1000_bytes(source, target):
        os.write(target.fileno(), os.read(source.fileno(), 1000))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "_fastcopy_sendfile", disk_full_after_1000_bytes)
    monkeypatch.setattr(os, "rename", lambda *args: (_ for _ in ()).throw(OSError(errno.EXDEV, "cross-device")))
    with pytest.raises(OSError):
        trainer.save_checkpoint(last)
    assert last.stat().st_size == 1000 < size
    with pytest.raises(ValueError, match=r"last\.ckpt' is truncated or corrupt"):
        read_checkpoint(last)


def test_atomic_write_text_keeps_old_content_and_permissions(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_text(path, "old")
    plain = tmp_path / "plain.json"
    plain.write_text("x")
    assert path.stat().st_mode == plain.stat().st_mode  # the umask applies as for a plain write
    with FileSizeLimit(2), pytest.raises(OSError):
        atomic_write_text(path, "new content")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.json", "report.json"]


def test_cli_trainer_saves_atomically():
    _, _, trainer = build_from_config(["--config", "configs/quickstart.yaml", "--trainer.logger", "false"])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
