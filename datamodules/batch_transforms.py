"""Whole-batch image transforms: tensor ops on the device the batch is on, no per-sample Python.

The datamodules hand out uint8 batches (N, C, H, W) and transform them after the batch reached its
device (`on_after_batch_transfer`): a uint8 batch is a quarter of the bytes of a float one to copy,
and on a GPU the augmentation then costs next to nothing. Every function takes optional explicit
randomness (`offsets`, `flip_mask`) so tests and benchmarks can reproduce one draw exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _check_batch(images: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"`images` must be a batch of shape (N, C, H, W), got shape {tuple(images.shape)}.")


def batch_random_crop(
    images: torch.Tensor,
    padding: int,
    *,
    offsets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Zero-pads every image by `padding` pixels, then crops it back to its size at a random offset.

    The same as torchvision's `RandomCrop(size, padding=padding)` applied to each image, done for the
    whole batch with one gather.

    Args:
        images: (N, C, H, W) batch of any dtype (uint8 is the cheap one).
        padding: pixels of zeros added on every side; 0 returns `images` unchanged.
        offsets: (N, 2) integer (row, column) offsets into the padded image, each in
            [0, 2 * padding]; drawn uniformly when None.
        generator: random generator on `images.device` for drawing `offsets`.

    Returns:
        A new (N, C, H, W) batch of the same dtype and device.

    Raises:
        ValueError: if `images` is not 4-D, `padding` < 0, or `offsets` has the wrong shape or range.
    """
    _check_batch(images)
    if padding < 0:
        raise ValueError(f"`padding` must be >= 0, got {padding!r}.")
    if padding == 0:
        return images
    n, c, h, w = images.shape
    if offsets is None:
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), device=images.device, generator=generator)
    else:
        if offsets.shape != (n, 2):
            raise ValueError(f"`offsets` must have shape ({n}, 2), got {tuple(offsets.shape)}.")
        if offsets.numel() and (offsets.min() < 0 or offsets.max() > 2 * padding):
            raise ValueError(f"`offsets` must lie in [0, {2 * padding}], got {offsets.tolist()}.")
        offsets = offsets.to(device=images.device, dtype=torch.long)
    padded = F.pad(images, (padding, padding, padding, padding))
    padded_width = w + 2 * padding
    rows = offsets[:, :1] + torch.arange(h, device=images.device)  # (N, H)
    cols = offsets[:, 1:] + torch.arange(w, device=images.device)  # (N, W)
    # One flat index per output pixel into the padded image; shared by all channels (expand is free).
    flat_index = (rows[:, :, None] * padded_width + cols[:, None, :]).view(n, 1, h * w)
    cropped = padded.view(n, c, -1).gather(2, flat_index.expand(n, c, h * w))
    return cropped.view(n, c, h, w)


def batch_random_flip(
    images: torch.Tensor,
    *,
    dim: int = -1,
    probability: float = 0.5,
    flip_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mirrors each image along `dim` with `probability` (dim=-1: horizontal, dim=-2: vertical).

    Args:
        images: (N, C, H, W) batch of any dtype.
        dim: the image axis to mirror, -1 (width) or -2 (height).
        probability: chance that each image is mirrored.
        flip_mask: (N,) bool, True where an image is mirrored; drawn when None.
        generator: random generator on `images.device` for drawing `flip_mask`.

    Returns:
        A new (N, C, H, W) batch of the same dtype and device.

    Raises:
        ValueError: if `images` is not 4-D, `dim` is not -1/-2, `probability` is outside [0, 1]
            or `flip_mask` has the wrong shape.
    """
    _check_batch(images)
    if dim not in (-1, -2, 2, 3):
        raise ValueError(f"`dim` must be -1 (horizontal) or -2 (vertical), got {dim!r}.")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"`probability` must be in [0, 1], got {probability!r}.")
    n = images.shape[0]
    if flip_mask is None:
        flip_mask = torch.rand(n, device=images.device, generator=generator) < probability
    elif flip_mask.shape != (n,):
        raise ValueError(f"`flip_mask` must have shape ({n},), got {tuple(flip_mask.shape)}.")
    flip_mask = flip_mask.to(device=images.device, dtype=torch.bool)
    return torch.where(flip_mask.view(n, 1, 1, 1), images.flip(dim), images)


def normalize_batch(
    images: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """Converts a uint8 batch to float32 in [0, 1] and normalizes it per channel.

    Args:
        images: (N, C, H, W) uint8 batch.
        mean: per-channel mean of the [0, 1] pixels, length C.
        std: per-channel standard deviation of the [0, 1] pixels, length C.

    Returns:
        `(images / 255 - mean) / std` as float32, on `images.device`.

    Raises:
        TypeError: if `images` is not uint8.
        ValueError: if `images` is not 4-D or `mean`/`std` do not have one value per channel.
    """
    _check_batch(images)
    if images.dtype != torch.uint8:
        raise TypeError(f"`images` must be uint8 (the datamodules' raw batches), got {images.dtype}.")
    channels = images.shape[1]
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device)
    if mean_t.shape != (channels,) or std_t.shape != (channels,):
        raise ValueError(
            f"`mean` and `std` must have one value per channel ({channels}), got "
            f"{tuple(mean_t.shape)} and {tuple(std_t.shape)}."
        )
    # Fold the /255 into the constants: one subtract and one multiply over the batch.
    shift = (mean_t * 255.0).view(1, channels, 1, 1)
    scale = (1.0 / (std_t * 255.0)).view(1, channels, 1, 1)
    return images.float().sub_(shift).mul_(scale)
