"""The base of the intrinsic-dimension estimators: scikit-learn's ``fit(X)`` / ``dimension_``
convention (as scikit-dimension), parameters set in ``__init__`` and checked in ``fit``."""

from __future__ import annotations

from typing import Any

import torch
from sklearn.base import BaseEstimator

from metarobust.analysis.points import PointCloud
from metarobust.errors import ConfigError


class IDEstimator(BaseEstimator):
    """A global intrinsic-dimension estimator.

    Subclasses implement :meth:`check_params` (raise :class:`ConfigError` on a bad parameter) and
    :meth:`measure` (the fitted attributes for a :class:`PointCloud`, optionally restricted to a
    sub-sample), so that :func:`~metarobust.analysis.dimension_with_error` re-estimates on
    sub-samples without recomputing distances.

    ``fit(X)`` accepts a numpy array or tensor ``[n, d]`` (any device; distances are computed
    there) or a :class:`PointCloud` already built (to share its distances between estimators).
    After ``fit``: ``dimension_`` (float), plus the estimator's own fitted attributes.
    """

    #: How many nearest neighbours :meth:`measure` needs (0: none, e.g. PCA).
    def neighbours_needed(self) -> int:
        return 0

    def check_params(self) -> None:
        raise NotImplementedError

    def measure(self, cloud: PointCloud, subset: torch.Tensor | None = None) -> dict[str, Any]:
        """Fitted attributes (``{"dimension_": float, ...}``) on ``cloud`` or its ``subset``."""
        raise NotImplementedError

    def fit(self, X, y=None) -> IDEstimator:
        """Estimate the intrinsic dimension of ``X [n, d]``; ``y`` is ignored (scikit-learn API)."""
        self.check_params()
        cloud = X if isinstance(X, PointCloud) else PointCloud(X)
        for key, value in self.measure(cloud).items():
            setattr(self, key, value)
        self.n_duplicates_ = cloud.n_duplicates
        return self

    def fit_transform(self, X, y=None) -> float:
        """``fit(X).dimension_`` (scikit-dimension's shortcut)."""
        return self.fit(X).dimension_


def check_param(condition: bool, estimator: IDEstimator, name: str, accepted: str) -> None:
    """Raise :class:`ConfigError` naming ``Estimator(name=value)`` and what is accepted."""
    if not condition:
        value = getattr(estimator, name)
        raise ConfigError(f"{type(estimator).__name__}({name}={value!r}) is invalid; expected {accepted}")
