"""The adversarial objective of Goodfellow, Shlens & Szegedy, "Explaining and Harnessing
Adversarial Examples", ICLR 2015, arXiv 1412.6572, eq. 6: the worked example of
``docs/architecture.md`` (a recipe in one file, with a config section of its own)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metarobust.config import check_value, config_section
from metarobust.data.episode import EpisodeBatch
from metarobust.training.objectives import accuracy
from metarobust.training.recipes.base import Models, Recipe, Stats, StepContext, register_recipe


@config_section("mixed_at")
@dataclass
class MixedATConfig:
    """``recipe: mixed_at``."""

    alpha: float = 0.5
    """Weight of the clean term (the paper: 0.5)."""

    def check(self) -> None:
        check_value(0 <= self.alpha <= 1, "mixed_at.alpha", self.alpha, "a weight in [0, 1]")


@register_recipe("mixed_at", "Goodfellow et al. 2015 (eq. 6): alpha CE(x) + (1 - alpha) CE(x_adv), FGSM in the paper")
class MixedAT(Recipe):
    """``L = alpha CE(f(x), y) + (1 - alpha) CE(f(x'), y)`` with ``x'`` from ``train_attack``: the
    paper's FGSM (``train_attack.name=fgsm``, eps 0.25 on MNIST; ``configs/at/mnist_mixed_at.yaml``).
    BatchNorm stays in train mode during the attack; clean and adversarial batches go through
    separate forwards.

    Example:
        >>> cfg = load_config("configs/at/mnist_mixed_at.yaml", ["mixed_at.alpha=0.3"])
        >>> model = Trainer(cfg).fit()
    """

    attack_bn = "train"

    def loss(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        attack = self.train_attack()
        x_adv = self.attack(models.raw["model"], attack, batch.x, batch.y,
                            noise=attack.init_noise(batch.x, ctx.generator))
        model, alpha = models["model"], self.cfg.mixed_at.alpha
        clean, adv = model(batch.x), model(x_adv)
        loss = alpha * F.cross_entropy(clean, batch.y) + (1 - alpha) * F.cross_entropy(adv, batch.y)
        return loss, {"clean_acc": accuracy(clean, batch.y), "adv_acc": accuracy(adv, batch.y)}


__all__ = ["MixedAT", "MixedATConfig"]
