"""Natural (standard) training: cross-entropy on clean images, no attack; the baseline every
adversarial recipe is compared with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metarobust.training.standard.base import Batch, Models, StandardRecipe, Stats, StepContext, accuracy, \
    register_standard


@register_standard("natural", "Natural training: CE on clean images, no attack (the baseline)")
class Natural(StandardRecipe):
    """Empirical risk minimisation: ``L = CE(f(x), y)``.

    Example:
        >>> cfg = load_config("configs/at/cifar10_natural.yaml")
        >>> model = train_standard(cfg)
    """

    def loss(self, models: Models, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        logits = models["model"](batch.x)
        return F.cross_entropy(logits, batch.y), {"clean_acc": accuracy(logits, batch.y)}
