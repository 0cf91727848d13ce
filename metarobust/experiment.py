"""Train-then-evaluate, as ``metarobust train`` / ``eval`` / ``quickstart`` run it."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from metarobust import distributed
from metarobust.analysis.estimators import ESTIMATORS
from metarobust.attacks import ATTACKS
from metarobust.config import ExperimentConfig, check_value, parse_config
from metarobust.config import config_from_dict as parse_dict
from metarobust.data.augment import AUGMENTATIONS
from metarobust.data.datasets import DATASETS, image_size_of
from metarobust.data.manifest import (
    Manifest,
    default_manifest_path,
    freeze_episodes,
    load_manifest,
    save_manifest,
)
from metarobust.data.store import ImageStore
from metarobust.evaluation import EvalResult, evaluate_run
from metarobust.evaluation import render_report as render_evaluation
from metarobust.models import MIN_IMAGE_SIZES, MODELS, build_model
from metarobust.models.options import NORMALIZE_CHOICES
from metarobust.runs import RunDir, load_checkpoint
from metarobust.training.data import TrainingData, load_training_data, resolve_device
from metarobust.training.engine import Trainer
from metarobust.training.optim import describe as describe_optim
from metarobust.training.optim import resolve_optim
from metarobust.training.recipes import RECIPES, Recipe, build_recipe


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides (e.g.
    ``meta.train_shots=5``), composed from every section (:mod:`metarobust.config` and the recipes'
    own) and validated against every registry: the config a command runs, checked before any work.

    Example:
        >>> cfg = load_config("configs/meta/omniglot_rmaml.yaml", ["meta.train_shots=5"])
    """
    cfg = parse_config(path, overrides)
    validate(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> ExperimentConfig:
    """A validated :class:`ExperimentConfig` from a nested dict (e.g. one saved in a checkpoint)."""
    cfg = parse_dict(values)
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    """The checks that need a registry: the names of the recipe, model, dataset, attacks,
    augmentation, input normalisation and estimators, the model's minimum image size, and the
    recipe's own :meth:`~metarobust.training.recipes.Recipe.config_check` (every section's field
    checks ran when the config was parsed)."""
    recipe = RECIPES.get(cfg.recipe, "recipe")
    MODELS.get(cfg.model.name, "model.name")
    DATASETS.get(cfg.data.dataset, "data.dataset")
    for section in ("train_attack", "attack"):
        ATTACKS.get(getattr(cfg, section).name, f"{section}.name")
    check_value(cfg.model.normalize in NORMALIZE_CHOICES, "model.normalize", cfg.model.normalize,
                f"one of {list(NORMALIZE_CHOICES)}")
    minimum = MIN_IMAGE_SIZES.get(cfg.model.name, 1)
    size = image_size_of(cfg.data)  # null: the dataset's standard size (28, 32, 84...)
    check_value(size >= minimum, "data.image_size", size, f"at least {minimum} for model {cfg.model.name!r}")
    check_value(cfg.at.augment in ("auto", "none", *AUGMENTATIONS.names()), "at.augment", cfg.at.augment,
                f"auto, none or one of {AUGMENTATIONS.names()}")
    for name in cfg.analysis.estimators:
        ESTIMATORS.get(name, "analysis.estimators")
    resolve_optim(cfg.optim, recipe.default_optim(), recipe.epochs(cfg))
    recipe.config_check(cfg)


def resolve_manifest(cfg: ExperimentConfig, store: ImageStore, run: RunDir | None = None) -> Manifest:
    """The frozen test episodes for ``cfg``: ``eval.manifest`` if given, else the default file
    under ``episodes/``; if that is absent, freeze them (seed 0) into the run folder, with a
    warning, so the numbers can still be reproduced."""
    m = cfg.meta
    if cfg.eval.manifest:
        manifest = load_manifest(cfg.eval.manifest)
    else:
        path = default_manifest_path(cfg.data.dataset, m.ways, m.test_shots, m.queries,
                                     cfg.eval.episodes, cfg.data.rotations)
        if path.is_file():
            manifest = load_manifest(path)
        else:
            manifest = freeze_episodes(store, m.ways, m.test_shots, m.queries, cfg.eval.episodes,
                                       seed=0, dataset=cfg.data.dataset)
            where = "in memory"
            if run is not None:
                where = str(save_manifest(manifest, run.path / "episodes.json"))
            warnings.warn(f"no frozen episodes at {path}; froze {len(manifest)} with seed 0 ({where}). "
                          f"Commit them with `metarobust episodes freeze {cfg.data.dataset}`", stacklevel=2)
    if (manifest.ways, manifest.shots, manifest.queries) != (m.ways, m.test_shots, m.queries):
        warnings.warn(f"manifest episodes are {manifest.ways}-way {manifest.shots}-shot "
                      f"{manifest.queries}-query; the config's meta.* episode shape is ignored", stacklevel=2)
    return manifest


def evaluate(cfg: ExperimentConfig, model: torch.nn.Module, recipe: Recipe, test: ImageStore,
             run: RunDir | None = None, progress: bool = True, step: int | None = None,
             extra: dict[str, Any] | None = None) -> EvalResult:
    """Score ``model`` with :func:`~metarobust.evaluation.evaluate_run`, the one evaluation that
    the end of training and ``metarobust eval`` share: on the frozen test episodes
    (:func:`resolve_manifest`) adapted by the recipe's evaluation learner for a few-shot recipe, on
    the test images for a plain classifier. Writes ``eval.json`` into ``run``."""
    if recipe.evaluation == "classifier":
        return evaluate_run(cfg, model, test, run=run, step=step, progress=progress, extra=extra)
    manifest = resolve_manifest(cfg, test, run)
    learner = recipe.evaluation_learner(model, manifest.ways)
    if recipe.episodic:  # R-MAML's and AQ's reference codes are first order in effect: say which was trained
        extra = {"meta_order": "first" if cfg.meta.first_order else "second", **(extra or {})}
    return evaluate_run(cfg, model, test, manifest=manifest, learner=learner, run=run, step=step, progress=progress,
                        extra=extra)


def train_and_evaluate(cfg: ExperimentConfig, resume: bool = False, progress: bool = True,
                       data: TrainingData | None = None) -> dict[str, Any] | None:
    """Train ``cfg`` in its run folder (one process or a ``torchrun`` group), evaluate the deployed
    model, write ``eval.json`` and ``report.md``; returns the summary.

    Every recipe takes this one path. Few-shot recipes (meta-learning, RFS) are scored on the
    frozen test episodes, plain classifiers on the test split through the robustness harness.
    Under ``torchrun`` every rank trains; rank 0 alone writes files, evaluates and returns the
    summary (other ranks return ``None``). ``data``: pre-loaded images (else from ``cfg.data``).

    Example:
        >>> summary = train_and_evaluate(load_config("configs/quickstart.yaml"))
        >>> summary["clean_acc"], summary["robust_acc"]
    """
    info = distributed.init_from_env(cfg.device)
    run = None
    try:
        start = time.perf_counter()
        recipe = build_recipe(cfg)  # the recipe's own checks (a teacher, a starting checkpoint) first
        data = data or load_training_data(cfg, recipe, info.device)  # every data check before any work
        run = RunDir(cfg, resume=resume) if info.is_main else None
        trainer = Trainer(cfg, run, resume=resume, data=data, progress=progress and info.is_main, dist=info,
                          recipe=recipe)
        model = trainer.fit().eval()
        if not info.is_main:
            return None
        last = run.metrics()[-1] if run.metrics() else {}
        extra = {"train_seconds": round(time.perf_counter() - start, 1), "optimizer": describe_optim(trainer.optim),
                 "stopped": trainer.stopped}
        if recipe.evaluation == "fewshot" and not recipe.episodic:
            extra["pretrain_classes"] = data.train.num_classes
        result = evaluate(cfg, model, recipe, data.test, run, progress=progress, step=trainer.step_count,
                          extra=extra)
        result.run = str(run.path)
        summary = result.as_dict()
        run.write_report(render_evaluation(cfg, summary, training_lines(cfg, recipe, summary), last))
        return summary
    finally:
        if run is not None:
            run.close()
        distributed.cleanup(info)


def model_from_checkpoint(path: str | Path, overrides: list[str] | None = None,
                          device: str | None = None) -> tuple[ExperimentConfig, torch.nn.Module, dict]:
    """Rebuild the config (with ``overrides`` applied) and the trained (deployed) model of a run,
    on ``cfg.device`` in eval mode."""
    from omegaconf import OmegaConf

    state = load_checkpoint(path)
    values = state["config"]
    if overrides:
        values = OmegaConf.to_container(OmegaConf.merge(values, OmegaConf.from_dotlist(overrides)))
    if device:
        values["device"] = device
    cfg = config_from_dict(values)
    return cfg, model_from_state(cfg, state), state


def model_from_state(cfg: ExperimentConfig, state: dict[str, Any]) -> torch.nn.Module:
    """The deployed model of a checkpoint's ``state``, on ``cfg.device``, in eval mode."""
    shape = state.get("data") or _shape_from_weights(cfg, state["model"])
    model = build_model(cfg.model, shape["in_channels"], shape["num_classes"], shape["image_size"], cfg.data.dataset)
    model.load_state_dict(state["model"])
    return model.to(resolve_device(cfg.device)).eval()


def _shape_from_weights(cfg: ExperimentConfig, weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """The model shape of a checkpoint written before 0.2 (meta runs stored no ``data`` entry)."""
    first = next(v for k, v in weights.items() if k.endswith("weight") and v.dim() == 4)
    return {"in_channels": first.shape[1], "num_classes": weights["head.weight"].shape[0],
            "image_size": image_size_of(cfg.data)}


def training_lines(cfg: ExperimentConfig, recipe: Recipe, summary: dict[str, Any]) -> list[str]:
    """How the run was trained, as the Markdown list items that head its ``report.md``."""
    m, ta, at = cfg.meta, cfg.train_attack, cfg.at
    attack = f"- training attack: {ta.name}-{ta.steps} {ta.norm} eps {ta.eps:.4f} step {ta.step_size:.4f}"
    if recipe.episodic:
        return [f"- episodes: {m.ways}-way, {m.train_shots} shots at training, {m.test_shots} at test, "
                f"{m.queries} queries per class",
                f"- MAML: inner lr {m.inner_lr}, {m.inner_steps} inner steps (test {m.test_inner_steps}), "
                f"{'first' if m.first_order else 'second'} order, meta-batch {m.meta_batch_size}, "
                f"{summary['optimizer']}, {cfg.train.iterations} iterations", attack]
    lines = [f"- model: {cfg.model.name}; {at.epochs} epochs, batch {at.batch_size}, {summary['optimizer']}, "
             f"amp {at.amp}", attack]
    if recipe.evaluation == "fewshot":  # RFS: plain pre-training, then the probe per episode
        lines.append(f"- few-shot evaluation: {summary.get('pretrain_classes')}-way pre-training, then "
                     f"{m.ways}-way {m.test_shots}-shot episodes, logistic regression (C = 1) on L2-normalised "
                     f"features, attacked through features and head")
    return lines
