"""PreAct-ResNet-18, the standard model of fast and robust-overfitting adversarial training.

He et al., *Identity Mappings in Deep Residual Networks* (ECCV 2016), in the CIFAR form of
Wong et al., *Fast is better than free* (ICLR 2020, ``locuslab/fast_adversarial``) and Rice et
al., *Overfitting in adversarially robust deep learning* (ICML 2020,
``locuslab/robust_overfitting``): a 3x3 stem (64 filters, no BN), four stages of two
pre-activation blocks (64, 128, 256, 512 filters; stride 2 from stage 2 on; 1x1 conv shortcut
without BN where the shape changes), a final BN + ReLU, global average pooling, a linear head.
11,172,170 parameters on CIFAR-10 (11.17M).

Layer names follow the reference code (``conv1``, ``layer1``..``layer4``, ``bn``) so forward
hooks find them; the classifier is ``head`` (the project's name for it, which ANIL adapts) and
the pooling ``pool``. Input normalisation is the first layer (``normalize``).
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


class PreActBlock(nn.Module):
    """``BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3``, plus the (projected) input.

    The shortcut, where the shape changes, is a 1x1 convolution of the pre-activated input, as
    in the reference code. Shapes: ``[B, in_planes, H, W] -> [B, planes, H/stride, W/stride]``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, batch_norm: str = "running") -> None:
        super().__init__()
        self.bn1 = norm2d(batch_norm, in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm2d(batch_norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet for small images (CIFAR, 32x32).

    Args:
        num_blocks: blocks per stage (``(2, 2, 2, 2)``: PreAct-ResNet-18).
        in_channels: 3 (CIFAR) or 1 (MNIST).
        num_classes: outputs of the head.
        widths: filters per stage (``(64, 128, 256, 512)`` in the papers).
        batch_norm: ``running`` (standard BN, the papers'), ``batch`` (per-batch statistics) or ``none``.
        mean, std: input normalisation (CIFAR-10's by default).

    Shapes: ``[B, C, H, W]`` in [0, 1] ``-> [B, num_classes]``; ``features(x)`` is the pooled
    penultimate ``[B, widths[-1]]``. Hookable layers: :attr:`feature_layers`.

    Example:
        >>> model = preact_resnet18(num_classes=10)
        >>> model(torch.rand(2, 3, 32, 32)).shape
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
        planes = widths[0]
        for i, (blocks, width) in enumerate(zip(num_blocks, widths)):
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(PreActBlock(planes, width, stride if b == 0 else 1, batch_norm))
                planes = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.bn = norm2d(batch_norm, planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = planes
        self.head = nn.Linear(planes, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features ``[B, feature_dim]``."""
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.pool(F.relu(self.bn(out))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def preact_resnet18(in_channels: int = 3, num_classes: int = 10, width: int = 64,
                    batch_norm: str = "running", mean: list[float] | None = None,
                    std: list[float] | None = None) -> PreActResNet:
    """PreAct-ResNet-18 (11.17M parameters at ``width=64`` on CIFAR-10)."""
    widths = tuple(scale_width(c, width) for c in (64, 128, 256, 512))
    return PreActResNet((2, 2, 2, 2), in_channels, num_classes, widths, batch_norm, mean, std)


def build_preact_resnet18(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int,
                          dataset: str | None = None) -> PreActResNet:
    """Registry builder (``model.name=preact_resnet18``)."""
    require_image_size("preact_resnet18", image_size, MIN_IMAGE_SIZE, "three stride-2 stages")
    require_no_dropout("preact_resnet18", cfg.drop_rate)
    mean, std = input_stats(cfg.normalize, in_channels, dataset)
    return preact_resnet18(in_channels, num_classes, cfg.hidden, resolve_batch_norm(cfg.batch_norm, "running"),
                           mean, std)
