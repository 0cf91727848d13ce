"""PNODE (Pandey et al., MICCAI 2022): PANet's prototype head on encoder features evolved by a
neural ODE (dopri5, rtol = atol = 1e-3, t in [0, 4], back-propagated through the solver),
trained with the query CE only (no alignment loss, as the reference)."""

from __future__ import annotations

from metarobust.training.recipes.base import register_recipe
from metarobust.training.recipes.seg_base import SegRecipe


@register_recipe("seg_pnode", "PNODE (Pandey et al. 2022): neural-ODE features + prototype head, CE")
class SegPNODE(SegRecipe):
    ode = True

    def loss(self, models, batch, ctx):
        model = models["model"]
        out = self.segment(model, batch)
        return self.ce(out, batch), self.stats(out, batch, model)
