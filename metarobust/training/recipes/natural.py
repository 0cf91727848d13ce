"""Natural (standard) training: cross-entropy on clean images, no attack; the baseline every
adversarial recipe is compared with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metarobust.data.episode import EpisodeBatch
from metarobust.training.objectives import accuracy
from metarobust.training.recipes.base import Models, Recipe, Stats, StepContext, register_recipe


@register_recipe("natural", "Natural training: CE on clean images, no attack (the baseline)")
class Natural(Recipe):
    """Empirical risk minimisation: ``L = CE(f(x), y)``.

    Example:
        >>> cfg = load_config("configs/at/cifar10_natural.yaml")
        >>> model = Trainer(cfg).fit()
    """

    def loss(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        logits = models["model"](batch.x)
        return F.cross_entropy(logits, batch.y), {"clean_acc": accuracy(logits, batch.y)}
