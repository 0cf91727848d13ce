"""MAML (Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", ICML 2017, arXiv 1703.03400): the clean baseline of every robust meta-learner."""

from __future__ import annotations

from collections.abc import Callable

from metarobust.meta.execution import TaskFn
from metarobust.meta.maml import MAML
from metarobust.training import objectives
from metarobust.training.recipes.base import MetaRecipe, register_recipe


@register_recipe("maml", "MAML (Finn et al. 2017): clean inner loop, clean query CE; no robustness")
class MAMLRecipe(MetaRecipe):
    """``meta.inner_steps`` clean SGD steps on the support set, cross-entropy of the clean query
    at the adapted weights (second order unless ``meta.first_order``).

    Example:
        >>> cfg = load_config("configs/meta/omniglot_maml.yaml", ["data.root=../shared/data/omniglot"])
        >>> summary = train_and_evaluate(cfg)
    """

    def task(self, maml: MAML, attack: Callable) -> TaskFn:
        def task(params, sx, sy, qx, qy, noise):
            fast = maml.adapt(params, sx, sy)
            return objectives.clean_ce(maml.forward, fast, qx, qy)

        return task


__all__ = ["MAMLRecipe"]
