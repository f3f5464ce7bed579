"""LightningDataModules, installed as `compresslight.datamodules`.

Every datamodule has `num_classes` and `input_shape` (C, H, W) right after `__init__`. The image
datamodules yield raw batches `(uint8 images, int64 labels)` and turn them into normalized float
input on the batch's device in `on_after_batch_transfer` (augmenting only in the training loop);
reuse that transform outside a Trainer with `datamodule.transform_batch(images, train=...)`.
`SyntheticDataModule` yields float input directly.

| datamodule | data | input_shape |
|---|---|---|
| `CIFAR10DataModule` | official python pickles, in memory | (3, 32, 32) |
| `ImageNetDataModule` | ImageFolder `train/`, `val/` | (3, image_size, image_size) |
| `SteelpatchDataModule` | ImageFolder of gray patches, pre-split or split here | (channels, image_size, image_size) |
| `SyntheticDataModule` | random tensors, optionally learnable | any |
"""

from compresslight.datamodules.base import IndexBatchSampler, TensorBatchDataset, VisionDataModule
from compresslight.datamodules.batch_transforms import (
    batch_random_crop,
    batch_random_flip,
    normalize_batch,
)
from compresslight.datamodules.cifar10 import (
    CIFAR10DataModule,
    download_cifar10,
    load_cifar10_batches,
)
from compresslight.datamodules.image_folder import (
    ImageFolderDataModule,
    ImageFolderDataset,
    ImageFolderIndex,
    scan_image_folder,
    stratified_split,
)
from compresslight.datamodules.imagenet import ImageNetDataModule
from compresslight.datamodules.steelpatch import SteelpatchDataModule
from compresslight.datamodules.synthetic import SyntheticDataModule

__all__ = [
    "CIFAR10DataModule",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "ImageFolderIndex",
    "ImageNetDataModule",
    "IndexBatchSampler",
    "SteelpatchDataModule",
    "SyntheticDataModule",
    "TensorBatchDataset",
    "VisionDataModule",
    "batch_random_crop",
    "batch_random_flip",
    "download_cifar10",
    "load_cifar10_batches",
    "normalize_batch",
    "scan_image_folder",
    "stratified_split",
]
