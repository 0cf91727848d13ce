"""Models, built by name from a config (``metarobust list models``)."""

from __future__ import annotations

from torch import nn

from metarobust.config import ModelConfig
from metarobust.models.conv4 import Conv4
from metarobust.registry import Registry

MODELS = Registry("model")


@MODELS.register("conv4", "Conv-4: 4 x (3x3 conv 64, batch norm, ReLU, max-pool) + linear head")
def _conv4(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return Conv4(in_channels, num_classes, image_size, hidden=cfg.hidden, norm=cfg.norm)


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The model named by ``cfg.name`` for images ``[C=in_channels, image_size, image_size]``."""
    return MODELS.get(cfg.name, "model.name")(cfg, in_channels, num_classes, image_size)


__all__ = ["MODELS", "Conv4", "build_model"]
