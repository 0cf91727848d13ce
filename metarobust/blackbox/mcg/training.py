"""MCG's two training stages on white-box surrogates (META.md 3.3); no target query is spent.

1. :func:`pretrain`: maximum likelihood of transfer perturbations (:func:`transfer_pairs`,
   MI-FGSM on a surrogate) given their images.
2. :func:`meta_train`: Reptile over tasks (a batch of images and the surrogates; for few-shot
   surrogates, one task per episode: its query set and the surrogate learners adapted on its
   support set, :mod:`metarobust.training.recipes.mcg`): a few inner
   Adam steps on the surrogates' margin loss of ``x + G(z; x)`` (:func:`reptile_task`), then the
   outer step ``theta <- theta + beta (theta_task - theta)`` written into the weights
   (:func:`interpolate_`). The released code assigned the interpolated tensors into a
   ``state_dict()`` and never loaded it back, so its outer step (and the attack-time one) was a
   no-op and it kept the last inner weights: effectively ``beta = 1`` (META.md 3.6).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from metarobust.attacks.mifgsm import mi_fgsm
from metarobust.blackbox.mcg.config import MCGConfig
from metarobust.blackbox.mcg.generator import MCGGenerator

Forward = Callable[[torch.Tensor], torch.Tensor]
Task = tuple[torch.Tensor, torch.Tensor, Sequence[Forward]]
"""One Reptile task: images ``x [B, C, H, W]`` in [0, 1], labels ``y [B]`` and the surrogates
that score them (a few-shot episode's query set, its labels and the learners adapted on it)."""


def margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """MCG's adversarial loss ``max(z_y - max_{j != y} z_j, -kappa)`` per example ``[B]``, to be
    *minimised* (negative once fooled; clipped at ``-kappa`` so fooled examples stop pulling)."""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(dim=1)
    return (true - other).clamp_min(-kappa)


def surrogate_margin(surrogates: Sequence[Forward], x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                     kappa: float) -> torch.Tensor:
    """:func:`margin_loss` of ``x + delta`` averaged over ``surrogates``, per example ``[B]``."""
    return torch.stack([margin_loss(s(x + delta), y, kappa) for s in surrogates]).mean(0)


def transfer_pairs(surrogate: Forward, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float,
                   cfg: MCGConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1's data: MI-FGSM perturbations (``cfg.transfer_steps`` steps, momentum
    ``cfg.transfer_decay``, step ``eps / steps``) on the images the surrogate classifies
    correctly with confidence in ``cfg.confidence = (low, high]`` (MCG's "difficult" images).
    Returns ``(x [M, ...], delta [M, ...], kept bool [B])``."""
    cfg = MCGConfig() if cfg is None else cfg
    with torch.no_grad():
        p = surrogate(x).softmax(-1)
    confidence = p.gather(1, y.view(-1, 1)).squeeze(1)
    low, high = cfg.confidence
    kept = (p.argmax(-1) == y) & (confidence > low) & (confidence <= high)
    xs, ys = x[kept], y[kept]
    x_adv = mi_fgsm(surrogate, xs, ys, norm, eps, cfg.transfer_steps, decay=cfg.transfer_decay)
    return xs, x_adv - xs, kept


def _batches(n: int, size: int, generator: torch.Generator, device: torch.device):
    order = torch.randperm(n, generator=generator, device=generator.device).to(device)
    return order.split(size)


def pretrain(model: MCGGenerator, x: torch.Tensor, delta: torch.Tensor, cfg: MCGConfig,
             generator: torch.Generator, epochs: int | None = None,
             on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Stage 1: minimise the NLL (bits per dimension) of ``delta [M, ...]`` given ``x [M, ...]``
    with Adam (``cfg.pretrain_lr``, batches of ``cfg.pretrain_batch``, gradient-norm clip
    ``cfg.pretrain_clip``) for ``epochs`` (default ``cfg.pretrain_epochs``). Targets get
    ``cfg.pretrain_noise`` Gaussian noise in the flow's space. Returns the mean NLL per epoch
    (also passed to ``on_epoch(epoch, nll)``, e.g. a progress bar)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
    history = []
    for _ in range(cfg.pretrain_epochs if epochs is None else epochs):
        total = 0.0
        for idx in _batches(len(x), cfg.pretrain_batch, generator, x.device):
            u_shape = (len(idx), *model.cfg.flow_shape)
            noise = cfg.pretrain_noise * torch.randn(u_shape, generator=generator, device=generator.device)
            loss = model.nll(x[idx], delta[idx], noise.to(x.device)).mean()
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.pretrain_clip)
            opt.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(x))
        if on_epoch:
            on_epoch(len(history), history[-1])
    return history


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    """Detached copies of ``model``'s parameters, in order."""
    return [p.detach().clone() for p in model.parameters()]


@torch.no_grad()
def interpolate_(model: nn.Module, start: Sequence[torch.Tensor], weight: float) -> None:
    """In place: every parameter ``p <- start + weight * (p - start)`` (Reptile's outer step and
    MCG's attack-time interpolation; ``weight = 1`` keeps ``p``, ``0`` restores ``start``).
    Buffers are left alone: only trained weights are interpolated."""
    for p, s in zip(model.parameters(), start, strict=True):
        p.copy_(s + weight * (p - s))


def adapt(model: MCGGenerator, surrogates: Sequence[Forward], x: torch.Tensor, y: torch.Tensor, steps: int,
          lr: float, kappa: float, latents: Callable[[], list[torch.Tensor]]) -> None:
    """``steps`` Adam steps (a fresh optimiser, ``lr``) of ``model`` on the surrogates' margin
    loss of ``x + G(latents(); x)``, in place. Gradients reach only the generator's weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        with torch.enable_grad():
            loss = surrogate_margin(surrogates, x, y, model.decode(latents(), x), kappa).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()


def reptile_task(model: MCGGenerator, surrogates: Sequence[Forward], x: torch.Tensor, y: torch.Tensor,
                 cfg: MCGConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """One Reptile task: ``cfg.inner_steps`` inner Adam steps (``cfg.inner_lr``) with fresh
    latents ``z ~ N(0, I)`` each step, then the outer step ``theta <- theta + beta
    (theta_task - theta)`` (``beta = cfg.outer_step``) written into ``model``'s weights.
    Returns ``theta_task``, the inner loop's weights (detached)."""
    start = snapshot(model)
    adapt(model, surrogates, x, y, cfg.inner_steps, cfg.inner_lr, cfg.kappa,
          lambda: model.sample_latents(x, generator))
    task = snapshot(model)
    interpolate_(model, start, cfg.outer_step)
    return task


def reptile_epoch(model: MCGGenerator, tasks: Iterable[Task], cfg: MCGConfig, generator: torch.Generator) -> None:
    """:func:`reptile_task` on each task in turn, with all of its surrogates, or one drawn at
    random with ``cfg.one_surrogate_per_task``."""
    for x, y, surrogates in tasks:
        chosen = surrogates
        if cfg.one_surrogate_per_task:
            pick = int(torch.randint(len(surrogates), (), generator=generator, device=generator.device))
            chosen = [surrogates[pick]]
        reptile_task(model, chosen, x, y, cfg, generator)


def meta_train(model: MCGGenerator, surrogates: Sequence[Forward], x: torch.Tensor, y: torch.Tensor,
               cfg: MCGConfig, generator: torch.Generator, epochs: int | None = None) -> list[float]:
    """Stage 2: :func:`reptile_task` over shuffled batches of ``cfg.meta_batch`` images for
    ``epochs`` (default ``cfg.meta_epochs``); each task uses every surrogate, or one drawn at
    random with ``cfg.one_surrogate_per_task``. Returns the mean surrogate margin of fresh
    samples before each epoch's updates (lower is more adversarial)."""
    history = []
    for _ in range(cfg.meta_epochs if epochs is None else epochs):
        with torch.no_grad():
            history.append(float(surrogate_margin(surrogates, x, y, model.sample(x, generator), cfg.kappa).mean()))
        reptile_epoch(model, ((x[idx], y[idx], surrogates) for idx in _batches(len(x), cfg.meta_batch, generator,
                                                                                 x.device)), cfg, generator)
    return history


__all__ = ["Task", "adapt", "interpolate_", "margin_loss", "meta_train", "pretrain",
           "reptile_epoch", "reptile_task", "snapshot", "surrogate_margin", "transfer_pairs"]
