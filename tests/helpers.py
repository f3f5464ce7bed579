"""Small builders shared by the tests: tiny data, a tiny Trainer, a tiny classifier."""

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from compresslight.classifier import ImageClassifier

INPUT_SHAPE = (3, 16, 16)


def tiny_loaders(num_classes: int = 4, samples: int = 32, batch_size: int = 8) -> tuple[DataLoader, DataLoader]:
    """Learnable random images: the class shifts the mean."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, num_classes, (samples,), generator=generator)
    images = torch.randn(samples, *INPUT_SHAPE, generator=generator) + targets.view(-1, 1, 1, 1)
    dataset = TensorDataset(images, targets)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True), DataLoader(dataset, batch_size=batch_size)


def tiny_trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=2, limit_train_batches=4, limit_val_batches=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def classifier(**kwargs) -> ImageClassifier:
    options = dict(arch="resnet20", num_classes=4, input_shape=INPUT_SHAPE, lr=0.05)
    options.update(kwargs)
    return ImageClassifier(**options)
