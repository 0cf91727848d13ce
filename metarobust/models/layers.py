"""Layers every metarobust model shares: input normalisation and a vmap-safe batch norm."""

from __future__ import annotations

import torch
from torch import nn

from metarobust.errors import ConfigError

BATCH_NORMS = ("batch", "running", "none")
"""BatchNorm kinds a model can be built with (``model.batch_norm``)."""


class Normalize(nn.Module):
    """``(x - mean) / std`` as the model's first layer, so attacks work in [0, 1] pixel space.

    Args:
        mean, std: per-channel statistics, one value per input channel.
    Shapes: ``[B, C, H, W] -> [B, C, H, W]``.
    """

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TaskBatchNorm2d(nn.Module):
    """Batch normalisation with the statistics of the current batch, always (MAML's convention).

    MAML (Finn et al.) and the robust-MAML codes (R-MAML, AQ) normalise every forward pass
    by the statistics of the batch it sees, at training and at test time alike (transductive
    BN: the support set is normalised by support statistics, the query set by query
    statistics). There are no running statistics, so ``train()``/``eval()`` change nothing
    and an attack in eval mode attacks exactly the function that is scored.

    It is written from plain tensor ops, not ``F.batch_norm``: under ``torch.func.vmap`` the
    official ``replace_all_batch_norm_modules_`` route gave second-order MAML gradients off
    by up to 1e-2 (ARCHITECTURE.md, known traps), while plain ops agree with a per-task loop
    to float64 precision (tested in ``tests/test_meta_gradient.py``).

    Shapes: ``[B, C, H, W] -> [B, C, H, W]``.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = (x - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
        x_hat = (x - mean) * torch.rsqrt(var + self.eps)
        return x_hat * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def norm2d(kind: str, channels: int) -> nn.Module:
    """The BatchNorm of kind ``kind`` (``model.batch_norm``) over ``channels`` channels.

    - ``batch``: :class:`TaskBatchNorm2d`, statistics of the batch at hand at training and test
      time alike (MAML's transductive convention; vmap- and second-order-safe).
    - ``running``: :class:`torch.nn.BatchNorm2d` with running statistics used in eval mode (the
      standard classifier convention: adversarial training, RFS pre-training).
    - ``none``: no normalisation (identity).
    """
    if kind == "batch":
        return TaskBatchNorm2d(channels)
    if kind == "running":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"model.batch_norm={kind!r} is invalid; expected one of {list(BATCH_NORMS)}")
