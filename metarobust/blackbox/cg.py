"""CG-Attack (Feng et al., CVPR 2022): CMA-ES over the latent of MCG's conditional generator.

The query attack MCG hands over to in META.md 3.4 step 5 ("CMA-ES over the generator latent with
population 20; success when the best fitness <= 0"): each example gets its own evolution strategy
(``cma``, the well-kept reference implementation of Hansen's CMA-ES) whose candidates are latents
of the generator; a candidate's point is ``x + G(z; x)`` (the generator's own bounding, then the
ball, the box and the oracle's grid, :meth:`QueryAttack.point`), its fitness the target's loss
from one query. A generation costs ``popsize`` queries.

Decisions [ours] (META.md gives the population only):

- **The start.** Unseeded (``cg`` alone), the search is centred on the latent 0, the flow's mode,
  whose point is the first query. Seeded by MCG's proposal (``init``: its perturbation), the
  proposal is the first point (its answer is held, not bought again), and the search is centred
  by ``start``: ``"mode"`` (default) on the latent 0 as unseeded, or ``"proposal"`` on the latent
  that gives the proposal's perturbation under the generator the attack holds
  (``encode(x, delta)``; the runner hands it each target's meta-trained generator, reset after the
  proposal's fine-tuning). Measured on MNIST (docs/blackbox.md), ``"proposal"`` searched slower:
  the proposal is mostly at the bound, and its latent (through ``atanh`` near +-1) lies far out in
  the prior's tails.
- **sep-CMA-ES** (``diagonal``, the default): the latent has as many dimensions as the image
  (784 on MNIST, 3,072 on CIFAR-10); full CMA-ES' covariance update is quadratic in that and its
  eigendecomposition cubic. ``diagonal: false`` runs the full one.
- ``sigma`` (the initial step size in latent space, where the prior is ``N(0, I)``): 0.5 [?].
- A last generation that the budget cannot pay in full sends only what it can (the strategy is
  not told, the example is finished anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from metarobust.blackbox.base import BLACKBOX_ATTACKS, Goal, QueryAttack, affordable
from metarobust.blackbox.oracle import Oracle
from metarobust.errors import ConfigError

DECODE_CHUNK = 256
"""Candidates decoded per generator call (memory only)."""


@dataclass(frozen=True)
class CGAttack(QueryAttack):
    r"""CG-Attack in 'Boosting Black-Box Attack with Partially Transferred Conditional Adversarial
    Distribution' (Feng et al., CVPR 2022) [https://arxiv.org/abs/2006.08538]
    [https://github.com/Kira0096/CGATTACK], as MCG's downstream attack.

    Distance Measure : Linf or L2 (the generator's)

    Arguments:
        norm (str), eps (float): the threat model (must be the generator's).
        flow (MCGGenerator or None): the generator whose latent is searched; the runner binds
            each target's MCG generator (:meth:`bind`), so ``cg`` needs ``mcg.enabled``.
        popsize (int): candidates (queries) per generation. (Default: 20, META.md 3.4)
        sigma (float): CMA-ES' initial step size in latent space. (Default: 0.5 [?])
        diagonal (bool): sep-CMA-ES (diagonal covariance). (Default: True [ours])
        loss (str): the target's loss the fitness is: ``"margin"`` (MCG's, positive once fooled).
        start (str): where a seeded search is centred: ``"mode"`` or ``"proposal"`` (above).
            (Default: ``"mode"`` [ours])

    Examples::
        >>> outcome = CGAttack("linf", 8/255, flow=generator)(oracle, x, y, init=proposal.delta)
    """

    norm: str = "linf"
    eps: float = 8 / 255
    flow: Any = None
    popsize: int = 20
    sigma: float = 0.5
    diagonal: bool = True
    loss: str = "margin"
    start: str = "mode"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start not in ("mode", "proposal"):
            raise ConfigError(f"cg start={self.start!r}; choose 'mode' or 'proposal'")
        if self.popsize < 2:
            raise ConfigError(f"cg popsize={self.popsize} must be >= 2 (CMA-ES needs a population)")
        if self.sigma <= 0:
            raise ConfigError(f"cg sigma={self.sigma} must be > 0")

    def bind(self, flow) -> CGAttack:
        """The same attack over ``flow`` (an :class:`~metarobust.blackbox.mcg.MCGGenerator`)."""
        return replace(self, flow=flow)

    def attack(self, oracle: Oracle, x: torch.Tensor, goal: Goal, generator: torch.Generator,
               init: torch.Tensor | None):
        import cma
        import numpy as np

        flow = self.flow
        if flow is None:
            raise ConfigError("attack 'cg' searches the latent of MCG's generator: enable blackbox.mcg "
                              "(mcg.enabled: true, mcg.generator: a blackbox-train checkpoint)")
        if flow.cfg.norm != self.norm or abs(flow.cfg.eps - self.eps) > 1e-6 * max(self.eps, 1e-12):
            raise ConfigError(f"cg: the generator was trained for norm={flow.cfg.norm!r}, eps={flow.cfg.eps:.6g}; "
                              f"the attack runs norm={self.norm!r}, eps={self.eps:.6g}")
        b = x.shape[0]
        with torch.no_grad():
            zero = [torch.zeros_like(z) for z in flow.sample_latents(x, generator)]
            start = flow.encode(x, init) if init is not None and self.start == "proposal" else zero
            delta = init if init is not None else flow.decode(zero, x)
        shapes = [z.shape[1:] for z in start]
        mean = torch.cat([z.flatten(1) for z in start], 1).double().cpu().numpy()
        seeds = torch.randint(1, 2 ** 31 - 1, (b,), generator=generator, device=generator.device).tolist()
        x_adv, best, success = self.first_query(oracle, x, goal, self.project(x, delta))
        strategies: dict[int, Any] = {}
        while True:
            active = affordable(oracle, ~success, 1)
            if not active.any():
                break
            remaining = oracle.remaining.cpu()
            owners, latents, told = [], [], []
            for i in active.nonzero().flatten().tolist():
                if i not in strategies:
                    strategies[i] = cma.CMAEvolutionStrategy(mean[i], self.sigma, {
                        "popsize": self.popsize, "seed": seeds[i], "CMA_diagonal": self.diagonal,
                        "verbose": -9})
                solutions = strategies[i].ask()
                k = min(self.popsize, int(remaining[i]))
                owners += [i] * k
                latents.append(np.asarray(solutions[:k]))
                told.append((i, solutions, k))
            owner = torch.tensor(owners, device=x.device)
            z = torch.from_numpy(np.concatenate(latents)).to(x.device, torch.float32)
            points = torch.cat([self._points(oracle, x[owner[lo:lo + DECODE_CHUNK]], z[lo:lo + DECODE_CHUNK], shapes)
                                for lo in range(0, len(owner), DECODE_CHUNK)])
            value, won = self.losses(oracle, points, owner, goal)
            value_host, won_host = value.double().cpu().numpy(), won.cpu().numpy()
            at = 0
            for i, solutions, k in told:
                mine = slice(at, at + k)
                at += k
                hits = np.flatnonzero(won_host[mine])
                pick = at - k + (int(hits[0]) if len(hits) else int(np.argmax(value_host[mine])))
                if len(hits) or value_host[pick] > float(best[i]):
                    x_adv[i], best[i], success[i] = points[pick], value[pick], bool(len(hits))
                if k == self.popsize and not len(hits):
                    strategies[i].tell(solutions, list(-value_host[mine]))  # CMA-ES minimises
        return x_adv, success

    def _points(self, oracle: Oracle, x: torch.Tensor, z: torch.Tensor, shapes) -> torch.Tensor:
        """The points of latents ``z [M, D]`` for images ``x [M, ...]``."""
        sizes = [math.prod(s) for s in shapes]
        latents = [part.reshape(len(z), *s) for part, s in zip(z.split(sizes, dim=1), shapes, strict=True)]
        with torch.no_grad():
            return self.point(oracle, x, self.flow.decode(latents, x))


@BLACKBOX_ATTACKS.register("cg", "CG-Attack (Feng et al. 2022): CMA-ES over MCG's generator latent, population "
                                 "20 (needs mcg.enabled); Linf or L2")
def _cg(norm: str, eps: float, **params) -> CGAttack:
    return CGAttack(norm, eps, **params)


__all__ = ["CGAttack"]
