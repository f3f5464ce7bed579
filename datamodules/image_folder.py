"""ImageFolder datasets (class folders of image files) decoded with PIL, and their datamodule base.

Hand-written instead of `torchvision.datasets.ImageFolder` and `torchvision.transforms`: torchvision
is not part of this stack, because each torchvision wheel is built against exactly one torch build
and none matches the pinned CPU torch 2.13.0. What is needed here is small: a sorted scan of class
folders, PIL decoding, and three geometric transforms (RandomResizedCrop, resize + center crop,
square resize) that follow torchvision's definitions. The PIL steps run per sample in the loader's
worker processes and yield uint8 tensors; flips and normalization run on whole batches on the
batch's device (`VisionDataModule.transform_batch`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from compresslight.datamodules.base import VisionDataModule, check_int
from PIL import Image
from torch.utils.data import Dataset
from typing_extensions import override

log = logging.getLogger(__name__)

# The extensions torchvision's ImageFolder accepts.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

ImageTransform = Callable[[Image.Image], Image.Image]

# How `setup` checks the image files: "header" opens each file and verifies what PIL can without
# decoding it (plus a JPEG's end marker, so a cut-off JPEG is caught), "decode" decodes every
# image fully, "none" trusts the files.
FILE_CHECKS = ("header", "decode", "none")
FileCheck = Literal["header", "decode", "none"]

# The splits each Lightning stage needs (None: all of them).
STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: ("train", "val", "test"),
}


def find_classes(root: Path | str) -> list[str]:
    """The class names of an ImageFolder: the sub-folders of `root`, sorted.

    Raises:
        FileNotFoundError: if `root` is not a folder or holds no sub-folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"No folder {str(root)!r}: expected class folders of images there.")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"No class folders in {str(root)!r}: expected {root}/<class name>/<image files>.")
    return classes


@dataclasses.dataclass(frozen=True)
class ImageFolderIndex:
    """The image files of an ImageFolder and their class indices.

    Paths are one numpy bytes array, relative to `root`, not a list of Python strings: worker
    processes share the parent's memory copy-on-write, and touching millions of Python objects
    (reference counts) would copy it; bytes and relative paths keep ImageNet's 1.28M paths at ~40 MB.

    Attributes:
        root: the scanned folder.
        classes: class names; a file's target indexes this list.
        paths: (N,) file paths relative to `root`, file-system encoded (`os.fsencode`).
        targets: (N,) int64 class indices.
    """

    root: Path
    classes: list[str]
    paths: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, item: int) -> str:
        """The full path of file `item`."""
        return os.path.join(self.root, os.fsdecode(self.paths[item]))

    def subset(self, indices: np.ndarray) -> ImageFolderIndex:
        """The files at `indices`, same classes."""
        return ImageFolderIndex(self.root, self.classes, self.paths[indices], self.targets[indices])


def scan_image_folder(root: Path | str, classes: Sequence[str] | None = None) -> ImageFolderIndex:
    """Lists the images of `root/<class>/**/<file>` with an extension from `IMG_EXTENSIONS`.

    Args:
        root: the ImageFolder.
        classes: the class list to index by (e.g. the training folder's, for a validation folder);
            a class folder of `root` missing from it is an error, a class of it missing from `root`
            is allowed. None uses `root`'s own class folders, each of which must hold an image.

    Raises:
        FileNotFoundError: if `root` is missing or has no class folders, or a class folder of its
            own holds no image.
        ValueError: if `root` has a class folder that `classes` lacks.
    """
    root = Path(root)
    own_classes = find_classes(root)
    if classes is None:
        classes = own_classes
    else:
        unknown = sorted(set(own_classes) - set(classes))
        if unknown:
            raise ValueError(
                f"{str(root)!r} has class folders that the training classes lack: {unknown[:10]}"
                f"{' ...' if len(unknown) > 10 else ''}."
            )
    paths: list[bytes] = []
    targets: list[int] = []
    for class_index, name in enumerate(classes):
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        found = 0
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(IMG_EXTENSIONS):
                    paths.append(os.fsencode(os.path.relpath(os.path.join(dirpath, filename), root)))
                    found += 1
        targets.extend([class_index] * found)
        if found == 0 and name in own_classes:
            raise FileNotFoundError(f"Class folder {str(class_dir)!r} holds no image (extensions {IMG_EXTENSIONS}).")
    return ImageFolderIndex(
        root=root,
        classes=list(classes),
        paths=np.array(paths, dtype=np.bytes_),
        targets=np.array(targets, dtype=np.int64),
    )


def check_image_file(path: str, decode: bool = False) -> str | None:
    """Why `path` is not a readable image, or None if it is.

    Args:
        path: the file.
        decode: decode every pixel (slow, finds any damage) instead of the header check.
    """
    try:
        with Image.open(path) as image:
            if decode:
                image.load()
                return None
            image.verify()  # the format's structure (PNG: every chunk's CRC); JPEG: little
        if path.lower().endswith((".jpg", ".jpeg")) and not _has_jpeg_end_marker(path):
            # A cut-off JPEG opens and verifies; only a decode says whether it is whole (data may
            # also follow a whole JPEG's end marker, e.g. a motion photo's video).
            return check_image_file(path, decode=True)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _has_jpeg_end_marker(path: str, tail_bytes: int = 1024) -> bool:
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        file.seek(max(0, file.tell() - tail_bytes))
        return b"\xff\xd9" in file.read()


def find_bad_images(index: ImageFolderIndex, check: FileCheck = "header", threads: int = 16) -> dict[str, str]:
    """{path: reason} of every file of `index` that is not a readable image.

    Threads, not processes: the work is file reads and PIL decoding, which release the GIL.

    Raises:
        ValueError: for an unknown `check`.
    """
    if check not in FILE_CHECKS:
        raise ValueError(f"`check_files` must be one of {list(FILE_CHECKS)}, got {check!r}.")
    if check == "none" or not len(index):
        return {}
    paths = [index.path(item) for item in range(len(index))]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        reasons = pool.map(lambda path: check_image_file(path, decode=check == "decode"), paths)
        return {path: reason for path, reason in zip(paths, reasons) if reason is not None}


def stratified_split(targets: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Splits sample indices per class: each part takes its fraction of every class.

    The first part (training) takes the rest. A part with a fraction > 0 gets at least one sample of
    each class, so every class appears in validation and test even when it is rare.

    Args:
        targets: (N,) class index of each sample.
        fractions: fractions of the parts after the first, e.g. (val_fraction, test_fraction).
        seed: the split is a function of the seed and the targets only.

    Returns:
        `len(fractions) + 1` sorted index arrays: [train, *others], disjoint, covering all samples.

    Raises:
        ValueError: if a class is too small to leave a training sample.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for class_index in np.unique(targets):
        members = np.flatnonzero(targets == class_index)
        members = members[rng.permutation(len(members))]
        counts = [max(1, round(f * len(members))) if f > 0 else 0 for f in fractions]
        if sum(counts) >= len(members):
            raise ValueError(
                f"Class {int(class_index)} has {len(members)} images: too few for split fractions "
                f"{list(fractions)} with at least one image per split and one left for training."
            )
        start = 0
        for part, count in zip(parts[1:], counts):
            part.append(members[start : start + count])
            start += count
        parts[0].append(members[start:])
    return [np.sort(np.concatenate(part)) for part in parts]


class RandomResizedCrop:
    """torchvision's `RandomResizedCrop`: a random area and aspect ratio, resized to a square.

    Args:
        size: output side in pixels.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.size = size
        self.scale = scale
        self.ratio = ratio

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, crop width, crop height), drawn with torch's RNG (seeded per worker)."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(*self.scale).item()
            aspect_ratio = math.exp(torch.empty(1).uniform_(*log_ratio).item())
            crop_w = round(math.sqrt(target_area * aspect_ratio))
            crop_h = round(math.sqrt(target_area / aspect_ratio))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(torch.randint(0, height - crop_h + 1, (1,)).item())
                left = int(torch.randint(0, width - crop_w + 1, (1,)).item())
                return left, top, crop_w, crop_h
        # Ten misses: fall back to the central crop with the ratio clamped, as torchvision does.
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            crop_w, crop_h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            crop_w, crop_h = round(height * max(self.ratio)), height
        else:
            crop_w, crop_h = width, height
        return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h

    def __call__(self, image: Image.Image) -> Image.Image:
        left, top, crop_w, crop_h = self.crop_box(*image.size)
        # resize(box=...) crops and resamples in one pass, equal to crop() then resize().
        return image.resize(
            (self.size, self.size), Image.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h)
        )


class ResizeCenterCrop:
    """torchvision's `Resize(resize_size)` (shorter side) then `CenterCrop(crop_size)`.

    Args:
        resize_size: the shorter side after resizing.
        crop_size: side of the square center crop.
    """

    def __init__(self, resize_size: int, crop_size: int) -> None:
        self.resize_size = resize_size
        self.crop_size = crop_size

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width <= height:
            new_w, new_h = self.resize_size, int(self.resize_size * height / width)
        else:
            new_w, new_h = int(self.resize_size * width / height), self.resize_size
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        top = int(round((new_h - self.crop_size) / 2.0))
        left = int(round((new_w - self.crop_size) / 2.0))
        return image.crop((left, top, left + self.crop_size, top + self.crop_size))


class SquareResize:
    """Resizes to `size` x `size`, ignoring the aspect ratio.

    Args:
        size: output side in pixels.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.size == (self.size, self.size):
            return image
        return image.resize((self.size, self.size), Image.Resampling.BILINEAR)


class ImageFolderDataset(Dataset[tuple[torch.Tensor, int]]):
    """Decodes the files of an `ImageFolderIndex` into uint8 (C, H, W) tensors.

    Args:
        index: the files and their class indices.
        transform: PIL geometry applied after decoding (crop, resize); must give one fixed size so
            that batches stack.
        channels: 3 decodes as RGB; 1 as grayscale (luminance).
        replicate_to: repeat a grayscale channel to this many channels (3 for models that expect
            RGB input); None keeps `channels`.

    Raises:
        ValueError: if `channels` is not 1 or 3.
    """

    def __init__(
        self,
        index: ImageFolderIndex,
        transform: ImageTransform,
        *,
        channels: int = 3,
        replicate_to: int | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"`channels` must be 1 or 3, got {channels!r}.")
        self.index = index
        self.transform = transform
        self.channels = channels
        self.replicate_to = replicate_to

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        path = self.index.path(item)
        try:
            with Image.open(path) as image:
                image = image.convert("RGB" if self.channels == 3 else "L")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise OSError(
                f"Could not decode image {path!r} ({type(error).__name__}: {error}). The datamodule's "
                "check_files='decode' finds every such file at setup."
            ) from error
        image = self.transform(image)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
        tensor = pixels.permute(2, 0, 1) if pixels.dim() == 3 else pixels.unsqueeze(0)
        if self.replicate_to is not None and self.replicate_to != tensor.shape[0]:
            # A view; the loader's stacking writes the copies.
            tensor = tensor.expand(self.replicate_to, -1, -1)
        return tensor, int(self.index.targets[item])


class ImageFolderDataModule(VisionDataModule):
    """Base of the ImageFolder datamodules: `data_dir/{train,val[,test]}/<class>/<images>`.

    The class list comes from the training folder (the validation folder when there is none), so
    a class has the same index in every split. `num_classes` is known right after `__init__` (the
    CLI links it to the model): None counts the class folders then, one directory listing; an int is
    taken as given, so a datamodule can be built before its data arrives, and `setup` checks it
    against the folders.

    Subclasses set `input_shape`, `mean`/`std`, `layout_hint` (how to get the data, for error
    messages) and implement `train_transform` / `eval_transform`.

    Args:
        data_dir: the dataset's folder.
        num_classes: class count; None reads it from the class folders.
        check_files: how `setup` checks every image file of the splits it prepares: "header"
            (default; open and verify, fast), "decode" (decode fully, finds any damage) or "none".
            Bad files are named, all of them, before training starts.
        skip_bad_files: leave bad files out, with a warning naming them, instead of failing.
        decode_channels: channels decoded from a file, 1 (grayscale) or 3 (RGB).
        replicate_to: repeat grayscale to this many channels; None keeps `decode_channels`.
        batch_size, eval_batch_size, num_workers, pin_memory, shuffle, drop_last, augment, seed:
            as in `VisionDataModule`.

    Raises:
        FileNotFoundError: if `num_classes` is None and the class folders are missing.
        ValueError: if `num_classes` < 1, the folders hold one class only, `decode_channels` is not 1
            or 3, or `check_files` is unknown; in `setup`, for unreadable image files.
    """

    layout_hint: str = "Expected data_dir/train/<class>/<images> and data_dir/val/<class>/<images>."

    def __init__(
        self,
        data_dir: str,
        *,
        num_classes: int | None,
        decode_channels: int,
        replicate_to: int | None,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        pin_memory: bool | None,
        shuffle: bool,
        drop_last: bool,
        augment: bool,
        seed: int,
        check_files: FileCheck = "header",
        skip_bad_files: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            shuffle=shuffle,
            drop_last=drop_last,
            augment=augment,
            seed=seed,
        )
        if decode_channels not in (1, 3):
            raise ValueError(f"`decode_channels` must be 1 or 3, got {decode_channels!r}.")
        if check_files not in FILE_CHECKS:
            raise ValueError(f"`check_files` must be one of {list(FILE_CHECKS)}, got {check_files!r}.")
        self.check_files = check_files
        self.skip_bad_files = skip_bad_files
        self.data_dir = Path(data_dir).expanduser()
        self.decode_channels = decode_channels
        self.replicate_to = replicate_to
        self.classes: list[str] | None = None
        if num_classes is None:
            self.classes = self._find_classes()
            self._check_class_count(self.classes)
            num_classes = len(self.classes)
        self.num_classes = check_int("num_classes", num_classes, 1)
        self.train_dataset: ImageFolderDataset | None = None
        self.val_dataset: ImageFolderDataset | None = None
        self.test_dataset: ImageFolderDataset | None = None
        self._indexes: dict[str, ImageFolderIndex] = {}
        self._checked: dict[int, ImageFolderIndex] = {}  # id of a scanned index -> it, bad files handled

    # ----- what a subclass provides ---------------------------------------------------------------

    def train_transform(self) -> ImageTransform:
        """PIL geometry of a training image (random crops go here; flips run on the batch)."""
        raise NotImplementedError

    def eval_transform(self) -> ImageTransform:
        """PIL geometry of an evaluation image (deterministic)."""
        raise NotImplementedError

    # ----- folders --------------------------------------------------------------------------------

    def _split_dir(self, split: str) -> Path:
        return self.data_dir / split

    def _missing(self, folder: Path) -> FileNotFoundError:
        return FileNotFoundError(
            f"{type(self).__name__}: no image folder at {str(folder)!r} (data_dir={str(self.data_dir)!r}). "
            f"{self.layout_hint}"
        )

    def _find_classes(self) -> list[str]:
        """Classes of the training folder, or of the validation folder when there is none."""
        for split in ("train", "val"):
            folder = self._split_dir(split)
            if folder.is_dir():
                try:
                    return find_classes(folder)
                except FileNotFoundError as error:
                    raise FileNotFoundError(f"{error} {self.layout_hint}") from error
        raise self._missing(self._split_dir("train"))

    def _scan(self, split: str) -> ImageFolderIndex:
        """The index of `data_dir/<split>`, scanned once, with the shared class list."""
        if split not in self._indexes:
            folder = self._split_dir(split)
            if not folder.is_dir():
                raise self._missing(folder)
            if self.classes is None:
                self.classes = self._find_classes()
            self._indexes[split] = scan_image_folder(folder, self.classes)
        return self._indexes[split]

    def _check_class_count(self, classes: list[str]) -> None:
        if len(classes) < 2:
            raise ValueError(
                f"{type(self).__name__}: data_dir={str(self.data_dir)!r} has one class folder ({classes[0]!r}); a "
                f"classifier needs at least two. Is data_dir one level too deep? {self.layout_hint}"
            )

    def _without_bad_files(self, split: str, index: ImageFolderIndex) -> ImageFolderIndex:
        """`index` after `check_files`: unchanged, without its bad files (`skip_bad_files`), or an error.

        Raises:
            ValueError: naming every bad file, unless `skip_bad_files`.
        """
        if id(index) in self._checked:
            return self._checked[id(index)]
        bad = find_bad_images(index, self.check_files)
        checked = index
        if bad:
            listing = "; ".join(f"{path!r} ({reason})" for path, reason in sorted(bad.items()))
            where = f"{len(bad)} of the {len(index)} image files of the {split} split in {str(self.data_dir)!r}"
            if not self.skip_bad_files:
                raise ValueError(
                    f"{type(self).__name__}: {where} are not readable images (check_files={self.check_files!r}): "
                    f"{listing}. Replace or delete them, or pass skip_bad_files=True to leave them out."
                )
            log.warning("%s: skipping %s (skip_bad_files=True): %s.", type(self).__name__, where, listing)
            keep = np.array([index.path(item) not in bad for item in range(len(index))], dtype=bool)
            checked = index.subset(np.flatnonzero(keep))
        self._checked[id(index)] = checked
        return checked

    def split_indexes(self, stage: str | None) -> dict[str, ImageFolderIndex]:
        """The files of each split `stage` needs: "train", "val", "test" (any subset).

        A missing `test/` folder makes the validation folder the test set.

        Args:
            stage: Lightning's stage ("fit", "validate", "test", "predict") or None for all.
        """
        indexes = {}
        for split in STAGE_SPLITS.get(stage, STAGE_SPLITS[None]):
            if split == "test" and not self._split_dir("test").is_dir():
                log.info("%s: no test/ folder in %s; testing on val/.", type(self).__name__, self.data_dir)
                indexes["test"] = self._scan("val")
            else:
                indexes[split] = self._scan(split)
        return indexes

    # ----- Lightning hooks ------------------------------------------------------------------------

    @override
    def setup(self, stage: str | None = None) -> None:
        indexes = self.split_indexes(stage)
        assert self.classes is not None
        self._check_class_count(self.classes)
        if len(self.classes) != self.num_classes:
            raise ValueError(
                f"`num_classes` is {self.num_classes} but {str(self.data_dir)!r} has "
                f"{len(self.classes)} class folders; pass num_classes={len(self.classes)} or None."
            )
        for split, index in indexes.items():
            index = self._without_bad_files(split, index)
            transform = self.train_transform() if split == "train" else self.eval_transform()
            dataset = ImageFolderDataset(
                index, transform, channels=self.decode_channels, replicate_to=self.replicate_to
            )
            setattr(self, f"{split}_dataset", dataset)
            log.info("%s %s: %d images, %d classes.", type(self).__name__, split, len(index), self.num_classes)

    def _require(self, dataset: ImageFolderDataset | None, split: str) -> ImageFolderDataset:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__}.{split}_dataloader() needs setup() first (the Trainer calls it)."
            )
        return dataset

    @override
    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._sample_loader(self._require(self.train_dataset, "train"), train=True)

    @override
    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._sample_loader(self._require(self.val_dataset, "val"), train=False)

    @override
    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._sample_loader(self._require(self.test_dataset, "test"), train=False)

    @override
    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return self.test_dataloader()
