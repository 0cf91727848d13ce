"""Learning-rate schedules of the adversarial-training papers, as closed forms of training time.

``lr_at(at, t)`` gives the learning rate at ``t`` epochs (fractional: the engine evaluates it
before every optimizer step, at ``t = (batches done + (replay + 1) / replays) / batches per
epoch``, so Free AT's replays count). Being a pure function of the step, it needs no
checkpointed state and a resumed run follows it exactly.

- ``piecewise``: ``lr * gamma^k`` after ``k`` of ``milestones`` (epochs) have passed (Madry
  et al.; Rice et al.: x0.1 at 100 and 150 of 200 epochs; TRADES: x0.1 at 75 of 76).
- ``cosine``: ``lr * (1 + cos(pi t / epochs)) / 2`` (Backward Smoothing's option).
- ``cyclic``: triangular, 0 at the start, ``lr`` at ``cyclic_peak * epochs``, 0 at the end
  (Wong et al.'s fast AT: 2/5 of the way; their ``np.interp([t], [0, 2E/5, E], [0, lr, 0])``).
- ``constant``: ``lr``.
"""

from __future__ import annotations

import bisect
import math

from metarobust.config import StandardTrainingConfig


def lr_at(at: StandardTrainingConfig, t: float) -> float:
    """The learning rate at ``t`` epochs into training (``0 <= t <= at.epochs``).

    Example:
        >>> lr_at(StandardTrainingConfig(schedule="cyclic", lr=0.2, epochs=15), 6.0)
        0.2
    """
    if at.schedule == "piecewise":
        return at.lr * at.gamma ** bisect.bisect_right(list(at.milestones), t)
    if at.schedule == "cosine":
        return at.lr * 0.5 * (1 + math.cos(math.pi * min(t, at.epochs) / at.epochs))
    if at.schedule == "cyclic":
        peak = at.cyclic_peak * at.epochs
        if t <= peak:
            return at.lr * t / peak
        return at.lr * max(0.0, (at.epochs - t) / (at.epochs - peak))
    if at.schedule == "constant":
        return at.lr
    raise ValueError(f"at.schedule={at.schedule!r}")
