"""MCG's perturbation generator: c-Glow plus the one bounding used everywhere (META.md 3.2, 3.6).

The flow (:class:`~metarobust.blackbox.mcg.flow.CGlow`) models an unbounded tensor ``u`` given
the image ``x``. :meth:`MCGGenerator.decode` turns ``u`` into a perturbation in the threat model:
optionally from the low-frequency DCT block to pixels (zero-padded inverse DCT), then the bound
(``eps * tanh`` or the clamp, :class:`~metarobust.blackbox.mcg.config.GeneratorConfig`), then the
box ``x + delta in [0, 1]``. Pre-training, meta-training and attack time all call this one
function, which fixes the released code's mismatch between its training-time rescaling and its
attack-time clamp (META.md 3.6). :meth:`MCGGenerator.encode` is its inverse where one exists
(inside the box, away from the bound), for the likelihood of a transfer perturbation and for the
attack-time latent.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from metarobust.blackbox.mcg.config import GeneratorConfig
from metarobust.blackbox.mcg.flow import CGlow

Latents = list[torch.Tensor]


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``[n, n]``: ``D @ v`` is the DCT of ``v``, ``D.T @ c`` the
    inverse."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.float()


class MCGGenerator(nn.Module):
    r"""The conditional generator ``p(delta | x)`` of MCG (Yin et al., TPAMI; arXiv 2301.00364).

    Arguments:
        cfg (GeneratorConfig): shape, threat model, bounding and c-Glow sizes.

    Shape:
        - x: ``[B, C, H, W]`` clean images in [0, 1].
        - latents: a list of ``[B, *s]`` for ``s`` in ``flow.latent_shapes``.
        - delta: ``[B, C, H, W]`` with ``|delta| <= eps`` (L-inf) or ``||delta||_2 <= eps``
          (L2) and ``x + delta`` in [0, 1].

    Example::
        >>> g = MCGGenerator(GeneratorConfig(shape=(3, 32, 32), eps=8 / 255))
        >>> delta = g.sample(x, torch.Generator().manual_seed(0))
        >>> bits = g.nll(x, delta_transfer)     # stage 1's loss, bits per dimension [B]
    """

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.flow = CGlow(cfg.flow_shape, cfg.shape[0], cfg.levels, cfg.steps, cfg.hidden,
                          cfg.x_hidden_channels, cfg.x_hidden_size)
        if cfg.subspace is not None:
            _, h, w = cfg.shape
            self.register_buffer("dct_h", dct_matrix(h)[:cfg.subspace], persistent=False)  # [s, H]
            self.register_buffer("dct_w", dct_matrix(w)[:cfg.subspace], persistent=False)  # [s, W]

    # ---- the bounding: flow space <-> perturbations ----
    def squash(self, w: torch.Tensor) -> torch.Tensor:
        """Pixel-space ``w [B, C, H, W]`` -> ``delta / eps`` in the unit ball."""
        flat = w.flatten(1)
        if self.cfg.norm == "linf":
            v = torch.tanh(flat) if self.cfg.bound == "tanh" else flat.clamp(-1, 1)
        else:
            r = flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
            v = flat * (torch.tanh(r) / r if self.cfg.bound == "tanh" else 1 / r.clamp_min(1))
        return v.view_as(w)

    def unsquash(self, v: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`squash` on ``v = delta / eps``, with ``tanh`` targets pulled
        ``squash_margin`` inside the bound first (``atanh(1)`` is infinite)."""
        if self.cfg.bound == "clamp":
            return v
        top = 1 - self.cfg.squash_margin
        if self.cfg.norm == "linf":
            return torch.atanh(v.clamp(-top, top))
        flat = v.flatten(1)
        r = flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (flat * torch.atanh(r.clamp_max(top)) / r).view_as(v)

    def to_pixels(self, u: torch.Tensor) -> torch.Tensor:
        """Flow space -> pixel space: the zero-padded inverse DCT of the low-frequency block
        (identity without a subspace). The released code uses the 3-D DCT over channels too;
        keeping every channel frequency, that differs from this 2-D one by a fixed orthogonal
        channel mixing, which the flow's 1x1 convolutions can absorb."""
        if self.cfg.subspace is None:
            return u
        return self.dct_h.T @ u @ self.dct_w

    def to_flow(self, w: torch.Tensor) -> torch.Tensor:
        """Pixel space -> flow space: the low-frequency DCT block (a projection: the rest is lost)."""
        if self.cfg.subspace is None:
            return w
        return self.dct_h @ w @ self.dct_w.T

    def bound(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The perturbation ``delta`` for flow-space ``u``: to pixels, bounded to the eps-ball,
        then to the box. Every stage calls this."""
        delta = self.cfg.eps * self.squash(self.to_pixels(u))
        return (x + delta).clamp(0, 1) - x

    def unbound(self, delta: torch.Tensor) -> torch.Tensor:
        """Flow-space ``u`` with ``bound(u, x) ~= delta`` (exact inside the box and the margin,
        without a subspace)."""
        return self.to_flow(self.unsquash(delta / self.cfg.eps))

    # ---- the generator ----
    def decode(self, latents: Latents, x: torch.Tensor) -> torch.Tensor:
        """``delta [B, C, H, W]`` for ``latents`` given ``x``."""
        return self.bound(self.flow.inverse(latents, x), x)

    def encode(self, x: torch.Tensor, delta: torch.Tensor) -> Latents:
        """The latents of ``delta`` given ``x`` (the flow's forward direction)."""
        return self.flow(self.unbound(delta), x)[0]

    def sample_latents(self, x: torch.Tensor, generator: torch.Generator, temperature: float = 1.0) -> Latents:
        return self.flow.sample_latents(x.shape[0], generator, x.device, temperature)

    def sample(self, x: torch.Tensor, generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
        """One perturbation per image from the prior (``delta [B, C, H, W]``)."""
        return self.decode(self.sample_latents(x, generator, temperature), x)

    def nll(self, x: torch.Tensor, delta: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Stage 1's loss: ``-log p(u | x)`` of the encoded ``delta`` in bits per flow dimension
        ``[B]``, with optional ``noise`` (shaped like ``u``) added to ``u`` first. Measured in the
        flow's space: the change of variables to ``delta`` adds a term that does not depend on
        the generator's weights."""
        u = self.unbound(delta)
        if noise is not None:
            u = u + noise
        return -self.flow.log_prob(u, x) / (u[0].numel() * math.log(2))


__all__ = ["Latents", "MCGGenerator", "dct_matrix"]
