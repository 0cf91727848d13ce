"""Episodic and single-task sampler invariants, and frozen-episode manifests."""

from __future__ import annotations

import pytest
import torch

from metarobust.data.manifest import freeze_episodes, load_manifest, manifest_batches, save_manifest
from metarobust.data.sampler import BatchSampler, EpisodicSampler
from metarobust.data.store import ImageStore
from metarobust.errors import DataError


def make_store(classes: int = 12, per_class: int = 20, uneven: bool = False) -> ImageStore:
    """Image i of class c is filled with a unique value pattern so identity can be checked."""
    counts = [per_class - (c % 3 if uneven else 0) for c in range(classes)]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    labels = labels[perm]  # the store need not be sorted by class
    images = torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    images[:, 0, 0, 1] = torch.arange(len(labels)).to(torch.uint8)  # store index (mod 256)
    return ImageStore(images, labels, [f"class{c:02d}" for c in range(classes)], "synthetic")


def test_support_and_query_never_share_an_image():
    sampler = EpisodicSampler(make_store(), ways=5, shots=3, queries=7, tasks=32, seed=0)
    batch = sampler.sample()
    for t in range(32):
        shared = set(batch.support_index[t].tolist()) & set(batch.query_index[t].tolist())
        assert not shared
        assert len(set(batch.query_index[t].tolist())) == 35


def test_each_task_has_n_distinct_classes_with_k_and_q_images_each():
    store = make_store(uneven=True)
    sampler = EpisodicSampler(store, ways=5, shots=2, queries=4, tasks=50, seed=1)
    batch = sampler.sample()
    assert batch.support_x.shape == (50, 10, 1, 4, 4) and batch.query_x.shape == (50, 20, 1, 4, 4)
    for t in range(50):
        classes = batch.classes[t]
        assert len(set(classes.tolist())) == 5
        # labels remapped to 0..N-1, class-major; the image really belongs to classes[label]
        assert batch.support_y[t].tolist() == [i for i in range(5) for _ in range(2)]
        assert batch.query_y[t].tolist() == [i for i in range(5) for _ in range(4)]
        assert torch.equal(store.labels[batch.support_index[t]], classes[batch.support_y[t]])
        assert torch.equal(store.labels[batch.query_index[t]], classes[batch.query_y[t]])


def test_pixels_are_the_gathered_images_scaled_to_unit_range():
    store = make_store()
    batch = EpisodicSampler(store, 5, 1, 2, tasks=4, seed=0).sample()
    expected = store.images[batch.query_index].float() / 255
    assert torch.equal(batch.query_x, expected)
    assert batch.query_x.dtype == torch.float32 and 0 <= batch.query_x.min() and batch.query_x.max() <= 1


def test_sampling_is_seeded_and_reproducible_and_state_restores():
    store = make_store()
    a = EpisodicSampler(store, 5, 1, 5, tasks=8, seed=7)
    b = EpisodicSampler(store, 5, 1, 5, tasks=8, seed=7)
    c = EpisodicSampler(store, 5, 1, 5, tasks=8, seed=8)
    first = a.sample()
    assert torch.equal(first.support_index, b.sample().support_index)
    assert not torch.equal(first.support_index, c.sample().support_index)
    state = a.state_dict()
    expected = a.sample()
    a.load_state_dict(state)
    assert torch.equal(a.sample().query_index, expected.query_index)


def test_train_shots_are_independent_of_test_shots():
    store = make_store()
    train = EpisodicSampler(store, 5, shots=5, queries=3, tasks=2, seed=0).sample()
    test = EpisodicSampler(store, 5, shots=1, queries=3, tasks=2, seed=0).sample()
    assert train.support_x.shape[1] == 25 and test.support_x.shape[1] == 5
    assert train.query_x.shape[1] == test.query_x.shape[1] == 15


def test_sampling_covers_all_classes_uniformly():
    batch = EpisodicSampler(make_store(classes=10), 5, 1, 1, tasks=4000, seed=0).sample()
    freq = torch.bincount(batch.classes.flatten(), minlength=10).float() / (4000 * 5)
    assert torch.allclose(freq, torch.full((10,), 0.1), atol=0.01)


def test_too_many_ways_is_a_clear_error():
    with pytest.raises(DataError, match=r"meta.ways=20 .* only 12 classes"):
        EpisodicSampler(make_store(), ways=20, shots=1, queries=1, tasks=1)


def test_more_shots_than_a_class_has_images_is_a_clear_error():
    with pytest.raises(DataError, match=r"shots \+ queries = 6 \+ 15 = 21 .* smallest has 20"):
        EpisodicSampler(make_store(), ways=5, shots=6, queries=15, tasks=1)


def test_single_task_batches_are_degenerate_episodes_covering_an_epoch():
    store = make_store(classes=6, per_class=10)  # 60 images
    sampler = BatchSampler(store, batch_size=20, seed=0)
    seen = []
    for _ in range(3):
        batch = sampler.sample()
        assert batch.num_tasks == 1 and batch.support_x.shape[1] == 0
        assert torch.equal(batch.query_y[0], store.labels[batch.query_index[0]])  # global labels
        seen += batch.query_index[0].tolist()
    assert sorted(seen) == list(range(60))  # one epoch = every image once
    state = sampler.state_dict()
    nxt = sampler.sample()
    sampler.load_state_dict(state)
    assert torch.equal(sampler.sample().query_index, nxt.query_index)


def test_frozen_manifest_round_trips_to_the_same_episodes(tmp_path):
    store = make_store()
    manifest = freeze_episodes(store, 5, 1, 3, count=10, seed=0, dataset="synthetic")
    path = save_manifest(manifest, tmp_path / "m.json")
    loaded = load_manifest(path)
    batches = list(manifest_batches(store, loaded, batch_size=4))
    assert [b.num_tasks for b in batches] == [4, 4, 2]
    reference = EpisodicSampler(store, 5, 1, 3, tasks=10, seed=0).sample()
    got = torch.cat([b.query_index for b in batches])
    assert torch.equal(got, reference.query_index)
    # a reordered store (same images) still gives the same images for the manifest
    perm = torch.randperm(len(store), generator=torch.Generator().manual_seed(5))
    shuffled = ImageStore(store.images[perm], store.labels[perm], store.class_names, "shuffled",
                          store.image_ids[perm])
    again = torch.cat([b.query_x for b in manifest_batches(shuffled, loaded, 10)])
    assert torch.equal(again, torch.cat([b.query_x for b in batches]))


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        load_manifest(bad)
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(tmp_path / "missing.json")
