"""A labelled image set held as one uint8 tensor, ready to live on the device.

Every reader returns an :class:`ImageStore`; every sampler draws from one. Images stay uint8
until a batch is gathered (4x less memory than float32 and no host round-trip per episode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from metarobust.errors import DataError


@dataclass
class ImageStore:
    """Images of one split of one dataset.

    Attributes:
        images: ``uint8 [M, C, H, W]``, pixel values 0..255.
        labels: ``int64 [M]``, class index in ``0..num_classes-1``.
        class_names: name of each class, ``len == num_classes``; stable across runs
            (e.g. ``"Latin/character01"`` or ``"Latin/character01@rot90"``).
        name: dataset and split, for messages (``"omniglot/test"``).
        image_ids: ``int64 [M]``, the position of each image inside its class (0-based, in
            the reader's stable order). Frozen episode manifests refer to images by
            ``(class_name, image_id)`` so that they survive a change of the store's order.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    name: str = "dataset"
    image_ids: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"{self.name}: images must be uint8 [M, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"{self.name}: labels must have shape [M={self.images.shape[0]}], "
                f"got {tuple(self.labels.shape)}"
            )
        self.labels = self.labels.long()
        if len(self.labels) and (
            int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)
        ):
            raise DataError(f"{self.name}: labels must lie in 0..{len(self.class_names) - 1}")
        if self.image_ids is None:
            self.image_ids = _rank_within_class(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return self.images.shape[0]

    def counts(self) -> torch.Tensor:
        """Images per class, ``int64 [num_classes]``."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def dataset(self, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> StoreDataset:
        """This store as a ``torch.utils.data.Dataset`` (:class:`StoreDataset`)."""
        return StoreDataset(self, transform)

    def to(self, device: torch.device | str) -> ImageStore:
        return ImageStore(
            self.images.to(device),
            self.labels.to(device),
            list(self.class_names),
            self.name,
            self.image_ids.to(device),
        )

    def subset(self, class_names: list[str], name: str | None = None) -> ImageStore:
        """The images of ``class_names`` only, relabelled ``0..len(class_names)-1`` in that order."""
        index = {c: i for i, c in enumerate(self.class_names)}
        missing = [c for c in class_names if c not in index]
        if missing:
            raise DataError(
                f"{self.name}: {len(missing)} classes of the split are not in the data "
                f"(first: {missing[:3]}); check the dataset root and the split file"
            )
        old = torch.tensor([index[c] for c in class_names], dtype=torch.long, device=self.device)
        remap = torch.full((self.num_classes,), -1, dtype=torch.long, device=self.device)
        remap[old] = torch.arange(len(class_names), device=self.device)
        new_labels = remap[self.labels]
        keep = new_labels >= 0
        return ImageStore(
            self.images[keep],
            new_labels[keep],
            list(class_names),
            name or self.name,
            self.image_ids[keep],
        )

    def class_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class image indices, for vectorised sampling on the device.

        Returns:
            ``table`` ``int64 [num_classes, max_count]`` (row c lists the store indices of class
            c ordered by image id, padded with 0) and ``counts`` ``int64 [num_classes]``.
        """
        counts = self.counts()
        max_count = int(counts.max()) if len(counts) else 0
        order = torch.argsort(self.labels * (int(self.image_ids.max()) + 1 if len(self) else 1)
                              + self.image_ids, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        sorted_labels = self.labels[order]
        slot = torch.arange(len(self), device=self.device) - starts[sorted_labels]
        table = torch.zeros(self.num_classes, max_count, dtype=torch.long, device=self.device)
        table[sorted_labels, slot] = order
        return table, counts


class StoreDataset(Dataset):
    """A ``torch.utils.data.Dataset`` view of an :class:`ImageStore` (no copy), for a
    ``DataLoader`` or any code written against torch datasets.

    ``dataset[i]`` is ``(image, label)``: the image float ``[C, H, W]`` in [0, 1] (what the models
    and attacks take), passed through ``transform`` if given, and the label an ``int`` in
    ``0..num_classes-1``. ``len(dataset) == len(store)``; ``classes`` are the class names.

    Example:
        >>> train = load_split(DataConfig(dataset="image_folder", root="~/data/birds"), "train")
        >>> loader = torch.utils.data.DataLoader(train.dataset(), batch_size=64, shuffle=True)
        >>> x, y = next(iter(loader))   # x: float [64, C, H, W] in [0, 1], y: int64 [64]
    """

    def __init__(self, store: ImageStore, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.store = store
        self.transform = transform
        self.classes = list(store.class_names)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        size = len(self.store)
        i = int(index)
        if not -size <= i < size:
            raise IndexError(f"{self.store.name}: index {i} out of range for {size} images")
        image = self.store.images[i].float().div(255)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.store.labels[i])


def _rank_within_class(labels: torch.Tensor) -> torch.Tensor:
    """The 0-based order of each image among the images of its class, in store order."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels) if len(labels) else labels.new_zeros(0)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(labels)
    ranks[order] = torch.arange(len(labels), device=labels.device) - starts[labels[order]]
    return ranks


SUBSET_SEED = 0
"""Seed of :func:`evaluation_subset`: the same test images for every run, method and machine."""


def evaluation_subset(size: int, points: int) -> torch.Tensor:
    """Indices of the ``points`` images of a split scored when an evaluation is limited to them.

    Splits are stored class by class, so the first ``points`` images would all be one class;
    instead a fixed permutation (seed :data:`SUBSET_SEED`, drawn on the CPU so it is the same on
    every device) is cut. A smaller ``points`` gives a prefix of a larger one's images (an
    AutoAttack run on 500 images scores a subset of a PGD run's 1,000). ``points >= size``: all
    images, in order.

    Example:
        >>> evaluation_subset(10_000, 1000).shape
        torch.Size([1000])
    """
    if points >= size:
        return torch.arange(size)
    return evaluation_order(size)[:points]


def evaluation_order(size: int) -> torch.Tensor:
    """The fixed seeded permutation of ``size`` images that :func:`evaluation_subset` cuts."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(SUBSET_SEED))
