"""Episodes: the one data structure every learner consumes.

A meta-learning task is an episode with a support set (adapted on) and a query set (scored
on). A plain mini-batch is a *degenerate* episode: one task, an empty support set, global
labels. Batches of episodes are tensors stacked over tasks so that tasks can be vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Episode:
    """One task.

    Attributes:
        support_x: ``float [N*K, C, H, W]`` in [0, 1], class-major (K images of class 0, ...).
        support_y: ``int64 [N*K]``, labels remapped to ``0..N-1``.
        query_x: ``float [N*Q, C, H, W]``.
        query_y: ``int64 [N*Q]``.
        classes: ``int64 [N]``, the store's class ids; label ``i`` is class ``classes[i]``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor

    @property
    def ways(self) -> int:
        return self.classes.shape[0]


@dataclass
class EpisodeBatch:
    """``T`` tasks stacked: ``support_x [T, N*K, C, H, W]``, ``support_y [T, N*K]``,
    ``query_x [T, N*Q, C, H, W]``, ``query_y [T, N*Q]``, ``classes [T, N]``.

    ``support_index`` / ``query_index`` (``int64 [T, N*K]`` / ``[T, N*Q]``) are the images'
    positions in the store, so tests and manifests can check exactly what was drawn.
    A plain mini-batch (:meth:`plain`) has ``T = 1`` and ``N*K = 0``; its images, labels and
    store positions read as :attr:`x`, :attr:`y` and :attr:`index`.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor
    support_index: torch.Tensor
    query_index: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.query_x.shape[0]

    def __len__(self) -> int:
        return self.num_tasks

    @classmethod
    def plain(cls, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> EpisodeBatch:
        """The degenerate episode of a mini-batch: ``x [B, C, H, W]``, global labels ``y [B]``,
        store positions ``index [B]``; one task, no support set, ``classes`` empty."""
        empty = x.new_empty((1, 0, *x.shape[1:]))
        return cls(empty, y.new_empty((1, 0)), x.unsqueeze(0), y.unsqueeze(0), y.new_empty((1, 0)),
                   index.new_empty((1, 0)), index.unsqueeze(0))

    def _single(self, value: torch.Tensor) -> torch.Tensor:
        if self.num_tasks != 1 or self.support_x.shape[1] != 0:
            raise ValueError(f"x, y and index belong to a plain mini-batch (one task, no support set); this "
                             f"batch has {self.num_tasks} tasks with {self.support_x.shape[1]} support images")
        return value[0]

    @property
    def x(self) -> torch.Tensor:
        """A plain batch's images ``[B, C, H, W]`` (its one task's query set)."""
        return self._single(self.query_x)

    @property
    def y(self) -> torch.Tensor:
        """A plain batch's global labels ``[B]``."""
        return self._single(self.query_y)

    @property
    def index(self) -> torch.Tensor:
        """A plain batch's store positions ``[B]``."""
        return self._single(self.query_index)

    def task(self, t: int) -> Episode:
        return Episode(self.support_x[t], self.support_y[t], self.query_x[t], self.query_y[t],
                       self.classes[t])

    def to(self, device: torch.device | str) -> EpisodeBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})
