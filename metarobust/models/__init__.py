"""Models, built by name from a config (``metarobust list models``)."""

from __future__ import annotations

from torch import nn

from metarobust.config import ModelConfig
from metarobust.models import preact_resnet, resnet, resnet12, small_cnn, wide_resnet
from metarobust.models.conv4 import Conv4
from metarobust.models.dual_bn import DualBatchNorm, bn_route, convert_dual_bn, strip_aux_bn
from metarobust.models.options import input_stats, require_image_size, require_no_dropout, resolve_batch_norm
from metarobust.models.preact_resnet import PreActResNet
from metarobust.models.resnet import ResNet
from metarobust.models.resnet12 import ResNet12
from metarobust.models.small_cnn import SmallCNN
from metarobust.models.wide_resnet import WideResNet
from metarobust.registry import Registry

MODELS = Registry("model")
"""Builders ``(cfg: ModelConfig, in_channels, num_classes, image_size, dataset=None) -> nn.Module``;
``dataset`` (``data.dataset``) lets ``model.normalize=auto`` pick the dataset's statistics."""

MIN_IMAGE_SIZES: dict[str, int] = {}
"""Smallest ``data.image_size`` each model takes (checked by config validation)."""


def _register(name: str, description: str, builder, min_image_size: int) -> None:
    MODELS.register(name, description)(builder)
    MIN_IMAGE_SIZES[name] = min_image_size


def _conv4(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int,
           dataset: str | None = None) -> nn.Module:
    require_image_size("conv4", image_size, 16, "four 2x2 max-pools")
    require_no_dropout("conv4", cfg.drop_rate)
    mean, std = input_stats(cfg.normalize, in_channels, dataset, default="half")
    return Conv4(in_channels, num_classes, image_size, hidden=cfg.hidden,
                 batch_norm=resolve_batch_norm(cfg.batch_norm, "batch"), mean=mean, std=std)


_register("conv4", "Conv-4: 4 x (3x3 conv 64, batch norm, ReLU, max-pool) + linear head", _conv4, 16)
_register("resnet12", "ResNet-12 (MetaOptNet, RFS): 64-160-320-640, 12.4M; task BN for MAML",
          resnet12.build_resnet12, resnet12.MIN_IMAGE_SIZE)
_register("preact_resnet18", "PreAct-ResNet-18 (Wong et al., Rice et al.): 11.17M on CIFAR-10",
          preact_resnet.build_preact_resnet18, preact_resnet.MIN_IMAGE_SIZE)
_register("resnet18", "ResNet-18, CIFAR variant with a 3x3 stem (MART, FRL): 11.17M",
          resnet.build_resnet18, resnet.MIN_IMAGE_SIZE)
_register("wrn34_10", "WideResNet-34-10 (TRADES/Madry variant, dropout 0): 46.16M",
          wide_resnet.build_wrn34_10, wide_resnet.MIN_IMAGE_SIZE)
_register("wrn28_10", "WideResNet-28-10 (TRADES/Madry variant, dropout 0): 36.48M",
          wide_resnet.build_wrn28_10, wide_resnet.MIN_IMAGE_SIZE)
_register("small_cnn", "TRADES' MNIST CNN: 2 x (conv32) + 2 x (conv64) + fc200-fc200-fc10",
          small_cnn.build_small_cnn, small_cnn.MIN_IMAGE_SIZE)


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int,
                dataset: str | None = None) -> nn.Module:
    """The model named by ``cfg.name`` for images ``[C=in_channels, image_size, image_size]``.

    Pass ``dataset`` (``cfg.data.dataset``) so that ``model.normalize=auto`` uses its statistics.

    Example:
        >>> model = build_model(ModelConfig(name="resnet12", hidden=8), 3, 5, 84)
    """
    return MODELS.get(cfg.name, "model.name")(cfg, in_channels, num_classes, image_size, dataset)


__all__ = ["MODELS", "MIN_IMAGE_SIZES", "Conv4", "DualBatchNorm", "PreActResNet", "ResNet",
           "ResNet12", "SmallCNN", "WideResNet", "bn_route", "build_model", "convert_dual_bn",
           "strip_aux_bn"]
