"""Fast adversarial training with FGSM and a random start (Wong, Rice & Kolter, "Fast is better
than free: Revisiting adversarial training", ICLR 2020, arXiv 2001.03994; code
``locuslab/fast_adversarial`` @54f7287)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from metarobust.data.episode import EpisodeBatch
from metarobust.training.objectives import accuracy
from metarobust.training.recipes.base import (
    Models,
    Recipe,
    Stats,
    StepContext,
    TrainerView,
    register_recipe,
)

CHECK_STEPS, CHECK_STEP_SIZE = 5, 2 / 255
"""Wong et al.'s early-stop check: PGD-5 with step 2/255 at the training eps."""


@register_recipe("fast_at", "Fast AT (Wong et al. 2020): FGSM-RS step 1.25 eps, cyclic lr, early stop "
                              "against catastrophic overfitting")
class FastAT(Recipe):
    """FGSM with random start: ``delta ~ U(-eps, eps)`` (clipped to the image box), one step of
    ``alpha = train_attack.step_size`` (1.25 eps = 10/255 at 8/255) along ``sign(grad)``, projected;
    CE on ``x + delta``. BatchNorm in train mode throughout, as the reference code. The paper's
    schedule (``configs/at/cifar10_fast_at.yaml``): 15 epochs, cyclic lr 0 -> 0.2 -> 0, SGD
    momentum 0.9, weight decay 5e-4, batch 128, mixed precision.

    Early stop (``at.early_stop``, on by default): after every epoch the model (eval mode) is
    attacked with PGD-5 (step 2/255) on the check batch (the ``at.holdout`` images; without a
    holdout, the epoch's first training batch as in the reference code). If its robust accuracy
    falls by more than ``at.early_stop_drop`` (0.2) below the previous epoch's, catastrophic
    overfitting has set in: training stops and the previous epoch's weights are restored.
    Deviation: the reference code runs the check with BatchNorm in train mode.

    Example:
        >>> cfg = load_config("configs/at/cifar10_fast_at.yaml", ["at.holdout=1000"])
        >>> model = Trainer(cfg).fit()
    """

    attack_bn = "train"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.previous_acc = 0.0
        self.best: dict[str, dict[str, torch.Tensor]] | None = None

    def loss(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        attack = self.train_attack(steps=1, random_start=True)  # FGSM-RS: one step from a random start
        x_adv = self.attack(models.raw["model"], attack, batch.x, batch.y,
                            noise=attack.init_noise(batch.x, ctx.generator))
        logits = models["model"](x_adv)
        return F.cross_entropy(logits, batch.y), {"adv_acc": accuracy(logits, batch.y)}

    def check_accuracy(self, trainer: TrainerView) -> float:
        """PGD-5 robust accuracy of the trained model (eval mode) on the check batch (all ranks
        agree; :meth:`Trainer.robust_accuracy`, which ``at.select=best`` scores with too)."""
        # Wong et al.'s early-stop check is a fixed PGD-5, whatever the training attack.
        attack = self.train_attack(name="pgd", step_size=CHECK_STEP_SIZE, steps=CHECK_STEPS, random_start=True,
                                   restarts=1)
        return trainer.robust_accuracy(attack, model=trainer.models.raw["model"], seed=self.cfg.seed + trainer.epoch)

    def on_epoch_end(self, trainer: TrainerView) -> dict[str, float] | None:
        if not self.at.early_stop:
            return None
        acc = self.check_accuracy(trainer)
        if acc - self.previous_acc < -self.at.early_stop_drop and self.best is not None:
            for name, state in self.best.items():
                trainer.models.modules[name].load_state_dict(state)
            trainer.stop(f"catastrophic overfitting: PGD-{CHECK_STEPS} accuracy on the check batch fell from "
                         f"{self.previous_acc:.3f} to {acc:.3f} at epoch {trainer.epoch + 1}; the weights of "
                         f"epoch {trainer.epoch} are restored")
            return {"check_robust_acc": acc, "early_stopped": 1.0}
        self.previous_acc = acc
        self.best = {name: copy.deepcopy(trainer.models.modules[name].state_dict())
                     for name in trainer.models.trainable}
        return {"check_robust_acc": acc}

    def state_dict(self) -> dict[str, Any]:
        return {"previous_acc": self.previous_acc, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous_acc = float(state["previous_acc"])
        self.best = state["best"]
