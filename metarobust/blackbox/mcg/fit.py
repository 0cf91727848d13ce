"""``metarobust blackbox-train CONFIG``: train MCG's generator on our own surrogate runs.

Surrogates are run folders of ``metarobust train`` of one dataset, all plain classifiers or all
few-shot learners (:func:`surrogate_runs`). No target is queried. The two stages are recipes of
the one trainer, ``mcg_pretrain`` and ``mcg_reptile`` (:mod:`metarobust.training.recipes.mcg`),
run in the folders ``<out>.stage1`` and ``<out>.stage2`` beside ``out``; the trainer checkpoints
them every epoch (atomically, loaded with ``weights_only``), resumes a killed stage exactly, stops
on a NaN, and refuses a folder made with other settings. The finished generator is written to
``out``; a finished ``out`` with the same settings is reused and one made with other settings is
refused rather than mixed in.

- **Plain classifiers**: a seeded subset of ``images`` training images (0: all).
- **Few-shot learners** [ours]: ``episodes`` seeded episodes of the training split in the runs'
  episode shape, every surrogate learner fine-tuned on each support set; stage 1's pairs come from
  each adapted surrogate on its episode's query set (episode labels), and each episode is one
  stage-2 task (:class:`~metarobust.training.recipes.mcg.EpisodePool`).

    metarobust blackbox-train configs/blackbox/mcg_train_mnist.yaml surrogates=[runs/a] out=runs/g.pt
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from metarobust.blackbox.mcg.checkpoint import load_generator, save_generator
from metarobust.blackbox.mcg.config import GeneratorConfig, MCGConfig, known_fields
from metarobust.blackbox.mcg.generator import MCGGenerator
from metarobust.errors import ConfigError


@dataclass
class MCGTrainConfig:
    """A ``blackbox-train`` config; the generator's and MCG's defaults are the paper's."""

    surrogates: list[str] = field(default_factory=list)
    """Run folders or checkpoints of ``metarobust train`` (one dataset; all plain classifiers or
    all few-shot learners of one ``meta.ways``)."""
    out: str = ""
    """The generator checkpoint to write (``metarobust blackbox`` reads it as ``mcg.generator``)."""
    norm: str = "linf"
    eps: float | None = None
    """Radius; ``null``: the first surrogate's ``attack.eps`` (L-inf) or 0.5 (L2)."""
    images: int = 0
    """Plain classifier surrogates: training images (a seeded subset of the train split); 0: all.
    Few-shot surrogates draw their episodes from the whole split (``episodes``)."""
    episodes: int = 200
    """Few-shot surrogates: seeded training episodes (each a stage-2 task) [ours]."""
    generator: dict[str, Any] = field(default_factory=dict)
    """:class:`GeneratorConfig` fields (``levels``, ``steps``, ``hidden``...; MNIST's 28 pixels
    need ``levels: 2``)."""
    mcg: dict[str, Any] = field(default_factory=dict)
    """:class:`MCGConfig` fields (``pretrain_epochs``, ``meta_epochs``, ``transfer_steps``...)."""
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    """Overrides of the surrogate runs' configs (``device=cpu``, ``data.root=...``)."""

    def check(self) -> None:
        if not self.surrogates:
            raise ConfigError("blackbox-train surrogates is empty; name run folders of metarobust train")
        for path in self.surrogates:
            if not Path(path).exists():
                raise ConfigError(f"blackbox-train surrogates: {path!r} does not exist; expected a run folder "
                                  f"or a checkpoint")
        if not self.out:
            raise ConfigError("blackbox-train out is empty; name the generator checkpoint to write (runs/mcg.pt)")
        if self.norm not in ("linf", "l2"):
            raise ConfigError(f"blackbox-train norm={self.norm!r}; choose linf or l2")
        if self.images < 0 or self.episodes < 1:
            raise ConfigError(f"blackbox-train images={self.images} must be >= 0 and episodes={self.episodes} >= 1")
        values = known_fields(GeneratorConfig, self.generator, "blackbox-train generator")
        for fixed in ("shape", "norm", "eps"):
            if fixed in values:
                raise ConfigError(f"blackbox-train generator.{fixed} is set from the data and the threat model "
                                  f"(norm, eps); remove it")
        self.mcg_config()

    def mcg_config(self) -> MCGConfig:
        return MCGConfig(**known_fields(MCGConfig, self.mcg, "blackbox-train mcg"))


def load_train_config(path: str | Path, overrides: list[str] | None = None, check: bool = True) -> MCGTrainConfig:
    """Defaults, then the YAML at ``path``, then ``key=value`` overrides; checked (``check``:
    also that the surrogate runs exist)."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(MCGTrainConfig), OmegaConf.load(path),
                             OmegaConf.from_dotlist(overrides or []))
    cfg = MCGTrainConfig(**OmegaConf.to_container(merged))
    if check:
        cfg.check()
    else:
        cfg.mcg_config()
    return cfg


@dataclass
class SurrogateRun:
    """A surrogate run as ``blackbox-train`` needs it before training: its ``path``, its config
    ``cfg`` (with ``blackbox-train``'s ``overrides``) and its ``kind`` (``"classifier"`` or
    ``"fewshot"``). The recipes load its weights as a frozen role."""

    path: str
    cfg: Any
    kind: str


def surrogate_runs(cfg: MCGTrainConfig) -> list[SurrogateRun]:
    """The surrogate runs of ``cfg`` (their checkpoints read, no model built), all of one kind
    (plain classifiers or few-shot learners) and one dataset, else a :class:`ConfigError`."""
    from metarobust.experiment import checkpoint_config, config_from_dict, read_run_checkpoint
    from metarobust.training.recipes.mcg import surrogate_kind

    runs = []
    for path in cfg.surrogates:
        run_cfg = config_from_dict(checkpoint_config(read_run_checkpoint(path)), list(cfg.overrides))
        runs.append(SurrogateRun(str(path), run_cfg, surrogate_kind(run_cfg.recipe)))
    kinds = {run.kind: run.path for run in runs}
    if len(kinds) > 1:
        raise ConfigError(f"blackbox-train surrogates mix plain classifiers and few-shot learners "
                          f"({kinds.get('classifier')!r} is a classifier, {kinds.get('fewshot')!r} a few-shot "
                          f"learner); a generator trains on one kind: give surrogates of the target's kind")
    datasets = {run.cfg.data.dataset for run in runs}
    if len(datasets) > 1:
        raise ConfigError(f"blackbox-train surrogates were trained on different datasets {sorted(datasets)}; "
                          f"give surrogates of one dataset")
    return runs


def stage_configs(cfg: MCGTrainConfig, run_cfg, fewshot: bool = False) -> tuple[Any, Any]:
    """The ``mcg_pretrain`` and ``mcg_reptile`` experiment configs of a ``blackbox-train``
    config (``run_cfg``: the first surrogate's, with ``cfg.overrides``): their data (the
    surrogates' dataset; plain classifiers: a seeded subset of ``cfg.images`` training images;
    few-shot learners (``fewshot``): ``cfg.episodes`` episodes of the whole training split), the
    ``mcg`` section, and run folders
    ``<out>.stage1`` / ``<out>.stage2`` beside ``cfg.out``."""
    import json

    from metarobust.experiment import load_config

    out = Path(cfg.out)
    d = run_cfg.data
    size = "null" if d.image_size is None else d.image_size
    common = [f"data.dataset={d.dataset}", f"data.image_size={size}", f"device={run_cfg.device}",
              f"at.train_size={0 if fewshot else cfg.images}", "at.holdout=0", f"seed={cfg.seed}",
              f"out_dir={out.parent}",
              f"mcg.episodes={cfg.episodes}",
              f"mcg.surrogates={json.dumps(list(cfg.surrogates))}", f"mcg.norm={cfg.norm}",
              f"mcg.eps={'null' if cfg.eps is None else cfg.eps}", f"mcg.generator={json.dumps(cfg.generator)}",
              f"mcg.config={json.dumps(_plain(cfg.mcg))}", *([f"data.root={d.root}"] if d.root else [])]
    first = load_config(None, [*common, "recipe=mcg_pretrain", f"name={out.name}.stage1"])
    second = load_config(None, [*common, "recipe=mcg_reptile", f"name={out.name}.stage2",
                                f"mcg.stage1={out.parent / (out.name + '.stage1')}"])
    return first, second


def run_stage(stage_cfg, data, progress: bool, recipe=None) -> tuple[Any, list[dict[str, Any]], bool]:
    """Train one stage in its run folder through the one trainer, resuming a checkpoint (a
    finished run trains nothing; one made with other settings is refused by
    :class:`~metarobust.runs.RunDir`), logging and checkpointing once per epoch. ``recipe``: the
    stage's recipe if already built (else built here). Returns the generator, the run's metrics
    and whether a checkpoint was there."""
    from metarobust.runs import RunDir
    from metarobust.training.engine import Trainer
    from metarobust.training.recipes import build_recipe

    recipe = recipe or build_recipe(stage_cfg)
    per_epoch = recipe.schedule(data.train, 1)[1]
    stage_cfg.train.log_every = stage_cfg.train.checkpoint_every = per_epoch
    path = Path(stage_cfg.out_dir) / stage_cfg.name
    resume = (path / "checkpoints" / "last.pt").is_file()
    run = RunDir(stage_cfg, resume=resume, tensorboard=False)
    try:
        generator = Trainer(stage_cfg, run, resume=resume, data=data, progress=progress, recipe=recipe).fit()
        return generator.eval(), run.metrics(), resume
    finally:
        run.close()


def train_with_recipes(cfg: MCGTrainConfig, run_cfg, progress: bool, fewshot: bool = False) -> dict[str, Any]:
    """Stage 1 (``mcg_pretrain``) then stage 2 (``mcg_reptile``) in the one trainer
    (:func:`stage_configs`, :func:`run_stage`); writes ``cfg.out`` and returns the summary.
    ``fewshot``: the surrogates are few-shot learners (the settings then hold ``episodes`` and
    the episode shape and not ``images``; plain ones the reverse)."""
    from metarobust.training.data import load_training_data, resolve_device
    from metarobust.training.recipes import build_recipe

    start = time.perf_counter()
    first, second = stage_configs(cfg, run_cfg, fewshot)
    recipe = build_recipe(first)
    unused = "images" if fewshot else "episodes"  # the other kind's field does not change the result
    settings = {"recipes": ["mcg_pretrain", "mcg_reptile"],
                **{k: v for k, v in asdict(cfg).items() if k not in ("out", "overrides", unused)},
                "eps": recipe.eps, "mcg": asdict(recipe.settings)}
    if fewshot:
        settings["episode"] = recipe.episode_shape
    settings = _plain(settings)
    done = _reusable(Path(cfg.out), settings)
    if done is not None:
        return {**done[1]["summary"], "resumed": "done"}
    data = load_training_data(first, recipe, resolve_device(first.device), with_test=False)
    _, metrics1, resumed1 = run_stage(first, data, progress, recipe)
    generator, metrics2, resumed2 = run_stage(second, data, progress)
    epoch_ends = [m for m in metrics1 if "loss" in m]
    summary = {"generator": str(cfg.out), "surrogates": list(cfg.surrogates), "norm": cfg.norm, "eps": recipe.eps,
               "images": len(recipe.store), "pairs": int(next((m["pairs_total"] for m in metrics1
                                                                if "pairs_total" in m), 0)),
               "stage1_nll": [m["loss"] for m in epoch_ends],
               "stage2_margin": [m["fresh_margin"] for m in metrics2 if "fresh_margin" in m],
               "runs": [str(Path(first.out_dir) / first.name), str(Path(second.out_dir) / second.name)],
               "seconds": round(time.perf_counter() - start, 1)}
    if fewshot:
        summary["episodes"] = recipe.pool.episodes
    save_generator(cfg.out, generator, {"settings": settings, "summary": summary})
    resumed = "stage2" if resumed2 else ("stage1" if resumed1 else None)
    return {**summary, "resumed": resumed}


def train_generator(cfg: MCGTrainConfig, progress: bool = True) -> dict[str, Any]:
    """Stage 1 then stage 2 on ``cfg``'s surrogates (:func:`train_with_recipes`), resuming from
    what a killed run left; writes ``cfg.out`` and returns a summary (paths, pair and image
    counts, the per-epoch NLL and surrogate margins, seconds)."""
    runs = surrogate_runs(cfg)
    return train_with_recipes(cfg, runs[0].cfg, progress, fewshot=runs[0].kind == "fewshot")


def _reusable(path: Path, settings: dict[str, Any]) -> tuple[MCGGenerator, dict[str, Any]] | None:
    """The generator saved at ``path`` if it exists and was made with ``settings``."""
    if not path.is_file():
        return None
    generator, info = load_generator(path)
    if info.get("settings") != settings:
        changed = sorted(k for k in set(settings) | set(info.get("settings", {}))
                         if settings.get(k) != info.get("settings", {}).get(k))
        raise ConfigError(f"{path} was made with other settings ({changed}); delete it to train again, or give "
                          f"another out")
    return generator, info


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: what a checkpoint's info compares equal to after loading."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


__all__ = ["MCGTrainConfig", "SurrogateRun", "load_train_config", "run_stage", "stage_configs", "surrogate_runs", "train_generator",
           "train_with_recipes"]
