"""SignHunter (Al-Dujaili & O'Reilly, ICLR 2020), batched with per-example budgets."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from metarobust.blackbox.base import BLACKBOX_ATTACKS, Goal, QueryAttack, affordable
from metarobust.blackbox.oracle import Oracle


@dataclass(frozen=True)
class SignHunter(QueryAttack):
    r"""SignHunter in 'Sign Bits Are All You Need for Black-Box Attacks' (Al-Dujaili &
    O'Reilly, ICLR 2020) [https://openreview.net/forum?id=SygW0TEFwH]
    [https://github.com/ash-aldujaili/blackbox-adv-examples-signhunter].

    Distance Measure : Linf (the paper's) or L2

    Searches the sign vector ``s`` of the perturbation (``x + eps s``, L2: ``x + eps s /
    sqrt(n)``) by divide and conquer: start from all ones (seeded: from ``sign(init)``, a zero
    keeping +1); at level ``h`` the ``n`` coordinates (flattened) are cut into ``2^h`` chunks and
    each chunk's signs are flipped in turn, the flip kept if the loss rises. After the finest
    level the search starts again at level 0. One query per flip, plus the first query of the
    starting point ``x + eps`` (seeded: ``x + eps sign(init)``). (The released code counted each
    query twice, MCG's META.md 3.6; here every image counts once.)

    Arguments:
        norm (str): ``"linf"`` or ``"l2"``.
        eps (float): radius of the ball.
        loss (str): ``"ce"`` (the paper's untargeted loss; targeted: ``log p_t``). (Default: ``"ce"``)

    Examples::
        >>> outcome = SignHunter("linf", eps=8/255)(oracle, x, y)
    """

    norm: str = "linf"
    eps: float = 8 / 255
    loss: str = "ce"

    def attack(self, oracle: Oracle, x: torch.Tensor, goal: Goal, generator: torch.Generator,
               init: torch.Tensor | None):
        b = x.shape[0]
        n = x[0].numel()
        scale = self.eps if self.norm == "linf" else self.eps / math.sqrt(n)
        every = torch.arange(b, device=x.device)
        signs = torch.ones(b, n, device=x.device)
        if init is not None:  # the seed's signs; a zero coordinate keeps the paper's +1
            signs = torch.where(init.flatten(1) < 0, -1.0, 1.0)
        x_adv, best, success = self.first_query(oracle, x, goal, self.project(x, scale * signs.view_as(x)))
        levels = math.ceil(math.log2(n)) + 1
        h, i = 0, 0  # every example flips the same chunk at the same step
        while True:
            active = affordable(oracle, ~success, 1)
            if not active.any():
                break
            chunk = math.ceil(n / 2 ** h)
            lo, hi = i * chunk, min((i + 1) * chunk, n)
            idx = every[active]
            trial = signs[idx].clone()
            trial[:, lo:hi] *= -1
            points = self.point(oracle, x[idx], scale * trial.view_as(x[idx]))
            value, won = self.losses(oracle, points, idx, goal)
            better = value > best[idx]
            keep = idx[better]
            signs[keep], x_adv[keep] = trial[better], points[better]
            best[keep], success[keep] = value[better], won[better]
            i += 1
            if i * chunk >= n:  # the level is done: go finer, or start over after the finest
                h, i = (h + 1) % levels, 0
        return x_adv, success


@BLACKBOX_ATTACKS.register("signhunter", "SignHunter (Al-Dujaili & O'Reilly 2020): divide-and-conquer "
                                         "sign flips, 1 query each; Linf (paper) or L2")
def _signhunter(norm: str, eps: float, **params) -> SignHunter:
    return SignHunter(norm, eps, **params)
