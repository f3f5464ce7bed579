"""Steelpatch: grayscale steel-surface defect patches in class folders (paper 000's industrial case).

Two layouts are accepted:
- pre-split: `data_dir/train/<class>/*`, `data_dir/val/<class>/*` and optionally `data_dir/test/`;
- one pool: `data_dir/<class>/*`, split here per class (stratified) into train/val/test by
  `val_fraction`/`test_fraction`, a function of `seed` and the file list only.

Patches of any size are resized to `image_size` squared (textures: the aspect ratio carries no
class information), decoded as grayscale and, for `channels=3` (e.g. an ImageNet-pretrained
ResNet18 as in paper 000), the gray channel is repeated. Training flips each patch horizontally
and vertically at random (a defect has no preferred orientation on the strip).
"""

from __future__ import annotations

import logging

import torch
from compresslight.datamodules.base import check_fraction, check_int
from compresslight.datamodules.batch_transforms import batch_random_flip
from compresslight.datamodules.image_folder import (
    STAGE_SPLITS,
    FileCheck,
    ImageFolderDataModule,
    ImageFolderIndex,
    ImageTransform,
    SquareResize,
    find_classes,
    scan_image_folder,
    stratified_split,
)
from typing_extensions import override

log = logging.getLogger(__name__)


class SteelpatchDataModule(ImageFolderDataModule):
    """Grayscale defect patches, pre-split or split here by class.

    With one split fraction at 0, the other evaluation split serves both validation and testing.

    Args:
        data_dir: the dataset folder (class folders, or train/val[/test] folders of class folders).
        image_size: side of the square model input.
        channels: 1 (grayscale) or 3 (gray repeated, for RGB models).
        batch_size: training batch size.
        val_fraction: share of each class held out for validation (one-pool layout).
        test_fraction: share of each class held out for testing (one-pool layout).
        seed: seed of the split and the shuffling.
        augment: random horizontal and vertical flips for training.
        num_workers: decoding worker processes.
        num_classes: class count; None counts the class folders in `__init__`.
        mean: mean of the [0, 1] gray values, used for every channel.
        std: standard deviation of the [0, 1] gray values, used for every channel.
        eval_batch_size: validation/test batch size; None uses `batch_size`.
        shuffle: reshuffle the training set every epoch.
        drop_last: drop the last incomplete training batch.
        pin_memory: None pins when CUDA is available.
        check_files, skip_bad_files: how `setup` checks the image files (see `ImageFolderDataModule`).

    Raises:
        FileNotFoundError: if `num_classes` is None and `data_dir` has no class folders.
        ValueError: if `channels` is not 1 or 3, a fraction is outside [0, 1), the fractions sum
            to 1 or more or are both 0, or a size or count is out of range.
    """

    layout_hint = (
        "Expected class folders data_dir/<class>/<image> (split here by val_fraction/test_fraction) "
        "or a pre-split data_dir/train/<class>/<image> and data_dir/val/<class>/<image> "
        "(data_dir/test/ optional)."
    )

    def __init__(
        self,
        data_dir: str = "data/steelpatch",
        image_size: int = 200,
        channels: int = 1,
        batch_size: int = 32,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 42,
        augment: bool = True,
        num_workers: int = 2,
        num_classes: int | None = None,
        mean: float = 0.5,
        std: float = 0.5,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        pin_memory: bool | None = None,
        check_files: FileCheck = "header",
        skip_bad_files: bool = False,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"`channels` must be 1 or 3, got {channels!r}.")
        self.image_size = check_int("image_size", image_size, 1)
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.test_fraction = check_fraction("test_fraction", test_fraction)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"`val_fraction` + `test_fraction` must be < 1 to leave training data, got "
                f"{val_fraction!r} + {test_fraction!r}."
            )
        if self.val_fraction == 0.0 and self.test_fraction == 0.0:
            raise ValueError("`val_fraction` and `test_fraction` are both 0: nothing to evaluate on.")
        if not 0.0 <= mean <= 1.0:
            raise ValueError(f"`mean` must be in [0, 1] (of the [0, 1] gray values), got {mean!r}.")
        if not std > 0.0:
            raise ValueError(f"`std` must be > 0, got {std!r}.")
        super().__init__(
            data_dir,
            num_classes=num_classes,
            decode_channels=1,
            replicate_to=channels if channels != 1 else None,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            shuffle=shuffle,
            drop_last=drop_last,
            augment=augment,
            seed=seed,
            check_files=check_files,
            skip_bad_files=skip_bad_files,
        )
        self.channels = channels
        self.input_shape = (channels, self.image_size, self.image_size)
        self.mean = (float(mean),) * channels
        self.std = (float(std),) * channels
        # num_classes may be None here (read from the folders); Lightning refuses to log a datamodule
        # hparam that differs from the model's linked num_classes, so only the model records it.
        self.save_hyperparameters(ignore=["num_classes"])

    @property
    def is_presplit(self) -> bool:
        """True when `data_dir` holds `train/` (and `val/`) folders rather than class folders."""
        return (self.data_dir / "train").is_dir()

    @override
    def train_transform(self) -> ImageTransform:
        return SquareResize(self.image_size)

    @override
    def eval_transform(self) -> ImageTransform:
        return SquareResize(self.image_size)

    @override
    def augment_batch(self, images: torch.Tensor) -> torch.Tensor:
        return batch_random_flip(batch_random_flip(images, dim=-1), dim=-2)

    @override
    def _find_classes(self) -> list[str]:
        if self.is_presplit:
            return super()._find_classes()
        if not self.data_dir.is_dir():
            raise self._missing(self.data_dir)
        try:
            return find_classes(self.data_dir)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{error} {self.layout_hint}") from error

    @override
    def split_indexes(self, stage: str | None) -> dict[str, ImageFolderIndex]:
        if self.is_presplit:
            return super().split_indexes(stage)  # the fractions do not apply
        if "pool" not in self._indexes:
            if self.classes is None:
                self.classes = self._find_classes()
            pool = scan_image_folder(self.data_dir, self.classes)
            train, val, test = stratified_split(pool.targets, (self.val_fraction, self.test_fraction), self.seed)
            self._indexes.update(pool=pool, train=pool.subset(train), val=pool.subset(val), test=pool.subset(test))
            # An empty evaluation split borrows the other one (both empty is refused in __init__).
            if not len(self._indexes["val"]):
                self._indexes["val"] = self._indexes["test"]
            if not len(self._indexes["test"]):
                self._indexes["test"] = self._indexes["val"]
            log.info(
                "Steelpatch split of %s (seed %d): %d train, %d val, %d test.",
                self.data_dir,
                self.seed,
                len(train),
                len(val),
                len(test),
            )
        return {split: self._indexes[split] for split in STAGE_SPLITS.get(stage, STAGE_SPLITS[None])}
