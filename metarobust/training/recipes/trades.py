"""TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically Principled Trade-off between
Robustness and Accuracy", ICML 2019, arXiv 1901.08573; code ``yaodongyu/TRADES`` @6e8e11b)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from metarobust.attacks.losses import kl_from_clean
from metarobust.data.episode import EpisodeBatch
from metarobust.training.objectives import (
    TRADES_START_SIGMA,
    accuracy,
    full_precision,
    gaussian_start,
    trades_kl,
)
from metarobust.training.recipes.base import Models, Recipe, Stats, StepContext, bn_mode, register_recipe


def trades_attack_target(model: torch.nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """``log p(x) [B, K]`` of the clean batch, detached, in BatchNorm ``mode``: the fixed
    distribution the KL attack moves away from."""
    with bn_mode(model, mode), torch.no_grad():
        return F.log_softmax(full_precision(model(x)), dim=-1)


@register_recipe("trades", "TRADES (Zhang et al. 2019): CE(x) + beta KL(p(x)||p(x')), KL-PGD attack in eval "
                             "mode, beta 6")
class TRADES(Recipe):
    """``L = CE(f(x), y) + beta (1/B) sum_i KL(p(x_i) || p(x'_i))`` (eq. 5) with
    ``x' = argmax_{x' in B(x, eps)} KL(p(x) || p(x'))``.

    Attack (TRADES' code): start at ``x + 0.001 N(0, I)``, ``train_attack.steps`` (10) sign steps of
    ``train_attack.step_size`` (0.007) on the summed KL, eps 0.031, model in eval mode. Loss: model
    in train mode, clean and adversarial batches through separate forwards (separate BatchNorm
    statistics), the clean branch not detached. ``at.beta`` = 6 (the paper's CIFAR-10 value; the
    README recommends 1..10).

    TRADES-AWP (``awp.gamma``; Wu et al. 2020's ``trades_AWP``: gamma 0.005, ``awp.warmup=9``):
    the weights are perturbed against this same loss on the KL-PGD examples before the step, as
    the reference's ``TradesAWP.calc_awp`` (:mod:`metarobust.training.awp`).

    Example:
        >>> cfg = load_config("configs/at/cifar10_trades.yaml", ["at.beta=1"])
        >>> model = Trainer(cfg).fit()
    """

    attack_bn = "eval"
    supports_awp = True

    def adversarial(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> torch.Tensor:
        raw = models.raw["model"]
        attack = self.train_attack()
        target = trades_attack_target(raw, batch.x, self.bn)
        noise = gaussian_start(batch.x, TRADES_START_SIGMA, self.cfg.train_attack.eps, ctx.generator)
        return self.attack(raw, attack, batch.x, target, kl_from_clean, noise)

    def inputs(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> torch.Tensor:
        """The KL-PGD examples ``[B, C, H, W]``."""
        return self.adversarial(models, batch, ctx)

    def objective(self, forward: Callable[[torch.Tensor], torch.Tensor], batch: EpisodeBatch,
                  x_adv: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        clean_logits = forward(batch.x)
        adv_logits = forward(x_adv)
        natural = F.cross_entropy(clean_logits, batch.y)
        robust = trades_kl(clean_logits, adv_logits)
        return natural + self.at.beta * robust, {
            "clean_acc": accuracy(clean_logits, batch.y), "adv_acc": accuracy(adv_logits, batch.y),
            "kl": robust.detach()}
