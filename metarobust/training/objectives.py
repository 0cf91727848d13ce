"""Outer objectives: what a task is scored on after adaptation.

Each returns ``(loss, stats)`` for one task's query set given the fast weights; ``stats`` are
0-dim tensors (no host synchronisation). Attacks run on detached fast weights: the adversarial
query is a constant of the meta-gradient, as in AQ and R-MAML.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metarobust.attacks import LinfPGD, cross_entropy_sum, kl_from_clean
from metarobust.attacks.losses import kl_divergence
from metarobust.meta.functional import FunctionalForward, Params, bind, detached

Stats = dict[str, torch.Tensor]


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=-1) == y).float().mean()


def clean_ce(forward: FunctionalForward, fast: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """MAML's outer loss: cross-entropy on the clean query."""
    logits = forward(fast, x)
    return F.cross_entropy(logits, y), {"clean_acc": accuracy(logits.detach(), y)}


def adversarial_ce(forward: FunctionalForward, fast: Params, x: torch.Tensor, y: torch.Tensor,
                   attack: LinfPGD, noise: torch.Tensor | None) -> tuple[torch.Tensor, Stats]:
    """Adversarial querying (Goldblum et al., NeurIPS 2020): CE on the query attacked through
    the adapted weights only; the clean query is not trained on."""
    x_adv = attack(bind(forward, detached(fast)), x, y, cross_entropy_sum, noise)
    adv_logits = forward(fast, x_adv)
    with torch.no_grad():
        clean_acc = accuracy(forward(detached(fast), x), y)
    return F.cross_entropy(adv_logits, y), {"clean_acc": clean_acc, "adv_acc": accuracy(adv_logits.detach(), y)}


def robust_regularised(forward: FunctionalForward, fast: Params, x: torch.Tensor, y: torch.Tensor,
                       attack: LinfPGD, noise: torch.Tensor | None, form: str,
                       weight: float) -> tuple[torch.Tensor, Stats]:
    """R-MAML's meta-objective (Wang et al., ICLR 2021, eq. 3): clean CE + weight * R.

    ``form="trades"``: R = KL(p_clean || p_adv), the attack maximising that KL (TRADES,
    Zhang et al. 2019); gradients flow through both distributions, as in TRADES.
    ``form="ce"``: R = CE on the adversarial query (the "AT" regulariser).
    """
    clean_logits = forward(fast, x)
    clean = F.cross_entropy(clean_logits, y)
    frozen = bind(forward, detached(fast))
    if form == "trades":
        x_adv = attack(frozen, x, F.log_softmax(clean_logits.detach(), dim=-1), kl_from_clean, noise)
        adv_logits = forward(fast, x_adv)
        reg = kl_divergence(F.log_softmax(clean_logits, dim=-1), F.log_softmax(adv_logits, dim=-1)).mean()
    else:
        x_adv = attack(frozen, x, y, cross_entropy_sum, noise)
        adv_logits = forward(fast, x_adv)
        reg = F.cross_entropy(adv_logits, y)
    stats = {"clean_acc": accuracy(clean_logits.detach(), y), "adv_acc": accuracy(adv_logits.detach(), y),
             "robust_term": reg.detach()}
    return clean + weight * reg, stats
