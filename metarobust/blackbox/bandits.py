"""Bandits-TD (Ilyas, Engstrom & Madry, ICLR 2019), batched with per-example budgets."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metarobust.blackbox.base import BLACKBOX_ATTACKS, Goal, QueryAttack, affordable, draw
from metarobust.blackbox.oracle import Oracle


def _l2(t: torch.Tensor) -> torch.Tensor:
    n = t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))
    return n + (n == 0).to(t.dtype)  # the reference's guard against a zero vector


def eg_step(prior: torch.Tensor, g: torch.Tensor, lr: float) -> torch.Tensor:
    """The exponentiated-gradient step on a prior in [-1, 1] (the reference's ``eg_step``,
    ``2 pos / (pos + neg) - 1`` with ``pos = (1 + prior) / 2 exp(lr g)``, ``neg = (1 - prior) / 2
    exp(-lr g)``), written as the equal ``tanh(lr g + atanh(prior))``, whose ``exp`` cannot
    overflow to ``inf / inf`` when ``lr g`` is large (a targeted loss ``log p_t`` far from 0)."""
    return torch.tanh(lr * g + torch.atanh(prior))


@dataclass(frozen=True)
class Bandits(QueryAttack):
    r"""Bandits-TD in 'Prior convictions: Black-box adversarial attacks with bandits and priors'
    (Ilyas, Engstrom & Madry, ICLR 2019) [https://arxiv.org/abs/1807.07978]
    [https://github.com/MadryLab/blackbox-bandits].

    Distance Measure : Linf or L2

    A gradient prior ``v`` (time prior: kept across steps; data prior: ``tile x tile`` tiles, a
    prior of side ``ceil(H / tile)`` upsampled) is refined by two antithetic finite-difference
    probes along ``v +- exploration u`` per step (2 queries) and followed by a signed (L-inf) or
    normalised (L2) image step, projected onto the ball and the box. The new iterate is
    queried to see whether it already fools the target (1 query; the reference checks it with an
    uncounted forward): 3 queries a step, plus the first query of the clean image. Seeded, the
    first query and the iterate start at ``x + init``, and the prior at ``init / eps`` averaged
    over each tile (L-inf: clipped into (-1, 1), the domain of the exponentiated gradient).

    Arguments (the paper's Table 6, ImageNet; ``None`` picks the norm's):
        norm (str): ``"linf"`` or ``"l2"``.
        eps (float): radius of the ball.
        fd_eta (float): finite-difference probe length (L-inf 0.1, L2 0.01).
        image_lr (float): image step (L-inf 0.01, L2 0.5).
        online_lr (float): prior step (L-inf 100 by exponentiated gradient, L2 0.1).
        exploration (float): prior exploration ``delta`` (L-inf 1.0, L2 0.01).
        tile (int): data-prior tile side in pixels. (Default: 6)
        loss (str): ``"ce"`` (the reference's). (Default: ``"ce"``)

    Examples::
        >>> outcome = Bandits("linf", eps=8/255)(oracle, x, y, generator)
    """

    norm: str = "linf"
    eps: float = 8 / 255
    fd_eta: float | None = None
    image_lr: float | None = None
    online_lr: float | None = None
    exploration: float | None = None
    tile: int = 6
    loss: str = "ce"

    def _param(self, name: str) -> float:
        defaults = {"linf": {"fd_eta": 0.1, "image_lr": 0.01, "online_lr": 100.0, "exploration": 1.0},
                    "l2": {"fd_eta": 0.01, "image_lr": 0.5, "online_lr": 0.1, "exploration": 0.01}}
        value = getattr(self, name)
        return defaults[self.norm][name] if value is None else value

    def attack(self, oracle: Oracle, x: torch.Tensor, goal: Goal, generator: torch.Generator,
               init: torch.Tensor | None):
        b, c, h, w = x.shape
        fd_eta, image_lr = self._param("fd_eta"), self._param("image_lr")
        online_lr, exploration = self._param("online_lr"), self._param("exploration")
        side = (math.ceil(h / self.tile), math.ceil(w / self.tile))
        every = torch.arange(b, device=x.device)

        def up(t):
            return F.interpolate(t, size=(h, w), mode="nearest")

        prior = torch.zeros(b, c, *side, device=x.device)
        x_real = x.clone()  # the iterate; x_adv: the (snapped) point sent
        if init is not None:  # the seed is both the start and the first belief about the gradient
            x_real = x + self.project(x, init)
            prior = F.adaptive_avg_pool2d(init / max(self.eps, 1e-12), side)
            if self.norm == "linf":  # in (-1, 1): the exponentiated-gradient step never leaves +-1
                prior = prior.clamp(-1 + 1e-3, 1 - 1e-3)
        x_adv, _, success = self.first_query(oracle, x, goal, x_real - x)
        dim = prior[0].numel()
        while True:
            active = affordable(oracle, ~success, 3)
            if not active.any():
                break
            idx = every[active]
            pr, xa = prior[idx], x_real[idx]
            noise = exploration * draw(generator, pr.shape, x.device) / math.sqrt(dim)
            q1, q2 = up(pr + noise), up(pr - noise)
            probes = torch.cat([(xa + fd_eta * q1 / _l2(q1)).clamp(0, 1), (xa + fd_eta * q2 / _l2(q2)).clamp(0, 1)])
            values, _ = self.losses(oracle, probes, idx.repeat(2), goal)
            l1, l2 = values.chunk(2)
            g = ((l1 - l2) / (fd_eta * exploration)).view(-1, 1, 1, 1) * noise
            pr = eg_step(pr, g, online_lr) if self.norm == "linf" else pr + online_lr * g
            step = up(pr)
            step = step.sign() if self.norm == "linf" else step / _l2(step)
            xa = x[idx] + self.project(x[idx], xa + image_lr * step - x[idx])
            sent = self.snap(oracle, x[idx], xa - x[idx])
            _, won = self.losses(oracle, sent, idx, goal)
            prior[idx], x_real[idx], x_adv[idx], success[idx] = pr, xa, sent, won
        return x_adv, success


@BLACKBOX_ATTACKS.register("bandits", "Bandits-TD (Ilyas et al. 2019): time and data (tile) priors, "
                                      "3 queries a step; Linf or L2")
def _bandits(norm: str, eps: float, **params) -> Bandits:
    return Bandits(norm, eps, **params)
