"""Samplers that draw episodes on the device from an :class:`ImageStore`.

Classes and images are chosen by sorting random keys on the device (no Python loop over tasks
or images, no host round-trip), from the sampler's own seeded ``torch.Generator`` whose state
goes into checkpoints, so a resumed run draws the same episodes as an uninterrupted one.
"""

from __future__ import annotations

import torch

from metarobust.data.augment import get_augmentation
from metarobust.data.episode import EpisodeBatch
from metarobust.data.store import ImageStore
from metarobust.errors import DataError


def check_episode_shape(store: ImageStore, ways: int, shots: int, queries: int,
                        what: str = "meta") -> None:
    """Raise :class:`DataError` if ``ways``-way episodes with ``shots + queries`` images per
    class cannot be drawn from ``store``, naming the config field to change."""
    if ways > store.num_classes:
        raise DataError(
            f"{what}.ways={ways} but {store.name} has only {store.num_classes} classes; "
            f"use at most {store.num_classes} ways or a split with more classes"
        )
    counts = store.counts()
    enough = int((counts >= shots + queries).sum())
    if enough < ways:
        fewest = int(counts.min())
        raise DataError(
            f"{what}: shots + queries = {shots} + {queries} = {shots + queries} images per class, "
            f"but only {enough} classes of {store.name} have that many (the smallest has "
            f"{fewest}); lower the shots or {what}.queries so that shots + queries <= {fewest}"
        )


def sample_classes(t: int, num_classes: int, ways: int, generator: torch.Generator,
                   device: torch.device, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """``int64 [t, ways]``: distinct classes per task, uniformly among ``eligible`` ones."""
    keys = torch.rand(t, num_classes, generator=generator, device=device)
    if eligible is not None:
        keys = keys.masked_fill(~eligible, 2.0)  # ineligible classes sort last
    return keys.argsort(dim=1)[:, :ways]


class EpisodicSampler:
    """N-way episodes with ``shots`` support and ``queries`` query images per class.

    Args:
        store: the images to draw from (put it on the device first: ``store.to("cuda")``).
        ways: N, classes per task.
        shots: K, support images per class (``meta.train_shots`` at training,
            ``meta.test_shots`` at evaluation: they are independent).
        queries: Q, query images per class.
        tasks: T, episodes per batch (the meta-batch size) of this rank.
        seed: seeds the sampler's own generator.
        rank, world_size: distributed meta-training: every rank draws the same global meta-batch
            of ``world_size * tasks`` episodes and keeps tasks ``[rank * T, (rank + 1) * T)``, so
            the ranks together see exactly what one process sees with the whole meta-batch.

    ``sample()`` returns an :class:`EpisodeBatch` with support ``[T, N*K, C, H, W]`` and query
    ``[T, N*Q, C, H, W]`` as float in [0, 1], labels remapped to ``0..N-1``. Support and query
    never share an image. Invalid shapes raise :class:`DataError` at construction.

    Example:
        >>> sampler = EpisodicSampler(store, ways=5, shots=1, queries=15, tasks=4, seed=0)
        >>> batch = sampler.sample()
    """

    def __init__(self, store: ImageStore, ways: int, shots: int, queries: int, tasks: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        check_episode_shape(store, ways, shots, queries)
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must lie in 0..{world_size - 1}")
        self.store, self.ways, self.shots, self.queries, self.tasks = store, ways, shots, queries, tasks
        self.rank, self.world_size = rank, world_size
        self.table, self.counts = store.class_table()
        self.eligible = self.counts >= shots + queries
        self.generator = torch.Generator(device=store.device)
        self.generator.manual_seed(seed)

    def sample(self) -> EpisodeBatch:
        n, k, q, t = self.ways, self.shots, self.queries, self.tasks * self.world_size
        device = self.store.device
        classes = sample_classes(t, self.store.num_classes, n, self.generator, device, self.eligible)
        width = self.table.shape[1]
        keys = torch.rand(t, n, width, generator=self.generator, device=device)
        slots = torch.arange(width, device=device)
        keys = keys.masked_fill(slots >= self.counts[classes].unsqueeze(-1), 2.0)
        picks = keys.argsort(dim=-1)[..., : k + q]  # [T, N, K+Q] distinct images per class
        index = torch.gather(self.table[classes], 2, picks)
        if self.world_size > 1:  # this rank's tasks of the global meta-batch
            mine = slice(self.rank * self.tasks, (self.rank + 1) * self.tasks)
            classes, index = classes[mine], index[mine]
        return gather_episodes(self.store, classes, index[..., :k], index[..., k:])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


class BatchSampler:
    """Plain shuffled mini-batches as single-task episodes: ``T = 1``, no support, global labels.

    Each pass over the store is a fresh permutation drawn on the device; the last incomplete
    batch of a pass is dropped (as ``drop_last=True``), so every batch has ``batch_size`` images.

    Distributed training (``world_size`` > 1): every rank draws the same seeded permutation and
    takes its own slice ``[rank * batch_size, (rank + 1) * batch_size)`` of each global batch of
    ``world_size * batch_size`` images, so the ranks see disjoint images of every epoch.

    ``augment`` names a device-side augmentation (:data:`~metarobust.data.augment.AUGMENTATIONS`,
    e.g. ``"crop_flip"``: CIFAR's random crop with 4-pixel zero padding + horizontal flip) applied
    to every batch on the uint8 images before they become float; ``None`` or ``"none"``: none.
    Its randomness comes from a second generator (seeded from ``seed`` and ``rank``, so ranks
    augment differently), checkpointed with the first.
    """

    def __init__(self, store: ImageStore, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, augment: str | None = None) -> None:
        if not 1 <= batch_size * world_size <= len(store):
            raise DataError(f"batch_size={batch_size} x world_size={world_size} must lie in 1..{len(store)} "
                            f"(images in {store.name})")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must lie in 0..{world_size - 1}")
        self.store, self.batch_size = store, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator(device=store.device)
        self.generator.manual_seed(seed)
        self.position = len(store)  # forces a new permutation on the first call
        self.order = torch.empty(0, dtype=torch.long, device=store.device)
        self.augment = get_augmentation(augment)
        self.augment_generator = torch.Generator(device=store.device)
        self.augment_generator.manual_seed(seed + 7919 * (rank + 1))  # a stream of its own per rank

    def sample(self) -> EpisodeBatch:
        stride = self.batch_size * self.world_size
        if self.position + stride > len(self.store):
            self.order = torch.randperm(len(self.store), generator=self.generator, device=self.store.device)
            self.position = 0
        start = self.position + self.rank * self.batch_size
        index = self.order[start : start + self.batch_size].unsqueeze(0)
        self.position += stride
        image_shape = self.store.image_shape
        empty = torch.empty((1, 0), dtype=torch.long, device=self.store.device)
        return EpisodeBatch(
            support_x=torch.empty((1, 0, *image_shape), device=self.store.device),
            support_y=empty,
            query_x=to_float(self._images(index)),
            query_y=self.store.labels[index],
            classes=torch.arange(self.store.num_classes, device=self.store.device).unsqueeze(0),
            support_index=empty,
            query_index=index,
        )

    def _images(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 ``[1, B, C, H, W]`` of store ``index [1, B]``, augmented if asked."""
        images = self.store.images[index]
        if self.augment is None:
            return images
        return self.augment(images[0], self.augment_generator).unsqueeze(0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "order": self.order,
                "position": torch.tensor(self.position),
                "augment_generator": self.augment_generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].to(self.store.device)
        self.position = int(state["position"])
        if "augment_generator" in state:  # absent in checkpoints written before augmentation
            self.augment_generator.set_state(state["augment_generator"])


def gather_episodes(store: ImageStore, classes: torch.Tensor, support: torch.Tensor,
                    query: torch.Tensor) -> EpisodeBatch:
    """Episodes from ``classes [T, N]`` and store indices ``support [T, N, K]``, ``query [T, N, Q]``
    (row ``i`` of each task holds images of ``classes[:, i]``, which becomes label ``i``)."""
    t, n = classes.shape
    labels = torch.arange(n, device=classes.device).view(1, n, 1)
    support_index, query_index = support.reshape(t, -1), query.reshape(t, -1)
    return EpisodeBatch(
        support_x=to_float(store.images[support_index]),
        support_y=labels.expand_as(support).reshape(t, -1),
        query_x=to_float(store.images[query_index]),
        query_y=labels.expand_as(query).reshape(t, -1),
        classes=classes,
        support_index=support_index,
        query_index=query_index,
    )


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [0, 1]."""
    return images.float().div_(255)
