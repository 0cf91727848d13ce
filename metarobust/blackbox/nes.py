"""NES gradient estimation with projected sign steps (Ilyas et al., ICML 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metarobust.blackbox.base import BLACKBOX_ATTACKS, Goal, QueryAttack, affordable, draw
from metarobust.blackbox.oracle import Oracle


@dataclass(frozen=True)
class NES(QueryAttack):
    r"""NES in 'Black-box Adversarial Attacks with Limited Queries and Information' (Ilyas,
    Engstrom, Athalye & Lin, ICML 2018) [https://arxiv.org/abs/1804.08598]
    [https://github.com/labsix/limited-blackbox-attacks].

    Distance Measure : Linf (the paper's) or L2

    Each step estimates the gradient of the loss with ``samples`` Gaussian probes ``x +- sigma u``
    in antithetic pairs (natural evolution strategies, the paper's Algorithm 1) and takes a
    projected step of ``lr`` along its sign (L-inf) or its direction (L2). ``samples`` queries for
    the estimate plus one to check the new iterate: ``samples + 1`` a step, plus the first query
    (of the clean image; seeded: of ``x + init``, the starting iterate).

    Arguments (the paper's ImageNet settings):
        norm (str): ``"linf"`` or ``"l2"``.
        eps (float): radius of the ball.
        sigma (float): search variance. (Default: 0.001)
        samples (int): probes per estimate, even (antithetic pairs). (Default: 50)
        lr (float or None): step; ``None``: 0.01 (L-inf, the paper's), ``eps / 5`` (L2).
        loss (str): ``"ce"``. (Default: ``"ce"``)

    Examples::
        >>> outcome = NES("linf", eps=8/255)(oracle, x, y, generator)
    """

    norm: str = "linf"
    eps: float = 8 / 255
    sigma: float = 0.001
    samples: int = 50
    lr: float | None = None
    loss: str = "ce"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.samples < 2 or self.samples % 2:
            raise ValueError(f"NES samples={self.samples} must be even and >= 2 (antithetic pairs)")

    def attack(self, oracle: Oracle, x: torch.Tensor, goal: Goal, generator: torch.Generator,
               init: torch.Tensor | None):
        b = x.shape[0]
        lr = self.lr if self.lr is not None else (0.01 if self.norm == "linf" else self.eps / 5)
        half = self.samples // 2
        every = torch.arange(b, device=x.device)
        delta = None if init is None else self.project(x, init)
        x_real = x.clone() if delta is None else x + delta  # the iterate; x_adv: the (snapped) point sent
        x_adv, _, success = self.first_query(oracle, x, goal, delta)
        while True:
            active = affordable(oracle, ~success, self.samples + 1)
            if not active.any():
                break
            idx = every[active]
            xa = x_real[idx]
            m = idx.numel()
            u = draw(generator, (half, *xa.shape), x.device)
            u = torch.cat([u, -u])  # antithetic: [samples, M, C, H, W]
            probes = (xa.unsqueeze(0) + self.sigma * u).clamp(0, 1).flatten(0, 1)
            values, _ = self.losses(oracle, probes, idx.repeat(self.samples), goal)
            g = (values.view(self.samples, m, 1, 1, 1) * u).mean(0) / self.sigma
            direction = g.sign() if self.norm == "linf" else g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            xa = x[idx] + self.project(x[idx], xa + lr * direction - x[idx])
            sent = self.snap(oracle, x[idx], xa - x[idx])
            _, won = self.losses(oracle, sent, idx, goal)
            x_real[idx], x_adv[idx], success[idx] = xa, sent, won
        return x_adv, success


@BLACKBOX_ATTACKS.register("nes", "NES (Ilyas et al. 2018): 50 antithetic Gaussian probes, sigma 0.001, "
                                  "projected sign steps; Linf (paper) or L2")
def _nes(norm: str, eps: float, **params) -> NES:
    return NES(norm, eps, **params)
