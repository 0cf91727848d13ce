"""Train-then-evaluate, as ``metarobust train`` / ``eval`` / ``quickstart`` run it."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

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
from metarobust.meta.evaluate import FewShotResult, evaluate_fewshot
from metarobust.models import MIN_IMAGE_SIZES, MODELS, build_model
from metarobust.models.options import NORMALIZE_CHOICES
from metarobust.runs import RunDir, load_checkpoint
from metarobust.training.data import TrainingData, load_training_data, resolve_device
from metarobust.training.engine import Trainer
from metarobust.training.optim import describe as describe_optim
from metarobust.training.optim import resolve_optim
from metarobust.training.recipes import RECIPES, build_recipe
from metarobust.training.standard.evaluate import evaluate_standard, render_standard_report


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


def evaluate(cfg: ExperimentConfig, model: torch.nn.Module, test: ImageStore, run: RunDir | None = None,
             progress: bool = True) -> FewShotResult:
    manifest = resolve_manifest(cfg, test, run)
    result, _ = evaluate_fewshot(model, test, manifest, cfg, progress=progress)
    if run is not None:
        run.write_json("eval.json", {"config_name": cfg.name, "recipe": cfg.recipe, **result.as_dict()})
    return result


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
        train_seconds = round(time.perf_counter() - start, 1)
        last = run.metrics()[-1] if run.metrics() else {}
        optimizer = describe_optim(trainer.optim)
        if recipe.evaluation == "classifier":
            extra = {"run": str(run.path), "train_seconds": train_seconds, "steps": trainer.step_count,
                     "stopped": trainer.stopped, "optimizer": optimizer}
            bar = (lambda it: tqdm(it, desc="eval", dynamic_ncols=True)) if progress else None
            summary, _ = evaluate_standard(cfg, model, data.test, run, bar, extra=extra)
            run.write_report(render_standard_report(cfg, summary, last))
            return summary
        result = evaluate(cfg, model, data.test, run, progress=progress)
        summary = {"run": str(run.path), "recipe": cfg.recipe, "train_seconds": train_seconds,
                   "optimizer": optimizer, **result.as_dict()}
        if not recipe.episodic:
            summary["pretrain_classes"] = data.train.num_classes
        report = render_rfs_report(cfg, summary) if not recipe.episodic else render_report(cfg, summary, [last])
        run.write_report(report)
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


def render_rfs_report(cfg: ExperimentConfig, summary: dict[str, Any]) -> str:
    at, m, a = cfg.at, cfg.meta, cfg.attack
    pretrain = "clean images" if cfg.recipe == "rfs" else (
        f"PGD-AT ({cfg.train_attack.name}-{cfg.train_attack.steps}, eps {cfg.train_attack.eps:.4f})")
    return "\n".join([
        f"# {cfg.name}: {cfg.recipe} on {cfg.data.dataset}",
        "",
        f"- pre-training: {summary['pretrain_classes']}-way classifier on {pretrain}; {summary['optimizer']}, "
        f"batch {at.batch_size}, {at.epochs} epochs",
        f"- evaluation: {m.ways}-way {m.test_shots}-shot, {m.queries} queries; logistic regression (C = 1) on "
        f"L2-normalised {cfg.model.name} features per episode",
        f"- evaluation attack: {a.name}-{a.steps} eps {a.eps:.4f} step {a.step_size:.4f}, through features "
        f"and the fitted head",
        "",
        *fewshot_metric_rows(summary),
        "",
    ])


def render_report(cfg: ExperimentConfig, summary: dict[str, Any], last_metrics: list[dict]) -> str:
    m, a = cfg.meta, cfg.attack
    return "\n".join([
        f"# {cfg.name}: {cfg.recipe} on {cfg.data.dataset}",
        "",
        f"- episodes: {m.ways}-way, {m.train_shots} shots at training, {m.test_shots} at test, "
        f"{m.queries} queries per class",
        f"- MAML: inner lr {m.inner_lr}, {m.inner_steps} inner steps (test {m.test_inner_steps}), "
        f"{'first' if m.first_order else 'second'} order, meta-batch {m.meta_batch_size}, "
        f"{summary['optimizer']}, {cfg.train.iterations} iterations",
        f"- training attack: {cfg.train_attack.name}-{cfg.train_attack.steps} eps {cfg.train_attack.eps:.4f}",
        f"- evaluation attack: {a.name}-{a.steps} eps {a.eps:.4f} step {a.step_size:.4f}",
        "",
        *fewshot_metric_rows(summary),
        f"| last training metrics | {last_metrics[0]} |",
        "",
    ])


def fewshot_metric_rows(summary: dict[str, Any]) -> list[str]:
    """The report's Markdown table of few-shot accuracies (all but its last rows)."""
    return [
        "| metric | value |",
        "|---|---|",
        f"| clean accuracy | {100 * summary['clean_acc']:.2f} ± {100 * summary['clean_ci95']:.2f} % |",
        f"| robust accuracy | {100 * summary['robust_acc']:.2f} ± {100 * summary['robust_ci95']:.2f} % |",
        f"| test episodes | {summary['episodes']} |",
        f"| training time | {summary['train_seconds']} s |",
    ]
