"""Losses an attack maximises.

Per-sample losses map ``(logits [B, N], y [B]) -> [B]``; targeted ones also take the target
classes ``t [B]`` and are maximised to *reach* ``t``. Attacks sum them, not average, so the
per-sample input gradient does not shrink with the batch size (it matters for L2/L1 steps and
for mixed-precision underflow). ``LOSSES`` maps the config names (``attack.loss``) to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Untargeted cross-entropy summed over the batch; ``target`` are labels ``int64 [B]``."""
    return F.cross_entropy(logits, target, reduction="sum")


def ce_per_sample(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy ``[B]`` (untargeted: maximise it)."""
    return F.cross_entropy(logits, y, reduction="none")


def ce_targeted_per_sample(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Minus the cross-entropy to the target ``[B]`` (maximise it to reach ``t``)."""
    return -F.cross_entropy(logits, t, reduction="none")


def _true_and_best_other(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return true, other


def cw_per_sample(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin ``max_{j != y} z_j - z_y`` (Carlini & Wagner 2017) ``[B]``; > 0 means misclassified."""
    true, other = _true_and_best_other(logits, y)
    return other - true


def cw_targeted_per_sample(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Targeted CW margin ``z_t - max_{j != t} z_j`` ``[B]``; > 0 means ``t`` is predicted."""
    target, other = _true_and_best_other(logits, t)
    return target - other


def dlr_per_sample(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein, ICML 2020, eq. 6) ``[B]``, scale invariant:
    ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)`` with ``z_pi`` the logits sorted descending."""
    true, other = _true_and_best_other(logits, y)
    top = logits.sort(dim=1, descending=True).values
    return -(true - other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_per_sample(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Croce & Hein 2020, eq. 7) ``[B]``:
    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``; needs at least 4 classes."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    target = logits.gather(1, t[:, None]).squeeze(1)
    top = logits.sort(dim=1, descending=True).values
    return -(true - target) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


LOSSES = {"ce": ce_per_sample, "dlr": dlr_per_sample, "cw": cw_per_sample}
TARGETED_LOSSES = {"ce": ce_targeted_per_sample, "dlr": dlr_targeted_per_sample, "cw": cw_targeted_per_sample}


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
