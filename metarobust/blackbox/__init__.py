"""Query-based black-box attacks behind an :class:`Oracle` (``metarobust blackbox``, docs/blackbox.md).

    >>> from metarobust.blackbox import Oracle, build_blackbox_attack
    >>> oracle = Oracle(model, budget=1000, examples=len(x), output="probs", levels=256)
    >>> outcome = build_blackbox_attack("signhunter", "linf", 8/255)(oracle, x, y)
    >>> outcome.queries, outcome.success, oracle.verify(outcome.x_adv, y)
"""

from __future__ import annotations

from metarobust.blackbox import bandits, cg, nes, signhunter, simba, square  # noqa: F401  (each registers its attacks)
from metarobust.blackbox.bandits import Bandits
from metarobust.blackbox.base import BLACKBOX_ATTACKS, Outcome, QueryAttack
from metarobust.blackbox.cg import CGAttack
from metarobust.blackbox.nes import NES
from metarobust.blackbox.oracle import Oracle, QueryBudgetExceeded
from metarobust.blackbox.signhunter import SignHunter
from metarobust.blackbox.simba import SimBA
from metarobust.blackbox.square import QuerySquare


def build_blackbox_attack(name: str, norm: str, eps: float, **params) -> QueryAttack:
    """The black-box attack ``name`` (``metarobust list attacks``) with its paper's defaults,
    ``params`` overriding them."""
    return BLACKBOX_ATTACKS.get(name, "blackbox.attacks")(norm, eps, **params)


__all__ = ["BLACKBOX_ATTACKS", "NES", "Bandits", "CGAttack", "Oracle", "Outcome", "QueryAttack", "QueryBudgetExceeded",
           "QuerySquare", "SignHunter", "SimBA", "build_blackbox_attack"]
