"""PANet (Wang et al., ICCV 2019), the few-shot segmentation baseline of PNODE: shared encoder,
masked-average-pooled fg/bg prototypes, 20 x cosine segmentation, CE plus the
prototype-alignment loss (weight ``seg.align_weight``, 1 in PANet)."""

from __future__ import annotations

from metarobust.segmentation.prototypes import alignment_loss
from metarobust.training.recipes.base import register_recipe
from metarobust.training.recipes.seg_base import SegRecipe


@register_recipe("seg_panet", "PANet (Wang et al. 2019): prototype segmentation, CE + prototype alignment")
class SegPANet(SegRecipe):
    def loss(self, models, batch, ctx):
        return self.objective(models["model"], batch)

    def objective(self, model, batch, support_x=None, query_x=None):
        """PANet's loss on ``batch`` (its support or query replaced by ``support_x``/``query_x``):
        CE of the query, plus the prototype alignment weighted by ``seg.align_weight``."""
        out = self.segment(model, batch, support_x, query_x)
        loss = self.ce(out, batch)
        w = self.cfg.seg.align_weight
        if w:
            loss = loss + w * alignment_loss(out["query_features"], out["logits"], out["support_features"],
                                             batch.support_mask, model.scale)
        return loss, self.stats(out, batch, model)
