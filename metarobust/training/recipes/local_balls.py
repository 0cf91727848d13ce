"""Local balls around weak adversaries plus a global term (Lu & Kumar, "Improving Local
Effectiveness for Global Robust Training", arXiv 2110.14030; ICLR 2021 submission, OpenReview
k9GoaycDeio).

No code was released and only the abstract could be read: the loss below is a reconstruction,
[R] in ``shared/methods/ADVERSARIAL_TRAINING.md`` 4.4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metarobust.attacks.pgd import PGD
from metarobust.config import check_value, config_section
from metarobust.data.episode import EpisodeBatch
from metarobust.training.objectives import accuracy, trades_kl
from metarobust.training.recipes.base import Models, Recipe, Stats, StepContext, register_recipe


@config_section("local_balls")
@dataclass
class LocalBallsConfig:
    """Local balls around weak adversaries plus a global term (``recipe: local_balls``; Lu &
    Kumar 2021), a reconstruction [R]."""

    radius: float = 0.25
    """r of the local ball around each adversary, as a fraction of ``train_attack.eps``."""
    steps: int = 1
    """Steps of the second-stage attack inside B(x', r) (step size r, random start)."""
    weight: float = 1.0
    """lambda of the global term ``KL(p(x) || p(x'))``."""

    def check(self) -> None:
        check_value(self.radius > 0, "local_balls.radius", self.radius, "a fraction of train_attack.eps > 0, e.g. 0.25")
        check_value(self.steps >= 1, "local_balls.steps", self.steps, "an integer >= 1")
        check_value(self.weight >= 0, "local_balls.weight", self.weight, "a weight >= 0")


@register_recipe("local_balls", "Local balls + global term (Lu & Kumar 2021) [R]: CE in a small ball "
                                  "around a weak adversary + lambda KL(p(x)||p(x'))")
class LocalBalls(Recipe):
    """Train with a *weak*, cheap adversary and make the model robust in a small ball around
    each adversarial point, tied back to the clean point by a global term:

    ``L = (1/B) sum_i CE(f(x''_i), y_i) + lambda (1/B) sum_i KL(p(x_i) || p(x'_i))``

    - ``x' = attack(x)``: the weak adversary, ``train_attack`` (FGSM with random start, one step
      of 1.25 eps, in ``configs/at/cifar10_local_balls.yaml``);
    - ``x''``: a second-stage attack *seeded at* ``x'``: ``local_balls.steps`` (1) steps of size
      ``r`` from a random point of ``B(x', r)``, projected onto ``B(x', r)`` and the image box,
      with ``r = local_balls.radius * train_attack.eps`` (a quarter); so ``x''`` may lie up to
      ``eps + r`` from ``x``. This is ``L_local``: robustness inside the local ball;
    - ``L_global = KL(p(x) || p(x'))`` (TRADES' form, both arguments differentiated) links the
      local balls back to the clean point, ``lambda = local_balls.weight`` (1).

    What is reconstructed: the forms of L_local and L_global, r, lambda and the weak attack's
    settings (the paper's exact terms are unknown). BatchNorm in eval mode for both attacks.

    Example:
        >>> cfg = load_config("configs/at/cifar10_local_balls.yaml", ["local_balls.radius=0.5"])
        >>> model = Trainer(cfg).fit()
    """

    attack_bn = "eval"

    def local_attack(self) -> PGD:
        """The second-stage attack inside ``B(x', r)`` (centred at its input)."""
        a, lb = self.cfg.train_attack, self.cfg.local_balls
        r = lb.radius * a.eps
        return self.train_attack(eps=r, step_size=r, steps=lb.steps, random_start=True)

    def loss(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        x, y = batch.x, batch.y
        raw = models.raw["model"]
        weak = self.train_attack()
        x_adv = self.attack(raw, weak, x, y, noise=weak.init_noise(x, ctx.generator))
        local = self.local_attack()
        x_local = self.attack(raw, local, x_adv, y, noise=local.init_noise(x_adv, ctx.generator))
        model = models["model"]
        clean = model(x).float()
        adv = model(x_adv).float()
        in_ball = model(x_local).float()
        local_ce = F.cross_entropy(in_ball, y)
        global_kl = trades_kl(clean, adv)
        return local_ce + self.cfg.local_balls.weight * global_kl, {
            "clean_acc": accuracy(clean, y), "adv_acc": accuracy(adv, y), "local_acc": accuracy(in_ball, y),
            "local_ce": local_ce.detach(), "global_kl": global_kl.detach()}


__all__ = ["LocalBalls"]
