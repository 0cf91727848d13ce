"""The one recipe protocol: every training method of metarobust is a :class:`Recipe`.

Everything is an episode. A meta-learning task has a support set (adapted on) and a query set
(scored on); a plain mini-batch is the degenerate episode (one task, no support set, global
labels, no adaptation). One engine (:class:`~metarobust.training.engine.Trainer`) runs every
recipe on :class:`~metarobust.data.episode.EpisodeBatch`\\ es::

    for step in range(start, total_steps):
        batch = sampler.sample()                            # EpisodeBatch on the device
        for replay in range(recipe.replays):                # 1; Free AT: m
            loss, stats = recipe.backward(models, batch, ctx)   # loss + backward (meta: per task)
            optimizer.step()                                # optim: Adam or SGD, lr from the schedule
        recipe.on_epoch_end(trainer)                        # after an epoch's last batch

A recipe names its pieces (``shared/ARCHITECTURE.md``):

- **model roles** (:meth:`Recipe.roles`): one trainable ``"model"`` by default; several trainable
  peers (MAT); frozen teachers loaded from a checkpoint (LTD, Hou et al.). One optimizer covers
  every trainable parameter: with peer predictions detached, the sum of the per-model losses gives
  each model exactly its own gradient.
- **learner** (:meth:`Recipe.evaluation_learner`): how the trained model adapts to a test episode:
  none (a plain classifier), MAML/ANIL fine-tuning (:class:`MetaRecipe`), or a logistic probe on
  frozen features (RFS).
- **loss** (:meth:`Recipe.loss`) on an :class:`EpisodeBatch`: plain recipes read ``batch.x``,
  ``batch.y`` and ``batch.index`` (the single task's query images, labels and store positions);
  meta recipes write one task's loss (:meth:`MetaRecipe.task`) and the engine runs it over the
  tasks, in a per-task loop or under ``vmap``.
- **backward** (:meth:`Recipe.backward`): by default ``loss.backward()`` (scaled under fp16
  autocast); meta recipes accumulate the meta-gradient task by task
  (:func:`~metarobust.meta.execution.meta_backward`).
- **attack**: built from ``cfg.train_attack`` by :meth:`Recipe.train_attack` and run with
  :meth:`Recipe.attack` in the recipe's BatchNorm mode (:attr:`Recipe.attack_bn`, overridable
  with ``at.attack_bn``); noise comes from ``ctx.generator`` (checkpointed: a resumed run draws
  the same perturbations).
- **adversarial inputs, then objective** (:meth:`Recipe.inputs`, :meth:`Recipe.objective`): a
  recipe that writes its loss in these two halves (PGD-AT, TRADES, LTD) gets Adversarial Weight
  Perturbation (``awp.gamma``, :mod:`metarobust.training.awp`) from the base class: the weights
  are perturbed between the two, and restored after the optimizer step (:meth:`after_step`).
- **hooks and state**: :attr:`Recipe.replays` optimizer steps per batch (Free AT),
  :meth:`after_backward` (input gradients before the step), :meth:`after_step`, :meth:`on_epoch_start` /
  :meth:`on_epoch_end` (FRL's multipliers, Fast AT's early stop), :meth:`state_dict` (anything
  carried across steps, so that resume is exact).

Forward passes whose loss is back-propagated use ``models[name]`` (the module, or its
DistributedDataParallel wrapper under ``torchrun``); attacks, teachers and no-grad forwards use
``models.raw[name]`` (never the DDP wrapper: a forward without its backward would stall the
gradient reduction).

Adding a recipe is one file in this package (plus its YAML and a test; ``docs/architecture.md``
has a worked example). PGD-AT, the whole recipe::

    @register_recipe("pgd_at", "PGD-AT (Madry et al. 2018): CE on PGD examples")
    class PGDAT(Recipe):
        supports_awp = True

        def inputs(self, models, batch, ctx):
            attack = self.train_attack()
            return self.attack(models.raw["model"], attack, batch.x, batch.y,
                               noise=attack.init_noise(batch.x, ctx.generator))

        def objective(self, forward, batch, x_adv):
            logits = forward(x_adv)
            return F.cross_entropy(logits, batch.y), {"adv_acc": accuracy(logits, batch.y)}
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from metarobust.attacks import build_attack
from metarobust.attacks.apgd import APGD
from metarobust.attacks.pgd import PGD
from metarobust.attacks.threat import TrainModeWarning
from metarobust.config import AttackConfig, ExperimentConfig, ModelConfig, OptimConfig
from metarobust.data.episode import EpisodeBatch
from metarobust.data.sampler import BatchSampler, EpisodicSampler
from metarobust.data.store import ImageStore
from metarobust.errors import ConfigError
from metarobust.meta.execution import Noise, TaskFn, meta_backward, resolve_execution, run_tasks
from metarobust.meta.functional import functional_forward, params_of
from metarobust.meta.logistic import LogisticProbe
from metarobust.meta.maml import MAML, adapted_names
from metarobust.models import build_model
from metarobust.models.dual_bn import strip_aux_bn
from metarobust.registry import Registry
from metarobust.training.awp import WeightPerturbation

Stats = dict[str, torch.Tensor]

RECIPES = Registry("recipe")
"""Every recipe by name (``metarobust list recipes``); filled by :func:`register_recipe`."""


@dataclass(frozen=True)
class Role:
    """A model a recipe needs.

    Attributes:
        name: the key in :class:`Models` (``"model"``, ``"peer1"``, ``"teacher"``...).
        trainable: optimised by the engine (and checkpointed); a frozen role is kept in eval mode
            with ``requires_grad=False`` (LTD's teacher, Hou et al.'s f_0).
        model: its architecture; ``None``: ``cfg.model``.
        checkpoint: a run folder or ``.pt`` file whose ``model`` weights initialise the role
            (required for frozen roles; for trainable ones: fine-tuning from a checkpoint).
        dual_bn: give every BatchNorm an auxiliary twin after loading the checkpoint
            (:func:`~metarobust.models.dual_bn.convert_dual_bn`; AdvProp, Hou et al.). The
            deployed model drops the twins (:meth:`Recipe.deployed`).
        outputs: its classifier's outputs; ``None``: :meth:`Recipe.head_size` (a frozen run of
            another head, e.g. MCG's meta-learner surrogates scoring ``meta.ways`` labels).
    """

    name: str
    trainable: bool = True
    model: ModelConfig | None = None
    checkpoint: str | None = None
    dual_bn: bool = False
    outputs: int | None = None


@dataclass
class StepContext:
    """Where training stands when :meth:`Recipe.backward` is called.

    Attributes:
        step: optimizer steps taken so far (replays included).
        epoch: the current epoch, from 0 (meta-training: one epoch spans the run).
        progress: fraction of all optimizer steps done, in [0, 1) (for ramps: eps schedules...).
        replay: which replay of the current batch (0 .. ``replays - 1``).
        generator: the attack-noise generator (on the device; checkpointed).
        num_classes: classes of the training split.
        autocast: ``() -> context``: the configured mixed precision (``at.amp``) for forwards.
        scale: ``loss -> loss`` before ``backward`` (the fp16 GradScaler; identity otherwise).
        rank, world_size: this process among the ``torchrun`` group (0 and 1 alone).
        all_mean: ``tensor -> tensor`` averaged over the ranks (identity alone): AWP's proxy
            gradient, so every rank perturbs its weights alike.
    """

    step: int
    epoch: int
    progress: float
    replay: int
    generator: torch.Generator
    num_classes: int
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss
    rank: int = 0
    world_size: int = 1
    all_mean: Callable[[torch.Tensor], torch.Tensor] = lambda value: value


class Models(Mapping[str, nn.Module]):
    """The recipe's models by role name.

    ``models[name]``: the module to use for forward passes whose loss is back-propagated (its
    DistributedDataParallel wrapper when distributed). ``models.raw[name]``: the plain (possibly
    compiled) module for attacks, teachers and no-grad forwards. ``models.modules[name]``: the
    uncompiled ``nn.Module`` (state dicts, routing attributes, functional calls).
    ``models.trainable``: the names of the trainable roles, in :meth:`Recipe.roles` order.
    """

    def __init__(self, train: dict[str, nn.Module], raw: dict[str, nn.Module],
                 modules: dict[str, nn.Module], trainable: list[str]) -> None:
        self._train, self.raw, self.modules, self.trainable = train, raw, modules, trainable

    def __getitem__(self, name: str) -> nn.Module:
        return self._train[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._train)

    def __len__(self) -> int:
        return len(self._train)


class TrainerView(Protocol):
    """What epoch hooks may use of the trainer (:class:`~metarobust.training.engine.Trainer`)."""

    cfg: ExperimentConfig
    models: Models
    device: torch.device
    epoch: int
    step_count: int
    generator: torch.Generator
    num_classes: int
    """Classes of the training split."""

    def check_batch(self) -> EpisodeBatch:
        """The held-out images (``at.holdout``) as one plain batch, else the current epoch's first
        training batch."""

    def autocast(self) -> Any:
        """The configured autocast context (``at.amp``)."""

    def stop(self, reason: str) -> None:
        """End training after this epoch (the run records ``reason``)."""

    def robust_accuracy(self, attack: Callable, model: nn.Module | None = None, batch: EpisodeBatch | None = None,
                        seed: int | None = None) -> float:
        """Accuracy of ``model`` (default: the deployed model) in eval mode under ``attack`` on
        ``batch`` (default :meth:`check_batch`), noise seeded with ``seed`` (default
        ``cfg.seed``), averaged over the ranks."""

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over the ranks of a distributed run (itself otherwise): decisions
        taken in hooks must agree on every rank."""


@contextmanager
def input_gradients_only(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``model``'s trainable parameters set not to require gradients, restored
    after: an attack differentiates with respect to its input only. Eager autograd skips the
    weight gradients anyway; a compiled model's backward is one graph that computes a gradient for
    every input that requires one, so without this it would compute every weight's gradient at
    every attack step (measured: ``scripts/bench.py --sections at``, docs/speed.md). The compiled
    forward then has a second graph for the frozen weights, compiled once."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def bn_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Run a block with ``model`` in ``"train"`` or ``"eval"`` mode (BatchNorm: batch statistics
    and running-stat updates, or the running statistics), restoring its previous mode after.

    Example:
        >>> with bn_mode(model, "eval"):
        ...     x_adv = attack(model, x, y, noise=noise)
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode={mode!r}; expected train or eval")
    was_training = model.training
    model.train(mode == "train")
    try:
        with warnings.catch_warnings():
            if mode == "train":  # on purpose (the recipe's reference attacks in train mode)
                warnings.simplefilter("ignore", TrainModeWarning)
            yield model
    finally:
        model.train(was_training)


class Recipe:
    """Base class of every recipe; the defaults are those of plain (single-task) training.

    A plain recipe implements :meth:`loss`; everything else has a default. ``__init__`` validates
    the recipe's own settings (raise :class:`ConfigError` there, or in :meth:`config_check`, which
    config validation calls before any work).

    Class attributes:
        name: the registry name (set by :func:`register_recipe`).
        episodic: trained on N-way K-shot episodes (meta-learning) rather than mini-batches.
        supports_awp: writes its loss as :meth:`inputs` + :meth:`objective`, so ``awp.gamma > 0``
            perturbs its ``"model"`` between the two (:mod:`metarobust.training.awp`).
        evaluation: ``"classifier"`` (the test split has the training classes: scored image by
            image) or ``"fewshot"`` (held-out classes: adapted and scored per frozen episode).
        attack_bn: BatchNorm mode while the training attack runs (``at.attack_bn=auto``).

    Args:
        cfg: the validated experiment config.
    """

    name: ClassVar[str] = ""
    episodic: ClassVar[bool] = False
    evaluation: ClassVar[str] = "classifier"
    attack_bn: ClassVar[str] = "train"
    supports_awp: ClassVar[bool] = False
    divergence_hint: ClassVar[str] = "lower optim.lr (or use at.amp=none)"
    """Appended to the error raised when training diverges."""
    eager_reason: ClassVar[str | None] = None
    """Why this recipe's steps always run eager whatever ``at.compile=auto`` would measure
    (``None``: the engine decides; MCG's flow)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.at = cfg.at
        self.bn = self.attack_bn if cfg.at.attack_bn == "auto" else cfg.at.attack_bn
        awp = getattr(cfg, "awp", None)
        self.awp = WeightPerturbation(awp.gamma, awp.warmup) if awp is not None and awp.gamma > 0 else None
        """AWP (``awp.gamma > 0``; recipes with :attr:`supports_awp`), else ``None``."""

    @classmethod
    def config_check(cls, cfg: ExperimentConfig) -> None:
        """Raise :class:`ConfigError` on settings this recipe cannot run (before any work)."""

    # -- pieces -----------------------------------------------------------------------------
    def roles(self) -> list[Role]:
        """The models to build; the first trainable one is the deployed model by default
        (initialised from ``at.init`` when it is set)."""
        return [Role("model", checkpoint=self.at.init)]

    def head_size(self, train: ImageStore) -> int:
        """Outputs of the trained models' classifier: the training split's classes."""
        return train.num_classes

    def build_model(self, arch: ModelConfig, in_channels: int, outputs: int, image_size: int,
                    dataset: str | None = None) -> nn.Module:
        """A role's network (default: the ``model`` registry); segmentation recipes build a
        few-shot segmenter with their own section's settings."""
        return build_model(arch, in_channels, outputs, image_size, dataset)

    @property
    def replays(self) -> int:
        """Optimizer steps per batch (Free AT: ``at.replays``)."""
        return 1

    def sampler(self, train: ImageStore, rank: int, world_size: int) -> BatchSampler | EpisodicSampler:
        """Shuffled mini-batches of ``at.batch_size`` images per rank (single-task episodes)."""
        at = self.at
        return BatchSampler(train, at.batch_size, seed=self.cfg.seed, rank=rank, world_size=world_size,
                            augment=resolve_augment(self.cfg, train))

    def schedule(self, train: ImageStore, world_size: int) -> tuple[int, int]:
        """``(total_steps, steps_per_epoch)``: ``at.epochs`` passes of ``at.batch_size`` x ranks."""
        at = self.at
        per_epoch = len(train) // (at.batch_size * world_size)
        if per_epoch < 1:
            raise ConfigError(f"at.batch_size={at.batch_size} x {world_size} process(es) exceeds the "
                              f"{len(train)} training images; lower at.batch_size")
        return at.epochs * per_epoch, per_epoch

    @classmethod
    def epochs(cls, cfg: ExperimentConfig) -> int:
        """The run's length in the schedule's epochs: ``at.epochs`` passes over the images."""
        return cfg.at.epochs

    @classmethod
    def default_optim(cls, cfg: ExperimentConfig | None = None) -> OptimConfig:
        """The ``optim`` settings a ``null`` field takes (``cfg``: for recipes whose defaults live
        in their own section, e.g. MCG's learning rates): SGD 0.1, momentum 0.9, weight decay 2e-4,
        x0.1 at epochs 100 and 150 (Madry et al.'s CIFAR-10 PGD-AT, the AT papers' optimizer)."""
        return OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=2e-4, schedule="piecewise",
                           milestones=[100.0, 150.0])

    def train_attack(self, **changes: Any) -> PGD:
        """The ``train_attack`` section as an attack (``metarobust list attacks``), with
        ``changes`` to its fields (a recipe's own radius, steps...) or to options of the attack
        itself (e.g. PGD's ``early_stop``; :class:`ConfigError` if the configured attack has none)."""
        section = {f.name for f in fields(AttackConfig)}
        attack = build_attack(replace(self.cfg.train_attack, **{k: v for k, v in changes.items() if k in section}))
        options = {k: v for k, v in changes.items() if k not in section}
        if options:
            known = {f.name for f in fields(attack)} if is_dataclass(attack) else set()
            if not set(options) <= known:
                raise ConfigError(f"train_attack.name={self.cfg.train_attack.name!r} has no option "
                                  f"{sorted(set(options) - known)}, which recipe {self.name!r} sets; use "
                                  f"train_attack.name=pgd")
            attack = replace(attack, **options)
        return attack

    def attack(self, model: nn.Module, attack: Callable, x: torch.Tensor, y: torch.Tensor,
               loss: Callable | None = None, noise: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        """``attack(model, x, y, loss, noise, **kw)`` with ``model`` in this recipe's BatchNorm
        mode; returns detached adversarial inputs ``[B, C, H, W]`` in [0, 1].

        PGD and APGD skip their input checks here (``check=False``): the engine's batches are in
        [0, 1] by construction, and the checks' host synchronisation would be one per step."""
        if isinstance(attack, (PGD, APGD)):
            kw.setdefault("check", False)
        with bn_mode(model, self.bn), input_gradients_only(model):
            return attack(model, x, y, loss, noise, **kw).detach()

    def loss(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        """The training loss of one batch (a scalar to back-propagate) and 0-dim statistics
        (never synchronised with the host here). Called under the configured autocast, with every
        trainable model in train mode. Plain recipes read ``batch.x [B, C, H, W]`` in [0, 1],
        ``batch.y [B]`` and ``batch.index [B]`` (store positions, for per-sample state).

        Default: :meth:`objective` of ``models["model"]`` on :meth:`inputs`; with AWP on (and past
        its warm-up), the model's weights are perturbed in between, against that same objective
        (:class:`~metarobust.training.awp.WeightPerturbation`), and :meth:`after_step` takes the
        perturbation off after the optimizer step."""
        inputs = self.inputs(models, batch, ctx)
        if self.awp is not None:
            self.awp.perturb(models.modules["model"], lambda forward: self.objective(forward, batch, inputs)[0], ctx)
        return self.objective(models["model"], batch, inputs)

    def inputs(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> Any:
        """What :meth:`objective` scores one batch on, made before any weight is perturbed: the
        adversarial inputs ``[B, C, H, W]`` (detached), and anything else the recipe needs from
        other models (LTD: the teacher's soft labels). Recipes that override :meth:`loss` whole
        need not write it (they take no AWP)."""
        raise NotImplementedError(f"recipe {self.name!r} implements neither loss() nor inputs() + objective()")

    def objective(self, forward: Callable[[torch.Tensor], torch.Tensor], batch: EpisodeBatch,
                  inputs: Any) -> tuple[torch.Tensor, Stats]:
        """The training loss of the model ``forward`` (``x [B, C, H, W] -> logits [B, K]``, in
        train mode: ``models["model"]``, or AWP's proxy) on what :meth:`inputs` made, and 0-dim
        statistics."""
        raise NotImplementedError

    def backward(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        """Accumulate the gradient of one batch into ``.grad``; return the detached float loss and
        the statistics. Default: :meth:`loss` under autocast, then ``scale(loss).backward()``."""
        with ctx.autocast():
            loss, stats = self.loss(models, batch, ctx)
        ctx.scale(loss).backward()
        return loss.detach().float(), stats

    def after_backward(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> None:
        """Called after ``backward`` and before the optimizer step (gradients are live)."""

    def after_step(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> None:
        """Called after the optimizer step. Default: take AWP's perturbation off the weights,
        keeping the optimizer's update (:meth:`WeightPerturbation.restore`)."""
        if self.awp is not None:
            self.awp.restore(models.modules["model"])

    def on_epoch_start(self, trainer: TrainerView) -> dict[str, float] | None:
        """Called before each epoch's first batch; may return metrics to log."""
        return None

    def on_epoch_end(self, trainer: TrainerView) -> dict[str, float] | None:
        """Called after each epoch's last step, before its checkpoint; may return metrics to log
        and call ``trainer.stop(reason)``."""
        return None

    def deployed(self, models: Models) -> nn.Module:
        """The model that is evaluated and saved as the run's ``model``: the first trainable
        role; a dual-BN role is returned as a copy with its main BatchNorms only (AdvProp)."""
        role = next(r for r in self.roles() if r.trainable)
        module = models.modules[role.name]
        return strip_aux_bn(copy.deepcopy(module)) if role.dual_bn else module

    def evaluation_learner(self, model: nn.Module, ways: int) -> LogisticProbe | MAML | None:
        """How ``model`` adapts to a ``ways``-way test episode's support set (``None``: it does not,
        a plain classifier). Both learners have ``adapt(params, sx, sy) -> fast`` and
        ``forward(fast, x) -> logits``."""
        return None

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values the recipe carries across steps (checkpointed)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class MetaRecipe(Recipe):
    """A meta-learning recipe: MAML/ANIL over N-way K-shot episodes, Adam on the meta-gradient.

    A subclass implements :meth:`task`, which returns the per-task function

        task_fn(params, support_x, support_y, query_x, query_y, noise) -> (loss, stats)

    (adapt on the support set, score the query set with an objective of
    :mod:`metarobust.training.objectives`); the engine runs it over the meta-batch in the per-task
    loop or under ``vmap`` (``meta.execution``) and accumulates the meta-gradient of the mean task
    loss. :attr:`noise` declares the random-start noise the tasks take, drawn per meta-batch
    outside any ``vmap`` from the engine's seeded generator, so both executions see identical
    perturbations: ``query`` ``[T, N*Q, ...]``, ``support`` ``[T, N*K, ...]``, ``support_steps``
    ``[T, S, N*K, ...]`` (one random start per inner step, ``S = meta.inner_steps``).

    Under ``torchrun`` every rank draws the whole meta-batch's episodes and noise from the same
    seeded generators and keeps its slice of the tasks; the meta-gradients are averaged over the
    ranks, so two processes compute what one does with the whole meta-batch.
    """

    episodic: ClassVar[bool] = True
    evaluation: ClassVar[str] = "fewshot"
    noise: ClassVar[tuple[str, ...]] = ()
    adapt: ClassVar[str | None] = None
    """Forces ``meta.adapt`` (``"head"`` for ANIL); ``None``: the config's value."""
    divergence_hint: ClassVar[str] = "lower optim.lr or meta.inner_lr"

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.execution = cfg.meta.execution
        self._task: TaskFn | None = None

    @classmethod
    def config_check(cls, cfg: ExperimentConfig) -> None:
        if cfg.at.amp == "fp16":
            raise ConfigError(f"at.amp=fp16 with the meta recipe {cls.name!r}: the meta-gradient is "
                              f"accumulated task by task without a GradScaler; use at.amp=bf16 or none")
        if cfg.at.compile == "on":
            raise ConfigError(f"at.compile=on with the meta recipe {cls.name!r}: the inner loop runs the "
                              f"model as a torch.func functional call, which compiles per task shape; "
                              f"set at.compile=auto or off (auto keeps meta recipes eager)")

    def noise_keys(self) -> tuple[str, ...]:
        """The kinds of random-start noise this recipe's tasks take (empty: no attack)."""
        return self.noise

    def task(self, maml: MAML, attack: Callable) -> TaskFn:
        """The per-task function (see the class docstring)."""
        raise NotImplementedError

    # -- pieces -----------------------------------------------------------------------------
    def roles(self) -> list[Role]:
        return [Role("model")]

    def head_size(self, train: ImageStore) -> int:
        return self.cfg.meta.ways

    def sampler(self, train: ImageStore, rank: int, world_size: int) -> EpisodicSampler:
        m = self.cfg.meta
        return EpisodicSampler(train, m.ways, m.train_shots, m.queries, m.meta_batch_size, seed=self.cfg.seed,
                               rank=rank, world_size=world_size)

    def schedule(self, train: ImageStore, world_size: int) -> tuple[int, int]:
        """``train.iterations`` meta-updates, each an epoch of the learning-rate schedule."""
        return self.cfg.train.iterations, 1

    @classmethod
    def epochs(cls, cfg: ExperimentConfig) -> int:
        """``train.iterations``: every meta-update is an epoch of the schedule."""
        return cfg.train.iterations

    @classmethod
    def default_optim(cls, cfg: ExperimentConfig | None = None) -> OptimConfig:
        """Adam at 1e-3, constant (MAML's and R-MAML's meta-optimizer)."""
        return OptimConfig(name="adam", lr=1e-3, momentum=0.0, weight_decay=0.0, schedule="constant", milestones=[])

    def learner(self, model: nn.Module, steps: int | None = None, first_order: bool | None = None) -> MAML:
        """MAML over ``model``'s parameters, adapting all of them or only the head (``meta.adapt``,
        forced by :attr:`adapt`); ``steps=meta.test_inner_steps`` for evaluation."""
        m = self.cfg.meta
        return MAML(functional_forward(model), m.inner_lr, m.inner_steps if steps is None else steps,
                    m.first_order if first_order is None else first_order,
                    adapted_names(model, self.adapt or m.adapt))

    def evaluation_learner(self, model: nn.Module, ways: int) -> MAML:
        """``meta.test_inner_steps`` clean first-order steps on the support set."""
        return self.learner(model, steps=self.cfg.meta.test_inner_steps, first_order=True)

    def draw_noise(self, batch: EpisodeBatch, generator: torch.Generator, rank: int = 0,
                   world_size: int = 1) -> Noise:
        """The meta-batch's random-start noise (``None`` if the tasks take none), drawn from
        ``generator`` in a fixed order (query first) with the task dimension first. Distributed,
        the whole meta-batch's noise (``world_size`` x the tasks) is drawn and rank ``rank``'s
        tasks kept."""
        drawn = {}
        attack = self.train_attack()
        t, world = batch.num_tasks, world_size
        for key in self.noise_keys():
            if key == "query":
                x = batch.query_x
            elif key == "support":
                x = batch.support_x
            else:  # support_steps: one random start per inner step
                sx = batch.support_x
                x = sx.unsqueeze(1).expand(sx.shape[0], self.cfg.meta.inner_steps, *sx.shape[1:])
            if world > 1:
                x = x.new_empty((t * world, *x.shape[1:]))
            noise = attack.init_noise(x, generator)
            if noise is not None:
                drawn[key] = noise[rank * t:(rank + 1) * t] if world > 1 else noise
        return drawn or None

    def task_fn(self, models: Models) -> TaskFn:
        """:meth:`task` over the trained model, built once."""
        if self._task is None:
            self._task = self.task(self.learner(models.modules["model"]), self.train_attack())
        return self._task

    def loss(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        """The mean task loss of the meta-batch (one graph over every task)."""
        model = models.modules["model"]
        execution = resolve_execution(self.execution, batch.query_x.device)
        losses, stats = run_tasks(self.task_fn(models), params_of(model), batch, self.draw_noise(batch, ctx.generator, ctx.rank, ctx.world_size),
                                  execution)
        return losses.mean(), {k: v.mean() for k, v in stats.items()}

    def backward(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        """The meta-gradient of the mean task loss, task by task (``loop``) or vectorised (``vmap``)."""
        model = models.modules["model"]
        noise = self.draw_noise(batch, ctx.generator, ctx.rank, ctx.world_size)
        execution = resolve_execution(self.execution, batch.query_x.device)
        return meta_backward(self.task_fn(models), params_of(model), batch, noise, execution, ctx.autocast)


def resolve_augment(cfg: ExperimentConfig, store: ImageStore) -> str:
    """``at.augment`` with ``auto`` resolved: random crop (4-pixel padding) + flip for 3-channel
    images of side >= 32 (CIFAR), none for the rest (MNIST, Omniglot)."""
    if cfg.at.augment != "auto":
        return cfg.at.augment
    c, h, _ = store.image_shape
    return "crop_flip" if c == 3 and h >= 32 else "none"


def register_recipe(name: str, description: str) -> Callable[[type[Recipe]], type[Recipe]]:
    """Register a :class:`Recipe` subclass in :data:`RECIPES` under ``name``.

    Example:
        >>> @register_recipe("my_at", "my adversarial training")
        ... class MyAT(Recipe):
        ...     def loss(self, models, batch, ctx): ...
    """

    def decorator(cls: type[Recipe]) -> type[Recipe]:
        if not (isinstance(cls, type) and issubclass(cls, Recipe)):
            raise TypeError(f"{cls!r} must subclass Recipe")
        cls.name = name
        RECIPES.register(name, description)(cls)
        return cls

    return decorator


def saved_model_config(saved: dict[str, Any], default: ModelConfig) -> ModelConfig:
    """The architecture a run was trained with, from the config its checkpoint saved (its
    ``model`` section; unknown keys of other versions dropped), else ``default``: how a recipe
    builds a role from another run (LTD's teacher, MCG's surrogates)."""
    model = (saved or {}).get("model")
    if not model:
        return default
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in model.items() if k in known})


def check_recipe(cls: type[Recipe], cfg: ExperimentConfig) -> None:
    """The engine options a recipe must support (``awp.gamma > 0``: :attr:`Recipe.supports_awp`;
    ``at.select=best``: a plain classifier), then the recipe's own :meth:`Recipe.config_check`;
    a :class:`ConfigError` before any work."""
    awp = getattr(cfg, "awp", None)
    if awp is not None and awp.gamma > 0 and not cls.supports_awp:
        takers = [name for name in RECIPES.names() if getattr(RECIPES.get(name), "supports_awp", False)]
        raise ConfigError(f"awp.gamma={awp.gamma} with recipe {cls.name!r}: AWP perturbs the weights of recipes "
                          f"written as adversarial inputs + objective, which are {takers}; set awp.gamma=0")
    if cfg.at.select == "best" and (cls.episodic or cls.evaluation != "classifier"):
        raise ConfigError(f"at.select=best with recipe {cls.name!r}: the best epoch is selected by the robust "
                          f"accuracy of a plain classifier on held-out images of its training classes, and "
                          f"{cls.name!r} is scored on few-shot episodes; use at.select=last")
    cls.config_check(cfg)


def build_recipe(cfg: ExperimentConfig) -> Recipe:
    """The recipe object of ``cfg.recipe`` (its checks run first)."""
    cls = RECIPES.get(cfg.recipe, "recipe")
    check_recipe(cls, cfg)
    return cls(cfg)


__all__ = ["RECIPES", "MetaRecipe", "Models", "Recipe", "Role", "StepContext", "Stats", "TrainerView",
           "bn_mode", "build_recipe", "check_recipe", "input_gradients_only", "register_recipe", "resolve_augment",
           "saved_model_config"]
