"""The engine: sampler -> learner.adapt -> objective(attack) -> step, for every recipe.

    for step in range(start, total_steps):
        batch = sampler.sample()                       # EpisodeBatch on the device
        loss, stats = train_step(batch)                # meta: meta_backward over T tasks;
        optimizer.step()                               # standard: T=1, no support, no adaptation

:class:`BaseTrainer` owns what every kind of training shares: the loop and its progress bar,
metrics accumulated on the device and synchronised with the host only every
``train.log_every`` steps, the run folder (metrics.jsonl, TensorBoard), atomic checkpoints every
``train.checkpoint_every`` steps (model, optimizer, sampler and attack generators, step, and
whatever the subclass adds), exact resume (``resume=True`` reaches the same parameters as an
uninterrupted run), and the stop on a non-finite loss or parameter (:class:`TrainingDiverged`,
the last good checkpoint left untouched). :class:`Trainer` meta-trains episodic recipes;
:class:`metarobust.training.standard.trainer.StandardTrainer` trains plain classifiers on
single-task mini-batches (the degenerate episode) with the standard-AT recipes.
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
from metarobust.meta.functional import params_of
from metarobust.models import build_model
from metarobust.runs import RunDir
from metarobust.training.recipes import build_learner, build_task_fn, draw_noise

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


class BaseTrainer:
    """The shared loop: subclasses set ``self.total_steps`` and implement :meth:`train_step`,
    :meth:`state_dict`, :meth:`_restore` and :meth:`parameters`.

    Args:
        cfg: a validated :class:`ExperimentConfig` (``cfg.train.log_every``/``checkpoint_every``).
        run: the run folder (``None``: no files, for tests, benchmarks and non-zero ranks).
        callbacks: ``f(step, metrics)`` called after each logged step.
        progress: show a progress bar.
    """

    divergence_hint = "lower the learning rate and --resume"
    """Appended to the :class:`TrainingDiverged` message."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir | None, callbacks: tuple[Callback, ...],
                 progress: bool) -> None:
        self.cfg, self.run, self.callbacks, self.progress = cfg, run, callbacks, progress
        self.step_count = 0
        self.total_steps = cfg.train.iterations
        self.stopped: str | None = None
        """Why training ended early (set by :meth:`stop`); saved, so a resumed run stays stopped."""

    # -- to implement -----------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step (advances ``step_count``); returns the loss and 0-dim stats (no host sync)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def _restore(self, state: dict) -> None:
        raise NotImplementedError

    def parameters(self) -> list[torch.Tensor]:
        """The trained tensors checked for finiteness before each checkpoint."""
        raise NotImplementedError

    # -- hooks --------------------------------------------------------------------------------
    def end_of_step(self) -> dict[str, float] | None:
        """Called after each step's logging and before its checkpoint; may return metrics to log
        at once (standard training: epoch-end hooks)."""
        return None

    def reduce_metrics(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        """Window means as floats: the only host synchronisation of the loop."""
        return {k: float(v) / count for k, v in sums.items()}

    def should_checkpoint(self, step: int) -> bool:
        return step % self.cfg.train.checkpoint_every == 0 or step == self.total_steps

    def stop(self, reason: str) -> None:
        """End training after the current step; the reason is saved with the checkpoint."""
        self.stopped = reason

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log(step, metrics)
        for callback in self.callbacks:
            callback(step, metrics)

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> torch.nn.Module:
        """Train until ``total_steps`` (or a :meth:`stop`); returns the trained model."""
        log_every = self.cfg.train.log_every
        sums: dict[str, torch.Tensor] = {}
        count = 0
        bar = tqdm(total=self.total_steps, initial=self.step_count, disable=not self.progress,
                   desc=f"{self.cfg.recipe}", dynamic_ncols=True)
        try:
            while self.step_count < self.total_steps and self.stopped is None:
                loss, stats = self.train_step()
                for k, v in {"loss": loss, **stats}.items():
                    sums[k] = v.detach() if k not in sums else sums[k] + v.detach()
                count += 1
                bar.update(1)
                step = self.step_count
                if step % log_every == 0 or step == self.total_steps:
                    metrics = self.reduce_metrics(sums, count)
                    sums, count = {}, 0
                    if not math.isfinite(metrics["loss"]):
                        raise TrainingDiverged(
                            f"loss is {metrics['loss']} at step {step}; training stopped. The last good "
                            f"checkpoint is kept"
                            + (f" at {self.run.checkpoint_path}" if self.run else "")
                            + f"; {self.divergence_hint}"
                        )
                    bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items()})
                    self.log(step, metrics)
                extra = self.end_of_step()
                if extra:
                    self.log(step, extra)
                if self.should_checkpoint(step) or self.stopped is not None:
                    self.save()
        finally:
            bar.close()
        return self.model

    # -- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        """Write the checkpoint, unless a parameter went non-finite (the last good one stays)."""
        finite = torch.stack([p.detach().isfinite().all() for p in self.parameters()]).all()
        if not bool(finite):
            raise TrainingDiverged(
                f"non-finite parameters at step {self.step_count}; the last good checkpoint"
                + (f" at {self.run.checkpoint_path}" if self.run else "")
                + f" is kept; {self.divergence_hint}"
            )
        if self.run is not None:
            self.run.save_checkpoint(self.state_dict())

    def resume_from(self, run: RunDir | None) -> None:
        """Continue from ``run``'s checkpoint; metrics logged after it are dropped (re-logged)."""
        assert run is not None, "resume needs a run folder"
        self._restore(run.load_checkpoint("cpu"))
        run.truncate_metrics(self.step_count)


class Trainer(BaseTrainer):
    """Meta-trains ``cfg.recipe`` on the train split of ``cfg.data``.

    Args:
        cfg: a validated :class:`ExperimentConfig`.
        run: the run folder (``None``: no files, for tests and benchmarks).
        resume: continue from the run's last checkpoint.
        stores: pre-loaded splits (else loaded from ``cfg.data``).
        callbacks: ``f(step, metrics)`` called after each logged step.
        progress: show a progress bar.
    """

    divergence_hint = "lower meta.meta_lr or meta.inner_lr and --resume"

    def __init__(self, cfg: ExperimentConfig, run: RunDir | None = None, resume: bool = False,
                 stores: Stores | None = None, callbacks: tuple[Callback, ...] = (),
                 progress: bool = True) -> None:
        super().__init__(cfg, run, callbacks, progress)
        self.device = resolve_device(cfg.device)
        self.stores = stores or load_stores(cfg, self.device)
        m = cfg.meta
        train = self.stores.train
        self.sampler = EpisodicSampler(train, m.ways, m.train_shots, m.queries, m.meta_batch_size,
                                       seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, train.image_shape[0], m.ways, train.image_shape[-1], cfg.data.dataset).to(self.device)
        self.params = params_of(self.model)
        self.optimizer = torch.optim.Adam(self.params.values(), lr=m.meta_lr)
        self.learner = build_learner(cfg, self.model)  # MAML, or ANIL with meta.adapt=head
        self.attack = build_attack(cfg.train_attack)
        self.task_fn = build_task_fn(cfg, self.learner, self.attack)
        self.execution = resolve_execution(m.execution, self.device)
        self.noise_generator = torch.Generator(device=self.device)
        self.noise_generator.manual_seed(cfg.seed + 1)
        if resume:
            self.resume_from(run)

    # -- one meta-update ------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.model.train()
        batch = self.sampler.sample()
        noise = draw_noise(self.cfg, batch, self.attack, self.noise_generator)  # query (+ support) starts
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats = meta_backward(self.task_fn, self.params, batch, noise, self.execution)
        self.optimizer.step()
        self.step_count += 1
        return loss, stats

    # -- checkpoints ----------------------------------------------------------------------
    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def state_dict(self) -> dict:
        return {
            "step": self.step_count,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "noise_generator": self.noise_generator.get_state(),
            "config": to_dict(self.cfg),
        }

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.noise_generator.set_state(state["noise_generator"])
        self.step_count = int(state["step"])
