"""R-MAML (Wang, Xu, Liu, Chen, Wang & Hero, "On Fast Adversarial Robustness Adaptation in
Model-Agnostic Meta-Learning", ICLR 2021, arXiv 2102.10454)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from metarobust.config import check_value, config_section
from metarobust.meta.execution import TaskFn
from metarobust.meta.maml import MAML
from metarobust.training import objectives
from metarobust.training.objectives import ROBUST_FORMS
from metarobust.training.recipes.adversarial_querying import noise_of
from metarobust.training.recipes.base import MetaRecipe, register_recipe


@config_section("robust")
@dataclass
class RobustConfig:
    """The robustness regulariser of ``r_maml``, ``its_maml`` (and the weight of ``trades_maml``)."""

    form: str = "trades"
    """``trades``: KL(p_clean || p_adv); ``ce``: cross-entropy on the adversarial query."""
    weight: float = 5.0
    """lambda / beta of the regulariser (R-MAML-TRADES on Omniglot: 5)."""
    placement: str = "out"
    """``out``: in the meta-update only (R-MAML_out); ``in``: also in the inner loop, on the
    support set attacked at every inner step (R-MAML_both)."""
    inner_weight: float | None = None
    """Weight of the inner-loop term with ``placement=in``; ``None``: ``weight``."""
    kl_batch: str = "task"
    """``trades_maml`` only: the points of task i's KL term. ``task``: task i's support and query;
    ``meta_batch``: every task's support and query, at task i's fast weights, as R-MAML's
    TRADES reference code builds it (single process only)."""

    def check(self) -> None:
        check_value(self.form in ROBUST_FORMS, "robust.form", self.form, "trades or ce")
        check_value(self.placement in ("out", "in"), "robust.placement", self.placement,
                    "out (meta-update only, R-MAML_out) or in (inner loop too, R-MAML_both)")
        check_value(self.inner_weight is None or self.inner_weight >= 0, "robust.inner_weight",
                    self.inner_weight, "a weight >= 0, or null for robust.weight")
        check_value(self.weight >= 0, "robust.weight", self.weight, "a weight >= 0")
        check_value(self.kl_batch in ("task", "meta_batch"), "robust.kl_batch", self.kl_batch,
                    "task (task i's support and query) or meta_batch (every task's, as the reference code)")


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
