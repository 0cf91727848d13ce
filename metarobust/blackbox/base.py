"""What every query-based attack shares: the call, the threat model, the score losses, the registry.

An attack is a frozen dataclass with its paper's defaults, called as
``attack(oracle, x, y, generator=None) -> Outcome``. It receives nothing about the target but
the :class:`~metarobust.blackbox.oracle.Oracle`; ``x [B, C, H, W]`` and ``y [B]`` are the clean
images and their labels, which the attacker holds. Examples are attacked together, each with its
own query count, budget and early stop: an example stops once a query it paid for shows it
misclassified, or when it cannot afford the attack's next step. Every point sent is inside the
eps-ball around ``x`` and in [0, 1]; with a quantising oracle it is also on the oracle's grid
(:meth:`QueryAttack.point`), so a win never rests on a change the target cannot see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metarobust.attacks import threat
from metarobust.blackbox.oracle import Oracle, log_probs
from metarobust.errors import ConfigError
from metarobust.registry import Registry

BLACKBOX_ATTACKS = Registry("black-box attack")
"""Query-based attacks: name -> factory ``f(norm, eps, **params) -> attack`` (``metarobust list attacks``)."""

SCORE_LOSSES = ("ce", "margin", "prob")


@dataclass
class Outcome:
    """What an attack returns.

    - x_adv: ``[B, C, H, W]`` the final points (the clean image where nothing better was found).
    - queries: ``int64 [B]`` images sent to the oracle for each example, the first included.
    - success: ``bool [B]`` the attack's own verdict, from a query it paid for (re-checked
      outside the budget by :meth:`Oracle.verify`).
    """

    x_adv: torch.Tensor
    queries: torch.Tensor
    success: torch.Tensor


def score_loss(scores: torch.Tensor, y: torch.Tensor, loss: str, output: str) -> torch.Tensor:
    """The per-example objective ``[M]`` an untargeted attack *maximises*, from oracle scores:
    ``"ce"`` the cross-entropy ``-log p_y``; ``"margin"`` ``max_{j != y} log p_j - log p_y`` (the
    CW margin; positive once fooled; equal on logits); ``"prob"`` ``-p_y`` (SimBA)."""
    lp = log_probs(scores, output)
    true = lp.gather(1, y.view(-1, 1)).squeeze(1)
    if loss == "ce":
        return -true
    if loss == "prob":
        return -true.exp()
    if loss == "margin":
        other = lp.scatter(1, y.view(-1, 1), float("-inf")).amax(dim=1)
        return other - true
    raise ConfigError(f"loss={loss!r}; a black-box attack takes one of {list(SCORE_LOSSES)}")


def fooled(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Whether each answer ``[M, N]`` ranks another class above ``y`` ``[M]``."""
    return scores.argmax(dim=-1) != y


def draw(generator: torch.Generator, shape, device: torch.device, kind: str = "normal") -> torch.Tensor:
    """Random numbers from ``generator`` (on its own device), moved to ``device``."""
    if kind == "normal":
        out = torch.randn(shape, generator=generator, device=generator.device)
    else:
        out = torch.rand(shape, generator=generator, device=generator.device)
    return out.to(device)


class QueryAttack:
    """Base of the query attacks: checks the call, then runs :meth:`attack`. Subclasses are
    frozen dataclasses with ``norm``, ``eps`` and ``loss`` fields; ``norms`` lists the threat
    models they support."""

    norms: tuple[str, ...] = ("linf", "l2")
    needs_scores: bool = True

    def __post_init__(self) -> None:
        if self.norm not in self.norms:
            raise ConfigError(f"{type(self).__name__} norm={self.norm!r}; it supports {list(self.norms)}")
        if self.eps < 0:
            raise ConfigError(f"{type(self).__name__} eps={self.eps} must be >= 0")
        if getattr(self, "loss", "ce") not in SCORE_LOSSES:
            raise ConfigError(f"{type(self).__name__} loss={self.loss!r}; choose one of {list(SCORE_LOSSES)}")

    def __call__(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> Outcome:
        if self.needs_scores and not oracle.scores:
            raise ConfigError(f"{type(self).__name__} is score-based; the oracle answers only "
                              f"output={oracle.output!r} (use 'probs' or 'logits')")
        if x.shape[0] != oracle.examples or y.shape != (x.shape[0],):
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must hold the oracle's "
                             f"{oracle.examples} examples")
        if not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError("x must lie in [0, 1]")
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(0)
        x = oracle.quantise(x.detach())  # the image the target sees: a quantising oracle's grid
        start = oracle.queries.clone()
        x_adv, success = self.attack(oracle, x, y.to(x.device), generator)
        return Outcome(x_adv, (oracle.queries - start).to(x.device), success)

    def attack(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_adv [B, ...], success bool [B])`` for the quantised clean ``x``."""
        raise NotImplementedError

    def project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` projected onto the eps-ball and then the box (``x + delta`` in [0, 1])."""
        return threat.project(delta, x, self.norm, self.eps)

    def snap(self, oracle: Oracle, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The point ``x + delta`` that is sent, for a ``delta`` from :meth:`project`: with a
        quantising oracle each coordinate of ``delta`` is rounded *towards zero* onto the grid,
        which keeps it in any Lp ball and the box since ``x`` is on the grid. Attacks that
        accumulate steps keep the unrounded ``delta`` as their iterate (rounding each step
        towards zero would shrink it) and send and return its snapped point."""
        if oracle.levels is not None:
            top = oracle.levels - 1
            k = delta * top
            near = (k - k.round()).abs() < 1e-4  # float round-off of an exact multiple
            delta = torch.where(near, k.round(), k.trunc()) / top
        return (x + delta).clamp(0, 1)

    def point(self, oracle: Oracle, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """:meth:`snap` of :meth:`project`: a point in the ball, the box and on the grid."""
        return self.snap(oracle, x, self.project(x, delta))

    def losses(self, oracle: Oracle, points: torch.Tensor, index: torch.Tensor, y: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query ``points [M, ...]`` for examples ``index [M]`` (labels ``y [M]``):
        ``(loss [M], fooled [M])``."""
        scores = oracle(points, index)
        return score_loss(scores, y, self.loss, oracle.output), fooled(scores, y)


def affordable(oracle: Oracle, active: torch.Tensor, cost: int) -> torch.Tensor:
    """The active examples that can pay ``cost`` more queries ``[B]``."""
    return active & (oracle.remaining.to(active.device) >= cost)


__all__ = ["BLACKBOX_ATTACKS", "Outcome", "QueryAttack", "SCORE_LOSSES", "affordable", "draw", "fooled",
           "score_loss"]
