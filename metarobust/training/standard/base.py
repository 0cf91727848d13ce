"""The recipe interface of standard (single-task) adversarial training.

A plain mini-batch is a degenerate episode (one task, no support set, global labels, no
adaptation), so standard adversarial training runs in the same engine as meta-learning
(:mod:`metarobust.training.engine`); what differs between PGD-AT, TRADES, MART, MAT, LTD, AdvProp,
Free/Fast AT, FRL, BAT... is a :class:`StandardRecipe`, a small class that names its pieces
(``shared/methods/ADVERSARIAL_TRAINING.md`` section 5):

- **model roles** (:meth:`StandardRecipe.roles`): one trainable ``"model"`` by default; several
  trainable peers (MAT); frozen teachers loaded from a checkpoint (LTD, Hou et al.). Every
  trainable role is built from ``cfg.model`` (or the role's own :class:`ModelConfig`) and
  optimised by one SGD optimizer over all trainable parameters: with peer predictions detached,
  the sum of the per-model losses gives each model exactly its own gradient, so one optimizer is
  N optimizers stepped together.
- **attack**: built by the recipe from ``cfg.train_attack`` and run with :meth:`StandardRecipe.attack`,
  which puts the attacked model in the recipe's BatchNorm mode (:attr:`StandardRecipe.attack_bn`,
  overridable with ``at.attack_bn``) and restores train mode afterwards. Noise comes from
  ``ctx.generator`` (checkpointed, so a resumed run draws the same perturbations).
- **objective** (:meth:`StandardRecipe.loss`): the loss of a batch ``x [B, C, H, W]`` in [0, 1],
  ``y [B]``, with the images' store indices ``index [B]`` for per-sample state, plus 0-dim
  statistics (never synced with the host here: the engine averages them on the device and reads
  them every ``train.log_every`` steps). Per-sample weights and per-class epsilons (MART, FRL)
  are computed here: :class:`~metarobust.attacks.PGD` takes ``eps`` as a float or a tensor ``[B]``.
- **BatchNorm routing**: modules are put in ``train``/``eval`` mode with :func:`bn_mode`; dual-BN
  models (AdvProp) are routed by the recipe around each forward; :meth:`deployed` says which
  model (and route) is evaluated and saved as the run's ``model``.
- **step policy**: :attr:`StandardRecipe.replays` optimizer steps per mini-batch (Free AT's m),
  each with its own forward/backward, and :meth:`after_backward` to read input gradients before
  the step (Free AT's persistent perturbation).
- **epoch hooks**: :meth:`on_epoch_start` / :meth:`on_epoch_end` get the trainer
  (:class:`TrainerView`), e.g. to update per-class weights on the held-out split (FRL) or to stop
  and restore the best weights (Fast AT's early stop). They may return metrics to log.
- **state**: anything a recipe keeps across steps (a persistent perturbation, multipliers, a
  best-weights snapshot) goes into :meth:`state_dict` so that a resumed run is exact.

Forward passes whose loss is back-propagated use ``models[name]`` (the module, or its
DistributedDataParallel wrapper under ``torchrun``); attacks, teachers and no-grad forwards use
``models.raw[name]`` (never the DDP wrapper: a forward without its backward would stall the
gradient reduction).

Example (PGD-AT, the whole recipe)::

    @register_standard("pgd_at", "PGD-AT (Madry et al. 2018): CE on PGD examples")
    class PGDAT(StandardRecipe):
        def loss(self, models, batch, ctx):
            attack = self.train_attack()
            x_adv = self.attack(models.raw["model"], attack, batch.x, batch.y,
                                noise=attack.init_noise(batch.x, ctx.generator))
            logits = models["model"](x_adv)
            return F.cross_entropy(logits, batch.y), {"adv_acc": accuracy(logits, batch.y)}
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from metarobust.attacks import build_attack
from metarobust.attacks.pgd import PGD
from metarobust.config import ExperimentConfig, ModelConfig
from metarobust.errors import ConfigError

Stats = dict[str, torch.Tensor]


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
            deployed model drops the twins (:meth:`StandardRecipe.deployed`).
    """

    name: str
    trainable: bool = True
    model: ModelConfig | None = None
    checkpoint: str | None = None
    dual_bn: bool = False


@dataclass
class Batch:
    """One mini-batch on the device: ``x [B, C, H, W]`` float in [0, 1] (augmented), ``y [B]``
    int64 global labels, ``index [B]`` int64 positions in the training store (per-sample state)."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor


@dataclass
class StepContext:
    """Where training stands when :meth:`StandardRecipe.loss` is called.

    Attributes:
        step: optimizer steps taken so far (replays included).
        epoch: the current epoch, from 0.
        progress: fraction of all optimizer steps done, in [0, 1) (for ramps: eps schedules...).
        replay: which replay of the current batch (0 .. ``replays - 1``).
        generator: the attack-noise generator (on the device; checkpointed).
        num_classes: classes of the training split.
    """

    step: int
    epoch: int
    progress: float
    replay: int
    generator: torch.Generator
    num_classes: int


class Models(Mapping[str, nn.Module]):
    """The recipe's models by role name.

    ``models[name]``: the module to use for forward passes whose loss is back-propagated (its
    DistributedDataParallel wrapper when distributed). ``models.raw[name]``: the plain (possibly
    compiled) module for attacks, teachers and no-grad forwards. ``models.modules[name]``: the
    uncompiled ``nn.Module`` (state dicts, routing attributes). ``models.trainable``: the names
    of the trainable roles, in :meth:`StandardRecipe.roles` order.
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
    """What epoch hooks may use of the trainer (:class:`~metarobust.training.standard.trainer.StandardTrainer`)."""

    cfg: ExperimentConfig
    models: Models
    device: torch.device
    epoch: int
    step_count: int
    generator: torch.Generator
    num_classes: int
    """Classes of the training split."""

    def check_batch(self) -> Batch:
        """The held-out images (``at.holdout``), else the current epoch's first training batch."""

    def autocast(self) -> Any:
        """The configured autocast context (``at.amp``)."""

    def stop(self, reason: str) -> None:
        """End training after this epoch (the run records ``reason``)."""

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over the ranks of a distributed run (itself otherwise): decisions
        taken in hooks must agree on every rank."""


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
        yield model
    finally:
        model.train(was_training)


def full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) as float32 for losses; float32/float64 unchanged."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of ``argmax(logits) == y`` as a 0-dim tensor (no host sync)."""
    return (logits.detach().argmax(dim=-1) == y).float().mean()


def gaussian_start(x: torch.Tensor, sigma: float, eps: float | torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """Noise for :class:`PGD` (``random_start=True``, L-inf) that starts at ``x + sigma * N(0, I)``
    instead of a uniform point of the ball: the start TRADES, MART, FRL and BAT use
    (``sigma = 0.001``). PGD scales the raw noise by ``eps``, so it is divided by ``eps`` here."""
    eps_t = torch.as_tensor(eps, device=x.device, dtype=x.dtype)
    if eps_t.dim() > 0:
        eps_t = eps_t.view(-1, *([1] * (x.dim() - 1)))
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return noise * sigma / eps_t.clamp_min(1e-12)


def start_at(x_start: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Noise for an L-inf :class:`PGD` (``random_start=True``) that starts exactly at ``x_start``
    (a point of the eps-ball around ``x``, e.g. another attack's output: Backward Smoothing, local
    balls). PGD scales the raw L-inf noise by ``eps``, so it is ``(x_start - x) / eps``."""
    eps_t = torch.as_tensor(eps, device=x.device, dtype=x.dtype)
    if eps_t.dim() > 0:
        eps_t = eps_t.view(-1, *([1] * (x.dim() - 1)))
    return (x_start - x) / eps_t.clamp_min(1e-12)


class StandardRecipe:
    """Base class of the standard-AT recipes (see the module docstring for the pieces).

    Subclasses set :attr:`attack_bn` (their reference code's BatchNorm mode during the attack)
    and implement :meth:`loss`; everything else has a default. ``__init__`` validates the
    recipe's config fields (raise :class:`ConfigError` there, before any work).

    Args:
        cfg: the validated experiment config (``cfg.at``, ``cfg.train_attack``...).
    """

    kind: ClassVar[str] = "standard"
    """Tells the CLI and the engine that this recipe trains a plain classifier."""
    name: ClassVar[str] = ""
    attack_bn: ClassVar[str] = "train"
    """BatchNorm mode while the training attack runs (``at.attack_bn=auto`` uses this)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.at = cfg.at
        self.bn = self.attack_bn if cfg.at.attack_bn == "auto" else cfg.at.attack_bn

    # -- pieces -----------------------------------------------------------------------------
    def roles(self) -> list[Role]:
        """The models to build; the first trainable one is the deployed model by default
        (initialised from ``at.init`` when it is set)."""
        return [Role("model", checkpoint=self.at.init)]

    @property
    def replays(self) -> int:
        """Optimizer steps per mini-batch (Free AT: ``at.replays``)."""
        return 1

    def train_attack(self, **changes: Any) -> PGD:
        """The ``train_attack`` section as an attack (fields overridden by ``changes``)."""
        from dataclasses import replace

        return build_attack(replace(self.cfg.train_attack, **changes))

    def attack(self, model: nn.Module, attack: Callable, x: torch.Tensor, y: torch.Tensor,
               loss: Callable | None = None, noise: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        """``attack(model, x, y, loss, noise, **kw)`` with ``model`` in this recipe's BatchNorm
        mode; returns detached adversarial inputs ``[B, C, H, W]`` in [0, 1]."""
        with bn_mode(model, self.bn):
            return attack(model, x, y, loss, noise, **kw).detach()

    def loss(self, models: Models, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        """The training loss of one batch (a scalar to back-propagate) and 0-dim statistics.

        Called under the configured autocast, with every trainable model in train mode.
        """
        raise NotImplementedError

    def after_backward(self, models: Models, batch: Batch, ctx: StepContext) -> None:
        """Called after ``backward`` and before the optimizer step (gradients are live)."""

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
        if role.dual_bn:
            from metarobust.models.dual_bn import strip_aux_bn

            return strip_aux_bn(copy.deepcopy(module))
        return module

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values the recipe carries across steps (checkpointed)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def register_standard(name: str, description: str) -> Callable[[type[StandardRecipe]], type[StandardRecipe]]:
    """Register a :class:`StandardRecipe` subclass in :data:`~metarobust.training.recipes.RECIPES`
    (``metarobust list recipes``), marked as a standard recipe."""

    def decorator(cls: type[StandardRecipe]) -> type[StandardRecipe]:
        # Imported here, not at the top: recipes.py imports the recipe modules at its end, and a
        # recipe module imported first must not find this module half-initialised.
        from metarobust.training.recipes import RECIPES

        if not (isinstance(cls, type) and issubclass(cls, StandardRecipe)):
            raise TypeError(f"{cls!r} must subclass StandardRecipe")
        cls.name = name
        RECIPES.register(name, description)(cls)
        return cls

    return decorator


def standard_recipe(cfg: ExperimentConfig) -> StandardRecipe:
    """The recipe object of ``cfg.recipe`` (a :class:`ConfigError` if it is a meta recipe)."""
    from metarobust.training.recipes import RECIPES

    factory = RECIPES.get(cfg.recipe, "recipe")
    if not (isinstance(factory, type) and issubclass(factory, StandardRecipe)):
        raise ConfigError(f"recipe={cfg.recipe!r} is a meta-learning recipe; standard training needs "
                          f"one of {standard_recipe_names()}")
    return factory(cfg)


def standard_recipe_names() -> list[str]:
    from metarobust.training.recipes import RECIPES

    return [n for n in RECIPES.names() if getattr(RECIPES.get(n), "kind", "meta") == "standard"]


__all__ = ["Batch", "Models", "Role", "StandardRecipe", "StepContext", "Stats", "TrainerView", "accuracy",
           "bn_mode", "full_precision", "gaussian_start", "register_standard", "start_at", "standard_recipe", "standard_recipe_names"]
