"""R-MAML (Wang, Xu, Liu, Chen, Wang & Hero, "On Fast Adversarial Robustness Adaptation in
Model-Agnostic Meta-Learning", ICLR 2021, arXiv 2102.10454)."""

from __future__ import annotations

from collections.abc import Callable

from metarobust.meta.execution import TaskFn
from metarobust.meta.maml import MAML
from metarobust.training import objectives
from metarobust.training.recipes.adversarial_querying import noise_of
from metarobust.training.recipes.base import MetaRecipe, register_recipe


@register_recipe("r_maml", "R-MAML (Wang et al. 2021): clean CE + robust.weight x (TRADES-KL or adversarial CE); "
                           "robust.placement=out: meta-update only (R-MAML_out), in: inner loop too (R-MAML_both)")
class RMAML(MetaRecipe):
    """Meta-objective ``CE(query) + weight x R(query)`` at the adapted weights (eq. 3), R the
    TRADES KL (``robust.form=trades``) or the adversarial CE (``ce``). ``robust.placement=out``:
    clean inner loop (R-MAML_out, the paper's recommendation); ``in``: each inner step also
    descends ``CE + inner_weight x R`` on the support attacked against the current fast weights
    (R-MAML_both)."""

    def noise_keys(self) -> tuple[str, ...]:
        return ("query", "support_steps") if self.cfg.robust.placement == "in" else ("query",)

    def task(self, maml: MAML, attack: Callable) -> TaskFn:
        robust = self.cfg.robust
        form, weight, placement = robust.form, robust.weight, robust.placement
        inner_weight = weight if robust.inner_weight is None else robust.inner_weight

        def task(params, sx, sy, qx, qy, noise):
            step_loss = None
            if placement == "in":
                step_loss = objectives.robust_step_loss(maml.forward, sx, sy, attack,
                                                        noise_of(noise, "support_steps"), form, inner_weight)
            fast = maml.adapt(params, sx, sy, step_loss=step_loss)
            return objectives.robust_regularised(maml.forward, fast, qx, qy, attack, noise_of(noise, "query"),
                                                 form, weight)

        return task


__all__ = ["RMAML"]
