"""last.ckpt, written by the configs' checkpoint setup, holds the model as it is after the last
epoch: after a mid-fit pruning epoch, the pruned model, even when val/top1 did not improve."""

from pathlib import Path

import pytest
import torch
import yaml
from compresslight.callbacks.pruning import PruningCallback
from helpers import INPUT_SHAPE, tiny_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from compresslight.checkpoint import read_checkpoint
from compresslight.classifier import ImageClassifier

CONFIGS = Path(__file__).parent.parent / "configs"


def checkpoint_setups() -> dict[str, list[dict]]:
    """Each distinct list of ModelCheckpoint init_args in configs/, with the first config that has it."""
    setups: dict[str, list[dict]] = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        callbacks = yaml.safe_load(path.read_text()).get("trainer", {}).get("callbacks") or []
        entries = [entry.get("init_args", {}) for entry in callbacks if entry["class_path"].endswith("ModelCheckpoint")]
        if entries and entries not in setups.values():
            setups[path.name] = entries
    return setups


def always_class_0_model() -> ImageClassifier:
    """Convs to prune and a head biased to class 0: on all-class-0 data val/top1 is 1.0 in every
    epoch, so a checkpoint that waits for val/top1 to improve never saves after epoch 0."""
    network = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    with torch.no_grad():
        network[-1].bias.copy_(torch.tensor([100.0, 0.0, 0.0, 0.0]))
    return ImageClassifier(arch=network, num_classes=4, input_shape=INPUT_SHAPE, lr=1e-4, lr_schedule="constant")


def test_configs_have_few_checkpoint_setups():
    assert 1 <= len(checkpoint_setups()) <= 4  # the test below runs each one


@pytest.mark.parametrize("config_name", list(checkpoint_setups()))
def test_last_checkpoint_after_a_pruning_epoch_holds_the_pruned_model(tmp_path, config_name):
    checkpoints = [ModelCheckpoint(**init_args) for init_args in checkpoint_setups()[config_name]]
    data = torch.utils.data.TensorDataset(torch.randn(16, *INPUT_SHAPE), torch.zeros(16, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model = always_class_0_model()
    pruning = PruningCallback(amount=0.5, epochs=[1])
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[pruning, *checkpoints], enable_checkpointing=True)
    trainer.fit(model, loader, loader)
    assert pruning.completed_epochs == [1]
    assert float(trainer.callback_metrics["val/top1"]) == 1.0  # never improved after epoch 0

    (last,) = (tmp_path / "checkpoints").glob("last*.ckpt")
    saved = read_checkpoint(last)
    assert saved["epoch"] == 1  # before: 0 (written only with the best checkpoint)
    assert len(saved["compression_records"]) == 1
    assert saved["state_dict"]["model.0.weight"].shape[0] == model.model[0].out_channels == 4
    reloaded = ImageClassifier.load_from_checkpoint(last, arch=always_class_0_model().model)
    assert reloaded.model[0].out_channels == 4
