"""Backward Smoothing (Chen, Cheng, Gan, Gu & Liu, "Efficient Robust Training via Backward
Smoothing", AAAI 2022, arXiv 2010.01278; code ``jinghuichen/BackwardSmoothing`` @6ad21f8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metarobust.attacks.losses import kl_divergence, kl_from_clean
from metarobust.data.episode import EpisodeBatch
from metarobust.errors import ConfigError
from metarobust.training.objectives import accuracy, full_precision, start_at, trades_kl
from metarobust.training.recipes.base import Models, Recipe, Stats, StepContext, bn_mode, register_recipe


def toward_target(logits: torch.Tensor, target_log_probs: torch.Tensor) -> torch.Tensor:
    """Minus ``sum_i KL(t_i || p(x'_i))``: ascending it moves ``x'`` so that its output matches the
    smoothed target ``t`` (the "backward" step)."""
    return -kl_divergence(target_log_probs, F.log_softmax(logits, dim=-1)).sum()


@register_recipe("backward_smoothing", "Backward Smoothing (Chen et al. 2022): TRADES with an output-noise "
                                         "initialisation and one KL step, beta 10")
class BackwardSmoothing(Recipe):
    """TRADES whose inner maximisation costs two gradient computations.

    Attack (eval mode, as the reference code): draw ``u ~ U(-1, 1)^K`` and set the target
    ``t = softmax(f(x) + gamma u)`` (``at.smoothing_gamma``, 1); from ``x`` (no input noise) take
    one sign step of size ``alpha = train_attack.step_size`` that *decreases* ``KL(t || p(x'))``
    (output randomness mapped back into input space), project; then ``train_attack.steps`` (1)
    TRADES ascent steps on ``KL(p(x) || p(x'))`` of size alpha, projected. Loss: TRADES,
    ``CE(f(x), y) + beta KL(p(x) || p(x'))`` with ``at.beta`` = 10 (README example, ResNet-18 on
    CIFAR-10: beta 10, gamma 1, alpha = eps = 0.031, one step; 100 epochs, lr 0.1 x0.1 at 50% and
    75%, weight decay 5e-4). L-inf only.

    Example:
        >>> cfg = load_config("configs/at/cifar10_backward_smoothing.yaml")
        >>> model = Trainer(cfg).fit()
    """

    attack_bn = "eval"

    @classmethod
    def config_check(cls, cfg) -> None:
        if cfg.train_attack.norm != "linf":  # the ascent starts at the backward step's point (start_at)
            raise ConfigError(f"train_attack.norm={cfg.train_attack.norm!r}: backward_smoothing is defined for "
                              f"linf only (Chen et al.; its ascent starts where the backward step ended); set "
                              f"train_attack.norm=linf")

    def loss(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        a = self.cfg.train_attack
        raw, x = models.raw["model"], batch.x
        with bn_mode(raw, self.bn), torch.no_grad():
            clean_logits = full_precision(raw(x))
        u = 2 * torch.rand(clean_logits.shape, generator=ctx.generator, device=x.device) - 1
        target = F.log_softmax(clean_logits + self.at.smoothing_gamma * u, dim=-1)
        backward_step = self.train_attack(steps=1, random_start=False, restarts=1)
        x_bs = self.attack(raw, backward_step, x, target, toward_target)
        ascent = self.train_attack(random_start=True)
        x_adv = self.attack(raw, ascent, x, F.log_softmax(clean_logits, dim=-1), kl_from_clean,
                            start_at(x_bs, x, a.eps))
        model = models["model"]
        clean = model(x)
        adv = model(x_adv)
        robust = trades_kl(clean, adv)
        return F.cross_entropy(clean, batch.y) + self.at.beta * robust, {
            "clean_acc": accuracy(clean, batch.y), "adv_acc": accuracy(adv, batch.y), "kl": robust.detach()}
