"""Error bars for an intrinsic-dimension estimate: re-estimate on random sub-samples.

Ansuini et al. (NeurIPS 2019) report the TwoNN dimension as mean +- std over 20 random
sub-samples of 90% of the points. Sub-samples are drawn **without replacement**: a classical
bootstrap (with replacement) repeats points, and a repeated point is a zero nearest-neighbour
distance, which nearest-neighbour estimators must drop (so the bootstrap silently measures a
smaller sample). All sub-samples share one neighbour search (:class:`PointCloud`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from metarobust.analysis.id_estimator import IDEstimator
from metarobust.analysis.points import PointCloud
from metarobust.errors import ConfigError


def dimension_with_error(estimator: IDEstimator, X, n_boot: int = 20, fraction: float = 0.9,
                         seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of ``estimator``'s dimension over ``n_boot`` sub-samples.

    Args:
        estimator: a :class:`TwoNN`, :class:`MLE`, :class:`PCADimension` (not modified).
        X: points ``[n, d]`` (numpy or torch, any device), or a :class:`PointCloud` to share its
            distances with other estimators.
        n_boot: sub-samples; ``0`` returns the estimate on all points with std ``nan``.
        fraction: share of the (distinct) points in each sub-sample, in (0, 1]; 1 makes every
            sub-sample the whole set (std 0).
        seed: seeds the sub-sample draws (a CPU ``torch.Generator``), so results repeat.

    Returns: ``(mean, std)`` (std with ``ddof=1``; ``nan`` for fewer than 2 sub-samples).

    Example:
        >>> X = torch.randn(2000, 10)
        >>> dimension_with_error(TwoNN(), X, n_boot=20, fraction=0.9)
        (9.8..., 0.1...)
    """
    if not isinstance(n_boot, int) or n_boot < 0:
        raise ConfigError(f"n_boot={n_boot!r} is invalid; expected an integer >= 0 (e.g. 20)")
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"fraction={fraction!r} is invalid; expected a share of the points in (0, 1], e.g. 0.9")
    if not isinstance(estimator, IDEstimator):
        raise ConfigError(f"estimator={estimator!r} is not an intrinsic-dimension estimator; "
                          f"use TwoNN(), MLE() or PCADimension()")
    estimator.check_params()
    needed = estimator.neighbours_needed()
    cloud = X if isinstance(X, PointCloud) else PointCloud(X, neighbours=math.ceil(needed / fraction) + 8 if needed else 0)
    if n_boot == 0:
        return float(estimator.measure(cloud)["dimension_"]), float("nan")
    size = max(1, math.floor(fraction * cloud.n))
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_boot):
        subset = torch.randperm(cloud.n, generator=generator)[:size].to(cloud.device)
        values.append(float(estimator.measure(cloud, subset)["dimension_"]))
    spread = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return float(np.mean(values)), spread
