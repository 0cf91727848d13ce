"""ADML (Yin, Tang, Xu, Zhou & Yuille, "Adversarial Meta-Learning", arXiv 1806.03316), as
re-implemented in the AQ code (``shared/methods/META.md`` 2.1)."""

from __future__ import annotations

from collections.abc import Callable

from metarobust.meta.execution import TaskFn
from metarobust.meta.maml import MAML
from metarobust.training import objectives
from metarobust.training.recipes.adversarial_querying import noise_of
from metarobust.training.recipes.base import MetaRecipe, register_recipe


@register_recipe("adml", "ADML (Yin et al. 2018): adapt on clean and on adversarial support, score each on the "
                         "opposite query (clean-adapted on attacked query, adversarially adapted on clean)")
class ADML(MetaRecipe):
    """Two inner trajectories per task: on the clean support, and on the support attacked again
    at every inner step; the meta-loss is ``1/2 [CE(adv-adapted, clean query) + CE(clean-adapted,
    attacked query)]`` (:func:`~metarobust.training.objectives.adml_cross`)."""

    noise = ("query", "support_steps")

    def task(self, maml: MAML, attack: Callable) -> TaskFn:
        def task(params, sx, sy, qx, qy, noise):
            clean_fast = maml.adapt(params, sx, sy)
            attacked = objectives.adversarial_step_loss(maml.forward, sx, sy, attack, noise_of(noise, "support_steps"))
            adv_fast = maml.adapt(params, sx, sy, step_loss=attacked)
            return objectives.adml_cross(maml.forward, clean_fast, adv_fast, qx, qy, attack, noise_of(noise, "query"))

        return task


__all__ = ["ADML"]
