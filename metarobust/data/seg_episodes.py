"""Few-shot segmentation episodes: 1-way K-shot batches with masks, drawn on the device.

The protocol is PNODE's (Pandey et al., MICCAI 2022; ``shared/methods/META.md`` 4.1):

- **Subjects** are split into train / val / test volumes (33 % test, then 25 % of the rest
  validation; ``sklearn.model_selection.train_test_split`` with ``random_state=0``, as the
  reference), frozen in ``episodes/<dataset>/seg_split.json``.
- **Setting 2**: the training organs exclude the test organ, and both kidneys when one kidney is
  the test organ, so the test organ is never a training foreground. (Its pixels may still appear
  as background in training slices of other organs, as in the reference.)
- **Training episode** (:class:`SegEpisodeSampler`): a random training organ, K + 1 distinct
  training volumes containing it, a random query slice among the query volume's organ slices,
  and for each support volume the slice at the same relative depth,
  ``s = round((n_s - 1) q / (n_q - 1))``; with p = 0.5 every volume's slice order is reversed;
  a joint random rot90 and independent horizontal and vertical flips (p = 0.5) apply to the
  whole episode.
- **Test episodes** (:func:`evaluation_episodes`): for each test volume, every slice containing the
  organ is a query, paired with the aligned slice of each of the first K training volumes that
  contain the organ. Frozen in ``episodes/<dataset>/seg_<organ>_<K>shot.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from metarobust.data.seg_volumes import KIDNEYS, Volumes
from metarobust.errors import DataError
from metarobust.resources import episodes_dir

EPISODES_DIR = episodes_dir()  # the shipped, frozen split and test episodes


@dataclass
class SegEpisodeBatch:
    """``T`` 1-way segmentation episodes (the segmentation twin of
    :class:`~metarobust.data.episode.EpisodeBatch`).

    Attributes:
        support_x: ``float [T, K, 1, H, W]`` in [0, 1].
        support_mask: ``int64 [T, K, H, W]``, 1 on the organ.
        query_x: ``float [T, Q, 1, H, W]``.
        query_mask: ``int64 [T, Q, H, W]``.
        organ: ``int64 [T]``, the episode's organ id.
        support_index, query_index: ``int64 [T, K]`` / ``[T, Q]``, slice positions in the
            :class:`Volumes` stack (before augmentation).
    """

    support_x: torch.Tensor
    support_mask: torch.Tensor
    query_x: torch.Tensor
    query_mask: torch.Tensor
    organ: torch.Tensor
    support_index: torch.Tensor
    query_index: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.query_x.shape[0]

    def __len__(self) -> int:
        return self.num_tasks

    def to(self, device: torch.device | str) -> SegEpisodeBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def training_organs(organs: dict[int, str], test_organ: str) -> list[int]:
    """Setting 2: every organ id but the test organ's (and both kidneys' when it is a kidney)."""
    if test_organ not in organs.values():
        raise DataError(f"seg.organ={test_organ!r}; choose one of {sorted(organs.values())}")
    removed = set(KIDNEYS) if test_organ in KIDNEYS else {test_organ}
    return sorted(k for k, v in organs.items() if v not in removed)


def aligned_slice(q: torch.Tensor, n_q: torch.Tensor, n_s: torch.Tensor) -> torch.Tensor:
    """The support slice at the query's relative depth: ``round((n_s - 1) q / (n_q - 1))``
    (0 when the query volume has one slice); any broadcastable int64 tensors."""
    ratio = q.double() / (n_q - 1).clamp(min=1).double()
    return torch.round((n_s - 1).double() * ratio).long()


def augment(support_x, support_mask, query_x, query_mask, generator):
    """A joint random rot90 (k in 0..3) and independent horizontal and vertical flips (p = 0.5)
    per episode, the same for its support and query images and masks (square images)."""
    t = support_x.shape[0]
    device = support_x.device
    k = torch.randint(0, 4, (t,), generator=generator, device=device)
    flips = torch.rand(t, 2, generator=generator, device=device) < 0.5

    def apply(x: torch.Tensor) -> torch.Tensor:
        view = (t,) + (1,) * (x.dim() - 1)
        out = x
        for r in range(1, 4):  # the four rotations, selected per task
            out = torch.where((k == r).view(view), torch.rot90(x, r, dims=(-2, -1)), out)
        out = torch.where(flips[:, 0].view(view), out.flip(-1), out)
        return torch.where(flips[:, 1].view(view), out.flip(-2), out)

    return apply(support_x), apply(support_mask), apply(query_x), apply(query_mask)


class SegEpisodeSampler:
    """1-way ``shots``-shot training episodes (one query slice each) on ``volumes``' device.

    Args:
        volumes: the training volumes.
        organs: the organ ids to draw from (:func:`training_organs`).
        shots: K support volumes per episode.
        tasks: T episodes per batch (the reference: 5).
        seed: seeds the sampler's own generator (its state is checkpointed).
        augment: the joint rot90/flip augmentation.
        reverse: reverse the slice order with p = 0.5.

    Example:
        >>> sampler = SegEpisodeSampler(vols, training_organs(vols.organs, "liver"), shots=1, tasks=5)
        >>> batch = sampler.sample()  # SegEpisodeBatch, support_x [5, 1, 1, H, W]
    """

    batch_type = SegEpisodeBatch

    def __init__(self, volumes: Volumes, organs: list[int], shots: int, tasks: int, seed: int = 0,
                 augment: bool = True, reverse: bool = True) -> None:
        if shots < 1 or tasks < 1:
            raise DataError(f"seg.shots={shots} and tasks={tasks} must be >= 1")
        self.volumes, self.organs, self.shots, self.tasks = volumes, list(organs), shots, tasks
        self.augment, self.reverse = augment, reverse
        device = volumes.device
        lists = [[volumes.organ_slices(v, o) for v in range(len(volumes))] for o in organs]
        longest = max(len(s) for row in lists for s in row)
        self.counts = torch.tensor([[len(s) for s in row] for row in lists], device=device)  # [O, V]
        self.table = torch.zeros(len(organs), len(volumes), max(longest, 1), dtype=torch.long, device=device)
        for i, row in enumerate(lists):
            for v, s in enumerate(row):
                self.table[i, v, :len(s)] = s
        have = (self.counts > 0).sum(dim=1)
        for i, o in enumerate(organs):
            if int(have[i]) < shots + 1:
                raise DataError(f"{volumes.name}: organ {volumes.organs[o]!r} appears in {int(have[i])} training "
                                f"volumes; a {shots}-shot episode needs {shots + 1}")
        self.organ_ids = torch.tensor(organs, device=device)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self) -> SegEpisodeBatch:
        g, t, k = self.generator, self.tasks, self.shots
        device = self.counts.device
        which = torch.randint(0, len(self.organs), (t,), generator=g, device=device)
        counts = self.counts[which]                                            # [T, V]
        keys = torch.rand(counts.shape, generator=g, device=device).masked_fill(counts == 0, 2.0)
        vols = keys.argsort(dim=1)[:, :k + 1]                                  # query volume first
        n = counts.gather(1, vols)                                             # [T, K+1]
        q = (torch.rand(t, generator=g, device=device) * n[:, 0]).long().clamp(max=n[:, 0] - 1)
        s = aligned_slice(q[:, None], n[:, :1], n[:, 1:])                      # [T, K]
        pos = torch.cat([q[:, None], s], dim=1)
        if self.reverse:
            flip = torch.rand(t, generator=g, device=device) < 0.5
            pos = torch.where(flip[:, None], n - 1 - pos, pos)
        index = self.table[which[:, None], vols, pos]                          # [T, K+1] stack positions
        x = self.volumes.images[index].float().div(255).unsqueeze(2)           # [T, K+1, 1, H, W]
        mask = (self.volumes.labels[index] == self.organ_ids[which].view(t, 1, 1, 1)).long()
        sx, sm, qx, qm = x[:, 1:], mask[:, 1:], x[:, :1], mask[:, :1]
        if self.augment:
            sx, sm, qx, qm = augment(sx, sm, qx, qm, g)
        return SegEpisodeBatch(sx, sm, qx, qm, self.organ_ids[which], index[:, 1:], index[:, :1])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu() if self.counts.is_cuda else state["generator"])


# -- subject splits and frozen test episodes ----------------------------------------------------------
def split_volumes(ids: list[str], seed: int = 0) -> dict[str, list[str]]:
    """PNODE's subject split: 33 % test, then 25 % of the rest validation, the remainder training
    (``train_test_split(..., random_state=seed)`` twice, as the reference)."""
    from sklearn.model_selection import train_test_split

    rest, test = train_test_split(list(ids), test_size=0.33, random_state=seed)
    train, val = train_test_split(rest, test_size=0.25, random_state=seed)
    order = {v: i for i, v in enumerate(ids)}
    return {name: sorted(part, key=order.get) for name, part in (("train", train), ("val", val), ("test", test))}


def load_or_freeze_split(dataset: str, ids: list[str], directory: Path = EPISODES_DIR) -> dict[str, list[str]]:
    """The frozen split ``episodes/<dataset>/seg_split.json`` (written on first use); its ids must
    be volumes of ``ids``."""
    path = directory / dataset / "seg_split.json"
    if path.is_file():
        split = json.loads(path.read_text())
        unknown = sorted(set(sum(split.values(), [])) - set(ids))
        if unknown:
            raise DataError(f"{path}: volumes {unknown} are not in the data read ({ids})")
        return split
    split = split_volumes(ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split, indent=1) + "\n")
    return split


@dataclass
class EvalVolume:
    """One test volume's episodes: ``query`` ``int64 [n]`` (stack positions of its organ slices,
    in axial order) and ``support`` ``int64 [n, K]`` (the aligned support slices)."""

    id: str
    query: torch.Tensor
    support: torch.Tensor


def evaluation_episodes(train: Volumes, test: Volumes, organ: str, shots: int) -> tuple[list[str], list[EvalVolume]]:
    """``(support volume ids, per test volume episodes)``: every slice of each test volume that
    contains ``organ`` is a query, paired with the aligned slice of each of the first ``shots``
    training volumes that contain it (PNODE's test protocol)."""
    o = train.organ_id(organ)
    support_rows = [v for v in range(len(train)) if len(train.organ_slices(v, o))][:shots]
    if len(support_rows) < shots:
        raise DataError(f"{train.name}: organ {organ!r} appears in {len(support_rows)} training volumes; "
                        f"{shots} shots need {shots}")
    support_slices = [train.organ_slices(v, o) for v in support_rows]
    out = []
    for v in range(len(test)):
        query = test.organ_slices(v, o)
        if len(query) == 0:
            continue
        q = torch.arange(len(query), device=query.device)
        cols = [s[aligned_slice(q, torch.tensor(len(query)), torch.tensor(len(s)))] for s in support_slices]
        out.append(EvalVolume(test.ids[v], query, torch.stack(cols, dim=1)))
    return [train.ids[v] for v in support_rows], out


def manifest_path(dataset: str, organ: str, shots: int, directory: Path = EPISODES_DIR) -> Path:
    return directory / dataset / f"seg_{organ}_{shots}shot.json"


def episodes_record(dataset: str, organ: str, shots: int, train: Volumes, test: Volumes,
                    support_ids: list[str], volumes: list[EvalVolume]) -> dict:
    """The frozen form of :func:`evaluation_episodes`: slices by (volume id, axial index)."""
    def local(stack: Volumes, pos: torch.Tensor) -> list:
        starts = stack.starts.to(pos.device)
        row = torch.searchsorted(starts, pos.contiguous(), right=True) - 1  # a support column is strided
        return (pos - starts[row]).tolist()

    return {"dataset": dataset, "organ": organ, "shots": shots, "support_volumes": support_ids,
            "volumes": [{"id": tv.id, "query": local(test, tv.query),
                         "support": [local(train, tv.support[:, j]) for j in range(shots)]} for tv in volumes]}


def check_manifest(path: Path, record: dict) -> None:
    """Compare the episodes drawn now with the frozen ones at ``path`` (writing them if absent)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record) + "\n")
        return
    frozen = json.loads(path.read_text())
    if frozen != record:
        raise DataError(f"{path}: the frozen test episodes differ from those drawn from the data now (another "
                        f"copy of the dataset, image size-independent slices changed, or another split); "
                        f"delete the file to re-freeze it, knowingly")


__all__ = ["SegEpisodeBatch", "SegEpisodeSampler", "EvalVolume", "aligned_slice", "augment", "check_manifest",
           "episodes_record", "load_or_freeze_split", "manifest_path", "split_volumes", "evaluation_episodes",
           "training_organs"]
