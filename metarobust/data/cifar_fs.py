"""``cifar_fs`` and ``fc100``: the few-shot benchmarks built from CIFAR-100's classes.

- **CIFAR-FS** (Bertinetto et al., "Meta-learning with differentiable closed-form solvers",
  ICLR 2019): the 100 fine classes split at random into 64 train / 16 val / 20 test classes.
- **FC100** (Oreshkin et al., "TADAM", NeurIPS 2018): split by superclass so that train and test
  classes share little: 12 / 4 / 4 superclasses = 60 / 20 / 20 fine classes.

Every class keeps all of its 600 images (the official 500 training and 100 test images
together, as both papers do); ``image_ids`` 0..499 are the official training images of the
class in file order, 500..599 its test images. Images are uint8 ``[M, 3, S, S]``, S =
``data.image_size`` (default 32, the native size; RFS and R-MAML train at 32).

Files:
    Anything the ``cifar100`` reader reads (:mod:`metarobust.data.cifar`): the official
    ``cifar-100-python/`` batches (``train``, ``test``, ``meta``), ``cifar-100-python.tar.gz``,
    or an image tree with the official class names, under ``data.root`` (point it at your
    CIFAR-100 folder; unset: ``$METAROBUST_DATA/cifar_fs`` or ``~/.cache/metarobust/cifar_fs``).
    ``data.download=true`` fetches the official archive through torchvision. These datasets are
    not on the development machine: the tests write small files in the official pickle format.

Splits (data, not code):
    ``episodes/cifar_fs/splits.json``: the class lists of the authors' split files
    (``bertinetto/r2d2``, ``data/cifar-fs/splits/bertinetto/{train,val,test}.txt``), as
    torchmeta ships them. ``episodes/fc100/splits.json``: superclass ids train
    1,2,3,4,5,6,9,10,15,17,18,19, val 8,11,13,16, test 0,7,12,14 and the fine classes of each
    (from ``episodes/cifar100/classes.json``); when the files carry coarse labels (the official
    pickles do), each FC100 class's superclass is checked against them.

Example:
    >>> store = load_split(DataConfig(dataset="cifar_fs", root="data/cifar100"), "test")
    >>> store.num_classes, len(store)  # (20, 12000)
"""

from __future__ import annotations

from typing import Any

import torch

from metarobust.config import DataConfig
from metarobust.data import cifar  # the module, not its names: it may still be initialising
from metarobust.data.catalog import (
    DATASETS,
    DEFAULT_IMAGE_SIZE,
    check_split,
    read_split_file,
    split_file_path,
)
from metarobust.data.store import ImageStore
from metarobust.errors import DataError

SPLIT_SIZES: dict[str, dict[str, int]] = {
    "cifar_fs": {"train": 64, "val": 16, "test": 20},
    "fc100": {"train": 60, "val": 20, "test": 20},
}
"""Fine classes per split, as the papers define them."""

FC100_SUPERCLASSES: dict[str, int] = {"train": 12, "val": 4, "test": 4}


def split_classes(dataset: str) -> dict[str, list[str]]:
    """``{split: fine class names}`` of ``dataset`` (``cifar_fs`` or ``fc100``) from its split
    file, checked: the papers' class counts, no class in two splits, official names only."""
    path = split_file_path(dataset)
    table = read_split_file(dataset)
    lists = table.get("classes", table) if dataset == "fc100" else table
    fine = cifar.official_names("cifar100")
    out: dict[str, list[str]] = {}
    for split, size in SPLIT_SIZES[dataset].items():
        names = lists.get(split)
        if not isinstance(names, list) or len(names) != size:
            count = len(names) if isinstance(names, list) else names
            raise DataError(f"{dataset}: {path}: split {split!r} must list {size} classes, "
                            f"found {count}")
        unknown = sorted(set(names) - set(fine["fine"]))
        if unknown:
            raise DataError(f"{dataset}: {path}: {unknown} are not CIFAR-100 class names")
        out[split] = list(names)
    flat = [n for names in out.values() for n in names]
    if len(set(flat)) != len(flat):
        raise DataError(f"{dataset}: {path} puts a class in two splits")
    if dataset == "fc100":
        _check_superclasses(table, out, fine, str(path))
    return out


def _check_superclasses(table: dict[str, Any], classes: dict[str, list[str]],
                        fine: dict[str, Any], path: str) -> None:
    """FC100's classes are exactly the fine classes of its superclasses."""
    supers = table.get("superclasses", {})
    for split, count in FC100_SUPERCLASSES.items():
        names = supers.get(split)
        if not isinstance(names, list) or len(names) != count:
            raise DataError(f"fc100: {path}: superclasses[{split!r}] must list {count} superclasses")
        expected = sorted(f for f in fine["fine"] if fine["coarse_of"][f] in names)
        if sorted(classes[split]) != expected:
            raise DataError(f"fc100: {path}: classes[{split!r}] are not the fine classes of "
                            f"superclasses {names}")


def read_all_cifar100(cfg: DataConfig) -> ImageStore:
    """All 60,000 CIFAR-100 images (official train then test), fine labels, ``image_ids``
    0..599 within each class; checks the coarse labels against the official map when the files
    carry them."""
    parts = [cifar.read_cifar(cfg, split, variant="cifar100") for split in ("train", "test")]
    if parts[0].class_names != parts[1].class_names:
        raise DataError(f"{cfg.dataset}: the train and test files of CIFAR-100 name different "
                        f"classes; they do not belong together")
    names = parts[0].class_names
    fine = cifar.official_names("cifar100")
    if names != fine["fine"]:
        raise DataError(f"{cfg.dataset}: the CIFAR-100 files under data.root do not carry the "
                        f"official fine class names (first: {names[:3]}); CIFAR-FS and FC100 "
                        f"select classes by name")
    for part in parts:
        if part.coarse_labels is not None and part.coarse_names is not None:
            # the official pickles' superclass of each image must match the fixed map
            expected = torch.tensor([part.coarse_names.index(fine["coarse_of"][n]) for n in names])
            if not torch.equal(expected[part.labels], part.coarse_labels):
                raise DataError(f"{cfg.dataset}: the files' coarse_labels disagree with the "
                                f"official CIFAR-100 superclasses; the files are not CIFAR-100")
    # train images first: the store's default image ids (rank within the class in store order)
    # are then 0..499 for a class's official training images and 500..599 for its test images
    images = torch.cat([p.images for p in parts])
    labels = torch.cat([p.labels for p in parts])
    return ImageStore(images, labels, names, f"{cfg.dataset}/all")


def _load(cfg: DataConfig, split: str) -> ImageStore:
    check_split(split)
    if cfg.rotations:
        raise DataError(f"data.rotations: {cfg.dataset} has no rotated classes; set "
                        f"data.rotations=false")
    classes = split_classes(cfg.dataset)[split]
    return read_all_cifar100(cfg).subset(classes, f"{cfg.dataset}/{split}")


for _name, _description in (
    ("cifar_fs", ("CIFAR-FS (Bertinetto et al. 2019): CIFAR-100 classes split 64/16/20, 600 "
                  "images each, 32x32; from the CIFAR-100 files")),
    ("fc100", ("FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass, 12/4/4 superclasses "
               "= 60/20/20 classes, 32x32; from the CIFAR-100 files")),
):
    DATASETS.register(_name, _description)(_load)
    DEFAULT_IMAGE_SIZE[_name] = 32  # CIFAR's native size
