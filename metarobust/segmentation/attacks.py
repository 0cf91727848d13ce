"""The seven evaluation attacks of R-PNODE (Pandey et al., IEEE TMI 2023; ``META.md`` 4.4) on a
few-shot segmenter, attacking either the query or the support images of an episode.

Each attack perturbs one input of the episode model ``model(support_x, support_mask, query_x)``
with the other inputs fixed, ascending the per-pixel cross-entropy against the binary
ground-truth query mask. FGSM, PGD, BIM and SMIA are the shared
:class:`~metarobust.attacks.pgd.PGD` with that per-pixel ``loss=``, APGD-CE the shared
:class:`~metarobust.attacks.apgd.APGD` with it and ``fooled=`` never true, Square the shared
:class:`~metarobust.attacks.square.Square` raising it per episode
(:mod:`metarobust.segmentation.square`); CW-L2 and DAG, which have no classification twin in
metarobust, are written here as pure functions of ``forward``.

| attack | settings (reference code) |
|---|---|
| ``fgsm`` | L-inf, one step of eps |
| ``pgd`` | L-inf eps, step 0.01, 10 steps, random start |
| ``bim`` | L-inf eps, step eps/10, 5 steps |
| ``smia`` | 10 steps of eps, no projection (a2 = 0: iterated FGSM; total up to 10 eps) |
| ``cw`` | L2, c = 10, kappa = 0, 20 Adam steps of lr 0.01 in tanh space (no eps) |
| ``dag`` | 20 steps of gamma = eps along the normalised target-margin gradient, target = the flipped mask |
| ``apgd_ce`` | L-inf eps, APGD-CE, ``apgd_steps`` iterations (100), 1 restart; per episode the highest-CE iterate |
| ``square`` | L-inf eps, Square, ``square_queries`` queries (1000), p_init 0.05; raises the mean per-pixel CE |
| ``ensemble`` | per episode, the worst (lowest query Dice) of FGSM, BIM, PGD-10 (step eps/4, random start), APGD-CE and Square |

By default every adversarial image is clipped to [0, 1]. ``clip=False`` gives the reference's
unclipped FGSM/PGD/BIM/SMIA/DAG (SMIA clamped at 0 only, as its code); the PGD-based ones then run
the shared PGD on the affinely embedded input ``x' = (x + 1) / 3``, whose box ``[0, 1]`` is
``[-1, 2]`` in ``x`` and never binds for perturbations below 1, with eps and steps divided by 3.

APGD-CE, Square and the ensemble always clip to [0, 1]. APGD-CE and Square return an episode's
clean input where the attack did not raise its mean per-pixel CE above the clean one.

The ensemble is ROG's segmentation AutoAttack (APGD-CE, PGD, FAB, Square) without FAB, which
metarobust lacks, plus FGSM and BIM: per episode the worst by query Dice of five L-inf attacks in
the eps-ball. Square, gradient-free, guards against gradient masking by the adaptive ODE solver;
attacking PNODE through a fixed-step solver (``seg.attack_solver=rk4``) is the other check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metarobust.attacks import threat
from metarobust.attacks.apgd import APGD
from metarobust.attacks.pgd import PGD, fgsm, input_gradient
from metarobust.segmentation.dice import dice
from metarobust.segmentation.square import square_linf

SEG_ATTACKS = ("fgsm", "pgd", "bim", "smia", "cw", "dag", "apgd_ce", "square", "ensemble")
ENSEMBLE = ("fgsm", "bim", "pgd10", "apgd_ce", "square")
"""The ensemble's members, in the order they draw their noise."""
TARGETS = ("query", "support")
Forward = Callable[[torch.Tensor], torch.Tensor]


def episode_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[T]``: the per-pixel cross-entropy of ``logits [T, Q, 2, H, W]`` against ``mask
    [T, Q, H, W]``, averaged over each episode's pixels."""
    ce = F.cross_entropy(logits.flatten(0, 1), mask.flatten(0, 1), reduction="none")
    return ce.view(mask.shape[0], -1).mean(dim=1)


def pixel_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`episode_loss` summed over episodes (so a batch of episodes is attacked as
    independent problems)."""
    return episode_loss(logits, mask).sum()


def never_fooled(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """APGD's ``fooled=`` for label maps: no episode counts as broken, so APGD keeps each
    episode's highest-loss iterate (the ensemble ranks by Dice afterwards)."""
    return torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)


def episode_dice(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[T]``: the 2-D Dice of each episode's predicted query masks."""
    return dice(logits.argmax(dim=2), mask)


def cw_l2(forward: Forward, x: torch.Tensor, mask: torch.Tensor, c: float = 10.0, kappa: float = 0.0,
          steps: int = 20, lr: float = 0.01) -> torch.Tensor:
    r"""Carlini-Wagner L2 ('Towards evaluating the robustness of neural networks', S&P 2017),
    per pixel: Adam on ``w`` with ``x' = (tanh(w) + 1) / 2`` minimising
    ``||x' - x||_2^2 + c * mean_pixels max(Z_true - Z_other, -kappa)`` per episode. The margin is
    averaged over an episode's pixels (not summed) so that ``c`` weighs one image's distortion
    against its mean margin at any resolution. Returns the last iterate, in [0, 1].

    Shape: ``x [T, ...]``; ``forward(x) -> [T, Q, 2, H, W]``; ``mask [T, Q, H, W]``.
    """
    x = x.detach()
    w = torch.atanh((x * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6)).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    onehot = F.one_hot(mask, 2).movedim(-1, 2).bool()                      # [T, Q, 2, H, W]
    with torch.enable_grad():
        for _ in range(steps):
            adv = (torch.tanh(w) + 1) / 2
            logits = forward(adv).float()
            real = logits.masked_select(onehot).view(mask.shape)
            other = logits.masked_select(~onehot).view(mask.shape)
            margin = (real - other).clamp(min=-kappa).flatten(1).mean(dim=1)
            dist = (adv - x).flatten(1).pow(2).sum(dim=1)
            loss = (dist + c * margin).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return ((torch.tanh(w) + 1) / 2).detach()


def dag(forward: Forward, x: torch.Tensor, mask: torch.Tensor, gamma: float, steps: int = 20,
        clip: bool = True) -> torch.Tensor:
    r"""Dense Adversary Generation (Xie et al., ICCV 2017): each step ascends
    ``sum over still-correct pixels (Z_target - Z_true)`` by ``gamma * r / ||r||_inf`` per
    episode, with the target label map the flipped mask (with two classes, the only label map
    that differs from the truth at every pixel). Pixels already at their target stop
    contributing. Total perturbation up to ``steps * gamma`` (no eps-ball, as the reference).
    """
    x = x.detach()
    target = 1 - mask
    delta = torch.zeros_like(x)

    def objective(d: torch.Tensor):
        logits = forward(x + d).float()
        zt = logits.gather(2, target.unsqueeze(2)).squeeze(2)
        zy = logits.gather(2, mask.unsqueeze(2)).squeeze(2)
        active = (logits.argmax(dim=2) == mask).float()
        return ((zt - zy) * active).sum(), logits.detach()

    gradient = input_gradient(objective)
    view = (-1,) + (1,) * (x.dim() - 1)
    for _ in range(steps):
        g, _ = gradient(delta)
        norm = g.flatten(1).abs().amax(dim=1).clamp(min=1e-12).view(view)
        delta = delta + gamma * g / norm
        if clip:
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach() if clip else (x + delta).clamp(min=0).detach()


def _embedded(attack: PGD, forward: Forward, x: torch.Tensor, y: torch.Tensor, loss, noise) -> torch.Tensor:
    """``attack`` on ``x' = (x + 1) / 3`` (eps and step / 3): the shared PGD with a box that never
    binds, i.e. the reference's unclipped attack."""
    scaled = PGD(attack.norm, attack.eps / 3, attack.step_size / 3, attack.steps, attack.random_start,
                 attack.restarts, attack.loss, attack.targeted)
    xe = scaled(lambda z: forward(3 * z - 1), (x + 1) / 3, y, loss, noise)
    return 3 * xe - 1


def pgd_family(name: str, eps: float) -> PGD:
    """The shared PGD with the reference's settings for ``fgsm``, ``pgd``, ``bim`` or ``smia``."""
    if name == "fgsm":
        return fgsm("linf", eps)
    if name == "pgd":
        return PGD("linf", eps, 0.01, 10, random_start=True)
    if name == "bim":
        return PGD("linf", eps, eps / 10, 5, random_start=False)
    if name == "smia":  # steps of eps, no projection: a ball of 10 eps never binds
        return PGD("linf", 10 * eps, eps, 10, random_start=False)
    raise ValueError(f"{name!r} is not a PGD-family attack")


@dataclass(frozen=True)
class SegAttack:
    r"""One of :data:`SEG_ATTACKS` at radius ``eps`` on the ``target`` input of an episode.

    Arguments:
        name (str): ``fgsm``, ``pgd``, ``bim``, ``smia``, ``cw``, ``dag``, ``apgd_ce``, ``square``
            or ``ensemble``.
        eps (float): L-inf radius (SMIA: step; DAG: gamma; unused by CW) in [0, 1] pixel units.
        target (str): ``query`` or ``support``.
        clip (bool): clip adversarial images to [0, 1] (default); ``False``: the reference's
            unclipped variants (APGD-CE, Square and the ensemble always clip).
        apgd_steps (int): APGD-CE's iterations, alone and in the ensemble. (Default: 100,
            AutoAttack's)
        square_queries (int): Square's queries per episode, alone and in the ensemble.
            (Default: 1000)

    Call: ``attack(model, support_x [T, K, 1, H, W], support_mask [T, K, H, W], query_x
    [T, Q, 1, H, W], query_mask [T, Q, H, W], generator) -> (support_x_adv, query_x_adv)``.

    Example:
        >>> sx_adv, qx_adv = SegAttack("pgd", 0.035)(model, sx, sm, qx, qm, torch.Generator())
        >>> cheap = SegAttack("ensemble", 0.035, apgd_steps=20, square_queries=300)
    """

    name: str
    eps: float
    target: str = "query"
    clip: bool = True
    apgd_steps: int = 100
    square_queries: int = 1000

    def __post_init__(self) -> None:
        if self.name not in SEG_ATTACKS:
            raise ValueError(f"seg.attacks: {self.name!r}; choose from {list(SEG_ATTACKS)}")
        if self.target not in TARGETS:
            raise ValueError(f"seg.attack_targets: {self.target!r}; choose from {list(TARGETS)}")
        if self.eps < 0:
            raise ValueError(f"seg.eps: {self.eps} must be >= 0")
        if self.apgd_steps < 1 or self.square_queries < 1:
            raise ValueError(f"seg.apgd_steps={self.apgd_steps} and seg.square_queries={self.square_queries} "
                             f"must be >= 1")

    def __call__(self, model, sx, sm, qx, qm, generator: torch.Generator | None = None):
        if self.target == "query":
            def forward(z):
                return model(sx, sm, z)
            x = qx
        else:
            def forward(z):
                return model(z, sm, qx)
            x = sx
        adv = self.perturb(forward, x, qm, generator)
        return (sx, adv) if self.target == "query" else (adv, qx)

    def perturb(self, forward: Forward, x: torch.Tensor, mask: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
        """The adversarial version of ``x [T, ...]`` (one episode per row)."""
        name, eps = self.name, self.eps
        if name in ("fgsm", "pgd", "bim", "smia"):
            attack = pgd_family(name, eps)
            noise = attack.init_noise(x, generator)
            if self.clip:
                return attack(forward, x, mask, pixel_loss, noise).detach()
            adv = _embedded(attack, forward, x, mask, pixel_loss, noise)
            return (adv.clamp(min=0) if name == "smia" else adv).detach()
        if name == "cw":
            return cw_l2(forward, x, mask)
        if name == "dag":
            return dag(forward, x, mask, eps, clip=self.clip)
        if name == "apgd_ce":
            return self._apgd_ce(forward, x, mask, generator)
        if name == "square":
            return self._square(forward, x, mask, generator)
        return worst(forward, self.candidates(forward, x, mask, generator).values(), x, mask)

    def _apgd_ce(self, forward, x, mask, generator):
        attack = APGD("linf", self.eps, steps=self.apgd_steps)
        adv = attack(forward, x, mask, episode_loss, attack.init_noise(x, generator), fooled=never_fooled)
        with torch.no_grad():  # the clean input where APGD's best iterate is below it
            better = episode_loss(forward(adv), mask) > episode_loss(forward(x), mask)
        return torch.where(threat.expand_per_sample(better, x), adv, x).detach()

    def _square(self, forward, x, mask, generator):
        return square_linf(lambda z: episode_loss(forward(z), mask), x, self.eps, self.square_queries,
                           generator=generator)

    def candidates(self, forward: Forward, x: torch.Tensor, mask: torch.Tensor,
                   generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """The ensemble's members (:data:`ENSEMBLE`) on ``x``, each clipped to [0, 1] and inside
        the eps-ball; the same generator state, the same candidates."""
        pgd10 = PGD("linf", self.eps, self.eps / 4, 10, random_start=True)
        return {"fgsm": fgsm("linf", self.eps)(forward, x, mask, pixel_loss).detach(),
                "bim": pgd_family("bim", self.eps)(forward, x, mask, pixel_loss).detach(),
                "pgd10": pgd10(forward, x, mask, pixel_loss, pgd10.init_noise(x, generator)).detach(),
                "apgd_ce": self._apgd_ce(forward, x, mask, generator),
                "square": self._square(forward, x, mask, generator)}


def worst(forward: Forward, candidates, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per episode, the candidate of lowest query Dice (the first of equals)."""
    best, best_dice = x, None
    with torch.no_grad():
        for cand in candidates:
            d = episode_dice(forward(cand), mask)
            if best_dice is None:
                best, best_dice = cand, d
                continue
            worse = d < best_dice
            best = torch.where(threat.expand_per_sample(worse, x), cand, best)
            best_dice = torch.minimum(d, best_dice)
    return best.detach()


__all__ = ["ENSEMBLE", "SEG_ATTACKS", "SegAttack", "TARGETS", "cw_l2", "dag", "episode_dice", "episode_loss",
           "never_fooled", "pgd_family", "pixel_loss", "worst"]
