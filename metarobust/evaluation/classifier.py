"""Plain-classifier units: batches of test images, scored by the model itself in eval mode.

A plain classifier is the degenerate case of the harness's units: one group, no adaptation.
``eval.points`` limits the test images (0: all, e.g. the 10,000 of CIFAR-10) to a fixed, seeded
random subset (:func:`~metarobust.data.store.evaluation_subset`); intervals are binomial over
the images.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from metarobust.data.store import ImageStore, evaluation_subset
from metarobust.evaluation.harness import Unit, batch_coupled

EVAL_BATCH = 256
"""Test images per harness unit (eval mode: the batch size changes no prediction)."""


def classifier_unit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                    classes: torch.Tensor | None = None) -> Unit:
    """One group: ``model`` on images ``x [B, C, H, W]`` in [0, 1] with labels ``y [B]``
    (``classes``: default the labels)."""
    classes = y if classes is None else classes
    return Unit(lambda _, inputs: model(inputs), x[None], y[None], classes[None], coupled=batch_coupled(model))


def classifier_units(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     batch_size: int = EVAL_BATCH) -> Iterator[Unit]:
    """Units for a plain classifier: batches of ``images`` (uint8 or float in [0, 1]), the model
    in eval mode.

    Example:
        >>> result = evaluate_units(classifier_units(model, test.images, test.labels), cfg,
        ...                         test.num_classes, test.class_names)
    """
    model.eval()
    for start in range(0, len(labels), batch_size):
        x = images[start : start + batch_size]
        x = x.float().div(255) if x.dtype == torch.uint8 else x
        yield classifier_unit(model, x, labels[start : start + batch_size])


def evaluation_points(test: ImageStore, points: int) -> torch.Tensor:
    """Indices of the test images an evaluation scores: ``points`` of them (0: all), a fixed
    seeded random subset (:func:`~metarobust.data.store.evaluation_subset`)."""
    points = min(points or len(test), len(test))
    return evaluation_subset(len(test), points).to(test.images.device)
