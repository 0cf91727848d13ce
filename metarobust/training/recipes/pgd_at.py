"""PGD adversarial training (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018, arXiv 1706.06083)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from metarobust.data.episode import EpisodeBatch
from metarobust.training.objectives import accuracy
from metarobust.training.recipes.base import Models, Recipe, Stats, StepContext, register_recipe


@register_recipe("pgd_at", "PGD-AT (Madry et al. 2018): CE on PGD examples (train_attack: PGD-10, 2/255, 8/255)")
class PGDAT(Recipe):
    """``min_theta E max_{x' in B(x, eps)} CE(f(x'), y)``, the inner max by PGD from a uniform
    random start (``train_attack``: L-inf eps 8/255, step 2/255, 10 steps in
    ``configs/at/cifar10_pgd_at.yaml``; Madry's code: 7 steps in the paper, 10 in its config).

    The attack runs with BatchNorm in train mode, as Madry's TF code and Rice et al.'s PyTorch code
    (``at.attack_bn=eval`` changes it). Only the adversarial batch is trained on.

    AWP (``awp.gamma``; AT-AWP, Wu et al. 2020: gamma 0.01, no warm-up): the weights are perturbed
    against this CE on the PGD examples before the step (:mod:`metarobust.training.awp`).

    Example:
        >>> cfg = load_config("configs/at/cifar10_pgd_at.yaml")
        >>> model = Trainer(cfg).fit()
    """

    attack_bn = "train"
    supports_awp = True

    def inputs(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> torch.Tensor:
        """The PGD examples ``[B, C, H, W]`` against the current model."""
        attack = self.train_attack()
        return self.attack(models.raw["model"], attack, batch.x, batch.y,
                           noise=attack.init_noise(batch.x, ctx.generator))

    def objective(self, forward: Callable[[torch.Tensor], torch.Tensor], batch: EpisodeBatch,
                  x_adv: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        logits = forward(x_adv)
        return F.cross_entropy(logits, batch.y), {"adv_acc": accuracy(logits, batch.y)}
