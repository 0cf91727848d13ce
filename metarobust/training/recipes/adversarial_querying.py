"""Adversarial querying (Goldblum, Fowl & Goldstein, "Adversarially Robust Few-Shot Learning: A
Meta-Learning Approach", NeurIPS 2020, arXiv 1910.00982)."""

from __future__ import annotations

from collections.abc import Callable

from metarobust.meta.execution import TaskFn
from metarobust.meta.maml import MAML
from metarobust.training import objectives
from metarobust.training.recipes.base import MetaRecipe, register_recipe


@register_recipe("adversarial_querying",
                 "AQ (Goldblum et al. 2020): clean inner loop, CE on the query attacked through the fast weights")
class AdversarialQuerying(MetaRecipe):
    """Clean inner loop; the meta-loss is the cross-entropy of the query attacked
    (``train_attack``) through the adapted weights only. The clean query is not trained on."""

    noise = ("query",)

    def task(self, maml: MAML, attack: Callable) -> TaskFn:
        def task(params, sx, sy, qx, qy, noise):
            fast = maml.adapt(params, sx, sy)
            return objectives.adversarial_ce(maml.forward, fast, qx, qy, attack, noise_of(noise, "query"))

        return task


def noise_of(noise, key: str):
    """One kind of noise from a task's noise dict (``None`` when the batch drew none)."""
    return None if noise is None else noise.get(key)


__all__ = ["AdversarialQuerying", "noise_of"]
