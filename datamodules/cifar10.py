"""CIFAR-10 from the official python pickle files, held in memory as one uint8 tensor.

Loaded once (about 150 MB for the 50,000 training images); a batch is one `index_select`; random
crop with 4-pixel zero padding, horizontal flip and normalization run on the whole batch on its
device (`transform_batch`). No per-sample Python anywhere, so the loader is never what a training
step waits for.

Data: `data_dir` holds `cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta), the
folder inside the official `cifar-10-python.tar.gz`; `data_dir` may also be that folder itself.
`download=True` fetches and checks the official archive when the files are missing.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from compresslight.datamodules.base import VisionDataModule, check_int, split_count
from compresslight.datamodules.batch_transforms import batch_random_crop, batch_random_flip
from compresslight.datamodules.imagenet import IMAGENET_MEAN, IMAGENET_STD
from torch.utils.data import DataLoader
from typing_extensions import override

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
# Per-channel statistics of the training pixels in [0, 1]. The std is the per-pixel one
# (Lightning-Bolts' 63.0/255, 62.1/255, 66.7/255), not the often copied (0.2023, 0.1994, 0.2010).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_HOW_TO_GET = (
    "Get the data with download=True, or put the `cifar-10-batches-py` folder of the official "
    f"python-version archive ({CIFAR10_URL}) there, so that it holds data_batch_1 ... data_batch_5 "
    "and test_batch."
)

# The only globals a CIFAR-10 pickle needs (a numpy array, written by numpy 1.x or 2.x).
# Unpickling anything else could run arbitrary code, so it is refused.
_ALLOWED_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A CIFAR-10 file that names a global outside the allow-list."""


class _ArrayUnpickler(pickle.Unpickler):
    @override
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise _RefusedGlobal(
                f"CIFAR-10 batch refers to {module}.{name}, which a CIFAR-10 file never needs; refused."
            )
        return super().find_class(module, name)


def resolve_cifar10_folder(data_dir: str | Path) -> Path:
    """The `cifar-10-batches-py` folder `data_dir` means: `data_dir` itself or the one inside it."""
    data_dir = Path(data_dir).expanduser()
    if data_dir.name == CIFAR10_FOLDER or (data_dir / CIFAR10_TRAIN_FILES[0]).is_file():
        return data_dir
    return data_dir / CIFAR10_FOLDER


def load_cifar10_batches(folder: str | Path, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads official CIFAR-10 pickle batches into one uint8 (N, 3, 32, 32) tensor and int64 labels.

    Args:
        folder: the `cifar-10-batches-py` folder.
        names: batch files to read, concatenated in this order.

    Raises:
        FileNotFoundError: if a file is missing (the message says how to get the data).
        ValueError: if a file is truncated, corrupt or not a CIFAR-10 batch (wrong keys, shape,
            dtype or labels); the message names the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-10 not found: no folder {str(folder)!r}. {_HOW_TO_GET}")
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 not found: looked for {missing} in {str(folder)!r}. {_HOW_TO_GET}")
    images, labels = [], []
    for name in names:
        try:
            with open(folder / name, "rb") as file:
                # encoding="bytes": the official files are Python 2 pickles with byte-string keys.
                batch = _ArrayUnpickler(file, encoding="bytes").load()
        except _RefusedGlobal as error:
            raise pickle.UnpicklingError(f"{str(folder / name)!r}: {error}") from error
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
            raise ValueError(
                f"{str(folder / name)!r} is not a readable CIFAR-10 batch: truncated or corrupt "
                f"({type(error).__name__}: {error}). Replace it with the official file. {_HOW_TO_GET}"
            ) from error
        data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
        batch_labels = batch.get(b"labels", batch.get("labels")) if isinstance(batch, dict) else None
        if not isinstance(data, np.ndarray) or batch_labels is None:
            raise ValueError(f"{str(folder / name)!r} is not a CIFAR-10 batch (no data/labels).")
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{str(folder / name)!r}: data must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}."
            )
        batch_labels = np.asarray(batch_labels, dtype=np.int64)
        if batch_labels.shape != (len(data),) or (
            len(batch_labels) and (batch_labels.min() < 0 or batch_labels.max() > 9)
        ):
            raise ValueError(
                f"{str(folder / name)!r}: expected {len(data)} labels in [0, 9], got shape {batch_labels.shape}."
            )
        images.append(data)
        labels.append(batch_labels)
    # Rows are 1024 red, 1024 green, 1024 blue values, each channel row-major: (N, 3, 32, 32).
    image_tensor = torch.from_numpy(np.concatenate(images)).view(-1, 3, 32, 32)
    return image_tensor, torch.from_numpy(np.concatenate(labels))


def download_cifar10(folder: str | Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, timeout: float = 10.0) -> Path:
    """Downloads, checks and extracts the CIFAR-10 python archive so that `folder` holds the batches.

    Does nothing when the batches are already there.

    Args:
        folder: the `cifar-10-batches-py` folder to create; the archive unpacks in its parent.
        url: where to fetch the archive (the official one, or a mirror of it).
        md5: expected MD5 of the archive.
        timeout: seconds to wait for the server before giving up.

    Returns:
        `folder`.

    Raises:
        RuntimeError: if the download fails, the checksum differs, or the archive does not unpack
            into `folder`; the message says where to put the files by hand.
    """
    folder = Path(folder)
    needed = CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES
    if all((folder / name).is_file() for name in needed):
        return folder
    root = folder.parent
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    partial = archive.with_name(archive.name + ".part")
    log.info("Downloading CIFAR-10 from %s to %s", url, archive)
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise RuntimeError(
            f"Could not download CIFAR-10 from {url!r}: {error}. Without network access, fetch "
            f"cifar-10-python.tar.gz on another machine and extract it so that {str(folder)!r} "
            "holds data_batch_1 ... data_batch_5 and test_batch; then use download=False."
        ) from error
    if digest.hexdigest() != md5:
        partial.unlink(missing_ok=True)
        raise RuntimeError(
            f"Checksum mismatch for {url!r}: MD5 {digest.hexdigest()}, expected {md5} (not the "
            f"official archive, or a truncated download). Put the official archive's "
            f"`{CIFAR10_FOLDER}` folder at {str(folder)!r} by hand, or try again."
        )
    partial.replace(archive)
    with tarfile.open(archive, "r:gz") as tar:
        # filter="data" refuses absolute paths, links out of `root` and device files.
        tar.extractall(root, filter="data")
    archive.unlink()
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(
            f"The archive from {url!r} unpacked into {str(root)!r} but {str(folder)!r} lacks {missing}. {_HOW_TO_GET}"
        )
    return folder


def normalization_statistics(
    normalization: str, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a CIFAR10DataModule normalizes with (see its `normalization` argument).

    Raises:
        ValueError: for an unknown name, `mean`/`std` given with a named preset or missing with
            "custom", or statistics that are not 3 values (means in [0, 1], stds > 0).
    """
    presets = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
    if normalization not in (*presets, "custom"):
        raise ValueError(f"`normalization` must be one of {[*presets, 'custom']}, got {normalization!r}.")
    if normalization != "custom":
        if mean is not None or std is not None:
            raise ValueError(
                f"`mean`/`std` are for `normalization: custom`; with {normalization!r} its own statistics are used "
                f"(got mean={mean!r}, std={std!r})."
            )
        return presets[normalization]
    if mean is None or std is None:
        raise ValueError(f"`normalization: custom` needs both `mean` and `std`, got mean={mean!r}, std={std!r}.")
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != 3 or any(not 0.0 <= v <= 1.0 for v in mean):
        raise ValueError(f"`mean` must be 3 per-channel means in [0, 1] (of [0, 1] pixels), got {list(mean)!r}.")
    if len(std) != 3 or any(not v > 0.0 for v in std):
        raise ValueError(f"`std` must be 3 per-channel standard deviations > 0, got {list(std)!r}.")
    return mean, std


class CIFAR10DataModule(VisionDataModule):
    """CIFAR-10: 50,000 training and 10,000 test images, 32 x 32 RGB, 10 classes.

    `val_split` holds part of the training set out for validation with a fixed seed; at 0 (the
    default, the papers' protocol) validation runs on the test set. Training batches are random
    crops of the 4-pixel zero-padded image, flipped horizontally at random; every batch is
    normalized with the CIFAR-10 mean and std (or the `normalization` chosen).

    After `setup`, `train_images`/`train_labels` (and `val_*`, `test_*`) hold the splits as
    tensors: uint8 (N, 3, 32, 32) and int64 (N,); `transform_batch(images, train=...)` makes model
    input of them outside a Trainer.

    Args:
        data_dir: folder holding `cifar-10-batches-py/`, or that folder itself.
        batch_size: training batch size.
        val_split: validation images taken from the training set: an int count or a float fraction.
        seed: seed of the validation split and of the shuffling.
        augment: random crop and flip for training batches.
        download: fetch the official archive when the files are missing.
        eval_batch_size: validation/test batch size; None uses `batch_size`.
        drop_last: drop the last incomplete training batch.
        num_workers: loader worker processes; 0 is right for in-memory data.
        shuffle: reshuffle the training set every epoch.
        pin_memory: None pins when CUDA is available.
        crop_padding: zero padding of the random crop, in pixels (0: no crop).
        download_url: archive URL for `download=True` (a mirror of the official archive).
        normalization: the per-channel statistics every batch is normalized with: "cifar10" (the
            training set's), "imagenet" (what many published CIFAR weights were trained with, e.g.
            `../shared/pretrained/`), or "custom" with `mean` and `std`.
        mean: per-channel means in [0, 1] (3 values), for `normalization: custom` only.
        std: per-channel standard deviations > 0 (3 values), for `normalization: custom` only.

    Raises:
        ValueError: if a size, count or fraction is out of range, or the normalization is unknown
            or its statistics are missing, misplaced or malformed.
    """

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        batch_size: int = 128,
        val_split: int | float = 0,
        seed: int = 42,
        augment: bool = True,
        download: bool = False,
        eval_batch_size: int | None = None,
        drop_last: bool = False,
        num_workers: int = 0,
        shuffle: bool = True,
        pin_memory: bool | None = None,
        crop_padding: int = 4,
        download_url: str = CIFAR10_URL,
        normalization: Literal["cifar10", "imagenet", "custom"] = "cifar10",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
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
        # Checked against the real training-set size in setup; here only what can be known.
        split_count("val_split", val_split, 50_000)
        self.val_split = val_split
        self.crop_padding = check_int("crop_padding", crop_padding, 0)
        self.data_dir = Path(data_dir).expanduser()
        self.folder = resolve_cifar10_folder(self.data_dir)
        self.download = download
        self.download_url = download_url
        self.num_classes = 10
        self.input_shape = (3, 32, 32)
        self.mean, self.std = normalization_statistics(normalization, mean, std)
        self.train_images: torch.Tensor | None = None
        self.train_labels: torch.Tensor | None = None
        self.val_images: torch.Tensor | None = None
        self.val_labels: torch.Tensor | None = None
        self.test_images: torch.Tensor | None = None
        self.test_labels: torch.Tensor | None = None
        # Positions of the train/val images in the 50,000 training files (set when val_split > 0).
        self.train_index: torch.Tensor | None = None
        self.val_index: torch.Tensor | None = None
        self.save_hyperparameters()

    @override
    def prepare_data(self) -> None:
        if self.download:
            download_cifar10(self.folder, url=self.download_url)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.download:
            # Lightning has already called prepare_data (on one process); this covers use without
            # a Trainer and is a no-op once the files are there.
            self.prepare_data()
        holds_out_val = self.val_split != 0
        needs_train = stage in ("fit", None) or (stage == "validate" and holds_out_val)
        needs_test = stage in ("test", "predict", None) or not holds_out_val
        if needs_train and self.train_images is None:
            self._load_train()
        if needs_test and self.test_images is None:
            self.test_images, self.test_labels = load_cifar10_batches(self.folder, CIFAR10_TEST_FILES)
        if not holds_out_val:
            self.val_images, self.val_labels = self.test_images, self.test_labels

    def _load_train(self) -> None:
        images, labels = load_cifar10_batches(self.folder, CIFAR10_TRAIN_FILES)
        val_count = split_count("val_split", self.val_split, len(labels))
        if val_count == 0:
            if self.val_split != 0:
                raise ValueError(
                    f"`val_split` {self.val_split!r} of {len(labels)} training images holds out none; "
                    "use 0 to validate on the test set, or a larger split."
                )
            self.train_images, self.train_labels = images, labels
            return
        # The split depends on the seed only, so every run and every DDP rank holds out the same images.
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        val_index, train_index = order[:val_count].sort().values, order[val_count:].sort().values
        self.val_images, self.val_labels = images[val_index], labels[val_index]
        self.train_images, self.train_labels = images[train_index], labels[train_index]
        self.train_index, self.val_index = train_index, val_index
        log.info("CIFAR-10: %d training, %d validation images (seed %d).", len(train_index), val_count, self.seed)

    @override
    def augment_batch(self, images: torch.Tensor) -> torch.Tensor:
        return batch_random_flip(batch_random_crop(images, self.crop_padding), dim=-1)

    def _loader(self, images: torch.Tensor | None, labels: torch.Tensor | None, split: str) -> DataLoader:
        if images is None or labels is None:
            raise RuntimeError(f"CIFAR10DataModule.{split}_dataloader() needs setup() first (the Trainer calls it).")
        return self._tensor_loader(images, labels, train=split == "train")

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_images, self.train_labels, "train")

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_images, self.val_labels, "val")

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_images, self.test_labels, "test")

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_images, self.test_labels, "predict")
