"""AdvProp (Xie, Tan, Gong, Wang, Yuille & Le, "Adversarial Examples Improve Image
Recognition", CVPR 2020, arXiv 1911.09665; PyTorch port ``tingxueronghua/pytorch-classification-advprop``
@982dbe9, written with guidance from the first author)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metarobust.config import ExperimentConfig, ModelConfig, config_section
from metarobust.data.episode import EpisodeBatch
from metarobust.errors import ConfigError
from metarobust.models.dual_bn import bn_route
from metarobust.training.objectives import accuracy
from metarobust.training.recipes.base import Models, Recipe, Role, Stats, StepContext, register_recipe


@config_section("advprop")
@dataclass
class AdvPropConfig:
    """AdvProp (``recipe: advprop``; Xie et al. 2020): the attack is ``train_attack``."""

    targeted: bool = True
    """Attack toward a random wrong class (the PyTorch port's default); false: away from ``y``."""


def has_batchnorm(model: ModelConfig) -> bool:
    """Whether ``model`` is built with BatchNorm layers to double (``model.batch_norm`` none, and the
    BN-free small CNN under ``auto``, have none)."""
    return not (model.batch_norm == "none" or (model.batch_norm == "auto" and model.name == "small_cnn"))


def random_wrong_labels(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly drawn class other than ``y`` for every sample ``[B]`` (the port's target)."""
    shift = torch.randint(1, num_classes, y.shape, generator=generator, device=y.device)
    return (y + shift) % num_classes


@register_recipe("advprop", "AdvProp (Xie et al. 2020): auxiliary BatchNorms for adversarial examples, "
                              "CE(main BN, x) + CE(aux BN, x_adv); main BN at test")
class AdvProp(Recipe):
    """Every BatchNorm gets an auxiliary twin (:mod:`metarobust.models.dual_bn`); convolution
    and linear weights are shared. Per mini-batch ``(x, y)`` ``[B, ...]``:

    1. ``x_adv`` = PGD (``train_attack``) on the network routed through the **auxiliary** BNs,
       in eval mode as the port (aux running statistics; ``at.attack_bn=train`` uses batch
       statistics, updating only the aux running statistics). By default the attack is
       targeted at a random wrong class (``advprop.targeted``, the port's default); untargeted
       otherwise.
    2. ``L = CE(f_main(x), y) + CE(f_aux(x_adv), y)``: one forward of ``[x; x_adv]`` with the
       "mix" route, the clean half through the main BNs, the adversarial half through the
       auxiliary ones. The paper writes this sum; the port averages CE over all 2B outputs,
       which is half of it (the same as halving the learning rate).
    3. At test time only the main BNs exist: the deployed model is a copy with the auxiliary
       BNs stripped, so robustness is never measured through them by accident.

    The main BNs therefore never see an adversarial batch: neither their running statistics nor
    their batch statistics.

    Attack strength: the paper uses PGD at eps 1..4 pixel units (ImageNet), step 1, ``eps + 1``
    iterations, weaker for smaller models; the port's ResNet-50 README example is PGD-1 at eps 1.
    ``configs/at/cifar10_advprop.yaml`` takes eps 1/255, 2 steps of 1/255 (AdvProp aims at clean
    accuracy, not robustness).

    Example:
        >>> cfg = load_config("configs/at/cifar10_advprop.yaml", ["advprop.targeted=false"])
        >>> model = Trainer(cfg).fit()                 # plain BatchNorms (the main ones)
    """

    attack_bn = "eval"

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.targeted = cfg.advprop.targeted

    @classmethod
    def config_check(cls, cfg: ExperimentConfig) -> None:
        if not has_batchnorm(cfg.model):
            raise ConfigError(f"model.batch_norm={cfg.model.batch_norm!r} with model.name={cfg.model.name!r} has no "
                              f"BatchNorm; advprop gives each BN an auxiliary twin: use model.batch_norm=running "
                              f"(or a model with BN)")

    def roles(self) -> list[Role]:
        return [Role("model", checkpoint=self.at.init, dual_bn=True)]

    def loss(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        x, y = batch.x, batch.y
        module = models.modules["model"]
        if self.targeted:
            attack = self.train_attack(targeted=True)
            goal = random_wrong_labels(y, ctx.num_classes, ctx.generator)
        else:
            attack, goal = self.train_attack(targeted=False), y
        with bn_route(module, "aux"):
            noise = attack.init_noise(x, ctx.generator)
            x_adv = self.attack(models.raw["model"], attack, x, goal, noise=noise)
        with bn_route(module, "mix", split=x.shape[0]):
            logits = models["model"](torch.cat([x, x_adv])).float()
        clean, adv = logits.split(x.shape[0])
        clean_ce, adv_ce = F.cross_entropy(clean, y), F.cross_entropy(adv, y)
        return clean_ce + adv_ce, {"clean_acc": accuracy(clean, y), "adv_acc": accuracy(adv, y),
                                   "clean_ce": clean_ce.detach(), "adv_ce": adv_ce.detach()}


__all__ = ["AdvProp", "has_batchnorm", "random_wrong_labels"]
