"""The one engine: every recipe, meta-learning and plain training alike, runs in :class:`Trainer`.

Per step::

    batch = sampler.sample()                       # EpisodeBatch on the device (meta: T episodes;
                                                   # plain: one task, no support set)
    for replay in range(recipe.replays):           # 1; Free AT: m
        set lr = lr_at(optim, t)                   # every optimizer step (a closed form of t)
        loss, stats = recipe.backward(models, batch, ctx)   # under autocast; meta: per task
        recipe.after_backward(...); all-reduce (meta under torchrun); scaler.step(optimizer)
        recipe.after_step(...)                     # AWP: the weight perturbation is taken off
    after an epoch's last batch: recipe.on_epoch_end(trainer); at.select=best: score the epoch

The trainer owns what every recipe shares: the models of the recipe's roles (built from
``cfg.model`` with a seeded, RNG-isolated initialisation, loaded from checkpoints, dual-BN,
``channels_last``, ``torch.compile``, DistributedDataParallel), one optimizer over every trainable
parameter with its learning-rate schedule (``optim``, any optimizer for any recipe), mixed precision (``at.amp``: bf16 autocast, or fp16
with a GradScaler), metrics accumulated on the device and read on the host only every
``train.log_every`` steps, the run folder (metrics.jsonl, TensorBoard), atomic checkpoints every
``train.checkpoint_every`` steps (models, optimizer, scaler, sampler, every rank's noise
generator, the recipe's state), exact resume (a resumed run reaches the parameters of an
uninterrupted one), the stop on a non-finite loss or parameter (:class:`TrainingDiverged`,
the last good checkpoint left untouched), and the choice of the deployed epoch (``at.select``):
``best`` scores every epoch of a plain recipe on the held-out images (:meth:`Trainer.select`) and
keeps the best in ``checkpoints/best.pt``.

Under ``torchrun`` (:mod:`metarobust.distributed`) plain recipes train DDP-wrapped models on
disjoint slices of each global batch; meta recipes split each meta-batch's tasks across the ranks
and average the meta-gradients (their inner loop calls the model functionally, which DDP cannot
see), so two processes compute what one does with the whole meta-batch.

Example:
    >>> cfg = load_config("configs/quickstart.yaml", ["train.iterations=10"])
    >>> data = load_training_data(cfg, build_recipe(cfg), torch.device("cpu"))
    >>> model = Trainer(cfg, data=data).fit()
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from metarobust import compilation, distributed
from metarobust.attacks import build_attack
from metarobust.config import ExperimentConfig, select_metric, to_dict
from metarobust.data.episode import EpisodeBatch
from metarobust.data.sampler import to_float
from metarobust.distributed import DistInfo
from metarobust.errors import ConfigError, TrainingDiverged, TrainingInterrupted
from metarobust.models import convert_dual_bn
from metarobust.runs import RunDir, load_checkpoint
from metarobust.training.data import TrainingData, load_training_data, resolve_device
from metarobust.training.optim import build_optimizer, lr_at, resolve_optim
from metarobust.training.recipes import Models, Recipe, StepContext, bn_mode, build_recipe

Callback = Callable[[int, dict[str, float]], None]
NOISE_RANK_STRIDE = 7919
"""Plain recipes: rank r draws attack noise from ``seed + 1 + 7919 r`` (independent streams)."""
SELECT_STEPS = 10
"""``at.select=best`` scores each epoch under PGD-10 (the ``attack`` section's norm, eps, step size)."""




class _Clean:
    """The identity "attack": :meth:`Trainer.robust_accuracy` with it is the clean accuracy."""

    def init_noise(self, x: torch.Tensor, generator: torch.Generator) -> None:
        return None

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, noise=None) -> torch.Tensor:
        return x


CLEAN = _Clean()
CHECK_CHUNK = 512
"""Held-out images attacked together by :meth:`Trainer.robust_accuracy` (eval mode: the chunking
changes no prediction, only the memory an attack needs)."""


class Trainer:
    """Trains ``cfg.recipe`` on the train split of ``cfg.data``.

    Args:
        cfg: a validated :class:`ExperimentConfig`.
        run: the run folder (``None``: no files, for tests, benchmarks and non-zero ranks).
        resume: continue from the run's last checkpoint (metrics logged after it are dropped).
        data: pre-loaded images (else :func:`load_training_data`).
        callbacks: ``f(step, metrics)`` called after each logged step.
        progress: show a progress bar.
        dist: the process group (:func:`metarobust.distributed.init_from_env`); ``None``: one process.
        recipe: the recipe object (else built from ``cfg.recipe``).

    ``total_steps`` counts batches: ``train.iterations`` meta-updates, or ``at.epochs`` x batches per
    epoch for plain recipes; ``train.log_every`` and ``train.checkpoint_every`` count them too.
    """

    def __init__(self, cfg: ExperimentConfig, run: RunDir | None = None, resume: bool = False,
                 data: TrainingData | None = None, callbacks: tuple[Callback, ...] = (),
                 progress: bool = True, dist: DistInfo | None = None, recipe: Recipe | None = None) -> None:
        self.cfg, self.run, self.callbacks, self.progress = cfg, run, callbacks, progress
        self.recipe = recipe or build_recipe(cfg)  # the recipe's own checks come first
        self.dist = dist or distributed.single(resolve_device(cfg.device))
        self.device = self.dist.device
        self.data = data or load_training_data(cfg, self.recipe, self.device, with_test=False)
        train, world = self.data.train, self.dist.world_size
        self.total_steps, self.steps_per_epoch = self.recipe.schedule(train, world)
        self.sampler = self.recipe.sampler(train, self.dist.rank, world)
        self.compile_decision = self._compile_decision()
        """Whether the steps run compiled (``at.compile``), and why."""
        self.models = self._build_models()
        self.optim = resolve_optim(cfg.optim, self.recipe.default_optim(cfg), self.recipe.epochs(cfg))
        self.optimizer = build_optimizer(self._trainable_parameters(), self.optim)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.at.amp == "fp16")
        self.generator = torch.Generator(device=self.device)
        rank_offset = 0 if self.recipe.episodic else NOISE_RANK_STRIDE * self.dist.rank
        self.generator.manual_seed(cfg.seed + 1 + rank_offset)
        self.step_count = 0
        self.epoch = 0
        self.lr = self.lr_at(0.0)
        self.stopped: str | None = None
        """Why training ended early (set by :meth:`stop`); saved, so a resumed run stays stopped."""
        self.first_batch: EpisodeBatch | None = None
        self._pending: dict[str, float] = {}
        self._generator_states: list[torch.Tensor] | None = None
        self.checkpoint_step: int | None = None
        """The step of the last checkpoint written or resumed from (``None``: none yet)."""
        self.best: dict[str, float] | None = None
        """``at.select=best``: ``{"epoch", "step", "holdout_acc"}`` of the best epoch so far
        (checkpointed: a resumed run keeps it); ``None`` before the first epoch ends."""
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._interrupted = False
        if resume:
            if run is None:
                raise ValueError("resume=True needs a run folder")
            self._restore(run.load_checkpoint("cpu"))
            run.truncate_metrics(self.step_count)
        if run is not None:
            run.record(device=str(self.device), world_size=self.dist.world_size,
                       compiled=self.compile_decision.on, compile_reason=self.compile_decision.reason,
                       device_name=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None)

    # -- models ---------------------------------------------------------------------------------
    def _compile_decision(self) -> compilation.Decision:
        """``at.compile`` for this run: meta recipes stay eager (their inner loop calls the model
        functionally per task); ``auto`` reads :data:`metarobust.compilation.MEASURED`. With the
        models compiled, the recipes' PGD attacks compile their step update too (``PGD.compile``)."""
        if self.recipe.episodic:
            return compilation.Decision(False, "meta recipes run eager (functional calls per task)")
        if self.recipe.eager_reason:
            return compilation.Decision(False, self.recipe.eager_reason)
        return compilation.decide(self.cfg.at.compile, self.device, self.cfg.model.name, self.total_steps)

    def _build_models(self) -> Models:
        cfg, train = self.cfg, self.data.train
        in_channels, size = train.image_shape[0], train.image_shape[-1]
        outputs = self.recipe.head_size(train)
        compiled = self.compile_decision.on
        wrapped, raw, modules, trainable = {}, {}, {}, []
        with torch.random.fork_rng(devices=[]):  # every rank builds the same initial weights,
            torch.manual_seed(cfg.seed)          # without reseeding the caller's global RNG
            for role in self.recipe.roles():
                arch = role.model or cfg.model
                module = self.recipe.build_model(arch, in_channels, role.outputs or outputs, size,
                                                 cfg.data.dataset).to(self.device)
                if role.checkpoint:
                    _load_role_weights(module, role.checkpoint, role.name, arch, self.device)
                if role.dual_bn:
                    module = convert_dual_bn(module)
                if cfg.at.channels_last:
                    module = module.to(memory_format=torch.channels_last)
                if not role.trainable:
                    module.eval().requires_grad_(False)
                modules[role.name] = module
                raw[role.name] = compilation.compile_module(module) if compiled else module
                wrapped[role.name] = raw[role.name]
                if role.trainable:
                    trainable.append(role.name)
                    if self.dist.distributed and not self.recipe.episodic:
                        ddp = distributed.wrap(module, self.dist)
                        wrapped[role.name] = compilation.compile_module(ddp) if compiled else ddp
        if not trainable:
            raise ConfigError(f"recipe {cfg.recipe!r} declares no trainable model role")
        return Models(wrapped, raw, modules, trainable)

    def lr_at(self, epochs: float) -> float:
        """The learning rate ``epochs`` (fractional) into training (``optim.schedule``)."""
        return lr_at(self.optim, epochs, self.recipe.epochs(self.cfg))

    def _trainable_parameters(self) -> list[torch.Tensor]:
        return [p for name in self.models.trainable for p in self.models.modules[name].parameters()
                if p.requires_grad]

    @property
    def model(self) -> torch.nn.Module:
        """The deployed model (:meth:`Recipe.deployed`)."""
        return self.recipe.deployed(self.models)

    @property
    def num_classes(self) -> int:
        return self.data.train.num_classes

    def parameters(self) -> list[torch.Tensor]:
        """The trained tensors checked for finiteness before each checkpoint."""
        return [p for name in self.models.trainable for p in self.models.modules[name].parameters()]

    # -- what hooks use (TrainerView) -------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        amp = self.cfg.at.amp
        if amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def check_batch(self) -> EpisodeBatch:
        holdout = self.data.holdout
        if holdout is not None:
            index = torch.arange(len(holdout), device=holdout.device)
            return self._layout(EpisodeBatch.plain(to_float(holdout.images), holdout.labels, index))
        if self.first_batch is None:
            raise RuntimeError("check_batch() before the first training batch")
        return self.first_batch

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        return distributed.all_mean(value, self.dist)

    def robust_accuracy(self, attack: Callable, model: torch.nn.Module | None = None,
                        batch: EpisodeBatch | None = None, seed: int | None = None) -> float:
        """Accuracy of ``model`` (default: the deployed model, :attr:`model`) in eval mode under
        ``attack`` on ``batch`` (default :meth:`check_batch`: the held-out images), attacked
        :data:`CHECK_CHUNK` images at a time with random starts drawn from a generator seeded with
        ``seed`` (default ``cfg.seed``); the mean over the ranks, so every rank takes the same
        decision. Fast AT's early stop and ``at.select=best`` both score with it."""
        batch = self.check_batch() if batch is None else batch
        model = self.model if model is None else model
        x, y = batch.x, batch.y
        generator = torch.Generator(device=x.device)
        generator.manual_seed(self.cfg.seed if seed is None else seed)
        correct = torch.zeros((), device=x.device)
        with bn_mode(model, "eval"), self.autocast():
            for start in range(0, len(y), CHECK_CHUNK):
                xc, yc = x[start:start + CHECK_CHUNK], y[start:start + CHECK_CHUNK]
                x_adv = attack(model, xc, yc, noise=attack.init_noise(xc, generator))
                with torch.no_grad():
                    correct += (model(x_adv).argmax(dim=-1) == yc).sum()
        return float(self.all_mean(correct / len(y)))

    # -- the deployed epoch (at.select) ---------------------------------------------------------
    @property
    def selects_best(self) -> bool:
        """Whether this run selects its best epoch on the held-out images (``at.select=best``;
        plain recipes only)."""
        return self.cfg.at.select == "best" and not self.recipe.episodic

    @property
    def select_on(self) -> str:
        """What :meth:`select` ranks epochs by: ``robust`` or ``clean`` (``at.select_on``, whose
        ``auto`` is ``clean`` for the ``natural`` recipe and ``robust`` otherwise)."""
        return select_metric(self.cfg.recipe, self.cfg.at.select_on)

    def select(self) -> dict[str, float]:
        """Score the epoch that just ended for ``at.select=best``: PGD-10 (the ``attack``
        section's norm, eps, step size and random start; one restart) on the held-out images,
        the deployed model in eval mode, the same noise every epoch (``cfg.seed``), so epochs
        differ only by their weights; or, when :attr:`select_on` is ``clean``, the clean accuracy
        there. A strictly better epoch (ties keep the earlier one) becomes the best: its
        checkpoint is written to ``checkpoints/best.pt`` (the format of ``last.pt``) and its
        deployed weights kept for :meth:`selected_model`. Returns the metrics to log."""
        if self.data.holdout is None:
            raise ConfigError("at.select=best needs held-out images to select on: set at.holdout=1000 "
                              "(at.holdout is 0; never select on the test set)")
        if self.select_on == "clean":
            acc = self.robust_accuracy(CLEAN)
        else:
            acc = self.robust_accuracy(build_attack(replace(self.cfg.attack, name="pgd", steps=SELECT_STEPS,
                                                            restarts=1)))
        epoch = self.step_count // self.steps_per_epoch
        if self.best is None or acc > self.best["holdout_acc"]:
            self.best = {"epoch": epoch, "step": self.step_count, "holdout_acc": acc}
            self._best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self.run is not None and self.dist.is_main:
                self.run.save_best(self.state_dict())
        return {"holdout_acc": acc, "best_epoch": float(self.best["epoch"]),
                "best_holdout_acc": self.best["holdout_acc"]}

    @property
    def selected_step(self) -> int:
        """The training step of the deployed weights: the best epoch's last step with
        ``at.select=best``, else the current step."""
        return int(self.best["step"]) if self.selects_best and self.best is not None else self.step_count

    def selected_model(self) -> torch.nn.Module:
        """The model the run deploys: the last weights (:attr:`model`), or with ``at.select=best``
        a copy holding the best epoch's weights (kept in memory, or read from ``best.pt`` when the
        best epoch came before a resume)."""
        if not self.selects_best or self.best is None:
            return self.model
        weights = self._best_weights
        if weights is None:
            if self.run is None or not self.run.best_path.is_file():
                raise RuntimeError("the best epoch's weights are neither in memory nor in a run folder's best.pt")
            weights = load_checkpoint(self.run.best_path, self.device)["model"]
        model = copy.deepcopy(self.model)
        model.load_state_dict(weights)
        return model

    def stop(self, reason: str) -> None:
        """End training after the current step; the reason is saved with the checkpoint."""
        self.stopped = reason

    def _layout(self, batch: EpisodeBatch) -> EpisodeBatch:
        """A plain batch's images in channels-last memory format when ``at.channels_last``."""
        if not self.cfg.at.channels_last or self.recipe.episodic:
            return batch
        x = batch.query_x[0].contiguous(memory_format=torch.channels_last).unsqueeze(0)
        return EpisodeBatch(batch.support_x, batch.support_y, x, batch.query_y, batch.classes,
                            batch.support_index, batch.query_index)

    # -- one step ---------------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One batch (all its replays); returns the loss and 0-dim stats (no host sync)."""
        per_epoch, replays = self.steps_per_epoch, self.recipe.replays
        self.epoch = self.step_count // per_epoch
        if self.step_count % per_epoch == 0:
            self._pending.update(self.recipe.on_epoch_start(self) or {})
        batch = self._layout(self.sampler.sample())
        if self.step_count % per_epoch == 0:
            self.first_batch = batch
        for name in self.models.trainable:
            self.models.modules[name].train()
        total_updates = self.total_steps * replays
        for replay in range(replays):
            update = self.step_count * replays + replay
            self.lr = self.lr_at((self.step_count + (replay + 1) / replays) / per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
            ctx = StepContext(update, self.epoch, update / total_updates, replay, self.generator,
                              self.num_classes, self.autocast, self.scaler.scale, self.dist.rank,
                              self.dist.world_size, self.all_mean)
            self.optimizer.zero_grad(set_to_none=True)
            loss, stats = self.recipe.backward(self.models, batch, ctx)
            self.recipe.after_backward(self.models, batch, ctx)
            if self.recipe.episodic and self.dist.distributed:
                distributed.average_gradients(self._trainable_parameters(), self.dist)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.recipe.after_step(self.models, batch, ctx)
        self.step_count += 1
        return loss, stats

    def end_of_step(self) -> dict[str, float] | None:
        """Epoch-end hooks after an epoch's last batch; metrics to log at once."""
        if self.step_count % self.steps_per_epoch == 0:
            self._pending.update(self.recipe.on_epoch_end(self) or {})
            if not self.recipe.episodic:
                self._pending["epoch"] = float(self.step_count // self.steps_per_epoch)
            if self.selects_best:
                self._pending.update(self.select())
        out, self._pending = self._pending, {}
        return out or None

    def reduce_metrics(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        """Window means over the ranks as floats: the only host synchronisation of the loop."""
        keys = sorted(sums)
        values = torch.stack([sums[k].float().to(self.device) for k in keys]) / count
        values = distributed.all_mean(values, self.dist).tolist()
        return {**dict(zip(keys, values)), "lr": self.lr}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.dist.is_main:
            return
        if self.run is not None:
            self.run.log(step, metrics)
        for callback in self.callbacks:
            callback(step, metrics)

    def should_checkpoint(self, step: int) -> bool:
        return step % self.cfg.train.checkpoint_every == 0 or step == self.total_steps

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> torch.nn.Module:
        """Train until ``total_steps`` (or a :meth:`stop`); returns the deployed model."""
        log_every = self.cfg.train.log_every
        sums: dict[str, torch.Tensor] = {}
        count = 0
        bar = tqdm(total=self.total_steps, initial=self.step_count, disable=not self.progress,
                   desc=f"{self.cfg.recipe}", dynamic_ncols=True)
        with self.interrupts_after_step():
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
                            raise self._diverged(f"loss is {metrics['loss']} at step {step}")
                        bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items()})
                        self.log(step, metrics)
                    extra = self.end_of_step()
                    if extra:
                        self.log(step, extra)
                    interrupted = self._interrupt_requested(step)
                    if self.should_checkpoint(step) or self.stopped is not None or interrupted:
                        self.save()
                    if interrupted:
                        where = f"written to {self.run.checkpoint_path}" if self.run is not None else "not written (no run folder)"
                        raise TrainingInterrupted(f"interrupted (Ctrl-C) after step {step} of {self.total_steps}; the "
                                                  f"checkpoint is {where}; to continue, run the same command with --resume")
            finally:
                bar.close()
        return self.model

    def _interrupt_requested(self, step: int) -> bool:
        """Whether Ctrl-C was pressed; under torchrun the ranks agree at logging steps (a collective)."""
        if not self.dist.distributed:
            return self._interrupted
        if step % self.cfg.train.log_every and step != self.total_steps:
            return False
        flag = torch.tensor(float(self._interrupted), device=self.device)
        return bool(distributed.all_mean(flag, self.dist) > 0)

    @contextlib.contextmanager
    def interrupts_after_step(self):
        """Defer Ctrl-C (SIGINT) to the end of the current step, where :meth:`fit` writes a
        checkpoint and raises :class:`TrainingInterrupted` (a half-done optimizer step is never
        saved); a second Ctrl-C interrupts at once, leaving the last checkpoint as it was."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self._interrupted:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self._interrupted = True

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _diverged(self, what: str) -> TrainingDiverged:
        """The stop on a non-finite loss or parameter, with advice that works when followed: which
        setting to lower (to what), and whether to ``--resume`` (a checkpoint exists) or start
        again (none was written yet: a fresh start clears the run folder)."""
        lower = f"optim.lr={self.optim.lr / 10:g}"
        advice = f"{self.recipe.divergence_hint} (optim.lr is {self.optim.lr:g}; e.g. {lower})"
        if self.checkpoint_step is None:
            first = min(self.cfg.train.checkpoint_every, self.total_steps)
            return TrainingDiverged(
                f"{what}; training stopped before its first checkpoint (due at step {first}), so there is nothing "
                f"to resume: {advice}, and run the same command again without --resume (the run folder starts "
                f"clean)", None, [lower])
        where = f" ({self.run.checkpoint_path})" if self.run is not None else ""
        return TrainingDiverged(
            f"{what}; training stopped. The last good checkpoint, step {self.checkpoint_step}, is kept{where}: "
            f"{advice}, and run the same command with that change and --resume", self.checkpoint_step, [lower])

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self) -> None:
        """Write the checkpoint, unless a parameter went non-finite (the last good one stays).
        Every rank's noise generator goes into it (a collective: all ranks call this)."""
        finite = torch.stack([p.detach().isfinite().all() for p in self.parameters()]).all()
        if not bool(finite):
            raise self._diverged(f"non-finite parameters at step {self.step_count}")
        self._generator_states = list(distributed.gather_objects(self.generator.get_state(), self.dist))
        if self.run is not None:
            self.run.save_checkpoint(self.state_dict())
        self.checkpoint_step = self.step_count

    def state_dict(self) -> dict[str, Any]:
        first, train = self.first_batch, self.data.train
        return {
            "step": self.step_count,
            "recipe_name": self.cfg.recipe,
            "model": self.model.state_dict(),
            "models": {name: self.models.modules[name].state_dict() for name in self.models.trainable},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "generators": self._generator_states or [self.generator.get_state()],
            "recipe": self.recipe.state_dict(),
            "stopped": self.stopped,
            "selection": self.best,
            "first_batch": None if first is None else {f.name: getattr(first, f.name) for f in fields(first)},
            "data": {"num_classes": self.recipe.head_size(train), "in_channels": train.image_shape[0],
                     "image_size": train.image_shape[-1], "class_names": list(train.class_names)},
            "config": to_dict(self.cfg),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        for name, module_state in state["models"].items():
            self.models.modules[name].load_state_dict(module_state)
        settings = {k: v for k, v in self.optimizer.defaults.items() if k != "params"}  # this config's
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the checkpoint's lr, momentum, weight decay... are
            group.update(settings)                  # replaced by the config's (runs.RESUME_APPLIED)
        if state["scaler"]:  # an fp16 run; at.amp changed to fp16: the scaler starts afresh
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        generators = state["generators"]
        self.generator.set_state(generators[self.dist.rank % len(generators)])
        self.recipe.load_state_dict(_to_device(state["recipe"], self.device))
        self.stopped = state["stopped"]
        self.best = state.get("selection")  # absent from checkpoints written before at.select
        if self.best is not None and "holdout_robust_acc" in self.best:  # written before at.select_on
            self.best = {("holdout_acc" if k == "holdout_robust_acc" else k): v for k, v in self.best.items()}
        first = state["first_batch"]
        if first is not None:
            batch_type = getattr(self.sampler, "batch_type", EpisodeBatch)  # segmentation: SegEpisodeBatch
            self.first_batch = self._layout(batch_type(**_to_device(first, self.device)))
        self.step_count = int(state["step"])
        self.checkpoint_step = self.step_count
        self.epoch = self.step_count // self.steps_per_epoch


def _load_role_weights(module: torch.nn.Module, checkpoint: str, role: str, arch, device: torch.device) -> None:
    state = load_checkpoint(checkpoint, device)
    try:
        module.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:  # another architecture, or not a run's checkpoint
        detail = " ".join(str(exc).split())[:300]
        raise ConfigError(f"checkpoint {checkpoint!r} does not fit the {role!r} model ({arch.name}, hidden "
                          f"{arch.hidden}): {detail}; give a checkpoint trained with the same model settings") from None


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


__all__ = ["Callback", "Trainer"]
