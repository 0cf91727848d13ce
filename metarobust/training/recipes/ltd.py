"""Low Temperature Distillation (Chen & Lee, "LTD: Low Temperature Distillation for Robust
Adversarial Training", arXiv 2111.02331; v4 retitled "...for Gradient Masking-free Adversarial
Training"). The authors' repository (``CNOCycle/robust_model``) holds models and AutoAttack logs,
no training code; the temperatures and which terms take soft labels are [R]
(``shared/methods/ADVERSARIAL_TRAINING.md`` 4.2)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metarobust.attacks.losses import kl_from_clean
from metarobust.config import ExperimentConfig, ModelConfig, check_value, config_section
from metarobust.data.episode import EpisodeBatch
from metarobust.errors import ConfigError
from metarobust.runs import load_checkpoint
from metarobust.training.objectives import (
    TRADES_START_SIGMA,
    Tempered,
    accuracy,
    gaussian_start,
    soft_cross_entropy,
    trades_kl,
)
from metarobust.training.recipes.base import (
    Models,
    Recipe,
    Role,
    Stats,
    StepContext,
    bn_mode,
    register_recipe,
    saved_model_config,
)


@config_section("ltd")
@dataclass
class LTDConfig:
    """Low Temperature Distillation (``recipe: ltd``; Chen & Lee 2021). Temperatures are [R]."""

    teacher: str | None = None
    """Run folder or ``.pt`` checkpoint of the (adversarially trained) teacher; required. Its
    architecture is read from the checkpoint's config (else ``model``)."""
    teacher_temperature: float = 0.5
    """tau_T of the soft labels ``softmax(f_T(x) / tau_T)`` ("relatively low")."""
    student_temperature: float = 1.0
    """tau_S: the student's fixed temperature, the same at training and test (folded into its
    last layer in the deployed model)."""

    def check(self) -> None:
        for key in ("teacher_temperature", "student_temperature"):
            check_value(getattr(self, key) > 0, f"ltd.{key}", getattr(self, key), "a temperature > 0")


def checkpoint_model_config(path: str, default: ModelConfig) -> ModelConfig:
    """The architecture a checkpoint was trained with (its saved ``config.model``), else
    ``default``; a :class:`ConfigError` naming ``ltd.teacher`` when nothing is there."""
    try:
        state = load_checkpoint(path, "cpu")
    except ConfigError as exc:
        raise ConfigError(f"ltd.teacher={path!r}: {exc}; train a robust teacher first, e.g. "
                          f"metarobust train configs/at/cifar10_trades.yaml") from None
    return saved_model_config(state.get("config") or {}, default)


def fold_temperature(model: nn.Module, temperature: float) -> nn.Module:
    """A copy of ``model`` whose logits are divided by ``temperature``, folded into its last
    linear layer ``model.head`` (weights and bias / tau): the deployed model computes exactly the
    tempered logits it was trained with, with no wrapper to save."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"ltd.student_temperature={temperature}: the model has no linear `head` to fold "
                          f"the temperature into; use a registered model or ltd.student_temperature=1")
    folded = copy.deepcopy(model)
    with torch.no_grad():
        folded.head.weight.div_(temperature)
        folded.head.bias.div_(temperature)
    return folded


@register_recipe("ltd", "LTD (Chen & Lee 2021) [R]: TRADES with the one-hot CE replaced by soft labels "
                          "of a frozen teacher at a low temperature; fixed student temperature")
class LTD(Recipe):
    """TRADES with soft labels from a frozen, adversarially trained teacher ``f_T``
    (``ltd.teacher``, a run folder or checkpoint; eval mode, ``requires_grad=False``):

    ``L = H(q(x), p_S(x)) + beta (1/B) sum_i KL(p_S(x_i) || p_S(x'_i))``, with
    ``q(x) = softmax(f_T(x) / tau_T)`` and ``p_S = softmax(f_S / tau_S)``.

    The teacher's temperature ``tau_T`` (``ltd.teacher_temperature``, 0.5) is "relatively low"
    (defensive distillation used ~100); the student's ``tau_S`` (``student_temperature``, 1) is
    fixed and identical at training and test: every use of the student (soft CE, KL, the KL-PGD
    attack) sees ``f_S / tau_S``, and the deployed model has ``1 / tau_S`` folded into its last
    layer, so evaluation attacks the same logits training did (scaling only at test time is how
    defensive distillation masked gradients). Soft labels are computed on the clean images and
    replace the one-hot CE only; the KL term and the attack are TRADES' ([R]: which terms the paper
    softens is unverified). Attack: TRADES' KL-PGD (eval mode, start ``x + 0.001 N(0, I)``).
    ``at.beta`` = 6.

    AWP (``awp.gamma``): the released LTD models were trained inside a TRADES-AWP codebase, so
    ``awp.gamma=0.005 awp.warmup=9`` (TRADES-AWP's defaults; LTD's own are unknown [?]) perturbs
    the student's weights against this same loss before each step (:mod:`metarobust.training.awp`);
    off by default, LTD on plain TRADES. The teacher's architecture is read from its
    checkpoint's config.

    Example:
        >>> cfg = load_config("configs/at/cifar10_ltd.yaml", ["ltd.teacher=runs/cifar10_trades"])
        >>> model = Trainer(cfg).fit()
    """

    attack_bn = "eval"
    supports_awp = True

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        ltd = cfg.ltd
        if not ltd.teacher:  # checked here, not at config load, so that shipped configs load without it
            raise ConfigError("ltd.teacher is not set; ltd distils from a frozen robust teacher: give its "
                              "run folder or checkpoint, e.g. ltd.teacher=runs/cifar10_trades")
        self._roles: list[Role] | None = None
        self.tau_t, self.tau_s = ltd.teacher_temperature, ltd.student_temperature

    @classmethod
    def config_check(cls, cfg: ExperimentConfig) -> None:
        teacher = cfg.ltd.teacher
        if teacher:
            path = Path(teacher)
            if not ((path / "checkpoints" / "last.pt").is_file() if path.is_dir() else path.is_file()):
                raise ConfigError(f"ltd.teacher={teacher!r} is not a run folder holding "
                                  f"checkpoints/last.pt nor a .pt checkpoint; train a robust teacher first, "
                                  f"e.g. metarobust train configs/at/cifar10_trades.yaml")

    def roles(self) -> list[Role]:
        if self._roles is None:  # the teacher's architecture is read from its checkpoint, once
            teacher = checkpoint_model_config(self.cfg.ltd.teacher, self.cfg.model)
            self._roles = [Role("model", checkpoint=self.at.init),
                           Role("teacher", trainable=False, model=teacher, checkpoint=self.cfg.ltd.teacher)]
        return self._roles

    def soft_labels(self, models: Models, x: torch.Tensor) -> torch.Tensor:
        """The teacher's tempered soft labels ``q = softmax(f_T(x) / tau_T)`` ``[B, K]``."""
        teacher = models.raw["teacher"]
        with bn_mode(teacher, "eval"), torch.no_grad():
            return F.softmax(teacher(x).float() / self.tau_t, dim=-1)

    def inputs(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q [B, K], x_adv [B, C, H, W])``: the teacher's soft labels of the clean images and
        the KL-PGD examples against the tempered student."""
        x = batch.x
        q = self.soft_labels(models, x)
        raw = Tempered(models.raw["model"], self.tau_s)
        with bn_mode(raw, self.bn), torch.no_grad():
            target = F.log_softmax(raw(x).float(), dim=-1)
        attack = self.train_attack()
        noise = gaussian_start(x, TRADES_START_SIGMA, self.cfg.train_attack.eps, ctx.generator)
        return q, self.attack(raw, attack, x, target, kl_from_clean, noise)

    def objective(self, forward: Callable[[torch.Tensor], torch.Tensor], batch: EpisodeBatch,
                  inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        q, x_adv = inputs
        clean = forward(batch.x).float() / self.tau_s
        adv = forward(x_adv).float() / self.tau_s
        soft = soft_cross_entropy(q, clean)
        robust = trades_kl(clean, adv)
        return soft + self.at.beta * robust, {
            "clean_acc": accuracy(clean, batch.y), "adv_acc": accuracy(adv, batch.y), "soft_ce": soft.detach(),
            "kl": robust.detach(), "teacher_acc": accuracy(q, batch.y)}

    def deployed(self, models: Models) -> nn.Module:
        """The student with ``1 / tau_S`` folded into its last layer (itself when ``tau_S = 1``)."""
        student = models.modules["model"]
        return student if self.tau_s == 1 else fold_temperature(student, self.tau_s)


__all__ = ["LTD", "checkpoint_model_config", "fold_temperature"]
