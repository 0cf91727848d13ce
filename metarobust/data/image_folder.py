"""``image_folder``: your own few-shot data, a folder per class and a file naming the splits.

Files, under ``data.root`` (required)::

    root/
      splits.json              {"train": ["dog", "cat", ...], "val": [...], "test": [...]}
      dog/001.png  dog/002.jpg ...
      cat/...
      birds/sparrow/...        a class may be a nested folder: list it as "birds/sparrow"

or, instead of ``splits.json``, ``train.txt`` / ``val.txt`` / ``test.txt`` with one class folder
per line (blank lines and lines starting with ``#`` skipped). Each split lists the folder names
(relative to ``root``, ``/``-separated) of its classes; a class is in at most one split, and a
split you never load may be left out. Images are the files of a class folder with an image
extension (:data:`EXTENSIONS`, any case), in file-name order; sub-folders and other files are
ignored.

Images:
    uint8 ``[M, C, S, S]``: ``C = 1`` when every class's first image is grayscale, else 3 (RGB);
    ``S = data.image_size`` (default 84, the usual few-shot size for natural images; set it to
    your images' side), resized with antialiased bilinear interpolation (non-square images are
    stretched). Labels ``0..N-1`` follow the split file's class order; class names are the
    folder names; ``image_ids`` are positions in the file-name order. The decoded split is
    cached (:func:`~metarobust.data.image_files.cached_tensors`), keyed on every file's size and
    modification time.

Errors (:class:`~metarobust.errors.DataError`, naming the path and the fix): no root, no splits
file, a malformed one, a split it does not list, a class in two splits, a listed class folder
that is absent or holds no image, an image that cannot be decoded.

Example:
    >>> store = load_split(DataConfig(dataset="image_folder", root="~/data/birds", image_size=32), "train")
    $ metarobust train configs/meta/omniglot_rmaml.yaml data.dataset=image_folder data.root=~/data/birds
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from metarobust.config import DataConfig
from metarobust.data.catalog import DATASETS, DEFAULT_IMAGE_SIZE, SPLITS, check_split, image_size_of
from metarobust.data.image_files import cached_tensors, decode_images, source_key
from metarobust.data.store import ImageStore
from metarobust.errors import DataError

NAME = "image_folder"
STANDARD_SIZE = 84
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
FORMAT = ("a folder per class and splits.json ({\"train\": [class folders], \"val\": [...], \"test\": [...]}) "
          "or train.txt/val.txt/test.txt (one class folder per line); see docs/datasets.md")


def folder_root(cfg: DataConfig) -> Path:
    """``data.root``, which must be an existing folder."""
    if not cfg.root:
        raise DataError(f"{NAME}: set data.root=PATH to your dataset folder ({FORMAT})")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"{NAME}: data.root={cfg.root!r} is not a folder; expected {FORMAT}")
    return root


def read_splits(root: Path) -> dict[str, list[str]]:
    """``{split: [class folder, ...]}`` from ``root/splits.json`` or ``root/{split}.txt``
    (only the splits the file(s) list); checked: lists of names, no class in two splits."""
    path = root / "splits.json"
    if path.is_file():
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{NAME}: {path} cannot be read as JSON ({err}); expected {FORMAT}") from err
        unknown = sorted(set(table) - set(SPLITS)) if isinstance(table, dict) else []
        if not isinstance(table, dict) or unknown or not all(
                isinstance(v, list) and all(isinstance(c, str) and c.strip() for c in v) for v in table.values()):
            raise DataError(f"{NAME}: {path} must map splits ({', '.join(SPLITS)}) to lists of class folder "
                            f"names{f'; unknown keys {unknown}' if unknown else ''}")
        splits = {s: [c.strip().strip("/") for c in table[s]] for s in SPLITS if s in table}
    else:
        files = {s: root / f"{s}.txt" for s in SPLITS}
        if not any(f.is_file() for f in files.values()):
            raise DataError(f"{NAME}: no splits file in {root} (neither splits.json nor train.txt/val.txt/"
                            f"test.txt); expected {FORMAT}")
        splits = {}
        for split, f in files.items():
            if f.is_file():
                lines = (line.strip() for line in f.read_text(encoding="utf-8").splitlines())
                splits[split] = [line.strip("/") for line in lines if line and not line.startswith("#")]
    seen: dict[str, str] = {}
    for split, classes in splits.items():
        for c in classes:
            if Path(c).is_absolute() or ".." in Path(c).parts:
                raise DataError(f"{NAME}: class {c!r} in split {split!r}: class folders are named relative to "
                                f"{root}, without '..'")
            if c in seen:
                where = "twice in" if seen[c] == split else f"in both {seen[c]!r} and"
                raise DataError(f"{NAME}: class {c!r} is listed {where} {split!r} of the splits file in {root}; "
                                f"a class belongs to one split")
            seen[c] = split
    return splits


def class_files(root: Path, name: str) -> list[Path]:
    """The image files of class folder ``root/name``, in file-name order (checked: present, non-empty)."""
    folder = root / name
    if not folder.is_dir():
        raise DataError(f"{NAME}: class {name!r} is listed in the splits file but {folder} is not a folder; "
                        f"create it or remove the class from the splits file")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise DataError(f"{NAME}: class folder {folder} holds no image ({', '.join(EXTENSIONS)}); add images or "
                        f"remove the class from the splits file")
    return files


def channels_of(first_images: list[Path]) -> int:
    """1 if every file is grayscale, else 3 (read from the headers only)."""
    for path in first_images:
        try:
            with Image.open(path) as image:
                if image.mode not in GRAY_MODES:
                    return 3
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{NAME}: cannot read {path} as an image ({err}); replace or remove the file") from err
    return 1


@DATASETS.register(NAME, "your own images: data.root with a folder per class and splits.json "
                         "(or train.txt/val.txt/test.txt) naming each split's classes")
def load_image_folder(cfg: DataConfig, split: str) -> ImageStore:
    """The images of ``split`` (see the module docstring for the layout)."""
    check_split(split)
    if cfg.download:
        raise DataError(f"{NAME}: there is nothing to download; set data.download=false and data.root to your folder")
    root = folder_root(cfg)
    splits = read_splits(root)
    if split not in splits:
        raise DataError(f"{NAME}: the splits file in {root} lists no {split!r} split (it has "
                        f"{', '.join(splits) or 'none'}); add one to load it")
    classes = splits[split]
    if not classes:
        raise DataError(f"{NAME}: split {split!r} in the splits file of {root} lists no class")
    files = [class_files(root, c) for c in classes]
    size = image_size_of(cfg)
    channels = channels_of([f[0] for f in files])
    flat = [p for f in files for p in f]

    def build() -> dict[str, torch.Tensor]:
        blobs = []
        for path in flat:
            try:
                blobs.append(path.read_bytes())
            except OSError as err:
                raise DataError(f"{NAME}: cannot read {path} ({err})") from err
        return {"images": decode_images(blobs, [str(p) for p in flat], size, channels)}

    key = source_key(NAME, root.resolve(), split, classes, size, channels, files=flat)
    images = cached_tensors(f"{NAME}-{split}", key, build)["images"]
    labels = torch.cat([torch.full((len(f),), i, dtype=torch.long) for i, f in enumerate(files)])
    return ImageStore(images, labels, list(classes), f"{NAME}/{split}")


DEFAULT_IMAGE_SIZE[NAME] = STANDARD_SIZE

__all__ = ["EXTENSIONS", "load_image_folder", "read_splits"]
