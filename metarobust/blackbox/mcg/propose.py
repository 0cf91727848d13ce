"""MCG at attack time: adapt the surrogate and the generator, then spend ONE query (META.md 3.4).

Per benign image (or per batch, ``per_example=False``), with ``phi_0`` the meta-trained
generator:

1. **Surrogate refresh** (``finetune_clean``, ``finetune_perturbation``): a step of the surrogate
   towards the target's answers on images already queried (:class:`History`; those answers are
   paid for), plus a lifelong term on past attacks (:class:`SurrogateRefresh`).
2. **Latent**: a prior sample decoded and re-encoded, ``z_x = encode(x, decode(z, x))`` (the
   released code's; with the ``tanh`` bound this is ``z`` up to the squash margin and the box).
3. **Generator fine-tuning** (``finetune_glow``): a few Adam steps of the surrogate margin loss
   with ``z_x`` fixed, then ``phi <- phi_0 + 0.2 (phi' - phi_0)`` *written into the weights*
   (the released code's interpolation is a no-op, META.md 3.6); optionally the latent is
   fine-tuned too (``finetune_latent``).
4. **First query**: ``delta = G_phi(z_x; x)`` (the same bounding as in training), snapped onto the
   oracle's grid inside the ball and the box (:meth:`QueryAttack.point`), sent once. Its answer
   goes into the history, and the generator is reset to ``phi_0`` (``finetune_reload``).

The returned ``delta`` seeds a downstream query attack through its ``init`` argument (Square from
``x + delta``, SignHunter from ``sign(delta)``); that wiring is the runner's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from metarobust.blackbox.base import Goal, QueryAttack, affordable, fooled
from metarobust.blackbox.mcg.config import MCGConfig
from metarobust.blackbox.mcg.generator import Latents, MCGGenerator
from metarobust.blackbox.mcg.training import adapt, interpolate_, snapshot, surrogate_margin
from metarobust.blackbox.oracle import Oracle, log_probs
from metarobust.errors import ConfigError


@dataclass
class Proposal:
    """The generator's first query.

    - delta: ``[B, C, H, W]`` the perturbation sent (``x_adv - x``; zero where not queried).
    - x_adv: ``[B, C, H, W]`` the point sent: in the eps-ball, the box and on the oracle's grid.
    - success: ``bool [B]`` whether that query fooled the target (False where not queried).
    - queries: ``int64 [B]`` queries charged by the proposal (1, or 0 without budget).
    - scores: ``[B, N]`` the target's answers (NaN where not queried), for the runner's history.
    """

    delta: torch.Tensor
    x_adv: torch.Tensor
    success: torch.Tensor
    queries: torch.Tensor
    scores: torch.Tensor


class History:
    """Images whose target answers are known: ``clean`` ones (answers the runner already paid
    for) and past ``attack`` points (each proposal adds its own). The target's answers are kept
    as log-probabilities ``[M, N]``."""

    def __init__(self) -> None:
        self.parts: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {"clean": [], "attack": []}

    def add(self, x: torch.Tensor, y: torch.Tensor, scores: torch.Tensor, output: str, kind: str = "attack") -> None:
        """Record images ``x [M, ...]``, labels ``y [M]`` and the oracle's ``scores [M, N]``
        (``output``: the oracle's, ``"probs"`` or ``"logits"``)."""
        if kind not in self.parts:
            raise ConfigError(f"history kind={kind!r}; choose one of {list(self.parts)}")
        self.parts[kind].append((x.detach(), y.detach(), log_probs(scores.detach(), output)))

    def size(self, kind: str) -> int:
        return sum(len(x) for x, _, _ in self.parts[kind])

    def draw(self, kind: str, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Up to ``n`` records of ``kind`` at random: ``(x, y, target log-probs)``."""
        x, y, lp = (torch.cat(t) for t in zip(*self.parts[kind], strict=True))
        pick = torch.randperm(len(x), generator=generator, device=generator.device)[:n].to(x.device)
        return x[pick], y[pick], lp[pick]


def surrogate_fit_loss(logits: torch.Tensor, y: torch.Tensor, target_log_probs: torch.Tensor, loss: str) -> torch.Tensor:
    """How far the surrogate's ``logits [M, N]`` are from the target's answers: ``"prob_mse"``
    (the released code: squared difference of the true class's probabilities) or ``"kl"``
    (``KL(target || surrogate)``), averaged over the ``M`` images."""
    lp = logits.log_softmax(-1)
    if loss == "prob_mse":
        true = y.view(-1, 1)
        return (lp.gather(1, true).exp() - target_log_probs.gather(1, true).exp()).pow(2).mean()
    return (target_log_probs.exp() * (target_log_probs - lp)).sum(-1).mean()


class SurrogateRefresh:
    """The model-level adaptation of one surrogate (META.md 3.4 step 1), updated in place (pass
    a copy to keep the original). Holds its Adam state, the lifelong weight ``lambda`` and the
    update count across images. The surrogate stays in eval mode: a step on 20 images must not
    overwrite its batch-norm statistics [ours]."""

    def __init__(self, surrogate: nn.Module, cfg: MCGConfig) -> None:
        self.surrogate, self.cfg = surrogate, cfg
        self.opt = torch.optim.Adam(surrogate.parameters(), lr=cfg.surrogate_lr)
        self.lam, self.updates = cfg.lifelong_lambda, 0

    def step(self, history: History, generator: torch.Generator) -> bool:
        """``cfg.surrogate_steps`` steps on the history; whether any step was taken."""
        cfg = self.cfg
        clean = cfg.finetune_clean and history.size("clean") > 0
        lifelong = cfg.finetune_perturbation and history.size("attack") > cfg.surrogate_batch
        if not (clean or lifelong):
            return False
        for _ in range(cfg.surrogate_steps):
            with torch.enable_grad():
                s_loss = d_loss = None
                if clean:
                    s_loss = self._fit(history.draw("clean", cfg.surrogate_batch, generator))
                if lifelong:
                    d_loss = self._fit(history.draw("attack", cfg.surrogate_batch, generator))
                if s_loss is not None and d_loss is not None:
                    loss = s_loss + self.lam * d_loss
                    if self.updates >= cfg.lifelong_warmup and float(d_loss.detach()) > 0:
                        m = cfg.lifelong_momentum
                        self.lam = m * self.lam + (1 - m) * float(s_loss.detach()) / float(d_loss.detach())
                else:
                    loss = s_loss if s_loss is not None else d_loss
                self.opt.zero_grad()
                (cfg.surrogate_loss_scale * loss).backward()
            nn.utils.clip_grad_norm_(self.surrogate.parameters(), cfg.surrogate_clip)
            self.opt.step()
            self.updates += 1
        return True

    def _fit(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y, target = batch
        return surrogate_fit_loss(self.surrogate(x), y, target, self.cfg.surrogate_loss)


@torch.no_grad()
def restore_(model: nn.Module, start: Sequence[torch.Tensor]) -> None:
    """In place: ``model``'s parameters set back to ``start`` (``finetune_reload``)."""
    for p, s in zip(model.parameters(), start, strict=True):
        p.copy_(s)


def tune_latents(model: MCGGenerator, surrogates: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor,
                 latents: Latents, cfg: MCGConfig) -> Latents:
    """``finetune_latent``: Adam (``cfg.latent_lr``) on the latents for up to ``cfg.latent_steps``
    steps, stopping once the mean surrogate margin is below ``cfg.latent_stop``."""
    latents = [z.detach().clone().requires_grad_(True) for z in latents]
    opt = torch.optim.Adam(latents, lr=cfg.latent_lr)
    for _ in range(cfg.latent_steps):
        with torch.enable_grad():
            loss = surrogate_margin(surrogates, x, y, model.decode(latents, x), cfg.kappa).mean()
            if float(loss.detach()) < cfg.latent_stop:
                break
            grads = torch.autograd.grad(loss, latents)
        for z, g in zip(latents, grads, strict=True):
            z.grad = g
        opt.step()
    return [z.detach() for z in latents]


@dataclass(eq=False)
class MCGAttack(QueryAttack):
    r"""MCG's first query (Yin et al., TPAMI; arXiv 2301.00364), as a query attack.

    Distance Measure : Linf or L2, the generator's (``norm`` and ``eps`` must match its config).

    Arguments:
        norm, eps: the threat model.
        generator (MCGGenerator): the meta-trained generator ``phi_0`` (reset after each image
            when ``cfg.finetune_reload``; otherwise the fine-tuned weights carry over).
        surrogates (list of nn.Module): white-box surrogates (eval mode); refreshed in place
            when ``cfg.finetune_clean`` / ``cfg.finetune_perturbation``.
        cfg (MCGConfig): the switches and step sizes of META.md 3.5.
        history (History): target answers known so far; each proposal adds its own.

    Call (as every query attack): ``attack(oracle, x, y, generator=None) -> Outcome`` with one
    charged query per example that has budget left. :meth:`propose` returns the richer
    :class:`Proposal` (``delta`` to seed a downstream attack, the target's scores).

    Example::
        >>> mcg = MCGAttack("linf", 8 / 255, generator=g, surrogates=[copy.deepcopy(s)])
        >>> p = mcg.propose(oracle, x, y, torch.Generator().manual_seed(0))
        >>> p.success, p.delta                          # FASR, and the seed of the next attack
    """

    norm: str
    eps: float
    generator: MCGGenerator
    surrogates: list[nn.Module]
    cfg: MCGConfig = field(default_factory=MCGConfig)
    history: History = field(default_factory=History)
    loss: str = "margin"

    def __post_init__(self) -> None:
        super().__post_init__()
        g = self.generator.cfg
        if (g.norm, g.eps) != (self.norm, self.eps):
            raise ConfigError(f"MCGAttack norm={self.norm!r}, eps={self.eps} differ from the generator's "
                              f"norm={g.norm!r}, eps={g.eps}: it bounds its output to what it was trained for")
        if not self.surrogates:
            raise ConfigError("MCGAttack needs at least one surrogate")
        self.refreshers = [SurrogateRefresh(s, self.cfg) for s in self.surrogates]

    def attack(self, oracle: Oracle, x: torch.Tensor, goal: Goal, generator: torch.Generator,
               init: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if goal.targeted:
            raise ConfigError("MCGAttack is untargeted (its generator is trained on the true class's margin); "
                              "call it without y_target")
        if init is not None:
            raise ConfigError("MCGAttack proposes its own first query; it takes no init")
        p = self.propose(oracle, x, goal.labels, generator)
        return p.x_adv, p.success

    def propose(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> Proposal:
        """The one-query proposal for ``x [B, ...]`` (labels ``y [B]``), see the module's steps."""
        x, y = oracle.quantise(x.detach()), y.to(x.device)
        start_queries = oracle.queries.clone()
        active = affordable(oracle, torch.ones(len(x), dtype=torch.bool, device=x.device), 1)
        index = active.nonzero().flatten()
        groups = index.split(1) if self.cfg.per_example else [index]
        x_adv, success = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        scores = None
        phi_0 = snapshot(self.generator)
        for idx in groups:
            if not len(idx):
                continue
            point, answer = self._one(oracle, x[idx], y[idx], idx, generator)
            if self.cfg.finetune_reload:
                restore_(self.generator, phi_0)
            else:
                phi_0 = snapshot(self.generator)
            x_adv[idx], success[idx] = point, fooled(answer, y[idx])
            if scores is None:
                scores = torch.full((len(x), answer.shape[1]), float("nan"), device=x.device)
            scores[idx] = answer.to(x.device)
        if scores is None:
            scores = torch.full((len(x), 0), float("nan"), device=x.device)
        return Proposal(x_adv - x, x_adv, success, (oracle.queries - start_queries).to(x.device), scores)

    def remember(self, oracle: Oracle, y: torch.Tensor, which: torch.Tensor) -> None:
        """META.md 3.4 step 6: add to the history, for the examples ``which`` (``bool [B]``: those
        a downstream attack queried after the proposal), the last point the attack sent and the
        target's answer to it (:attr:`Oracle.last`: paid for, within the budget; the success
        check's re-query is never used). The lifelong surrogate term
        (``finetune_perturbation``) then learns from the downstream attacks' points too, as the
        released code's history does."""
        last = oracle.last
        if last is None or not oracle.scores:
            return
        points, answers, answered = last
        keep = (which.to(answered.device) & answered).nonzero().flatten()
        if len(keep):
            self.history.add(points[keep], y.to(points.device)[keep], answers[keep], oracle.output, "attack")

    def _one(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
             rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-4 for one group of examples: ``(point sent, target's answers)``."""
        cfg, model = self.cfg, self.generator
        for refresher in self.refreshers:
            refresher.step(self.history, rng)
        with torch.no_grad():
            z = model.sample_latents(x, rng, cfg.temperature)
            z = model.encode(x, model.decode(z, x))
        if cfg.finetune_glow and cfg.glow_steps:
            start = snapshot(model)
            adapt(model, self.surrogates, x, y, cfg.glow_steps, cfg.glow_lr, cfg.kappa, lambda: z)
            interpolate_(model, start, cfg.glow_interpolation)
        if cfg.finetune_latent and cfg.latent_steps:
            z = tune_latents(model, self.surrogates, x, y, z, cfg)
        with torch.no_grad():
            point = self.point(oracle, x, model.decode(z, x))
        answer = oracle(point, idx)
        self.history.add(point, y, answer, oracle.output, "attack")
        return point, answer


def mcg_propose(generator: MCGGenerator, oracle: Oracle, x: torch.Tensor, y: torch.Tensor,
                surrogate: nn.Module | Sequence[nn.Module], cfg: MCGConfig | None = None,
                generator_rng: torch.Generator | None = None, history: History | None = None) -> Proposal:
    """One charged query per example from the generator: :meth:`MCGAttack.propose` with a fresh
    attack (the surrogate refresh's Adam state and ``lambda`` start anew; a runner attacking
    many batches should keep one :class:`MCGAttack` instead). ``generator_rng`` defaults to a
    generator seeded with 0 on ``x``'s device."""
    surrogates = [surrogate] if isinstance(surrogate, nn.Module) else list(surrogate)
    attack = MCGAttack(generator.cfg.norm, generator.cfg.eps, generator, surrogates,
                       cfg or MCGConfig(), history if history is not None else History())
    if generator_rng is None:
        generator_rng = torch.Generator(device=x.device).manual_seed(0)
    return attack.propose(oracle, x, y, generator_rng)


__all__ = ["History", "MCGAttack", "Proposal", "SurrogateRefresh", "mcg_propose", "restore_", "surrogate_fit_loss",
           "tune_latents"]
