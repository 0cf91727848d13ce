"""The intrinsic-dimension analysis of a trained few-shot learner on its frozen test episodes
(the public entry point of the shots study, ``scripts/shots_study.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from metarobust.analysis.report import IDReport, intrinsic_dimension_of_units
from metarobust.analysis.units import fewshot_feature_units
from metarobust.config import ExperimentConfig
from metarobust.data.manifest import Manifest
from metarobust.data.store import ImageStore


def fewshot_id_report(cfg: ExperimentConfig, model: nn.Module, store: ImageStore, manifest: Manifest,
                      progress: Callable[[Iterable], Iterable] | None = None) -> IDReport:
    """:func:`fewshot_intrinsic_dimension` with every detail (feature sizes, point counts,
    duplicates, the estimate on all points), as ``metarobust id`` writes it to ``id.json``."""
    units = fewshot_feature_units(model, store, manifest, cfg)
    report = intrinsic_dimension_of_units(units, model, cfg.analysis, cfg.attack, cfg.seed, progress)
    report.meta = {"recipe": cfg.recipe, "dataset": cfg.data.dataset, "ways": manifest.ways,
                   "shots": manifest.shots, "queries": manifest.queries,
                   "train_shots": cfg.meta.train_shots, "test_inner_steps": cfg.meta.test_inner_steps}
    return report


def fewshot_intrinsic_dimension(cfg: ExperimentConfig, model: nn.Module, store: ImageStore,
                                manifest: Manifest,
                                progress: Callable[[Iterable], Iterable] | None = None
                                ) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """Intrinsic dimension of clean and adversarial query features per layer, after fine-tuning.

    For each frozen test episode of ``manifest`` (in order) the model is fine-tuned on the
    support set as few-shot evaluation does (``meta.test_inner_steps`` clean SGD steps at
    ``meta.inner_lr``, eval mode); the query set is attacked with the ``attack`` section
    (PGD-10 by default) against the fine-tuned weights; the clean and adversarial query images
    are forwarded (the whole query set at once, as scored) and the activations of
    ``analysis.layers`` (default: each encoder block and the penultimate features) are
    flattened. Each image is pooled once (its first episode) until ``analysis.points``
    distinct images are reached. Then every estimator of ``analysis.estimators`` gives mean and
    standard deviation over ``analysis.bootstrap`` sub-samples of ``analysis.fraction`` of the
    points. A reconstruction of ITS-MAML's measurement [?]; see docs/intrinsic_dimension.md.

    Args:
        cfg: the run's config (``meta``, ``attack``, ``analysis``, ``seed``, ``eval.batch_size``).
        model: the trained learner (its meta-learned initial weights), on the store's device.
        store: the test split (``load_training_data(cfg, recipe, device).test``).
        manifest: the frozen test episodes (``resolve_manifest(cfg, store)``).
        progress: optional wrapper of the episode iterator (e.g. ``tqdm``).

    Returns: ``{layer: {"clean": {estimator: (mean, std)}, "adversarial": {...}}}``, e.g.
    ``{"penultimate": {"clean": {"twonn": (11.3, 0.4), "mle": (...), "pca": (...)}, ...}}``.
    Compare runs at the same ``analysis.points``: TwoNN and MLE depend on the sample size.

    Example:
        >>> cfg, model, _ = model_from_checkpoint("runs/its_maml_k5")
        >>> stores = load_training_data(cfg, build_recipe(cfg), resolve_device(cfg.device))
        >>> ids = fewshot_intrinsic_dimension(cfg, model, stores.test, resolve_manifest(cfg, stores.test))
        >>> ids["penultimate"]["clean"]["twonn"]
        (11.3..., 0.4...)
    """
    return fewshot_id_report(cfg, model, store, manifest, progress).estimates()
