"""Knowledge-distillation losses of the standard-AT recipes: MAT's mutual distillation, LTD's
soft labels and Hou et al.'s clean-data distillation from the initial model.

All take logits ``[B, K]`` (any float dtype; computed in float32), sum over classes and average
over the batch (the reduction of TRADES' KL, ``shared/methods/ADVERSARIAL_TRAINING.md`` section 2;
a per-element mean would be K times smaller).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarobust.attacks.losses import kl_divergence


def tempered_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """``tau^2 (1/B) sum_i KL(p_T^tau(x_i) || p_S^tau(x_i))`` with ``p^tau = softmax(z / tau)``
    (Hinton et al.'s distillation term; the ``tau^2`` keeps its gradient scale independent of
    tau). Gradients flow into both arguments: detach the teacher's logits to make it a teacher.

    Example:
        >>> tempered_kl(peer_logits.detach(), logits, temperature=2.0)
    """
    t = temperature
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    return t * t * kl_divergence(log_p, log_q).mean()


def soft_cross_entropy(target_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``(1/B) sum_i H(q_i, softmax(z_i)) = -(1/B) sum_i sum_k q_ik log p_ik``: cross-entropy
    against soft labels ``q [B, K]`` (rows summing to 1). Equals ``F.cross_entropy`` for one-hot
    ``q``."""
    return -(target_probs.float() * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


class Tempered(nn.Module):
    """``module(x) / temperature``: a model with a fixed output temperature (LTD's student).

    It wraps rather than copies, so ``train()``/``eval()`` (and :func:`bn_mode`) reach the
    wrapped model's BatchNorms. Shapes: as ``module``.

    Example:
        >>> student = Tempered(model, 2.0)
        >>> x_adv = attack(student, x, y)   # the attack sees the tempered logits
    """

    def __init__(self, module: nn.Module, temperature: float) -> None:
        super().__init__()
        self.module = module
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) / self.temperature


__all__ = ["Tempered", "soft_cross_entropy", "tempered_kl"]
