"""What the intrinsic-dimension analysis feeds forward: *feature units*.

A unit is a forward function plus the points it sees, as in the robust-evaluation harness
(:mod:`metarobust.evaluation.harness`): for a few-shot learner one frozen test episode, with
``forward`` at the weights fine-tuned on its support set and the query set as the points; for a
plain classifier a batch of test images with the model itself. Each unit also carries the
points' image ids (store indices), so an image that appears in several episodes is pooled once:
the same image under two episodes' fast weights gives two nearly coincident feature vectors,
and nearest-neighbour estimators would then measure the spread of the fast weights, not the
geometry of the features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from metarobust.config import ExperimentConfig
from metarobust.data.manifest import Manifest
from metarobust.data.store import ImageStore
from metarobust.evaluation import adapted_episodes
from metarobust.training.recipes import build_recipe


@dataclass
class FeatureUnit:
    """``forward`` (inputs -> logits) on points ``x [B, C, H, W]`` in [0, 1] with labels ``y [B]``;
    ``ids [B]`` (int64) identify the images (``None``: every point is distinct)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    ids: torch.Tensor | None = None


def fewshot_feature_units(model: nn.Module, store: ImageStore, manifest: Manifest,
                          cfg: ExperimentConfig) -> Iterator[FeatureUnit]:
    """One unit per frozen episode, in manifest order, as few-shot evaluation scores it
    (:func:`metarobust.evaluation.fewshot_units`): the recipe's evaluation learner on the
    support set (``meta.test_inner_steps`` clean SGD steps of MAML/ANIL, or RFS's logistic
    regression), model in eval mode; points = the query set.
    Adaptation runs lazily, so stopping early costs nothing for the remaining episodes."""

    learner = build_recipe(cfg).evaluation_learner(model, manifest.ways)
    for forward, episode, query_index in adapted_episodes(model, store, manifest, cfg, learner):
        yield FeatureUnit(forward, episode.query_x, episode.query_y, query_index)


def classifier_feature_units(model: nn.Module, store: ImageStore, batch_size: int = 256
                             ) -> Iterator[FeatureUnit]:
    """Units for a plain classifier (standard adversarial training): batches of the store's
    images (uint8 -> [0, 1]) in the fixed seeded order of
    :func:`~metarobust.data.store.evaluation_order` (splits are stored class by class, so the
    first ``analysis.points`` images in store order would be one class), with the model itself,
    in eval mode."""
    from metarobust.data.store import evaluation_order

    model.eval()
    order = evaluation_order(len(store)).to(store.images.device)
    for start in range(0, len(store), batch_size):
        index = order[start : start + batch_size]
        yield FeatureUnit(model, store.images[index].float().div(255), store.labels[index], index)
