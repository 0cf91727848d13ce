"""Every recipe of metarobust, one file each, registered in :data:`RECIPES` on import.

``metarobust list recipes`` shows them; :mod:`metarobust.training.recipes.base` defines the
protocol, ``docs/architecture.md`` how to add one.

| family | recipes |
|---|---|
| meta-learning (episodes, MAML/ANIL learner) | ``maml``, ``anil``, ``adversarial_querying``, ``adml``, ``r_maml``, ``trades_maml``, ``its_maml`` |
| plain pre-training, few-shot probe (RFS) | ``rfs``, ``rfs_adversarial`` |
| standard adversarial training (single-task episodes) | ``natural``, ``pgd_at``, ``trades``, ``mart``, ``mat``, ``ltd``, ``advprop``, ``fast_at``, ``free_at``, ``bat``, ``frl``, ``local_balls``, ``backward_smoothing``, ``adversarial_finetune``, ``mixed_at`` |
"""

import importlib
import pkgutil

from metarobust.training.recipes.base import (
    RECIPES,
    MetaRecipe,
    Models,
    Recipe,
    Role,
    StepContext,
    TrainerView,
    bn_mode,
    build_recipe,
    check_recipe,
    register_recipe,
)

# Every module of this package is a recipe (or shared by recipes): importing them registers them,
# so a new recipe is one new file here, with nothing else to edit.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["RECIPES", "MetaRecipe", "Models", "Recipe", "Role", "StepContext", "TrainerView", "bn_mode",
           "build_recipe", "check_recipe", "register_recipe"]
