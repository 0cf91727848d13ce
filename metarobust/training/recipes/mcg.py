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

**Few-shot surrogates** [ours; META.md covers plain classifiers only]: when the surrogate runs are
meta-learners (a few-shot recipe, e.g. ``maml`` or ``rfs``), the training data is a pool of
``mcg.episodes`` episodes drawn once (seeded) from the training split in the surrogates' episode
shape (``meta.ways``, ``meta.test_shots``, ``meta.queries``: what a target is fine-tuned and
attacked on), and each surrogate is fine-tuned on an episode's support set with its own
evaluation learner (:meth:`Recipe.evaluation_learner`, as evaluation fine-tunes a target,
:func:`~metarobust.meta.functional.adapt_episode`) before it scores that episode's query images
with the episode's labels. Stage 1's pairs come from each episode's adapted surrogates on its
query images; stage 2 takes **one episode per step** (its whole query set is the Reptile task),
the episodes in a fresh seeded order each epoch: at attack time the generator meets one episode's
query set with surrogates adapted to it. Adaptation is deterministic, so a resumed run rebuilds
the same pairs and tasks.

Both read their settings from the ``mcg`` section: the surrogate runs (``metarobust train`` runs
of ``data.dataset``: all plain classifiers or all meta-learners), the threat model, the generator's sizes
(:class:`~metarobust.blackbox.mcg.GeneratorConfig`) and MCG's settings
(:class:`~metarobust.blackbox.mcg.MCGConfig`); the optimizer, batch size and epochs default to
the latter's (``optim`` fields left ``null``). Surrogates are frozen roles of the recipe (eval
mode, no gradient to their weights). ``metarobust blackbox-train`` runs the two stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from metarobust.blackbox.mcg.config import GeneratorConfig, MCGConfig, known_fields
from metarobust.blackbox.mcg.generator import MCGGenerator
from metarobust.blackbox.mcg.training import adapt, snapshot, surrogate_margin, transfer_pairs
from metarobust.config import (
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    check_value,
    config_from_dict,
    config_section,
)
from metarobust.data.episode import EpisodeBatch
from metarobust.data.sampler import BatchSampler, EpisodicSampler, check_episode_shape, to_float
from metarobust.data.store import ImageStore
from metarobust.errors import ConfigError
from metarobust.meta.functional import adapt_episode, bind
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
    """Run folders or checkpoints of ``metarobust train`` of ``data.dataset``: all plain
    classifiers, or all meta-learners of one ``meta.ways`` (few-shot surrogates)."""
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
    episodes: int = 200
    """Few-shot surrogates: the training episodes, drawn once (seeded by ``seed``) from the
    training split; each is one stage-2 task [ours]. Unused with plain classifiers."""

    def check(self) -> None:
        check_value(self.norm in ("linf", "l2"), "mcg.norm", self.norm, "linf or l2")
        check_value(self.episodes >= 1, "mcg.episodes", self.episodes, "an integer >= 1")
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


def surrogate_kind(recipe: str | None) -> str:
    """``"fewshot"`` for a run of ``recipe`` if that recipe is evaluated on few-shot episodes (a
    meta-learner, RFS), else ``"classifier"`` (also for a run that records no known recipe)."""
    if recipe in RECIPES.names() and RECIPES.get(recipe, "recipe").evaluation == "fewshot":
        return "fewshot"
    return "classifier"


class EpisodePool:
    """Few-shot surrogates' training data [ours]: ``episodes`` ``ways``-way ``shots``-shot
    ``queries``-query episodes of ``train``, drawn once (on the CPU, seeded: the same episodes on
    any device).

    Attributes:
        store: the episodes' query images, episode by episode (``episodes * ways * queries``
            images, ``per_episode`` each), labelled with their episode labels ``0..ways-1``;
            what the samplers draw from and stage 1's pairs index.
        support_index: ``[episodes, ways * shots]`` positions in ``train`` of each support set;
            ``support_y``: their episode labels.
    """

    def __init__(self, train: ImageStore, ways: int, shots: int, queries: int, episodes: int, seed: int) -> None:
        check_episode_shape(train, ways, shots, queries, "meta (of the surrogate runs)")
        drawn = EpisodicSampler(train.to("cpu"), ways, shots, queries, tasks=episodes, seed=seed).sample()
        device = train.images.device
        self.train_images = train.images
        self.support_index = drawn.support_index.to(device)
        self.support_y = drawn.support_y.to(device)
        query = drawn.query_index.to(device)
        self.episodes, self.per_episode = query.shape
        self.store = ImageStore(train.images[query.reshape(-1)], drawn.query_y.reshape(-1).to(device),
                                [f"label {i}" for i in range(ways)], f"{train.name} ({episodes} episodes' query sets)")

    def support(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Episode ``t``'s support set ``(x [N*K, C, H, W] in [0, 1], y [N*K])``."""
        return to_float(self.train_images[self.support_index[t]]), self.support_y[t]

    def span(self, t: int) -> slice:
        """Episode ``t``'s query images in :attr:`store`."""
        return slice(t * self.per_episode, (t + 1) * self.per_episode)

    def episode_of(self, index: torch.Tensor) -> int:
        """The episode of a batch of one episode's positions ``index [B]`` in :attr:`store`."""
        return int(index[0]) // self.per_episode


class EpisodeSampler:
    """Stage 2 on few-shot surrogates: one episode of ``pool`` per call, its whole query set as a
    plain batch (episode labels; ``index``: positions in ``pool.store``), the episodes in a fresh
    seeded order each pass. Checkpointed as :class:`~metarobust.data.sampler.BatchSampler` is."""

    def __init__(self, pool: EpisodePool, seed: int) -> None:
        self.pool = pool
        self.generator = torch.Generator(device=pool.store.images.device)
        self.generator.manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long, device=pool.store.images.device)
        self.position = pool.episodes  # a new order on the first call

    def sample(self) -> EpisodeBatch:
        pool = self.pool
        if self.position >= pool.episodes:
            self.order = torch.randperm(pool.episodes, generator=self.generator, device=self.order.device)
            self.position = 0
        index = self.order[self.position] * pool.per_episode + torch.arange(pool.per_episode, device=self.order.device)
        self.position += 1
        return EpisodeBatch.plain(to_float(pool.store.images[index]), pool.store.labels[index], index)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "order": self.order, "position": torch.tensor(self.position)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].to(self.order.device)
        self.position = int(state["position"])


class MCGRecipe(Recipe):
    """What both stages share: the ``mcg`` section, the generator and the frozen surrogates,
    plain batches of the training images (no augmentation) or, with few-shot surrogates, of an
    :class:`EpisodePool`'s query images, and no test-time evaluation (the generator is scored by
    ``metarobust blackbox``, against a target)."""

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
        self.fewshot = self.check_surrogates()
        self.surrogate_cfgs = [config_from_dict(saved) for saved in self.saved] if self.fewshot else []
        self.store: ImageStore | None = None
        """What the batches are drawn from (set by :meth:`sampler`): the training images, or the pool's."""
        self.pool: EpisodePool | None = None
        self._learners: list[Any] | None = None

    def check_surrogates(self) -> bool:
        """Refuse surrogates that mix kinds or come from another dataset (or, few-shot, another
        ``meta.ways``); whether they are few-shot learners."""
        paths = self.section.surrogates
        kinds = {surrogate_kind(saved.get("recipe")): path for path, saved in zip(paths, self.saved, strict=True)}
        if len(kinds) > 1:
            raise ConfigError(f"mcg.surrogates mix plain classifiers ({kinds['classifier']!r}) and few-shot learners "
                              f"({kinds['fewshot']!r}); a generator trains on one kind: give surrogates of the "
                              f"target's kind")
        ways = set()
        for path, saved in zip(paths, self.saved, strict=True):
            dataset = (saved.get("data") or {}).get("dataset")
            if dataset is not None and dataset != self.cfg.data.dataset:
                raise ConfigError(f"mcg.surrogates: {path!r} was trained on {dataset!r}, this run's data.dataset is "
                                  f"{self.cfg.data.dataset!r}; give surrogates of one dataset")
            ways.add((saved.get("meta") or {}).get("ways"))
        fewshot = "fewshot" in kinds
        if fewshot and len(ways) > 1:
            raise ConfigError(f"mcg.surrogates are meta-learners of different meta.ways {sorted(ways)}; a generator "
                              f"trains on one episode shape: give surrogates of one meta.ways")
        return fewshot

    @property
    def episode_shape(self) -> tuple[int, int, int]:
        """Few-shot surrogates: ``(ways, shots, queries)`` of the pool's episodes, the first
        run's ``meta.ways``, ``meta.test_shots``, ``meta.queries``."""
        m = self.surrogate_cfgs[0].meta
        return m.ways, m.test_shots, m.queries

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
            arch = saved_model_config(saved, ModelConfig())
            outputs = None  # the training split's classes (plain classifiers, RFS' backbone)
            if self.fewshot and RECIPES.get(self.surrogate_cfgs[i].recipe, "recipe").episodic:
                outputs = self.surrogate_cfgs[i].meta.ways  # a meta-learner's head scores episode labels
            surrogates.append(Role(f"surrogate{i}", trainable=False, model=arch, checkpoint=path, outputs=outputs))
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

    one_episode_per_batch: ClassVar[bool] = False
    """With few-shot surrogates, a batch is one pool episode's query set (stage 2's tasks)."""

    def sampler(self, train: ImageStore, rank: int, world_size: int) -> BatchSampler | EpisodeSampler:
        if world_size > 1:
            raise ConfigError(f"recipe {self.name!r} runs in one process (no torchrun)")
        self.store = train
        if self.fewshot:
            ways, shots, queries = self.episode_shape
            self.pool = EpisodePool(train, ways, shots, queries, self.section.episodes, self.cfg.seed)
            self.store = self.pool.store
            if self.one_episode_per_batch:
                return EpisodeSampler(self.pool, self.cfg.seed)
        return BatchSampler(self.store, min(self.batch_size(), len(self.store)), seed=self.cfg.seed)

    def schedule(self, train: ImageStore, world_size: int) -> tuple[int, int]:
        if self.fewshot and self.one_episode_per_batch:
            per_epoch = self.section.episodes
        else:
            ways, _, queries = self.episode_shape if self.fewshot else (0, 0, 0)
            images = self.section.episodes * ways * queries if self.fewshot else len(train)
            per_epoch = max(1, images // self.batch_size())
        return self.epochs(self.cfg) * per_epoch, per_epoch

    @staticmethod
    def surrogates(models: Models) -> list[nn.Module]:
        """The frozen surrogate runs, as their models."""
        return [models.raw[name] for name in models if name.startswith("surrogate")]

    def learners(self, models: Models) -> list[Any]:
        """Few-shot surrogates: each run's evaluation learner (its own recipe's) over its model."""
        if self._learners is None:
            ways = self.episode_shape[0]
            self._learners = [RECIPES.get(cfg.recipe, "recipe")(cfg).evaluation_learner(model, ways)
                              for cfg, model in zip(self.surrogate_cfgs, self.surrogates(models), strict=True)]
        return self._learners

    def adapted(self, models: Models, t: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Episode ``t``'s surrogates: each run fine-tuned on its support set by its evaluation
        learner (detached weights; the runs themselves are never changed)."""
        sx, sy = self.pool.support(t)
        return [bind(learner.forward, adapt_episode(model, sx, sy, learner))
                for model, learner in zip(self.surrogates(models), self.learners(models), strict=True)]

    def task_surrogates(self, models: Models, batch: EpisodeBatch) -> Sequence[Callable[[torch.Tensor], torch.Tensor]]:
        """What scores ``batch``: the surrogate runs, or (few-shot) its episode's adapted ones."""
        if self.pool is None:
            return self.surrogates(models)
        return self.adapted(models, self.pool.episode_of(batch.index))

    def blocks(self, models: Models):
        """``(positions, surrogates)`` covering :attr:`store`: chunks of ``PAIR_CHUNK`` images
        scored by the runs, or (few-shot) each episode's query images by its adapted surrogates."""
        if self.pool is None:
            for lo in range(0, len(self.store), PAIR_CHUNK):
                yield slice(lo, lo + PAIR_CHUNK), self.surrogates(models)
        else:
            for t in range(self.pool.episodes):
                yield self.pool.span(t), self.adapted(models, t)

    def check_task(self, trainer: TrainerView) -> tuple[EpisodeBatch, Sequence[Callable[[torch.Tensor], torch.Tensor]]]:
        """What :meth:`on_epoch_end` scores: the epoch's first batch and the runs, or (few-shot)
        the pool's first episode and its adapted surrogates (the same every epoch)."""
        if self.pool is None:
            return trainer.check_batch(), self.surrogates(trainer.models)
        span = self.pool.span(0)
        index = torch.arange(span.start, span.stop, device=self.store.images.device)
        batch = EpisodeBatch.plain(to_float(self.store.images[index]), self.store.labels[index], index)
        return batch, self.adapted(trainer.models, 0)

    def on_epoch_end(self, trainer: TrainerView) -> dict[str, float]:
        """The mean surrogate margin of fresh samples on :meth:`check_task` (lower: more
        adversarial; what stage 2 lowers)."""
        batch, surrogates = self.check_task(trainer)
        generator = trainer.models.modules["model"]
        with torch.no_grad():
            delta = generator.sample(batch.x, trainer.generator)
            margin = surrogate_margin(surrogates, batch.x, batch.y, delta, self.settings.kappa)
        return {"fresh_margin": float(margin.mean())}


@register_recipe("mcg_pretrain", "MCG stage 1: likelihood of MI-FGSM transfer perturbations given the image")
class MCGPretrain(MCGRecipe):
    """Stage 1 (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
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

    def make_pairs(self, models: Models) -> None:
        """Every training image's transfer pair from every surrogate, block by block of the
        store (:meth:`blocks`: fixed chunks, or episodes with their adapted surrogates; the same
        pairs whatever the batches, and after a resume): per surrogate ``(kept bool [N],
        delta [N, C, H, W])``."""
        x_all, y_all = self.store.images, self.store.labels
        count = len(self.section.surrogates)
        kept = [torch.zeros(len(x_all), dtype=torch.bool, device=y_all.device) for _ in range(count)]
        delta = [torch.zeros(len(x_all), *x_all.shape[1:], device=y_all.device) for _ in range(count)]
        for span, surrogates in self.blocks(models):
            x, y = to_float(x_all[span]), y_all[span]
            for i, surrogate in enumerate(surrogates):
                _, d, keep = transfer_pairs(surrogate, x, y, self.section.norm, self.eps, self.settings)
                kept[i][span] = keep
                delta[i][span][keep] = d
        self._pairs = list(zip(kept, delta, strict=True))
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

    one_episode_per_batch: ClassVar[bool] = True

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
        surrogates = self.task_surrogates(models, batch)
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


__all__ = ["GENERATOR", "EpisodePool", "EpisodeSampler", "MCGPretrain", "MCGRecipe", "MCGReptile", "MCGSection",
           "surrogate_kind"]
