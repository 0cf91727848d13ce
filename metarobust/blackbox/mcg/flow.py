"""Conditional Glow (c-Glow; Lu & Huang, AAAI 2020), the flow of MCG's generator (META.md 3.2).

A multi-scale normalising flow ``u -> z`` over a perturbation-shaped tensor ``u [B, C, H, W]``,
conditioned on an image ``x [B, Cx, Hx, Wx]``. A level is squeeze -> K steps -> split (no split
at the last level); a step is conditional actnorm -> conditional invertible 1x1 convolution ->
conditional affine coupling. Unlike Glow, the actnorm's scale and bias and the 1x1 convolution's
weights are *predicted from x* by small conditioning nets (one per step), and the coupling net
also sees features of ``x`` at the level's resolution. The prior of every latent (the per-split
``z``s and the top one) is a standard normal (``learn_top=False``).

Every conditioning net ends in a zero-initialised layer, so a fresh flow is a channel
permutation (the 1x1 convolutions start at a fixed random permutation), i.e. volume preserving:
no data-dependent initialisation is needed.

Why self-written and not FrEIA: FrEIA's blocks (``AllInOneBlock``, ``GLOWCouplingBlock``) take a
condition only in the coupling's subnet; its actnorm and permutations are unconditional. c-Glow
needs the actnorm and 1x1 convolution predicted from ``x`` as well, so a compact flow with exact
log-determinants (tested against the brute-force Jacobian) is simpler than wrapping FrEIA.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def squeeze(h: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] -> [B, 4C, H/2, W/2]`` (space to depth, volume preserving)."""
    b, c, hh, ww = h.shape
    h = h.view(b, c, hh // 2, 2, ww // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return h.reshape(b, 4 * c, hh // 2, ww // 2)


def unsqueeze(h: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`squeeze`."""
    b, c, hh, ww = h.shape
    h = h.view(b, c // 4, 2, 2, hh, ww).permute(0, 1, 4, 2, 5, 3)
    return h.reshape(b, c // 4, 2 * hh, 2 * ww)


LOG_SCALE_BOUND = 3.0
"""Every predicted log-scale is soft-clamped to (-3, 3) [ours]: sampling runs the flow *backwards*,
dividing by each scale, so an unbounded one lets a few large fine-tuning steps overflow the
decoded perturbation (inf, then NaN gradients through the bound's tanh). Three is wide: a fresh
flow's scales are 1, the coupling's sigmoid(2) = 0.88."""


def soft_clamp(t: torch.Tensor, bound: float = LOG_SCALE_BOUND) -> torch.Tensor:
    """``bound * tanh(t / bound)``: ``t`` near zero, never beyond ``+-bound``; smooth."""
    return bound * torch.tanh(t / bound)


def zero_linear(fan_in: int, fan_out: int) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ConditionNet(nn.Module):
    """``x [B, Cx, h, w] -> [B, out]``: two 3x3 convolutions (the second strided), pooled to 4x4,
    then an MLP whose last layer starts at zero. c-Glow flattens the whole feature map; the pool
    (a reconstruction) makes the net independent of the image size."""

    def __init__(self, channels: int, out: int, hidden_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, hidden_channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(16 * hidden_channels, hidden_size), nn.ReLU())
        self.head = zero_linear(hidden_size, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CondActNorm(nn.Module):
    """``h * exp(log_scale(x)) + bias(x)``, one scale and bias per channel and example."""

    def __init__(self, channels: int, cond_channels: int, hidden_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.net = ConditionNet(cond_channels, 2 * channels, hidden_channels, hidden_size)

    def _params(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale, bias = self.net(cond)[..., None, None].chunk(2, dim=1)
        return soft_clamp(log_scale), bias

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale, bias = self._params(cond)
        return h * log_scale.exp() + bias, log_scale.flatten(1).sum(1) * h.shape[2] * h.shape[3]

    def inverse(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        log_scale, bias = self._params(cond)
        return (h - bias) * torch.exp(-log_scale)


class CondInvConv1x1(nn.Module):
    """An invertible 1x1 convolution whose weight ``W(x) = P L(x) (U(x) + diag(exp(s(x))))`` is
    predicted per example in LU form (Glow's LU parametrisation, made conditional): ``P`` is a
    fixed random permutation, ``L`` unit lower-triangular, ``U`` strictly upper-triangular, so
    ``log|det W| = sum(s)`` exactly and ``W`` is invertible whatever the net predicts."""

    def __init__(self, channels: int, cond_channels: int, hidden_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("perm", torch.eye(channels)[torch.randperm(channels)])
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.net = ConditionNet(cond_channels, channels * channels + channels, hidden_channels, hidden_size)

    def _factors(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.channels
        out = self.net(cond)
        square, log_diag = out[:, :c * c].view(-1, c, c), soft_clamp(out[:, c * c:])
        eye = torch.eye(c, device=cond.device, dtype=cond.dtype)
        lower = square * self.lower_mask + eye
        upper = square * self.lower_mask.T + torch.diag_embed(log_diag.exp())
        return lower, upper, log_diag

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lower, upper, log_diag = self._factors(cond)
        weight = self.perm @ lower @ upper  # [B, C, C]
        out = torch.einsum("bij,bjhw->bihw", weight, h)
        return out, log_diag.sum(1) * h.shape[2] * h.shape[3]

    def inverse(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        lower, upper, _ = self._factors(cond)
        b, c, hh, ww = h.shape
        flat = (self.perm.T @ h.reshape(b, c, hh * ww))
        flat = torch.linalg.solve_triangular(lower, flat, upper=False, unitriangular=True)
        flat = torch.linalg.solve_triangular(upper, flat, upper=True)
        return flat.view(b, c, hh, ww)


class CondAffineCoupling(nn.Module):
    """Glow's affine coupling with the condition features concatenated to the net's input: the
    second half of the channels becomes ``(h2 + shift) * sigmoid(raw + 2)`` (its log soft-clamped,
    :data:`LOG_SCALE_BOUND`), with ``shift`` and ``raw`` computed from the first half and the
    features of ``x``."""

    def __init__(self, channels: int, feature_channels: int, hidden: int) -> None:
        super().__init__()
        self.half = channels // 2
        last = nn.Conv2d(hidden, 2 * (channels - self.half), 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(
            nn.Conv2d(self.half + feature_channels, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(), last)

    def _params(self, h1: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, raw = self.net(torch.cat([h1, features], dim=1)).chunk(2, dim=1)
        return shift, soft_clamp(F.logsigmoid(raw + 2.0))  # log of Glow's sigmoid(raw + 2)

    def forward(self, h: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1, h2 = h[:, :self.half], h[:, self.half:]
        shift, log_scale = self._params(h1, features)
        return torch.cat([h1, (h2 + shift) * log_scale.exp()], dim=1), log_scale.flatten(1).sum(1)

    def inverse(self, h: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        h1, h2 = h[:, :self.half], h[:, self.half:]
        shift, log_scale = self._params(h1, features)
        return torch.cat([h1, h2 * torch.exp(-log_scale) - shift], dim=1)


class FlowStep(nn.Module):
    """Conditional actnorm -> conditional 1x1 convolution -> conditional affine coupling."""

    def __init__(self, channels: int, cond_channels: int, feature_channels: int, x_hidden_channels: int,
                 x_hidden_size: int, hidden: int) -> None:
        super().__init__()
        self.actnorm = CondActNorm(channels, cond_channels, x_hidden_channels, x_hidden_size)
        self.conv = CondInvConv1x1(channels, cond_channels, x_hidden_channels, x_hidden_size)
        self.coupling = CondAffineCoupling(channels, feature_channels, hidden)

    def forward(self, h, cond, features):
        h, a = self.actnorm(h, cond)
        h, b = self.conv(h, cond)
        h, c = self.coupling(h, features)
        return h, a + b + c

    def inverse(self, h, cond, features):
        h = self.coupling.inverse(h, features)
        h = self.conv.inverse(h, cond)
        return self.actnorm.inverse(h, cond)


class CGlow(nn.Module):
    r"""The c-Glow flow ``u [B, C, H, W] -> latents``, conditioned on ``x [B, Cx, Hx, Wx]``.

    Arguments:
        shape (tuple): ``(C, H, W)`` of ``u``; ``H`` and ``W`` divisible by ``2 ** levels``.
        cond_channels (int): ``Cx``.
        levels, steps: ``L`` and ``K`` (paper: 3 and 8).
        hidden (int): coupling width (paper: 256).
        x_hidden_channels, x_hidden_size (int): conditioning nets' widths (paper: 64, 128).

    ``forward(u, x) -> (zs, logdet [B])`` with ``zs`` one tensor per level (the split halves,
    then the top); ``inverse(zs, x) -> u``; ``log_prob(u, x) -> [B]`` (nats);
    ``latent_shapes`` the shapes of ``zs`` without the batch dimension.
    """

    def __init__(self, shape: tuple[int, int, int], cond_channels: int, levels: int = 3, steps: int = 8,
                 hidden: int = 256, x_hidden_channels: int = 64, x_hidden_size: int = 128) -> None:
        super().__init__()
        c, h, w = shape
        if h % 2 ** levels or w % 2 ** levels:
            raise ValueError(f"c-Glow with {levels} levels needs H and W divisible by {2 ** levels}, got {shape}")
        self.shape, self.levels = tuple(shape), levels
        self.blocks = nn.ModuleList()
        self.features = nn.ModuleList()  # the coupling's view of x, one per level
        self.latent_shapes: list[tuple[int, int, int]] = []
        for level in range(levels):
            c, h, w = 4 * c, h // 2, w // 2
            self.features.append(nn.Sequential(nn.Conv2d(cond_channels, x_hidden_channels, 3, padding=1), nn.ReLU()))
            self.blocks.append(nn.ModuleList(
                FlowStep(c, cond_channels, x_hidden_channels, x_hidden_channels, x_hidden_size, hidden)
                for _ in range(steps)))
            if level < levels - 1:
                self.latent_shapes.append((c - c // 2, h, w))
                c = c // 2
        self.latent_shapes.append((c, h, w))

    def _conditions(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level: ``x`` resized to the level's resolution (antialiased: ImageNet's 224 pixels
        shrink to the DCT block's 16 or fewer), and the coupling features of it."""
        out, (h, w) = [], self.shape[1:]
        for level in range(self.levels):
            h, w = h // 2, w // 2
            cond = x if x.shape[-2:] == (h, w) else F.interpolate(x, size=(h, w), mode="bilinear",
                                                                   align_corners=False, antialias=True)
            out.append((cond, self.features[level](cond)))
        return out

    def forward(self, u: torch.Tensor, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        h, logdet, zs = u, u.new_zeros(u.shape[0]), []
        for level, (cond, features) in enumerate(self._conditions(x)):
            h = squeeze(h)
            for step in self.blocks[level]:
                h, ld = step(h, cond, features)
                logdet = logdet + ld
            if level < self.levels - 1:
                keep = h.shape[1] // 2
                zs.append(h[:, keep:])
                h = h[:, :keep]
        zs.append(h)
        return zs, logdet

    def inverse(self, zs: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        conditions = self._conditions(x)
        h = zs[-1]
        for level in reversed(range(self.levels)):
            if level < self.levels - 1:
                h = torch.cat([h, zs[level]], dim=1)
            cond, features = conditions[level]
            for step in reversed(self.blocks[level]):
                h = step.inverse(h, cond, features)
            h = unsqueeze(h)
        return h

    def log_prob(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``log p(u | x)`` in nats ``[B]``: the standard-normal prior of the latents plus the
        log-determinant."""
        zs, logdet = self(u, x)
        prior = sum((-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1) for z in zs)
        return prior + logdet

    def sample_latents(self, batch: int, generator: torch.Generator, device: torch.device,
                       temperature: float = 1.0) -> list[torch.Tensor]:
        """Standard-normal latents (times ``temperature``) for ``batch`` examples, drawn from
        ``generator`` on its own device."""
        return [(temperature * torch.randn((batch, *s), generator=generator, device=generator.device)).to(device)
                for s in self.latent_shapes]


__all__ = ["CGlow", "CondActNorm", "CondAffineCoupling", "CondInvConv1x1", "FlowStep", "squeeze", "unsqueeze"]
