"""Balance Adversarial Training (Sun, Xu, Yao, Liang, Wu, Liang, Liu & Liu, "Improving Robust
Fairness via Balance Adversarial Training", arXiv 2209.07534, AAAI 2023; code
``silvercherry/Improving-Robust-Fairness-via-Balance-Adversarial-Training`` @9bcee67)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metarobust.attacks import threat
from metarobust.attacks.losses import kl_from_clean
from metarobust.config import check_value, config_section
from metarobust.data.episode import EpisodeBatch
from metarobust.errors import ConfigError
from metarobust.training.objectives import TRADES_START_SIGMA, accuracy, trades_kl
from metarobust.training.recipes.base import (
    Models,
    Recipe,
    Stats,
    StepContext,
    bn_mode,
    input_gradients_only,
    register_recipe,
)
from metarobust.training.recipes.trades import trades_attack_target


@config_section("bat")
@dataclass
class BATConfig:
    """Balance Adversarial Training (``recipe: bat``; Sun et al. 2022); ``at.beta`` = 6."""

    tau: int = 1
    """Extra steps after the first misclassified iterate for the first-adversarial point."""
    uniform_weight: float = 1.0
    """Weight of each ``KL(p(x_b) || U)`` term (target-class fairness)."""

    def check(self) -> None:
        check_value(self.tau >= 0, "bat.tau", self.tau, "an integer >= 0 (extra steps after the first flip)")
        check_value(self.uniform_weight >= 0, "bat.uniform_weight", self.uniform_weight, "a weight >= 0")


@dataclass
class BoundaryPoints:
    """The two early-stopped points that bracket each sample's decision boundary.

    Attributes:
        last_clean: ``[B, C, H, W]``, the last iterate still classified correctly before the
            first misclassified one (the final iterate if the sample never flips; the start
            point if the start is already misclassified).
        first_adv: ``[B, C, H, W]``, the iterate where the sample is misclassified with its
            ``tau`` extra steps spent (the final iterate if that never happens).
        flipped: ``bool [B]``: some iterate was misclassified (``last_clean`` was frozen).
        stopped: ``bool [B]``: ``first_adv`` was frozen before the last step.
    """

    last_clean: torch.Tensor
    first_adv: torch.Tensor
    flipped: torch.Tensor
    stopped: torch.Tensor


def boundary_points(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean_log_probs: torch.Tensor,
                    start: torch.Tensor, eps: float, step_size: float, steps: int,
                    tau: int) -> BoundaryPoints:
    """BAT's two FAT-style searches (Zhang et al., ICML 2020, early-stopped PGD) in one
    trajectory: L-inf sign ascent of ``KL(p(x) || p(x_k))`` from ``start``, ``steps`` steps of
    ``step_size`` within ``eps``, the model as given (call it in eval mode).

    At every iterate ``k`` (one forward, which also gives the gradient) a sample that is
    misclassified freezes its ``last_clean`` point at iterate ``k - 1``; it keeps moving for
    ``tau`` more misclassified iterates (FAT's budget, decremented at each misclassified iterate)
    and then freezes ``first_adv`` at the current iterate. Both searches of the reference run
    the same ascent from their own ``x + 0.001 N`` start; sharing one trajectory halves the cost.
    Per-sample decisions are masks (no Python loop over samples, no host sync).

    Args:
        model: ``[B, C, H, W] -> [B, K]`` logits.
        x, y: clean images in [0, 1] and labels ``[B]``.
        clean_log_probs: ``log p(x)`` ``[B, K]`` (detached), the distribution the KL moves away from.
        start: the first iterate (``x + 0.001 N(0, I)``, projected here).

    Returns:
        :class:`BoundaryPoints` (detached, inside the eps-ball and [0, 1]).
    """
    x = x.detach()
    x_k = threat.project(start.detach() - x, x, "linf", eps) + x
    last_clean, first_adv = x_k.clone(), x_k.clone()
    flipped = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    stopped = torch.zeros_like(flipped)
    budget = torch.full_like(y, tau)
    shape = (-1,) + (1,) * (x.dim() - 1)
    for _ in range(steps):
        with torch.enable_grad():
            x_var = x_k.detach().requires_grad_(True)
            logits = model(x_var).float()
            (grad,) = torch.autograd.grad(kl_from_clean(logits, clean_log_probs), x_var)
        wrong = logits.detach().argmax(dim=-1) != y
        last_clean = torch.where((~flipped & ~wrong).view(shape), x_k.detach(), last_clean)
        flipped = flipped | wrong
        stop = wrong & (budget == 0) & ~stopped
        first_adv = torch.where(stop.view(shape), x_k.detach(), first_adv)
        stopped = stopped | stop
        budget = torch.where(wrong & ~stopped, budget - 1, budget)
        moved = x + threat.project(x_k.detach() + step_size * grad.sign() - x, x, "linf", eps)
        x_k = torch.where(stopped.view(shape), x_k.detach(), moved)
    last_clean = torch.where(flipped.view(shape), last_clean, x_k)
    first_adv = torch.where(stopped.view(shape), first_adv, x_k)
    return BoundaryPoints(last_clean.detach(), first_adv.detach(), flipped, stopped)


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """``(1/B) sum_i KL(p(x_i) || U) = log K - H(p(x_i))`` averaged over the batch: zero when the
    prediction is uniform; gradients flow through ``p``."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * log_p).sum(dim=-1).mean() + math.log(logits.shape[-1])


@register_recipe("bat", "BAT (Sun et al. 2022): CE at the last-clean point + beta KL at the "
                          "first-adversarial point + KL-to-uniform at both, FAT searches, beta 6")
class BAT(Recipe):
    """Robust fairness by balancing *source* classes (how hard adversarial examples are to find)
    and *target* classes (where they land). Per mini-batch, in eval-mode BN as the code:

    1. :func:`boundary_points`: one KL-PGD trajectory from ``x + 0.001 N(0, I)`` (``train_attack``:
       10 steps of 0.007 within eps 0.031) gives the last-clean point ``x_lc`` and the
       first-adversarial point ``x_fa`` (``bat.tau`` = 1 extra step), bracketing each sample's
       decision boundary, whatever the class: source-class fairness;
    2. ``L = CE(p(x_lc), y) + beta KL(p(x) || p(x_fa)) + w [KL(p(x_lc) || U) + KL(p(x_fa) || U)]``
       with U the uniform distribution: maximising the predictive entropy at the boundary points
       spreads the adversarial examples' target classes (target-class fairness). ``at.beta`` = 6,
       ``w = bat.uniform_weight`` = 1.

    Defaults (the code): ResNet-18 on CIFAR-10, SGD lr 0.1, momentum 0.9, weight decay 2e-4, batch
    128, lr x0.1 at epochs 75, 90 and 100 (``configs/at/cifar10_bat.yaml``: 110 epochs). L-inf only.

    Deviations: the reference runs two searches from two ``0.001 N`` starts; here both points come
    from one trajectory (the searches coincide until they stop). Its per-sample Python loops and
    hard-coded 3x32x32 reshapes are masks here (any image shape). It shuffles the variable-size
    groups; samples stay aligned by index here, so nothing needs shuffling.

    Example:
        >>> cfg = load_config("configs/at/cifar10_bat.yaml")
        >>> model = Trainer(cfg).fit()
    """

    attack_bn = "eval"

    @classmethod
    def config_check(cls, cfg) -> None:
        if cfg.train_attack.norm != "linf":
            raise ConfigError(f"train_attack.norm={cfg.train_attack.norm!r}: bat's early-stopped searches "
                              f"are L-inf sign ascent; set train_attack.norm=linf")

    def loss(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        x, y = batch.x, batch.y
        a, bat = self.cfg.train_attack, self.cfg.bat
        raw = models.raw["model"]
        target = trades_attack_target(raw, x, self.bn)
        noise = torch.randn(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
        start = x + TRADES_START_SIGMA * noise
        with bn_mode(raw, self.bn), input_gradients_only(raw):
            points = boundary_points(raw, x, y, target, start, a.eps, a.step_size, a.steps, bat.tau)
        model = models["model"]
        clean = model(x).float()
        lc = model(points.last_clean).float()
        fa = model(points.first_adv).float()
        ce = F.cross_entropy(lc, y)
        kl = trades_kl(clean, fa)
        uniform = kl_to_uniform(lc) + kl_to_uniform(fa)
        return ce + self.at.beta * kl + bat.uniform_weight * uniform, {
            "clean_acc": accuracy(clean, y), "last_clean_acc": accuracy(lc, y),
            "first_adv_acc": accuracy(fa, y), "ce": ce.detach(), "kl": kl.detach(),
            "uniform_kl": uniform.detach(),
            "flipped": points.flipped.float().mean()}


__all__ = ["BAT", "BoundaryPoints", "boundary_points", "kl_to_uniform"]
