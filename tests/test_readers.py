"""Dataset readers: Omniglot (official zips or folders), the embedded glyphs set, the registry.

Omniglot tests read the real staged small sets (``../shared/data/omniglot``) and are skipped
when they are absent; the glyphs tests need nothing but matplotlib's fonts.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from metarobust.config import DataConfig
from metarobust.data import catalog, glyphs, omniglot
from metarobust.data.datasets import (
    DATASETS,
    SPLITS,
    dataset_info,
    dataset_root,
    load_split,
    read_split_file,
)
from metarobust.errors import ConfigError, DataError

SMALL_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
SMALL_ALPHABETS = {
    "Balinese", "Early_Aramaic", "Greek", "Korean", "Latin", "Japanese_(katakana)", "Sanskrit",
    "Tagalog",
}


@pytest.fixture(scope="module")
def omniglot_root(shared_data: Path) -> Path:
    """The staged official small background zips; skip when they are not there."""
    root = shared_data / "omniglot"
    missing = [z for z in SMALL_ZIPS if not (root / z).is_file()]
    if missing:
        pytest.skip(f"staged Omniglot zips {missing} not found in {root}")
    return root


def omni(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="omniglot", root=str(root), **kw)


def all_splits(cfg: DataConfig) -> dict:
    return {s: load_split(cfg, s) for s in SPLITS}


def alphabets(store) -> set[str]:
    return {n.split("/")[0] for n in store.class_names}


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


# --- Omniglot: contents --------------------------------------------------------------------------


def test_omniglot_small_sets_union_has_242_characters_of_20_drawers(omniglot_root):
    stores = all_splits(omni(omniglot_root))
    names = [n for s in stores.values() for n in s.class_names]
    assert len(names) == len(set(names)) == 242
    assert {n.split("/")[0] for n in names} == SMALL_ALPHABETS
    for store in stores.values():
        assert store.images.dtype == torch.uint8
        assert store.image_shape == (1, 28, 28)
        assert store.counts().tolist() == [20] * store.num_classes
        assert sorted(store.image_ids[store.labels == 0].tolist()) == list(range(20))


def test_omniglot_greek_and_latin_in_both_small_zips_are_read_once(omniglot_root):
    stores = all_splits(omni(omniglot_root))
    names = [n for s in stores.values() for n in s.class_names]
    assert sum(n.startswith("Greek/") for n in names) == 24
    assert sum(n.startswith("Latin/") for n in names) == 26


def test_omniglot_strokes_are_bright_on_a_dark_background(omniglot_root):
    images = load_split(omni(omniglot_root), "val").images.float()
    assert images.max() == 255
    assert images.mean() < 40  # strokes cover a small part of each image
    corners = images[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 0).float().mean() > 0.95


def test_omniglot_images_are_decoded_inverted_and_resized_in_file_name_order(omniglot_root):
    store = load_split(omni(omniglot_root), "test")
    with zipfile.ZipFile(omniglot_root / SMALL_ZIPS[0]) as archive:
        members = sorted(m for m in archive.namelist()
                         if m.startswith("images_background_small1/Latin/character07/")
                         and m.endswith(".png"))
        data = archive.read(members[5])
    expected = ImageOps.invert(Image.open(io.BytesIO(data)).convert("L"))
    expected = np.asarray(expected.resize((28, 28), Image.Resampling.LANCZOS))
    label = store.class_names.index("Latin/character07")
    (row,) = ((store.labels == label) & (store.image_ids == 5)).nonzero().squeeze(1).tolist()
    assert torch.equal(store.images[row, 0], torch.from_numpy(expected.copy()))


def test_omniglot_small_split_is_by_alphabet_disjoint_and_covering(omniglot_root):
    stores = all_splits(omni(omniglot_root))
    assert alphabets(stores["train"]) == {
        "Balinese", "Early_Aramaic", "Korean", "Japanese_(katakana)", "Sanskrit"}
    assert alphabets(stores["val"]) == {"Greek"}
    assert alphabets(stores["test"]) == {"Latin", "Tagalog"}
    assert [s.num_classes for s in stores.values()] == [175, 24, 43]


def test_omniglot_split_file_tables_are_disjoint_and_the_full_one_is_lakes():
    tables = omniglot.split_tables()
    full = tables["full"]
    assert (len(full["train"]), len(full["val"]), len(full["test"])) == (25, 5, 20)
    assert set(full["val"]) == {  # the 5 background alphabets with the fewest characters
        "Alphabet_of_the_Magi", "Blackfoot_(Canadian_Aboriginal_Syllabics)",
        "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Ojibwe_(Canadian_Aboriginal_Syllabics)",
        "Tagalog"}
    for table in tables.values():
        flat = [a for split in SPLITS for a in table[split]]
        assert len(flat) == len(set(flat))
    assert {a for s in SPLITS for a in tables["small"][s]} == SMALL_ALPHABETS
    # The full table applies as soon as a full-set file is present, small sets or not.
    small, full_and_small = set(omniglot.SMALL_SETS), set(omniglot.ALL_SETS)
    assert omniglot.choose_table(small, SMALL_ALPHABETS)[0] == "small"
    assert omniglot.choose_table(full_and_small, SMALL_ALPHABETS | {"Angelic"})[0] == "full"
    with pytest.raises(DataError, match="Angelic"):  # not in the small sets
        omniglot.choose_table(small, {"Angelic"})


def test_omniglot_rotations_quadruple_classes_within_each_split(omniglot_root):
    plain = load_split(omni(omniglot_root), "test")
    rotated = load_split(omni(omniglot_root, rotations=True), "test")
    assert rotated.num_classes == 4 * plain.num_classes
    assert len(rotated) == 4 * len(plain)
    assert rotated.class_names[:4] == [
        "Latin/character01", "Latin/character01@rot90", "Latin/character01@rot180",
        "Latin/character01@rot270"]
    assert alphabets(rotated) == {"Latin", "Tagalog"}  # rotated test classes stay in test
    original = plain.images[plain.labels == plain.class_names.index("Tagalog/character03")]
    for k, suffix in enumerate(["", "@rot90", "@rot180", "@rot270"]):
        label = rotated.class_names.index("Tagalog/character03" + suffix)
        images = rotated.images[rotated.labels == label]
        assert torch.equal(images, torch.rot90(original, k, dims=(-2, -1)))
    # ... which is close to rotating the 105x105 drawing before resizing (up to resampling).
    with zipfile.ZipFile(omniglot_root / SMALL_ZIPS[1]) as archive:
        member = sorted(m for m in archive.namelist()
                        if "/Tagalog/character03/" in m and m.endswith(".png"))[0]
        drawing = ImageOps.invert(Image.open(io.BytesIO(archive.read(member))).convert("L"))
    turned = np.asarray(drawing.rotate(90).resize((28, 28), Image.Resampling.LANCZOS), np.float32)
    label = rotated.class_names.index("Tagalog/character03@rot90")
    ours = rotated.images[rotated.labels == label][0, 0].float().numpy()
    assert np.abs(turned - ours).mean() < 3.0


def test_omniglot_extracted_folders_read_the_same_as_the_zips(omniglot_root, tmp_path):
    for name in SMALL_ZIPS:
        with zipfile.ZipFile(omniglot_root / name) as archive:
            archive.extractall(tmp_path)
    assert not list(tmp_path.glob("*.zip"))
    for split in SPLITS:
        a, b = load_split(omni(omniglot_root), split), load_split(omni(tmp_path), split)
        assert a.class_names == b.class_names
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.image_ids, b.image_ids)


def test_omniglot_one_small_zip_alone_uses_the_small_table_and_image_size(omniglot_root, tmp_path):
    shutil.copy(omniglot_root / SMALL_ZIPS[0], tmp_path)
    stores = all_splits(omni(tmp_path, image_size=20))
    assert alphabets(stores["train"]) == {"Balinese", "Early_Aramaic", "Korean"}
    assert alphabets(stores["val"]) == {"Greek"}
    assert alphabets(stores["test"]) == {"Latin"}
    assert stores["test"].images.shape == (26 * 20, 1, 20, 20)


def drawing_png(seed: int) -> bytes:
    """A 105x105 mode-'1' PNG like Omniglot's: a black stroke on white."""
    image = Image.new("1", (105, 105), 1)
    ImageDraw.Draw(image).line([(10 + seed, 20), (90, 30 + 3 * seed)], fill=0, width=4)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def fake_set(stem: str, characters: list[str], drawers: int = 3) -> dict[str, bytes]:
    return {f"{stem}/{c}/{i:04d}_{d:02d}.png": drawing_png(d)
            for i, c in enumerate(characters) for d in range(1, drawers + 1)}


def test_omniglot_full_set_files_use_lakes_split_with_small_alphabets_held_out(tmp_path):
    # images_background.zip (here 3 of its alphabets) and an extracted images_evaluation
    # folder inside torchvision's omniglot-py/ layout.
    write_zip(tmp_path / "images_background.zip", fake_set(
        "images_background", ["Korean/character01", "Korean/character02",
                              "Tagalog/character01", "Latin/character05"]))
    for name, data in fake_set("images_evaluation", ["Angelic/character01"]).items():
        path = tmp_path / "omniglot-py" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    stores = all_splits(omni(tmp_path))
    assert stores["train"].class_names == [
        "Korean/character01", "Korean/character02", "Latin/character05"]
    assert stores["val"].class_names == ["Tagalog/character01"]  # a small-set test alphabet
    assert stores["test"].class_names == ["Angelic/character01"]
    assert stores["test"].images[:, 0].float().mean() < 60  # strokes bright, background dark
    # Pointing data.root at one zip reads that file alone; then test has no alphabet. (Latin
    # and Tagalog would be test alphabets of the small sets' table.)
    with pytest.raises(DataError, match="images_evaluation"):
        load_split(omni(tmp_path / "images_background.zip"), "test")


# --- Omniglot: bad input -------------------------------------------------------------------------


def test_omniglot_missing_root_raises_data_error_naming_it(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as err:
        load_split(omni(root), "train")
    assert str(root) in str(err.value) and "data.download=true" in str(err.value)


def test_omniglot_folder_without_zips_lists_the_expected_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not omniglot")
    with pytest.raises(DataError) as err:
        load_split(omni(tmp_path), "train")
    message = str(err.value)
    assert str(tmp_path) in message
    for name in ["images_background.zip", "images_evaluation.zip", *SMALL_ZIPS]:
        assert name in message
    assert "data.download=true" in message


def test_omniglot_corrupt_zip_raises_data_error_naming_the_file(tmp_path):
    bad = tmp_path / "images_background_small1.zip"
    bad.write_bytes(b"this is not a zip file" * 100)
    with pytest.raises(DataError, match="not a readable zip") as err:
        load_split(omni(tmp_path), "train")
    assert str(bad) in str(err.value)


def test_omniglot_undecodable_png_raises_data_error_naming_the_member(tmp_path):
    member = "images_background_small1/Latin/character01/0683_01.png"
    write_zip(tmp_path / "images_background_small1.zip", {member: b"\x89PNG garbage"})
    with pytest.raises(DataError, match="cannot decode") as err:
        load_split(omni(tmp_path), "test")
    assert member in str(err.value)


def test_omniglot_split_without_characters_raises_data_error(omniglot_root, tmp_path):
    with zipfile.ZipFile(omniglot_root / SMALL_ZIPS[0]) as archive:
        members = {m: archive.read(m) for m in archive.namelist()
                   if "/Latin/character01/" in m and m.endswith(".png")}
    write_zip(tmp_path / "images_background_small1.zip", members)
    assert load_split(omni(tmp_path), "test").num_classes == 1
    with pytest.raises(DataError, match="split 'train' has no characters"):
        load_split(omni(tmp_path), "train")


# --- Omniglot: download --------------------------------------------------------------------------


def test_download_omniglot_from_a_file_url_checks_md5_and_reads(omniglot_root, tmp_path):
    paths = omniglot.download_omniglot(
        tmp_path, sets=omniglot.SMALL_SETS, base_url=omniglot_root.as_uri())
    assert [p.name for p in paths] == list(SMALL_ZIPS)
    for p in paths:
        assert hashlib.md5(p.read_bytes()).hexdigest() == omniglot.MD5[p.name[:-4]]
    assert load_split(omni(tmp_path), "val").num_classes == 24


def test_download_omniglot_rejects_a_wrong_md5_and_deletes_the_file(tmp_path):
    server = tmp_path / "server"
    server.mkdir()
    (server / "images_background_small1.zip").write_bytes(b"tampered")
    target = tmp_path / "data"
    with pytest.raises(DataError, match="md5"):
        omniglot.download_omniglot(target, sets=["images_background_small1"],
                                   base_url=server.as_uri())
    assert not (target / "images_background_small1.zip").exists()


def test_download_omniglot_rejects_unknown_set_names(tmp_path):
    with pytest.raises(ConfigError, match="images_everything"):
        omniglot.download_omniglot(tmp_path, sets=["images_everything"])


def test_omniglot_with_download_true_fetches_missing_files(omniglot_root, tmp_path, monkeypatch):
    fetch = omniglot.download_omniglot
    calls = []

    def offline_download(root):  # one small set, from the staged copy instead of GitHub
        calls.append(root)
        return fetch(root, sets=omniglot.SMALL_SETS[:1], base_url=omniglot_root.as_uri())

    monkeypatch.setattr(omniglot, "download_omniglot", offline_download)
    root = tmp_path / "fresh"
    assert load_split(omni(root, download=True), "test").num_classes == 26  # Latin
    assert calls == [root]
    load_split(omni(root, download=True), "val")  # files present now: no second download
    assert len(calls) == 1


# --- glyphs --------------------------------------------------------------------------------------


def glyph_stores(**kw) -> dict:
    return all_splits(DataConfig(dataset="glyphs", **kw))


def test_glyphs_have_at_least_150_classes_of_20_bright_28x28_images():
    stores = glyph_stores()
    total = sum(s.num_classes for s in stores.values())
    assert total == len(glyphs.CHARACTERS) >= 150
    for store in stores.values():
        assert store.images.dtype == torch.uint8 and store.image_shape == (1, 28, 28)
        assert store.counts().tolist() == [20] * store.num_classes
        # every image has strokes (a thin minus sign antialiased to 28x28 peaks near 180)
        assert store.images.amax(dim=(1, 2, 3)).min() >= 150
        border = torch.cat([store.images[..., 0, :], store.images[..., -1, :],
                            store.images[..., :, 0], store.images[..., :, -1]], dim=-1)
        assert border.max() < 16  # ink stays inside (Lanczos ringing leaves a few levels)


def test_glyphs_split_file_is_disjoint_covering_and_renderable():
    table = read_split_file("glyphs")
    lists = [table[s] for s in SPLITS]
    flat = [n for names in lists for n in names]
    assert len(flat) == len(set(flat))
    assert set(flat) == {glyphs.class_name(c) for c in glyphs.CHARACTERS}
    assert [len(x) for x in lists] == [107, 27, 33]
    chars = glyphs.check_renderable(flat)
    assert [glyphs.class_name(c) for c in chars] == flat


def test_glyph_class_names_are_readable_and_invertible():
    assert glyphs.class_name("A") == "latin_upper/A"
    assert glyphs.class_name("æ") == "latin_lower/ae"
    assert glyphs.class_name("λ") == "greek_lower/lamda"
    assert glyphs.class_name("Ж") == "cyrillic_upper/ZHE"
    assert glyphs.class_name("7") == "digit/7"
    assert glyphs.class_name("∞") == "symbol/infinity"
    for char in glyphs.CHARACTERS:
        assert glyphs.char_of(glyphs.class_name(char)) == char
    with pytest.raises(DataError, match="names no character"):
        glyphs.char_of("latin_upper/NOT_A_LETTER")


def test_glyphs_render_is_deterministic_and_independent_of_order():
    store = load_split(DataConfig(dataset="glyphs"), "val")
    picks = [(store.class_names[c], j) for c in (5, 0, 17) for j in (19, 0, 7)]
    for name, j in picks:  # re-rendered alone, in another order: the same bytes
        again = glyphs.render_glyph(glyphs.char_of(name), j, 28)
        label = store.class_names.index(name)
        row = ((store.labels == label) & (store.image_ids == j)).nonzero().item()
        assert np.array_equal(store.images[row, 0].numpy(), again)
    assert torch.equal(load_split(DataConfig(dataset="glyphs"), "val").images, store.images)


def test_glyphs_no_two_classes_render_alike():
    fonts = range(len(glyphs.FONT_FILES))

    def plain(char: str) -> torch.Tensor:  # [fonts, 28*28], undistorted
        return torch.tensor(np.stack([glyphs.render_glyph(char, f, 28, distort=False)
                                      for f in fonts])).flatten(1).float() / 255

    shapes = torch.stack([plain(c) for c in glyphs.CHARACTERS])  # [N, fonts, D]
    dist = torch.stack([torch.cdist(shapes[:, f], shapes[:, f]) for f in fonts]).mean(0)
    dist.fill_diagonal_(float("inf"))
    # The measure does see a look-alike: Latin A vs Greek Alpha are (nearly) the same drawing.
    assert (plain("A") - plain("Α")).norm(dim=1).mean() < 0.3
    assert dist.min() > 1.0


def test_glyphs_nearest_class_mean_on_held_out_fonts_beats_chance_by_far():
    images = torch.cat([s.images for s in glyph_stores().values()]).float() / 255
    n = len(images) // 20
    images = images.reshape(n, 20, -1)
    means = images[:, :10].mean(1)  # drawers 0..9 (fonts 0..9)
    queries = images[:, 10:14].reshape(n * 4, -1)  # fonts 10..13, unseen by the means
    predicted = torch.cdist(queries, means).argmin(1)
    accuracy = (predicted == torch.arange(n).repeat_interleave(4)).float().mean().item()
    assert accuracy > 0.3  # chance is 1/167 = 0.006


def test_glyphs_image_size_is_configurable(monkeypatch):
    table = {"train": ["latin_upper/A"], "val": ["greek_lower/alpha", "digit/2"],
             "test": ["symbol/infinity"]}
    monkeypatch.setattr(glyphs, "read_split_file", lambda name: table)
    store = load_split(DataConfig(dataset="glyphs", image_size=14), "val")
    assert store.class_names == ["greek_lower/alpha", "digit/2"]
    assert store.images.shape == (2 * 20, 1, 14, 14)


def test_glyphs_class_the_fonts_cannot_draw_raises_data_error(monkeypatch):
    table = {"train": ["latin_upper/A"], "val": ["symbol/black_star"], "test": ["digit/2"]}
    monkeypatch.setattr(glyphs, "read_split_file", lambda name: table)
    with pytest.raises(DataError, match="symbol/black_star") as err:
        load_split(DataConfig(dataset="glyphs"), "train")
    assert "DejaVuSerif.ttf" in str(err.value)


def test_glyphs_reject_rotations():
    with pytest.raises(ConfigError, match="data.rotations"):
        load_split(DataConfig(dataset="glyphs", rotations=True), "train")


# --- registry, roots, info -----------------------------------------------------------------------


def test_registry_lists_both_readers_and_rejects_unknown_names():
    assert {"glyphs", "omniglot"} <= set(DATASETS.names())
    with pytest.raises(ConfigError, match="data.dataset"):
        load_split(DataConfig(dataset="imagenet-9000"), "train")
    with pytest.raises(ConfigError, match="split"):
        load_split(DataConfig(dataset="glyphs"), "training")
    with pytest.raises(ConfigError, match="data.image_size"):
        load_split(DataConfig(dataset="glyphs", image_size=0), "train")


def test_dataset_root_prefers_config_then_environment_then_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("METAROBUST_DATA", raising=False)
    assert dataset_root(DataConfig(dataset="omniglot")) == (
        Path.home() / ".cache" / "metarobust" / "omniglot")
    monkeypatch.setenv("METAROBUST_DATA", str(tmp_path))
    assert dataset_root(DataConfig(dataset="omniglot")) == tmp_path / "omniglot"
    assert dataset_root(DataConfig(dataset="omniglot", root="/x/y")) == Path("/x/y")


def test_missing_split_file_raises_data_error(monkeypatch, tmp_path):
    monkeypatch.setattr(catalog, "SPLITS_DIR", tmp_path)
    with pytest.raises(DataError, match="split file .* not found"):
        read_split_file("omniglot")


def test_dataset_info_reports_sane_numbers():
    info = dataset_info(DataConfig(dataset="glyphs"))
    assert info["source"] == "embedded"
    assert sum(s["classes"] for s in info["splits"].values()) == len(glyphs.CHARACTERS)
    for split in info["splits"].values():
        assert split["images"] == 20 * split["classes"]
        assert split["images_per_class"] == [20, 20]
        assert split["image_shape"] == [1, 28, 28]


def test_dataset_info_names_the_omniglot_root(omniglot_root):
    info = dataset_info(omni(omniglot_root, rotations=True))
    assert info["source"] == str(omniglot_root)
    assert [s["classes"] for s in info["splits"].values()] == [700, 96, 172]
    assert all(s["images_per_class"] == [20, 20] for s in info["splits"].values())
