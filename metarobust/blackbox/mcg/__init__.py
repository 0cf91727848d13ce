"""MCG: a meta-learned conditional generator that proposes the first query of a black-box attack.

Yin et al., "Generalizable Black-Box Adversarial Attack with Meta Learning", TPAMI
(arXiv 2301.00364); the specification is META.md section 3, the guide docs/blackbox.md.

    >>> from metarobust.blackbox.mcg import GeneratorConfig, MCGConfig, MCGGenerator
    >>> g = MCGGenerator(GeneratorConfig(shape=(3, 32, 32), norm="linf", eps=8 / 255))
    >>> xs, deltas, _ = transfer_pairs(surrogate, x, y, "linf", 8 / 255)   # stage 1's data
    >>> pretrain(g, xs, deltas, MCGConfig(), rng)                          # stage 1
    >>> meta_train(g, [surrogate], x, y, MCGConfig(), rng)                  # stage 2
    >>> mcg = MCGAttack("linf", 8 / 255, g, [copy.deepcopy(surrogate)])    # attack time
    >>> proposal = mcg.propose(oracle, x, y, rng)      # one charged query per example
    >>> proposal.delta, proposal.success               # the seed of the next attack, FASR
"""

from __future__ import annotations

from metarobust.blackbox.mcg.config import GeneratorConfig, MCGConfig
from metarobust.blackbox.mcg.flow import CGlow
from metarobust.blackbox.mcg.generator import MCGGenerator
from metarobust.blackbox.mcg.propose import History, MCGAttack, Proposal, SurrogateRefresh, mcg_propose
from metarobust.blackbox.mcg.training import (
                                              interpolate_,
                                              margin_loss,
                                              meta_train,
                                              pretrain,
                                              reptile_task,
                                              transfer_pairs,
)

__all__ = ["CGlow", "GeneratorConfig", "History", "MCGAttack", "MCGConfig", "MCGGenerator", "Proposal",
           "SurrogateRefresh", "interpolate_", "margin_loss", "mcg_propose", "meta_train", "pretrain", "reptile_task",
           "transfer_pairs"]
