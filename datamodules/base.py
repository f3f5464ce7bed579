"""The base datamodule: argument checks, loaders, and the batch transform run on the batch's device.

Modelled on Lightning-Bolts' `VisionDataModule`: the base carries the split and loader logic; a
concrete datamodule sets `num_classes`, `input_shape`, `mean`/`std`, its datasets and its batch
augmentation. Every loader yields `(images, labels)` with images as stored (uint8, N x C x H x W)
and labels int64; `on_after_batch_transfer` turns the images into the model's float input with
`transform_batch` once the batch is on its device. The same `transform_batch` serves benchmarks and
the profiler outside a Trainer.

Two kinds of loader:
- in-memory tensors (CIFAR-10, synthetic data): a `TensorBatchDataset` indexed by whole index
  batches from `IndexBatchSampler`, with the DataLoader's own batching turned off
  (`batch_size=None`), so one batch costs one `index_select`, no per-sample Python;
- files decoded per sample (ImageFolder): a plain DataLoader with worker processes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from compresslight.datamodules.batch_transforms import batch_random_flip, normalize_batch
from torch.utils.data import DataLoader, Dataset, Sampler
from typing_extensions import override

from compresslight.lightning_compat import LightningDataModule

log = logging.getLogger(__name__)

# Lightning hands datamodules their batch as (images, labels).
Batch = tuple[torch.Tensor, torch.Tensor]


def check_int(name: str, value: Any, minimum: int) -> int:
    """Returns `value` if it is an int >= `minimum`, else raises naming `name`.

    Raises:
        ValueError: if `value` is not an int (bools are refused) or is below `minimum`.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def check_fraction(name: str, value: Any) -> float:
    """Returns `value` as a float if it is a number in [0, 1), else raises naming `name`.

    Raises:
        ValueError: if `value` is not a real number in [0, 1).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a fraction in [0, 1), got {value!r}.")
    return float(value)


def split_count(name: str, split: int | float, total: int) -> int:
    """How many of `total` samples `split` asks for: an int is a count, a float a fraction.

    Raises:
        ValueError: if a count is negative or leaves no sample, or a fraction is outside [0, 1).
    """
    if isinstance(split, bool) or not isinstance(split, (int, float)):
        raise ValueError(f"`{name}` must be an int count or a float fraction, got {split!r}.")
    if isinstance(split, float):
        return round(check_fraction(name, split) * total)
    if not 0 <= split < total:
        raise ValueError(f"`{name}` must be a count in [0, {total}) (there are {total} samples), got {split!r}.")
    return split


class TensorBatchDataset(Dataset[Batch]):
    """In-memory images and labels, indexed by a whole batch of indices at once.

    Args:
        images: (N, ...) tensor, e.g. uint8 (N, C, H, W).
        labels: (N,) int64 tensor.

    Raises:
        ValueError: if `images` and `labels` do not have the same length.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"`images` and `labels` must have the same length, got {len(images)} and {len(labels)}.")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, batch_indices: torch.Tensor) -> Batch:
        batch_indices = torch.as_tensor(batch_indices, dtype=torch.long)
        return self.images.index_select(0, batch_indices), self.labels.index_select(0, batch_indices)


class IndexBatchSampler(Sampler[torch.Tensor]):
    """Yields batches of indices as int64 tensors, shuffled or in order.

    The shuffle order depends only on `seed` and the epoch: Lightning calls `set_epoch` before each
    epoch, and without it every pass over the sampler advances the epoch by one. So two runs with
    the same seed see the same batches, and under DDP (where Lightning wraps this sampler and deals
    its batches out to the ranks) every rank draws the same order and the ranks' shares are disjoint.

    Args:
        num_samples: indices range over [0, num_samples).
        batch_size: indices per batch.
        shuffle: draw a fresh permutation per epoch (training) or keep the order (evaluation).
        drop_last: drop a last batch smaller than `batch_size`.
        seed: seed of the permutations.

    Raises:
        ValueError: if `num_samples` < 0 or `batch_size` < 1.
    """

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int = 0) -> None:
        self.num_samples = check_int("num_samples", num_samples, 0)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Chooses the permutation of the next pass (Lightning calls this before each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
            self.epoch += 1
        else:
            order = torch.arange(self.num_samples)
        for batch in order.split(self.batch_size):
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield batch


class VisionDataModule(LightningDataModule):
    """Base of compresslight's image datamodules: loaders and the on-device batch transform.

    Subclasses set `num_classes`, `input_shape` (C, H, W of the model input) and `mean`/`std` in
    `__init__`, build their datasets in `setup`, and may override `augment_batch`.

    Args:
        batch_size: training batch size.
        eval_batch_size: validation/test batch size; None uses `batch_size`.
        num_workers: loader worker processes (0 loads in the main process).
        pin_memory: pin batches for faster host-to-GPU copies; None pins when CUDA is available.
        shuffle: reshuffle the training set every epoch.
        drop_last: drop the last incomplete training batch.
        augment: apply `augment_batch` to training batches.
        seed: seed of the shuffling and of any split the subclass makes.

    Raises:
        ValueError: if a size or count is out of range.
    """

    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __init__(
        self,
        *,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        pin_memory: bool | None,
        shuffle: bool,
        drop_last: bool,
        augment: bool,
        seed: int,
    ) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.eval_batch_size = (
            self.batch_size if eval_batch_size is None else check_int("eval_batch_size", eval_batch_size, 1)
        )
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.seed = check_int("seed", seed, 0)
        # mean/std as tensors per device, so a GPU batch does not copy them over every step.
        self._normalize_constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ----- the batch transform -------------------------------------------------------------------

    def augment_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Training augmentation of a raw (uint8) batch; the default is a random horizontal flip.

        Args:
            images: (N, C, H, W) uint8 batch on any device.
        """
        return batch_random_flip(images, dim=-1)

    def transform_batch(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        """Turns a raw uint8 batch into the model's float input: augment (if `train`), normalize.

        This is what `on_after_batch_transfer` runs; call it directly to reproduce the training or
        evaluation input outside a Trainer (benchmarks, the profiler).

        Args:
            images: (N, C, H, W) uint8 batch as the loaders yield it, on any device.
            train: apply the training augmentation (when the datamodule's `augment` is on).

        Returns:
            float32 (N, C, H, W) normalized batch on `images.device`.

        Raises:
            TypeError: if `images` is not uint8.
        """
        if images.dtype != torch.uint8:
            raise TypeError(f"`images` must be a raw uint8 batch from this datamodule, got {images.dtype}.")
        if train and self.augment:
            images = self.augment_batch(images)
        if self.mean is None or self.std is None:
            return images.float().div_(255.0)
        mean, std = self._normalize_constants_on(images.device)
        return normalize_batch(images, mean, std)

    def _normalize_constants_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._normalize_constants:
            assert self.mean is not None and self.std is not None
            self._normalize_constants[device] = (
                torch.tensor(self.mean, dtype=torch.float32, device=device),
                torch.tensor(self.std, dtype=torch.float32, device=device),
            )
        return self._normalize_constants[device]

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, torch.Tensor):
            # Lightning also routes `example_input_array` (model summary) through this hook:
            # a lone float tensor is model input already.
            return self.transform_batch(batch, train=False) if batch.dtype == torch.uint8 else batch
        images, labels = batch
        # Augment only while fitting's training loop runs (not in validation or sanity checks);
        # with no trainer attached (the hook called by hand) a batch is treated as evaluation.
        training = self.trainer is not None and self.trainer.training
        return self.transform_batch(images, train=training), labels

    # ----- loaders -------------------------------------------------------------------------------

    def _tensor_loader(self, images: torch.Tensor, labels: torch.Tensor, *, train: bool) -> DataLoader:
        """A loader over in-memory tensors that indexes one whole batch at a time."""
        sampler = IndexBatchSampler(
            len(labels),
            self.batch_size if train else self.eval_batch_size,
            shuffle=train and self.shuffle,
            drop_last=train and self.drop_last,
            seed=self.seed,
        )
        # batch_size=None turns the DataLoader's own batching off: each index batch from the
        # sampler goes to `TensorBatchDataset.__getitem__` whole.
        return DataLoader(
            TensorBatchDataset(images, labels),
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def _sample_loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        """A loader over a per-sample dataset (files decoded in worker processes)."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train and self.shuffle,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if train and self.shuffle else None,
        )
