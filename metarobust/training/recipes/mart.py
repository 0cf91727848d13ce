"""MART (Wang, Zou, Yi, Bailey, Ma & Gu, "Improving Adversarial Robustness Requires Revisiting
Misclassified Examples", ICLR 2020, OpenReview rklOg6EFwS; code ``YisenWang/MART`` @2d83e17)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metarobust.attacks.losses import cross_entropy_sum
from metarobust.data.episode import EpisodeBatch
from metarobust.training.objectives import TRADES_START_SIGMA, accuracy, full_precision, gaussian_start
from metarobust.training.recipes.base import Models, Recipe, Stats, StepContext, register_recipe


def boosted_ce(adv_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MART's BCE: ``CE(p(x'), y) - log(1 - max_{k != y} p_k(x'))``, mean over the batch (the code's
    guard constants 1.0001 and 1e-12 kept)."""
    probs = F.softmax(adv_logits, dim=1)
    top2 = probs.argsort(dim=1)[:, -2:]
    runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    return F.cross_entropy(adv_logits, y) + F.nll_loss(torch.log(1.0001 - probs + 1e-12), runner_up)


def weighted_kl(clean_logits: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(1/B) sum_i KL(p(x_i) || p(x'_i)) (1 - p_y(x_i))``: the KL of misclassified (low-confidence)
    examples weighs more; gradients flow through both distributions and the weight."""
    clean_probs = F.softmax(clean_logits, dim=1)
    adv_probs = F.softmax(adv_logits, dim=1)
    kl = (clean_probs * (torch.log(clean_probs + 1e-12) - torch.log(adv_probs + 1e-12))).sum(dim=1)
    true_probs = clean_probs.gather(1, y.unsqueeze(1)).squeeze(1)
    return (kl * (1.0000001 - true_probs)).mean()


@register_recipe("mart", "MART (Wang et al. 2020): boosted CE on PGD examples + beta (1-p_y) weighted KL, beta 6")
class MART(Recipe):
    """``L = BCE(p(x'), y) + beta (1/B) sum_i KL(p(x_i) || p(x'_i)) (1 - p_y(x_i))``.

    Attack: the standard CE-PGD (MART changes the minimisation only), started at
    ``x + 0.001 N(0, I)``, 10 steps of 0.007 at eps 0.031 (``train_attack``), model in eval mode.
    ``at.beta`` = 6 (WRN-34-10; 5 for ResNet-18 in MART's code, with lr 0.01 and weight decay
    3.5e-3).

    Example:
        >>> cfg = load_config("configs/at/cifar10_mart.yaml")
        >>> model = Trainer(cfg).fit()
    """

    attack_bn = "eval"

    def loss(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        raw = models.raw["model"]
        attack = self.train_attack()
        noise = gaussian_start(batch.x, TRADES_START_SIGMA, self.cfg.train_attack.eps, ctx.generator)
        x_adv = self.attack(raw, attack, batch.x, batch.y, cross_entropy_sum, noise)
        model = models["model"]
        clean_logits = full_precision(model(batch.x))
        adv_logits = full_precision(model(x_adv))
        bce = boosted_ce(adv_logits, batch.y)
        robust = weighted_kl(clean_logits, adv_logits, batch.y)
        return bce + self.at.beta * robust, {
            "clean_acc": accuracy(clean_logits, batch.y), "adv_acc": accuracy(adv_logits, batch.y),
            "weighted_kl": robust.detach()}
