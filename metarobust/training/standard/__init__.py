"""Standard (single-task) adversarial training: recipes and their trainer.

Each recipe module registers itself in :data:`metarobust.training.recipes.RECIPES` (marked
``kind = "standard"``); import it here so that ``metarobust list recipes`` shows it. The trainer
lives in :mod:`metarobust.training.standard.trainer` (imported on use: it imports the engine).
"""

from metarobust.training.standard import (  # noqa: F401  (each registers its recipe)
    adversarial_finetune,
    advprop,
    backward_smoothing,
    bat,
    fast_at,
    free_at,
    frl,
    local_balls,
    ltd,
    mart,
    mat,
    natural,
    pgd_at,
    trades,
)
from metarobust.training.standard.base import (
    Batch,
    Models,
    Role,
    StandardRecipe,
    StepContext,
    register_standard,
    standard_recipe,
    standard_recipe_names,
)

__all__ = ["Batch", "Models", "Role", "StandardRecipe", "StepContext", "register_standard", "standard_recipe",
           "standard_recipe_names"]
