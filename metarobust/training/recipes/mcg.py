"""MCG's generator training as two recipes of the one trainer (META.md 3.3; ``docs/blackbox.md``).

MCG (Yin et al., arXiv 2301.00364) trains its conditional generator ``p(delta | x)`` on
white-box surrogates, in two stages, before any target is queried:

- ``mcg_pretrain`` (stage 1): maximum likelihood of MI-FGSM transfer perturbations given their
  images. The pairs are made once, before the first step, for every training image and every
  surrogate (:func:`~metarobust.blackbox.mcg.training.transfer_pairs`: only images a surrogate
  classifies correctly with confidence in ``mcg.config.confidence``), in fixed chunks of the
  store; a batch trains on its images' pairs. MI-FGSM has no randomness, so a resumed run
  rebuilds exactly the same pairs. Adam at ``pretrain_lr``, batches of ``pretrain_batch``,
  ``pretrain_epochs``, gradient-norm clip ``pretrain_clip``.
- ``mcg_reptile`` (stage 2): Reptile, each batch of ``meta_batch`` images one task: ``inner_steps``
  Adam steps of the surrogates' margin loss from the current weights ``theta``
  (:func:`~metarobust.blackbox.mcg.training.adapt`), then the outer step ``theta <- theta + beta
  (theta_task - theta)``. In the engine that step *is* an optimizer step: the recipe writes the
  Reptile "gradient" ``theta - theta_task`` into ``.grad`` and plain SGD at ``lr = beta``
  (:attr:`MCGConfig.outer_step`, no momentum, no weight decay) applies it, so the checkpoint,
  resume, NaN stop, logging and progress bar are the trainer's. Starts from stage 1's run.

Both read their settings from the ``mcg`` section: the surrogate runs (``metarobust train`` runs
of plain classifiers on ``data.dataset``), the threat model, the generator's sizes
(:class:`~metarobust.blackbox.mcg.GeneratorConfig`) and MCG's settings
(:class:`~metarobust.blackbox.mcg.MCGConfig`); the optimizer, batch size and epochs default to
the latter's (``optim`` fields left ``null``). Surrogates are frozen roles of the recipe (eval
mode, no gradient to their weights). ``metarobust blackbox-train`` runs the two stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from metarobust.blackbox.mcg.config import GeneratorConfig, MCGConfig, known_fields
from metarobust.blackbox.mcg.generator import MCGGenerator
from metarobust.blackbox.mcg.training import adapt, snapshot, surrogate_margin, transfer_pairs
from metarobust.config import ExperimentConfig, ModelConfig, OptimConfig, check_value, config_section
from metarobust.data.episode import EpisodeBatch
from metarobust.data.sampler import BatchSampler, to_float
from metarobust.data.store import ImageStore
from metarobust.errors import ConfigError
from metarobust.runs import load_checkpoint
from metarobust.training.recipes.base import (
    RECIPES,
    Models,
    Recipe,
    Role,
    Stats,
    StepContext,
    TrainerView,
    register_recipe,
    saved_model_config,
)

PAIR_CHUNK = 256
"""Images per MI-FGSM call when stage 1 makes its transfer pairs (memory only)."""
GENERATOR = "mcg_glow"
"""The ``model.name`` of the generator role (built by the recipe, not the model registry)."""


@config_section("mcg")
@dataclass
class MCGSection:
    """MCG's generator training (``mcg_pretrain``, ``mcg_reptile``; defaults: the paper's)."""

    surrogates: list[str] = field(default_factory=list)
    """Run folders or checkpoints of ``metarobust train`` (plain classifiers of ``data.dataset``)."""
    norm: str = "linf"
    eps: float | None = None
    """Radius; ``null``: the first surrogate's ``attack.eps`` (L-inf) or 0.5 (L2)."""
    generator: dict[str, Any] = field(default_factory=dict)
    """:class:`GeneratorConfig` fields (``levels``, ``steps``, ``hidden``...); its shape, norm and
    eps come from the data and the threat model."""
    config: dict[str, Any] = field(default_factory=dict)
    """:class:`MCGConfig` fields (``pretrain_epochs``, ``meta_epochs``, ``transfer_steps``...)."""
    stage1: str | None = None
    """``mcg_reptile``: the ``mcg_pretrain`` run (folder or checkpoint) it starts from."""

    def check(self) -> None:
        check_value(self.norm in ("linf", "l2"), "mcg.norm", self.norm, "linf or l2")
        check_value(self.eps is None or self.eps > 0, "mcg.eps", self.eps, "a radius > 0, or null")
        values = known_fields(GeneratorConfig, self.generator, "mcg.generator")
        for fixed in ("shape", "norm", "eps"):
            if fixed in values:
                raise ConfigError(f"mcg.generator.{fixed} is set from the data and the threat model (mcg.norm, "
                                  f"mcg.eps); remove it")
        self.mcg_config()

    def mcg_config(self) -> MCGConfig:
        return MCGConfig(**known_fields(MCGConfig, self.config, "mcg.config"))


def surrogate_config(path: str) -> dict[str, Any]:
    """The saved config of a surrogate run (``{}`` when it has none); a clear error when ``path``
    is not a run of ``metarobust train``."""
    try:
        return dict(load_checkpoint(path, "cpu").get("config") or {})
    except ConfigError as exc:
        raise ConfigError(f"mcg.surrogates: {path!r}: {exc}; train the surrogates first, e.g. "
                          f"metarobust train configs/at/mnist_natural.yaml") from None


class MCGRecipe(Recipe):
    """What both stages share: the ``mcg`` section, the generator and the frozen surrogates,
    plain batches of the training images (no augmentation), and no test-time evaluation (the
    generator is scored by ``metarobust blackbox``, against a target)."""

    evaluation: ClassVar[str] = "generator"
    attack_bn: ClassVar[str] = "eval"
    divergence_hint: ClassVar[str] = "lower optim.lr (stage 1: MCG's pretrain_lr; stage 2: the outer step beta)"
    eager_reason: ClassVar[str | None] = "MCG's flow runs eager (its steps are not in the compile measurements)"

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.section: MCGSection = cfg.mcg
        self.settings = self.section.mcg_config()
        self.saved = [surrogate_config(path) for path in self.section.surrogates]
        self.eps = self.resolve_eps()

    @classmethod
    def config_check(cls, cfg: ExperimentConfig) -> None:
        section = cfg.mcg
        if not section.surrogates:
            raise ConfigError(f"mcg.surrogates is empty; recipe {cls.name!r} trains MCG's generator on white-box "
                              f"surrogates: name run folders of metarobust train")
        if cfg.at.amp != "none" or cfg.at.compile == "on":
            raise ConfigError(f"at.amp={cfg.at.amp} / at.compile={cfg.at.compile} with recipe {cls.name!r}: the "
                              f"flow's log-determinants run in float32 and eager; set at.amp=none, at.compile=auto "
                              f"(auto keeps it eager)")

    def resolve_eps(self) -> float:
        if self.section.eps is not None:
            return float(self.section.eps)
        if self.section.norm == "l2":
            return 0.5
        attack = (self.saved[0].get("attack") or {}) if self.saved else {}
        if "eps" not in attack:
            raise ConfigError(f"mcg.eps is null and the surrogate {self.section.surrogates[0]!r} records no "
                              f"attack.eps; set mcg.eps")
        return float(attack["eps"])

    def generator_config(self, shape: tuple[int, int, int]) -> GeneratorConfig:
        return GeneratorConfig(shape=shape, norm=self.section.norm, eps=self.eps,
                               **known_fields(GeneratorConfig, self.section.generator, "mcg.generator"))

    # -- pieces -----------------------------------------------------------------------------
    def roles(self) -> list[Role]:
        surrogates = []
        for i, (path, saved) in enumerate(zip(self.section.surrogates, self.saved, strict=True)):
            kind = saved.get("recipe")
            if kind in RECIPES.names() and RECIPES.get(kind, "recipe").episodic:
                raise ConfigError(f"mcg.surrogates: {path!r} is a meta-learner ({kind}), scoring episode labels; "
                                  f"recipe {self.name!r} trains on plain classifiers of the training classes. "
                                  f"metarobust blackbox-train takes meta-learner surrogates through its few-shot "
                                  f"path (docs/blackbox.md, MCG on few-shot targets)")
            dataset = (saved.get("data") or {}).get("dataset")
            if dataset is not None and dataset != self.cfg.data.dataset:
                raise ConfigError(f"mcg.surrogates: {path!r} was trained on {dataset!r}, this run's data.dataset is "
                                  f"{self.cfg.data.dataset!r}; give surrogates of one dataset")
            arch = saved_model_config(saved, ModelConfig())
            surrogates.append(Role(f"surrogate{i}", trainable=False, model=arch, checkpoint=path))
        return [Role("model", model=ModelConfig(name=GENERATOR), checkpoint=self.start()), *surrogates]

    def start(self) -> str | None:
        """The checkpoint the generator starts from (``None``: fresh)."""
        return None

    def build_model(self, arch: ModelConfig, in_channels: int, outputs: int, image_size: int,
                    dataset: str | None = None) -> nn.Module:
        if arch.name == GENERATOR:
            return MCGGenerator(self.generator_config((in_channels, image_size, image_size)))
        return super().build_model(arch, in_channels, outputs, image_size, dataset)

    def batch_size(self) -> int:
        raise NotImplementedError

    def sampler(self, train: ImageStore, rank: int, world_size: int) -> BatchSampler:
        if world_size > 1:
            raise ConfigError(f"recipe {self.name!r} runs in one process (no torchrun)")
        return BatchSampler(train, min(self.batch_size(), len(train)), seed=self.cfg.seed)

    def schedule(self, train: ImageStore, world_size: int) -> tuple[int, int]:
        per_epoch = max(1, len(train) // self.batch_size())
        return self.epochs(self.cfg) * per_epoch, per_epoch

    @staticmethod
    def surrogates(models: Models) -> list[nn.Module]:
        return [models.raw[name] for name in models if name.startswith("surrogate")]

    def on_epoch_end(self, trainer: TrainerView) -> dict[str, float]:
        """The mean surrogate margin of fresh samples on the epoch's first batch (lower: more
        adversarial; what stage 2 lowers)."""
        batch = trainer.check_batch()
        generator = trainer.models.modules["model"]
        with torch.no_grad():
            delta = generator.sample(batch.x, trainer.generator)
            margin = surrogate_margin(self.surrogates(trainer.models), batch.x, batch.y, delta, self.settings.kappa)
        return {"fresh_margin": float(margin.mean())}


@register_recipe("mcg_pretrain", "MCG stage 1: likelihood of MI-FGSM transfer perturbations given the image")
class MCGPretrain(MCGRecipe):
    """Stage 1 (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.store: ImageStore | None = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def epochs(cls, cfg: ExperimentConfig) -> int:
        return cfg.mcg.mcg_config().pretrain_epochs

    @classmethod
    def default_optim(cls, cfg: ExperimentConfig | None = None) -> OptimConfig:
        lr = (cfg.mcg.mcg_config() if cfg is not None else MCGConfig()).pretrain_lr
        return OptimConfig(name="adam", lr=lr, momentum=0.0, weight_decay=0.0, schedule="constant", milestones=[])

    def batch_size(self) -> int:
        return self.settings.pretrain_batch

    def sampler(self, train: ImageStore, rank: int, world_size: int) -> BatchSampler:
        self.store = train
        return super().sampler(train, rank, world_size)

    def make_pairs(self, models: Models) -> None:
        """Every training image's transfer pair from every surrogate, in fixed chunks of
        ``PAIR_CHUNK`` images of the store (the same pairs whatever the batches, and after a
        resume): per surrogate ``(kept bool [N], delta [N, C, H, W])``."""
        x_all, y_all = self.store.images, self.store.labels
        self._pairs = []
        for surrogate in self.surrogates(models):
            kept = torch.zeros(len(x_all), dtype=torch.bool, device=y_all.device)
            delta = torch.zeros(len(x_all), *x_all.shape[1:], device=y_all.device)
            for lo in range(0, len(x_all), PAIR_CHUNK):
                x = to_float(x_all[lo:lo + PAIR_CHUNK])
                _, d, keep = transfer_pairs(surrogate, x, y_all[lo:lo + PAIR_CHUNK], self.section.norm, self.eps,
                                            self.settings)
                kept[lo:lo + PAIR_CHUNK] = keep
                delta[lo:lo + PAIR_CHUNK][keep] = d
            self._pairs.append((kept, delta))
        if not any(bool(kept.any()) for kept, _ in self._pairs):
            raise ConfigError(f"recipe {self.name!r}: no training image is classified correctly by a surrogate with "
                              f"confidence in mcg.config.confidence={self.settings.confidence}; widen it or check "
                              f"the surrogate runs")

    def on_epoch_end(self, trainer: TrainerView) -> dict[str, float]:
        """The fresh-sample margin, and ``pairs_total``: the transfer pairs stage 1 trains on."""
        total = sum(int(kept.sum()) for kept, _ in self._pairs or [])
        return {**super().on_epoch_end(trainer), "pairs_total": float(total)}

    def pairs(self, models: Models, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [M, C, H, W], delta [M, C, H, W])``: the batch's transfer pairs from every surrogate
        (an image appears once per surrogate that keeps it)."""
        if self._pairs is None:
            self.make_pairs(models)
        x, index = batch.x, batch.index
        xs, deltas = [], []
        for kept, delta in self._pairs:
            mine = kept[index]
            xs.append(x[mine])
            deltas.append(delta[index[mine]])
        return torch.cat(xs), torch.cat(deltas)

    def loss(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        generator: MCGGenerator = models["model"]
        xs, deltas = self.pairs(models, batch)
        noise = self.settings.pretrain_noise * torch.randn((len(xs), *generator.cfg.flow_shape),
                                                           generator=ctx.generator, device=ctx.generator.device)
        if not len(xs):  # no surrogate keeps any image of this batch: a zero loss with a graph
            return sum(p.sum() for p in generator.parameters()) * 0.0, {"pairs": torch.zeros(())}
        bits = generator.nll(xs, deltas, noise.to(xs.device)).mean()
        return bits, {"pairs": torch.tensor(float(len(xs)))}

    def after_backward(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> None:
        nn.utils.clip_grad_norm_(models.modules["model"].parameters(), self.settings.pretrain_clip)


@register_recipe("mcg_reptile", "MCG stage 2: Reptile on the surrogates' margin loss, from stage 1's generator")
class MCGReptile(MCGRecipe):
    """Stage 2 (see the module docstring)."""

    @classmethod
    def config_check(cls, cfg: ExperimentConfig) -> None:
        super().config_check(cfg)
        if not cfg.mcg.stage1:
            raise ConfigError("mcg.stage1 is empty; recipe 'mcg_reptile' starts from the generator of an "
                              "mcg_pretrain run: name its run folder")
        optim = cfg.optim
        if (optim.name not in (None, "sgd") or optim.momentum not in (None, 0.0)
                or optim.weight_decay not in (None, 0.0)):
            raise ConfigError(f"optim.name={optim.name}, momentum={optim.momentum}, weight_decay={optim.weight_decay} "
                              f"with recipe 'mcg_reptile': the optimizer step is Reptile's outer interpolation, "
                              f"plain SGD; leave them null (or sgd, 0, 0)")

    def start(self) -> str | None:
        return self.section.stage1

    @classmethod
    def epochs(cls, cfg: ExperimentConfig) -> int:
        return cfg.mcg.mcg_config().meta_epochs

    @classmethod
    def default_optim(cls, cfg: ExperimentConfig | None = None) -> OptimConfig:
        beta = (cfg.mcg.mcg_config() if cfg is not None else MCGConfig()).outer_step
        return OptimConfig(name="sgd", lr=beta, momentum=0.0, weight_decay=0.0, schedule="constant", milestones=[])

    def batch_size(self) -> int:
        return self.settings.meta_batch

    def backward(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        """One Reptile task: the inner loop from ``theta`` (the latents drawn as
        :func:`~metarobust.blackbox.mcg.training.reptile_task` draws them), then ``theta`` restored
        and ``theta - theta_task`` written as its gradient (SGD at ``lr = beta`` then
        interpolates). The loss logged: the surrogate margin of a fresh sample at ``theta_task``."""
        generator: MCGGenerator = models.modules["model"]
        surrogates = self.surrogates(models)
        if self.settings.one_surrogate_per_task:
            pick = int(torch.randint(len(surrogates), (), generator=ctx.generator, device=ctx.generator.device))
            surrogates = [surrogates[pick]]
        x, y, s = batch.x, batch.y, self.settings
        theta = snapshot(generator)
        adapt(generator, surrogates, x, y, s.inner_steps, s.inner_lr, s.kappa,
              lambda: generator.sample_latents(x, ctx.generator))
        with torch.no_grad():
            after = surrogate_margin(surrogates, x, y, generator.sample(x, ctx.generator), s.kappa).mean()
            for p, start in zip(generator.parameters(), theta, strict=True):
                p.grad = start - p.detach()  # theta - theta_task ...
                p.copy_(start)               # ... at theta: the step moves beta of the way to theta_task
            moved = torch.sqrt(sum(p.grad.pow(2).sum() for p in generator.parameters()))
        return after, {"task_distance": moved}


__all__ = ["GENERATOR", "MCGPretrain", "MCGRecipe", "MCGReptile", "MCGSection"]
