"""WideResNet-34-10 and -28-10 as the robustness papers train them (TRADES / Madry variant).

Zagoruyko & Komodakis, *Wide Residual Networks* (BMVC 2016), in the form of TRADES' code
(``yaodongyu/TRADES``, ``models/wideresnet.py``), also used by MART, AWP, LTD, Backward
Smoothing and RobustBench's Madry/TRADES entries: a 3x3 stem (16 filters), three groups of
``n = (depth - 4) / 6`` pre-activation basic blocks (16k, 32k, 64k filters; stride 1, 2, 2;
1x1 conv shortcut where the shape changes), a final BN + ReLU, global average pooling, a linear
head; dropout 0 (the robustness papers'). WRN-34-10: 46,160,474 parameters on CIFAR-10
(46.16M); WRN-28-10: 36,479,194 (36.48M).

Differences from TRADES' file, on purpose:
- TRADES' class builds a ``sub_block1`` that ``forward`` never uses (2.1M parameters that
  receive no gradient; 48.26M in all); it is left out, which gives the published 46.16M.
  Released TRADES/MART checkpoints hold ``sub_block1.*`` keys: drop them (and rename ``fc`` to
  ``head``) before ``load_state_dict``.
- TRADES and MART feed raw [0, 1] pixels; here the first layer normalises by CIFAR-10's
  statistics unless ``model.normalize=none`` (use ``none`` to load their checkpoints).
- Global average pooling is adaptive (TRADES: ``avg_pool2d(8)``, the same at 32x32), so other
  image sizes work.

Layer names: ``conv1``, ``block1``..``block3`` (each ``.layer`` of blocks), ``bn1`` (as the
reference), ``pool``, ``head``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metarobust.config import ModelConfig
from metarobust.errors import ConfigError
from metarobust.models.layers import Normalize, norm2d
from metarobust.models.options import (
    input_stats,
    require_image_size,
    resolve_batch_norm,
    resolve_drop_rate,
    scale_width,
)

MIN_IMAGE_SIZE = 4
"""Two stride-2 groups: 4x4 inputs end at 1x1."""


class WideBasicBlock(nn.Module):
    """``BN -> ReLU -> conv3x3 -> BN -> ReLU -> (dropout) -> conv3x3`` plus the input.

    Where the width changes, the input is pre-activated and projected by a 1x1 convolution
    (``convShortcut``), as in TRADES' block. Shapes: ``[B, in_planes, H, W] ->
    [B, out_planes, H/stride, W/stride]``.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0,
                 batch_norm: str = "running") -> None:
        super().__init__()
        self.bn1 = norm2d(batch_norm, in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm2d(batch_norm, out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Module | None = None  # noqa: N815 (the reference's key name)
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        # TRADES' block: with equal widths the identity shortcut takes the raw input; otherwise
        # the projection takes the pre-activated one. (Equal widths with stride 2 never occur.)
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """A group of ``num_layers`` blocks; the first one changes width and stride."""

    def __init__(self, num_layers: int, in_planes: int, out_planes: int, stride: int,
                 drop_rate: float = 0.0, batch_norm: str = "running") -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                           drop_rate, batch_norm)
            for i in range(num_layers)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k for small images.

    Args:
        depth: total depth, ``6n + 4`` (34: WRN-34-10; 28: WRN-28-10).
        widen_factor: k (10 in the robustness papers).
        in_channels, num_classes: input channels and head outputs.
        drop_rate: dropout between the two convolutions of a block (0 in the robustness papers).
        batch_norm: ``running`` (standard BN), ``batch`` (per-batch statistics) or ``none``.
        mean, std: input normalisation (CIFAR-10's by default).
        width_scale: every width times this (tests build tiny WRNs with it).

    Shapes: ``[B, C, H, W]`` in [0, 1] ``-> [B, num_classes]``; ``features(x)``:
    ``[B, 64k]``. Hookable layers: :attr:`feature_layers`.

    Example:
        >>> wrn34_10(num_classes=10, width=8)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    feature_layers = ("conv1", "block1", "block2", "block3", "pool")

    def __init__(self, depth: int = 34, widen_factor: int = 10, in_channels: int = 3,
                 num_classes: int = 10, drop_rate: float = 0.0, batch_norm: str = "running",
                 mean: list[float] | None = None, std: list[float] | None = None,
                 width: int = 64) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"WideResNet depth={depth} is invalid; expected 6n + 4 (e.g. 28, 34)")
        n = (depth - 4) // 6
        channels = [scale_width(c, width) for c in (16, 16 * widen_factor, 32 * widen_factor,
                                                    64 * widen_factor)]
        default_mean, default_std = input_stats("auto", in_channels)
        self.normalize = Normalize(mean or default_mean, std or default_std)
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate, batch_norm)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate, batch_norm)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate, batch_norm)
        self.bn1 = norm2d(batch_norm, channels[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels[3]
        self.head = nn.Linear(channels[3], num_classes)
        # TRADES' initialisation: He-normal by fan-out, BN (1, 0), zero head bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features ``[B, feature_dim]``."""
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        return self.pool(F.relu(self.bn1(out))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def wrn34_10(in_channels: int = 3, num_classes: int = 10, width: int = 64, drop_rate: float = 0.0,
             batch_norm: str = "running", mean: list[float] | None = None,
             std: list[float] | None = None) -> WideResNet:
    """WRN-34-10 (46.16M parameters at ``width=64`` on CIFAR-10)."""
    return WideResNet(34, 10, in_channels, num_classes, drop_rate, batch_norm, mean, std, width)


def wrn28_10(in_channels: int = 3, num_classes: int = 10, width: int = 64, drop_rate: float = 0.0,
             batch_norm: str = "running", mean: list[float] | None = None,
             std: list[float] | None = None) -> WideResNet:
    """WRN-28-10 (36.48M parameters at ``width=64`` on CIFAR-10)."""
    return WideResNet(28, 10, in_channels, num_classes, drop_rate, batch_norm, mean, std, width)


def _builder(name: str, constructor):
    def build(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int,
              dataset: str | None = None) -> WideResNet:
        require_image_size(name, image_size, MIN_IMAGE_SIZE, "two stride-2 groups")
        mean, std = input_stats(cfg.normalize, in_channels, dataset)
        return constructor(in_channels, num_classes, cfg.hidden, resolve_drop_rate(cfg.drop_rate, 0.0),
                           resolve_batch_norm(cfg.batch_norm, "running"), mean, std)

    build.__doc__ = f"Registry builder (``model.name={name}``)."
    return build


build_wrn34_10 = _builder("wrn34_10", wrn34_10)
build_wrn28_10 = _builder("wrn28_10", wrn28_10)
