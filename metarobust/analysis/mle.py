"""Maximum-likelihood intrinsic dimension (Levina & Bickel, "Maximum Likelihood Estimation of
Intrinsic Dimension", NeurIPS 2004) with the MacKay-Ghahramani correction (MacKay & Ghahramani,
"Comments on 'Maximum Likelihood Estimation of Intrinsic Dimension' by E. Levina and P. Bickel",
2005).

With ``T_j(x)`` the distance from ``x`` to its ``j``-th nearest neighbour, the local estimate is

    m_k(x) = [ 1/(k-1) * sum_{j=1}^{k-1} log(T_k(x) / T_j(x)) ]^(-1)

(``k - 2`` instead of ``k - 1``: the "unbiased" variant). Levina and Bickel average ``m_k(x)`` over
the points; MacKay and Ghahramani show that the likelihood combines the *inverses*:

    m_k = [ (1/N) sum_x m_k(x)^(-1) ]^(-1)       (the harmonic mean; ``combine="mle"``)

Levina and Bickel also average over a range of ``k`` (10..20 in their paper); give
``n_neighbors=(k1, k2)`` for that. Matches scikit-dimension's ``MLE().fit(X, n_neighbors=k,
comb="mle")`` (cross-checked in the tests).
"""

from __future__ import annotations

from typing import Any

import torch

from metarobust.analysis.id_estimator import IDEstimator, check_param
from metarobust.analysis.points import PointCloud


class MLE(IDEstimator):
    """Levina-Bickel MLE of the intrinsic dimension, MacKay-Ghahramani combination.

    Args:
        n_neighbors: ``k`` (20, as scikit-dimension and Ansuini-style analyses), or a range
            ``(k1, k2)`` whose estimates are averaged (Levina & Bickel: ``(10, 20)``).
        combine: ``"mle"`` (harmonic mean of the local estimates: MacKay-Ghahramani) or
            ``"mean"`` (Levina-Bickel's arithmetic mean, biased upwards).
        unbiased: divide by ``k - 2`` instead of ``k - 1``.

    Fitted attributes: ``dimension_``, ``dimension_pw_`` (float64 numpy ``[n]`` local estimates of
    the largest ``k``), ``n_points_``, ``n_duplicates_``.

    Shapes: ``X [n, d]`` with ``n > k`` ``-> dimension_`` scalar.

    Example:
        >>> MLE(n_neighbors=20).fit(torch.rand(2000, 3) @ torch.randn(3, 40)).dimension_
        2.9...
    """

    def __init__(self, n_neighbors: int | tuple[int, int] = 20, combine: str = "mle",
                 unbiased: bool = False) -> None:
        self.n_neighbors = n_neighbors
        self.combine = combine
        self.unbiased = unbiased

    def _range(self) -> tuple[int, int]:
        k = self.n_neighbors
        return (int(k[0]), int(k[1])) if isinstance(k, (tuple, list)) else (int(k), int(k))

    def neighbours_needed(self) -> int:
        return self._range()[1]

    def check_params(self) -> None:
        k = self.n_neighbors
        ok = (isinstance(k, int) and not isinstance(k, bool)) or (
            isinstance(k, (tuple, list)) and len(k) == 2 and all(isinstance(v, int) for v in k))
        check_param(ok, self, "n_neighbors", "an integer k or a range (k1, k2) of integers")
        k1, k2 = self._range()
        low = 3 if self.unbiased else 2
        check_param(low <= k1 <= k2, self, "n_neighbors",
                    f"k >= {low} (and k1 <= k2 for a range), e.g. 20 or (10, 20)")
        check_param(self.combine in ("mle", "mean"), self, "combine", "'mle' or 'mean'")

    def measure(self, cloud: PointCloud, subset: torch.Tensor | None = None) -> dict[str, Any]:
        k1, k2 = self._range()
        T = cloud.knn(k2, subset)  # [n, k2], ascending, float64, all > 0 (no duplicates)
        log_t = torch.log(T)
        estimates = []
        for k in range(k1, k2 + 1):
            # inverse local estimate: mean of log(T_k / T_j) over j < k
            inverse = (log_t[:, k - 1 : k] - log_t[:, : k - 1]).sum(dim=1) / (k - 2 if self.unbiased else k - 1)
            if self.combine == "mle":
                estimates.append(1.0 / float(inverse.mean()))
            else:
                estimates.append(float((1.0 / inverse).mean()))
        return {"dimension_": sum(estimates) / len(estimates), "n_points_": T.shape[0],
                "dimension_pw_": (1.0 / inverse).cpu().numpy()}
