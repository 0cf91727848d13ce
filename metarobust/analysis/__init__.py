"""Intrinsic-dimension analysis: estimators (TwoNN, MLE, PCA) with sub-sample error bars,
feature extraction by forward hooks, and the clean-vs-adversarial per-layer analysis of a trained
few-shot learner or classifier (``metarobust id``; docs/intrinsic_dimension.md).

Example:
    >>> from metarobust.analysis import TwoNN, dimension_with_error
    >>> TwoNN().fit(X).dimension_, dimension_with_error(TwoNN(), X, n_boot=20, fraction=0.9)
"""

from __future__ import annotations

from metarobust.analysis.estimators import ESTIMATORS, build_estimators
from metarobust.analysis.features import default_layers, extract_features
from metarobust.analysis.fewshot import fewshot_id_report, fewshot_intrinsic_dimension
from metarobust.analysis.id_estimator import IDEstimator
from metarobust.analysis.mle import MLE
from metarobust.analysis.pca import PCADimension
from metarobust.analysis.points import PointCloud
from metarobust.analysis.report import IDReport, collect_features, intrinsic_dimension_of_units
from metarobust.analysis.subsample import dimension_with_error
from metarobust.analysis.twonn import TwoNN
from metarobust.analysis.units import FeatureUnit, classifier_feature_units, fewshot_feature_units

__all__ = ["ESTIMATORS", "FeatureUnit", "IDEstimator", "IDReport", "MLE", "PCADimension", "PointCloud",
           "TwoNN", "build_estimators", "classifier_feature_units", "collect_features", "default_layers",
           "dimension_with_error", "extract_features", "fewshot_feature_units", "fewshot_id_report",
           "fewshot_intrinsic_dimension", "intrinsic_dimension_of_units"]
