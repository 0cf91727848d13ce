"""Readers for standard adversarial training (CIFAR-10/100, MNIST, Fashion-MNIST) and the
device-side CIFAR augmentation.

Real staged data (``../shared/data``: MNIST, Fashion-MNIST, CIFAR-10 as JPEGs) is read where it
exists, and those tests skip when it is absent; CIFAR's official python batches are not staged,
so they are written here in the official format (also as Python 2 wrote them) and read back,
cross-checked against torchvision's own CIFAR10/CIFAR100 classes and MNIST idx reader.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from official_formats import (
    CIFAR10_NAMES,
    CIFAR100,
    cfg,
    cifar10_batches,
    cifar100_files,
    idx_bytes,
    private_cache,  # noqa: F401 - an autouse fixture: pytest finds it by name
    tree_members,
    write_files,
    write_mnist,
    write_tar,
)
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from metarobust.config import DataConfig
from metarobust.data import cifar, image_files, mnist
from metarobust.data.augment import AUGMENTATIONS, random_crop_flip
from metarobust.data.datasets import dataset_info, image_size_of, load_split
from metarobust.data.sampler import BatchSampler
from metarobust.data.store import ImageStore
from metarobust.errors import ConfigError, DataError
from metarobust.experiment import load_config


def as_chw(rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rows).view(-1, 3, 32, 32)


# ------------------------------------------------------------------------------------------
# CIFAR: the official python batches


@pytest.mark.parametrize("py2", [False, True], ids=["py3-bytes-keys", "py2-cpickle"])
def test_cifar10_batches_read_as_torchvision_reads_them(tmp_path, monkeypatch, py2):
    files, arrays = cifar10_batches(per_class_train=2, per_class_test=1, py2=py2)
    write_files(tmp_path / "cifar-10-batches-py", files)
    train, test = (load_split(cfg("cifar10", tmp_path), s) for s in ("train", "test"))
    assert train.class_names == CIFAR10_NAMES and train.image_shape == (3, 32, 32)
    assert torch.equal(train.images, as_chw(arrays["train_data"]))
    assert torch.equal(test.labels, torch.from_numpy(arrays["test_labels"]))
    if not py2:
        return  # torchvision reads only the official Python 2 form (str keys)
    # torchvision's reader, with its md5 gate (official files only) switched off
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *a, **k: True)
    for split, store in (("train", train), ("test", test)):
        ref = tvd.CIFAR10(str(tmp_path), train=split == "train")
        assert torch.equal(store.images.permute(0, 2, 3, 1), torch.from_numpy(ref.data))
        assert store.labels.tolist() == ref.targets and store.class_names == ref.classes


def test_cifar10_official_archive_is_read_in_place(tmp_path):
    files, arrays = cifar10_batches()
    write_tar(tmp_path / "cifar-10-python.tar.gz",
              {f"cifar-10-batches-py/{n}": b for n, b in files.items()})
    store = load_split(cfg("cifar10", tmp_path), "test")
    assert torch.equal(store.images, as_chw(arrays["test_data"]))
    assert not (tmp_path / "cifar-10-batches-py").exists()  # nothing extracted
    # data.root may name the archive itself
    direct = load_split(cfg("cifar10", tmp_path / "cifar-10-python.tar.gz"), "train")
    assert len(direct) == 20


def test_cifar100_gives_fine_labels_and_coarse_labels_for_fc100(tmp_path, monkeypatch):
    files, arrays = cifar100_files(per_class_train=2, per_class_test=1, py2=True)
    write_files(tmp_path / "cifar-100-python", files)
    store = load_split(cfg("cifar100", tmp_path), "train")
    assert store.num_classes == 100 and store.class_names == CIFAR100["fine"]
    assert torch.equal(store.labels, torch.from_numpy(arrays["train_labels"]))
    read = cifar.read_cifar(cfg("cifar100", tmp_path), "test")
    coarse = [read.coarse_names[c] for c in read.coarse_labels.tolist()]
    assert coarse == [CIFAR100["coarse_of"][read.class_names[f]] for f in read.labels.tolist()]
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *a, **k: True)
    ref = tvd.CIFAR100(str(tmp_path), train=False)
    assert torch.equal(read.images.permute(0, 2, 3, 1), torch.from_numpy(ref.data))


def test_cifar_resizes_only_when_asked(tmp_path):
    write_files(tmp_path / "cifar-10-batches-py", cifar10_batches()[0])
    assert image_size_of(cfg("cifar10", tmp_path)) == 32
    store = load_split(cfg("cifar10", tmp_path, image_size=24), "test")
    assert store.image_shape == (3, 24, 24) and store.images.dtype == torch.uint8


def test_cifar_has_no_val_split_and_data_info_says_so(tmp_path):
    write_files(tmp_path / "cifar-10-batches-py", cifar10_batches()[0])
    with pytest.raises(DataError, match=r"split 'val' does not exist.*at.holdout"):
        load_split(cfg("cifar10", tmp_path), "val")
    info = dataset_info(cfg("cifar10", tmp_path))
    assert info["image_size"] == 32 and "at.holdout" in info["splits"]["val"]["error"]
    assert info["splits"]["train"]["images"] == 20 and info["splits"]["test"]["classes"] == 10


def test_cli_data_info_cifar10(tmp_path, capsys):
    from metarobust.cli import main

    write_files(tmp_path / "cifar-10-batches-py", cifar10_batches()[0])
    assert main(["data", "info", "cifar10", "--root", str(tmp_path)]) == 0  # no val split is no failure
    info = json.loads(capsys.readouterr().out)
    assert info["failed"] == [] and "at.holdout" in info["splits"]["val"]["error"]
    assert info["splits"]["test"] == {"classes": 10, "images": 10, "images_per_class": [1, 1],
                                      "image_shape": [3, 32, 32]}


def test_config_defaults_to_the_dataset_image_size():
    assert load_config(None, ["data.dataset=cifar10"]).data.image_size is None
    assert image_size_of(DataConfig(dataset="cifar10")) == 32
    assert image_size_of(DataConfig(dataset="mnist")) == 28
    assert image_size_of(DataConfig(dataset="omniglot")) == 28
    assert image_size_of(DataConfig(dataset="cifar10", image_size=40)) == 40


# ------------------------------------------------------------------------------------------
# CIFAR: image trees (folders and tarballs)


def test_cifar_image_folder_pixels_labels_and_order(tmp_path):
    members, pixels = tree_members(list(reversed(CIFAR10_NAMES)), {"train": 2, "test": 1})
    for name, data in members.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    store = load_split(cfg("cifar10", tmp_path), "train")
    assert store.class_names == CIFAR10_NAMES  # official label order, not folder creation order
    for i in (0, 7, 19):
        name = f"train/{store.class_names[int(store.labels[i])]}/{int(store.image_ids[i]):04d}.png"
        assert torch.equal(store.images[i].permute(1, 2, 0), torch.from_numpy(pixels[name]))


def test_image_tree_class_folders_named_by_number_sort_numerically():
    assert cifar.class_order([str(i) for i in range(12)], CIFAR10_NAMES)[:3] == ["0", "1", "2"]
    assert cifar.class_order(["10", "9", "1"], CIFAR10_NAMES) == ["1", "9", "10"]
    assert cifar.class_order(["b", "a"], CIFAR10_NAMES) == ["a", "b"]


def test_cifar_jpeg_tarball_is_decoded_as_pil_decodes_and_cached(tmp_path, monkeypatch):
    members, _ = tree_members(CIFAR10_NAMES, {"train": 1, "test": 2}, fmt="JPEG")
    write_tar(tmp_path / "cifar10_jpg.tar.gz", {f"cifar10/{n}": b for n, b in members.items()})
    store = load_split(cfg("cifar10", tmp_path), "test")
    assert len(store) == 20 and store.counts().tolist() == [2] * 10
    for i in (0, 13):
        name = f"test/{store.class_names[int(store.labels[i])]}/{int(store.image_ids[i]):04d}.jpeg"
        pil = np.array(Image.open(io.BytesIO(members[name])).convert("RGB"))
        assert torch.equal(store.images[i].permute(1, 2, 0), torch.from_numpy(pil))
    assert len(list(image_files.cache_dir().glob("cifar10-test-*.pt"))) == 1
    monkeypatch.setattr(cifar, "decode_images", lambda *a, **k: pytest.fail("decoded twice"))
    again = load_split(cfg("cifar10", tmp_path), "test")  # from the cache
    assert torch.equal(again.images, store.images)


def test_reading_train_from_a_tarball_caches_test_in_the_same_pass(tmp_path, monkeypatch):
    members, pixels = tree_members(CIFAR10_NAMES, {"train": 2, "test": 1})
    write_tar(tmp_path / "tree.tar.gz", members)
    assert len(load_split(cfg("cifar10", tmp_path), "train")) == 20
    monkeypatch.setattr(cifar, "_tree_files", lambda *a: pytest.fail("tarball read twice"))
    test = load_split(cfg("cifar10", tmp_path), "test")
    assert torch.equal(test.images[0].permute(1, 2, 0), torch.from_numpy(pixels["test/airplane/0000.png"]))


def test_staged_cifar10_jpeg_tarball_test_split(shared_data, monkeypatch):
    tarball = shared_data / "cifar10-jpg" / "cifar10_jpg.tar.gz"
    if not tarball.is_file():
        pytest.skip(f"staged CIFAR-10 JPEG tarball not found at {tarball}")
    seen = {}

    def spy(blobs, where, size):  # keep the files' bytes to check the decoding against PIL
        seen.update(zip(where, blobs))
        return image_files.decode_images(blobs, where, size)

    monkeypatch.setattr(cifar, "decode_images", spy)
    start = time.perf_counter()
    store = load_split(cfg("cifar10", tarball.parent), "test")
    seconds = time.perf_counter() - start  # 3.5 s on the quiet 2-core development machine
    assert store.class_names == CIFAR10_NAMES
    assert store.images.shape == (10000, 3, 32, 32) and store.counts().tolist() == [1000] * 10
    mean = store.images.float().mean().item() / 255
    assert 0.4 < mean < 0.55, mean  # CIFAR-10's mean pixel is about 0.47
    assert seconds < 60
    # every image decodes bit for bit as PIL decodes it (docs/datasets.md; ~4 s of PIL decoding)
    row_of = {(label, position): row for row, (label, position)
              in enumerate(zip(store.labels.tolist(), store.image_ids.tolist()))}
    assert len(seen) == len(store) == len(row_of)
    for where, data in seen.items():
        name, file = where.rsplit("/", 2)[-2:]
        row = row_of[(CIFAR10_NAMES.index(name), int(Path(file).stem))]
        pil = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
        assert torch.equal(store.images[row].permute(1, 2, 0), torch.from_numpy(pil)), where


# ------------------------------------------------------------------------------------------
# CIFAR: bad input


def test_cifar_missing_root_names_the_root_and_the_files(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*cifar-10-batches-py.*data.download"):
        load_split(cfg("cifar10", tmp_path / "nowhere"), "train")
    with pytest.raises(DataError, match=r"no CIFAR files found"):
        load_split(cfg("cifar10", tmp_path), "train")


def test_cifar_corrupt_pickle_truncated_archive_and_wrong_class_count(tmp_path):
    files, _ = cifar10_batches()
    folder = write_files(tmp_path / "a" / "cifar-10-batches-py", dict(files))
    (folder / "test_batch").write_bytes(files["test_batch"][:200])
    with pytest.raises(DataError, match=r"test_batch cannot be read as a dataset pickle"):
        load_split(cfg("cifar10", tmp_path / "a"), "test")
    archive = tmp_path / "b" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    write_tar(archive, {f"cifar-10-batches-py/{n}": b for n, b in files.items()})
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(DataError, match=r"not a readable tar.gz"):
        load_split(cfg("cifar10", tmp_path / "b"), "test")
    meta = pickle.dumps({b"num_cases_per_batch": 10000, b"fine_label_names": CIFAR10_NAMES})
    write_files(tmp_path / "c" / "cifar-10-batches-py", {**files, "batches.meta": meta})
    with pytest.raises(DataError, match=r"missing key\(s\) \['label_names'\]"):
        load_split(cfg("cifar10", tmp_path / "c"), "test")


def test_cifar_meta_with_other_class_count_and_bad_data_shape(tmp_path):
    files, _ = cifar10_batches()
    files["batches.meta"] = pickle.dumps({b"label_names": [b"x"] * 100})
    write_files(tmp_path / "a" / "cifar-10-batches-py", files)
    with pytest.raises(DataError, match=r"100 class names, but cifar10 has 10.*cifar100"):
        load_split(cfg("cifar10", tmp_path / "a"), "test")
    files, _ = cifar10_batches()
    files["test_batch"] = pickle.dumps({b"data": np.zeros((10, 1024), np.uint8), b"labels": [0] * 10})
    write_files(tmp_path / "b" / "cifar-10-batches-py", files)
    with pytest.raises(DataError, match=r"uint8 array \[N, 3072\]"):
        load_split(cfg("cifar10", tmp_path / "b"), "test")


def test_cifar100_tree_pointed_at_by_cifar10_is_refused(tmp_path):
    members, _ = tree_members([f"class{i}" for i in range(12)], {"test": 1})
    write_tar(tmp_path / "images.tar", members, mode="w")
    with pytest.raises(DataError, match=r"12 class folders.*cifar10 has 10"):
        load_split(cfg("cifar10", tmp_path), "test")


def test_cifar_download_only_when_files_are_missing(tmp_path, monkeypatch):
    files, _ = cifar10_batches()
    calls = []

    def fake_download(url, root, filename, md5):
        calls.append((url, filename, md5))
        write_files(Path(root) / "cifar-10-batches-py", files)

    monkeypatch.setattr(cifar, "download_and_extract_archive", fake_download)
    assert len(load_split(cfg("cifar10", tmp_path, download=True), "test")) == 10
    assert calls == [(tvd.CIFAR10.url, "cifar-10-python.tar.gz", tvd.CIFAR10.tgz_md5)]
    load_split(cfg("cifar10", tmp_path, download=True), "train")  # present now: no second fetch
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST


@pytest.mark.parametrize("dataset,folder,first", [
    ("mnist", "mnist", [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]),
    ("fashion_mnist", "fashion-mnist", [1000] * 10),
])
def test_staged_mnist_and_fashion_mnist(shared_data, tmp_path, dataset, folder, first):
    root = shared_data / folder
    if not (root / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"staged {dataset} idx files not found in {root}")
    test = load_split(cfg(dataset, root), "test")
    assert test.images.shape == (10000, 1, 28, 28) and test.counts().tolist() == first
    assert len(load_split(cfg(dataset, root), "train")) == 60000
    # torchvision's own idx reader, on a decompressed copy, gives the same tensors
    raw = tmp_path / "t10k-images-idx3-ubyte"
    raw.write_bytes(gzip.decompress((root / "t10k-images-idx3-ubyte.gz").read_bytes()))
    assert torch.equal(test.images[:, 0], tvd.mnist.read_image_file(str(raw)))
    assert test.class_names == (tvd.MNIST if dataset == "mnist" else tvd.FashionMNIST).classes


def test_mnist_in_torchvision_download_layout_uncompressed(tmp_path):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", gz=False)
    store = load_split(cfg("mnist", tmp_path), "train")
    assert torch.equal(store.images[:, 0], torch.from_numpy(arrays["train_images"]))
    assert store.labels.tolist() == arrays["train_labels"].tolist()
    bigger = load_split(cfg("mnist", tmp_path, image_size=32), "test")
    assert bigger.image_shape == (1, 32, 32)


def test_mnist_bad_files_are_named(tmp_path):
    write_mnist(tmp_path)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    good = images.read_bytes()
    images.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: cannot be decompressed"):
        load_split(cfg("mnist", tmp_path), "test")
    images.write_bytes(gzip.compress(gzip.decompress(good)[:-5]))
    with pytest.raises(DataError, match=r"truncated"):
        load_split(cfg("mnist", tmp_path), "test")
    images.write_bytes(idx_bytes(np.zeros(5, np.uint8)))  # a label file where images belong
    with pytest.raises(DataError, match=r"magic 0x00000801, expected 0x00000803"):
        load_split(cfg("mnist", tmp_path), "test")
    images.write_bytes(idx_bytes(np.zeros((7, 28, 28), np.uint8)))
    with pytest.raises(DataError, match=r"7 images but .* 20 labels"):
        load_split(cfg("mnist", tmp_path), "test")
    images.unlink()
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\[.gz\] not found"):
        load_split(cfg("mnist", tmp_path), "test")
    with pytest.raises(DataError, match=r"split 'val' does not exist"):
        load_split(cfg("mnist", tmp_path), "val")
    with pytest.raises(DataError, match=r"does not exist"):
        load_split(cfg("fashion_mnist", tmp_path / "nowhere"), "test")


def test_mnist_download_is_torchvisions_and_skipped_when_present(tmp_path, monkeypatch):
    calls = []

    class MNIST:  # stands in for torchvision's class: same name, so the same raw folder
        classes = tvd.MNIST.classes

        def __init__(self, root, train, download):
            calls.append(root)
            write_mnist(Path(root) / "MNIST" / "raw")

    monkeypatch.setitem(mnist.VARIANTS, "mnist", mnist.Variant("mnist", "MNIST", MNIST))
    assert len(load_split(cfg("mnist", tmp_path, download=True), "test")) == 20
    load_split(cfg("mnist", tmp_path, download=True), "train")
    assert calls == [str(tmp_path)]


# ------------------------------------------------------------------------------------------
# Device-side augmentation


def reference_crop_flip(images: torch.Tensor, top, left, mirrored, padding: int = 4) -> torch.Tensor:
    """Per-image slicing of the padded images: the plain definition, one image at a time."""
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    h, w = images.shape[-2:]
    out = []
    for i in range(len(images)):
        window = padded[i, :, top[i]:top[i] + h, left[i]:left[i] + w]
        out.append(window.flip(-1) if mirrored[i] else window)
    return torch.stack(out)


def draws(batch: int, seed: int, padding: int = 4):
    g = torch.Generator().manual_seed(seed)
    top = torch.randint(0, 2 * padding + 1, (batch, 1), generator=g).flatten().tolist()
    left = torch.randint(0, 2 * padding + 1, (batch, 1), generator=g).flatten().tolist()
    mirrored = (torch.rand(batch, 1, generator=g) < 0.5).flatten().tolist()
    return top, left, mirrored


def test_crop_flip_is_a_shifted_or_mirrored_copy_of_each_image():
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)  # no zeros: padding shows
    out = random_crop_flip(images, torch.Generator().manual_seed(3))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, reference_crop_flip(images, *draws(64, 3)))
    top, _, mirrored = draws(64, 3)
    assert 0 < sum(mirrored) < 64 and len(set(top)) > 3
    for i in range(64):  # zero rows/columns exactly where the window left the image
        zero_rows = (out[i] == 0).all(dim=(0, 2)).sum().item()
        assert zero_rows == abs(top[i] - 4)


def test_crop_flip_on_float_equals_uint8_and_is_reproducible():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = random_crop_flip(images, torch.Generator().manual_seed(9))
    b = random_crop_flip(images.float() / 255, torch.Generator().manual_seed(9))
    assert b.dtype == torch.float32 and torch.equal(a.float() / 255, b)
    assert torch.equal(a, random_crop_flip(images, torch.Generator().manual_seed(9)))
    assert not torch.equal(a, random_crop_flip(images, torch.Generator().manual_seed(10)))


def test_crop_flip_offsets_are_uniform_and_flips_half():
    top, left, mirrored = draws(20000, 0)
    counts = np.bincount(top + left, minlength=9)
    assert counts.min() > 0.9 * 40000 / 9 and counts.max() < 1.1 * 40000 / 9
    assert abs(np.mean(mirrored) - 0.5) < 0.02


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_crop_flip_has_no_python_loop_over_images():
    counts = []
    for batch in (2, 256):
        images = torch.zeros(batch, 3, 32, 32, dtype=torch.uint8)
        with _CountOps() as mode:
            random_crop_flip(images, torch.Generator().manual_seed(0))
        counts.append(mode.calls)
    assert counts[0] == counts[1], counts  # the same tensor ops for 2 images as for 256


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_crop_flip_runs_on_the_device_from_a_device_generator():
    images = torch.randint(1, 256, (32, 3, 32, 32), dtype=torch.uint8, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(4)
    out = random_crop_flip(images, g)
    assert out.device == images.device
    g = torch.Generator(device="cuda").manual_seed(4)
    top = torch.randint(0, 9, (32, 1), generator=g, device="cuda").flatten().tolist()
    left = torch.randint(0, 9, (32, 1), generator=g, device="cuda").flatten().tolist()
    mirrored = (torch.rand(32, 1, generator=g, device="cuda") < 0.5).flatten().tolist()
    assert torch.equal(out.cpu(), reference_crop_flip(images.cpu(), top, left, mirrored))


def test_batch_sampler_augments_every_batch_and_checkpoints_it():
    images = torch.randint(1, 256, (40, 3, 8, 8), dtype=torch.uint8)
    store = ImageStore(images, torch.arange(40) % 4, ["a", "b", "c", "d"], "toy")
    plain = BatchSampler(store, batch_size=10, seed=1).sample()
    sampler = BatchSampler(store, batch_size=10, seed=1, augment="crop_flip")
    batch = sampler.sample()
    assert torch.equal(batch.query_index, plain.query_index)  # same images, only augmented
    assert batch.query_x.dtype == torch.float32 and batch.query_x.shape == (1, 10, 3, 8, 8)
    assert not torch.equal(batch.query_x, plain.query_x)
    g = torch.Generator().manual_seed(1 + 7919)  # the sampler's augmentation stream (rank 0)
    expected = random_crop_flip(images[batch.query_index[0]], g)
    assert torch.equal(batch.query_x[0], expected.float() / 255)
    state = sampler.state_dict()
    following = sampler.sample()
    resumed = BatchSampler(store, batch_size=10, seed=1, augment="crop_flip")
    resumed.load_state_dict(state)
    assert torch.equal(resumed.sample().query_x, following.query_x)
    assert torch.equal(BatchSampler(store, 10, seed=1, augment="none").sample().query_x, plain.query_x)
    with pytest.raises(ConfigError, match=r"unknown augmentation 'crop'.*crop_flip"):
        BatchSampler(store, 10, augment="crop")
    assert "crop_flip" in AUGMENTATIONS
