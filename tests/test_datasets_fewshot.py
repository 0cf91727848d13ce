"""Few-shot benchmarks: CIFAR-FS and FC100 (from CIFAR-100's files) and miniImageNet.

None of them is on the development machine, so the tests write small files in exactly the
official formats (CIFAR-100 python pickles, as Python 2 wrote them and as Python 3 writes them;
miniImageNet's pickle caches, and Ravi & Larochelle's CSVs with JPEG images) and read them
back; the split files are checked against the papers' class counts and known members.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from official_formats import (
    CIFAR100,
    EPISODES,
    cfg,
    cifar100_files,
    encode,
    mini_imagenet_pickle,
    private_cache,  # noqa: F401 - an autouse fixture: pytest finds it by name
    ravi_filename,
    smooth_image,
    write_files,
    write_tar,
)
from PIL import Image

from metarobust.data import cifar_fs, image_files, mini_imagenet
from metarobust.data.datasets import SPLITS, dataset_info, image_size_of, load_split
from metarobust.data.sampler import EpisodicSampler
from metarobust.errors import DataError


def splits(name: str) -> dict:
    return json.loads((EPISODES / name / "splits.json").read_text())


# ------------------------------------------------------------------------------------------
# The split files


def test_cifar_fs_split_file_is_bertinettos_64_16_20():
    table = cifar_fs.split_classes("cifar_fs")
    assert {s: len(v) for s, v in table.items()} == {"train": 64, "val": 16, "test": 20}
    assert sorted(c for names in table.values() for c in names) == CIFAR100["fine"]  # each once
    assert {"chimpanzee", "pickup_truck", "whale", "woman", "worm"} <= set(table["test"])
    assert {"beaver", "maple_tree", "tractor", "sea"} <= set(table["val"])


def test_fc100_split_file_is_oreshkins_superclass_split():
    table = splits("fc100")
    ids = {s: sorted(CIFAR100["coarse"].index(c) for c in v) for s, v in table["superclasses"].items()}
    assert ids == {"train": [1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19], "val": [8, 11, 13, 16],
                   "test": [0, 7, 12, 14]}
    classes = cifar_fs.split_classes("fc100")
    assert {s: len(v) for s, v in classes.items()} == {"train": 60, "val": 20, "test": 20}
    assert all(CIFAR100["coarse_of"][c] in table["superclasses"][s] for s, v in classes.items() for c in v)


def test_mini_imagenet_split_file_is_ravi_larochelles():
    table = {s: mini_imagenet.split_classes(s) for s in SPLITS}
    assert {s: len(v) for s, v in table.items()} == {"train": 64, "val": 16, "test": 20}
    assert len({c for names in table.values() for c in names}) == 100
    assert "n01532829" in table["train"] and "n01855672" in table["val"]  # house finch, goose
    assert "n01930112" in table["test"] and "n07613480" in table["test"]  # nematode, trifle


def test_cifar100_class_list_matches_the_official_meta():
    assert len(CIFAR100["fine"]) == 100 and CIFAR100["fine"] == sorted(CIFAR100["fine"])
    assert CIFAR100["fine"][:3] == ["apple", "aquarium_fish", "baby"] and CIFAR100["fine"][-1] == "worm"
    assert len(CIFAR100["coarse"]) == 20 and CIFAR100["coarse"][14] == "people"
    per_super = {c: sum(v == c for v in CIFAR100["coarse_of"].values()) for c in CIFAR100["coarse"]}
    assert set(per_super.values()) == {5}


# ------------------------------------------------------------------------------------------
# CIFAR-FS and FC100 from CIFAR-100's files


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory):
    """The official ``cifar-100-python`` files, 5 train + 1 test image per class, as Python 2
    wrote them."""
    root = tmp_path_factory.mktemp("cifar100")
    files, arrays = cifar100_files(per_class_train=5, per_class_test=1, py2=True)
    write_files(root / "cifar-100-python", files)
    return root, arrays


@pytest.mark.parametrize("dataset", ["cifar_fs", "fc100"])
def test_few_shot_splits_hold_their_classes_with_all_images(cifar100_root, dataset):
    root, arrays = cifar100_root
    table = cifar_fs.split_classes(dataset)
    for split in SPLITS:
        store = load_split(cfg(dataset, root), split)
        assert store.class_names == table[split] and store.name == f"{dataset}/{split}"
        assert store.counts().tolist() == [6] * len(table[split])  # official train + test images
        assert store.image_shape == (3, 32, 32)
    store = load_split(cfg(dataset, root), "test")
    fine = CIFAR100["fine"].index(store.class_names[3])
    rows = (store.labels == 3).nonzero().flatten()
    # image ids 0..4: the class's official training images in file order; 5: its test image
    assert store.image_ids[rows].tolist() == [0, 1, 2, 3, 4, 5]
    train_rows = np.flatnonzero(arrays["train_labels"] == fine)
    expected = torch.from_numpy(arrays["train_data"][train_rows]).view(-1, 3, 32, 32)
    assert torch.equal(store.images[rows[:5]], expected)
    test_row = np.flatnonzero(arrays["test_labels"] == fine)
    assert torch.equal(store.images[rows[5]], torch.from_numpy(arrays["test_data"][test_row[0]]).view(3, 32, 32))


def test_cifar_fs_from_the_official_archive_and_python3_pickles(tmp_path):
    files, _ = cifar100_files(per_class_train=1, per_class_test=1, py2=False)
    write_tar(tmp_path / "cifar-100-python.tar.gz", {f"cifar-100-python/{n}": b for n, b in files.items()})
    store = load_split(cfg("cifar_fs", tmp_path), "val")
    assert store.num_classes == 16 and len(store) == 32
    info = dataset_info(cfg("cifar_fs", tmp_path))
    assert info["image_size"] == 32
    assert {s: v["classes"] for s, v in info["splits"].items()} == {"train": 64, "val": 16, "test": 20}


def test_cifar_fs_episodes_draw_from_the_right_classes(cifar100_root):
    store = load_split(cfg("cifar_fs", cifar100_root[0]), "test")
    batch = EpisodicSampler(store, ways=5, shots=1, queries=5, tasks=4, seed=0).sample()
    assert batch.support_x.shape == (4, 5, 3, 32, 32) and batch.query_x.shape == (4, 25, 3, 32, 32)
    assert torch.equal(store.labels[batch.query_index[0]], batch.classes[0][batch.query_y[0]])


def test_fc100_refuses_files_whose_superclasses_disagree(tmp_path):
    files, _ = cifar100_files(per_class_train=1, per_class_test=1, coarse_shift=1)
    write_files(tmp_path / "cifar-100-python", files)
    with pytest.raises(DataError, match=r"coarse_labels disagree"):
        load_split(cfg("fc100", tmp_path), "train")


def test_cifar_fs_needs_cifar100_files(tmp_path):
    with pytest.raises(DataError, match=r"cifar100: .*does not exist.*cifar-100-python"):
        load_split(cfg("cifar_fs", tmp_path / "nowhere"), "train")
    members = {f"test/class{i:03d}/0.png": encode(np.zeros((32, 32, 3), np.uint8)) for i in range(100)}
    members.update({k.replace("test/", "train/"): v for k, v in members.items()})
    write_tar(tmp_path / "tree.tar", members, mode="w")
    with pytest.raises(DataError, match=r"do not carry the official fine class names"):
        load_split(cfg("fc100", tmp_path), "test")


def test_a_broken_split_file_is_reported(monkeypatch, tmp_path):
    bad = tmp_path / "cifar_fs" / "splits.json"
    bad.parent.mkdir()
    table = splits("cifar_fs")
    table["val"] = table["val"][:15]
    bad.write_text(json.dumps(table))
    monkeypatch.setattr("metarobust.data.catalog.SPLITS_DIR", tmp_path)
    with pytest.raises(DataError, match=r"split 'val' must list 16 classes, found 15"):
        cifar_fs.split_classes("cifar_fs")


# ------------------------------------------------------------------------------------------
# miniImageNet: pickle caches


def test_mini_imagenet_pickle_cache(tmp_path):
    wnids = mini_imagenet.split_classes("test")
    data, image_data, class_dict = mini_imagenet_pickle(wnids, per_class=3)
    (tmp_path / "mini-imagenet-cache-test.pkl").write_bytes(data)
    store = load_split(cfg("mini_imagenet", tmp_path), "test")
    assert image_size_of(cfg("mini_imagenet", tmp_path)) == 84
    assert store.class_names == wnids and store.image_shape == (3, 84, 84) and len(store) == 60
    for label in (0, 19):
        rows = (store.labels == label).nonzero().flatten()
        assert store.image_ids[rows].tolist() == [0, 1, 2]
        source = image_data[class_dict[wnids[label]]]  # [3, 84, 84, 3], the class_dict order
        assert torch.equal(store.images[rows].permute(0, 2, 3, 1), torch.from_numpy(source))
    small = load_split(cfg("mini_imagenet", tmp_path, image_size=32), "test")
    assert small.image_shape == (3, 32, 32)


def test_mini_imagenet_pickle_of_another_split_or_shape_is_refused(tmp_path):
    wrong = mini_imagenet.split_classes("val")[:1] + mini_imagenet.split_classes("test")[1:]
    (tmp_path / "mini-imagenet-cache-test.pkl").write_bytes(mini_imagenet_pickle(wrong, 1)[0])
    with pytest.raises(DataError, match=r"not the 20 test classes.*unexpected \['n01855672'\]"):
        load_split(cfg("mini_imagenet", tmp_path), "test")
    import pickle

    (tmp_path / "mini-imagenet-cache-test.pkl").write_bytes(
        pickle.dumps({"image_data": np.zeros((2, 84, 84), np.uint8), "class_dict": {}}))
    with pytest.raises(DataError, match=r"uint8 \[N, H, W, 3\]"):
        load_split(cfg("mini_imagenet", tmp_path), "test")
    (tmp_path / "mini-imagenet-cache-test.pkl").write_bytes(pickle.dumps({"images": 1}))
    with pytest.raises(DataError, match=r"'image_data' and 'class_dict'"):
        load_split(cfg("mini_imagenet", tmp_path), "test")


# ------------------------------------------------------------------------------------------
# miniImageNet: Ravi & Larochelle's CSVs and the images folder


def write_csv_split(root, split: str, per_class: int, size: int = 84, nested: bool = False):
    """``<split>.csv`` and JPEGs in ``images/`` (or ``images/<wnid>/``); returns file -> bytes."""
    rng = np.random.default_rng(11)
    lines, blobs = ["filename,label"], {}
    for wnid in mini_imagenet.split_classes(split):
        for j in range(per_class):
            name = ravi_filename(wnid, j)
            folder = root / "images" / (wnid if nested else "")
            folder.mkdir(parents=True, exist_ok=True)
            blobs[name] = encode(smooth_image(rng, size), "JPEG")
            (folder / name).write_bytes(blobs[name])
            lines.append(f"{name},{wnid}")
    (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return blobs


@pytest.mark.parametrize("nested", [False, True], ids=["images-flat", "images-per-wnid"])
def test_mini_imagenet_csv_and_images(tmp_path, nested, monkeypatch):
    blobs = write_csv_split(tmp_path, "val", per_class=2, nested=nested)
    store = load_split(cfg("mini_imagenet", tmp_path), "val")
    assert store.class_names == mini_imagenet.split_classes("val") and len(store) == 32
    row = int(((store.labels == 5) & (store.image_ids == 1)).nonzero())
    pil = np.array(Image.open(io.BytesIO(blobs[ravi_filename(store.class_names[5], 1)])).convert("RGB"))
    assert torch.equal(store.images[row].permute(1, 2, 0), torch.from_numpy(pil))
    monkeypatch.setattr(mini_imagenet, "decode_images", lambda *a, **k: pytest.fail("decoded twice"))
    assert torch.equal(load_split(cfg("mini_imagenet", tmp_path), "val").images, store.images)
    assert len(list(image_files.cache_dir().glob("mini_imagenet-val-*.pt"))) == 1


def test_mini_imagenet_original_size_images_are_resized_to_84(tmp_path):
    write_csv_split(tmp_path, "test", per_class=1, size=100)
    store = load_split(cfg("mini_imagenet", tmp_path), "test")
    assert store.image_shape == (3, 84, 84) and store.images.dtype == torch.uint8


def test_mini_imagenet_bad_csv_missing_images_and_download(tmp_path):
    write_csv_split(tmp_path, "test", per_class=1)
    first = ravi_filename(mini_imagenet.split_classes("test")[0], 0)
    (tmp_path / "images" / first).unlink()
    with pytest.raises(DataError, match=rf"image {first} of test.csv not found"):
        load_split(cfg("mini_imagenet", tmp_path), "test")
    (tmp_path / "test.csv").write_text("name,wnid\nx.jpg,n01930112\n")
    with pytest.raises(DataError, match=r"header 'filename,label'"):
        load_split(cfg("mini_imagenet", tmp_path), "test")
    with pytest.raises(DataError, match=r"no train files.*mini-imagenet-cache-train.pkl.*train.csv"):
        load_split(cfg("mini_imagenet", tmp_path), "train")
    with pytest.raises(DataError, match=r"cannot be downloaded automatically"):
        load_split(cfg("mini_imagenet", tmp_path, download=True), "train")
    with pytest.raises(DataError, match=r"does not exist"):
        load_split(cfg("mini_imagenet", tmp_path / "nowhere"), "train")
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (tmp_path / "test.csv").write_text("filename,label\n" + "\n".join(
        f"broken.jpg,{w}" for w in mini_imagenet.split_classes("test")) + "\n")
    with pytest.raises(DataError, match=r"cannot decode .*broken.jpg"):
        load_split(cfg("mini_imagenet", tmp_path), "test")
