"""What every query-based attack shares: the call, the threat model, the score losses, the registry.

An attack is a frozen dataclass with its paper's defaults, called as
``attack(oracle, x, y, generator=None, *, y_target=None, init=None) -> Outcome``. It receives
nothing about the target but the :class:`~metarobust.blackbox.oracle.Oracle`; ``x [B, C, H, W]``
and ``y [B]`` are the clean images and their labels, which the attacker holds. Examples are
attacked together, each with its own query count, budget and early stop: an example stops once
a query it paid for shows it fooled, or when it cannot afford the attack's next step. Every
point sent is inside the eps-ball around ``x`` and in [0, 1]; with a quantising oracle it is
also on the oracle's grid (:meth:`QueryAttack.point`), so a win never rests on a change the
target cannot see.

- **Targeted mode.** With ``y_target [B]`` (each different from ``y``) an example is fooled when
  the target's top-1 label *is* its target, and every loss is turned around to raise the
  target class (:func:`score_loss`); check the result with ``oracle.verify(x_adv, y,
  target=y_target)``. Without it the attack is untargeted: fooled means top-1 is not ``y``.
- **Seeding** (``init``): a perturbation ``[B, C, H, W]`` to start from instead of the attack's
  own starting point, e.g. a generator's output (MCG, Yin et al.). The caller projects it into
  the eps-ball; it is projected onto the ball again here (not the box, which would erase the
  sign of a corner it cuts off; every point sent is in the box). Each attack states what it
  does with it (Square, SimBA, NES: start at ``x + init``; SignHunter: start from the signs
  ``sign(init)``; Bandits: start at ``x + init`` with the gradient prior ``init / eps``). The
  seed point is the example's *first query*: charged like any other, it replaces the attack's
  own first query (so seeding never costs an extra query), and an example it already fools
  stops there with 1 query.
- **Answers already held** (``known=(points, scores)``): a caller that has paid for the seed
  point (MCG's proposal is its first query) passes the answer; an attack whose first query is
  exactly that point reuses it instead of buying it again (SignHunter's first point,
  ``x + eps sign(init)``, is a different point and is bought).
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


@dataclass(frozen=True)
class Goal:
    """What the attack aims for: ``labels [B]`` the true labels to move away from (untargeted)
    or, with ``targeted``, the target labels to move to."""

    labels: torch.Tensor
    targeted: bool = False
    known: tuple[torch.Tensor, torch.Tensor] | None = None
    """``(points [B, ...], scores [B, K])``: answers the caller already paid for (NaN scores where
    none); a first query at exactly such a point reuses the answer instead of buying it again."""


def score_loss(scores: torch.Tensor, y: torch.Tensor, loss: str, output: str, targeted: bool = False
               ) -> torch.Tensor:
    """The per-example objective ``[M]`` an attack *maximises*, from oracle scores.

    Untargeted (``y`` the true labels): ``"ce"`` the cross-entropy ``-log p_y``; ``"margin"``
    ``max_{j != y} log p_j - log p_y`` (the CW margin; positive once fooled; equal on logits);
    ``"prob"`` ``-p_y`` (SimBA). Targeted (``y`` the targets): the same quantities negated, so
    the attack raises the target: ``log p_t``, ``log p_t - max_{j != t} log p_j`` (positive once
    ``t`` is top-1), ``p_t``.
    """
    lp = log_probs(scores, output)
    true = lp.gather(1, y.view(-1, 1)).squeeze(1)
    if loss == "ce":
        out = -true
    elif loss == "prob":
        out = -true.exp()
    elif loss == "margin":
        out = lp.scatter(1, y.view(-1, 1), float("-inf")).amax(dim=1) - true
    else:
        raise ConfigError(f"loss={loss!r}; a black-box attack takes one of {list(SCORE_LOSSES)}")
    return -out if targeted else out


def fooled(scores: torch.Tensor, y: torch.Tensor, targeted: bool = False) -> torch.Tensor:
    """Whether each answer ``[M, N]`` ranks another class above ``y`` ``[M]`` (targeted: ranks
    the target ``y`` first)."""
    top = scores.argmax(dim=-1)
    return top == y if targeted else top != y


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

    def __call__(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                 *, y_target: torch.Tensor | None = None, init: torch.Tensor | None = None,
                 known: tuple[torch.Tensor, torch.Tensor] | None = None) -> Outcome:
        """Attack ``x [B, C, H, W]`` (labels ``y [B]``) through ``oracle``; ``y_target [B]``: the
        targeted mode; ``init [B, C, H, W]``: the perturbation to start from; ``known``:
        ``(points, scores)`` the caller already holds (module docstring)."""
        if self.needs_scores and not oracle.scores:
            raise ConfigError(f"{type(self).__name__} is score-based; the oracle answers only "
                              f"output={oracle.output!r} (use 'probs' or 'logits')")
        if x.shape[0] != oracle.examples or y.shape != (x.shape[0],):
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must hold the oracle's "
                             f"{oracle.examples} examples")
        if not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError("x must lie in [0, 1]")
        y = y.to(x.device)
        goal = Goal(y)
        if y_target is not None:
            y_target = y_target.to(x.device)
            if y_target.shape != y.shape or bool((y_target == y).any()):
                raise ValueError(f"y_target {tuple(y_target.shape)} must give each of the {len(y)} examples a "
                                 f"class other than its label y")
            goal = Goal(y_target, targeted=True)
        if known is not None:
            points, scores = known
            if points.shape != x.shape or scores.shape[0] != x.shape[0]:
                raise ValueError(f"known points {tuple(points.shape)} and scores {tuple(scores.shape)} must hold "
                                 f"one answer per example of x {tuple(x.shape)}")
            goal = Goal(goal.labels, goal.targeted, (points.detach().to(x), scores.detach().to(x.device)))
        if init is not None and init.shape != x.shape:
            raise ValueError(f"init {tuple(init.shape)} must be a perturbation of x's shape {tuple(x.shape)}")
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(0)
        x = oracle.quantise(x.detach())  # the image the target sees: a quantising oracle's grid
        if init is not None:  # onto the ball only (module docstring)
            init = threat.project_ball(init.detach().to(x), self.norm, self.eps)
        start = oracle.queries.clone()
        x_adv, success = self.attack(oracle, x, goal, generator, init)
        return Outcome(x_adv, (oracle.queries - start).to(x.device), success)

    def attack(self, oracle: Oracle, x: torch.Tensor, goal: Goal, generator: torch.Generator,
               init: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_adv [B, ...], success bool [B])`` for the quantised clean ``x``; ``init`` the seed
        perturbation projected onto the eps-ball (not yet the box: :meth:`project` for a start
        point), or ``None``."""
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

    def losses(self, oracle: Oracle, points: torch.Tensor, index: torch.Tensor, goal: Goal
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query ``points [M, ...]`` for examples ``index [M]``: ``(loss [M], fooled [M])``."""
        return self.judge(oracle, oracle(points, index), index, goal)

    def judge(self, oracle: Oracle, scores: torch.Tensor, index: torch.Tensor, goal: Goal
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss [M], fooled [M])`` of answers ``scores [M, K]`` for examples ``index [M]``."""
        labels = goal.labels[index]
        return (score_loss(scores, labels, self.loss, oracle.output, goal.targeted),
                fooled(scores, labels, goal.targeted))

    def first_query(self, oracle: Oracle, x: torch.Tensor, goal: Goal, delta: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each example's first query, at ``x + delta`` (:meth:`snap`; ``None``: the clean
        image), for the examples that can afford one: ``(points [B, ...] (the clean image where
        not queried), loss [B] (-inf where not queried), fooled [B])``."""
        b = x.shape[0]
        points = x.clone()
        best = torch.full((b,), float("-inf"), device=x.device)
        success = torch.zeros(b, dtype=torch.bool, device=x.device)
        idx = torch.arange(b, device=x.device)[affordable(oracle, torch.ones_like(success), 1)]
        if delta is not None:
            points[idx] = self.snap(oracle, x[idx], delta[idx])
        if goal.known is not None and idx.numel():  # answers already held are not bought twice
            held_points, held_scores = goal.known
            same = (points[idx] - held_points[idx]).flatten(1).abs().amax(1) < 1e-6  # << one 8-bit quantum
            same &= ~held_scores[idx].isnan().any(1)
            reuse, idx = idx[same], idx[~same]
            if reuse.numel():
                best[reuse], success[reuse] = self.judge(oracle, held_scores[reuse], reuse, goal)
        if idx.numel():
            best[idx], success[idx] = self.losses(oracle, points[idx], idx, goal)
        return points, best, success


def affordable(oracle: Oracle, active: torch.Tensor, cost: int) -> torch.Tensor:
    """The active examples that can pay ``cost`` more queries ``[B]``."""
    return active & (oracle.remaining.to(active.device) >= cost)


__all__ = ["BLACKBOX_ATTACKS", "Goal", "Outcome", "QueryAttack", "SCORE_LOSSES", "affordable", "draw", "fooled",
           "score_loss"]
