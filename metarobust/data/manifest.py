"""Frozen evaluation episodes: every method is scored on the same test episodes.

A manifest is a small JSON file under ``episodes/<dataset>/`` listing, for each episode, its
classes by name and its support and query images by their position inside the class. Names and
in-class positions (not store indices) keep a manifest valid when a reader's order changes.

    {"dataset": "omniglot", "split": "test", "ways": 5, "shots": 1, "queries": 15,
     "seed": 0, "episodes": [{"classes": ["Latin/character03", ...],
                              "support": [[7], ...], "query": [[0, 4, ...], ...]}, ...]}

Write one with ``metarobust episodes freeze DATASET``. The benchmark manifests ship inside the
package (``metarobust/episodes/<dataset>/``); a user's go to
:func:`~metarobust.resources.user_episodes_dir` (:mod:`metarobust.resources`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from metarobust.data.episode import EpisodeBatch
from metarobust.data.sampler import EpisodicSampler, gather_episodes
from metarobust.data.store import ImageStore
from metarobust.errors import DataError
from metarobust.resources import find_manifest
from metarobust.runs import atomic_write_text


@dataclass
class Manifest:
    dataset: str
    split: str
    ways: int
    shots: int
    queries: int
    seed: int
    episodes: list[dict]

    def __len__(self) -> int:
        return len(self.episodes)


def manifest_filename(ways: int, shots: int, queries: int, count: int, rotations: bool = False) -> str:
    """``test[_rot]_<N>way_<K>shot_<Q>query_<E>.json``: the name that says an episode shape."""
    suffix = "_rot" if rotations else ""
    return f"test{suffix}_{ways}way_{shots}shot_{queries}query_{count}.json"


def default_manifest_path(dataset: str, ways: int, shots: int, queries: int, count: int,
                          rotations: bool = False) -> Path:
    """The shipped benchmark manifest of this shape if there is one, else the user's
    (:func:`metarobust.resources.find_manifest`)."""
    return find_manifest(dataset, manifest_filename(ways, shots, queries, count, rotations))


def freeze_episodes(store: ImageStore, ways: int, shots: int, queries: int, count: int,
                    seed: int = 0, dataset: str = "", split: str = "test") -> Manifest:
    """Draw ``count`` episodes from ``store`` with a fixed seed and record them by name."""
    sampler = EpisodicSampler(store.to("cpu"), ways, shots, queries, tasks=count, seed=seed)
    batch = sampler.sample()
    names = store.class_names
    ids = sampler.store.image_ids
    episodes = []
    for t in range(count):
        classes = batch.classes[t].tolist()
        sup = ids[batch.support_index[t]].view(ways, shots).tolist()
        qry = ids[batch.query_index[t]].view(ways, queries).tolist()
        episodes.append({"classes": [names[c] for c in classes], "support": sup, "query": qry})
    return Manifest(dataset, split, ways, shots, queries, seed, episodes)


def save_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write atomically (a temporary file renamed into place)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(asdict(manifest), separators=(",", ":")))
    return path


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"episode manifest {str(path)!r} does not exist; write it with "
                        f"`metarobust episodes freeze DATASET`")
    try:
        return Manifest(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise DataError(f"episode manifest {str(path)!r} is corrupt ({exc}); freeze it again") from None


def manifest_batches(store: ImageStore, manifest: Manifest, batch_size: int) -> Iterator[EpisodeBatch]:
    """The manifest's episodes as :class:`EpisodeBatch` es of up to ``batch_size`` tasks each."""
    table, counts = store.class_table()
    lookup = {name: i for i, name in enumerate(store.class_names)}
    missing = sorted({c for e in manifest.episodes for c in e["classes"]} - lookup.keys())
    if missing:
        raise DataError(f"manifest classes not in {store.name}: {missing[:3]}...; the manifest "
                        f"belongs to another dataset or split")
    classes = torch.tensor([[lookup[c] for c in e["classes"]] for e in manifest.episodes])
    support = torch.tensor([e["support"] for e in manifest.episodes])  # [E, N, K]
    query = torch.tensor([e["query"] for e in manifest.episodes])  # [E, N, Q]
    counts_cpu = counts.cpu()[classes].unsqueeze(-1)
    if bool((support >= counts_cpu).any()) or bool((query >= counts_cpu).any()):
        raise DataError("manifest image ids exceed the images per class of "
                        f"{store.name}; the manifest belongs to another dataset version")
    device = store.device
    classes, support, query = classes.to(device), support.to(device), query.to(device)
    for start in range(0, len(manifest), batch_size):
        c = classes[start : start + batch_size]
        rows = table[c]  # [t, N, max_count]: store indices of each class, by in-class id
        yield gather_episodes(store, c, torch.gather(rows, 2, support[start : start + batch_size]),
                              torch.gather(rows, 2, query[start : start + batch_size]))
