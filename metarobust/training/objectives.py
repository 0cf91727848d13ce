"""The shared losses of every recipe: outer objectives of meta-learning, robust inner losses, and
the pieces of the adversarial-training losses (TRADES' KL, distillation, attack starts).

Each outer objective returns ``(loss, stats)`` for one task's query set given the fast weights;
``stats`` are 0-dim tensors (no host synchronisation). Attacks run on detached fast weights: the
adversarial input is a constant of the meta-gradient, as in the AQ, ADML and R-MAML code.

The robust *inner* losses (:func:`adversarial_step_loss`, :func:`robust_step_loss`) are
:data:`~metarobust.meta.maml.StepLoss` es: at every inner step they attack the support set
against the current fast weights, then return the loss that step differentiates.

Shapes (one task; ``vmap`` adds the task dimension): ``x [B, C, H, W]`` in [0, 1], ``y [B]``;
``noise`` from ``attack.init_noise`` (``None`` without random start); per-step noise
``[S, B, C, H, W]`` (``S`` inner steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarobust.attacks import cross_entropy_sum, kl_from_clean, threat
from metarobust.attacks.losses import kl_divergence
from metarobust.meta.functional import FunctionalForward, Params, bind, detached
from metarobust.meta.maml import InnerLoss, StepLoss
from metarobust.precision import full_precision

Stats = dict[str, torch.Tensor]
ROBUST_FORMS = ("trades", "ce")
TRADES_START_SIGMA = 0.001
"""TRADES' attack starts at ``x + 0.001 N(0, I)`` (its code), not at a uniform point of the ball;
MART, FRL, BAT and LTD start there too."""


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of ``argmax(logits) == y`` as a 0-dim tensor (no host sync, no graph)."""
    return (logits.detach().argmax(dim=-1) == y).float().mean()


def trades_kl(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """``(1/B) sum_i KL(p(x_i) || p(x'_i))`` (TRADES, Zhang et al. 2019, eq. 5: sum over classes,
    mean over the batch, as its ``KLDivLoss(size_average=False) / B``); gradients flow through
    both arguments. R-MAML's TRADES regulariser is the same term."""
    return kl_divergence(F.log_softmax(full_precision(clean_logits), dim=-1),
                         F.log_softmax(full_precision(adv_logits), dim=-1)).mean()


def tempered_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """``tau^2 (1/B) sum_i KL(p_T^tau(x_i) || p_S^tau(x_i))`` with ``p^tau = softmax(z / tau)``
    (Hinton et al.'s distillation term; the ``tau^2`` keeps its gradient scale independent of
    tau). Gradients flow into both arguments: detach the teacher's logits to make it a teacher.
    Logits ``[B, K]`` of any float dtype, computed in float32.

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

    It wraps rather than copies, so ``train()``/``eval()`` reach the wrapped model's BatchNorms.

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


def _per_sample_eps(eps: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(threat.per_sample(eps, x), device=x.device, dtype=x.dtype)


def gaussian_start(x: torch.Tensor, sigma: float, eps: float | torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """Noise for :class:`~metarobust.attacks.PGD` (``random_start=True``, L-inf) that starts at
    ``x + sigma * N(0, I)`` instead of a uniform point of the ball: the start TRADES, MART, FRL and
    BAT use (``sigma = 0.001``). PGD scales the raw noise by ``eps``, so it is divided by ``eps``."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return noise * sigma / _per_sample_eps(eps, x).clamp_min(1e-12)


def start_at(x_start: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Noise for an L-inf :class:`~metarobust.attacks.PGD` (``random_start=True``) that starts
    exactly at ``x_start`` (a point of the eps-ball around ``x``, e.g. another attack's output:
    Backward Smoothing, local balls). PGD scales the raw L-inf noise by ``eps``."""
    return (x_start - x) / _per_sample_eps(eps, x).clamp_min(1e-12)


def craft(forward: FunctionalForward, fast: Params, x: torch.Tensor, y: torch.Tensor, attack,
          noise: torch.Tensor | None, form: str = "ce", clean_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Adversarial ``x`` against the *detached* fast weights (a constant of the meta-gradient).

    ``form="ce"``: the attack maximises the cross-entropy to ``y``; ``form="trades"``: it
    maximises KL(p_clean || p_adv) (TRADES, Zhang et al. 2019, eq. 5), ``p_clean`` from
    ``clean_logits`` when given (saves a forward pass), else computed here.
    """
    frozen = bind(forward, detached(fast))
    if form == "trades":
        if clean_logits is None:
            clean_logits = frozen(x)
        target = F.log_softmax(full_precision(clean_logits.detach()), dim=-1)
        return attack(frozen, x, target, kl_from_clean, noise)
    return attack(frozen, x, y, cross_entropy_sum, noise)


def regulariser(clean_logits: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor, form: str) -> torch.Tensor:
    """R-MAML's robustness term R (Wang et al., ICLR 2021, eq. 3), averaged over the points:
    ``trades``: KL(p_clean || p_adv), gradients through both distributions as in TRADES;
    ``ce``: cross-entropy of the adversarial logits (the "AT" form)."""
    if form == "trades":
        return trades_kl(clean_logits, adv_logits)
    return F.cross_entropy(full_precision(adv_logits), y)


def clean_ce(forward: FunctionalForward, fast: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """MAML's outer loss: cross-entropy on the clean query."""
    logits = forward(fast, x)
    return F.cross_entropy(logits, y), {"clean_acc": accuracy(logits.detach(), y)}


def adversarial_ce(forward: FunctionalForward, fast: Params, x: torch.Tensor, y: torch.Tensor,
                   attack, noise: torch.Tensor | None) -> tuple[torch.Tensor, Stats]:
    """Adversarial querying (Goldblum et al., NeurIPS 2020): CE on the query attacked through
    the adapted weights only; the clean query is not trained on."""
    x_adv = craft(forward, fast, x, y, attack, noise)
    adv_logits = forward(fast, x_adv)
    with torch.no_grad():
        clean_acc = accuracy(forward(detached(fast), x), y)
    return F.cross_entropy(adv_logits, y), {"clean_acc": clean_acc, "adv_acc": accuracy(adv_logits.detach(), y)}


def robust_regularised(forward: FunctionalForward, fast: Params, x: torch.Tensor, y: torch.Tensor,
                       attack, noise: torch.Tensor | None, form: str,
                       weight: float) -> tuple[torch.Tensor, Stats]:
    """R-MAML's meta-objective (Wang et al., ICLR 2021, eq. 3): clean CE + weight * R.

    ``form="trades"``: R = KL(p_clean || p_adv), the attack maximising that KL (TRADES,
    Zhang et al. 2019); gradients flow through both distributions, as in TRADES.
    ``form="ce"``: R = CE on the adversarial query (the "AT" regulariser).
    """
    clean_logits = forward(fast, x)
    x_adv = craft(forward, fast, x, y, attack, noise, form, clean_logits)
    adv_logits = forward(fast, x_adv)
    reg = regulariser(clean_logits, adv_logits, y, form)
    stats = {"clean_acc": accuracy(clean_logits.detach(), y), "adv_acc": accuracy(adv_logits.detach(), y),
             "robust_term": reg.detach()}
    return F.cross_entropy(clean_logits, y) + weight * reg, stats


def trades_support_query(forward: FunctionalForward, fast: Params, sx: torch.Tensor, sy: torch.Tensor,
                         qx: torch.Tensor, qy: torch.Tensor, attack, noise: torch.Tensor | None,
                         weight: float, kl_batch: tuple[torch.Tensor, torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, Stats]:
    """TRADES-regularised MAML as R-MAML's TRADES code writes it (META.md 2.3): clean query CE
    + ``weight`` x KL(p_clean || p_adv) over the support *and* query points at the adapted weights.

    The KL batch is ``cat(support, query)`` in one forward pass (its batch-norm statistics are
    those of the union), or ``kl_batch = (x, y)`` when given: the reference code's choice, every
    task's support and query of the meta-batch at this task's fast weights. ``noise`` is shaped
    like the KL batch. ``adv_acc``: on the attacked query, or on the whole ``kl_batch``.
    """
    query_logits = forward(fast, qx)
    own = kl_batch is None
    both_x, both_y = (torch.cat([sx, qx]), torch.cat([sy, qy])) if own else kl_batch
    both_logits = forward(fast, both_x)
    x_adv = craft(forward, fast, both_x, both_y, attack, noise, "trades", both_logits)
    adv_logits = forward(fast, x_adv)
    reg = regulariser(both_logits, adv_logits, both_y, "trades")
    adv_acc = accuracy(adv_logits[sx.shape[0]:].detach(), qy) if own else accuracy(adv_logits.detach(), both_y)
    stats = {"clean_acc": accuracy(query_logits.detach(), qy), "adv_acc": adv_acc, "robust_term": reg.detach()}
    return F.cross_entropy(query_logits, qy) + weight * reg, stats


def adml_cross(forward: FunctionalForward, clean_fast: Params, adv_fast: Params, x: torch.Tensor,
               y: torch.Tensor, attack, noise: torch.Tensor | None) -> tuple[torch.Tensor, Stats]:
    """ADML's meta-loss (Yin et al. 2018, as re-implemented in the AQ code; META.md 2.1):
    ``1/2 [CE(f_adv_fast(x), y) + CE(f_clean_fast(x_adv), y)]``: the weights adapted on the
    adversarial support are scored on the clean query, the clean-adapted weights on the query
    attacked through them."""
    x_adv = craft(forward, clean_fast, x, y, attack, noise)
    adv_logits = forward(clean_fast, x_adv)
    cross_logits = forward(adv_fast, x)
    with torch.no_grad():
        clean_acc = accuracy(forward(detached(clean_fast), x), y)
    loss = 0.5 * (F.cross_entropy(cross_logits, y) + F.cross_entropy(adv_logits, y))
    return loss, {"clean_acc": clean_acc, "adv_acc": accuracy(adv_logits.detach(), y),
                  "adv_adapted_clean_acc": accuracy(cross_logits.detach(), y)}


def adversarial_step_loss(forward: FunctionalForward, x: torch.Tensor, y: torch.Tensor, attack,
                          noise: torch.Tensor | None) -> StepLoss:
    """ADML's adversarial inner trajectory: at every step the support is attacked again against
    the current fast weights (``noise [S, ...]``: one random start per step), then the step
    descends the cross-entropy of the adversarial support."""
    def step_loss(step: int, fast: Params) -> InnerLoss:
        x_adv = craft(forward, fast, x, y, attack, None if noise is None else noise[step])
        return lambda p: F.cross_entropy(forward(p, x_adv), y)

    return step_loss


def robust_step_loss(forward: FunctionalForward, x: torch.Tensor, y: torch.Tensor, attack,
                     noise: torch.Tensor | None, form: str, weight: float) -> StepLoss:
    """R-MAML with the regulariser in the inner loop too (R-MAML_both, Wang et al. 2021): each
    inner step descends ``CE(support) + weight * R(support)``, the support attacked against the
    current fast weights (``noise [S, ...]``)."""
    def step_loss(step: int, fast: Params) -> InnerLoss:
        x_adv = craft(forward, fast, x, y, attack, None if noise is None else noise[step], form)

        def loss(p: Params) -> torch.Tensor:
            clean = forward(p, x)
            return F.cross_entropy(clean, y) + weight * regulariser(clean, forward(p, x_adv), y, form)

        return loss

    return step_loss
