"""Adversarial Weight Perturbation (Wu, Xia & Wang, "Adversarial Weight Perturbation Helps Robust
Generalization", NeurIPS 2020, arXiv 2004.05884; code ``csdongxian/AWP`` @a7acf5d).

Per training step, after the adversarial examples are made, the weights are pushed uphill on
the recipe's own adversarial loss, the step is taken at the pushed weights, and the push is taken
off again (the paper's eq. 9-10: ``min_w max_{||v_l|| <= gamma ||w_l||} L(w + v)``, one ascent
step for the inner max)::

    x_adv = attack(model, x, y)                  # as the recipe always does
    v     = perturbation(model, L(., x_adv))     # v_l = gamma ||w_l|| g_l / ||g_l||, g = grad L at w
    w    += v                                    # perturb
    L(w + v, x_adv).backward(); optimizer.step() # the recipe's normal step, at the perturbed weights
    w    -= v                                    # restore: the optimizer's update is kept

What the reference does, read in ``trades_AWP/utils_awp.py`` (``TradesAWP``: ``calc_awp``,
``perturb``, ``restore``) and ``trades_AWP/train_trades_cifar.py`` (TRADES-AWP), and in
``AT_AWP/utils_awp.py`` (``AdvWeightPerturb``) with ``AT_AWP/train_cifar10.py`` (AT-AWP), all at
@a7acf5d:

- **The proxy.** A second copy of the network is loaded with the model's ``state_dict`` every
  step, put in train mode (so the model's BatchNorm statistics are not touched: the code's
  comment), and takes one plain SGD step (no momentum, no weight decay) on the *negated* loss, an
  ascent step. TRADES-AWP's proxy loss is the TRADES loss itself,
  ``CE(f(x), y) + beta KL(p(x) || p(x'))`` (batch mean, clean branch not detached); AT-AWP's is
  ``CE(f(x'), y)``.
- **The perturbation** is the weight difference ``d = w_proxy - w``, kept only for state-dict
  entries of dimension > 1 whose name holds ``weight`` (conv and linear weights; no BatchNorm
  affine, no bias), rescaled per layer to ``||w_l|| / (||d_l|| + 1e-20) d_l`` and added with
  coefficient ``gamma``: ``||v_l|| = gamma ||w_l||``.
- **Restore** subtracts ``gamma d`` after ``optimizer.step()``; the update was computed at the
  perturbed weights (weight decay included).
- **Defaults.** TRADES-AWP: ``--awp-gamma 0.005``, ``--awp-warmup 10`` with epochs counted from 1
  and AWP on when ``epoch >= warmup``, i.e. the first **9** epochs without AWP (``awp.warmup=9``
  here), proxy SGD lr 0.1 (the model's), 200 epochs, lr 0.1 x0.1 at 100 and 150, weight decay
  5e-4, eps 8/255, step 2/255, 10 steps, beta 6, WideResNet-34-10. AT-AWP (PreAct-ResNet-18):
  ``--awp-gamma 0.01``, ``--awp-warmup 0`` (epochs from 0: AWP from the first), proxy lr 0.01.
  ``gamma <= 0`` turns AWP off (``awp_warmup = inf``).

What this implementation does differently (same arithmetic, stated):

- The proxy is a functional call of the model (``torch.func.functional_call``) with its
  parameters detached and its buffers cloned, rather than a second module: the same train-mode
  forward, and the model's running statistics are untouched, without a copy of the network.
- The proxy's SGD step is normalised away per layer (``d_l = lr g_l``, so
  ``||w_l|| d_l / ||d_l|| = ||w_l|| g_l / ||g_l||`` whatever the lr), so the gradient ``g`` is
  used directly: the same direction without the rounding of ``(w + lr g) - w``. The proxy lr is
  therefore no setting here.
- The perturbed weights are the parameters of dimension > 1 (every conv and linear weight of
  metarobust's models, the reference's selection).
- Restore sets ``w <- w0 + (w - (w0 + v))`` from the saved ``w0``: the optimizer's update is kept,
  and when the optimizer changed nothing the weights come back bit for bit (the reference's
  ``w - v`` can be one rounding off ``w0``).
- Under ``torchrun`` the proxy gradient is averaged over the ranks, so every rank applies the
  same perturbation (the reference's DataParallel computes it on the whole batch). Under fp16
  the proxy loss is scaled by the GradScaler (the normalisation removes the scale); a layer whose
  proxy gradient is not finite is left unperturbed for that step.

Not verified [?]: the settings behind LTD's released models (trained in a TRADES-AWP codebase,
``shared/methods/ADVERSARIAL_TRAINING.md`` 4.2: gamma and warm-up unknown); the paper's own tables
of gamma (its ablation) were not read, only the code's defaults.

Example:
    >>> cfg = load_config("configs/at/cifar10_trades.yaml", ["awp.gamma=0.005", "awp.warmup=9"])
    >>> model = Trainer(cfg).fit()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from metarobust.config import check_value, config_section

AWP_EPS = 1e-20
"""Added to ``||d_l||`` before dividing (the reference's ``EPS``)."""

Forward = Callable[[torch.Tensor], torch.Tensor]


@config_section("awp")
@dataclass
class AWPConfig:
    """Adversarial Weight Perturbation (Wu et al. 2020) on top of a recipe's step (recipes with
    ``supports_awp``: ``pgd_at``, ``trades``, ``ltd``); off by default."""

    gamma: float = 0.0
    """Relative size of the perturbation: ``||v_l|| = gamma ||w_l||`` per layer; 0: off.
    The reference: 0.005 for TRADES-AWP, 0.01 for AT-AWP."""
    warmup: int = 0
    """Epochs trained without AWP before it starts. The reference's TRADES-AWP starts at its
    epoch 10 counted from 1, which is ``warmup=9`` here; AT-AWP: 0."""

    def check(self) -> None:
        check_value(math.isfinite(self.gamma) and self.gamma >= 0, "awp.gamma", self.gamma,
                    "a relative weight perturbation >= 0 (0: off; the reference: 0.005 for TRADES-AWP, "
                    "0.01 for AT-AWP)")
        check_value(self.warmup >= 0, "awp.warmup", self.warmup, "a number of epochs >= 0")


def perturbed_names(model: nn.Module) -> list[str]:
    """The parameters AWP perturbs: those of dimension > 1 (conv and linear weights), as the
    reference's ``diff_in_weights``."""
    return [name for name, p in model.named_parameters() if p.dim() > 1 and p.requires_grad]


def weight_perturbation(model: nn.Module, loss_of: Callable[[Forward], torch.Tensor], gamma: float,
                        scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
                        all_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """AWP's perturbation of ``model`` against the loss ``loss_of(forward)``.

    ``forward`` is the proxy: ``model`` called functionally at its own (detached) parameters and
    a clone of its buffers, in the mode ``model`` is in (train mode for AWP, so BatchNorm uses the
    batch's statistics and the model's running ones are left alone). With ``g_l`` the gradient of
    the loss at the weights ``w_l`` of :func:`perturbed_names`, the perturbation is
    ``v_l = gamma ||w_l|| g_l / (||g_l|| + 1e-20)``: one ascent step, normalised per layer to
    ``||v_l|| = gamma ||w_l||``.

    Args:
        model: the trained ``nn.Module`` (not its DDP or compiled wrapper).
        loss_of: ``forward -> scalar loss``, the recipe's objective on inputs made beforehand.
        gamma: the relative size (``awp.gamma``).
        scale: applied to the loss before differentiating (the fp16 GradScaler's scale).
        all_mean: averages the flattened gradient over the ranks (``None``: one process).

    Returns: ``{name: v_l}`` for every perturbed parameter, detached, shaped like the weights.

    Example:
        >>> v = weight_perturbation(model, lambda f: F.cross_entropy(f(x_adv), y), gamma=0.01)
    """
    names = perturbed_names(model)
    chosen = set(names)
    params = {n: p.detach().requires_grad_() if n in chosen else p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    state = {**params, **buffers}

    def forward(x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, state, (x,))

    with torch.enable_grad():
        loss = loss_of(forward)
        grads = torch.autograd.grad(scale(loss), [params[n] for n in names], allow_unused=True)
    grads = [torch.zeros_like(params[n]) if g is None else g.detach() for n, g in zip(names, grads)]
    if all_mean is not None:
        flat = all_mean(torch.cat([g.reshape(-1) for g in grads]))
        grads = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]
    out = {}
    with torch.no_grad():
        for name, g in zip(names, grads):
            w = params[name]
            v = g * (gamma * w.norm() / (g.norm() + AWP_EPS))
            out[name] = torch.where(torch.isfinite(v).all(), v, torch.zeros_like(v))
    return out


class WeightPerturbation:
    """AWP's two verbs on a model, around the recipe's training step: :meth:`perturb` (compute
    the perturbation against the recipe's objective and add it to the weights) and
    :meth:`restore` (take it off after the optimizer step, keeping the step's update).

    Args:
        gamma: ``awp.gamma`` (0: :meth:`perturb` does nothing).
        warmup: ``awp.warmup``: epochs (``ctx.epoch`` from 0) without perturbation.

    Example:
        >>> awp = WeightPerturbation(gamma=0.005)
        >>> awp.perturb(model, lambda forward: objective(forward, batch, x_adv), ctx)
        >>> objective(model, batch, x_adv)[0].backward(); optimizer.step()
        >>> awp.restore(model)
    """

    def __init__(self, gamma: float, warmup: int = 0) -> None:
        self.gamma, self.warmup = gamma, warmup
        self._applied: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def active(self, epoch: int) -> bool:
        """Whether ``epoch`` (from 0) perturbs: ``gamma > 0`` and past the warm-up."""
        return self.gamma > 0 and epoch >= self.warmup

    def perturb(self, model: nn.Module, loss_of: Callable[[Forward], torch.Tensor],
                ctx: Any) -> dict[str, torch.Tensor] | None:
        """Add the perturbation (:func:`weight_perturbation`) to ``model``'s weights, for the
        step of ``ctx`` (a :class:`~metarobust.training.recipes.StepContext`: its ``epoch``,
        ``scale``, ``world_size`` and ``all_mean``); returns it, or ``None`` during the warm-up."""
        if not self.active(ctx.epoch):
            return None
        reduce = ctx.all_mean if ctx.world_size > 1 else None
        v = weight_perturbation(model, loss_of, self.gamma, ctx.scale, reduce)
        self.apply(model, v)
        return v

    def apply(self, model: nn.Module, v: dict[str, torch.Tensor]) -> None:
        """``w <- w + v`` for the parameters named in ``v``, remembering ``w`` for :meth:`restore`."""
        if self._applied:
            raise RuntimeError("WeightPerturbation.apply() twice without restore()")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in v:
                    w0 = p.detach().clone()
                    p.add_(v[name])
                    self._applied.append((p, w0, p.detach().clone()))

    def restore(self, model: nn.Module | None = None) -> None:
        """After the optimizer step: ``w <- w0 + (w - (w0 + v))``, the weights before
        :meth:`apply` plus the step's update (exactly ``w0`` when the step changed nothing);
        nothing to do when nothing was applied."""
        with torch.no_grad():
            for p, w0, perturbed in self._applied:
                p.sub_(perturbed).add_(w0)
        self._applied = []


__all__ = ["AWPConfig", "AWP_EPS", "WeightPerturbation", "perturbed_names", "weight_perturbation"]
