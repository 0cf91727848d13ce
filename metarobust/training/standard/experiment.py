"""``metarobust train`` for standard recipes: train (one process or a ``torchrun`` group), then
evaluate the deployed model on the test split with the harness and write the run's report."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from metarobust import distributed
from metarobust.config import ExperimentConfig
from metarobust.models import build_model
from metarobust.runs import RunDir
from metarobust.training.engine import resolve_device
from metarobust.training.standard.base import standard_recipe
from metarobust.training.standard.evaluate import evaluate_standard, render_standard_report
from metarobust.training.standard.trainer import StandardData, StandardTrainer, load_standard_data


def train_and_evaluate_standard(cfg: ExperimentConfig, resume: bool = False, progress: bool = True,
                                data: StandardData | None = None) -> dict[str, Any] | None:
    """Train ``cfg`` in its run folder, evaluate it, write ``eval.json`` and ``report.md``.

    Under ``torchrun`` every rank trains; rank 0 alone writes files, evaluates and returns the
    summary (other ranks return ``None``).

    Example:
        >>> summary = train_and_evaluate_standard(load_config("configs/at/mnist_pgd_at.yaml"))
        >>> summary["clean_acc"], summary["robust_acc"]
    """
    info = distributed.init_from_env(cfg.device)
    run = None
    try:
        start = time.perf_counter()
        standard_recipe(cfg)  # the recipe's own checks (a teacher, a starting checkpoint) before any work
        data = data or load_standard_data(cfg, info.device)  # every data check before any work
        run = RunDir(cfg, resume=resume) if info.is_main else None
        trainer = StandardTrainer(cfg, run, resume=resume, data=data, progress=progress and info.is_main, dist=info)
        model = trainer.fit().eval()
        if not info.is_main:
            return None
        extra = {"run": str(run.path), "train_seconds": round(time.perf_counter() - start, 1),
                 "steps": trainer.step_count, "stopped": trainer.stopped}
        bar = (lambda it: tqdm(it, desc="eval", dynamic_ncols=True)) if progress else None
        summary, _ = evaluate_standard(cfg, model, data.test, run, bar, extra=extra)
        last = run.metrics()[-1] if run.metrics() else {}
        run.write_report(render_standard_report(cfg, summary, last))
        return summary
    finally:
        if run is not None:
            run.close()
        distributed.cleanup(info)


def standard_model_from_state(cfg: ExperimentConfig, state: dict[str, Any]) -> torch.nn.Module:
    """The deployed model of a standard run's checkpoint, on ``cfg.device``, in eval mode."""
    shape = state["data"]
    model = build_model(cfg.model, shape["in_channels"], shape["num_classes"], shape["image_size"], cfg.data.dataset)
    model.load_state_dict(state["model"])
    return model.to(resolve_device(cfg.device)).eval()
