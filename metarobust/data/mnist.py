"""``mnist`` / ``fashion_mnist``: MNIST (LeCun et al. 1998) and Fashion-MNIST (Xiao et al. 2017).

Files:
    The four official idx files, gzipped or not, under the dataset root (``data.root``; see
    :func:`~metarobust.data.datasets.dataset_root`) or in torchvision's download folder
    ``<root>/MNIST/raw/`` / ``<root>/FashionMNIST/raw/``::

        train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
        t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

    (``train-images.idx3-ubyte`` with a dot, as some mirrors name them, is found too.) This is
    the layout of the official downloads and of ``../shared/data/mnist`` and
    ``../shared/data/fashion-mnist``. With no files and ``data.download=true``, torchvision's
    ``MNIST``/``FashionMNIST(root, download=True)`` fetches them (its mirrors and md5s).

Reading:
    The idx format (a big-endian magic ``0x0000 08 <dims>``, the dimensions, then the bytes) is
    parsed here rather than with ``torchvision.datasets.mnist.read_image_file``, which needs an
    uncompressed file and reports a bad file with a bare ``assert``; the test suite checks that
    both give identical tensors. Every file problem (corrupt gzip, wrong magic, truncated data,
    label and image counts that differ, a label outside 0..9) is a :class:`DataError` naming the
    file.

Images:
    uint8 ``[M, 1, S, S]``, white digits/garments on black as in the files, S =
    ``data.image_size`` (default 28, the native size; another size resizes with antialiased
    bilinear interpolation). Class names are torchvision's (``"0 - zero"`` ..., ``"T-shirt/top"``
    ...). ``image_ids`` are positions within the class in file order.

Splits:
    ``train`` (60,000) and ``test`` (10,000). There is no official validation split: ``val``
    raises :class:`DataError` (standard training holds out ``at.holdout`` training images).

Example:
    >>> store = load_split(DataConfig(dataset="mnist", root="../shared/data/mnist"), "test")
    >>> store.images.shape  # torch.Size([10000, 1, 28, 28]), uint8
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
import torchvision.datasets as tvd

from metarobust.config import DataConfig
from metarobust.data.catalog import (
    DATASETS,
    DEFAULT_IMAGE_SIZE,
    NoSuchSplitError,
    check_split,
    dataset_root,
    image_size_of,
)
from metarobust.data.image_files import resize
from metarobust.data.store import ImageStore
from metarobust.errors import DataError

NATIVE_SIZE = 28
PREFIX = {"train": "train", "test": "t10k"}
"""File-name prefix of each split."""


@dataclass(frozen=True)
class Variant:
    name: str
    title: str
    tv: type

    @property
    def class_names(self) -> list[str]:
        return list(self.tv.classes)


VARIANTS: dict[str, Variant] = {
    "mnist": Variant("mnist", "MNIST", tvd.MNIST),
    "fashion_mnist": Variant("fashion_mnist", "Fashion-MNIST", tvd.FashionMNIST),
}


def _candidates(root: Path, v: Variant, stem: str) -> list[Path]:
    """Where ``stem`` (e.g. ``train-images-idx3-ubyte``) may be, in order of preference."""
    dotted = stem.replace("-idx", ".idx")  # train-images.idx3-ubyte, as some mirrors name them
    folders = [root, root / v.tv.__name__ / "raw"]
    return [f / (name + gz) for f in folders for name in (stem, dotted) for gz in ("", ".gz")]


def find_file(root: Path, v: Variant, stem: str) -> Path | None:
    return next((p for p in _candidates(root, v, stem) if p.is_file()), None)


def read_idx(path: Path, dims: int) -> np.ndarray:
    """An idx file of unsigned bytes with ``dims`` dimensions (3: images, 1: labels), gzipped or
    not, as a uint8 array of its shape.

    Raises:
        DataError: the file is not gzip/idx, has another type or rank, or is truncated.
    """
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot be decompressed ({err}); the file is corrupt or "
                        f"incomplete: replace it with the official one") from err
    header = 4 + 4 * dims
    if len(raw) < header or raw[0:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] != dims:
        magic = raw[:4].hex() if len(raw) >= 4 else raw.hex()
        raise DataError(f"{path}: not an idx file of unsigned bytes with {dims} dimension(s) "
                        f"(magic 0x{magic}, expected 0x000008{dims:02x}); is it the right file?")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise DataError(f"{path}: the header promises {shape} = {count} bytes of data but the file "
                        f"holds {len(raw) - header}; it is truncated or corrupt: replace it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_mnist(root: Path, v: Variant, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [M, 1, 28, 28], labels int64 [M])`` of one split under ``root``."""
    stems = {kind: f"{PREFIX[split]}-{kind}-idx{d}-ubyte" for kind, d in (("images", 3), ("labels", 1))}
    paths = {kind: find_file(root, v, stem) for kind, stem in stems.items()}
    missing = [stems[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataError(f"{v.name}: {', '.join(m + '[.gz]' for m in missing)} not found in {root} "
                        f"(nor in {root / v.tv.__name__ / 'raw'}); put the official {v.title} idx "
                        f"files there, or set data.download=true")
    images = read_idx(paths["images"], 3)  # type: ignore[arg-type]
    labels = read_idx(paths["labels"], 1)  # type: ignore[arg-type]
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{v.name}: {paths['images']} holds {images.shape[0]} images but "
                        f"{paths['labels']} {labels.shape[0]} labels; the files do not belong "
                        f"together")
    if labels.size and labels.max() >= len(v.class_names):
        raise DataError(f"{paths['labels']}: labels must lie in 0..{len(v.class_names) - 1}, "
                        f"found {int(labels.max())}; the file is corrupt or of another dataset")
    # frombuffer views are read-only: copy once into tensors the store owns
    return (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def _download(root: Path, v: Variant) -> None:
    """torchvision's download (its mirrors, md5-checked) into ``<root>/<Class>/raw/``."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        v.tv(str(root), train=True, download=True)
    except (OSError, RuntimeError, URLError) as err:
        raise DataError(f"{v.name}: downloading {v.title} into {root} failed ({err}); check the "
                        f"internet connection, or put the four idx files there by hand") from err


def _load(cfg: DataConfig, split: str) -> ImageStore:
    check_split(split)
    v = VARIANTS[cfg.dataset]
    if split not in PREFIX:
        raise NoSuchSplitError(
            f"{v.name}: split {split!r} does not exist: {v.title} has only the official train and "
            f"test splits. For a validation set, standard training holds out training images "
            f"(at.holdout=N)"
        )
    if cfg.rotations:
        raise DataError(f"data.rotations: {v.name} has no rotated classes; set data.rotations=false")
    size = image_size_of(cfg)
    root = dataset_root(cfg)
    if not root.exists() and not cfg.download:
        where = "data.root" if cfg.root else "the dataset folder (data.root unset)"
        raise DataError(f"{v.name}: {where} {root} does not exist. Point data.root at the folder "
                        f"holding the four {v.title} idx files, or set data.download=true")
    if cfg.download and find_file(root, v, f"{PREFIX[split]}-images-idx3-ubyte") is None:
        _download(root, v)
    images, labels = read_mnist(root, v, split)
    return ImageStore(resize(images, size), labels, v.class_names, f"{v.name}/{split}")


for _v, _description in (
    (VARIANTS["mnist"], ("MNIST (LeCun et al. 1998): handwritten digits, 60k train + 10k test, "
                         "28x28 grayscale; the official idx files")),
    (VARIANTS["fashion_mnist"], ("Fashion-MNIST (Xiao et al. 2017): 10 garment classes, 60k + 10k, "
                                 "28x28 grayscale; the official idx files")),
):
    DATASETS.register(_v.name, _description)(_load)
    DEFAULT_IMAGE_SIZE[_v.name] = NATIVE_SIZE
