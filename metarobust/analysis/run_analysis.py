"""``metarobust id RUN_OR_CHECKPOINT``: the analysis of a trained run, written beside it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from metarobust.analysis.fewshot import fewshot_id_report
from metarobust.analysis.id_plot import plot_id_per_layer
from metarobust.analysis.report import IDReport, intrinsic_dimension_of_units
from metarobust.analysis.units import classifier_feature_units
from metarobust.config import ExperimentConfig, check_output_path
from metarobust.runs import atomic_write_text


def analyse_run(path: str | Path, overrides: list[str] | None = None,
                progress: Callable[[Iterable], Iterable] | None = None
                ) -> tuple[ExperimentConfig, IDReport, dict[str, Path]]:
    """Load the run (or checkpoint) at ``path`` with ``overrides``, run the analysis on its test
    split (few-shot: the frozen test episodes; plain classifier: the test images) and write
    ``id.json`` and ``id.png`` into the run folder (beside a checkpoint file).

    Returns the config, the report and ``{"json": ..., "plot": ...}`` paths.
    """
    from metarobust.experiment import model_from_checkpoint, resolve_manifest
    from metarobust.training.data import load_training_data, resolve_device
    from metarobust.training.recipes import build_recipe

    cfg, model, state = model_from_checkpoint(path, overrides)
    run_path = Path(path)
    out_dir = run_path if run_path.is_dir() else run_path.parent
    json_path, plot_path = out_dir / "id.json", out_dir / "id.png"
    for output in (json_path, plot_path):  # before the analysis, not after it
        check_output_path("RUN", output)
    recipe = build_recipe(cfg)
    stores = load_training_data(cfg, recipe, resolve_device(cfg.device))
    if recipe.evaluation == "classifier":
        batch = getattr(getattr(cfg, "at", None), "batch_size", 256)
        units = classifier_feature_units(model, stores.test, batch)
        report = intrinsic_dimension_of_units(units, model, cfg.analysis, cfg.attack, cfg.seed, progress)
        report.meta = {"recipe": cfg.recipe, "dataset": cfg.data.dataset}
    else:
        manifest = resolve_manifest(cfg, stores.test, model=model, recipe=recipe)
        report = fewshot_id_report(cfg, model, stores.test, manifest, progress)
    report.meta = {"run": str(path), "step": int(state["step"]), **report.meta}
    atomic_write_text(json_path, json.dumps(report.as_dict(), indent=2) + "\n")
    title = (f"{cfg.recipe} on {cfg.data.dataset}: {report.points} test points, adversarial = "
             f"{cfg.attack.name}-{cfg.attack.steps} {cfg.attack.norm} eps {cfg.attack.eps:.4g}")
    plot = plot_id_per_layer(report, plot_path, title)
    return cfg, report, {"json": json_path, "plot": plot}


def id_table(report: IDReport) -> str:
    """Terminal table: per layer, each estimator's clean and adversarial mean +- std."""
    first = next(iter(report.layers.values()))
    estimators = list(first.estimates["clean"])
    conditions = list(first.estimates)
    header = f"{'layer':<14} {'features':>8}" + "".join(
        f" {est + ' ' + ('clean' if c == 'clean' else 'adv'):>16}" for est in estimators for c in conditions)
    lines = [header]
    for layer, r in report.layers.items():
        cells = "".join(f" {r.estimates[c][est]['mean']:>9.2f} ± {r.estimates[c][est]['std']:<4.2f}"
                        for est in estimators for c in conditions)
        lines.append(f"{layer:<14} {r.features:>8}{cells}")
    dup = {layer: r.duplicates for layer, r in report.layers.items() if any(r.duplicates.values())}
    lines.append(f"{report.points} distinct test images; ± is the std over {report.bootstrap} sub-samples "
                 f"of {report.fraction:.0%}" + (f"; duplicate feature vectors dropped: {dup}" if dup else ""))
    return "\n".join(lines)


def id_headline(report: IDReport) -> dict:
    """The final JSON line: every layer's mean estimates, rounded."""
    return {"run": report.meta.get("run"), "recipe": report.meta.get("recipe"), "points": report.points,
            "eps": report.attack.get("eps"),
            "id": {layer: {c: {e: round(v["mean"], 3) for e, v in per.items()} for c, per in r.estimates.items()}
                   for layer, r in report.layers.items()}}
