"""Distributed standard training on the CPU with the gloo backend: two processes shard every
global batch, end with identical parameters, and take the same first step as one process with
the whole batch; ``torchrun ... metarobust.cli train`` writes one run folder from rank 0.
Distributed meta-training: two processes, each with half of every meta-batch's tasks, draw the
one process's episodes and attack noise and reach its weights up to float32 round-off."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metarobust.config import DataConfig
from metarobust.data.datasets import load_split
from metarobust.data.sampler import BatchSampler
from metarobust.data.store import ImageStore
from metarobust.distributed import DistInfo
from metarobust.experiment import load_config
from metarobust.training.data import TrainingData, load_training_data, take
from metarobust.training.engine import Trainer
from metarobust.training.recipes import build_recipe

REPO = Path(__file__).resolve().parents[1]
BASE = ["data.dataset=mnist", "data.image_size=16", "model.name=small_cnn", "model.hidden=8", "model.drop_rate=0",
        "at.batch_size=32", "optim.schedule=constant", "optim.lr=0.1", "device=cpu", "train_attack.eps=0.1",
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


# --- meta-training: tasks of every meta-batch split across two gloo processes -----------------

# R-MAML (second order, adversarial CE on FGSM-RS queries, so the ranks' attack noise matters) on
# the embedded glyphs with a tiny Conv-4. Two settings keep the comparison below a float32 one:
# - model.batch_norm=none: with per-task BatchNorm after each conv, the convs' biases have a meta-
#   gradient that is zero in exact arithmetic, so in float32 it is round-off (1e-10..1e-5), and
#   Adam, which normalises every coordinate, turns round-off into steps of up to its lr: those
#   biases are not determined by the maths, and drift ~1e-3 apart between any two summation orders.
# - robust.form=ce: the TRADES KL's attack starts where the KL is ~0, and FGSM takes the sign of
#   its near-zero input gradient; a perturbation of 1e-7 (relative) of the first meta-gradient
#   moved the final TRADES weights by 2e-7 in 2 of 6 trials (a flipped sign), 1.5e-8 at most with CE.
META_TINY = ["recipe=r_maml", "model.hidden=8", "model.batch_norm=none", "meta.queries=2",
             "meta.inner_steps=1", "meta.first_order=false", "meta.execution=loop", "robust.form=ce",
             "train.iterations=3", "train.log_every=1", "device=cpu"]
META_TASKS = 4  # the global meta-batch: 4 tasks in one process, 2 per rank in two


def meta_config(tasks_per_rank: int):
    overrides = [*META_TINY, f"meta.meta_batch_size={tasks_per_rank}"]
    return load_config(REPO / "configs" / "quickstart.yaml", overrides)


def _meta_worker(rank: int, world: int, port: int, out: str, data: TrainingData) -> None:
    """One rank of ``world`` (1: the one-process reference, no process group) meta-trains on its
    share of the meta-batch and saves its weights, episodes and attack noise at every step."""
    torch.set_num_threads(1)  # the same kernels, hence the same per-task gradients, in every process
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = Trainer(meta_config(META_TASKS // world), data=data, progress=False,
                          dist=DistInfo(rank, world, rank, torch.device("cpu")))
        before = params_of(trainer)
        episodes, noises = [], []
        sample, draw = trainer.sampler.sample, trainer.recipe.draw_noise

        def spy_sample():
            batch = sample()
            episodes.append((batch.support_index.clone(), batch.query_index.clone()))
            return batch

        def spy_draw(batch, generator, rank=0, world_size=1):
            noise = draw(batch, generator, rank, world_size)
            noises.append({k: v.clone() for k, v in (noise or {}).items()})
            return noise

        trainer.sampler.sample, trainer.recipe.draw_noise = spy_sample, spy_draw
        # The first meta-update's gradient as the optimizer sees it (averaged over the ranks), and
        # sum_t |g_t| / T over the tasks this process accumulated (each backward adds one task's).
        named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
        first_grad, task_abs, seen = {}, {n: torch.zeros_like(p) for n, p in named}, {}

        def accumulated(name):
            def hook(p):
                if not first_grad:  # first step only
                    task_abs[name] += (p.grad - seen.get(name, 0)).abs()
                    seen[name] = p.grad.detach().clone()
            return hook

        hooks = [p.register_post_accumulate_grad_hook(accumulated(n)) for n, p in named]
        step = trainer.optimizer.step

        def spy_step(*args, **kwargs):
            if not first_grad:
                first_grad.update({n: p.grad.detach().clone() for n, p in named})
            return step(*args, **kwargs)

        trainer.optimizer.step = spy_step
        trainer.fit()
        for hook in hooks:
            hook.remove()
        torch.save({"before": before, "after": params_of(trainer), "steps": trainer.step_count,
                    "trained": [n for n, _ in named], "first_grad": first_grad, "task_abs": task_abs,
                    "optimizer": type(trainer.optimizer).__name__,
                    "lr": trainer.optimizer.param_groups[0]["lr"],
                    "episodes": episodes, "noises": noises}, Path(out) / f"meta_w{world}_r{rank}.pt")
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run_ranks(world: int, out: Path, data: TrainingData, timeout: float = 180.0) -> list[dict]:
    """``_meta_worker`` in ``world`` forked processes (fork, not spawn: a spawned child spends
    ~10 s re-importing torch and metarobust on a busy 2-core machine; each child sets one thread,
    as DataLoader workers do). A hung process group fails the test instead of blocking it."""
    ctx = mp.start_processes(_meta_worker, args=(world, free_port(), str(out), data), nprocs=world,
                             join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.terminate()
            pytest.fail(f"{world} meta-training process(es) still running after {timeout:.0f} s")
    return [torch.load(out / f"meta_w{world}_r{r}.pt", weights_only=True) for r in range(world)]


def test_two_gloo_processes_meta_train_like_one_process_with_the_whole_meta_batch(tmp_path):
    cfg = meta_config(META_TASKS)
    data = load_training_data(cfg, build_recipe(cfg), torch.device("cpu"), with_test=False)
    ranks = _run_ranks(2, tmp_path, data)
    (single,) = _run_ranks(1, tmp_path, data)
    iterations, eps, lr = cfg.train.iterations, torch.finfo(torch.float32).eps, single["lr"]
    assert ranks[0]["steps"] == ranks[1]["steps"] == single["steps"] == iterations
    assert single["optimizer"] == "Adam" and lr == ranks[0]["lr"]  # the meta-optimizer the bounds assume
    # The ranks together drew exactly the one process's episodes and attack noise, step by step
    # (rank r holding tasks 2r, 2r + 1 of the global meta-batch).
    for step in range(iterations):
        for part in range(2):  # support, query image indices
            together = torch.cat([r["episodes"][step][part] for r in ranks])
            assert torch.equal(together, single["episodes"][step][part]), (step, part)
        assert single["noises"][step].keys() == {"query"}
        for key, whole in single["noises"][step].items():
            assert torch.equal(torch.cat([r["noises"][step][key] for r in ranks]), whole), (step, key)
    # The all-reduce hands every rank the same bytes, and Adam is deterministic: identical weights.
    for k, v in ranks[0]["after"].items():
        assert torch.equal(v, ranks[1]["after"][k]), k
    # Tolerances from float32 arithmetic (eps = 2^-23, unit round-off u = eps / 2), T = 4 tasks.
    # First meta-gradient: same episodes and noise (asserted above) and the same seeded weights,
    # so each task's meta-gradient g_t is the same float32 tensor in both runs (same shapes and
    # kernels, one thread). The loop scales it by 1 / (tasks in the process), the all-reduce
    # divides by world_size: powers of two, exact. Only the order of summing the T terms differs,
    # ((g0 + g1) + g2) + g3 in one process, (g0 + g1) + (g2 + g3) across two, and a float sum of
    # T terms is within (T - 1) u sum_t |g_t / T| of the exact one (Higham, Accuracy and Stability
    # of Numerical Algorithms, sec. 4.2): the two differ by at most (T - 1) eps sum_t |g_t / T| in
    # each coordinate. Summing over the ranks instead of averaging (2x) fails here only: the
    # weights below would not show it, Adam's step does not depend on the gradient's scale.
    scale = single["task_abs"]  # sum_t |g_t / T|, accumulated task by task in the one process
    for k, g in single["first_grad"].items():
        gap = (ranks[0]["first_grad"][k] - g).abs()
        assert torch.all(gap <= (META_TASKS - 1) * eps * scale[k]), (k, gap.max().item())
    # Weights after K = 3 Adam steps, |a - b| <= atol + rtol |b|:
    # - atol: Adam's step lr m_hat / (sqrt(v_hat) + 1e-8) is invariant to the gradient's scale: a
    #   relative change rho of a coordinate's gradients changes m_hat and sqrt(v_hat) by rho each,
    #   so the step by at most 2 rho times its size, at most lr (Cauchy-Schwarz: |m_hat| <= sqrt(v_hat)
    #   sqrt(sum_i a_i^2 / b_i), a and b the bias-corrected averaging weights, nearly uniform
    #   over the first steps: <= 1.004 for K <= 3). With rho = (T - 1) eps from the summation,
    #   K steps differ by at most K 2 (T - 1) eps lr. This takes sum_t |g_t| ~ |sum_t g_t|; a
    #   coordinate where the tasks cancel has a larger rho, but Adam's first step there is
    #   lr sign(g) whatever rho, and the weights then differ by ulps only, which move the next
    #   gradients by a relative amount of that order times the curvature (smooth here: see the
    #   choice of norm and robust form above).
    # - rtol: each step rounds theta - step to float32, and steps a hair apart may land on
    #   neighbouring floats: one ulp (<= eps |theta|) per step, K eps.
    atol = 2 * (META_TASKS - 1) * eps * iterations * lr  # 2.1e-9 at lr 1e-3 (measured need: < 1e-10)
    rtol = iterations * eps  # 3.6e-7
    for k, v in single["after"].items():
        assert torch.allclose(ranks[0]["after"][k], v, rtol=rtol, atol=atol), \
            (k, (ranks[0]["after"][k] - v).abs().max().item())
    # ... and it trained: Adam moves every weight by up to lr per step, every tensor by far more
    # than the tolerance (the comparison could fail).
    for k in single["trained"]:
        assert (single["after"][k] - single["before"][k]).abs().max() > lr, k
