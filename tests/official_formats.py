"""Writers of small dataset files in the exact official formats, and the reader tests' helpers.

CIFAR-100 and miniImageNet are not on the development machine, and CIFAR-10 is there only as
JPEGs, so the tests write tiny files that have the official layout: CIFAR python batches
(dicts with ``data`` uint8 ``[N, 3072]``, ``labels`` / ``fine_labels`` + ``coarse_labels``,
``filenames``, ``batch_label``; the meta files' name lists), also as Python 2's cPickle wrote
them (``str`` keys and raw byte strings, the form of the real downloads), the official tar.gz,
ImageFolder trees, MNIST idx files, and miniImageNet's pickle caches and CSVs.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metarobust.config import DataConfig

EPISODES = Path(__file__).resolve().parents[1] / "episodes"
CIFAR10_NAMES = json.loads((EPISODES / "cifar10" / "classes.json").read_text())["classes"]
CIFAR100 = json.loads((EPISODES / "cifar100" / "classes.json").read_text())


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Decoded-image caches go to a temporary folder, never to ~/.cache (autouse in every test
    module that imports it)."""
    monkeypatch.setenv("METAROBUST_CACHE", str(tmp_path_factory.mktemp("cache")))


def cfg(dataset: str, root: Path, **kw) -> DataConfig:
    return DataConfig(dataset=dataset, root=str(root), **kw)


class Py2Pickler(pickle._Pickler):  # type: ignore[misc,name-defined]
    """Protocol 2 with every str and bytes written as a Python 2 byte string (``BINSTRING``),
    as cPickle wrote the official CIFAR batches: they load with ``str`` keys and numpy buffers
    given as latin-1 text."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_py2_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_string
    dispatch[bytes] = _save_py2_string


def dump(obj: object, py2: bool) -> bytes:
    if not py2:
        return pickle.dumps(obj, protocol=4)
    out = io.BytesIO()
    Py2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def _key(name: str, py2: bool) -> str | bytes:
    return name if py2 else name.encode()


def cifar_images(n: int, seed: int) -> np.ndarray:
    """``[n, 3072]`` uint8 rows (R, G, B planes of 32x32), distinct per image."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def cifar10_batches(per_class_train: int = 2, per_class_test: int = 1,
                    py2: bool = False) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """The seven files of ``cifar-10-batches-py`` (names -> bytes) and the arrays they hold
    (``train_data``, ``train_labels``, ``test_data``, ``test_labels``)."""
    def k(s: str) -> str | bytes:
        return _key(s, py2)

    train_labels = np.tile(np.arange(10), per_class_train)
    test_labels = np.tile(np.arange(10), per_class_test)[::-1].copy()
    train, test = cifar_images(len(train_labels), 1), cifar_images(len(test_labels), 2)
    files = {}
    for i, part in enumerate(np.array_split(np.arange(len(train_labels)), 5)):
        files[f"data_batch_{i + 1}"] = dump({
            k("batch_label"): k(f"training batch {i + 1} of 5"), k("labels"): train_labels[part].tolist(),
            k("data"): train[part], k("filenames"): [k(f"img_{j}.png") for j in part]}, py2)
    files["test_batch"] = dump({
        k("batch_label"): k("testing batch 1 of 1"), k("labels"): test_labels.tolist(),
        k("data"): test, k("filenames"): [k(f"t_{j}.png") for j in range(len(test))]}, py2)
    files["batches.meta"] = dump({k("num_cases_per_batch"): 10000,
                                  k("label_names"): [k(n) for n in CIFAR10_NAMES], k("num_vis"): 3072}, py2)
    arrays = {"train_data": train, "train_labels": train_labels, "test_data": test,
              "test_labels": test_labels}
    return files, arrays


def cifar100_files(per_class_train: int = 5, per_class_test: int = 1, py2: bool = False,
                   coarse_shift: int = 0) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """``cifar-100-python``'s ``train``, ``test`` and ``meta`` (names -> bytes) and their arrays.
    ``coarse_shift`` != 0 writes wrong coarse labels (for the consistency check)."""
    def k(s: str) -> str | bytes:
        return _key(s, py2)

    fine, coarse = CIFAR100["fine"], CIFAR100["coarse"]
    coarse_of = np.array([coarse.index(CIFAR100["coarse_of"][f]) for f in fine])
    files, arrays = {}, {}
    for split, per, seed in (("train", per_class_train, 3), ("test", per_class_test, 4)):
        labels = np.tile(np.arange(100), per)
        data = cifar_images(len(labels), seed)
        files[split] = dump({
            k("filenames"): [k(f"{split}_{j}.png") for j in range(len(labels))],
            k("batch_label"): k(f"{split}ing batch 1 of 1"), k("fine_labels"): labels.tolist(),
            k("coarse_labels"): ((coarse_of[labels] + coarse_shift) % 20).tolist(), k("data"): data}, py2)
        arrays[f"{split}_data"], arrays[f"{split}_labels"] = data, labels
    files["meta"] = dump({k("fine_label_names"): [k(n) for n in fine],
                          k("coarse_label_names"): [k(n) for n in coarse]}, py2)
    return files, arrays


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def write_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def encode(image: np.ndarray, fmt: str = "PNG", quality: int = 90) -> bytes:
    """``[H, W, 3]`` or ``[H, W]`` uint8 to PNG/JPEG bytes."""
    out = io.BytesIO()
    Image.fromarray(image).save(out, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return out.getvalue()


def tree_members(classes: list[str], per_class: dict[str, int], fmt: str = "PNG", size: int = 32,
                 seed: int = 5) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """``{split}/{class}/{nnnn}.png`` members of an ImageFolder tree and each file's pixels
    (``[H, W, 3]``), random but smooth enough to compress."""
    rng = np.random.default_rng(seed)
    members, pixels = {}, {}
    for split, n in per_class.items():
        for c in classes:
            for j in range(n):
                image = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                name = f"{split}/{c}/{j:04d}.{fmt.lower()}"
                members[name], pixels[name] = encode(image, fmt), image
    return members, pixels


def idx_bytes(array: np.ndarray, gz: bool = True) -> bytes:
    """An idx file of unsigned bytes (magic 0x0000 08 <dims>, big-endian sizes)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    return gzip.compress(data) if gz else data


def write_mnist(folder: Path, n_train: int = 30, n_test: int = 20, gz: bool = True,
                seed: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        suffix = ".gz" if gz else ""
        (folder / f"{prefix}-images-idx3-ubyte{suffix}").write_bytes(idx_bytes(images, gz))
        (folder / f"{prefix}-labels-idx1-ubyte{suffix}").write_bytes(idx_bytes(labels, gz))
        out[f"{prefix}_images"], out[f"{prefix}_labels"] = images, labels
    return out


def mini_imagenet_pickle(wnids: list[str], per_class: int, size: int = 84,
                         seed: int = 7) -> tuple[bytes, np.ndarray, dict[str, list[int]]]:
    """A ``mini-imagenet-cache-<split>.pkl``: ``image_data`` ``[N, size, size, 3]`` and
    ``class_dict`` ``{wnid: indices}`` (classes interleaved, as a shuffled cache may be)."""
    rng = np.random.default_rng(seed)
    n = len(wnids) * per_class
    data = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    order = rng.permutation(n)
    class_dict = {w: sorted(order[i * per_class:(i + 1) * per_class].tolist())
                  for i, w in enumerate(reversed(wnids))}
    return pickle.dumps({"image_data": data, "class_dict": class_dict}, protocol=4), data, class_dict


def smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random RGB image (JPEG keeps it close), ``[size, size, 3]`` uint8."""
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR))


def ravi_filename(wnid: str, j: int) -> str:
    """Ravi & Larochelle's image names: wnid + 8-digit index + .jpg."""
    return f"{wnid}{j + 1:08d}.jpg"
