"""White-box attacks as pure functions of ``(forward, x, y, loss)`` (``metarobust list attacks``)."""

from __future__ import annotations

from metarobust.attacks.losses import cross_entropy_sum, kl_from_clean
from metarobust.attacks.pgd import LinfPGD
from metarobust.config import AttackConfig
from metarobust.registry import Registry

ATTACKS = Registry("attack")


@ATTACKS.register("pgd", "L-inf PGD (Madry et al. 2018), random start; steps=1 + step 1.25 eps is FGSM-RS")
def _pgd(cfg: AttackConfig) -> LinfPGD:
    return LinfPGD(cfg.eps, cfg.step_size, cfg.steps, cfg.random_start)


@ATTACKS.register("fgsm", "FGSM (Goodfellow et al. 2015): one signed step of size eps, no random start")
def _fgsm(cfg: AttackConfig) -> LinfPGD:
    return LinfPGD(cfg.eps, cfg.eps, 1, random_start=False)


def build_attack(cfg: AttackConfig) -> LinfPGD:
    """The attack named by ``cfg.name`` with its budget."""
    return ATTACKS.get(cfg.name, "attack.name")(cfg)


__all__ = ["ATTACKS", "LinfPGD", "build_attack", "cross_entropy_sum", "kl_from_clean"]
