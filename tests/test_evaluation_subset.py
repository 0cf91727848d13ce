"""Limited evaluations score a fixed random subset, never the first (single-class) images of a
class-sorted split."""

from __future__ import annotations

import torch
from torch import nn

from metarobust.analysis.units import classifier_feature_units
from metarobust.data.store import ImageStore, evaluation_order, evaluation_subset


def sorted_store(classes: int = 10, per_class: int = 100) -> ImageStore:
    labels = torch.arange(classes).repeat_interleave(per_class)  # stored class by class
    images = torch.randint(0, 256, (len(labels), 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageStore(images, labels, [str(c) for c in range(classes)], name="sorted/test")


def test_a_limited_evaluation_sees_every_class_and_is_the_same_every_time():
    store = sorted_store()
    index = evaluation_subset(len(store), 100)
    assert len(index) == 100 and len(set(index.tolist())) == 100
    assert set(store.labels[index].tolist()) == set(range(10))  # the first 100 would be class 0 only
    assert torch.equal(index, evaluation_subset(len(store), 100))
    assert torch.equal(evaluation_subset(len(store), 40), index[:40])  # a smaller budget is a prefix
    assert torch.equal(evaluation_subset(len(store), 5000), torch.arange(len(store)))


def test_plain_classifier_id_units_draw_from_every_class():
    store = sorted_store()
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    first = next(classifier_feature_units(model, store, batch_size=50))
    assert len(set(first.y.tolist())) >= 5
    assert torch.equal(first.ids, evaluation_order(len(store))[:50])
    assert torch.equal(first.y, store.labels[first.ids])
