"""``mini_imagenet``: miniImageNet (Vinyals et al., NeurIPS 2016) with Ravi & Larochelle's split.

100 ImageNet classes, 600 images each, split 64 / 16 / 20 by Ravi & Larochelle (ICLR 2017);
the split used by MAML, AQ, R-MAML, RFS and nearly every few-shot paper since.

Files, under the dataset root (``data.root``; see
:func:`~metarobust.data.datasets.dataset_root`), per split, in this order:

1. the common pickle caches ``mini-imagenet-cache-{train,val,test}.pkl`` (as learn2learn and
   several repositories distribute them): a dict with ``image_data``, uint8 ``[N, 84, 84, 3]``,
   and ``class_dict``, ``{wnid: [row indices]}``;
2. Ravi & Larochelle's CSVs ``train.csv`` / ``val.csv`` / ``test.csv`` (header
   ``filename,label``; rows such as ``n0153282900000005.jpg,n01532829``; in the root or in
   ``<root>/split/``) with the images in ``<root>/images/<filename>`` or
   ``<root>/images/<wnid>/<filename>``. The images may be the usual 84x84 copies or the
   ImageNet originals (resized on reading).

miniImageNet cannot be downloaded automatically (ImageNet's terms): ``data.download=true``
raises :class:`DataError` with where to get it. The dataset is not on the development machine:
the tests write small files in both formats.

Reading:
    Pickles are read with :func:`~metarobust.data.safe_pickle.load_pickle` (no code from the
    file runs). JPEGs are decoded with ``torchvision.io`` (batched) and the decoded uint8 tensor
    of each (split, size) is cached as a ``.pt`` under
    :func:`~metarobust.data.image_files.cache_dir`, since decoding 38,400 training images takes
    minutes on a CPU.

Images:
    uint8 ``[M, 3, S, S]``, S = ``data.image_size`` (default 84, the standard size; other
    sizes and non-84 files resize with antialiased bilinear interpolation). Class names are the
    WordNet ids, in the order of ``episodes/mini_imagenet/splits.json`` (sorted); images within
    a class keep the file's order (CSV rows, ``class_dict`` lists) and ``image_ids`` are those
    positions. The classes of each file must be exactly the split's classes of the split file,
    so a file of another split (e.g. Vinyals' original one) is refused, not silently mixed.

Example:
    >>> store = load_split(DataConfig(dataset="mini_imagenet", root="data/miniImageNet"), "test")
    >>> store.num_classes, store.image_shape  # (20, (3, 84, 84))
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from metarobust.config import DataConfig
from metarobust.data.catalog import (
    DATASETS,
    DEFAULT_IMAGE_SIZE,
    check_split,
    dataset_root,
    image_size_of,
    read_split_file,
    split_file_path,
)
from metarobust.data.image_files import cached_tensors, decode_images, resize, source_key
from metarobust.data.safe_pickle import load_pickle
from metarobust.data.store import ImageStore
from metarobust.errors import DataError

NAME = "mini_imagenet"
STANDARD_SIZE = 84
SPLIT_SIZES: dict[str, int] = {"train": 64, "val": 16, "test": 20}
CSV_HEADER = ["filename", "label"]


def split_classes(split: str) -> list[str]:
    """The WordNet ids of ``split`` from ``episodes/mini_imagenet/splits.json`` (checked)."""
    table = read_split_file(NAME)
    path = split_file_path(NAME)
    names = table.get(split)
    if not isinstance(names, list) or len(names) != SPLIT_SIZES[split]:
        raise DataError(f"{NAME}: {path}: split {split!r} must list {SPLIT_SIZES[split]} classes")
    flat = [n for s in SPLIT_SIZES for n in table.get(s, [])]
    if len(set(flat)) != len(flat):
        raise DataError(f"{NAME}: {path} puts a class in two splits")
    return list(names)


def pickle_path(root: Path, split: str) -> Path:
    return root / f"mini-imagenet-cache-{split}.pkl"


def csv_path(root: Path, split: str) -> Path | None:
    return next((p for p in (root / f"{split}.csv", root / "split" / f"{split}.csv") if p.is_file()), None)


def _check_classes(found: list[str], split: str, where: Path) -> None:
    """The file's classes must be the split's classes (the Ravi-Larochelle split)."""
    expected = split_classes(split)
    if set(found) != set(expected):
        extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
        raise DataError(
            f"{NAME}: {where} holds {len(found)} classes, not the {len(expected)} {split} classes "
            f"of Ravi & Larochelle's split ({split_file_path(NAME)}): unexpected {extra[:4]}, "
            f"missing {missing[:4]}; use the standard {split} file"
        )


def read_pickle_cache(path: Path, split: str, size: int) -> ImageStore:
    """One split from ``mini-imagenet-cache-<split>.pkl``."""
    with open(path, "rb") as f:
        obj = load_pickle(f, str(path))
    if not isinstance(obj, dict) or not {"image_data", "class_dict"} <= set(obj):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{NAME}: {path} must be a dict with 'image_data' and 'class_dict' (the "
                        f"miniImageNet pickle cache), found {keys}")
    data, class_dict = obj["image_data"], obj["class_dict"]
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 4
            or data.shape[-1] != 3):
        raise DataError(f"{NAME}: {path}: 'image_data' must be uint8 [N, H, W, 3], got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if not isinstance(class_dict, dict):
        raise DataError(f"{NAME}: {path}: 'class_dict' must map class ids to image indices")
    _check_classes(list(class_dict), split, path)
    order = split_classes(split)
    rows, labels, ids = [], [], []
    for label, wnid in enumerate(order):
        index = [int(i) for i in class_dict[wnid]]
        if index and (min(index) < 0 or max(index) >= data.shape[0]):
            raise DataError(f"{NAME}: {path}: class {wnid} indexes images outside 0..{data.shape[0] - 1}; "
                            f"the file is corrupt")
        rows += index
        labels += [label] * len(index)
        ids += range(len(index))
    images = torch.from_numpy(np.ascontiguousarray(data[rows].transpose(0, 3, 1, 2)))
    return ImageStore(resize(images, size), torch.tensor(labels, dtype=torch.long), order,
                      f"{NAME}/{split}", torch.tensor(ids, dtype=torch.long))


def read_csv_split(root: Path, table: Path, split: str, size: int) -> ImageStore:
    """One split from Ravi & Larochelle's CSV and the ``images/`` folder (decoded, cached)."""
    try:
        rows = list(csv.reader(io.StringIO(table.read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{NAME}: {table} cannot be read as a CSV ({err})") from err
    if not rows or [c.strip() for c in rows[0]] != CSV_HEADER:
        raise DataError(f"{NAME}: {table} must start with the header 'filename,label' "
                        f"(Ravi & Larochelle's CSV), found {rows[0] if rows else 'an empty file'}")
    bad = [i + 2 for i, r in enumerate(rows[1:]) if len(r) != 2]
    if bad:
        raise DataError(f"{NAME}: {table}: line {bad[0]} does not have 2 columns (filename,label)")
    entries = [(f.strip(), c.strip()) for f, c in rows[1:]]
    _check_classes(sorted({c for _, c in entries}), split, table)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DataError(f"{NAME}: {images_dir} not found; put the miniImageNet images there "
                        f"(images/<filename> or images/<wnid>/<filename>, as named in {table.name})")
    key = source_key(NAME, split, size, files=[table, images_dir])
    order = split_classes(split)

    def build() -> dict[str, torch.Tensor]:
        by_class: dict[str, list[str]] = {c: [] for c in order}
        for filename, wnid in entries:
            by_class[wnid].append(filename)
        blobs, names, labels, ids = [], [], [], []
        for label, wnid in enumerate(order):
            for position, filename in enumerate(by_class[wnid]):
                path = images_dir / filename
                if not path.is_file():
                    path = images_dir / wnid / filename
                if not path.is_file():
                    raise DataError(f"{NAME}: image {filename} of {table.name} not found in "
                                    f"{images_dir} (nor in {images_dir / wnid}); the images folder "
                                    f"is incomplete")
                blobs.append(path.read_bytes())
                names.append(str(path))
                labels.append(label)
                ids.append(position)
        return {"images": decode_images(blobs, names, size),
                "labels": torch.tensor(labels, dtype=torch.long),
                "ids": torch.tensor(ids, dtype=torch.long)}

    t = cached_tensors(f"{NAME}-{split}", key, build)
    return ImageStore(t["images"], t["labels"], order, f"{NAME}/{split}", t["ids"])


@DATASETS.register(
    NAME,
    "miniImageNet (Vinyals et al. 2016), Ravi-Larochelle split 64/16/20 classes x 600 images, "
    "84x84 RGB; pickle caches or images + CSVs",
)
def load_mini_imagenet(cfg: DataConfig, split: str) -> ImageStore:
    """The ``split`` classes of miniImageNet: images uint8 ``[M, 3, S, S]``, S = image_size."""
    check_split(split)
    if cfg.rotations:
        raise DataError(f"data.rotations: {NAME} has no rotated classes; set data.rotations=false")
    size = image_size_of(cfg)
    root = dataset_root(cfg)
    where = "data.root" if cfg.root else "the dataset folder (data.root unset)"
    pickled, table = pickle_path(root, split), csv_path(root, split)
    if pickled.is_file():
        return read_pickle_cache(pickled, split, size)
    if table is not None:
        return read_csv_split(root, table, split, size)
    expected = (f"{pickled.name}, or {split}.csv (Ravi & Larochelle) with the images in "
                f"images/")
    fix = ("miniImageNet cannot be downloaded automatically (ImageNet's terms of access): "
           "build it from ImageNet with the Ravi-Larochelle CSVs "
           "(github.com/twitter/meta-learning-lstm, data/miniImagenet/) or use a pickle cache")
    if cfg.download:
        raise DataError(f"{NAME}: data.download=true, but {fix}; then point data.root at it")
    if not root.exists():
        raise DataError(f"{NAME}: {where} {root} does not exist. Point data.root at the folder "
                        f"holding {expected}. {fix}")
    raise DataError(f"{NAME}: no {split} files in {where} {root}: expected {expected}. {fix}")


DEFAULT_IMAGE_SIZE[NAME] = STANDARD_SIZE
