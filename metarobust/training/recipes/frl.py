"""Fair Robust Learning (Xu, Liu, Li, Jain & Tang, "To be Robust or to be Fair: Towards
Fairness in Adversarial Training", ICML 2021, arXiv 2010.06121; code ``hannxu123/fair_robust``
@a80547d, ``frlrmrw.py`` = reweight + remargin, ``frlrw.py`` = reweight only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from metarobust.attacks.losses import kl_divergence, kl_from_clean
from metarobust.config import STEP_2, ExperimentConfig, check_value, config_section
from metarobust.data.episode import EpisodeBatch
from metarobust.errors import ConfigError
from metarobust.training.objectives import TRADES_START_SIGMA, accuracy, gaussian_start
from metarobust.training.recipes.base import (
    Models,
    Recipe,
    Stats,
    StepContext,
    TrainerView,
    bn_mode,
    register_recipe,
)
from metarobust.training.recipes.trades import trades_attack_target


@config_section("frl")
@dataclass
class FRLConfig:
    """Fair Robust Learning (``recipe: frl``; Xu et al. 2021), reweight + remargin; needs
    ``at.holdout`` validation images and, as the paper, a robust ``at.init``."""

    tau_nat: float = 0.07
    """Allowed excess of a class's clean error over the average (tau_0)."""
    tau_bdy: float = 0.07
    """Allowed excess of a class's boundary error over the average (tau_1)."""
    rate: float = 0.05
    """alpha_1, the step of the weight multipliers; halved every ``rate_halving`` epochs."""
    rate_halving: int = 40
    margin_rate: float = 0.2
    """alpha_2, the step of the eps multipliers (remargin); 0: reweight only (``frlrw.py``)."""
    limit: float = 0.5
    """Each multiplier vector is rescaled to sum at most this (``lim``)."""
    val_steps: int = 20
    """PGD steps of the validation pass (CE, uniform start, eps ``train_attack.eps``)."""
    val_step_size: float = STEP_2
    compat_step: bool = False
    """Reproduce the reference code's training step ``max_i eps_i / 4`` (one value per batch)
    instead of ``train_attack.step_size`` scaled per sample like its eps."""

    def check(self) -> None:
        for key in ("tau_nat", "tau_bdy", "rate", "margin_rate", "limit", "val_step_size"):
            check_value(getattr(self, key) >= 0, f"frl.{key}", getattr(self, key), "a value >= 0")
        check_value(self.rate_halving >= 1, "frl.rate_halving", self.rate_halving, "a number of epochs >= 1")
        check_value(self.val_steps >= 1, "frl.val_steps", self.val_steps, "an integer >= 1")


@dataclass
class ClassErrors:
    """Per-class errors of a validation pass, all ``[K]`` on the device except the totals.

    Attributes:
        clean: clean error ``e_nat(c) = 1 - acc_clean(c)``.
        boundary: boundary error ``e_bdy(c) = acc_clean(c) - acc_robust(c)``.
        total_clean, total_boundary: the same over all validation images (0-dim).
        present: ``bool [K]``, classes with at least one validation image.
    """

    clean: torch.Tensor
    boundary: torch.Tensor
    total_clean: torch.Tensor
    total_boundary: torch.Tensor
    present: torch.Tensor


def class_errors(clean_correct: torch.Tensor, robust_correct: torch.Tensor,
                 counts: torch.Tensor) -> ClassErrors:
    """:class:`ClassErrors` from per-class counts ``[K]`` of clean-correct, robust-correct and all
    validation images."""
    n = counts.clamp_min(1)
    acc_clean, acc_robust = clean_correct / n, robust_correct / n
    total = counts.sum().clamp_min(1)
    return ClassErrors(1 - acc_clean, acc_clean - acc_robust, 1 - clean_correct.sum() / total,
                       (clean_correct.sum() - robust_correct.sum()) / total, counts > 0)


def normalize_multipliers(lam: torch.Tensor, limit: float) -> torch.Tensor:
    """Clamp to >= 0, then rescale so that the sum is at most ``limit`` (FRL's ``normalize_lambda``)."""
    lam = lam.clamp_min(0)
    total = lam.sum()
    return torch.where(total > limit, lam * limit / total.clamp_min(1e-12), lam)


def class_weights(lam: torch.Tensor) -> torch.Tensor:
    """``w(c) = 1/K + lam(c) - (1/K) sum_j lam(j)`` ``[K]``: uniform weights moved toward the
    classes whose multiplier grew (FRL's ``cost_sensitive``)."""
    k = lam.numel()
    return 1.0 / k + lam - lam.sum() / k


@dataclass
class Multipliers:
    """FRL's Lagrange multipliers ``[K]`` each: ``nat`` (clean-error constraint -> CE weights),
    ``bdy`` (boundary-error constraint -> KL weights), ``margin`` (boundary error -> eps)."""

    nat: torch.Tensor
    bdy: torch.Tensor
    margin: torch.Tensor

    @classmethod
    def zeros(cls, k: int, device: torch.device) -> Multipliers:
        return cls(*(torch.zeros(k, device=device) for _ in range(3)))

    def update(self, errors: ClassErrors, frl: FRLConfig, rate: float) -> Multipliers:
        """One step of FRL's multiplier ascent (``frl_train``) on the validation errors: a class
        whose error exceeds the average by more than tau gains weight (and eps)."""
        gamma_nat = errors.clean - errors.total_clean - frl.tau_nat
        gamma_bdy = errors.boundary - errors.total_boundary - frl.tau_bdy
        # A class absent from the validation images has no error to constrain.
        gamma_nat = torch.where(errors.present, gamma_nat, torch.zeros_like(gamma_nat))
        gamma_bdy = torch.where(errors.present, gamma_bdy, torch.zeros_like(gamma_bdy))
        return Multipliers(normalize_multipliers(self.nat + rate * gamma_nat.clamp_min(-1000), frl.limit),
                           normalize_multipliers(self.bdy + 2 * rate * gamma_bdy.clamp_min(-1000), frl.limit),
                           self.margin + frl.margin_rate * gamma_bdy)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w_nat, w_bdy, eps multiplier)`` ``[K]`` each; the multiplier is
        ``clip(exp(2 lam_margin), 0.98, 3)``."""
        return class_weights(self.nat), class_weights(self.bdy), torch.exp(2 * self.margin).clamp(0.98, 3.0)


@register_recipe("frl", "FRL (Xu et al. 2021): per-class CE/KL weights and eps from Lagrange multipliers "
                          "updated on a validation split each epoch (reweight + remargin), beta 1.5")
class FRL(Recipe):
    """Fair Robust Learning, reweight + remargin (``frlrmrw.py``), usually a fine-tuning of a
    robust model (``at.init``: the reference's ``hot_start.pt``, PreAct-ResNet-18 or WRN-28).

    Before every epoch (:meth:`on_epoch_start`), a validation pass on the ``at.holdout`` images
    (required; the reference holds out 300 training images per class) with CE-PGD
    (``frl.val_steps`` 20, step 2/255, eps ``train_attack.eps``, uniform start, eval mode)
    gives each class's clean error ``e_nat(c)`` and boundary error ``e_bdy(c)``; the multipliers
    take one ascent step on ``gamma = e(c) - E - tau`` (``frl.tau_nat``/``tau_bdy``, 0.07):
    ``lam_nat += a1 gamma_nat``, ``lam_bdy += 2 a1 gamma_bdy`` (each clamped at 0 and rescaled to
    sum <= ``frl.limit`` 0.5), ``lam_m += a2 gamma_bdy`` (``a1 = frl.rate`` 0.05 halved every
    40 epochs; ``a2 = frl.margin_rate`` 0.2, 0 for reweight only). Classes worse than average
    gain weight: ``w(c) = 1/K + lam(c) - mean(lam)``, and eps:
    ``eps(c) = eps clip(exp(2 lam_m(c)), 0.98, 3)``.

    Training step (TRADES with per-class weights and radii): ``x'`` by KL-PGD with per-sample
    ``eps_i = eps(y_i)`` (10 steps, start ``x + 0.001 N``, eval mode), then
    ``L = sum_i w_nat(y_i) CE_i / sum_i w_nat(y_i) + beta sum_i w_bdy(y_i) KL_i / sum_i w_bdy(y_i)``,
    ``at.beta`` = 1.5 (the script's default). Defaults (``configs/at/cifar10_frl.yaml``): SGD lr 0.001,
    momentum 0.9, weight decay 5e-4, 40 epochs, batch 128.

    Deviation (``shared/methods`` 7.10): the reference steps every sample by ``max_i eps_i / 4``
    (one value per batch, ignoring the configured step); here each sample steps
    ``train_attack.step_size * eps_i / eps``; ``frl.compat_step=true`` reproduces the reference.
    Earlier commits of the code used tau 0.1 and a2 0.1 and one normalisation of the summed loss.

    Example:
        >>> cfg = load_config("configs/at/cifar10_frl.yaml", ["at.init=runs/cifar10_trades"])
        >>> model = Trainer(cfg).fit()
    """

    attack_bn = "eval"

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.config_check(cfg)
        super().__init__(cfg)
        self.frl = cfg.frl
        self.multipliers: Multipliers | None = None
        self.w_nat = self.w_bdy = self.eps_scale = None

    @classmethod
    def config_check(cls, cfg: ExperimentConfig) -> None:
        if cfg.at.holdout < 1:
            raise ConfigError(f"at.holdout={cfg.at.holdout}: frl updates its class weights on a validation "
                              f"split of the training images; set at.holdout (the reference: 300 per class, "
                              f"3000 on CIFAR-10)")

    # -- the validation pass and the multipliers (once per epoch) --------------------------------
    def validate(self, trainer: TrainerView) -> ClassErrors:
        """Per-class clean and PGD errors of the deployed model on the held-out images."""
        frl = self.frl
        k = trainer.num_classes
        batch = trainer.check_batch()
        model = trainer.models.raw["model"]
        # FRL's validation pass is a fixed PGD (its code), whatever the training attack.
        attack = self.train_attack(name="pgd", step_size=frl.val_step_size, steps=frl.val_steps, random_start=True)
        generator = torch.Generator(device=batch.x.device)
        generator.manual_seed(self.cfg.seed + 7919 * (trainer.epoch + 1))
        counts = torch.zeros(k, device=batch.x.device)
        clean_correct, robust_correct = torch.zeros_like(counts), torch.zeros_like(counts)
        size = self.at.batch_size
        with bn_mode(model, "eval"), trainer.autocast():
            for start in range(0, batch.x.shape[0], size):
                x, y = batch.x[start:start + size], batch.y[start:start + size]
                x_adv = attack(model, x, y, noise=attack.init_noise(x, generator))
                with torch.no_grad():
                    clean_ok = (model(x).argmax(dim=-1) == y).float()
                    robust_ok = (model(x_adv).argmax(dim=-1) == y).float()
                counts += torch.bincount(y, minlength=k).float()
                clean_correct += torch.bincount(y, weights=clean_ok, minlength=k)
                robust_correct += torch.bincount(y, weights=robust_ok, minlength=k)
        stacked = trainer.all_mean(torch.stack([counts, clean_correct, robust_correct]))
        return class_errors(stacked[1], stacked[2], stacked[0])

    def on_epoch_start(self, trainer: TrainerView) -> dict[str, float] | None:
        if self.multipliers is None:
            self.multipliers = Multipliers.zeros(trainer.num_classes, trainer.device)
        errors = self.validate(trainer)
        # The reference halves the rate before its (1-based) epochs 40, 80, ...
        rate = self.frl.rate * 0.5 ** ((trainer.epoch + 1) // self.frl.rate_halving)
        self.multipliers = self.multipliers.update(errors, self.frl, rate)
        self._set_weights()
        return {"frl_clean_err": float(errors.total_clean), "frl_boundary_err": float(errors.total_boundary),
                "frl_worst_clean_err": float(errors.clean.max()),
                "frl_worst_boundary_err": float(errors.boundary.max()),
                "frl_max_w_nat": float(self.w_nat.max()), "frl_max_w_bdy": float(self.w_bdy.max()),
                "frl_max_eps_scale": float(self.eps_scale.max())}

    def _set_weights(self) -> None:
        self.w_nat, self.w_bdy, self.eps_scale = self.multipliers.weights()

    # -- one training batch ------------------------------------------------------------------------
    def loss(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        x, y = batch.x, batch.y
        a = self.cfg.train_attack
        if self.w_nat is None:  # no validation yet (a recipe driven by hand): uniform weights
            self.multipliers = Multipliers.zeros(ctx.num_classes, x.device)
            self._set_weights()
        w_nat, w_bdy, scale = self.w_nat[y], self.w_bdy[y], self.eps_scale[y]  # [B] each
        eps = a.eps * scale
        step = eps.max() / 4 if self.frl.compat_step else a.step_size * scale
        raw = models.raw["model"]
        # Built from floats: the per-sample radius and step go in at the call (no host sync).
        attack = self.train_attack(random_start=True)
        target = trades_attack_target(raw, x, self.bn)
        noise = (gaussian_start(x, TRADES_START_SIGMA, eps, ctx.generator) if a.norm == "linf"
                 else attack.init_noise(x, ctx.generator))
        x_adv = self.attack(raw, attack, x, target, kl_from_clean, noise, eps=eps, step_size=step)
        model = models["model"]
        clean = model(x).float()
        adv = model(x_adv).float()
        ce = F.cross_entropy(clean, y, reduction="none")
        kl = kl_divergence(F.log_softmax(clean, dim=-1), F.log_softmax(adv, dim=-1))
        loss = (w_nat * ce).sum() / w_nat.sum() + self.at.beta * (w_bdy * kl).sum() / w_bdy.sum()
        return loss, {"clean_acc": accuracy(clean, y), "adv_acc": accuracy(adv, y), "kl": kl.mean().detach(),
                      "mean_eps": eps.mean()}

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        m = self.multipliers
        return {} if m is None else {"nat": m.nat, "bdy": m.bdy, "margin": m.margin}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.multipliers = Multipliers(state["nat"], state["bdy"], state["margin"])
            self._set_weights()


__all__ = ["FRL", "ClassErrors", "Multipliers", "class_errors", "class_weights", "normalize_multipliers"]
