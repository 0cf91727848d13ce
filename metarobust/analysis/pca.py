"""Linear (PCA) intrinsic dimension: the number of principal components that explain a share
``tau`` of the variance (``tau = 0.9``: Ansuini et al., NeurIPS 2019, who contrast this linear
measure with TwoNN; scikit-dimension's ``lPCA(ver="ratio", alphaRatio=0.9)``).

A linear measure: on a curved manifold it counts the dimensions of the smallest linear subspace
holding most of the variance, which can be far above the manifold's dimension (a Swiss roll is 2-d
and needs 3 components). Also reports the participation ratio ``(sum l)^2 / sum l^2`` of the
covariance eigenvalues ``l``, a threshold-free linear dimension.
"""

from __future__ import annotations

from typing import Any

import torch

from metarobust.analysis.id_estimator import IDEstimator, check_param
from metarobust.analysis.points import PointCloud
from metarobust.errors import DataError


class PCADimension(IDEstimator):
    """Number of principal components explaining ``variance`` of the total variance.

    Args:
        variance: the share ``tau`` in (0, 1] (0.9).

    Fitted attributes: ``dimension_`` (float holding an integer: the smallest ``m`` with
    ``sum_{i<=m} l_i >= tau * sum_i l_i``), ``explained_variance_ratio_`` (float64 numpy, descending),
    ``participation_ratio_``, ``n_points_``, ``n_duplicates_``.

    Shapes: ``X [n, d]`` ``-> dimension_`` scalar (at most ``min(n - 1, d)``).

    Example:
        >>> PCADimension(0.9).fit(torch.randn(500, 4) @ torch.randn(4, 30)).dimension_
        4.0
    """

    def __init__(self, variance: float = 0.9) -> None:
        self.variance = variance

    def check_params(self) -> None:
        v = self.variance
        check_param(isinstance(v, (int, float)) and 0 < v <= 1, self, "variance",
                    "a share of the variance in (0, 1], e.g. 0.9")

    def measure(self, cloud: PointCloud, subset: torch.Tensor | None = None) -> dict[str, Any]:
        eig = cloud.spectrum(subset)
        total = float(eig.sum())
        if eig.numel() == 0 or total <= 0:
            raise DataError(f"PCA dimension: the {cloud.n if subset is None else subset.numel()} points "
                            f"have zero variance (all features constant); nothing to measure")
        ratio = eig / total
        # smallest m with cumulative share >= tau (a relative tolerance absorbs rounding at tau = 1)
        cumulative = torch.cumsum(ratio, 0)
        m = int((cumulative < self.variance * (1 - 1e-12)).sum()) + 1
        return {"dimension_": float(min(m, eig.numel())), "explained_variance_ratio_": ratio.cpu().numpy(),
                "participation_ratio_": total ** 2 / float((eig * eig).sum()),
                "n_points_": cloud.n if subset is None else int(subset.numel())}
