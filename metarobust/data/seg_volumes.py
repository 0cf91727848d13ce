"""Labelled volumes for few-shot organ segmentation: readers, checks and an embedded default.

A :class:`Volumes` holds every axial slice of a set of 3-D scans, stacked, on one device:
``images uint8 [S, H, W]`` (intensities normalised to [0, 1], stored x255), ``labels uint8
[S, H, W]`` (organ ids, 0 = background), and per volume its id, first slice and slice count.
Slices of a volume are consecutive and in axial order.

Readers (``seg.dataset``):

- ``chaos_t2``: the CHAOS T2-SPIR slices in the SSL-ALPNet preprocessing as staged in
  ``chaos_t2_png.tar`` (or that tar unpacked): ``images/CHAOST2_<vol>_slice<zzz>.png`` (uint8,
  already intensity-normalised by that pipeline), ``labels/<same name>.png`` (0 background,
  1 liver, 2 right kidney, 3 left kidney, 4 spleen) and ``index.csv``.
- ``nifti``: image and label volumes as the challenges distribute them
  (``<root>/images/*.nii[.gz]`` and ``<root>/labels/*.nii[.gz]``, paired by the last integer
  in the file name), read with nibabel, axial slices along the last array axis, intensities
  normalised as the papers do (CT: ``(HU + 1024) / 4096`` clipped to [0, 1], PNODE; MRI: clipped
  to the 0.5-99.5 percentiles and rescaled to [0, 1]), label ids mapped to organ ids.
- ``synthetic_organs``: generated in-process, no files (see :func:`synthetic_volumes`).

Every reader resizes to ``image_size`` with area interpolation for images and nearest
neighbour for labels (PNODE's protocol) and raises :class:`DataError` on a bad volume: image and
label shapes that differ, label ids outside the organ table, missing or duplicated slices.
"""

from __future__ import annotations

import csv
import io
import re
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from metarobust.errors import DataError

CHAOS_ORGANS: dict[int, str] = {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}
"""Organ ids of the staged CHAOS-T2 labels (and of the synthetic default, which mimics them)."""

KIDNEYS: frozenset[str] = frozenset({"right_kidney", "left_kidney"})
"""When one kidney is the test organ, both leave the training organs (the field's setting 2)."""


@dataclass
class Volumes:
    """Stacked slices of labelled volumes.

    Attributes:
        images: ``uint8 [S, H, W]``, intensities in [0, 1] x 255.
        labels: ``uint8 [S, H, W]``, organ ids (0 background).
        starts: ``int64 [V]``, first slice of each volume in the stack.
        lengths: ``int64 [V]``, slices per volume.
        ids: the volumes' ids (``[V]`` strings, e.g. CHAOS patient numbers).
        organs: organ id -> name.
        name: what was read (for messages).
    """

    images: torch.Tensor
    labels: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    ids: list[str]
    organs: dict[int, str]
    name: str = "volumes"

    def __post_init__(self) -> None:
        if self.images.shape != self.labels.shape:
            raise DataError(f"{self.name}: images {tuple(self.images.shape)} and labels "
                            f"{tuple(self.labels.shape)} differ in shape")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    # What the one Trainer reads of a training split (it was written for ImageStore).
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, *self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return 2  # background and the episode's organ

    @property
    def class_names(self) -> list[str]:
        return ["background", "foreground"]

    def organ_id(self, organ: str) -> int:
        """The id of organ ``organ`` (a name of :attr:`organs`)."""
        for key, value in self.organs.items():
            if value == organ:
                return key
        raise DataError(f"organ {organ!r} is not in {self.name}; choose one of {sorted(self.organs.values())}")

    def volume(self, v: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Volume ``v``'s ``(images [Z, H, W], labels [Z, H, W])``."""
        s, n = int(self.starts[v]), int(self.lengths[v])
        return self.images[s:s + n], self.labels[s:s + n]

    def organ_slices(self, v: int, organ: int) -> torch.Tensor:
        """Stack positions ``int64 [n]`` of volume ``v``'s slices that contain ``organ``, in axial
        order (the protocol keeps only these slices, per organ)."""
        s, n = int(self.starts[v]), int(self.lengths[v])
        present = (self.labels[s:s + n] == organ).flatten(1).any(dim=1)
        return present.nonzero().flatten() + s

    def subset(self, ids: list[str], name: str | None = None) -> Volumes:
        """The volumes with ids ``ids``, in that order."""
        missing = [i for i in ids if i not in self.ids]
        if missing:
            raise DataError(f"{self.name}: no volumes {missing}; it has {self.ids}")
        rows = [self.ids.index(i) for i in ids]
        parts = [torch.arange(int(self.starts[r]), int(self.starts[r] + self.lengths[r])) for r in rows]
        index = torch.cat(parts).to(self.device)
        lengths = self.lengths[rows]
        starts = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
        return replace(self, images=self.images[index], labels=self.labels[index], starts=starts,
                       lengths=lengths, ids=list(ids), name=name or self.name)

    def to(self, device: torch.device | str) -> Volumes:
        return replace(self, images=self.images.to(device), labels=self.labels.to(device),
                       starts=self.starts.to(device), lengths=self.lengths.to(device))


def resize_volume(images: torch.Tensor, labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``images float [Z, H, W]`` in [0, 1] and ``labels int [Z, H, W]`` resized to
    ``size x size``: area interpolation for images, nearest neighbour for labels (PNODE). Returns
    ``uint8`` tensors."""
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images[:, None].float(), size=(size, size), mode="area")[:, 0]
        labels = F.interpolate(labels[:, None].float(), size=(size, size), mode="nearest")[:, 0]
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels.to(torch.uint8)


def stack_volumes(volumes: list[tuple[str, torch.Tensor, torch.Tensor]], organs: dict[int, str], size: int,
                  name: str) -> Volumes:
    """:class:`Volumes` from ``(id, images float [Z, H, W] in [0, 1], labels int [Z, H, W])``,
    checked and resized."""
    if not volumes:
        raise DataError(f"{name}: no volumes found")
    images, labels, lengths = [], [], []
    allowed = {0, *organs}
    for vid, img, lab in volumes:
        if img.shape != lab.shape:
            raise DataError(f"{name}: volume {vid}: image shape {tuple(img.shape)} and label shape "
                            f"{tuple(lab.shape)} differ")
        unknown = sorted(set(torch.unique(lab).tolist()) - allowed)
        if unknown:
            raise DataError(f"{name}: volume {vid}: unknown label ids {unknown}; the organ table is "
                            f"{organs} (0 = background); pass a label map for this dataset")
        img, lab = resize_volume(img, lab, size)
        images.append(img)
        labels.append(lab)
        lengths.append(img.shape[0])
    lengths_t = torch.tensor(lengths)
    starts = torch.cat([lengths_t.new_zeros(1), lengths_t.cumsum(0)[:-1]])
    return Volumes(torch.cat(images), torch.cat(labels), starts, lengths_t, [v[0] for v in volumes],
                   dict(organs), name)


# -- CHAOS-T2, the staged slice format -------------------------------------------------------------
_CHAOS_NAME = re.compile(r"CHAOST2_(\d+)_slice(\d+)\.png$")


class _Files:
    """Members of a tar file or of a folder, by relative path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tar = None
        if root.is_file():
            self.tar = tarfile.open(root)
            self.members = {m.name.lstrip("./"): m for m in self.tar.getmembers() if m.isfile()}
        elif root.is_dir():
            self.members = {str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file()}
        else:
            raise DataError(f"seg.root={str(root)!r} does not exist; give chaos_t2_png.tar or the folder it "
                            f"unpacks to (images/, labels/, index.csv)")
        # accept one wrapping folder (chaos_t2/images/...)
        if "index.csv" not in self.members:
            nested = [k for k in self.members if k.endswith("/index.csv")]
            if len(nested) == 1:
                prefix = nested[0][: -len("index.csv")]
                self.members = {k[len(prefix):]: v for k, v in self.members.items() if k.startswith(prefix)}

    def read(self, name: str) -> bytes:
        if name not in self.members:
            raise DataError(f"{self.root}: {name} is missing")
        member = self.members[name]
        if self.tar is not None:
            return self.tar.extractfile(member).read()
        return Path(member).read_bytes()

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def read_chaos_t2(root: str | Path, size: int = 256) -> Volumes:
    """The staged CHAOS-T2 slices (``chaos_t2_png.tar`` or its folder) as :class:`Volumes`.

    ``index.csv`` lists every slice (``file, volume_id, slice_index, label_values_present``);
    a volume's slice indices must be ``0..n-1`` with no gap or repeat, each image PNG must have
    its label PNG of the same shape, label ids must be organs of :data:`CHAOS_ORGANS`, and the
    labels present must match the index.

    Example:
        >>> vols = read_chaos_t2("../shared/data/chaos-t2/chaos_t2_png.tar", size=128)
        >>> len(vols), vols.images.shape  # 20 volumes, uint8 [718, 128, 128]
    """
    from PIL import Image

    files = _Files(Path(root))
    try:
        rows = list(csv.DictReader(io.StringIO(files.read("index.csv").decode())))
        by_volume: dict[str, list[tuple[int, str, str]]] = {}
        for row in rows:
            by_volume.setdefault(row["volume_id"], []).append(
                (int(row["slice_index"]), row["file"], row.get("label_values_present") or ""))
        volumes = []
        for vid in sorted(by_volume, key=lambda v: int(v) if v.isdigit() else v):
            entries = sorted(by_volume[vid])
            indices = [e[0] for e in entries]
            if indices != list(range(len(indices))):
                missing = sorted(set(range(max(indices) + 1)) - set(indices))
                raise DataError(f"{root}: volume {vid}: slice indices are not 0..{len(indices) - 1} "
                                f"(missing {missing[:10]}, repeated "
                                f"{sorted({i for i in indices if indices.count(i) > 1})[:10]})")
            images, labels = [], []
            for z, fname, present in entries:
                img = np.asarray(Image.open(io.BytesIO(files.read(f"images/{fname}"))).convert("L"))
                lab = np.asarray(Image.open(io.BytesIO(files.read(f"labels/{fname}"))))
                if lab.ndim != 2 or img.shape != lab.shape:
                    raise DataError(f"{root}: {fname}: image shape {img.shape} and label shape {lab.shape} differ")
                listed = sorted(int(v) for v in present.split()) if present.strip() else []
                found = sorted(int(v) for v in np.unique(lab) if v != 0)
                if listed != found:
                    raise DataError(f"{root}: {fname}: index.csv lists labels {listed}, the label PNG holds {found}")
                images.append(torch.from_numpy(img.copy()))
                labels.append(torch.from_numpy(lab.astype(np.int64)))
            volumes.append((vid, torch.stack(images).float() / 255, torch.stack(labels)))
    finally:
        files.close()
    return stack_volumes(volumes, CHAOS_ORGANS, size, "chaos_t2")


# -- NIfTI volumes, as the challenges distribute them ----------------------------------------------
_LAST_INT = re.compile(r"(\d+)(?!.*\d)")


def normalise_intensity(volume: np.ndarray, modality: str) -> np.ndarray:
    """Intensities to [0, 1]: ``ct``: ``(HU + 1024) / 4096`` clipped (PNODE, R-PNODE); ``mri``:
    clipped to the 0.5 and 99.5 percentiles, then min-max rescaled (SSL-ALPNet's MRI clipping,
    without its per-volume z-score, which has no fixed range)."""
    volume = volume.astype(np.float32)
    if modality == "ct":
        return np.clip((volume + 1024.0) / 4096.0, 0.0, 1.0)
    if modality == "mri":
        lo, hi = np.percentile(volume, [0.5, 99.5])
        return np.clip((volume - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    raise DataError(f"seg.modality={modality!r}; choose ct or mri")


def read_nifti(root: str | Path, organs: dict[int, str], size: int = 256, modality: str = "ct",
               label_map: dict[int, int] | None = None) -> Volumes:
    """Image and label NIfTI volumes under ``root/images`` and ``root/labels``, paired by the last
    integer of their file names (``img0001.nii.gz`` with ``label0001.nii.gz``), as :class:`Volumes`.

    ``label_map`` maps the file's label ids to organ ids of ``organs`` (ids it does not list
    become background, e.g. BCV's organs outside the study); without it the ids must already be
    organs of ``organs``. Axial slices run along the array's last axis.

    Example:
        >>> vols = read_nifti("BCV/", {1: "spleen", 6: "liver"}, modality="ct",
        ...                   label_map={1: 1, 6: 6, 2: 0, 3: 0})
    """
    try:
        import nibabel as nib
    except ImportError:
        raise DataError("seg.dataset=nifti needs nibabel: pip install 'metarobust[seg]'") from None

    root = Path(root)

    def by_id(folder: Path) -> dict[str, Path]:
        if not folder.is_dir():
            raise DataError(f"seg.root: {folder} is not a folder; NIfTI volumes go in images/ and labels/")
        out = {}
        for path in sorted(folder.iterdir()):
            if path.name.endswith((".nii", ".nii.gz")):
                match = _LAST_INT.search(path.name.split(".nii")[0])
                if match is None:
                    raise DataError(f"{path}: no volume number in the file name")
                out[str(int(match.group(1)))] = path
        return out

    images, labels = by_id(root / "images"), by_id(root / "labels")
    if set(images) != set(labels):
        raise DataError(f"{root}: volumes without a partner: images only {sorted(set(images) - set(labels))}, "
                        f"labels only {sorted(set(labels) - set(images))}")
    volumes = []
    for vid in sorted(images, key=int):
        img = np.asarray(nib.load(str(images[vid])).dataobj)
        lab = np.asarray(nib.load(str(labels[vid])).dataobj)
        if img.ndim != 3 or img.shape != lab.shape:
            raise DataError(f"{images[vid].name}: image shape {img.shape} and label {labels[vid].name} "
                            f"shape {lab.shape} differ (both must be 3-D, the same grid)")
        lab = np.rint(lab).astype(np.int64)
        if label_map is not None:
            mapped = np.zeros_like(lab)
            for source, target in label_map.items():
                mapped[lab == source] = target
            unknown = sorted(set(np.unique(lab).tolist()) - set(label_map) - {0})
            if unknown:
                raise DataError(f"{labels[vid].name}: label ids {unknown} are not in the label map {label_map}")
            lab = mapped
        img = normalise_intensity(img, modality)
        # [X, Y, Z] -> [Z, Y, X]: axial slices first, rows then columns
        volumes.append((vid, torch.from_numpy(np.ascontiguousarray(img.transpose(2, 1, 0))),
                        torch.from_numpy(np.ascontiguousarray(lab.transpose(2, 1, 0)))))
    return stack_volumes(volumes, organs, size, f"nifti:{root.name}")


# -- the embedded default ----------------------------------------------------------------------------
def synthetic_volumes(count: int = 12, size: int = 64, depth: int = 24, seed: int = 0) -> Volumes:
    """``count`` generated abdominal-like volumes with the CHAOS organ ids (no files, no download).

    Each volume is ``depth`` slices of ``size x size``: a body ellipse of soft-tissue texture
    containing four ellipsoidal "organs" whose position, radii, axial extent, brightness and
    texture vary per volume: a large liver (1) on the image's left, two small kidneys (2, 3) and
    a spleen (4) on the right. Organs differ from their surroundings in mean intensity and in
    texture, so a segmenter must use both.

    What it is: a stand-in with the label layout, axial structure and per-volume variation of
    the real set, for tests and quick runs on any CPU. What it is not: anatomy; its Dice figures
    say nothing about MRI or CT.
    """
    gen = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    z, y, x = torch.meshgrid(torch.linspace(-1, 1, depth), torch.linspace(-1, 1, size),
                             torch.linspace(-1, 1, size), indexing="ij")
    volumes = []
    for v in range(count):
        body = ((x / u(0.85, 0.95)) ** 2 + (y / u(0.65, 0.8)) ** 2) <= 1
        noise = torch.randn(depth, 1, size, size, generator=gen)
        smooth = F.avg_pool2d(noise, 5, 1, 2)[:, 0]
        image = torch.where(body, 0.35 + u(-0.05, 0.05) + 0.15 * smooth, torch.zeros(()))
        label = torch.zeros(depth, size, size, dtype=torch.int64)
        # (organ, centre x, centre y, centre z, radii, brightness, texture frequency)
        organs = [
            (1, u(-0.45, -0.3), u(-0.2, 0.05), u(-0.1, 0.1), (u(0.3, 0.4), u(0.3, 0.4), u(0.5, 0.7)), u(0.5, 0.6), 9.0),
            (2, u(0.05, 0.15), u(0.3, 0.4), u(0.1, 0.3), (u(0.1, 0.14), u(0.12, 0.16), u(0.25, 0.35)), u(0.7, 0.8), 20.0),
            (3, u(0.45, 0.55), u(0.3, 0.4), u(0.1, 0.3), (u(0.1, 0.14), u(0.12, 0.16), u(0.25, 0.35)), u(0.7, 0.8), 20.0),
            (4, u(0.45, 0.6), u(-0.25, -0.1), u(-0.2, 0.0), (u(0.14, 0.2), u(0.15, 0.22), u(0.3, 0.4)), u(0.2, 0.28), 14.0),
        ]
        for organ, cx, cy, cz, (rx, ry, rz), bright, freq in organs:
            inside = (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2) <= 1
            phase = u(0, 6.28)
            texture = 0.06 * torch.sin(freq * (x + y) + phase) * torch.cos(freq * (x - y))
            image = torch.where(inside, bright + texture + 0.05 * smooth, image)
            label = torch.where(inside, torch.full_like(label, organ), label)
        image = (image * u(0.85, 1.15) + 0.02 * torch.randn(image.shape, generator=gen)).clamp(0, 1)
        volumes.append((str(v + 1), image, label))
    return stack_volumes(volumes, CHAOS_ORGANS, size, "synthetic_organs")


__all__ = ["CHAOS_ORGANS", "KIDNEYS", "Volumes", "normalise_intensity", "read_chaos_t2", "read_nifti",
           "resize_volume", "stack_volumes", "synthetic_volumes"]
