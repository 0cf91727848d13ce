"""TwoNN (Facco, d'Errico, Rodriguez & Laio, "Estimating the intrinsic dimension of datasets by a
minimal neighborhood information", Scientific Reports 7:12140, 2017).

For each point let ``r1, r2`` be the distances to its first and second nearest neighbours and
``mu = r2 / r1``. If the density is about constant up to the second neighbour, ``mu`` follows a
Pareto law, ``F(mu) = 1 - mu^(-d)``, so ``-log(1 - F(mu)) = d log(mu)``: the slope of a line
through the origin. The procedure of the reference implementations (Facco et al.; Ansuini et al.,
NeurIPS 2019, ``ansuini/IntrinsicDimDeep``; scikit-dimension's ``TwoNN``):

1. drop points with ``r1 = 0`` (duplicates; here: exact duplicate rows are removed before the
   neighbour search, keeping one copy) and points with ``r1 = r2`` (degeneracies, as Ansuini);
2. sort the ``N`` remaining ratios, empirical CDF ``F_i = i / N`` (``N`` counts every kept point);
3. discard the largest ``discard_fraction`` of the ratios (0.1), keeping ``floor(N (1 - f))``;
4. least-squares slope through the origin of ``y = -log(1 - F_i)`` against ``x = log(mu_i)``:
   ``d = sum(x y) / sum(x^2)``, in float64.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from metarobust.analysis.id_estimator import IDEstimator, check_param
from metarobust.analysis.points import PointCloud
from metarobust.errors import DataError


class TwoNN(IDEstimator):
    """TwoNN intrinsic-dimension estimator (Facco et al. 2017).

    Args:
        discard_fraction: share of the largest ratios ``mu = r2 / r1`` left out of the fit
            (Facco et al. and scikit-dimension: 0.1; Ansuini et al. keep ``fraction=0.9``).

    Fitted attributes: ``dimension_`` (float), ``n_points_`` (distinct points), ``n_duplicates_``,
    ``n_degenerate_`` (points with ``r1 = r2``, dropped), ``n_fit_`` (points in the regression),
    ``x_`` / ``y_`` (float64 numpy ``log(mu)`` and ``-log(1 - F)`` used in the fit, for plots).

    Shapes: ``X [n, d]`` (numpy or torch, any device) ``-> dimension_`` scalar.

    Example:
        >>> X = torch.randn(2000, 5) @ torch.linalg.qr(torch.randn(50, 50))[0][:5]
        >>> TwoNN().fit(X).dimension_                    # a 5-d Gaussian in 50-d: about 5
        4.96...
    """

    def __init__(self, discard_fraction: float = 0.1) -> None:
        self.discard_fraction = discard_fraction

    def neighbours_needed(self) -> int:
        return 2

    def check_params(self) -> None:
        f = self.discard_fraction
        check_param(isinstance(f, (int, float)) and 0 <= f < 1, self, "discard_fraction",
                    "a fraction in [0, 1), e.g. 0.1")

    def measure(self, cloud: PointCloud, subset: torch.Tensor | None = None) -> dict[str, Any]:
        r = cloud.knn(2, subset)
        r1, r2 = r[:, 0], r[:, 1]
        good = (r1 > 0) & (r2 > r1)
        mu = torch.sort(r2[good] / r1[good]).values
        n = mu.numel()
        # F_N = 1 would give -log(0): with no discard the largest ratio still has to go.
        keep = min(math.floor(n * (1 - self.discard_fraction)), n - 1)
        if keep < 2:
            raise DataError(f"TwoNN needs at least 3 distinct, non-degenerate points; got {n} "
                            f"(of {r.shape[0]}): give more points")
        x = torch.log(mu[:keep])
        y = -torch.log1p(-torch.arange(1, keep + 1, dtype=torch.float64, device=mu.device) / n)
        slope = float((x * y).sum() / (x * x).sum())
        return {"dimension_": slope, "n_points_": r.shape[0], "n_degenerate_": r.shape[0] - n,
                "n_fit_": keep, "x_": x.cpu().numpy(), "y_": y.cpu().numpy()}
