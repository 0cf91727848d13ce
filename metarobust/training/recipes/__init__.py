"""Every recipe of metarobust, one file each, registered in :data:`RECIPES` on import.

``metarobust list recipes`` shows them; :mod:`metarobust.training.recipes.base` defines the
protocol, ``docs/architecture.md`` how to add one.

| family | recipes |
|---|---|
| meta-learning (episodes, MAML/ANIL learner) | ``maml``, ``anil``, ``adversarial_querying``, ``adml``, ``r_maml``, ``trades_maml``, ``its_maml`` |
| plain pre-training, few-shot probe (RFS) | ``rfs``, ``rfs_adversarial`` |
| standard adversarial training (single-task episodes) | ``natural``, ``pgd_at``, ``trades``, ``mart``, ``mat``, ``ltd``, ``advprop``, ``fast_at``, ``free_at``, ``bat``, ``frl``, ``local_balls``, ``backward_smoothing``, ``adversarial_finetune`` |
"""

from metarobust.training.recipes import (  # noqa: F401  (each registers its recipe)
    adml,
    adversarial_finetune,
    adversarial_querying,
    advprop,
    anil,
    backward_smoothing,
    bat,
    fast_at,
    free_at,
    frl,
    its_maml,
    local_balls,
    ltd,
    maml,
    mart,
    mat,
    natural,
    pgd_at,
    r_maml,
    rfs,
    trades,
    trades_maml,
)
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
    register_recipe,
)

__all__ = ["RECIPES", "MetaRecipe", "Models", "Recipe", "Role", "StepContext", "TrainerView", "bn_mode",
           "build_recipe", "register_recipe"]
