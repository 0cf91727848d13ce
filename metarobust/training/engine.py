"""The engine: sampler -> learner.adapt -> objective(attack) -> step, for every recipe.

    for step in range(start, iterations):
        batch = sampler.sample()                       # EpisodeBatch on the device
        loss, stats = meta_backward(task_fn, params, batch, noise, execution)
        optimizer.step()

Metrics are accumulated on the device and synchronised with the host only every
``train.log_every`` steps. Every ``train.checkpoint_every`` steps the state (model, optimizer,
sampler and attack generators, step) is written atomically; ``resume=True`` continues from it
and reaches the same parameters as an uninterrupted run. A non-finite loss stops training with
:class:`TrainingDiverged` and leaves the last good checkpoint untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from metarobust.attacks import build_attack
from metarobust.config import ExperimentConfig, to_dict
from metarobust.data.datasets import load_split
from metarobust.data.sampler import EpisodicSampler, check_episode_shape
from metarobust.data.store import ImageStore
from metarobust.errors import TrainingDiverged
from metarobust.meta.execution import meta_backward, resolve_execution
from metarobust.meta.functional import functional_forward, params_of
from metarobust.meta.maml import MAML
from metarobust.models import build_model
from metarobust.runs import RunDir
from metarobust.training.recipes import build_task_fn, uses_attack

Callback = Callable[[int, dict[str, float]], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Stores:
    train: ImageStore
    test: ImageStore


def load_stores(cfg: ExperimentConfig, device: torch.device) -> Stores:
    """Train and test splits on ``device``; checks both can serve the configured episodes."""
    train = load_split(cfg.data, "train").to(device)
    test = load_split(cfg.data, "test").to(device)
    m = cfg.meta
    check_episode_shape(train, m.ways, m.train_shots, m.queries, "meta")
    check_episode_shape(test, m.ways, m.test_shots, m.queries, "meta")
    return Stores(train, test)


class Trainer:
    """Meta-trains ``cfg.recipe`` on the train split of ``cfg.data``.

    Args:
        cfg: a validated :class:`ExperimentConfig`.
        run: the run folder (``None``: no files, for tests and benchmarks).
        resume: continue from the run's last checkpoint.
        stores: pre-loaded splits (else loaded from ``cfg.data``).
        callbacks: ``f(step, metrics)`` called after each logged step.
        progress: show a progress bar.
    """

    def __init__(self, cfg: ExperimentConfig, run: RunDir | None = None, resume: bool = False,
                 stores: Stores | None = None, callbacks: tuple[Callback, ...] = (),
                 progress: bool = True) -> None:
        self.cfg, self.run, self.callbacks, self.progress = cfg, run, callbacks, progress
        self.device = resolve_device(cfg.device)
        self.stores = stores or load_stores(cfg, self.device)
        m = cfg.meta
        train = self.stores.train
        self.sampler = EpisodicSampler(train, m.ways, m.train_shots, m.queries, m.meta_batch_size,
                                       seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, train.image_shape[0], m.ways, train.image_shape[-1]).to(self.device)
        self.params = params_of(self.model)
        self.optimizer = torch.optim.Adam(self.params.values(), lr=m.meta_lr)
        self.learner = MAML(functional_forward(self.model), m.inner_lr, m.inner_steps, m.first_order)
        self.attack = build_attack(cfg.train_attack)
        self.task_fn = build_task_fn(cfg, self.learner, self.attack)
        self.execution = resolve_execution(m.execution, self.device)
        self.noise_generator = torch.Generator(device=self.device)
        self.noise_generator.manual_seed(cfg.seed + 1)
        self.step_count = 0
        if resume:
            assert run is not None, "resume needs a run folder"
            self._restore(run.load_checkpoint("cpu"))
            run.truncate_metrics(self.step_count)

    # -- one meta-update ------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.model.train()
        batch = self.sampler.sample()
        noise = None
        if uses_attack(self.cfg.recipe):
            noise = self.attack.init_noise(batch.query_x, self.noise_generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats = meta_backward(self.task_fn, self.params, batch, noise, self.execution)
        self.optimizer.step()
        self.step_count += 1
        return loss, stats

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> torch.nn.Module:
        t = self.cfg.train
        sums: dict[str, torch.Tensor] = {}
        count = 0
        bar = tqdm(total=t.iterations, initial=self.step_count, disable=not self.progress,
                   desc=f"{self.cfg.recipe}", dynamic_ncols=True)
        while self.step_count < t.iterations:
            loss, stats = self.train_step()
            for k, v in {"loss": loss, **stats}.items():
                sums[k] = v if k not in sums else sums[k] + v
            count += 1
            bar.update(1)
            step = self.step_count
            if step % t.log_every == 0 or step == t.iterations:
                metrics = {k: float(v) / count for k, v in sums.items()}  # the only host sync
                sums, count = {}, 0
                if not math.isfinite(metrics["loss"]):
                    bar.close()
                    raise TrainingDiverged(
                        f"loss is {metrics['loss']} at step {step}; training stopped. The last good "
                        f"checkpoint is kept"
                        + (f" at {self.run.checkpoint_path}" if self.run else "")
                        + "; lower meta.meta_lr or meta.inner_lr and --resume"
                    )
                bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items()})
                if self.run is not None:
                    self.run.log(step, metrics)
                for callback in self.callbacks:
                    callback(step, metrics)
            if self.run is not None and (step % t.checkpoint_every == 0 or step == t.iterations):
                self.save()
        bar.close()
        return self.model

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step_count,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "noise_generator": self.noise_generator.get_state(),
            "config": to_dict(self.cfg),
        }

    def save(self) -> None:
        """Write the checkpoint, unless a parameter went non-finite (the last good one stays)."""
        assert self.run is not None
        finite = torch.stack([p.isfinite().all() for p in self.params.values()]).all()
        if not bool(finite):
            raise TrainingDiverged(
                f"non-finite parameters at step {self.step_count}; the last good checkpoint at "
                f"{self.run.checkpoint_path} is kept; lower meta.meta_lr or meta.inner_lr and --resume"
            )
        self.run.save_checkpoint(self.state_dict())

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.noise_generator.set_state(state["noise_generator"])
        self.step_count = int(state["step"])
