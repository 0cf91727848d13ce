"""The small CNN for MNIST of TRADES (Zhang et al., ICML 2019), also used by MART and FRL.

From ``yaodongyu/TRADES``, ``models/small_cnn.py`` (which follows Carlini & Wagner's MNIST
model): ``conv32 -> ReLU -> conv32 -> ReLU -> max-pool -> conv64 -> ReLU -> conv64 -> ReLU ->
max-pool`` (3x3 convolutions without padding), then ``fc200 -> ReLU -> dropout(0.5) -> fc200 ->
ReLU -> fc10``. No BatchNorm. 312,202 parameters on 28x28 MNIST. Initialisation as TRADES:
He-normal convolutions with zero bias, and a zero-initialised last layer.

TRADES feeds raw [0, 1] pixels, so ``model.normalize=auto`` means no normalisation here.
Layer names as the reference (``feature_extractor.conv1``..``conv4``,
``classifier.fc1``/``fc2``), with the last layer ``head`` (TRADES: ``classifier.fc3``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from metarobust.config import ModelConfig
from metarobust.errors import ConfigError
from metarobust.models.layers import Normalize
from metarobust.models.options import input_stats, require_image_size, resolve_drop_rate, scale_width

MIN_IMAGE_SIZE = 16
"""Four unpadded 3x3 convolutions and two 2x2 max-pools: 16x16 inputs end at 1x1."""


def _side(image_size: int) -> int:
    return ((image_size - 4) // 2 - 4) // 2


class SmallCNN(nn.Module):
    """TRADES' MNIST CNN.

    Args:
        in_channels, num_classes: input channels (1 for MNIST) and outputs (10).
        image_size: input side length (28 for MNIST), to size the first linear layer.
        drop_rate: dropout after ``fc1`` (TRADES: 0.5).
        conv_widths: filters of the two conv pairs (``(32, 64)``).
        hidden_units: width of ``fc1`` and ``fc2`` (200).
        mean, std: input normalisation (none by default, as TRADES).

    Shapes: ``[B, C, H, W]`` in [0, 1] ``-> [B, num_classes]``; ``features(x)`` is the
    penultimate ``[B, hidden_units]`` (after ``fc2`` and its ReLU). Hookable layers:
    :attr:`feature_layers`.

    Example:
        >>> SmallCNN()(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    feature_layers = ("feature_extractor.maxpool1", "feature_extractor.maxpool2",
                      "classifier.fc1", "classifier.fc2")

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 drop_rate: float = 0.5, conv_widths: tuple[int, int] = (32, 64),
                 hidden_units: int = 200, mean: list[float] | None = None,
                 std: list[float] | None = None) -> None:
        super().__init__()
        c1, c2 = conv_widths
        side = _side(image_size)
        self.normalize = Normalize(mean or [0.0] * in_channels, std or [1.0] * in_channels)
        self.feature_extractor = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, c1, 3)), ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(c1, c1, 3)), ("relu2", nn.ReLU()),
            ("maxpool1", nn.MaxPool2d(2, 2)),
            ("conv3", nn.Conv2d(c1, c2, 3)), ("relu3", nn.ReLU()),
            ("conv4", nn.Conv2d(c2, c2, 3)), ("relu4", nn.ReLU()),
            ("maxpool2", nn.MaxPool2d(2, 2)),
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(c2 * side * side, hidden_units)), ("relu1", nn.ReLU()),
            ("drop", nn.Dropout(drop_rate)),
            ("fc2", nn.Linear(hidden_units, hidden_units)), ("relu2", nn.ReLU()),
        ]))
        self.feature_dim = hidden_units
        self.head = nn.Linear(hidden_units, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        # TRADES starts from a zero last layer (all logits 0, uniform predictions).
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, hidden_units]``."""
        return self.classifier(self.feature_extractor(self.normalize(x)).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_small_cnn(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int,
                    dataset: str | None = None) -> SmallCNN:
    """Registry builder (``model.name=small_cnn``); ``model.hidden`` scales the conv widths."""
    require_image_size("small_cnn", image_size, MIN_IMAGE_SIZE,
                       "four unpadded 3x3 convolutions and two 2x2 max-pools")
    if cfg.batch_norm not in ("auto", "none"):
        raise ConfigError(f"model.batch_norm={cfg.batch_norm!r} is not supported by model 'small_cnn' (TRADES' "
                          f"small CNN has no BatchNorm); use auto or none")
    mean, std = input_stats(cfg.normalize, in_channels, dataset, default="none")
    widths = (scale_width(32, cfg.hidden), scale_width(64, cfg.hidden))
    return SmallCNN(in_channels, num_classes, image_size, resolve_drop_rate(cfg.drop_rate, 0.5),
                    widths, 200, mean, std)
