"""Few-shot segmenters: a shared encoder, optionally PNODE's ODE block, and PANet's prototype head.

Encoders (``model.name``):

- ``seg_vgg16``: the papers' truncated VGG-16 with a 1-channel input (conv64x2 -> pool ->
  conv128x2 -> pool -> conv256x3 -> pool -> conv512x3, ReLU after each; 3x3 pools with stride 2
  and padding 1: output stride 8, 512 x 32 x 32 for a 256^2 input). ImageNet weights load from a
  torchvision ``vgg16`` state dict the user supplies (``seg.pretrained``), copied by position
  into conv2_1 ... conv4_3; conv1 stays Kaiming-initialised (1-channel input), as the reference.
- ``seg_light``: a CPU-sized encoder in the same shape, ``hidden``-wide (3 blocks of two 3x3
  convs with GroupNorm and ReLU, two of the same pools: output stride 4).

Inputs are in [0, 1]; the first layer maps them to ``(x - 0.5) / 0.5``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metarobust.config import ModelConfig
from metarobust.errors import ConfigError
from metarobust.models import MODELS
from metarobust.segmentation.ode import ODEBlock, _groups
from metarobust.segmentation.prototypes import COSINE_SCALE, cosine_logits, prototypes, upsample_logits

VGG_BLOCKS = ((64, 64), "pool", (128, 128), "pool", (256, 256, 256), "pool", (512, 512, 512))


def _pool() -> nn.Module:
    return nn.MaxPool2d(3, stride=2, padding=1)


class VGGEncoder(nn.Module):
    """The truncated VGG-16 of PANet/PNODE (1 input channel), ``[B, 1, H, W] -> [B, 512, H/8, W/8]``."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for block in VGG_BLOCKS:
            if block == "pool":
                layers.append(_pool())
                continue
            for width in block:
                layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(inplace=True)]
                c = width
        self.body = nn.Sequential(*layers)
        self.channels = c
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - 0.5) / 0.5)

    def load_imagenet(self, path: str | Path) -> int:
        """Copy a torchvision ``vgg16`` state dict's conv weights, by position, into every conv
        after conv1_2 (block 1 takes 3 input channels there); returns the tensors copied."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        source = [v for k, v in state.items() if k.startswith("features.") and v.dim() in (1, 4)]
        convs = [m for m in self.body if isinstance(m, nn.Conv2d)][2:]
        pairs = list(zip(source[4::2], source[5::2]))  # skip conv1_1 and conv1_2 (weight, bias)
        if len(pairs) < len(convs):
            raise ConfigError(f"seg.pretrained={str(path)!r} holds {len(pairs) + 2} conv layers; a torchvision "
                              f"vgg16 state dict has 13")
        for conv, (w, b) in zip(convs, pairs):
            if conv.weight.shape != w.shape:
                raise ConfigError(f"seg.pretrained={str(path)!r}: a conv of shape {tuple(w.shape)} where "
                                  f"VGG-16 has {tuple(conv.weight.shape)}; give torchvision's vgg16 weights")
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(b)
        return 2 * len(convs)


class LightEncoder(nn.Module):
    """A CPU-sized encoder, ``[B, 1, H, W] -> [B, 2 hidden, H/4, W/4]``."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        widths = (hidden, 2 * hidden, 2 * hidden)
        layers: list[nn.Module] = []
        c = 1
        for i, w in enumerate(widths):
            if i:
                layers.append(_pool())
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.GroupNorm(_groups(w), w), nn.ReLU(inplace=True)]
                c = w
        self.body = nn.Sequential(*layers)
        self.channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - 0.5) / 0.5)


class FewShotSegmenter(nn.Module):
    """PANet (``ode=None``) or PNODE: encoder -> [ODE block] -> prototypes -> scaled cosine.

    Call: ``model(support_x [T, K, 1, H, W], support_mask [T, K, H, W], query_x [T, Q, 1, H, W])
    -> logits [T, Q, 2, H, W]`` (background, foreground). :meth:`episode` returns the features
    and prototypes too, for the training losses.

    Example:
        >>> model = FewShotSegmenter(LightEncoder(16), ODEBlock(32, method="rk4"))
        >>> logits = model(sx, sm, qx)
    """

    def __init__(self, encoder: nn.Module, ode: ODEBlock | None = None, scale: float = COSINE_SCALE) -> None:
        super().__init__()
        self.encoder, self.ode, self.scale = encoder, ode, scale

    @property
    def nfe(self) -> int:
        """ODE function evaluations of the last forward pass (0 without an ODE block)."""
        return 0 if self.ode is None else self.ode.nfe

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, H, W] -> [B, C, h, w]``."""
        z = self.encoder(x)
        return z if self.ode is None else self.ode(z)

    def episode(self, support_x: torch.Tensor, support_mask: torch.Tensor,
                query_x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"logits" [T, Q, 2, H, W], "support_features" [T, K, C, h, w], "query_features"
        [T, Q, C, h, w], "prototypes" [T, 2, C]}``; support and query go through the encoder (and
        the ODE) in one batch."""
        t, k = support_x.shape[:2]
        q = query_x.shape[1]
        f = self.features(torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)]))
        fs, fq = f[:t * k].view(t, k, *f.shape[1:]), f[t * k:].view(t, q, *f.shape[1:])
        protos = prototypes(fs, support_mask)
        logits = upsample_logits(cosine_logits(fq, protos, self.scale), query_x.shape[-2:])
        return {"logits": logits, "support_features": fs, "query_features": fq, "prototypes": protos}

    def forward(self, support_x: torch.Tensor, support_mask: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        return self.episode(support_x, support_mask, query_x)["logits"]


def build_segmenter(name: str, hidden: int = 32, ode: bool = False, ode_layers: int = 3, ode_time: float = 4.0,
                    ode_solver: str = "dopri5", ode_tol: float = 1e-3, ode_steps: int = 4,
                    pretrained: str | None = None) -> FewShotSegmenter:
    """The segmenter for ``model.name`` (``seg_light`` or ``seg_vgg16``), with PNODE's ODE block
    when ``ode``."""
    if name == "seg_vgg16":
        encoder: nn.Module = VGGEncoder()
        if pretrained:
            encoder.load_imagenet(pretrained)
    elif name == "seg_light":
        if pretrained:
            raise ConfigError("seg.pretrained is for model.name=seg_vgg16 (ImageNet VGG-16 weights)")
        encoder = LightEncoder(hidden)
    else:
        raise ConfigError(f"model.name={name!r} for a segmentation recipe; choose seg_light or seg_vgg16")
    block = ODEBlock(encoder.channels, ode_layers, ode_time, ode_solver, ode_tol, ode_tol, ode_steps) if ode else None
    return FewShotSegmenter(encoder, block)


def _registered(name: str):
    def builder(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int,
                dataset: str | None = None) -> FewShotSegmenter:
        """The plain segmenter (no ODE); segmentation recipes build theirs with
        :meth:`~metarobust.training.recipes.seg_base.SegRecipe.build_model`."""
        return build_segmenter(name, cfg.hidden)
    return builder


MODELS.register("seg_light", "few-shot segmenter: light encoder (GroupNorm, stride 4) + PANet head; "
                             "segmentation recipes only")(_registered("seg_light"))
MODELS.register("seg_vgg16", "few-shot segmenter: truncated VGG-16 (stride 8, PANet/PNODE) + PANet head; "
                             "segmentation recipes only")(_registered("seg_vgg16"))


def pixel_ce(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel cross-entropy of ``logits [..., 2, H, W]`` against ``mask [..., H, W]``."""
    return F.cross_entropy(logits.flatten(0, -4), mask.flatten(0, -3))


__all__ = ["FewShotSegmenter", "LightEncoder", "VGGEncoder", "build_segmenter", "pixel_ce"]
