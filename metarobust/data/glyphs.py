"""``glyphs``: the embedded default dataset, printed characters rendered from matplotlib's fonts.

What it is:
    167 classes of printed characters (digits, Latin, Greek and Cyrillic letters, Latin
    extras, mathematical and other symbols), 20 images per class, rendered in-process from the
    TrueType fonts that ship inside matplotlib (``mpl-data/fonts/ttf``). Each font plays the part
    of an Omniglot "drawer": the 14 fonts of :data:`FONT_FILES` (DejaVu Sans, Serif and Sans Mono
    in regular, bold, slanted and bold slanted, plus STIXGeneral regular and bold), cycled to 20
    images per class, each image with its own small seeded distortion (rotation up to 8 degrees,
    scale 0.9-1.1, shear, shift, stroke thickening). Images are uint8 ``[M, 1, S, S]`` with
    strokes 255 on a 0 background, like :mod:`metarobust.data.omniglot`. Rendering the whole set
    takes under two seconds on one core; nothing is downloaded and no file is needed besides
    the split table ``episodes/glyphs/splits.json``. The output is deterministic: the same
    bytes on every run for a given matplotlib (fonts) and Pillow (FreeType) version.

What it is not:
    Handwriting. Printed glyphs vary much less within a class than Omniglot's 20 drawers, so the
    task is easier than Omniglot and accuracies on it are not comparable to any published number.
    It exists so that the quickstart, the tests and smoke runs work anywhere, offline, in
    seconds.

Classes:
    Characters present in every font of :data:`FONT_FILES` (checked on their cmap tables), with
    visually confusable look-alikes removed so that every class is distinguishable by shape:
    Greek and Cyrillic capitals that look like Latin ones (Alpha, Beta, Epsilon, ..., Cyrillic
    A, Ve, Es, ...), lowercase letters that are small copies of their capital (c o s v w x z,
    Cyrillic lowercase, Greek kappa, nu, pi, ...), the I/l/1/| and O/0/o families (only ``1``
    and ``O`` are kept), and pairs such as y/gamma, eta/eng, 3/Ze, epsilon/element-of,
    alpha/proportional-to, delta/eth/partial, beta/sharp-s, Sigma/n-ary sum, Pi/n-ary product,
    Lambda/logical and, X/multiplication sign, Xi/identical-to, Y/yen, %/per mille, U/union.
    Glyphs that are blobs at 28x28 (circled plus/times, (c), (R)) are left out too. A test checks
    that no two classes render alike: on undistorted 28x28 renders (L2 distance of [0, 1] images,
    averaged over fonts) a true duplicate such as Latin A and Greek Alpha is ~0.05 apart; the
    closest pair kept, minus and tilde, is 1.7 apart.
    Glyphs keep their size and their height above the baseline (fonts are scaled to a common
    cap height, the baseline is fixed, and only the horizontal position is centred), so ``p``
    and ``P``, ``q`` and ``9`` differ as they do on paper.

    Class names are stable and readable, derived from the Unicode character name: ``digit/7``,
    ``latin_upper/A``, ``latin_lower/ae``, ``greek_upper/GAMMA``, ``greek_lower/final_sigma``,
    ``cyrillic_upper/ZHE``, ``symbol/infinity`` (any other character: ``symbol/`` and its
    Unicode name, e.g. ``symbol/latin_small_ligature_oe``). :func:`char_of` inverts
    :func:`class_name`.

Splits:
    ``episodes/glyphs/splits.json``: a fixed shuffle (``numpy.random.default_rng(0)``) of the
    classes, 107 train / 27 val / 33 test (64/16/20 %), written by :func:`make_split_table`.
    A class named there that the installed fonts cannot render raises :class:`DataError`.
"""

from __future__ import annotations

import functools
import math
import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from metarobust.config import DataConfig
from metarobust.data.catalog import (
    DATASETS,
    EMBEDDED_DATASETS,
    check_split,
    image_size_of,
    read_split_file,
    split_file_path,
)
from metarobust.data.store import ImageStore
from metarobust.errors import ConfigError, DataError

NAME = "glyphs"
EMBEDDED_DATASETS.add(NAME)

FONT_FILES: tuple[str, ...] = (
    # Interleaved by family so that any prefix of the drawers (e.g. images 0..9 as support,
    # the rest as query) mixes sans, serif, mono and STIX.
    "DejaVuSans.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf",
    "STIXGeneral.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono-Bold.ttf",
    "STIXGeneralBol.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
)
"""The "drawers", in the order images cycle through them. STIXGeneral italic and bold italic
are left out: they lack the mathematical symbols and arrows."""

CHARACTERS: str = (
    "123456789"
    "ABCDEFGHJKLMNOPQRSTUVWXYZ"
    "abdefghijkmnpqrtuy"
    "ÆæŒœØÐÞþŁłəħ"
    "ΓΔΘΛΞΠΣΦΨΩ"
    "αβδεζηλμξσςωϑ"
    "БДЖИЛЦЧШЩЪЫЬЭЮЯЉЊ"
    "+−÷=≠≤≥±∓∞∇∫√∀∃¬⌐→←↑↓↔↕⇒⇐⇔⇑⇓≈∠⊥⊢⊣"
    "$€£¢&@#%§¶?¿!()[]{}<>/\\*~†‡⌂½¾"
)
"""Every class, one character each (see the module docstring for what was left out and why)."""

IMAGES_PER_CLASS = 20
SEED = 1623
"""Seeds the per-image distortions (with the code point and the drawer index)."""

_CANVAS = 96
"""Side of the square images are drawn on before resizing to ``image_size``."""
_CAP_HEIGHT = 0.46 * _CANVAS
"""Every font is scaled so that its capital H is this tall (DejaVu and STIX differ by ~15 %)."""
_BASELINE = _CANVAS / 2 + 0.42 * _CAP_HEIGHT
"""Places the band from accent tops (~1.15 cap) to descenders (~-0.3 cap) mid-canvas."""

_GROUPS: tuple[tuple[str, str, bool], ...] = (
    # (Unicode name prefix, class group, tail in lower case)
    ("LATIN CAPITAL LETTER ", "latin_upper", False),
    ("LATIN SMALL LETTER ", "latin_lower", True),
    ("GREEK CAPITAL LETTER ", "greek_upper", False),
    ("GREEK SMALL LETTER ", "greek_lower", True),
    ("CYRILLIC CAPITAL LETTER ", "cyrillic_upper", False),
    ("CYRILLIC SMALL LETTER ", "cyrillic_lower", True),
)


def class_name(char: str) -> str:
    """The class name of a character, e.g. ``"A"`` -> ``"latin_upper/A"``, ``"∞"`` ->
    ``"symbol/infinity"``, ``"7"`` -> ``"digit/7"``."""
    name = unicodedata.name(char)
    if name.startswith("DIGIT ") and char.isascii():
        return f"digit/{char}"
    for prefix, group, lower in _GROUPS:
        if name.startswith(prefix):
            tail = name[len(prefix):].replace(" ", "_")
            return f"{group}/{tail.lower() if lower else tail}"
    return "symbol/" + name.lower().replace(" ", "_")


def char_of(name: str) -> str:
    """The character of a class name (inverse of :func:`class_name`); :class:`DataError` if the
    name denotes no character."""
    group, _, tail = name.partition("/")
    char = None
    if group == "digit" and len(tail) == 1 and tail.isascii() and tail.isdigit():
        char = tail
    else:
        prefix = {g: p for p, g, _ in _GROUPS}.get(group, "" if group == "symbol" else None)
        if prefix is not None and tail:
            try:
                char = unicodedata.lookup(prefix + tail.replace("_", " ").upper())
            except KeyError:
                char = None
    if char is None or len(char) != 1 or class_name(char) != name:
        raise DataError(
            f"{NAME}: class {name!r} in {split_file_path(NAME)} names no character; expected "
            f"e.g. 'digit/7', 'latin_upper/A', 'greek_lower/alpha', 'symbol/infinity'"
        )
    return char


def font_dir() -> Path:
    """matplotlib's bundled TrueType fonts (``mpl-data/fonts/ttf``)."""
    import matplotlib  # imported here: only this dataset needs it

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=1)
def _font_cmaps() -> tuple[frozenset[int], ...]:
    """The code points each font of :data:`FONT_FILES` maps to a glyph of its own."""
    from fontTools.ttLib import TTFont  # a matplotlib dependency

    cmaps = []
    for file in FONT_FILES:
        path = font_dir() / file
        if not path.is_file():
            raise DataError(
                f"{NAME}: font {path} not found; the glyphs dataset renders matplotlib's bundled "
                f"fonts, so reinstall matplotlib (pip install --force-reinstall matplotlib)"
            )
        cmaps.append(frozenset(TTFont(str(path), lazy=True).getBestCmap()))
    return tuple(cmaps)


def missing_fonts(char: str) -> list[str]:
    """The fonts of :data:`FONT_FILES` that have no glyph for ``char`` (empty: renderable).

    The cmap is checked rather than the rendered ink, because FreeType draws a missing
    character as the font's ``.notdef`` box, which is not empty.
    """
    return [f for f, cmap in zip(FONT_FILES, _font_cmaps()) if ord(char) not in cmap]


@functools.cache
def _font(file: str) -> ImageFont.FreeTypeFont:
    """``file`` at the integer size that makes its capital H :data:`_CAP_HEIGHT` pixels tall."""
    path = str(font_dir() / file)
    probe = 200
    _, top, _, bottom = ImageFont.truetype(path, probe).getbbox("H", anchor="ls")
    size = max(1, round(probe * _CAP_HEIGHT / (bottom - top)))
    return ImageFont.truetype(path, size)


def render_glyph(char: str, drawer: int, image_size: int, distort: bool = True) -> np.ndarray:
    """Image ``drawer`` (0-based) of ``char``: uint8 ``[image_size, image_size]``, ink 255.

    Drawer ``j`` uses font ``FONT_FILES[j % len(FONT_FILES)]`` and a distortion drawn from a
    generator seeded by ``(SEED, ord(char), j)``, so an image does not depend on which other
    classes are rendered or in what order. ``distort=False``: the font's plain glyph (no
    distortion), used to compare classes by shape alone.
    """
    font = _font(FONT_FILES[drawer % len(FONT_FILES)])
    rng = np.random.default_rng((SEED, ord(char), drawer))
    angle = math.radians(rng.uniform(-8.0, 8.0))
    scale = rng.uniform(0.9, 1.1)
    shear = rng.uniform(-0.12, 0.12)
    shift_x, shift_y = rng.uniform(-0.04, 0.04, size=2) * _CANVAS
    stroke = int(rng.choice([0, 0, 1, 2]))  # thicker strokes now and then, like a fatter pen
    if not distort:
        angle, scale, shear, shift_x, shift_y, stroke = 0.0, 1.0, 0.0, 0.0, 0.0, 0

    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font, anchor="ls",
                                             stroke_width=stroke)
    x, y = round(_CANVAS / 2 - (left + right) / 2), round(_BASELINE)  # ink centred horizontally
    draw.text((x, y), char, font=font, fill=255, anchor="ls", stroke_width=stroke)

    # Forward map about the canvas centre c: p -> scale * M (p - c) + c + shift, with M =
    # rotation . shear. A few glyphs are wide or tall (Zhe, square root in STIX): shrink the
    # scale so that the corners of their ink box stay inside the canvas, with a margin wide
    # enough that the Lanczos resize leaves the image border black.
    cos, sin = math.cos(angle), math.sin(angle)
    m = ((cos, cos * shear - sin), (sin, sin * shear + cos))
    half = _CANVAS / 2
    limit = half - 0.08 * _CANVAS
    for cx in (x + left - half, x + right - half):
        for cy in (y + top - half, y + bottom - half):
            for row, shift in ((m[0], shift_x), (m[1], shift_y)):
                reach = abs(row[0] * cx + row[1] * cy)
                if reach * scale + abs(shift) > limit:
                    scale = (limit - abs(shift)) / reach
    # PIL wants the inverse map (output pixel -> input pixel): p = M^-1 (q - c - shift) / scale + c.
    det = (m[0][0] * m[1][1] - m[0][1] * m[1][0]) * scale
    a, b = m[1][1] / det, -m[0][1] / det
    d, e = -m[1][0] / det, m[0][0] / det
    qx, qy = half + shift_x, half + shift_y
    coeffs = (a, b, half - a * qx - b * qy, d, e, half - d * qx - e * qy)
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, coeffs,
                              resample=Image.Resampling.BILINEAR)
    if image_size != _CANVAS:
        canvas = canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.asarray(canvas, dtype=np.uint8)


def check_renderable(names: list[str]) -> list[str]:
    """The characters of class ``names``; :class:`DataError` naming every class some font of
    :data:`FONT_FILES` cannot draw."""
    chars = [char_of(n) for n in names]
    bad = {n: missing_fonts(c) for n, c in zip(names, chars)}
    bad = {n: fonts for n, fonts in bad.items() if fonts}
    if bad:
        detail = "; ".join(f"{n} (missing in {', '.join(f)})" for n, f in list(bad.items())[:5])
        raise DataError(
            f"{NAME}: {len(bad)} classes of {split_file_path(NAME)} cannot be rendered with the "
            f"installed matplotlib fonts: {detail}. Remove them from the split file or install "
            f"the matplotlib version it was made with"
        )
    return chars


@functools.lru_cache(maxsize=4)
def render_classes(names: tuple[str, ...], image_size: int) -> torch.Tensor:
    """All images of the classes ``names``: uint8 ``[len(names), IMAGES_PER_CLASS, 1, S, S]``.

    Cached per ``(names, image_size)``: callers must not modify the result in place.
    """
    chars = check_renderable(list(names))
    out = np.empty((len(chars), IMAGES_PER_CLASS, 1, image_size, image_size), dtype=np.uint8)
    for i, char in enumerate(chars):
        for j in range(IMAGES_PER_CLASS):
            out[i, j, 0] = render_glyph(char, j, image_size)
    return torch.from_numpy(out)


def make_split_table(seed: int = 0) -> dict[str, list[str]]:
    """The class split written to ``episodes/glyphs/splits.json``: a ``default_rng(seed)``
    permutation of :data:`CHARACTERS`, cut 64 / 16 / 20 %, each split sorted by name."""
    names = [class_name(c) for c in CHARACTERS]
    order = np.random.default_rng(seed).permutation(len(names))
    n_train, n_val = round(0.64 * len(names)), round(0.16 * len(names))
    cut = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
           "test": order[n_train + n_val:]}
    return {split: sorted(names[i] for i in idx) for split, idx in cut.items()}


def _split_classes(split: str) -> tuple[list[str], tuple[str, ...]]:
    """The classes of ``split`` and of all splits (in file order), validated."""
    table = read_split_file(NAME)
    lists = {}
    for s in ("train", "val", "test"):
        names = table.get(s)
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise DataError(
                f"{NAME}: {split_file_path(NAME)} must list the class names of split {s!r} "
                f"as a non-empty list of strings"
            )
        lists[s] = names
    everything = [n for s in ("train", "val", "test") for n in lists[s]]
    if len(set(everything)) != len(everything):
        raise DataError(f"{NAME}: {split_file_path(NAME)} lists a class twice or in two splits")
    return lists[split], tuple(everything)


@DATASETS.register(
    NAME,
    "embedded default: printed glyphs rendered from fonts shipped with matplotlib; no download",
)
def load_glyphs(cfg: DataConfig, split: str) -> ImageStore:
    """The ``split`` classes of the glyphs set, images uint8 ``[N*20, 1, S, S]``, S = image_size.

    ``cfg.root`` and ``cfg.download`` are ignored (nothing to read). ``cfg.rotations`` must be
    false: rotated characters collide with other classes (6/9, b/q, d/p, N/Z, u/n, arrows).
    """
    check_split(split)
    size = image_size_of(cfg)
    if cfg.rotations:
        raise ConfigError(
            f"data.rotations: the {NAME} dataset has no rotated classes (a rotated character is "
            f"often another class: 6/9, b/q, N/Z); set data.rotations=false"
        )
    names, everything = _split_classes(split)
    images = render_classes(everything, size)
    rows = torch.tensor([everything.index(n) for n in names], dtype=torch.long)
    chosen = images.index_select(0, rows)  # a copy: the cached tensor stays untouched
    n, k = chosen.shape[:2]
    return ImageStore(
        images=chosen.reshape(n * k, *chosen.shape[2:]),
        labels=torch.arange(n).repeat_interleave(k),
        class_names=list(names),
        name=f"{NAME}/{split}",
        image_ids=torch.arange(k).repeat(n),
    )
