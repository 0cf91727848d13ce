"""Few-shot organ segmentation runs, as ``metarobust seg train`` / ``seg eval`` run them.

The recipes (``seg_panet``, ``seg_pnode``, ``seg_r_pnode``, ``seg_at_panet``) train in the one
:class:`~metarobust.training.engine.Trainer` on the training volumes; the deployed segmenter is
then scored on the test volumes (:mod:`metarobust.evaluation.segmentation`), and the run folder
gets ``seg_eval.json``, ``report.md`` (the Dice table) and ``seg_overlays.png``.

Example:
    >>> cfg = load_seg_config("configs/seg/synthetic_pnode.yaml", ["train.iterations=20"])
    >>> summary = train_segmentation(cfg)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from metarobust.config import ExperimentConfig, parse_config
from metarobust.data.seg_episodes import load_or_freeze_split, split_volumes
from metarobust.data.seg_volumes import CHAOS_ORGANS, Volumes, read_chaos_t2, read_nifti, synthetic_volumes
from metarobust.errors import ConfigError
from metarobust.evaluation.segmentation import evaluate_segmentation, plot_overlays, render_table
from metarobust.runs import RunDir, atomic_write_text, load_checkpoint
from metarobust.training.data import TrainingData, resolve_device
from metarobust.training.engine import Trainer
from metarobust.training.optim import resolve_optim
from metarobust.training.recipes import RECIPES, build_recipe, check_recipe
from metarobust.training.recipes.seg_base import SegRecipe


def load_seg_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """The config of a segmentation run, checked before any work: the recipe must be a
    segmentation recipe, and every section's and the recipe's checks pass."""
    cfg = parse_config(path, overrides)
    recipe = RECIPES.get(cfg.recipe, "recipe")
    if not (isinstance(recipe, type) and issubclass(recipe, SegRecipe)):
        raise ConfigError(f"recipe={cfg.recipe!r} is not a segmentation recipe; choose one of "
                          f"{[n for n in RECIPES.names() if n.startswith('seg_')]}")
    resolve_optim(cfg.optim, recipe.default_optim(cfg), recipe.epochs(cfg))
    check_recipe(recipe, cfg)
    return cfg


def load_seg_volumes(cfg: ExperimentConfig) -> tuple[Volumes, Volumes]:
    """``(train, test)`` volumes of ``seg.dataset`` at ``seg.image_size``, split by subject
    (:func:`~metarobust.data.seg_episodes.split_volumes`; CHAOS-T2's split is frozen in
    ``episodes/chaos_t2/seg_split.json``)."""
    s = cfg.seg
    if s.dataset == "synthetic_organs":
        vols = synthetic_volumes(s.synthetic_volumes, s.image_size, seed=cfg.seed)
        split = split_volumes(vols.ids)
    else:
        if not s.root:
            raise ConfigError(f"seg.root is required for seg.dataset={s.dataset} (the tar or folder to read)")
        if s.dataset == "chaos_t2":
            vols = read_chaos_t2(s.root, s.image_size)
            split = load_or_freeze_split("chaos_t2", vols.ids)
        else:
            vols = read_nifti(s.root, CHAOS_ORGANS, s.image_size, s.modality)
            split = split_volumes(vols.ids)
    return vols.subset(split["train"], f"{vols.name}[train]"), vols.subset(split["test"], f"{vols.name}[test]")


def evaluate_and_write(cfg: ExperimentConfig, model, train: Volumes, test: Volumes, run_path: Path | None,
                       extra: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Score ``model`` and write ``seg_eval.json``, ``report.md`` and ``seg_overlays.png`` into
    ``run_path`` (if given); returns the result without its tensors."""
    result = evaluate_segmentation(cfg, model, train, test, freeze=cfg.seg.dataset == "chaos_t2", progress=progress)
    result.update(recipe=cfg.recipe, model=cfg.model.name, **(extra or {}))
    if run_path is not None:
        plot_overlays(result, run_path / "seg_overlays.png", cfg.seg.overlays)
    result.pop("_overlays")  # tensors, drawn above
    if run_path is not None:
        atomic_write_text(run_path / "seg_eval.json", json.dumps(result, indent=1) + "\n")
        atomic_write_text(run_path / "report.md", f"# {cfg.name}: {cfg.recipe}\n\n" + render_table(result))
    return result


def train_segmentation(cfg: ExperimentConfig, resume: bool = False, progress: bool = True,
                       volumes: tuple[Volumes, Volumes] | None = None, write: bool = True) -> dict[str, Any]:
    """Train ``cfg.recipe`` on the training volumes in the one trainer, then evaluate; returns
    the result of :func:`evaluate_and_write`. ``volumes``: pre-loaded ``(train, test)``;
    ``write=False``: no run folder (tests)."""
    start = time.perf_counter()
    recipe = build_recipe(cfg)
    device = resolve_device(cfg.device)
    train, test = volumes or load_seg_volumes(cfg)
    train, test = train.to(device), test.to(device)
    run = RunDir(cfg, resume=resume) if write else None
    try:
        trainer = Trainer(cfg, run, resume=resume, data=TrainingData(train, None, None), progress=progress,
                          recipe=recipe)
        model = trainer.fit().eval()
        extra = {"iterations": trainer.step_count, "train_seconds": round(time.perf_counter() - start, 1)}
        return evaluate_and_write(cfg, model, train, test, run.path if run else None, extra, progress)
    finally:
        if run is not None:
            run.close()


def evaluate_seg_run(path: str | Path, overrides: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """``metarobust seg eval``: rebuild a run's segmenter from its checkpoint (``overrides`` may
    change the ``seg.attacks``, ``seg.eps``... of the evaluation) and score it again."""
    from omegaconf import OmegaConf

    state = load_checkpoint(path)
    values = state["config"]
    if overrides:
        values = OmegaConf.to_container(OmegaConf.merge(values, OmegaConf.from_dotlist(overrides)))
    from metarobust.config import config_from_dict

    cfg = config_from_dict(values)
    recipe = build_recipe(cfg)
    device = resolve_device(cfg.device)
    model = recipe.build_model(cfg.model, 1, 2, cfg.seg.image_size).to(device)
    model.load_state_dict(state["model"])
    train, test = load_seg_volumes(cfg)
    run_path = Path(path) if Path(path).is_dir() else None
    return evaluate_and_write(cfg, model.eval(), train.to(device), test.to(device), run_path,
                              {"iterations": int(state["step"])}, progress)


__all__ = ["evaluate_and_write", "evaluate_seg_run", "load_seg_config", "load_seg_volumes", "train_segmentation"]
