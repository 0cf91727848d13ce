"""Recipes: named bundles of learner + objective + attack with the papers' defaults.

A recipe builds the *task function* that :mod:`metarobust.meta.execution` runs per task:
adapt on the clean support set (MAML inner loop), then score the query with an objective.
``metarobust list recipes`` shows them.
"""

from __future__ import annotations

from collections.abc import Callable

from metarobust.attacks import LinfPGD
from metarobust.config import ExperimentConfig
from metarobust.meta.execution import TaskFn
from metarobust.meta.maml import MAML
from metarobust.registry import Registry
from metarobust.training import objectives

RECIPES = Registry("recipe")
RecipeBuilder = Callable[[ExperimentConfig, MAML, LinfPGD], TaskFn]

# Recipes whose training draws random-start noise for the query attack.
ATTACKING = {"adversarial_querying", "r_maml"}


@RECIPES.register("maml", "MAML (Finn et al. 2017): clean inner loop, clean query CE; no robustness")
def maml_recipe(cfg: ExperimentConfig, maml: MAML, attack: LinfPGD) -> TaskFn:
    def task(params, sx, sy, qx, qy, noise):
        fast = maml.adapt(params, sx, sy)
        return objectives.clean_ce(maml.forward, fast, qx, qy)

    return task


@RECIPES.register("adversarial_querying",
                  "AQ (Goldblum et al. 2020): clean inner loop, CE on the query attacked through the fast weights")
def adversarial_querying_recipe(cfg: ExperimentConfig, maml: MAML, attack: LinfPGD) -> TaskFn:
    def task(params, sx, sy, qx, qy, noise):
        fast = maml.adapt(params, sx, sy)
        return objectives.adversarial_ce(maml.forward, fast, qx, qy, attack, noise)

    return task


@RECIPES.register("r_maml",
                  "R-MAML_out (Wang et al. 2021): clean inner loop; TRADES-KL or adversarial CE in the meta-update")
def r_maml_recipe(cfg: ExperimentConfig, maml: MAML, attack: LinfPGD) -> TaskFn:
    form, weight = cfg.robust.form, cfg.robust.weight

    def task(params, sx, sy, qx, qy, noise):
        fast = maml.adapt(params, sx, sy)
        return objectives.robust_regularised(maml.forward, fast, qx, qy, attack, noise, form, weight)

    return task


def build_task_fn(cfg: ExperimentConfig, maml: MAML, attack: LinfPGD) -> TaskFn:
    return RECIPES.get(cfg.recipe, "recipe")(cfg, maml, attack)


def uses_attack(recipe: str) -> bool:
    return recipe in ATTACKING


__all__ = ["RECIPES", "build_task_fn", "uses_attack"]
