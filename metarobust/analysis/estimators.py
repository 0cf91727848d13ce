"""The estimator registry: ``analysis.estimators`` names -> configured estimators."""

from __future__ import annotations

from metarobust.analysis.id_estimator import IDEstimator
from metarobust.analysis.mle import MLE
from metarobust.analysis.pca import PCADimension
from metarobust.analysis.twonn import TwoNN
from metarobust.registry import Registry

ESTIMATORS = Registry("intrinsic-dimension estimator")


@ESTIMATORS.register("twonn", "TwoNN (Facco et al. 2017): slope of -log(1-F) vs log(r2/r1), largest 10% left out")
def _twonn(cfg) -> IDEstimator:
    return TwoNN(discard_fraction=cfg.twonn_discard)


@ESTIMATORS.register("mle", "Levina-Bickel MLE with k neighbours, MacKay-Ghahramani (harmonic) combination")
def _mle(cfg) -> IDEstimator:
    return MLE(n_neighbors=cfg.mle_neighbors)


@ESTIMATORS.register("pca", "linear PCA dimension: components explaining 90% of the variance")
def _pca(cfg) -> IDEstimator:
    return PCADimension(variance=cfg.pca_variance)


def build_estimators(cfg) -> dict[str, IDEstimator]:
    """``{name: estimator}`` for ``cfg.estimators`` (an :class:`~metarobust.config.IDConfig`)."""
    return {name: ESTIMATORS.get(name, "analysis.estimators")(cfg) for name in cfg.estimators}
