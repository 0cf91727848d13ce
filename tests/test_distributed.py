"""Distributed standard training on the CPU with the gloo backend: two processes shard every
global batch, end with identical parameters, and take the same first step as one process with
the whole batch; ``torchrun ... metarobust.cli train`` writes one run folder from rank 0."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metarobust.config import DataConfig, load_config
from metarobust.data.datasets import load_split
from metarobust.data.sampler import BatchSampler
from metarobust.data.store import ImageStore
from metarobust.distributed import DistInfo
from metarobust.training.data import TrainingData, take
from metarobust.training.engine import Trainer

REPO = Path(__file__).resolve().parents[1]
BASE = ["data.dataset=mnist", "data.image_size=16", "model.name=small_cnn", "model.hidden=8", "model.drop_rate=0",
        "at.batch_size=32", "at.schedule=constant", "at.lr=0.1", "device=cpu", "train_attack.eps=0.1",
        "train_attack.steps=2", "train_attack.step_size=0.05", "train.log_every=2"]


@pytest.fixture(scope="module")
def mnist_root(shared_data):
    root = shared_data / "mnist"
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST idx files not found in {root}")
    return str(root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mnist_store(root: str, count: int) -> ImageStore:
    train = load_split(DataConfig(dataset="mnist", root=root, image_size=16), "train")
    return take(train, torch.arange(count), "mnist/train")


def first(store: ImageStore, count: int) -> TrainingData:
    return TrainingData(take(store, torch.arange(count), store.name), None, None)


def params_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: a natural step on 64 images (32 per rank), then 4 TRADES steps on 256."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        info = DistInfo(rank, world, rank, torch.device("cpu"))
        saved = torch.load(Path(out) / "images.pt", weights_only=True)
        store = ImageStore(saved["images"], saved["labels"], saved["class_names"], "mnist/train")
        natural = Trainer(load_config(None, [*BASE, "recipe=natural", "at.epochs=1"]),
                                  data=first(store, 64), progress=False, dist=info)
        natural.fit()
        trades = Trainer(load_config(None, [*BASE, "recipe=trades", "at.epochs=1"]),
                                 data=first(store, 256), progress=False, dist=info)
        seen = []
        sample = trades.sampler.sample

        def spy():
            episode = sample()
            seen.append(episode.query_index[0].clone())
            return episode

        trades.sampler.sample = spy
        trades.fit()
        torch.save({"natural": params_of(natural), "trades": params_of(trades), "seen": seen,
                    "steps": trades.step_count}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_batch_sampler_shards_every_global_batch_across_ranks(mnist_root):
    store = mnist_store(mnist_root, 100)
    single = BatchSampler(store, 20, seed=3)
    shards = [BatchSampler(store, 10, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(12):  # past an epoch boundary (5 global batches of 20 per pass)
        whole = single.sample().query_index[0]
        parts = [s.sample().query_index[0] for s in shards]
        assert torch.equal(torch.cat(parts), whole)
        assert not set(parts[0].tolist()) & set(parts[1].tolist())


def test_two_gloo_processes_match_each_other_and_one_process_with_the_full_batch(mnist_root, tmp_path):
    store = mnist_store(mnist_root, 256)  # read once here; the ranks load this file
    torch.save({"images": store.images, "labels": store.labels, "class_names": store.class_names},
               tmp_path / "images.pt")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # DDP keeps the ranks identical, through TRADES' two forwards per step and eval-mode attacks.
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4  # 256 images / (2 x 32)
    for k, v in ranks[0]["trades"].items():
        assert torch.equal(v, ranks[1]["trades"][k]), k
    # Each step the two ranks trained on disjoint images.
    for a, b in zip(ranks[0]["seen"], ranks[1]["seen"]):
        assert not set(a.tolist()) & set(b.tolist())
    # One process with the global batch (64) takes the same first SGD step: the mean of the two
    # ranks' gradients is the full-batch gradient.
    single = Trainer(load_config(None, [*BASE, "recipe=natural", "at.epochs=1", "at.batch_size=64"]),
                             data=first(store, 64), progress=False)
    before = params_of(single)
    single.fit()
    for k, v in params_of(single).items():
        assert torch.allclose(v, ranks[0]["natural"][k], atol=1e-6), k
    assert any(not torch.equal(before[k], v) for k, v in params_of(single).items())  # it did move


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_cli_trains_with_two_processes_and_rank_zero_writes_the_run(mnist_root, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "metarobust.cli", "train",
           "configs/at/mnist_pgd_at.yaml", *BASE, f"data.root={mnist_root}", f"out_dir={tmp_path}", "name=ddp",
           "at.train_size=256", "at.epochs=1", "eval.points=64", "eval.checks=false", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["points"] == 64  # only rank 0 reports
    metrics = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4]  # 256 / (2 x 32) = 4 steps, logged once each
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 4 and len(state["generators"]) == 2  # both ranks' attack noise saved
