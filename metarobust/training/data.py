"""The images a run trains and is evaluated on, loaded once on the device for every recipe.

Which splits a recipe needs follows from how it is evaluated (:attr:`Recipe.evaluation`):

- ``fewshot`` (meta-learning, RFS): the dataset's class split; the train split is trained on
  (meta-recipes draw episodes from it, plain recipes such as RFS's pre-training see its classes as
  one many-way classifier) and the test split's held-out classes are scored per frozen episode.
  The episode shapes (``meta.ways``, ``train_shots``, ``test_shots``, ``queries``) are checked
  against both splits before any work.
- ``classifier`` (standard adversarial training): train and test hold the same classes;
  :class:`DataError` for a few-shot class split.

``at.holdout`` images of the train split are held out (fast AT's early-stop check, FRL's
validation) and ``at.train_size`` limits the rest, both by a seeded permutation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metarobust.config import ExperimentConfig
from metarobust.data.datasets import load_split
from metarobust.data.sampler import check_episode_shape
from metarobust.data.store import ImageStore
from metarobust.errors import ConfigError, DataError
from metarobust.training.recipes import Recipe

HOLDOUT_SEED_OFFSET = 104729
"""The held-out images are drawn with ``seed + this`` (apart from the sampler's and the attack's)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; other names as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class TrainingData:
    """A run's images on the device: ``train`` (trained on), ``holdout`` (``at.holdout`` images of
    the train split kept out of training; ``None`` if 0) and ``test`` (``None`` when not loaded)."""

    train: ImageStore
    holdout: ImageStore | None
    test: ImageStore | None

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def in_channels(self) -> int:
        return self.train.image_shape[0]

    @property
    def image_size(self) -> int:
        return self.train.image_shape[-1]


def take(store: ImageStore, index: torch.Tensor, name: str) -> ImageStore:
    """The images of ``store`` at ``index`` (labels and class names unchanged)."""
    index = index.to(store.device)
    return ImageStore(store.images[index], store.labels[index], list(store.class_names), name,
                      store.image_ids[index])


def split_train(store: ImageStore, holdout: int, train_size: int, seed: int) -> tuple[ImageStore, ImageStore | None]:
    """``(train, holdout)``: a seeded permutation of ``store``; its first ``holdout`` images are held
    out, the next ``train_size`` (0: all the rest) are trained on (kept in store order)."""
    if holdout + max(train_size, 1) > len(store):
        raise ConfigError(f"at.holdout={holdout} + at.train_size={train_size} exceed the {len(store)} images of "
                          f"{store.name}; lower them")
    if holdout == 0 and train_size == 0:
        return store, None
    generator = torch.Generator().manual_seed(seed + HOLDOUT_SEED_OFFSET)
    order = torch.randperm(len(store), generator=generator)
    rest = order[holdout:]
    if train_size:
        rest = rest[:train_size]
    held = take(store, order[:holdout].sort().values, f"{store.name}[holdout]") if holdout else None
    return take(store, rest.sort().values, store.name), held


def load_training_data(cfg: ExperimentConfig, recipe: Recipe, device: torch.device,
                       with_test: bool = True) -> TrainingData:
    """The splits ``recipe`` trains and is evaluated on, checked, on ``device``."""
    train = load_split(cfg.data, "train")
    test = load_split(cfg.data, "test") if with_test or recipe.evaluation == "fewshot" else None
    if recipe.evaluation == "fewshot":
        m = cfg.meta
        if recipe.episodic:
            check_episode_shape(train, m.ways, m.train_shots, m.queries, "meta")
        check_episode_shape(test, m.ways, m.test_shots, m.queries, "meta")
        if not with_test:
            test = None
    elif test is not None and test.class_names != train.class_names:
        raise DataError(f"data.dataset={cfg.data.dataset!r}: its train and test splits hold different classes "
                        f"(a few-shot class split), so recipe {cfg.recipe!r} (a plain classifier) cannot be "
                        f"trained and tested on it; use a classification dataset such as mnist, fashion_mnist, "
                        f"cifar10 or cifar100, or a few-shot recipe (rfs_adversarial: PGD-AT, evaluated per episode)")
    if not recipe.episodic:
        train, holdout = split_train(train, cfg.at.holdout, cfg.at.train_size, cfg.seed)
    else:
        holdout = None
    return TrainingData(train.to(device), holdout.to(device) if holdout else None,
                        test.to(device) if test is not None else None)


__all__ = ["HOLDOUT_SEED_OFFSET", "TrainingData", "load_training_data", "resolve_device", "split_train", "take"]
