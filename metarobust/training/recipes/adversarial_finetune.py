"""Adversarial fine-tuning with a dynamically regulated adversary (Hou, Zhou, Han, Musilek & Li,
"Adversarial Fine-tune with Dynamically Regulated Adversary", arXiv 2204.13232, 2022).

No code was released and only the abstract could be read: everything below the abstract's two
ideas (fine-tune a naturally trained model; a "training-friendly" attack) is a reconstruction,
[R] in ``shared/methods/ADVERSARIAL_TRAINING.md`` 4.3.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metarobust.attacks.pgd import PGD
from metarobust.config import ExperimentConfig, check_value, config_section
from metarobust.data.episode import EpisodeBatch
from metarobust.errors import ConfigError
from metarobust.models.dual_bn import bn_route
from metarobust.training.objectives import accuracy, tempered_kl
from metarobust.training.recipes.advprop import has_batchnorm
from metarobust.training.recipes.base import (
    Models,
    Recipe,
    Role,
    Stats,
    StepContext,
    bn_mode,
    register_recipe,
)


@config_section("finetune")
@dataclass
class FinetuneConfig:
    """Adversarial fine-tuning (``recipe: adversarial_finetune``; Hou et al. 2022), a
    reconstruction [R]: start from ``at.init`` (a naturally trained model f_0)."""

    distill_weight: float = 1.0
    """lambda of ``KL(p_0(x) || p(x))`` on clean images, the frozen f_0 as teacher."""
    eps_ramp: float = 0.5
    """Fraction of fine-tuning over which the attack radius grows linearly from 0 to
    ``train_attack.eps`` (0: the full radius from the start)."""
    early_stop: bool = True
    """Per sample, stop the attack once the sample is misclassified (FAT-style)."""
    aux_bn: bool = False
    """Route adversarial images through auxiliary BatchNorms (AdvProp-style disentangling)."""

    def check(self) -> None:
        check_value(self.distill_weight >= 0, "finetune.distill_weight", self.distill_weight, "a weight >= 0")
        check_value(0 <= self.eps_ramp <= 1, "finetune.eps_ramp", self.eps_ramp, "a fraction of training in [0, 1]")


def ramped_eps(eps: float, progress: float, ramp: float) -> float:
    """The attack radius at ``progress`` (fraction of training done): linear from 0 to ``eps``
    over the first ``ramp`` of training, then ``eps`` (``ramp=0``: ``eps`` throughout)."""
    return eps if ramp <= 0 else eps * min(1.0, progress / ramp)


@register_recipe("adversarial_finetune", "Adversarial fine-tuning (Hou et al. 2022) [R]: from a natural "
                                           "model f_0, CE on eps-ramped early-stopped PGD + KL to f_0")
class AdversarialFinetune(Recipe):
    """Fine-tune a naturally trained model ``f_0`` (``at.init``, required) into a robust one
    while keeping its clean accuracy, the abstract's "transfer learning-based" strategy:

    ``L = CE(f(x_adv), y) + lambda (1/B) sum_i KL(p_0(x_i) || p(x_i))``

    - the second term "disentangles" the adversarial examples' harm to clean accuracy by
      distilling, on clean images, from a frozen copy of ``f_0`` (eval mode);
      ``lambda = finetune.distill_weight`` (1) [R];
    - the "dynamically regulated adversary": the radius grows linearly from 0 to
      ``train_attack.eps`` over the first ``finetune.eps_ramp`` (half) of fine-tuning, the
      step size scaled with it, and each sample stops moving once it is misclassified
      (``finetune.early_stop``, FAT-style), cheaper and gentler than full PGD [R];
    - optionally (``finetune.aux_bn``) adversarial images go through auxiliary BatchNorms
      (AdvProp-style), the clean distillation through the main ones, which are deployed [R].

    What is reconstructed: the form of both terms, lambda, the ramp and the early stop; the
    paper's own "training-friendly attack" and datasets are unknown. The attack runs in eval-mode
    BN. ``configs/at/cifar10_adversarial_finetune.yaml``: 10 epochs from ``runs/cifar10_natural``,
    SGD lr 0.01 (a fine-tuning rate, [R]).

    Example:
        >>> cfg = load_config("configs/at/cifar10_adversarial_finetune.yaml",
        ...                   ["at.init=runs/cifar10_natural"])
        >>> model = Trainer(cfg).fit()
    """

    attack_bn = "eval"

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        if not cfg.at.init:  # checked here, not at config load, so that shipped configs load without it
            raise ConfigError("at.init is not set; adversarial_finetune starts from a naturally trained "
                              "model f_0: give its run folder or checkpoint, e.g. "
                              "at.init=runs/cifar10_natural")
        self.ft = cfg.finetune

    @classmethod
    def config_check(cls, cfg: ExperimentConfig) -> None:
        if cfg.finetune.aux_bn and not has_batchnorm(cfg.model):
            raise ConfigError(f"finetune.aux_bn=true but model.name={cfg.model.name!r} with model.batch_norm="
                              f"{cfg.model.batch_norm!r} has no BatchNorm to double; set finetune.aux_bn=false")

    def roles(self) -> list[Role]:
        return [Role("model", checkpoint=self.at.init, dual_bn=self.cfg.finetune.aux_bn),
                Role("reference", trainable=False, checkpoint=self.at.init)]

    def attack_at(self, progress: float) -> PGD:
        """The training attack at ``progress``: ``train_attack`` with the ramped radius and step."""
        a = self.cfg.train_attack
        eps = ramped_eps(a.eps, progress, self.ft.eps_ramp)
        step = a.step_size * (eps / a.eps if a.eps > 0 else 0.0)
        return self.train_attack(eps=eps, step_size=step, early_stop=self.ft.early_stop)

    def loss(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        x, y = batch.x, batch.y
        attack = self.attack_at(ctx.progress)
        module = models.modules["model"]
        with torch.no_grad(), bn_mode(models.raw["reference"], "eval"):
            reference = models.raw["reference"](x).float()
        route = bn_route(module, "aux") if self.ft.aux_bn else contextlib.nullcontext()
        with route:
            x_adv = self.attack(models.raw["model"], attack, x, y, noise=attack.init_noise(x, ctx.generator))
            adv = models["model"](x_adv).float()
        clean = models["model"](x).float()
        adv_ce = F.cross_entropy(adv, y)
        distill = tempered_kl(reference, clean)
        return adv_ce + self.ft.distill_weight * distill, {
            "adv_acc": accuracy(adv, y), "clean_acc": accuracy(clean, y), "adv_ce": adv_ce.detach(),
            "distill_kl": distill.detach(), "eps": torch.tensor(float(attack.eps), device=x.device)}


__all__ = ["AdversarialFinetune", "ramped_eps"]
