"""ImageNet (ILSVRC-2012) in the ImageFolder layout, with the standard ResNet/AlexNet transforms.

| split | per image, in workers (PIL) | per batch, on device |
|---|---|---|
| train | RandomResizedCrop(image_size, scale=(min_scale, 1)) | horizontal flip, normalize |
| val/test | resize shorter side to eval_resize_size, center crop image_size | normalize |
"""

from __future__ import annotations

from compresslight.datamodules.base import check_int
from compresslight.datamodules.image_folder import (
    FileCheck,
    ImageFolderDataModule,
    ImageTransform,
    RandomResizedCrop,
    ResizeCenterCrop,
)
from typing_extensions import override

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet from `data_dir/train/<wnid>/*.JPEG` and `data_dir/val/<wnid>/*.JPEG`.

    `num_classes` defaults to None: the class folders of `train/` are counted in `__init__` (one
    directory listing, no file scan), so a subset such as Imagenette gets its own count. Pass an int
    to build the datamodule before the data is there; `setup` then checks it against the folders.
    `test/` is optional (the official test labels are not public); without it testing uses `val/`.

    Args:
        data_dir: the folder holding `train/` and `val/`.
        batch_size: training batch size.
        num_workers: decoding worker processes.
        image_size: side of the square model input.
        eval_resize_size: shorter side before the evaluation center crop; None uses
            round(image_size / 0.875) (256 for 224).
        min_scale: smallest crop area of RandomResizedCrop, as a fraction of the image.
        num_classes: class count; None counts the class folders.
        eval_batch_size: validation/test batch size; None uses `batch_size`.
        augment: random crops and flips for training (off: training uses the evaluation crop).
        shuffle: reshuffle the training set every epoch.
        drop_last: drop the last incomplete training batch.
        pin_memory: None pins when CUDA is available.
        seed: shuffling seed.
        check_files, skip_bad_files: how `setup` checks the image files (see `ImageFolderDataModule`).

    Raises:
        FileNotFoundError: if `num_classes` is None and neither `train/` nor `val/` exists.
        ValueError: if a size, count or fraction is out of range.
    """

    layout_hint = (
        "Expected the ImageFolder layout data_dir/train/<class>/<image> and "
        "data_dir/val/<class>/<image> (JPEG/PNG); the official validation images must be sorted "
        "into class folders first (e.g. with the widely used valprep.sh)."
    )

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: int = 224,
        eval_resize_size: int | None = None,
        min_scale: float = 0.08,
        num_classes: int | None = None,
        eval_batch_size: int | None = None,
        augment: bool = True,
        shuffle: bool = True,
        drop_last: bool = False,
        pin_memory: bool | None = None,
        seed: int = 42,
        check_files: FileCheck = "header",
        skip_bad_files: bool = False,
    ) -> None:
        self.image_size = check_int("image_size", image_size, 1)
        self.eval_resize_size = (
            round(image_size / 0.875)
            if eval_resize_size is None
            else check_int("eval_resize_size", eval_resize_size, image_size)
        )
        if isinstance(min_scale, bool) or not isinstance(min_scale, (int, float)) or not 0 < min_scale <= 1:
            raise ValueError(f"`min_scale` must be in (0, 1], got {min_scale!r}.")
        self.min_scale = float(min_scale)
        super().__init__(
            data_dir,
            num_classes=num_classes,
            decode_channels=3,
            replicate_to=None,
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
        self.input_shape = (3, self.image_size, self.image_size)
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD
        # num_classes may be None here (read from the folders); Lightning refuses to log a datamodule
        # hparam that differs from the model's linked num_classes, so only the model records it.
        self.save_hyperparameters(ignore=["num_classes"])

    @override
    def train_transform(self) -> ImageTransform:
        if not self.augment:
            return self.eval_transform()
        return RandomResizedCrop(self.image_size, scale=(self.min_scale, 1.0))

    @override
    def eval_transform(self) -> ImageTransform:
        return ResizeCenterCrop(self.eval_resize_size, self.image_size)
