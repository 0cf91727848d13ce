"""Two models scored on the same points, compared point by point: McNemar's exact test and an
interval for the difference of their accuracies.

When two models are evaluated on the same test points (the same ``eval.points`` subset, the same
attack noise seed), each point gives a pair of verdicts. Points where both models agree say
nothing about which is better; of the ``m`` discordant points, ``b`` are correct only under model
A and ``c`` only under model B. Under the null hypothesis of equal accuracy each discordant point
is A's with probability 1/2 (McNemar 1947; the exact, binomial form). Pairing removes the
between-point variance that two independent binomial intervals carry, so a difference of a few
points on 1000 shared points can be separated when the two intervals overlap.

- **p-value**: two-sided exact McNemar, ``min(1, 2 min(P[X <= b], P[X >= b]))`` with
  ``X ~ Binomial(m, 1/2)`` (for 1/2 this equals the "minimum likelihood" two-sided p).
- **interval**: the difference ``(b - c) / n = m (2 pi - 1) / n``, with the Clopper-Pearson 95 %
  interval of ``pi = P(A's | discordant)`` given ``b`` of ``m``: exact and conditional on the
  number of discordant points, and consistent with the test (the interval excludes 0 exactly
  when ``p < 0.05``). With no discordant point it is ``[0, 0]``: the two models gave the same
  verdict on every point.
- **separated**: ``p < 0.05``.

Example:
    >>> a, b = point_verdicts(trades_eval), point_verdicts(pgd_at_eval)
    >>> c = paired_comparison(a, b)
    >>> c.difference, c.ci95, c.p_value, c.separated
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

ALPHA = 0.05
"""The level of the test and of the interval (95 %)."""


@dataclass(frozen=True)
class PairedComparison:
    """A minus B on shared points (accuracies in [0, 1]).

    Attributes:
        difference: ``acc(A) - acc(B)``.
        ci95: ``(low, high)``, the exact conditional 95 % interval of the difference.
        p_value: two-sided exact McNemar p-value.
        points: the shared points ``n``.
        only_a, only_b: discordant points correct under A only, under B only.
        separated: ``p_value < 0.05`` (equivalently, ``ci95`` excludes 0).
    """

    difference: float
    ci95: tuple[float, float]
    p_value: float
    points: int
    only_a: int
    only_b: int

    @property
    def separated(self) -> bool:
        return self.p_value < ALPHA

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci95"] = list(self.ci95)
        out["verdict"] = "separated" if self.separated else "not separated"
        return out


def _log_pmf_terms(k_max: int, m: int, p: float, low: int = 0) -> list[float]:
    log_p, log_q = math.log(p), math.log1p(-p)
    return [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) + i * log_p + (m - i) * log_q
            for i in range(low, k_max + 1)]


def binomial_cdf(k: int, m: int, p: float) -> float:
    """``P[X <= k]`` for ``X ~ Binomial(m, p)``, summed exactly in log space."""
    if k < 0:
        return 0.0
    if k >= m or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    terms = _log_pmf_terms(k, m, p)
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def binomial_sf(k: int, m: int, p: float) -> float:
    """``P[X >= k]`` for ``X ~ Binomial(m, p)``."""
    if k <= 0:
        return 1.0
    if k > m or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    terms = _log_pmf_terms(m, m, p, low=k)
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def _solve(f, target: float, increasing: bool) -> float:
    """The ``p`` in [0, 1] where the monotone ``f(p)`` crosses ``target`` (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, m: int, alpha: float = ALPHA) -> tuple[float, float]:
    """The exact (Clopper-Pearson) ``1 - alpha`` interval of a binomial proportion, ``k`` of ``m``."""
    low = 0.0 if k == 0 else _solve(lambda p: binomial_sf(k, m, p), alpha / 2, increasing=True)
    high = 1.0 if k == m else _solve(lambda p: binomial_cdf(k, m, p), alpha / 2, increasing=False)
    return low, high


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value of ``only_a`` against ``only_b`` discordant points."""
    m = only_a + only_b
    if m == 0:
        return 1.0
    return min(1.0, 2 * min(binomial_cdf(only_a, m, 0.5), binomial_sf(only_a, m, 0.5)))


def paired_comparison(a: torch.Tensor, b: torch.Tensor) -> PairedComparison:
    """Compare models A and B from their verdicts on the same points.

    Args:
        a, b: bool ``[N]``, whether each point is classified correctly (clean, or robust under
            an attack or cascade) by A and by B; the same points in the same order
            (:func:`~metarobust.evaluation.result.point_verdicts` of two evaluations with the same
            ``eval.points`` on the same test split).

    Returns: a :class:`PairedComparison` of A minus B.

    Example:
        >>> paired_comparison(torch.tensor([1, 1, 0, 1]).bool(), torch.tensor([0, 1, 0, 0]).bool()).only_a
        2
    """
    if a.shape != b.shape or a.dim() != 1 or len(a) == 0:
        raise ValueError(f"verdicts of shapes {tuple(a.shape)} and {tuple(b.shape)}; expected two bool vectors "
                         f"[N] over the same N > 0 points")
    a, b = a.bool().cpu(), b.bool().cpu()
    n = len(a)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    m = only_a + only_b
    if m == 0:
        low = high = 0.0
    else:
        pi_low, pi_high = clopper_pearson(only_a, m)
        low, high = m * (2 * pi_low - 1) / n, m * (2 * pi_high - 1) / n
    return PairedComparison(difference=(only_a - only_b) / n, ci95=(low, high), p_value=mcnemar_exact(only_a, only_b),
                            points=n, only_a=only_a, only_b=only_b)


__all__ = ["PairedComparison", "binomial_cdf", "binomial_sf", "clopper_pearson", "mcnemar_exact",
           "paired_comparison"]
