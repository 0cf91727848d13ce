"""The optimizer and learning-rate schedule of every recipe, as closed forms of training time.

``optim`` settings left ``null`` take the recipe's defaults (:meth:`Recipe.default_optim`: Adam
1e-3 constant for meta-learning, SGD 0.1 momentum 0.9 piecewise for plain training);
:func:`resolve_optim` fills them and rejects combinations that cannot work before any work.
``lr_at(optim, t, total)`` gives the learning rate at ``t`` epochs of ``total`` (fractional: the
engine evaluates it before every optimizer step, at ``t = (batches done + (replay + 1) / replays)
/ batches per epoch``, so Free AT's replays count; meta-learning counts meta-updates as epochs).
Being a pure function of the step, it needs no checkpointed state and a resumed run follows it
exactly.

- ``piecewise``: ``lr * gamma^k`` after ``k`` of ``milestones`` (epochs) have passed (Madry
  et al.; Rice et al.: x0.1 at 100 and 150 of 200 epochs; TRADES: x0.1 at 75 of 76).
- ``cosine``: ``lr * (1 + cos(pi t / total)) / 2`` (Backward Smoothing's option).
- ``cyclic``: triangular, 0 at the start, ``lr`` at ``cyclic_peak * total``, 0 at the end
  (Wong et al.'s Fast/Free AT CIFAR-10 scripts: half way, torch's ``CyclicLR`` with equal phases;
  their MNIST script: 2/5, ``np.interp([t], [0, 2E/5, E], [0, lr, 0])``).
- ``constant``: ``lr``.
"""

from __future__ import annotations

import bisect
import math

import torch

from metarobust.config import OptimConfig
from metarobust.errors import ConfigError


def resolve_optim(optim: OptimConfig, defaults: OptimConfig, total_epochs: float) -> OptimConfig:
    """``optim`` with its ``null`` fields from ``defaults``, checked against each other and the
    run's length: :class:`ConfigError` naming the field for a combination that cannot work."""
    o = optim.filled(defaults)
    if o.name == "adam" and (optim.momentum not in (None, 0) or o.nesterov):
        raise ConfigError(f"optim.name=adam takes no optim.momentum={optim.momentum} / optim.nesterov={o.nesterov} "
                          f"(Adam's moments are built in); use optim.name=sgd or drop them")
    if o.nesterov and not o.momentum:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0 (e.g. 0.9)")
    if o.schedule == "piecewise" and any(m > total_epochs for m in o.milestones or []):
        raise ConfigError(f"optim.milestones={list(o.milestones)} lie beyond the run's {total_epochs:g} epochs "
                          f"(meta-learning: meta-updates); give milestones in (0, {total_epochs:g}]")
    return o


def build_optimizer(params: list[torch.Tensor], o: OptimConfig) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` or ``SGD`` over ``params`` with the resolved settings ``o``."""
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)


def describe(o: OptimConfig) -> str:
    """One line for reports: ``SGD lr 0.1 (piecewise at [100.0, 150.0], x0.1), momentum 0.9, ...``."""
    schedule = o.schedule
    if o.schedule == "piecewise":
        schedule = f"piecewise at {list(o.milestones)}, x{o.gamma:g}"
    elif o.schedule == "cyclic":
        schedule = f"cyclic, peak at {o.cyclic_peak:g}"
    extra = f", momentum {o.momentum:g}{' (Nesterov)' if o.nesterov else ''}" if o.name == "sgd" else ""
    return f"{o.name.upper() if o.name == 'sgd' else 'Adam'} lr {o.lr:g} ({schedule}){extra}, weight decay {o.weight_decay:g}"


def lr_at(o: OptimConfig, t: float, total: float) -> float:
    """The learning rate at ``t`` epochs into a run of ``total`` (``0 <= t <= total``).

    Example:
        >>> lr_at(OptimConfig(schedule="cyclic", lr=0.2), 7.5, 15)
        0.2
    """
    if o.schedule == "piecewise":
        return o.lr * o.gamma ** bisect.bisect_right(list(o.milestones), t)
    if o.schedule == "cosine":
        return o.lr * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
    if o.schedule == "cyclic":
        peak = o.cyclic_peak * total
        if t <= peak:
            return o.lr * t / peak
        return o.lr * max(0.0, (total - t) / (total - peak))
    if o.schedule == "constant":
        return o.lr
    raise ValueError(f"optim.schedule={o.schedule!r}")


__all__ = ["build_optimizer", "describe", "lr_at", "resolve_optim"]
