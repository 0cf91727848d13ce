"""The dataset registry and what every reader shares: a config's ``data.dataset`` name becomes an
:class:`ImageStore` per split. The readers register themselves here; import
:mod:`metarobust.data.datasets`, which imports them all, to use the registry.

Every reader registers a loader ``loader(cfg: DataConfig, split: str) -> ImageStore`` with
:data:`DATASETS`; ``split`` is ``"train"``, ``"val"`` or ``"test"``. Class splits (which classes
belong to which split) are data, not code: they ship inside the package, in
``metarobust/episodes/<dataset>/`` next to the frozen evaluation episodes (:mod:`metarobust.resources`),
and are read with :func:`read_split_file`.

Example:
    >>> from metarobust.config import DataConfig
    >>> store = load_split(DataConfig(dataset="glyphs"), "test")
    >>> store.images.shape  # uint8 [M, 1, 28, 28]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from metarobust.config import DataConfig
from metarobust.data.store import ImageStore
from metarobust.errors import ConfigError, DataError
from metarobust.registry import Registry
from metarobust.resources import episodes_dir

DATASETS = Registry("dataset")
"""Loaders ``(cfg: DataConfig, split: str) -> ImageStore``, by ``data.dataset`` name."""

SPLITS: tuple[str, ...] = ("train", "val", "test")

EMBEDDED_DATASETS: set[str] = set()
"""Datasets generated in-process (no files, no download); readers add their name here."""

SPLITS_DIR = episodes_dir()
"""The shipped ``metarobust/episodes/`` folder (package data, so any install has it)."""


class NoSuchSplitError(DataError):
    """The dataset has no such split by design (MNIST and CIFAR have only the official train and
    test splits): not a broken install, so ``metarobust data info`` reports it without failing."""


def check_split(split: str) -> str:
    """Return ``split`` if it is one of :data:`SPLITS`, else raise :class:`ConfigError`."""
    if split not in SPLITS:
        raise ConfigError(f"split: unknown split {split!r}; choose one of {list(SPLITS)}")
    return split


def check_image_size(size: int) -> int:
    """Return ``size`` if it is a positive integer (``data.image_size``), else raise
    :class:`ConfigError`."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"data.image_size: must be a positive integer, got {size!r}")
    return size


DEFAULT_IMAGE_SIZE: dict[str, int] = {}
"""The standard image side of each dataset, used when ``data.image_size`` is ``None``; readers
add their entry (a dataset without one gets 28, the Omniglot/MAML size)."""


def image_size_of(cfg: DataConfig) -> int:
    """The image side ``cfg`` asks for: ``cfg.image_size``, or the dataset's standard size
    (:data:`DEFAULT_IMAGE_SIZE`) when it is ``None``; :class:`ConfigError` if not positive."""
    if cfg.image_size is None:
        return DEFAULT_IMAGE_SIZE.get(cfg.dataset, 28)
    return check_image_size(cfg.image_size)


def load_split(cfg: DataConfig, split: str) -> ImageStore:
    """The images of one split of ``cfg.dataset`` (uint8 ``[M, C, S, S]``, labels ``0..N-1``)."""
    check_split(split)
    loader = DATASETS.get(cfg.dataset, "data.dataset")
    return loader(cfg, split)


def dataset_root(cfg: DataConfig) -> Path:
    """Where ``cfg.dataset``'s files are: ``cfg.root`` if set, else ``$METAROBUST_DATA/<dataset>``,
    else ``~/.cache/metarobust/<dataset>``."""
    if cfg.root:
        return Path(cfg.root).expanduser()
    env = os.environ.get("METAROBUST_DATA")
    if env:
        return Path(env).expanduser() / cfg.dataset
    return Path.home() / ".cache" / "metarobust" / cfg.dataset


def dataset_info(cfg: DataConfig) -> dict[str, Any]:
    """A summary of every split of ``cfg.dataset``, for ``metarobust data info DATASET``.

    Returns:
        ``{"dataset", "source", "image_size", "rotations", "splits": {split: {"classes",
        "images", "images_per_class": [min, max], "image_shape": [C, H, W]}}}``; ``source`` is the
        root folder, or ``"embedded"`` for datasets generated in-process. A split that cannot be
        loaded (:class:`DataError`) is reported as ``{"error": message}``; if none can, the
        first error is raised. ``"failed"`` lists the splits that exist but did not load (a
        :class:`NoSuchSplitError`, a split the dataset does not have, is not a failure).
    """
    source = "embedded" if cfg.dataset in EMBEDDED_DATASETS else str(dataset_root(cfg))
    splits: dict[str, Any] = {}
    errors: list[DataError] = []
    failed: list[str] = []
    for split in SPLITS:
        try:
            store = load_split(cfg, split)
        except DataError as err:  # e.g. CIFAR has no val split: report it, show the others
            errors.append(err)
            splits[split] = {"error": str(err)}
            if not isinstance(err, NoSuchSplitError):
                failed.append(split)
            continue
        counts = store.counts()
        splits[split] = {
            "classes": store.num_classes,
            "images": len(store),
            "images_per_class": [int(counts.min()), int(counts.max())] if len(counts) else [0, 0],
            "image_shape": list(store.image_shape),
        }
    if len(errors) == len(SPLITS):
        raise errors[0]
    return {
        "dataset": cfg.dataset,
        "source": source,
        "image_size": image_size_of(cfg),
        "rotations": cfg.rotations,
        "splits": splits,
        "failed": failed,
    }


def split_file_path(dataset: str) -> Path:
    """``metarobust/episodes/<dataset>/splits.json``, shipped with the package."""
    return SPLITS_DIR / dataset / "splits.json"


def read_split_file(dataset: str) -> dict[str, Any]:
    """The parsed ``episodes/<dataset>/splits.json``; :class:`DataError` if missing or invalid."""
    path = split_file_path(dataset)
    if not path.is_file():
        raise DataError(
            f"{dataset}: split file {path} not found; it ships inside the package "
            f"(metarobust/episodes/{dataset}/), so reinstall metarobust (pip install metarobust, "
            f"or pip install -e . from a checkout)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{dataset}: split file {path} cannot be read: {err}") from err
