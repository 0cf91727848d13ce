"""Losses an attack maximises. Each maps ``(logits [B, N], target) -> scalar``.

They are sums over the batch, not means, so that the per-sample input gradient does not
shrink with the batch size (it matters for L2/L1 steps and for mixed-precision underflow).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Untargeted cross-entropy; ``target`` are labels ``int64 [B]``."""
    return F.cross_entropy(logits, target, reduction="sum")


def kl_from_clean(logits: torch.Tensor, clean_log_probs: torch.Tensor) -> torch.Tensor:
    """TRADES' inner loss KL(p_clean || p_adv) (Zhang et al. 2019, eq. 5); ``target`` = log p_clean [B, N]."""
    return kl_divergence(clean_log_probs, F.log_softmax(logits, dim=-1)).sum()


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p || q) ``[B]`` from log-probabilities.

    Written from log-probabilities rather than ``F.kl_div``: it has a vmap batching rule
    (``kl_div`` falls back to a slow per-task loop) and stays finite, gradient included,
    where a probability underflows to zero.
    """
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)
