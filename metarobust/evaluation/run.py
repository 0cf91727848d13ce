"""One evaluation for every run: ``metarobust train`` ends with it, ``metarobust eval`` re-runs it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from metarobust.config import ExperimentConfig
from metarobust.data.manifest import Manifest
from metarobust.data.store import ImageStore
from metarobust.errors import MaskingCheckFailed
from metarobust.evaluation.classifier import EVAL_BATCH, classifier_units, evaluation_points
from metarobust.evaluation.fewshot import Learner, fewshot_units
from metarobust.evaluation.harness import evaluate_units
from metarobust.evaluation.report import sweep_caption
from metarobust.evaluation.result import EvalResult
from metarobust.plots import plot_robustness_curve
from metarobust.runs import RunFolder


def evaluate_run(cfg: ExperimentConfig, model: torch.nn.Module, test: ImageStore, *,
                 manifest: Manifest | None = None, learner: Learner | None = None, run: RunFolder | None = None,
                 step: int | None = None, progress: bool = False, extra: dict[str, Any] | None = None,
                 output: str = "eval.json") -> EvalResult:
    """Clean and robust accuracy of ``model`` on the test split, through the harness.

    Few-shot when ``manifest`` is given: each frozen episode is fitted on its support set by
    ``learner`` (required: the recipe's
    :meth:`~metarobust.training.recipes.Recipe.evaluation_learner`, MAML/ANIL fine-tuning or the
    RFS probe) and its query set is scored; ``eval.batch_size`` episodes per harness unit;
    intervals over episodes. Plain classifier otherwise: ``eval.points`` test images (a fixed
    seeded subset; 0: all), the model in eval mode, binomial intervals over the images. Both go
    through the same cascade (``eval.suite``, ``eval.union``), checks and eps sweep
    (``eval.checks``, ``eval.check_points``, ``eval.eps_sweep``), with attack noise from
    ``cfg.seed``: the same model, config and episodes give the same numbers every time.

    Args:
        cfg: the run's config (``attack``, ``eval``, ``meta``, ``seed``...).
        model: the trained model, on ``test``'s device; left in the mode it came in.
        test: the test split.
        manifest: the frozen test episodes (few-shot); ``None``: plain classifier.
        learner: few-shot only: what fits each support set.
        run: when given, ``output`` (:meth:`EvalResult.as_dict`) and, with a sweep,
            ``robustness_vs_eps.png`` (``eval/<name>_robustness_vs_eps.png`` beside
            ``eval/<name>.json``) are written into its folder.
        step: the checkpoint's training step, recorded in the result.
        progress: a progress bar over the harness's units.
        extra: keys added to ``eval.json`` (e.g. ``train_seconds``); they never replace a
            key of the schema.
        output: the result's file in ``run`` (``eval.json``: the end of training;
            ``eval/<name>.json``: a later ``metarobust eval``).

    Returns: the :class:`~metarobust.evaluation.result.EvalResult`.

    Example:
        >>> result = evaluate_run(cfg, model, stores.test, manifest=resolve_manifest(cfg, stores.test))
        >>> result.clean_acc, result.robust_acc, result.robust_ci95
    """
    was_training = model.training
    model.eval()
    if manifest is not None:
        if learner is None:
            raise ValueError("a few-shot evaluation (manifest given) needs learner=recipe.evaluation_learner(model, ways)")
        units = fewshot_units(model, test, manifest, cfg, learner)
        count, num_classes, interval = math.ceil(len(manifest) / cfg.eval.batch_size), manifest.ways, "episodes"
    else:
        index = evaluation_points(test, cfg.eval.points)
        units = classifier_units(model, test.images[index], test.labels[index], EVAL_BATCH)
        count, num_classes, interval = math.ceil(len(index) / EVAL_BATCH), test.num_classes, "points"
    bar: Callable[[Iterable], Iterable] | None = None
    if progress:
        bar = lambda it: tqdm(it, total=count, desc="eval", dynamic_ncols=True)
    try:
        result = evaluate_units(units, cfg, num_classes, test.class_names, bar, interval)
    finally:
        model.train(was_training)
    result.step, result.extra = step, dict(extra or {})
    if run is not None:
        result.run = str(run.path)
        if result.eps_sweep:
            title = f"{cfg.recipe} on {cfg.data.dataset}: robust accuracy vs eps ({cfg.attack.norm})"
            target = run.path / output
            plot = target.parent / ("robustness_vs_eps.png" if output == "eval.json"
                                    else f"{target.stem}_robustness_vs_eps.png")
            plot.parent.mkdir(parents=True, exist_ok=True)
            result.plot = str(plot_robustness_curve(result.eps_sweep, plot, title,
                                                    caption=sweep_caption(result.as_dict(), cfg)))
        run.write_json(output, result.as_dict())
    failed = [c for c in result.checks if not c.passed]
    if cfg.eval.strict and failed:
        written = f" ({run.path / output} is written)" if run is not None else ""
        raise MaskingCheckFailed(
            "eval.strict=true and gradient-masking checks failed, so the robust accuracy "
            f"{100 * result.robust_acc:.2f}% is not trustworthy{written}: "
            + "; ".join(f"{c.name} ({c.detail})" for c in failed)
            + ". Use a stronger attack (more steps, restarts, eval.suite=autoattack), or eval.strict=false "
              "to report it with a warning")
    return result
