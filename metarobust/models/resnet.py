"""ResNet-18, CIFAR variant (3x3 stem, no max-pool): the model of MART, FRL, BAT and many AT papers.

He et al., *Deep Residual Learning for Image Recognition* (CVPR 2016), in the CIFAR form of
``kuangliu/pytorch-cifar`` that MART (Wang et al. 2020), BAT and FRL (Xu et al. 2021) train: a
3x3 stem (64 filters) + BN + ReLU, four stages of two basic blocks (64, 128, 256, 512; stride 2
from stage 2 on; 1x1 conv + BN shortcut where the shape changes), global average pooling, a
linear head. 11,173,962 parameters on CIFAR-10 (11.17M), the same as torchvision's
``resnet18(num_classes=10)`` with its 7x7 stem replaced by a 3x3 one and its max-pool removed
(the test checks the two agree output for output).

Layer names: ``conv1``, ``bn1``, ``layer1``..``layer4`` (as the reference), ``pool``, ``head``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarobust.config import ModelConfig
from metarobust.models.layers import Normalize, norm2d
from metarobust.models.options import (
    input_stats,
    require_image_size,
    require_no_dropout,
    resolve_batch_norm,
    scale_width,
)

MIN_IMAGE_SIZE = 8
"""Three stride-2 stages: 8x8 inputs end at 1x1."""


class BasicBlock(nn.Module):
    """``conv3x3 -> BN -> ReLU -> conv3x3 -> BN``, plus the (projected) input, then ReLU.

    Shapes: ``[B, in_planes, H, W] -> [B, planes, H/stride, W/stride]``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, batch_norm: str = "running") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm2d(batch_norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm2d(batch_norm, planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          norm2d(batch_norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with basic blocks for small images.

    Args:
        num_blocks: blocks per stage (``(2, 2, 2, 2)``: ResNet-18).
        in_channels, num_classes: input channels and head outputs.
        widths: filters per stage (``(64, 128, 256, 512)``).
        batch_norm: ``running`` (standard BN), ``batch`` (per-batch statistics) or ``none``.
        mean, std: input normalisation (CIFAR-10's by default).

    Shapes: ``[B, C, H, W]`` in [0, 1] ``-> [B, num_classes]``; ``features(x)``:
    ``[B, widths[-1]]``. Hookable layers: :attr:`feature_layers`.

    Example:
        >>> resnet18(num_classes=10)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    feature_layers = ("conv1", "layer1", "layer2", "layer3", "layer4", "pool")

    def __init__(self, num_blocks: tuple[int, ...] = (2, 2, 2, 2), in_channels: int = 3,
                 num_classes: int = 10, widths: tuple[int, ...] = (64, 128, 256, 512),
                 batch_norm: str = "running", mean: list[float] | None = None,
                 std: list[float] | None = None) -> None:
        super().__init__()
        default_mean, default_std = input_stats("auto", in_channels)
        self.normalize = Normalize(mean or default_mean, std or default_std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = norm2d(batch_norm, widths[0])
        planes = widths[0]
        for i, (blocks, width) in enumerate(zip(num_blocks, widths)):
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(BasicBlock(planes, width, stride if b == 0 else 1, batch_norm))
                planes = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = planes
        self.head = nn.Linear(planes, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features ``[B, feature_dim]``."""
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.pool(out).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def resnet18(in_channels: int = 3, num_classes: int = 10, width: int = 64, batch_norm: str = "running",
             mean: list[float] | None = None, std: list[float] | None = None) -> ResNet:
    """ResNet-18, CIFAR variant (11.17M parameters at ``width=64`` on CIFAR-10)."""
    widths = tuple(scale_width(c, width) for c in (64, 128, 256, 512))
    return ResNet((2, 2, 2, 2), in_channels, num_classes, widths, batch_norm, mean, std)


def build_resnet18(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int,
                   dataset: str | None = None) -> ResNet:
    """Registry builder (``model.name=resnet18``)."""
    require_image_size("resnet18", image_size, MIN_IMAGE_SIZE, "three stride-2 stages")
    require_no_dropout("resnet18", cfg.drop_rate)
    mean, std = input_stats(cfg.normalize, in_channels, dataset)
    return resnet18(in_channels, num_classes, cfg.hidden, resolve_batch_norm(cfg.batch_norm, "running"), mean, std)
