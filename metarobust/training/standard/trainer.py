"""The single-task trainer: epochs of plain mini-batches through a :class:`StandardRecipe`.

A mini-batch is the degenerate episode of :class:`~metarobust.data.sampler.BatchSampler` (one
task, no support set, global labels); the loop, the run folder, checkpoints, exact resume, the
NaN stop and metric logging are :class:`~metarobust.training.engine.BaseTrainer`'s, shared with
meta-learning. Per mini-batch::

    batch = sampler.sample()                       # on the device, augmented on the device
    for replay in range(recipe.replays):           # 1; Free AT: m
        set lr = schedule(t)                       # every optimizer step
        with autocast: loss = recipe.loss(models, batch, ctx)
        scaler.scale(loss).backward(); recipe.after_backward(...); scaler.step(optimizer)
    after the epoch's last batch: recipe.on_epoch_end(trainer)

SGD with momentum (``at.momentum``, 0.9), weight decay and ``at.nesterov`` over the parameters of
every trainable role. ``at.amp``: ``bf16`` autocast, or ``fp16`` autocast with a GradScaler;
``at.channels_last`` and ``at.compile`` apply to every model. Under ``torchrun`` the trainable
models are wrapped in DistributedDataParallel and each rank trains on a disjoint slice of every
global batch (:mod:`metarobust.distributed`).

Example:
    >>> cfg = load_config("configs/at/mnist_pgd_at.yaml", ["at.epochs=1"])
    >>> model = train_standard(cfg)                 # the deployed nn.Module, eval-ready
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metarobust import distributed
from metarobust.config import ExperimentConfig, to_dict
from metarobust.data.datasets import load_split
from metarobust.data.sampler import BatchSampler, to_float
from metarobust.data.store import ImageStore
from metarobust.distributed import DistInfo
from metarobust.errors import ConfigError, DataError
from metarobust.models import build_model, convert_dual_bn
from metarobust.runs import CHECKPOINT, RunDir, load_checkpoint
from metarobust.training.engine import BaseTrainer, Callback, resolve_device
from metarobust.training.standard.base import Batch, Models, StandardRecipe, StepContext, standard_recipe
from metarobust.training.standard.schedules import lr_at

HOLDOUT_SEED_OFFSET = 104729
"""The held-out images are drawn with ``seed + this`` (apart from the sampler's and the attack's)."""


@dataclass
class StandardData:
    """The images of a standard run, on the device: ``train`` (trained on), ``holdout``
    (``at.holdout`` images of the train split kept out of training; ``None`` if 0) and ``test``
    (``None`` when not loaded). All share ``class_names``."""

    train: ImageStore
    holdout: ImageStore | None
    test: ImageStore | None

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def in_channels(self) -> int:
        return self.train.image_shape[0]

    @property
    def image_size(self) -> int:
        return self.train.image_shape[-1]


def take(store: ImageStore, index: torch.Tensor, name: str) -> ImageStore:
    """The images of ``store`` at ``index`` (labels and class names unchanged)."""
    index = index.to(store.device)
    return ImageStore(store.images[index], store.labels[index], list(store.class_names), name,
                      store.image_ids[index])


def split_train(store: ImageStore, holdout: int, train_size: int, seed: int) -> tuple[ImageStore, ImageStore | None]:
    """``(train, holdout)``: a seeded permutation of ``store``; its first ``holdout`` images are held
    out, the next ``train_size`` (0: all the rest) are trained on (kept in store order)."""
    if holdout + max(train_size, 1) > len(store):
        raise ConfigError(f"at.holdout={holdout} + at.train_size={train_size} exceed the {len(store)} images of "
                          f"{store.name}; lower them")
    if holdout == 0 and train_size == 0:
        return store, None
    generator = torch.Generator().manual_seed(seed + HOLDOUT_SEED_OFFSET)
    order = torch.randperm(len(store), generator=generator)
    rest = order[holdout:]
    if train_size:
        rest = rest[:train_size]
    held = take(store, order[:holdout].sort().values, f"{store.name}[holdout]") if holdout else None
    return take(store, rest.sort().values, store.name), held


def load_standard_data(cfg: ExperimentConfig, device: torch.device, with_test: bool = True) -> StandardData:
    """The train (and test) split of ``cfg.data`` on ``device``, split by ``at.holdout`` and
    ``at.train_size``. :class:`DataError` if train and test do not share their classes (a
    class-split few-shot dataset such as glyphs or Omniglot cannot train a plain classifier)."""
    train = load_split(cfg.data, "train")
    test = load_split(cfg.data, "test") if with_test else None
    if test is not None and test.class_names != train.class_names:
        raise DataError(f"data.dataset={cfg.data.dataset!r}: its train and test splits hold different classes "
                        f"(a few-shot class split), so a plain classifier cannot be trained and tested on it; "
                        f"use a classification dataset such as mnist, fashion_mnist, cifar10 or cifar100")
    train, holdout = split_train(train, cfg.at.holdout, cfg.at.train_size, cfg.seed)
    return StandardData(train.to(device), holdout.to(device) if holdout else None,
                        test.to(device) if test is not None else None)


def resolve_augment(cfg: ExperimentConfig, store: ImageStore) -> str:
    """``at.augment`` with ``auto`` resolved: random crop (4-pixel padding) + flip for 3-channel
    images of side >= 32 (CIFAR), none for the rest (MNIST)."""
    if cfg.at.augment != "auto":
        return cfg.at.augment
    c, h, _ = store.image_shape
    return "crop_flip" if c == 3 and h >= 32 else "none"


def make_sampler(cfg: ExperimentConfig, store: ImageStore, info: DistInfo) -> BatchSampler:
    """The mini-batch sampler: ``at.batch_size`` images per rank, every rank drawing the same
    seeded permutation and taking its own slice of each global batch."""
    return BatchSampler(store, cfg.at.batch_size, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                        augment=resolve_augment(cfg, store))


def checkpoint_path(cfg: ExperimentConfig) -> Path:
    return Path(cfg.out_dir) / cfg.name / "checkpoints" / CHECKPOINT


class StandardTrainer(BaseTrainer):
    """Trains ``cfg.recipe`` (a standard recipe) on the train split of ``cfg.data`` for ``at.epochs``.

    Args:
        cfg: a validated :class:`ExperimentConfig` whose ``recipe`` is a standard recipe.
        run: the run folder (``None``: no files; non-zero ranks always pass ``None``).
        resume: continue from the last checkpoint of ``cfg.out_dir/cfg.name``.
        data: pre-loaded images (else :func:`load_standard_data`).
        callbacks: ``f(step, metrics)`` after each logged step.
        progress: show a progress bar.
        dist: the process group (:func:`metarobust.distributed.init_from_env`); ``None``: one process.

    ``total_steps`` counts mini-batches (``at.epochs`` x batches per epoch); ``train.log_every`` and
    ``train.checkpoint_every`` are in mini-batches too.
    """

    divergence_hint = "lower at.lr (or use at.amp=none) and --resume"

    def __init__(self, cfg: ExperimentConfig, run: RunDir | None = None, resume: bool = False,
                 data: StandardData | None = None, callbacks: tuple[Callback, ...] = (),
                 progress: bool = True, dist: DistInfo | None = None) -> None:
        super().__init__(cfg, run, callbacks, progress)
        self.recipe: StandardRecipe = standard_recipe(cfg)  # validates the recipe's fields first
        self.dist = dist or distributed.single(resolve_device(cfg.device))
        self.device = self.dist.device
        self.data = data or load_standard_data(cfg, self.device, with_test=False)
        at = cfg.at
        per_epoch = len(self.data.train) // (at.batch_size * self.dist.world_size)
        if per_epoch < 1:
            raise ConfigError(f"at.batch_size={at.batch_size} x {self.dist.world_size} process(es) exceeds the "
                              f"{len(self.data.train)} training images; lower at.batch_size")
        self.steps_per_epoch = per_epoch
        self.total_steps = at.epochs * per_epoch
        self.sampler = make_sampler(cfg, self.data.train, self.dist)
        self.models = self._build_models()
        params = [p for name in self.models.trainable for p in self.models.modules[name].parameters()
                  if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=at.lr, momentum=at.momentum, weight_decay=at.weight_decay,
                                         nesterov=at.nesterov)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=at.amp == "fp16")
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed + 1 + 7919 * self.dist.rank)  # ranks draw independent noise
        self.epoch = 0
        self.lr = lr_at(at, 0.0)
        self.first_batch: Batch | None = None
        self._pending: dict[str, float] = {}
        self._generator_states: list[torch.Tensor] | None = None
        if resume:
            self._restore(load_checkpoint(run.checkpoint_path if run else checkpoint_path(cfg)))
            if run is not None:
                run.truncate_metrics(self.step_count)

    # -- models ---------------------------------------------------------------------------------
    def _build_models(self) -> Models:
        cfg, data = self.cfg, self.data
        torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
        train, raw, modules, trainable = {}, {}, {}, []
        for role in self.recipe.roles():
            module = build_model(role.model or cfg.model, data.in_channels, data.num_classes, data.image_size,
                                 cfg.data.dataset)
            module = module.to(self.device)
            if role.checkpoint:
                state = load_checkpoint(role.checkpoint, self.device)
                try:
                    module.load_state_dict(state["model"])
                except (KeyError, RuntimeError) as exc:  # another architecture, or not a run's checkpoint
                    arch = role.model or cfg.model
                    detail = " ".join(str(exc).split())[:300]
                    raise ConfigError(f"checkpoint {role.checkpoint!r} does not fit the {role.name!r} model "
                                      f"({arch.name}, hidden {arch.hidden}): {detail}; give a checkpoint "
                                      f"trained with the same model settings") from None
            if role.dual_bn:
                module = convert_dual_bn(module)
            if cfg.at.channels_last:
                module = module.to(memory_format=torch.channels_last)
            if not role.trainable:
                module.eval().requires_grad_(False)
            modules[role.name] = module
            raw[role.name] = torch.compile(module) if cfg.at.compile else module
            train[role.name] = raw[role.name]
            if role.trainable:
                trainable.append(role.name)
                if self.dist.distributed:
                    wrapped = distributed.wrap(module, self.dist)
                    train[role.name] = torch.compile(wrapped) if cfg.at.compile else wrapped
        if not trainable:
            raise ConfigError(f"recipe {cfg.recipe!r} declares no trainable model role")
        return Models(train, raw, modules, trainable)

    @property
    def model(self) -> torch.nn.Module:
        """The deployed model (:meth:`StandardRecipe.deployed`)."""
        return self.recipe.deployed(self.models)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def parameters(self) -> list[torch.Tensor]:
        return [p for name in self.models.trainable for p in self.models.modules[name].parameters()]

    # -- what hooks use (TrainerView) -------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        amp = self.cfg.at.amp
        if amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def check_batch(self) -> Batch:
        holdout = self.data.holdout
        if holdout is not None:
            index = torch.arange(len(holdout), device=holdout.device)
            return Batch(self._layout(to_float(holdout.images)), holdout.labels, index)
        if self.first_batch is None:
            raise RuntimeError("check_batch() before the first training batch")
        return self.first_batch

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        return distributed.all_mean(value, self.dist)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.at.channels_last else x

    # -- one mini-batch ----------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        per_epoch, replays = self.steps_per_epoch, self.recipe.replays
        self.epoch = self.step_count // per_epoch
        if self.step_count % per_epoch == 0:
            self._pending.update(self.recipe.on_epoch_start(self) or {})
        episode = self.sampler.sample()
        batch = Batch(self._layout(episode.query_x[0]), episode.query_y[0], episode.query_index[0])
        if self.step_count % per_epoch == 0:
            self.first_batch = batch
        for name in self.models.trainable:
            self.models.modules[name].train()
        total_updates = self.total_steps * replays
        for replay in range(replays):
            update = self.step_count * replays + replay
            self.lr = lr_at(self.cfg.at, (self.step_count + (replay + 1) / replays) / per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
            ctx = StepContext(update, self.epoch, update / total_updates, replay, self.generator,
                              self.data.num_classes)
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                loss, stats = self.recipe.loss(self.models, batch, ctx)
            self.scaler.scale(loss).backward()
            self.recipe.after_backward(self.models, batch, ctx)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.step_count += 1
        return loss.detach().float(), stats

    def end_of_step(self) -> dict[str, float] | None:
        if self.step_count % self.steps_per_epoch == 0:
            self._pending.update(self.recipe.on_epoch_end(self) or {})
            self._pending["epoch"] = float(self.step_count // self.steps_per_epoch)
        out, self._pending = self._pending, {}
        return out or None

    def reduce_metrics(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        keys = sorted(sums)
        values = torch.stack([sums[k].float().to(self.device) for k in keys]) / count
        values = distributed.all_mean(values, self.dist).tolist()  # the only host sync
        return {**dict(zip(keys, values)), "lr": self.lr}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.dist.is_main:
            super().log(step, metrics)

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self) -> None:
        # Every rank's attack-noise generator goes into the checkpoint (a collective: all ranks).
        self._generator_states = [s for s in distributed.gather_objects(self.generator.get_state(), self.dist)]
        super().save()

    def state_dict(self) -> dict[str, Any]:
        first = self.first_batch
        return {
            "kind": "standard",
            "step": self.step_count,
            "model": self.model.state_dict(),
            "models": {name: self.models.modules[name].state_dict() for name in self.models.trainable},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "generators": self._generator_states or [self.generator.get_state()],
            "recipe": self.recipe.state_dict(),
            "stopped": self.stopped,
            "first_batch": None if first is None else {"x": first.x, "y": first.y, "index": first.index},
            "data": {"num_classes": self.data.num_classes, "in_channels": self.data.in_channels,
                     "image_size": self.data.image_size, "class_names": list(self.data.train.class_names)},
            "config": to_dict(self.cfg),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        for name, module_state in state["models"].items():
            self.models.modules[name].load_state_dict(module_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        generators = state["generators"]
        self.generator.set_state(generators[self.dist.rank % len(generators)])
        self.recipe.load_state_dict(_to_device(state["recipe"], self.device))
        self.stopped = state["stopped"]
        first = state["first_batch"]
        if first is not None:
            self.first_batch = Batch(**{k: self._layout(v.to(self.device)) if k == "x" else v.to(self.device)
                                        for k, v in first.items()})
        self.step_count = int(state["step"])
        self.epoch = self.step_count // self.steps_per_epoch


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def train_standard(cfg: ExperimentConfig, run: RunDir | None = None, resume: bool = False,
                   data: StandardData | None = None, progress: bool = True,
                   dist: DistInfo | None = None) -> torch.nn.Module:
    """Train ``cfg`` (a standard recipe) and return the deployed model in eval mode.

    Example:
        >>> cfg = load_config("configs/at/mnist_trades.yaml", ["at.epochs=2"])
        >>> model = train_standard(cfg)
        >>> report = evaluate_standard(cfg, model, load_standard_data(cfg, device).test)
    """
    model = StandardTrainer(cfg, run, resume=resume, data=data, progress=progress, dist=dist).fit()
    return model.eval()


__all__ = ["StandardData", "StandardTrainer", "checkpoint_path", "load_standard_data", "make_sampler",
           "split_train", "train_standard"]
