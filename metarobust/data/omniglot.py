"""``omniglot``: Omniglot (Lake et al., Science 2015), read from the official zips or their folders.

Files:
    Under the dataset root (``data.root``; see :func:`~metarobust.data.datasets.dataset_root`),
    any of the official files of https://github.com/brendenlake/omniglot (``python/``), either as
    the zip (read in place, no extraction) or as the folder it extracts to:

    - ``images_background.zip`` (30 alphabets, 964 characters) and ``images_evaluation.zip``
      (20 alphabets, 659 characters): the full set, 1623 characters;
    - ``images_background_small1.zip`` (5 alphabets, 136 characters) and
      ``images_background_small2.zip`` (5 alphabets, 156 characters): the "small" background
      sets; Greek and Latin are in both, so their union has 8 alphabets and 242 characters.

    Inside: ``<set>/<Alphabet>/characterNN/<id>_<drawer>.png``, 105x105 binary PNGs, 20 drawers
    per character. Whatever is present is used; a character found in two files is read once.
    A torchvision download (``<root>/omniglot-py/``) is found too. ``data.download=true`` fetches
    the full set's two zips from the official repository (md5-checked, see
    :func:`download_omniglot`) when none is present.

Images:
    uint8 ``[M, 1, S, S]``, S = ``data.image_size`` (28 as in Vinyals et al.), strokes 255 on a 0
    background (the PNGs are black on white), resized with Lanczos. Class names are
    ``"Alphabet/characterNN"``; images within a class are in file-name order (drawer 01..20), and
    ``image_ids`` are those positions. Decoded images are cached in memory per
    ``(root, image_size)``, so the three splits decode the files once per process.

Rotations:
    ``data.rotations=true`` adds each character rotated by 90, 180 and 270 degrees
    (counter-clockwise, as ``torch.rot90``) as three new classes ``"Alphabet/characterNN@rot90"``
    etc. (Santoro et al. 2016; Vinyals et al. 2016), within each split: a test character's
    rotations stay in test. Classes are ordered character by character: ``c, c@rot90, c@rot180,
    c@rot270``.

Splits (by alphabet; ``episodes/omniglot/splits.json``), chosen by which files are present:
    - ``full`` (``images_background`` or ``images_evaluation`` present, with or without the
      small sets): Lake's background/evaluation split. test = the 20 evaluation alphabets (659
      characters); val = the 5 background alphabets with the fewest characters (Blackfoot,
      Ojibwe, Inuktitut, Tagalog, Alphabet of the Magi: 81 characters; the choice of
      Meta-Dataset, Triantafillou et al. 2020); train = the other 25 background alphabets (883
      characters).
    - ``small`` (only the small sets): train = Balinese, Early_Aramaic, Korean,
      Japanese_(katakana), Sanskrit (175 characters); val = Greek (24); test = Latin, Tagalog
      (43).

    A split with no character present (e.g. test when only ``images_background.zip`` is there)
    raises :class:`DataError`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import shutil
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from metarobust.config import DataConfig
from metarobust.data.catalog import (
    DATASETS,
    check_split,
    dataset_root,
    image_size_of,
    read_split_file,
    split_file_path,
)
from metarobust.data.store import ImageStore
from metarobust.errors import ConfigError, DataError

NAME = "omniglot"

OFFICIAL_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
"""The official repository (torchvision downloads from the same place)."""

FULL_SETS: tuple[str, ...] = ("images_background", "images_evaluation")
SMALL_SETS: tuple[str, ...] = ("images_background_small1", "images_background_small2")
ALL_SETS: tuple[str, ...] = FULL_SETS + SMALL_SETS
"""Looked for in this order; the first file holding a character is the one read."""

MD5: dict[str, str] = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
    "images_background_small1": "e704a628b5459e08445c13499850abc4",
    "images_background_small2": "b75a71a51d3b13f821f212756fe481fd",
}
"""md5 of the official zips (the first two as in torchvision; the small ones computed from the
official files, whose SHA-256 are pinned in ``shared/data/SHA256SUMS``)."""

ROTATIONS: tuple[int, ...] = (90, 180, 270)

_SUBDIRS = (".", "omniglot-py")
"""Where under the root the files may be: the root itself, or torchvision's download folder."""


@dataclass(frozen=True)
class Source:
    """One official file found under the root: a zip, or the folder it extracts to."""

    stem: str
    path: Path

    @property
    def is_zip(self) -> bool:
        return self.path.suffix == ".zip"


def find_sources(root: Path) -> list[Source]:
    """The Omniglot zips/folders under ``root``, in :data:`ALL_SETS` order (folder preferred
    over zip when both exist). ``root`` may also be one of the zips itself."""
    if root.is_file():
        stem = root.name.removesuffix(".zip")
        return [Source(stem, root)] if stem in ALL_SETS and root.suffix == ".zip" else []
    found = []
    for stem in ALL_SETS:
        for sub in _SUBDIRS:
            folder, archive = root / sub / stem, root / sub / f"{stem}.zip"
            if folder.is_dir():
                found.append(Source(stem, folder))
                break
            if archive.is_file():
                found.append(Source(stem, archive))
                break
    return found


def _expected_files() -> str:
    return ", ".join(f"{s}.zip" for s in ALL_SETS)


def _entries(source: Source) -> Iterator[tuple[str, str, str]]:
    """``(alphabet, character, member)`` of every PNG of ``source``; ``member`` is the zip entry
    name or the path relative to the folder."""
    if source.is_zip:
        try:
            with zipfile.ZipFile(source.path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise _corrupt(source.path, err) from err
    else:
        names = [p.relative_to(source.path).as_posix() for p in source.path.rglob("*.png")]
    for name in names:
        parts = name.split("/")
        # <set>/<Alphabet>/<character>/<file>.png, or without the <set> level in a folder;
        # skip macOS resource forks and hidden files.
        if len(parts) < 3 or not name.endswith(".png") or "__MACOSX" in parts:
            continue
        if any(p.startswith(".") for p in parts[-3:]):
            continue
        yield parts[-3], parts[-2], name


def _corrupt(path: Path, err: Exception) -> DataError:
    return DataError(
        f"{NAME}: {path} is not a readable zip ({err}); it is corrupt or incomplete. Replace it "
        f"with the official file (delete it and set data.download=true, or fetch it from "
        f"{OFFICIAL_URL})"
    )


def _decode(data: bytes, image_size: int, where: str) -> np.ndarray:
    """One PNG as uint8 ``[S, S]``, strokes 255 (the files are black strokes on white)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            gray = image.convert("L")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(
            f"{NAME}: cannot decode {where} as a PNG ({err}); the file is corrupt: replace it "
            f"with the official one (or delete it and set data.download=true)"
        ) from err
    gray = ImageOps.invert(gray)
    if gray.size != (image_size, image_size):
        gray = gray.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.asarray(gray, dtype=np.uint8)


@dataclass(frozen=True)
class _Decoded:
    """Every character found under a root: images ``uint8 [M, 1, S, S]`` grouped by class in
    ``class_names`` order, ``labels``/``image_ids`` ``int64 [M]``."""

    class_names: tuple[str, ...]
    images: torch.Tensor
    labels: torch.Tensor
    image_ids: torch.Tensor


def _signature(sources: Sequence[Source]) -> tuple[tuple[str, int, int], ...]:
    """Identifies the files' contents for the cache (path, size, mtime), so a replaced file is
    decoded again."""
    out = []
    for s in sources:
        st = s.path.stat()
        out.append((str(s.path.resolve()), st.st_size if s.is_zip else 0, st.st_mtime_ns))
    return tuple(out)


def _read(sources: Sequence[Source], image_size: int) -> _Decoded:
    return _read_cached(tuple(sources), image_size, _signature(sources))


@functools.lru_cache(maxsize=8)
def _read_cached(
    sources: tuple[Source, ...], image_size: int, signature: tuple[tuple[str, int, int], ...]
) -> _Decoded:
    del signature  # part of the cache key only
    # class name -> (source, sorted members); the first source holding a class wins, because
    # Greek and Latin are in both small zips, byte-identical.
    classes: dict[str, tuple[Source, list[str]]] = {}
    for source in sources:
        mine: dict[str, list[str]] = {}
        for alphabet, character, member in _entries(source):
            mine.setdefault(f"{alphabet}/{character}", []).append(member)
        for name, members in mine.items():
            classes.setdefault(name, (source, sorted(members, key=lambda m: m.rsplit("/", 1)[-1])))

    names = sorted(classes)
    total = sum(len(classes[n][1]) for n in names)
    images = np.empty((total, 1, image_size, image_size), dtype=np.uint8)
    labels = np.empty(total, dtype=np.int64)
    image_ids = np.empty(total, dtype=np.int64)
    row = 0
    archives: dict[Path, zipfile.ZipFile] = {}
    try:
        for label, name in enumerate(names):
            source, members = classes[name]
            for position, member in enumerate(members):
                if source.is_zip:
                    try:
                        if source.path not in archives:
                            archives[source.path] = zipfile.ZipFile(source.path)
                        data = archives[source.path].read(member)
                    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
                        raise _corrupt(source.path, err) from err
                else:
                    data = (source.path / member).read_bytes()
                images[row, 0] = _decode(data, image_size, f"{source.path}:{member}")
                labels[row], image_ids[row] = label, position
                row += 1
    finally:
        for archive in archives.values():
            archive.close()
    return _Decoded(
        tuple(names),
        torch.from_numpy(images),
        torch.from_numpy(labels),
        torch.from_numpy(image_ids),
    )


def split_tables() -> dict[str, dict[str, list[str]]]:
    """``{"full": {split: alphabets}, "small": {...}}`` from ``episodes/omniglot/splits.json``,
    checked (every split a list of names, no alphabet in two splits)."""
    path = split_file_path(NAME)
    tables = read_split_file(NAME).get("tables")
    if not isinstance(tables, dict) or not {"full", "small"} <= set(tables):
        raise DataError(f"{NAME}: {path} must hold tables 'full' and 'small'")
    out: dict[str, dict[str, list[str]]] = {}
    for key in ("full", "small"):
        table = {s: tables[key].get(s) for s in ("train", "val", "test")}
        if not all(isinstance(v, list) and v for v in table.values()):
            raise DataError(
                f"{NAME}: {path}: table {key!r} must list train, val and test alphabets"
            )
        flat = [a for v in table.values() for a in v]
        if len(set(flat)) != len(flat):
            raise DataError(f"{NAME}: {path}: table {key!r} puts an alphabet in two splits")
        out[key] = table
    return out


def choose_table(stems: set[str], alphabets: set[str]) -> tuple[str, dict[str, list[str]]]:
    """The split table for the files present: ``full`` if ``images_background`` or
    ``images_evaluation`` is among ``stems``, else ``small``; :class:`DataError` if some of
    ``alphabets`` are in none of its splits."""
    tables = split_tables()
    key = "full" if stems & set(FULL_SETS) else "small"
    unknown = alphabets - {a for v in tables[key].values() for a in v}
    if unknown:
        raise DataError(
            f"{NAME}: alphabets {sorted(unknown)} are in no split of the {key!r} table of "
            f"{split_file_path(NAME)}; only the official Omniglot files are supported"
        )
    return key, tables[key]


def _rotate(images: torch.Tensor, labels: torch.Tensor, image_ids: torch.Tensor,
            names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Add every class rotated by 90/180/270 degrees as a new class right after it.

    ``images`` ``[M, 1, S, S]``; returns ``[4M, 1, S, S]`` grouped class by class and the new
    labels, ids and names (class ``i`` becomes classes ``4i .. 4i+3``).
    """
    quarter_turns = range(4)
    images = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in quarter_turns])
    labels = torch.cat([4 * labels + k for k in quarter_turns])
    order = torch.argsort(labels, stable=True)  # stable: a class keeps its image order
    suffixes = [""] + [f"@rot{degrees}" for degrees in ROTATIONS]
    new_names = [name + suffix for name in names for suffix in suffixes]
    return images[order], labels[order], image_ids.repeat(4)[order], new_names


@DATASETS.register(
    NAME,
    "Omniglot (Lake et al.): 1623 handwritten characters, 20 drawers each; "
    "official zips or folders",
)
def load_omniglot(cfg: DataConfig, split: str) -> ImageStore:
    """The ``split`` characters of Omniglot: images uint8 ``[M, 1, S, S]``, S = image_size."""
    check_split(split)
    size = image_size_of(cfg)
    root = dataset_root(cfg)
    where = "data.root" if cfg.root else "the dataset folder (data.root unset)"
    sources = find_sources(root)
    if not sources and cfg.download:
        download_omniglot(root)
        sources = find_sources(root)
    if not sources:
        fetch = (
            f"official: {OFFICIAL_URL}), or set data.download=true to fetch "
            f"{FULL_SETS[0]}.zip and {FULL_SETS[1]}.zip into it"
        )
        if not root.exists():
            raise DataError(
                f"{NAME}: {where} {root} does not exist. Point data.root at the folder holding "
                f"the Omniglot files (any of {_expected_files()}; {fetch}"
            )
        raise DataError(
            f"{NAME}: no Omniglot zip or folder found in {where} {root}. Expected any of "
            f"{_expected_files()} or the folders they extract to (put them there, {fetch}"
        )

    decoded = _read(sources, size)
    present = {n.split("/")[0] for n in decoded.class_names}
    table_name, table = choose_table({s.stem for s in sources}, present)
    wanted = set(table[split])
    names = [n for n in decoded.class_names if n.split("/")[0] in wanted]
    if not names:
        found = ", ".join(s.path.name for s in sources)
        raise DataError(
            f"{NAME}: split {split!r} has no characters in {root} (found {found}); with the "
            f"{table_name!r} split table it needs alphabets {sorted(wanted)}. Add the file that "
            f"holds them (the full set needs both {FULL_SETS[0]}.zip and {FULL_SETS[1]}.zip)"
        )

    old = [decoded.class_names.index(n) for n in names]
    remap = torch.full((len(decoded.class_names),), -1, dtype=torch.long)
    remap[old] = torch.arange(len(old))
    labels = remap[decoded.labels]
    keep = labels >= 0
    images = decoded.images[keep]  # boolean indexing copies: the cache stays untouched
    labels, image_ids = labels[keep], decoded.image_ids[keep]
    if cfg.rotations:
        images, labels, image_ids, names = _rotate(images, labels, image_ids, names)
    return ImageStore(images, labels, names, f"{NAME}/{split}", image_ids)


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_omniglot(
    root: str | Path, sets: Sequence[str] = FULL_SETS, base_url: str = OFFICIAL_URL
) -> list[Path]:
    """Fetch official Omniglot zips into ``root`` and check their md5; returns their paths.

    ``<base_url>/<set>.zip`` is fetched with urllib (``https://`` or ``file://``) into
    ``<set>.zip.part`` and renamed to ``<set>.zip`` only once its md5 matches :data:`MD5`, so an
    interrupted or tampered download never looks like a real file. Files already present with
    the right md5 are kept. (torchvision's ``download_url`` is not used: it fails on ``file://``
    URLs and writes the final name before checking the md5.)

    Raises:
        ConfigError: a name in ``sets`` is not one of :data:`ALL_SETS`.
        DataError: the download failed, or the file's md5 is wrong (nothing is kept then).
    """
    root = Path(root).expanduser()
    unknown = [s for s in sets if s not in MD5]
    if unknown:
        raise ConfigError(f"sets: unknown Omniglot files {unknown}; choose from {list(ALL_SETS)}")
    paths = []
    for stem in sets:
        url = f"{base_url.rstrip('/')}/{stem}.zip"
        path = root / f"{stem}.zip"
        paths.append(path)
        if path.is_file() and file_md5(path) == MD5[stem]:
            continue
        part = path.with_name(path.name + ".part")
        try:
            root.mkdir(parents=True, exist_ok=True)
            request = urllib.request.Request(url, headers={"User-Agent": "metarobust"})
            with urllib.request.urlopen(request, timeout=60) as response, open(part, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
        except (urllib.error.URLError, OSError, ValueError) as err:
            part.unlink(missing_ok=True)
            raise DataError(
                f"{NAME}: cannot download {url} into {root} ({err}); check the internet "
                f"connection and that {root} is writable, or put {path.name} there by hand"
            ) from err
        digest = file_md5(part)
        if digest != MD5[stem]:
            part.unlink()
            raise DataError(
                f"{NAME}: {url} has md5 {digest}, not the official {MD5[stem]}; nothing was "
                f"kept in {root}. Retry, or fetch {path.name} by hand from {OFFICIAL_URL}"
            )
        part.replace(path)
    return paths
