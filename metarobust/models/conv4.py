"""Conv-4: the standard few-shot backbone (Vinyals et al. 2016; Snell et al. 2017; Finn et al. 2017).

Four blocks of ``3x3 conv (64 filters, padding 1) -> batch norm -> ReLU -> 2x2 max-pool``, then a
linear head. On 28x28 Omniglot the feature map ends at 64x1x1; on 84x84 miniImageNet at 64x5x5
(1600 features). Normalisation of the input is the model's first layer.
"""

from __future__ import annotations

from torch import nn

from metarobust.models.layers import Normalize, norm2d


def conv_block(in_channels: int, out_channels: int, batch_norm: str) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1)]
    if batch_norm != "none":  # no placeholder, so that state_dict keys stay those of earlier runs
        layers.append(norm2d(batch_norm, out_channels))
    layers += [nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """Conv-4 classifier.

    Args:
        in_channels: 1 (Omniglot, glyphs) or 3 (CIFAR-FS, miniImageNet).
        num_classes: the head's outputs (N, the ways).
        image_size: input side length, to size the head.
        hidden: filters per block (64 in the papers).
        batch_norm: ``batch`` (:class:`TaskBatchNorm2d`), ``running`` (``nn.BatchNorm2d``) or ``none``.
        mean, std: input normalisation per channel.

    Shapes: ``[B, C, H, W]`` in [0, 1] ``-> [B, num_classes]`` logits; ``features(x)`` gives
    the flattened penultimate features ``[B, hidden * s * s]``.

    Example:
        >>> model = Conv4(in_channels=1, num_classes=5, image_size=28)
        >>> model(torch.rand(10, 1, 28, 28)).shape
        torch.Size([10, 5])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        hidden: int = 64,
        batch_norm: str = "batch",
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean or [0.5] * in_channels, std or [0.5] * in_channels)
        self.encoder = nn.Sequential(
            conv_block(in_channels, hidden, batch_norm),
            conv_block(hidden, hidden, batch_norm),
            conv_block(hidden, hidden, batch_norm),
            conv_block(hidden, hidden, batch_norm),
        )
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for Conv-4 (needs >= 16)")
        self.feature_dim = hidden * side * side
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x):
        return self.encoder(self.normalize(x)).flatten(1)

    def forward(self, x):
        return self.head(self.features(x))
