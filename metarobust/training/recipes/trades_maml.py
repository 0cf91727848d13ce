"""TRADES-regularised MAML: the TRADES baseline of R-MAML (Wang et al., ICLR 2021; META.md 2.3)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from metarobust.meta.execution import TaskFn
from metarobust.meta.maml import MAML
from metarobust.training import objectives
from metarobust.training.recipes.adversarial_querying import noise_of
from metarobust.training.recipes.base import MetaRecipe, register_recipe


@register_recipe("trades_maml", "TRADES-MAML (R-MAML's TRADES baseline): clean query CE + robust.weight x "
                                "KL(p_clean || p_adv) over support and query at the adapted weights")
class TRADESMAML(MetaRecipe):
    """Clean inner loop; meta-loss ``CE(query) + robust.weight x KL(p_clean || p_adv)`` over the
    support and the query together (:func:`~metarobust.training.objectives.trades_support_query`)."""

    noise = ("query", "support")

    def task(self, maml: MAML, attack: Callable) -> TaskFn:
        weight = self.cfg.robust.weight

        def task(params, sx, sy, qx, qy, noise):
            fast = maml.adapt(params, sx, sy)
            query, support = noise_of(noise, "query"), noise_of(noise, "support")
            both = None if query is None else torch.cat([support, query])
            return objectives.trades_support_query(maml.forward, fast, sx, sy, qx, qy, attack, both, weight)

        return task


__all__ = ["TRADESMAML"]
