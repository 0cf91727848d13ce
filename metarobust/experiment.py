"""Train-then-evaluate, as ``metarobust train`` / ``eval`` / ``quickstart`` run it."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch

from metarobust.config import ExperimentConfig, config_from_dict
from metarobust.data.datasets import image_size_of
from metarobust.data.manifest import (
    Manifest,
    default_manifest_path,
    freeze_episodes,
    load_manifest,
    save_manifest,
)
from metarobust.data.store import ImageStore
from metarobust.meta.evaluate import FewShotResult, evaluate_fewshot
from metarobust.models import build_model
from metarobust.runs import RunDir, load_checkpoint
from metarobust.training.engine import Stores, Trainer, load_stores, resolve_device


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


def evaluate(cfg: ExperimentConfig, model: torch.nn.Module, stores: Stores, run: RunDir | None = None,
             progress: bool = True) -> FewShotResult:
    manifest = resolve_manifest(cfg, stores.test, run)
    result, _ = evaluate_fewshot(model, stores.test, manifest, cfg, progress=progress)
    if run is not None:
        run.write_json("eval.json", {"config_name": cfg.name, "recipe": cfg.recipe, **result.as_dict()})
    return result


def train_and_evaluate(cfg: ExperimentConfig, resume: bool = False, progress: bool = True,
                       stores: Stores | None = None) -> dict[str, Any]:
    """Meta-train ``cfg`` in its run folder, evaluate on the frozen test episodes, write the report.
    A standard recipe (``pgd_at``, ``trades``...) goes to
    :func:`~metarobust.training.standard.experiment.train_and_evaluate_standard`."""
    from metarobust.training.recipes import recipe_kind

    if recipe_kind(cfg.recipe) == "standard":
        from metarobust.training.standard.experiment import train_and_evaluate_standard

        return train_and_evaluate_standard(cfg, resume=resume, progress=progress)
    if recipe_kind(cfg.recipe) == "rfs":  # standard pre-training, few-shot evaluation
        from metarobust.training.rfs import train_and_evaluate_rfs

        return train_and_evaluate_rfs(cfg, resume=resume, progress=progress, stores=stores)
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    stores = stores or load_stores(cfg, device)  # every data check happens before any work
    run = RunDir(cfg, resume=resume)
    try:
        trainer = Trainer(cfg, run, resume=resume, stores=stores, progress=progress)
        model = trainer.fit()
        train_seconds = time.perf_counter() - start
        result = evaluate(cfg, model, stores, run, progress=progress)
        summary = {"run": str(run.path), "recipe": cfg.recipe, "train_seconds": round(train_seconds, 1),
                   **result.as_dict()}
        run.write_report(render_report(cfg, summary, run.metrics()[-1:] or [{}]))
        return summary
    finally:
        run.close()


def model_from_checkpoint(path: str | Path, overrides: list[str] | None = None,
                          device: str | None = None) -> tuple[ExperimentConfig, torch.nn.Module, dict]:
    """Rebuild the config (with ``overrides`` applied) and the trained model of a run."""
    from omegaconf import OmegaConf

    state = load_checkpoint(path)
    values = state["config"]
    if overrides:
        values = OmegaConf.to_container(OmegaConf.merge(values, OmegaConf.from_dotlist(overrides)))
    if device:
        values["device"] = device
    cfg = config_from_dict(values)
    return cfg, _model_for(cfg, state), state


def _model_for(cfg: ExperimentConfig, state: dict) -> torch.nn.Module:
    if state.get("kind") == "standard":  # a plain classifier (metarobust.training.standard)
        from metarobust.training.standard.experiment import standard_model_from_state

        return standard_model_from_state(cfg, state)
    head = state["model"]["head.weight"]
    first = next(v for k, v in state["model"].items() if k.endswith("weight") and v.dim() == 4)
    size = image_size_of(cfg.data)
    model = build_model(cfg.model, first.shape[1], head.shape[0], size, cfg.data.dataset)
    model.load_state_dict(state["model"])
    return model.to(resolve_device(cfg.device))


def render_report(cfg: ExperimentConfig, summary: dict[str, Any], last_metrics: list[dict]) -> str:
    m, a = cfg.meta, cfg.attack
    return "\n".join([
        f"# {cfg.name}: {cfg.recipe} on {cfg.data.dataset}",
        "",
        f"- episodes: {m.ways}-way, {m.train_shots} shots at training, {m.test_shots} at test, "
        f"{m.queries} queries per class",
        f"- MAML: inner lr {m.inner_lr}, {m.inner_steps} inner steps (test {m.test_inner_steps}), "
        f"{'first' if m.first_order else 'second'} order, meta-batch {m.meta_batch_size}, "
        f"Adam {m.meta_lr}, {cfg.train.iterations} iterations",
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
