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
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    source: str | None = field(default=None, compare=False, repr=False)
    """The file it was read from (named in errors); not saved."""

    def __len__(self) -> int:
        return len(self.episodes)

    def where(self, episode: int | None = None, key: str | None = None) -> str:
        """``episode manifest '<file>': episode 3, field 'query'`` for an error message."""
        text = f"episode manifest {self.source!r}" if self.source else f"episode manifest of {self.dataset!r}"
        if episode is not None:
            text += f": episode {episode}"
        if key is not None:
            text += f", field {key!r}"
        return text


HEADER = {"dataset": str, "split": str, "ways": int, "shots": int, "queries": int, "seed": int, "episodes": list}
"""A manifest's top-level fields and their JSON types (``count``, if present, must be the number
of episodes)."""
REFREEZE = "freeze them again with `metarobust episodes freeze DATASET` (--out FILE --force replaces a file)"
_NAME = re.compile(r"_(\d+)way_(\d+)shot_(\d+)query_(\d+)\.json$")


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
    fields = {k: v for k, v in asdict(manifest).items() if k != "source"}
    atomic_write_text(path, json.dumps(fields, separators=(",", ":")))
    return path


def load_manifest(path: str | Path) -> Manifest:
    """Read and check the manifest at ``path``: its header, and every episode against it (``ways``
    distinct classes, ``shots`` support and ``queries`` query images per class, each an integer
    position >= 0 used once in its episode). Any violation is a :class:`DataError` naming the file,
    the episode and the field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"episode manifest {str(path)!r} does not exist; write it with "
                        f"`metarobust episodes freeze DATASET`")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"episode manifest {str(path)!r} is corrupt ({exc}); freeze it again") from None
    return check_manifest(raw, str(path))


def check_manifest(raw: Any, source: str) -> Manifest:
    """The :class:`Manifest` a parsed JSON document describes, every field checked (see
    :func:`load_manifest`); ``source`` names it in errors."""
    where = f"episode manifest {source!r}"
    if not isinstance(raw, dict):
        raise DataError(f"{where} is corrupt: it holds a JSON {type(raw).__name__}, not an object with the fields "
                        f"{list(HEADER)}; {REFREEZE}")
    for key, kind in HEADER.items():
        if key not in raw:
            raise DataError(f"{where}: field {key!r} is missing; a manifest has {list(HEADER)}; {REFREEZE}")
        value = raw[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and key != "seed" and value < 1):
            expected = {str: "a string", list: "a list of episodes", int: "an integer"}[kind]
            expected += " >= 1" if kind is int and key != "seed" else ""
            raise DataError(f"{where}: field {key!r} is {value!r}; expected {expected}; {REFREEZE}")
    unknown = sorted(set(raw) - set(HEADER) - {"count"})
    if unknown:
        raise DataError(f"{where}: unknown fields {unknown}; a manifest has {list(HEADER)}")
    manifest = Manifest(**{key: raw[key] for key in HEADER}, source=source)
    count = len(manifest.episodes)
    if count == 0:
        raise DataError(f"{where}: field 'episodes' is empty; {REFREEZE}")
    if "count" in raw and raw["count"] != count:
        raise DataError(f"{where}: field 'count' declares {raw['count']!r} episodes but 'episodes' holds {count}; "
                        f"{REFREEZE}")
    named = _NAME.search(Path(source).name)
    if named:
        declared = dict(zip(("ways", "shots", "queries", "count"), map(int, named.groups())))
        actual = {"ways": manifest.ways, "shots": manifest.shots, "queries": manifest.queries, "count": count}
        for key, value in declared.items():
            if actual[key] != value:
                holds = "'episodes' holds" if key == "count" else f"field {key!r} says"
                raise DataError(f"{where}: its file name declares {key} {value}, but {holds} {actual[key]}; "
                                f"rename the file or {REFREEZE}")
    for index, episode in enumerate(manifest.episodes):
        _check_episode(manifest, index, episode)
    return manifest


def _check_episode(manifest: Manifest, index: int, episode: Any) -> None:
    """One episode against the header: ``ways`` distinct class names; per class ``shots`` support
    and ``queries`` query positions, integers >= 0, none used twice (a support image reused as a
    query would be scored on the image it was adapted on)."""
    if not isinstance(episode, dict):
        raise DataError(f"{manifest.where(index)} is a JSON {type(episode).__name__}, not an object with the "
                        f"fields 'classes', 'support', 'query'; {REFREEZE}")
    for key in ("classes", "support", "query"):
        if key not in episode:
            raise DataError(f"{manifest.where(index, key)} is missing; each episode has 'classes', 'support' and "
                            f"'query'; {REFREEZE}")
    classes = episode["classes"]
    if not isinstance(classes, list) or len(classes) != manifest.ways or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{manifest.where(index, 'classes')} is {_short(classes)}; the header declares ways="
                        f"{manifest.ways}, so expected {manifest.ways} class names; {REFREEZE}")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        raise DataError(f"{manifest.where(index, 'classes')}: class {twice[0]!r} appears twice; an episode's "
                        f"classes are distinct; {REFREEZE}")
    rows = {}
    for key, per_class, header in (("support", manifest.shots, "shots"), ("query", manifest.queries, "queries")):
        value = episode[key]
        if not (isinstance(value, list) and len(value) == manifest.ways
                and all(isinstance(row, list) and len(row) == per_class for row in value)):
            raise DataError(f"{manifest.where(index, key)} is {_short(value)}; the header declares ways="
                            f"{manifest.ways} and {header}={per_class}, so expected {manifest.ways} lists of "
                            f"{per_class} image positions; {REFREEZE}")
        for row in value:
            for image in row:
                if isinstance(image, bool) or not isinstance(image, int) or image < 0:
                    raise DataError(f"{manifest.where(index, key)}: image position {image!r} is invalid; "
                                    f"expected an integer >= 0 (an image's position inside its class); {REFREEZE}")
        rows[key] = value
    for c, (support, query) in enumerate(zip(rows["support"], rows["query"])):
        for key, row in (("support", support), ("query", query)):
            if len(set(row)) < len(row):
                raise DataError(f"{manifest.where(index, key)}: image {_repeated(row)} of class {classes[c]!r} "
                                f"appears twice; {REFREEZE}")
        shared = sorted(set(support) & set(query))
        if shared:
            raise DataError(f"{manifest.where(index, 'query')}: image {shared[0]} of class {classes[c]!r} is also "
                            f"a support image of the episode; support and query never share an image; {REFREEZE}")


def _repeated(row: list[int]) -> int:
    return next(i for i in row if row.count(i) > 1)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_head(manifest: Manifest, outputs: int, what: str) -> None:
    """Refuse episodes with more classes than the model's head scores (``outputs``; ``what``
    says where that number comes from)."""
    if manifest.ways > outputs:
        raise DataError(f"{manifest.where()}: its episodes are {manifest.ways}-way (field 'ways'; episode 0 "
                        f"onwards), but {what} scores {outputs} classes; freeze {outputs}-way episodes "
                        f"(`metarobust episodes freeze DATASET --ways {outputs}`) or give eval.manifest= one")


def manifest_batches(store: ImageStore, manifest: Manifest, batch_size: int) -> Iterator[EpisodeBatch]:
    """The manifest's episodes as :class:`EpisodeBatch` es of up to ``batch_size`` tasks each."""
    table, counts = store.class_table()
    lookup = {name: i for i, name in enumerate(store.class_names)}
    missing = sorted({c for e in manifest.episodes for c in e["classes"]} - lookup.keys())
    if missing:
        episode = next(i for i, e in enumerate(manifest.episodes) if set(e["classes"]) & set(missing))
        raise DataError(f"{manifest.where(episode, 'classes')}: classes not in {store.name}: {missing[:3]}...; "
                        f"the manifest belongs to another dataset or split")
    classes = torch.tensor([[lookup[c] for c in e["classes"]] for e in manifest.episodes])
    support = torch.tensor([e["support"] for e in manifest.episodes])  # [E, N, K]
    query = torch.tensor([e["query"] for e in manifest.episodes])  # [E, N, Q]
    counts_cpu = counts.cpu()[classes].unsqueeze(-1)
    for key, ids in (("support", support), ("query", query)):
        beyond = (ids >= counts_cpu).flatten(1).any(1)
        if bool(beyond.any()):
            episode = int(beyond.nonzero()[0])
            raise DataError(f"{manifest.where(episode, key)}: image positions exceed the images per class of "
                            f"{store.name}; the manifest belongs to another dataset version or split")
    device = store.device
    classes, support, query = classes.to(device), support.to(device), query.to(device)
    for start in range(0, len(manifest), batch_size):
        c = classes[start : start + batch_size]
        rows = table[c]  # [t, N, max_count]: store indices of each class, by in-class id
        yield gather_episodes(store, c, torch.gather(rows, 2, support[start : start + batch_size]),
                              torch.gather(rows, 2, query[start : start + batch_size]))
