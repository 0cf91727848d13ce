"""Attacks as pure functions of ``(forward, x, y, loss)`` (``metarobust list attacks``).

Every attack is called as ``attack(forward, x, y, loss=..., noise=...)`` and returns adversarial
inputs in [0, 1]; randomness is drawn beforehand by ``attack.init_noise(x, generator)`` so the
same call runs in a per-task loop and under ``torch.func.vmap``.
"""

from __future__ import annotations

from metarobust.attacks import apgd, fab, pgd, reference, square  # noqa: F401  (each registers its attacks)
from metarobust.attacks.apgd import APGD
from metarobust.attacks.fab import FAB
from metarobust.attacks.losses import cross_entropy_sum, kl_from_clean
from metarobust.attacks.mifgsm import mi_fgsm
from metarobust.attacks.pgd import PGD, fgsm, fgsm_rs
from metarobust.attacks.reference import AutoAttackReference
from metarobust.attacks.registry import ATTACKS
from metarobust.attacks.square import Square, SquareResult
from metarobust.config import AttackConfig


def build_attack(cfg: AttackConfig):
    """The attack named by ``cfg.name`` with its budget."""
    return ATTACKS.get(cfg.name, "attack.name")(cfg)


__all__ = ["APGD", "ATTACKS", "FAB", "PGD", "AutoAttackReference", "Square", "SquareResult", "fgsm", "fgsm_rs",
           "build_attack", "cross_entropy_sum", "kl_from_clean", "mi_fgsm"]
