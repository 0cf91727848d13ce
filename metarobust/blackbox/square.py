"""The Square attack (Andriushchenko et al., ECCV 2020) behind the oracle, with the paper's defaults."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metarobust.attacks.square import Square, p_selection
from metarobust.blackbox.base import BLACKBOX_ATTACKS, Goal, QueryAttack, affordable
from metarobust.blackbox.oracle import Oracle


@dataclass(frozen=True)
class QuerySquare(QueryAttack):
    r"""Square Attack in 'Square Attack: a query-efficient black-box adversarial attack via random
    search' (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020) [https://arxiv.org/abs/1912.00049]
    [https://github.com/max-andr/square-attack], as a query attack: per-example budgets from the
    oracle, early stop at the first paid query that fools, points on the oracle's grid.

    Distance Measure : Linf, L2

    The search steps are those of the white-box-convention :class:`metarobust.attacks.Square`
    (its :meth:`~metarobust.attacks.Square.start` and :meth:`~metarobust.attacks.Square.propose`,
    verified against AutoAttack's ``SquareAttack``): from a point on the boundary of the ball
    (L-inf vertical stripes of ``+-eps``, L2 a grid of ``eta`` profiles; seeded: ``x + init``),
    each iteration changes one square window whose area is a fraction ``p`` of the image (``p``
    halved on the reference's schedule from ``p_init``) and keeps the change if it raises the
    loss or fools the target. One query for the starting point, then one per iteration while
    the example runs. Here the objective is :func:`~metarobust.blackbox.base.score_loss`'s margin
    on log-probabilities, the logit margin of the reference (targeted: the target's margin over
    the best other class).

    Arguments (the paper's):
        norm (str): ``"linf"`` or ``"l2"``.
        eps (float): radius of the ball.
        p_init (float or None): the initial fraction of pixels a square covers; ``None``: 0.05
            (L-inf) or 0.1 (L2), the paper's (AutoAttack uses 0.8 with 5000 queries).
        loss (str): ``"margin"`` (the paper's untargeted loss) or ``"ce"``. (Default: ``"margin"``)
        rescale_schedule (bool): stretch ``p``'s schedule from the paper's 10,000 iterations to
            the oracle's largest budget. (Default: False: the schedule of 10,000 queries)
        schedule_offset (int): iterations ``p``'s schedule is shifted by (MCG's seeded Square:
            500, META.md 3.4 step 5: smaller squares around a good start). (Default: 0)

    Examples::
        >>> outcome = QuerySquare("linf", eps=8/255)(oracle, x, y, generator)
    """

    norm: str = "linf"
    eps: float = 8 / 255
    p_init: float | None = None
    loss: str = "margin"
    rescale_schedule: bool = False
    schedule_offset: int = 0

    def attack(self, oracle: Oracle, x: torch.Tensor, goal: Goal, generator: torch.Generator,
               init: torch.Tensor | None):
        b = x.shape[0]
        p_init = self.p_init if self.p_init is not None else (0.05 if self.norm == "linf" else 0.1)
        steps = Square(self.norm, self.eps, p_init=p_init)
        # one key per example: its squares come from a counter-based stream (any batch, any order)
        keys = torch.randint(0, 2 ** 31 - 1, (b,), generator=generator, device=generator.device).to(x.device)
        delta = self.project(x, init if init is not None else steps.start(x, keys, 0, self.eps) - x)
        x_best, best, success = self.first_query(oracle, x, goal, delta)
        horizon = max(int(oracle.budget.max()), 1)
        every = torch.arange(b, device=x.device)
        i = 0  # every running example has run every iteration so far: i is its own iteration
        while True:
            active = affordable(oracle, ~success, 1)
            if not active.any():
                break
            idx = every[active]
            p = p_selection(p_init, i + self.schedule_offset, horizon, self.rescale_schedule)
            candidate = steps.propose(x[idx], x_best[idx], keys[idx], 1 + i, p, self.eps)
            points = self.point(oracle, x[idx], candidate - x[idx])
            value, won = self.losses(oracle, points, idx, goal)
            keep = (value > best[idx]) | won
            kept = idx[keep]
            x_best[kept], best[kept], success[kept] = points[keep], value[keep], won[keep]
            i += 1
        return x_best, success


@BLACKBOX_ATTACKS.register("square", "Square (Andriushchenko et al. 2020): random search over squares, "
                                     "p_init 0.05 (Linf) / 0.1 (L2), margin loss, 1 query a step; Linf or L2")
def _square(norm: str, eps: float, **params) -> QuerySquare:
    return QuerySquare(norm, eps, **params)
