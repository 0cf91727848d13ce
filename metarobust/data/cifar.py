"""``cifar10`` / ``cifar100``: CIFAR-10 and CIFAR-100 (Krizhevsky, 2009), train and test splits.

Formats, detected from what is under the dataset root (``data.root``; see
:func:`~metarobust.data.datasets.dataset_root`), in this order:

1. the official python batches, extracted: ``<root>/cifar-10-batches-py/`` (``data_batch_1..5``,
   ``test_batch``, ``batches.meta``) or ``<root>/cifar-100-python/`` (``train``, ``test``,
   ``meta``), which is also where torchvision's ``CIFAR10(root, download=True)`` puts them;
   ``data.root`` may also be that folder itself;
2. the official archive, read in place: ``<root>/cifar-10-python.tar.gz`` /
   ``cifar-100-python.tar.gz`` (or ``data.root`` pointing at it);
3. an ImageFolder tree: ``<root>/train/<class>/*.jpg|png`` and ``<root>/test/<class>/...``;
4. the same tree inside a tarball (``.tar``, ``.tar.gz``, ``.tgz``), e.g. the staged
   ``cifar10-jpg/cifar10_jpg.tar.gz``, read in place (never extracted; the root may be
   read-only). ``data.root`` may be the tarball, or a folder holding exactly one.

With none of these and ``data.download=true``, torchvision's download of the official archive
(URL and md5 from ``torchvision.datasets.CIFAR10``/``CIFAR100``) runs into the root, and format 1
is read; files already present are never downloaded again.

Reading:
    The pickles are read with the same layout torchvision uses (``data`` rows of 3072 bytes,
    R then G then B planes of 32x32; ``labels`` / ``fine_labels``; the meta file's names) but
    through :func:`~metarobust.data.safe_pickle.load_pickle`, which refuses code in a pickle,
    and without torchvision's md5 gate, so that re-packed copies and the tests' small files in
    the official format read too. Image trees are decoded with ``torchvision.io`` (batched
    JPEG decoding), and the decoded uint8 tensor of each (source, split, size) is cached as a
    ``.pt`` file under :func:`~metarobust.data.image_files.cache_dir` (``$METAROBUST_CACHE``
    or ``~/.cache/metarobust/decoded``): the 60,000 JPEGs of the staged CIFAR-10 copy took
    5.8 s of CPU to read once (both splits in one pass), the cache 0.03 s.

Images:
    uint8 ``[M, 3, S, S]``, S = ``data.image_size`` (default 32, the native size; another size
    resizes with antialiased bilinear interpolation). Labels follow the official label order:
    ``episodes/cifar10/classes.json`` / ``episodes/cifar100/classes.json`` (the meta files'
    names). A tree's class folders are labelled in that order when they carry the official
    names, numerically when all are integers, else alphabetically (ImageFolder's rule).
    ``image_ids`` are positions within the class in the official file order (tree: file names
    sorted). CIFAR-100 gives the fine labels; :func:`read_cifar` also returns the coarse
    (superclass) labels, which FC100 uses.

Splits:
    ``train`` (50,000) and ``test`` (10,000), the official ones. CIFAR has no validation split,
    and carving one out of ``train`` would change the papers' protocol, so ``val`` raises
    :class:`DataError`: standard training holds out ``at.holdout`` training images instead,
    and few-shot work on CIFAR-100 classes uses ``cifar_fs`` / ``fc100``.

Example:
    >>> store = load_split(DataConfig(dataset="cifar10", root="data/cifar10"), "test")
    >>> store.images.shape  # torch.Size([10000, 3, 32, 32]), uint8
"""

from __future__ import annotations

import json
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.datasets as tvd
from torchvision.datasets.utils import download_and_extract_archive

from metarobust.config import DataConfig
from metarobust.data.catalog import (
    DATASETS,
    DEFAULT_IMAGE_SIZE,
    SPLITS_DIR,
    NoSuchSplitError,
    check_split,
    dataset_root,
    image_size_of,
)
from metarobust.data.image_files import cached_tensors, decode_images, resize, source_key
from metarobust.data.safe_pickle import load_pickle
from metarobust.data.store import ImageStore
from metarobust.errors import DataError

NATIVE_SIZE = 32
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class Variant:
    """CIFAR-10 or CIFAR-100: the official file names come from torchvision's class."""

    name: str
    tv: type
    num_classes: int
    label_key: str
    names_key: str

    @property
    def folder(self) -> str:
        return self.tv.base_folder

    @property
    def archive(self) -> str:
        return self.tv.filename

    def files(self, split: str) -> list[str]:
        return [f for f, _ in (self.tv.train_list if split == "train" else self.tv.test_list)]

    @property
    def meta_file(self) -> str:
        return self.tv.meta["filename"]


VARIANTS: dict[str, Variant] = {
    "cifar10": Variant("cifar10", tvd.CIFAR10, 10, "labels", "label_names"),
    "cifar100": Variant("cifar100", tvd.CIFAR100, 100, "fine_labels", "fine_label_names"),
}


@dataclass(frozen=True)
class CifarArrays:
    """One split as read: ``images`` uint8 ``[M, 3, 32, 32]`` (or resized), ``labels`` int64
    ``[M]`` in the official order of ``class_names``; for CIFAR-100 also ``coarse_labels`` and
    ``coarse_names`` (``None`` when the source does not tell them)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    coarse_labels: torch.Tensor | None = None
    coarse_names: list[str] | None = None


@dataclass(frozen=True)
class Source:
    """Where the files are: ``kind`` is ``pickles`` (folder), ``archive`` (official tar.gz),
    ``tree`` (ImageFolder folder) or ``tree_tar`` (ImageFolder tree in a tarball)."""

    kind: str
    path: Path


def official_names(variant: str) -> dict[str, Any]:
    """``metarobust/episodes/<variant>/classes.json``: the official class names in label order."""
    path = SPLITS_DIR / variant / "classes.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{variant}: class list {path} cannot be read ({err}); it ships inside the "
                        f"package (metarobust/episodes/{variant}/), so reinstall metarobust") from err


def _is_tar(path: Path) -> bool:
    return path.is_file() and path.name.endswith(TAR_SUFFIXES)


def find_source(root: Path, v: Variant) -> Source | None:
    """The first format present under ``root`` (see the module docstring), else ``None``."""
    # the other CIFAR's official archive is never taken for an image tarball
    archives = {o.archive for o in VARIANTS.values()}
    if root.is_file():
        if root.name in archives:
            return Source("archive", root) if root.name == v.archive else None
        return Source("tree_tar", root) if _is_tar(root) else None
    if not root.is_dir():
        return None
    for folder in (root / v.folder, root):
        official_files = v.files("train") + v.files("test") + [v.meta_file]
        if any((folder / f).is_file() for f in official_files):
            return Source("pickles", folder)
    if (root / v.archive).is_file():
        return Source("archive", root / v.archive)
    if (root / "train").is_dir() or (root / "test").is_dir():
        return Source("tree", root)
    tars = sorted(p for p in root.iterdir() if _is_tar(p) and p.name not in archives)
    if len(tars) > 1:
        raise DataError(
            f"{v.name}: several tarballs in {root} ({', '.join(p.name for p in tars)}); point "
            f"data.root at the one holding the train/<class>/ and test/<class>/ images"
        )
    return Source("tree_tar", tars[0]) if tars else None


def _expected(v: Variant) -> str:
    return (f"{v.folder}/ (the official python batches), {v.archive}, or an image tree "
            f"train/<class>/*.jpg + test/<class>/*.jpg (a folder or a .tar/.tar.gz of one)")


def locate(cfg: DataConfig, v: Variant) -> Source:
    """The source under ``cfg``'s root; downloads first when none is there and
    ``cfg.download``; :class:`DataError` naming the root and the expected files otherwise."""
    root = dataset_root(cfg)
    where = "data.root" if cfg.root else "the dataset folder (data.root unset)"
    source = find_source(root, v)
    if source is None and cfg.download:
        download(root, v)
        source = find_source(root, v)
    if source is not None:
        return source
    fetch = f"or set data.download=true to fetch {v.archive} from {v.tv.url}"
    if not root.exists():
        raise DataError(f"{v.name}: {where} {root} does not exist. Point data.root at a folder "
                        f"holding {_expected(v)}, {fetch}")
    raise DataError(f"{v.name}: no CIFAR files found in {where} {root}. Expected "
                    f"{_expected(v)}; put them there, {fetch}")


def download(root: Path, v: Variant) -> None:
    """torchvision's download of the official archive into ``root`` (md5-checked, extracted
    to ``<root>/<v.folder>/``)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(v.tv.url, str(root), filename=v.archive, md5=v.tv.tgz_md5)
    except (OSError, RuntimeError, ValueError, tarfile.TarError) as err:
        raise DataError(f"{v.name}: downloading {v.tv.url} into {root} failed ({err}); check the "
                        f"internet connection and that {root} is writable, or put {v.archive} "
                        f"there by hand") from err


# ---------------------------------------------------------------------------------------------
# The official python batches


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, (bytes, bytearray)) else str(value)


def _entry(obj: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A batch dict with ``str`` keys (official Python 2 files unpickle with str keys, files
    written by Python 3 with bytes keys), checked to hold ``keys``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a dict, got {type(obj).__name__}; not a CIFAR file")
    out = {_text(k): val for k, val in obj.items()}
    missing = [k for k in keys if k not in out]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing} (has {sorted(out)}); not an official "
                        f"CIFAR python file")
    return out


def _batch(obj: Any, where: str, v: Variant) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    keys = ("data", v.label_key) + (("coarse_labels",) if v.name == "cifar100" else ())
    entry = _entry(obj, where, keys)
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{where}: 'data' must be a uint8 array [N, 3072] (32x32 RGB planes), got "
                        f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}")
    labels = np.asarray(entry[v.label_key], dtype=np.int64)
    coarse = np.asarray(entry["coarse_labels"], dtype=np.int64) if v.name == "cifar100" else None
    for name, lab in ((v.label_key, labels), ("coarse_labels", coarse)):
        if lab is not None and lab.shape != (data.shape[0],):
            raise DataError(f"{where}: {data.shape[0]} images but {lab.size} {name}; the file is "
                            f"corrupt")
    return data, labels, coarse


def _member_reader(source: Source, v: Variant, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
    """``(file name, bytes)`` of the ``wanted`` official files in ``source`` (folder or archive)."""
    if source.kind == "pickles":
        for name in sorted(wanted):
            path = source.path / name
            if path.is_file():
                yield name, path.read_bytes()
        return
    try:
        with tarfile.open(source.path, "r:*") as archive:
            for member in archive:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and member.name == f"{v.folder}/{name}" and name in wanted:
                    handle = archive.extractfile(member)
                    assert handle is not None
                    yield name, handle.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise DataError(f"{v.name}: {source.path} is not a readable tar.gz ({err}); it is corrupt "
                        f"or incomplete: replace it with the official {v.archive} (or delete it and "
                        f"set data.download=true)") from err


def read_pickles(source: Source, v: Variant, split: str) -> CifarArrays:
    """One split from the official python batches (folder or archive)."""
    names = v.files(split)
    wanted = set(names) | {v.meta_file}
    blobs = dict(_member_reader(source, v, wanted))
    missing = [n for n in names + [v.meta_file] if n not in blobs]
    if missing:
        raise DataError(f"{v.name}: {source.path} lacks {missing}; the official {v.folder} holds "
                        f"{v.files('train') + v.files('test') + [v.meta_file]}")
    meta_keys = (v.names_key,) + (("coarse_label_names",) if v.name == "cifar100" else ())
    meta_where = f"{source.path}:{v.meta_file}"
    meta = _entry(load_pickle(blobs[v.meta_file], meta_where), meta_where, meta_keys)
    class_names = [_text(n) for n in meta[v.names_key]]
    if len(class_names) != v.num_classes:
        raise DataError(f"{meta_where}: {len(class_names)} class names, but {v.name} has "
                        f"{v.num_classes}; is this the other CIFAR? (use data.dataset="
                        f"{'cifar100' if v.num_classes == 10 else 'cifar10'} for it)")
    coarse_names = [_text(n) for n in meta["coarse_label_names"]] if v.name == "cifar100" else None
    parts = [_batch(load_pickle(blobs[n], f"{source.path}:{n}"), f"{source.path}:{n}", v) for n in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    _check_labels(labels, v.num_classes, f"{source.path} ({split}) {v.label_key}")
    coarse = None
    if coarse_names is not None:
        coarse = np.concatenate([p[2] for p in parts])  # type: ignore[misc]
        _check_labels(coarse, len(coarse_names), f"{source.path} ({split}) coarse_labels")
    images = torch.from_numpy(data).view(-1, 3, NATIVE_SIZE, NATIVE_SIZE)
    return CifarArrays(images, torch.from_numpy(labels), class_names,
                       None if coarse is None else torch.from_numpy(coarse), coarse_names)


def _check_labels(labels: np.ndarray, n: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= n):
        raise DataError(f"{where}: labels must lie in 0..{n - 1}, found {labels.min()}..{labels.max()}; "
                        f"the file is corrupt or belongs to another dataset")


# ---------------------------------------------------------------------------------------------
# ImageFolder trees (folders or tarballs)


def _tree_files(source: Source, v: Variant,
                splits: tuple[str, ...]) -> Iterator[tuple[str, str, str, bytes | Path]]:
    """``(split, class, file name, bytes or path)`` of the images of ``splits`` in the tree."""
    if source.kind == "tree":
        for split in splits:
            top = source.path / split
            if not top.is_dir():
                continue
            for folder in sorted(p for p in top.iterdir() if p.is_dir() and not p.name.startswith(".")):
                for f in sorted(folder.iterdir()):
                    if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                        yield split, folder.name, f.name, f
        return
    try:
        with tarfile.open(source.path, "r:*") as archive:
            for member in archive:
                parts = member.name.split("/")
                # [<top>/]<split>/<class>/<file>; skip macOS resource forks and hidden files
                if (not member.isfile() or len(parts) < 3 or parts[-3] not in splits
                        or any(p.startswith(".") or p == "__MACOSX" for p in parts)
                        or not parts[-1].lower().endswith(IMAGE_SUFFIXES)):
                    continue
                handle = archive.extractfile(member)
                assert handle is not None
                yield parts[-3], parts[-2], parts[-1], handle.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise DataError(f"{v.name}: {source.path} is not a readable tarball ({err}); it is "
                        f"corrupt or incomplete: replace it") from err


def class_order(found: list[str], official: list[str]) -> list[str]:
    """The label order of a tree's class folders: official if they are the official names,
    numeric if all are integers, else alphabetical (as torchvision's ImageFolder)."""
    if set(found) == set(official):
        return list(official)
    if all(c.isdigit() for c in found):
        return sorted(found, key=int)
    return sorted(found)


def read_tree(source: Source, v: Variant, split: str, size: int) -> CifarArrays:
    """One split of an ImageFolder tree (folder or tarball), decoded (cached).

    A gzipped tarball can only be read front to back, and reading ``train`` passes over the
    whole file anyway, so that pass also decodes and caches ``test`` (a fifth of the work):
    loading ``test`` after ``train`` then costs a cache read, not a second pass.
    """
    splits = ("train", "test") if source.kind == "tree_tar" and split == "train" else (split,)
    wheres = {s: f"{source.path}:{s}" if source.kind == "tree_tar" else str(source.path / s)
              for s in splits}
    keys = {s: source_key(v.name, source.kind, s, size, files=[source.path] if source.kind == "tree_tar"
                          else _tree_stamp(source.path / s)) for s in splits}
    collected: dict[str, dict[str, list[tuple[str, bytes | Path]]]] = {}

    def build(s: str) -> dict[str, torch.Tensor]:
        if not collected:
            collected.update({name: {} for name in splits})
            for part, cls, name, blob in _tree_files(source, v, splits):
                collected[part].setdefault(cls, []).append((name, blob))
        if not collected[s]:
            raise DataError(f"{v.name}: no images of split {s!r} in {wheres[s]}; expected "
                            f"{s}/<class>/*.jpg (or .png) there")
        return _decode_tree(collected[s], v, wheres[s], size)

    tensors = cached_tensors(f"{v.name}-{split}", keys[split], lambda: build(split))
    for other in splits:
        if other != split and collected.get(other):  # the tarball was just read: keep the rest
            try:
                cached_tensors(f"{v.name}-{other}", keys[other], lambda o=other: build(o))
            except DataError:
                pass  # reported when that split itself is loaded
    names = official_names(v.name)
    found = [str(n) for n in _names_from_tensor(tensors["names"])]
    official = names["classes"] if v.name == "cifar10" else names["fine"]
    coarse_labels = coarse_names = None
    if v.name == "cifar100" and found == official:
        coarse_names = names["coarse"]
        fine_to_coarse = torch.tensor([coarse_names.index(names["coarse_of"][f]) for f in found])
        coarse_labels = fine_to_coarse[tensors["labels"]]
    return CifarArrays(tensors["images"], tensors["labels"], found, coarse_labels, coarse_names)


def _tree_stamp(top: Path) -> list[Path]:
    """The split folder and its class folders: their mtimes change when files come or go."""
    return [top] + sorted(p for p in top.iterdir() if p.is_dir()) if top.is_dir() else []


def _decode_tree(by_class: dict[str, list[tuple[str, bytes | Path]]], v: Variant, where: str,
                 size: int) -> dict[str, torch.Tensor]:
    official = official_names(v.name)
    order = class_order(sorted(by_class), official["classes" if v.name == "cifar10" else "fine"])
    if len(order) != v.num_classes:
        raise DataError(f"{v.name}: {where} has {len(order)} class folders ({order[:5]}...), but "
                        f"{v.name} has {v.num_classes}; point data.root at a {v.name} tree (or set "
                        f"data.dataset to the dataset it holds)")
    blobs, names, labels = [], [], []
    for label, cls in enumerate(order):
        for name, blob in sorted(by_class[cls], key=lambda item: item[0]):
            blobs.append(blob.read_bytes() if isinstance(blob, Path) else blob)
            names.append(f"{where}/{cls}/{name}")
            labels.append(label)
    images = decode_images(blobs, names, size)
    return {"images": images, "labels": torch.tensor(labels, dtype=torch.long),
            "names": _names_to_tensor(order)}


def _names_to_tensor(names: list[str]) -> torch.Tensor:
    """Class names as a uint8 tensor (the cache holds tensors only: ``weights_only`` loading)."""
    return torch.frombuffer(bytearray("\n".join(names).encode()), dtype=torch.uint8)


def _names_from_tensor(t: torch.Tensor) -> list[str]:
    return bytes(t.tolist()).decode().split("\n")


# ---------------------------------------------------------------------------------------------
# The registered loaders


def read_cifar(cfg: DataConfig, split: str, variant: str | None = None) -> CifarArrays:
    """The ``train`` or ``test`` split of CIFAR-10/100 (``variant``, default ``cfg.dataset``)
    from any supported format under ``cfg``'s root, images at ``image_size_of(cfg)``."""
    v = VARIANTS[variant or cfg.dataset]
    if split not in ("train", "test"):
        raise NoSuchSplitError(
            f"{v.name}: split {split!r} does not exist: CIFAR has only the official train and test "
            f"splits. For a validation set, standard training holds out training images "
            f"(at.holdout=N); few-shot learning on CIFAR-100 classes uses cifar_fs or fc100"
        )
    size = image_size_of(cfg)
    source = locate(cfg, v)
    if source.kind in ("pickles", "archive"):
        arrays = read_pickles(source, v, split)
        if size != NATIVE_SIZE:
            arrays = CifarArrays(resize(arrays.images, size), arrays.labels, arrays.class_names,
                                 arrays.coarse_labels, arrays.coarse_names)
        return arrays
    return read_tree(source, v, split, size)


def _load(cfg: DataConfig, split: str) -> ImageStore:
    check_split(split)
    if cfg.rotations:
        raise DataError(f"data.rotations: {cfg.dataset} has no rotated classes; set data.rotations=false")
    arrays = read_cifar(cfg, split)
    return ImageStore(arrays.images, arrays.labels, arrays.class_names, f"{cfg.dataset}/{split}")


for _name, _description in (
    ("cifar10", ("CIFAR-10 (Krizhevsky 2009): 10 classes, 50k train + 10k test, 32x32 RGB; "
                 "official python batches, their tar.gz, or image trees")),
    ("cifar100", ("CIFAR-100 (Krizhevsky 2009): 100 fine classes (20 superclasses), 50k + 10k, "
                  "32x32 RGB; official python batches, their tar.gz, or image trees")),
):
    DATASETS.register(_name, _description)(_load)
    DEFAULT_IMAGE_SIZE[_name] = NATIVE_SIZE
