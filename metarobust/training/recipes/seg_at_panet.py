"""AT-PANet, PNODE's adversarially trained baseline (``META.md`` 4.2): each iteration makes FGSM
(eps ``seg.at_eps`` = 0.04) versions of the support and the query with the iteration's starting
weights, then takes three optimiser steps: on (clean query, clean support), (clean query,
adversarial support) and (adversarial query, clean support). The three steps are the engine's
replays of one batch."""

from __future__ import annotations

from metarobust.segmentation.attacks import SegAttack
from metarobust.training.recipes.base import register_recipe
from metarobust.training.recipes.seg_panet import SegPANet


@register_recipe("seg_at_panet", "AT-PANet: PANet with FGSM (eps 0.04) support and query, 3 steps per iteration")
class SegATPANet(SegPANet):
    def __init__(self, cfg):
        super().__init__(cfg)
        self._adv = None

    @property
    def replays(self) -> int:
        return 3

    def loss(self, models, batch, ctx):
        model = models["model"]
        if ctx.replay == 0:  # the adversarial inputs of this iteration, at its starting weights
            eps = self.cfg.seg.at_eps
            raw = models.raw["model"]
            sq = (batch.support_x, batch.support_mask, batch.query_x, batch.query_mask)
            adv_s, _ = SegAttack("fgsm", eps, "support")(raw, *sq, ctx.generator)
            _, adv_q = SegAttack("fgsm", eps, "query")(raw, *sq, ctx.generator)
            self._adv = (adv_s, adv_q)
        adv_s, adv_q = self._adv
        support_x, query_x = [(None, None), (adv_s, None), (None, adv_q)][ctx.replay]
        return self.objective(model, batch, support_x, query_x)
