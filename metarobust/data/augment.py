"""Device-side augmentation of image batches: CIFAR's random crop with zero padding and flip.

The standard CIFAR augmentation of adversarial-training papers (Madry et al. 2018, Zhang et al.
2019 and their successors, after He et al. 2016): pad each image by 4 zero pixels on every side,
crop a random ``H x W`` window, and flip it horizontally with probability 1/2; torchvision's
``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``. Here it runs on the whole batch at
once on the device: one gather with per-image offsets drawn from a ``torch.Generator``, no
Python loop over images and no host round-trip, on uint8 or float batches alike.

:data:`AUGMENTATIONS` maps a config string to an augmentation ``(images [B, C, H, W],
generator) -> [B, C, H, W]``; ``BatchSampler(..., augment="crop_flip")`` applies one to every
batch it draws.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8)
    >>> y = random_crop_flip(x, g)  # uint8 [128, 3, 32, 32]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from metarobust.errors import ConfigError
from metarobust.registry import Registry

AUGMENTATIONS = Registry("augmentation")
"""Augmentations ``(images [B, C, H, W], generator) -> [B, C, H, W]``, by config name."""


def crop_flip_indices(batch: int, height: int, width: int, padding: int, flip: bool,
                      generator: torch.Generator,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image source rows ``[B, H]`` and columns ``[B, W]`` into the padded images.

    Offsets are uniform in ``0..2*padding`` (both ends included, as ``RandomCrop``); a flipped
    image reads its window's columns right to left. Rows are drawn before columns and flips, so
    a seed gives the same crops on every device type that shares the generator's algorithm.
    """
    top = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator, device=device)
    rows = top + torch.arange(height, device=device)
    cols = torch.arange(width, device=device).expand(batch, width)
    if flip:
        mirrored = torch.rand(batch, 1, generator=generator, device=device) < 0.5
        cols = torch.where(mirrored, width - 1 - cols, cols)
    return rows, left + cols


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4,
                     flip: bool = True) -> torch.Tensor:
    """Random crop after zero padding, then a random horizontal flip, for every image at once.

    Args:
        images: ``[B, C, H, W]``, uint8 or float, on any device.
        generator: the source of randomness, on ``images``' device.
        padding: zero pixels added on each side before cropping (4 for CIFAR).
        flip: also mirror each image left-right with probability 1/2.

    Returns:
        ``[B, C, H, W]``, same dtype and device: each image a window of its padded copy,
        possibly mirrored; pixels from the padding are 0.
    """
    if images.dim() != 4:
        raise ConfigError(f"augment: images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if padding < 0:
        raise ConfigError(f"augment: padding must be >= 0, got {padding}")
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))  # zeros, any dtype
    rows, cols = crop_flip_indices(b, h, w, padding, flip, generator, images.device)
    batch = torch.arange(b, device=images.device).view(b, 1, 1, 1)
    channel = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return padded[batch, channel, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


@AUGMENTATIONS.register("crop_flip", "random crop after 4-pixel zero padding + horizontal flip "
                                     "(CIFAR; RandomCrop(32, 4) + RandomHorizontalFlip)")
def crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return random_crop_flip(images, generator, padding=4, flip=True)


@AUGMENTATIONS.register("flip", "horizontal flip with probability 1/2")
def flip_only(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return random_crop_flip(images, generator, padding=0, flip=True)


def get_augmentation(name: str | None,
                     field: str = "augment") -> Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None:
    """The augmentation named ``name``; ``None`` for ``None`` or ``"none"``."""
    if name is None or name == "none":
        return None
    return AUGMENTATIONS.get(name, field)
