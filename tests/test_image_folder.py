"""``image_folder``: a user's own few-shot data (a folder per class and a splits file) read into
stores with clear errors, and any store viewed as a ``torch.utils.data.Dataset``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from metarobust.config import DataConfig
from metarobust.data.datasets import DATASETS, load_split
from metarobust.data.store import StoreDataset
from metarobust.errors import DataError


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAROBUST_CACHE", str(tmp_path / "cache"))


def write_class(folder, count, mode="RGB", side=8, seed=0):
    """``count`` PNGs of random pixels in ``folder``; returns their uint8 arrays in file order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(count):
        shape = (side, side, 3) if mode == "RGB" else (side, side)
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(a, mode).save(folder / f"{i:03d}.png")
        arrays.append(a)
    (folder / "notes.txt").write_text("not an image")  # ignored
    return arrays


@pytest.fixture
def birds(tmp_path):
    root = tmp_path / "birds"
    pixels = {name: write_class(root / name, 3, seed=i)
              for i, name in enumerate(["owl", "duck", "hawk", "gulls/herring", "wren"])}
    (root / "splits.json").write_text(json.dumps({"train": ["owl", "duck", "hawk"], "test": ["gulls/herring", "wren"]}))
    return root, pixels


def test_a_folder_per_class_and_splits_json_read_into_stores(birds):
    root, pixels = birds
    cfg = DataConfig(dataset="image_folder", root=str(root), image_size=8)
    train = load_split(cfg, "train")
    assert train.images.shape == (9, 3, 8, 8) and train.class_names == ["owl", "duck", "hawk"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and train.image_ids.tolist() == [0, 1, 2] * 3
    assert torch.equal(train.images[4], torch.from_numpy(pixels["duck"][1]).permute(2, 0, 1))  # lossless PNG
    test = load_split(cfg, "test")
    assert test.class_names == ["gulls/herring", "wren"] and len(test) == 6
    resized = load_split(DataConfig(dataset="image_folder", root=str(root), image_size=4), "train")
    assert resized.images.shape == (9, 3, 4, 4)
    assert "image_folder" in DATASETS


def test_txt_split_files_and_grayscale_images(tmp_path):
    root = tmp_path / "glyphs"
    for i, name in enumerate(["a", "b", "c"]):
        write_class(root / name, 2, mode="L", seed=i)
    (root / "train.txt").write_text("# training classes\na\n\nb/\n")
    (root / "test.txt").write_text("c\n")
    store = load_split(DataConfig(dataset="image_folder", root=str(root), image_size=8), "train")
    assert store.images.shape == (4, 1, 8, 8) and store.class_names == ["a", "b"]
    with pytest.raises(DataError, match="lists no 'val' split"):
        load_split(DataConfig(dataset="image_folder", root=str(root), image_size=8), "val")


def test_a_broken_folder_gets_an_error_naming_the_path_and_the_fix(birds, tmp_path):
    root, _ = birds
    cfg = DataConfig(dataset="image_folder", root=str(root), image_size=8)
    splits = root / "splits.json"

    def with_splits(table, split="train", match=""):
        splits.write_text(json.dumps(table))
        with pytest.raises(DataError, match=match):
            load_split(cfg, split)

    with_splits({"train": ["owl", "eagle"]}, match=r"class 'eagle' is listed.*eagle is not a folder")
    (root / "empty").mkdir()
    with_splits({"train": ["owl", "empty"]}, match=r"empty holds no image")
    with_splits({"train": ["owl"], "test": ["owl"]}, match=r"'owl' is listed in both 'train' and 'test'")
    with_splits({"train": "owl"}, match="must map splits")
    with_splits({"train": ["../birds/owl"]}, match="without '..'")
    (root / "duck" / "004.png").write_bytes(b"not a png at all")
    with_splits({"train": ["owl", "duck"]}, match=r"004\.png")
    splits.unlink()
    with pytest.raises(DataError, match=r"no splits file.*splits\.json.*train\.txt"):
        load_split(cfg, "train")
    with pytest.raises(DataError, match="set data.root"):
        load_split(DataConfig(dataset="image_folder"), "train")
    with pytest.raises(DataError, match="is not a folder"):
        load_split(DataConfig(dataset="image_folder", root=str(tmp_path / "nowhere")), "train")


def test_a_store_is_a_torch_dataset(birds):
    root, pixels = birds
    store = load_split(DataConfig(dataset="image_folder", root=str(root), image_size=8), "train")
    data = store.dataset()
    assert isinstance(data, torch.utils.data.Dataset) and isinstance(data, StoreDataset)
    assert len(data) == 9 and data.classes == ["owl", "duck", "hawk"]
    image, label = data[4]
    assert image.dtype == torch.float32 and image.shape == (3, 8, 8) and label == 1
    torch.testing.assert_close(image, torch.from_numpy(pixels["duck"][1]).permute(2, 0, 1).float() / 255)
    assert data[-1][1] == 2
    with pytest.raises(IndexError):
        data[9]
    x, y = next(iter(torch.utils.data.DataLoader(data, batch_size=9)))
    assert x.shape == (9, 3, 8, 8) and y.tolist() == store.labels.tolist() and 0 <= x.min() and x.max() <= 1
    flipped = store.dataset(transform=lambda t: t.flip(-1))
    torch.testing.assert_close(flipped[0][0], data[0][0].flip(-1))
