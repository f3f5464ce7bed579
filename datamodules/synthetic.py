"""Random images of any shape and class count, for smoke tests and benchmarks.

With `learnable=True` every class has its own random mean image and a sample is that mean plus unit
Gaussian noise, so even a linear model learns it well above chance; with `learnable=False` labels
are independent of the inputs (chance accuracy, for pure speed measurements).
"""

from __future__ import annotations

import torch
from compresslight.datamodules.base import VisionDataModule, check_int
from torch.utils.data import DataLoader
from typing_extensions import override


class SyntheticDataModule(VisionDataModule):
    """Float images already "normalized" (no batch transform), deterministic given `seed`.

    Train, validation and test sets are generated in `setup` from the same class means with
    different noise.

    Args:
        num_classes: number of classes (labels in [0, num_classes)).
        input_shape: (C, H, W) of one image.
        num_samples: training images.
        num_val_samples: validation images.
        num_test_samples: test images.
        batch_size: training batch size.
        seed: seed of the data and of the shuffling.
        learnable: labels depend on the inputs (class-dependent mean).
        signal: distance scale of the class means, in units of the noise's std.
        eval_batch_size: validation/test batch size; None uses `batch_size`.
        num_workers: loader worker processes.
        shuffle: reshuffle the training set every epoch.
        drop_last: drop the last incomplete training batch.
        pin_memory: None pins when CUDA is available.

    Raises:
        ValueError: if a size or count is out of range, or `input_shape` is not three positive ints.
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        num_samples: int = 256,
        num_val_samples: int = 64,
        num_test_samples: int = 64,
        batch_size: int = 32,
        seed: int = 0,
        learnable: bool = True,
        signal: float = 1.0,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            shuffle=shuffle,
            drop_last=drop_last,
            augment=False,
            seed=seed,
        )
        # Rebound as a list before save_hyperparameters reads it: a list is what YAML (and so the
        # CLI's recorded config) gives, and Lightning refuses to log a datamodule hparam whose
        # value differs from the model's (`ImageClassifier` stores a list too) for the same key.
        input_shape = shape = list(input_shape)
        if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
            raise ValueError(f"`input_shape` must be three positive ints (C, H, W), got {input_shape!r}.")
        if signal < 0:
            raise ValueError(f"`signal` must be >= 0, got {signal!r}.")
        self.num_classes = check_int("num_classes", num_classes, 1)
        self.input_shape = (shape[0], shape[1], shape[2])
        self.num_samples = check_int("num_samples", num_samples, 1)
        self.num_val_samples = check_int("num_val_samples", num_val_samples, 1)
        self.num_test_samples = check_int("num_test_samples", num_test_samples, 1)
        self.learnable = learnable
        self.signal = float(signal)
        self.train_images: torch.Tensor | None = None
        self.train_labels: torch.Tensor | None = None
        self.val_images: torch.Tensor | None = None
        self.val_labels: torch.Tensor | None = None
        self.test_images: torch.Tensor | None = None
        self.test_labels: torch.Tensor | None = None
        self.save_hyperparameters()

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_images is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        class_means = torch.randn(self.num_classes, *self.input_shape, generator=generator) * self.signal

        def make(count: int) -> tuple[torch.Tensor, torch.Tensor]:
            labels = torch.randint(0, self.num_classes, (count,), generator=generator)
            images = torch.randn(count, *self.input_shape, generator=generator)
            if self.learnable:
                images += class_means[labels]
            return images, labels

        self.train_images, self.train_labels = make(self.num_samples)
        self.val_images, self.val_labels = make(self.num_val_samples)
        self.test_images, self.test_labels = make(self.num_test_samples)

    @override
    def transform_batch(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        """Returns `images` unchanged: synthetic images are generated as model input."""
        return images

    def _loader(self, images: torch.Tensor | None, labels: torch.Tensor | None, *, train: bool) -> DataLoader:
        if images is None or labels is None:
            raise RuntimeError("SyntheticDataModule: call setup() before asking for a dataloader.")
        return self._tensor_loader(images, labels, train=train)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_images, self.train_labels, train=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_images, self.val_labels, train=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_images, self.test_labels, train=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
