"""ResNet-12, the few-shot standard backbone (MetaOptNet, RFS), usable by MAML.

Lee et al., *Meta-Learning with Differentiable Convex Optimization* (MetaOptNet, CVPR 2019)
and Tian et al., *Rethinking Few-Shot Image Classification: a Good Embedding Is All You Need?*
(RFS, ECCV 2020; ``WangYueFt/rfs``, ``models/resnet.py``): four residual blocks of widths
64-160-320-640, each ``3 x (conv3x3 -> BN -> LeakyReLU(0.1))`` (no activation after the third
BN before the sum) plus a ``conv1x1 -> BN`` shortcut, then LeakyReLU and a 2x2 max-pool;
optionally dropout (blocks 1-2) and DropBlock (blocks 3-4, block size 5) at ``drop_rate``;
global average pooling (RFS' ``avg_pool=True``) and a linear head. 12,424,320 parameters in the
body, 12,427,525 with a 5-way head (12.4M), at any input size (84x84 miniImageNet ends at
640x5x5, 32x32 CIFAR-FS at 640x2x2, 28x28 Omniglot at 640x1x1).

BatchNorm (``model.batch_norm``):
- ``batch`` (``auto``'s choice): :class:`~metarobust.models.layers.TaskBatchNorm2d`, statistics of
  the batch at hand at training and test time, as Conv-4 in MAML. Built from plain tensor ops,
  so ``torch.func.functional_call``, ``vmap`` over tasks and second-order meta-gradients are
  exact (tested against a per-task autograd reference in float64).
- ``running``: standard ``nn.BatchNorm2d`` with running statistics (RFS pre-training, then a
  frozen backbone in eval mode). Not for ``vmap`` (in-place running-stat updates).
- ``none``: no normalisation.

Dropout / DropBlock (``model.drop_rate``, default 0; RFS and MetaOptNet: 0.1): as RFS, a
DropBlock's drop rate ramps up linearly over its first 40,000 training forward passes
(``keep = max(1 - rate * step / 40000, 1 - rate)``); the step count is a buffer, so it is saved
in checkpoints. Randomness inside ``vmap`` needs ``randomness="different"``: keep
``drop_rate=0`` for MAML (as the MAML papers).

Layer names: ``layer1``..``layer4`` (each a ``Sequential`` of one block, as RFS), ``pool``,
``head``.
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
    resolve_batch_norm,
    resolve_drop_rate,
    scale_width,
)

MIN_IMAGE_SIZE = 16
"""Four 2x2 max-pools: 16x16 inputs end at 1x1."""

WIDTHS = (64, 160, 320, 640)
DROPBLOCK_SIZE = 5
DROPBLOCK_RAMP_STEPS = 40_000  # RFS: drop_rate / (20 * 2000) per forward pass


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al., NeurIPS 2018) as RFS and MetaOptNet apply it.

    In training mode, zeroes ``block_size x block_size`` squares around seeds drawn with
    probability ``gamma`` (chosen so that about ``rate`` of the units are dropped) and rescales
    by ``units / kept units``. The seeds are expanded to squares by a max-pool rather than RFS'
    index arithmetic (same masks, no host sync). The rate ramps up over ``ramp_steps`` forward
    passes (RFS' schedule). Identity in eval mode or at rate 0.

    Shapes: ``[B, C, H, W] -> [B, C, H, W]``.
    """

    def __init__(self, rate: float, block_size: int = DROPBLOCK_SIZE,
                 ramp_steps: int = DROPBLOCK_RAMP_STEPS) -> None:
        super().__init__()
        self.rate, self.block_size, self.ramp_steps = rate, block_size, ramp_steps
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        self.steps += 1
        _, _, height, width = x.shape
        size = min(self.block_size, height, width)  # tiny maps (tests, 28x28 inputs)
        drop = torch.clamp(self.rate * self.steps.to(x.dtype) / self.ramp_steps, max=self.rate)
        gamma = drop / size**2 * (height * width) / ((height - size + 1) * (width - size + 1))
        seeds_shape = (x.shape[0], x.shape[1], height - size + 1, width - size + 1)
        seeds = (torch.rand(seeds_shape, device=x.device, dtype=x.dtype) < gamma).to(x.dtype)
        keep = self.keep_mask(seeds, size)
        return x * keep * (keep.numel() / keep.sum().clamp_min(1))

    @staticmethod
    def keep_mask(seeds: torch.Tensor, size: int) -> torch.Tensor:
        """1 outside, 0 inside the ``size x size`` square whose top-left corner is each seed.

        Shapes: seeds ``[B, C, H - size + 1, W - size + 1]`` -> mask ``[B, C, H, W]``.
        """
        return 1 - F.max_pool2d(F.pad(seeds, [size - 1] * 4), size, stride=1)


class ResNet12Block(nn.Module):
    """Three ``conv3x3 -> BN`` (LeakyReLU 0.1 between), a ``conv1x1 -> BN`` shortcut, LeakyReLU,
    2x2 max-pool, then dropout or DropBlock.

    Shapes: ``[B, in_planes, H, W] -> [B, planes, H // 2, W // 2]``.
    """

    def __init__(self, in_planes: int, planes: int, batch_norm: str = "batch", drop_rate: float = 0.0,
                 drop_block: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=False)
        self.bn1 = norm2d(batch_norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm2d(batch_norm, planes)
        self.conv3 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn3 = norm2d(batch_norm, planes)
        self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, bias=False), norm2d(batch_norm, planes))
        self.drop: nn.Module = nn.Identity()
        if drop_rate > 0:
            self.drop = DropBlock(drop_rate) if drop_block else nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
        out = self.bn3(self.conv3(out))
        out = F.leaky_relu(out + self.downsample(x), 0.1)
        return self.drop(F.max_pool2d(out, 2))


class ResNet12(nn.Module):
    """ResNet-12 classifier.

    Args:
        in_channels: 3 (miniImageNet, CIFAR-FS, FC100) or 1 (Omniglot).
        num_classes: head outputs (N ways for MAML; 64 for RFS pre-training on miniImageNet).
        widths: filters of the four blocks (``(64, 160, 320, 640)``).
        batch_norm: ``batch`` (per-batch statistics, MAML), ``running`` (standard BN, RFS) or ``none``.
        drop_rate: dropout (blocks 1-2) and DropBlock (blocks 3-4) rate; 0 disables both.
        mean, std: input normalisation (miniImageNet's, as RFS, by default).

    Shapes: ``[B, C, H, W]`` in [0, 1] ``-> [B, num_classes]``; ``features(x)`` is the pooled
    ``[B, widths[-1]]`` (RFS' embedding). Hookable layers: :attr:`feature_layers`.

    Example:
        >>> model = ResNet12(3, 5, widths=(8, 20, 40, 80))
        >>> model(torch.rand(10, 3, 84, 84)).shape
        torch.Size([10, 5])
    """

    feature_layers = ("layer1", "layer2", "layer3", "layer4", "pool")

    def __init__(self, in_channels: int = 3, num_classes: int = 5,
                 widths: tuple[int, ...] = WIDTHS, batch_norm: str = "batch", drop_rate: float = 0.0,
                 mean: list[float] | None = None, std: list[float] | None = None) -> None:
        super().__init__()
        default_mean, default_std = input_stats(
            "auto", in_channels, fallback="mini_imagenet" if in_channels == 3 else "half")
        self.normalize = Normalize(mean or default_mean, std or default_std)
        planes = in_channels
        for i, width in enumerate(widths):
            block = ResNet12Block(planes, width, batch_norm, drop_rate, drop_block=i >= 2)
            setattr(self, f"layer{i + 1}", nn.Sequential(block))
            planes = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = planes
        self.head = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # RFS' initialisation
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``[B, feature_dim]``."""
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.normalize(x)))))
        return self.pool(out).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def resnet12(in_channels: int = 3, num_classes: int = 5, width: int = 64, batch_norm: str = "batch",
             drop_rate: float = 0.0, mean: list[float] | None = None,
             std: list[float] | None = None) -> ResNet12:
    """ResNet-12 (64-160-320-640 at ``width=64``: 12.4M parameters with a 5-way head)."""
    widths = tuple(scale_width(c, width) for c in WIDTHS)
    return ResNet12(in_channels, num_classes, widths, batch_norm, drop_rate, mean, std)


def build_resnet12(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int,
                   dataset: str | None = None) -> ResNet12:
    """Registry builder (``model.name=resnet12``)."""
    require_image_size("resnet12", image_size, MIN_IMAGE_SIZE, "four 2x2 max-pools")
    mean, std = input_stats(cfg.normalize, in_channels, dataset,
                            fallback="mini_imagenet" if in_channels == 3 else "half")
    return resnet12(in_channels, num_classes, cfg.hidden, resolve_batch_norm(cfg.batch_norm, "batch"),
                    resolve_drop_rate(cfg.drop_rate, 0.0), mean, std)
