"""Robust evaluation of a plain classifier on the test split, through the harness.

The harness (:mod:`metarobust.attacks.harness`) scores batches of test images with the model in
eval mode: clean accuracy, the attack suite of ``eval.suite`` (``single``: the ``attack``
section; ``autoattack``: APGD-CE then targeted APGD-DLR on the survivors) in every threat model
of ``eval.union``, per-class accuracies, the gradient-masking checks and the robust accuracy vs
eps sweep on the first ``eval.check_points`` images. ``eval.points`` limits the test images
(0: all, e.g. the 10,000 of CIFAR-10) to a fixed, seeded random subset
(:func:`~metarobust.data.store.evaluation_subset`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from metarobust.attacks.harness import RobustnessReport, classifier_units, evaluate_units
from metarobust.config import ExperimentConfig
from metarobust.data.store import ImageStore, evaluation_subset
from metarobust.plots import plot_robustness_curve
from metarobust.runs import RunDir

EVAL_BATCH = 256
"""Test images per harness unit (eval mode: the batch size changes no prediction)."""


def evaluate_standard(cfg: ExperimentConfig, model: torch.nn.Module, test: ImageStore,
                      run: RunDir | None = None, progress: Callable[[Iterable], Iterable] | None = None,
                      extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], RobustnessReport]:
    """Clean and robust accuracy of ``model`` on ``eval.points`` images of ``test`` (a fixed
    random subset, :func:`~metarobust.data.store.evaluation_subset`; all of them when 0).

    Returns ``(summary, report)``: ``summary`` is the JSON-able dict written to the run's
    ``eval.json`` (``extra`` merged in first; the eps plot's path under ``plot`` when the sweep ran).

    Example:
        >>> summary, report = evaluate_standard(cfg, model, data.test)
        >>> summary["clean_acc"], summary["robust_acc"], summary["after"]
    """
    points = min(cfg.eval.points or len(test), len(test))
    model.eval()
    index = evaluation_subset(len(test), points).to(test.images.device)
    units = classifier_units(model, test.images[index], test.labels[index], batch_size=EVAL_BATCH)
    with torch.no_grad():  # the attacks differentiate inside (torch.enable_grad)
        report = evaluate_units(units, cfg, test.num_classes, test.class_names, progress)
    summary: dict[str, Any] = {**(extra or {}), "recipe": cfg.recipe, "dataset": cfg.data.dataset,
                               "suite": cfg.eval.suite,
                               "norm": cfg.attack.norm, "eps": cfg.attack.eps, **report.as_dict()}
    if run is not None:
        if report.eps_sweep:
            title = f"{cfg.recipe} on {cfg.data.dataset}: robust accuracy vs eps ({cfg.attack.norm})"
            summary["plot"] = str(plot_robustness_curve(report.eps_sweep, run.path / "robustness_vs_eps.png", title))
        summary["run"] = str(run.path)
        run.write_json("eval.json", summary)
    return summary, report


def render_standard_report(cfg: ExperimentConfig, summary: dict[str, Any], last_metrics: dict[str, Any]) -> str:
    """The run's ``report.md`` for a standard recipe."""
    at, ta, a = cfg.at, cfg.train_attack, cfg.attack
    lines = [
        f"# {cfg.name}: {cfg.recipe} on {cfg.data.dataset}",
        "",
        f"- model: {cfg.model.name}; {at.epochs} epochs, batch {at.batch_size}, {summary.get('optimizer', '')}, "
        f"amp {at.amp}",
        f"- training attack: {ta.name}-{ta.steps} {ta.norm} eps {ta.eps:.4f} step {ta.step_size:.4f}",
        f"- evaluation: suite {cfg.eval.suite}, {a.name}-{a.steps} {a.norm} eps {a.eps:.4f} step {a.step_size:.4f}, "
        f"{summary['points']} test images",
        "",
        "| metric | value |",
        "|---|---|",
        f"| clean accuracy | {100 * summary['clean_acc']:.2f} % |",
        *[f"| after {name} | {100 * acc:.2f} % |" for name, acc in summary["after"].items()],
        f"| robust accuracy (worst case) | {100 * summary['robust_acc']:.2f} % |",
        f"| training time | {summary.get('train_seconds', '?')} s |",
        f"| last training metrics | {last_metrics} |",
        "",
    ]
    failed = [c for c in summary.get("checks", []) if not c["passed"]]
    if failed:
        lines += ["Gradient-masking checks FAILED:", *[f"- {c['name']}: {c['detail']}" for c in failed], ""]
    if summary.get("stopped"):
        lines += [f"Training stopped early: {summary['stopped']}", ""]
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    """A console table of an evaluation summary (clean, after each attack, worst case, worst and
    best class, the checks)."""
    lines = [f"{'':<28} {'accuracy (%)':>12}", f"{'clean':<28} {100 * summary['clean_acc']:>12.2f}"]
    for name, acc in summary["after"].items():
        lines.append(f"{'after ' + name:<28} {100 * acc:>12.2f}")
    lines.append(f"{'robust (worst case)':<28} {100 * summary['robust_acc']:>12.2f}   over {summary['points']} points")
    classes = sorted(summary["per_class"].items(), key=lambda kv: kv[1]["robust_acc"])
    if classes:
        worst, best = classes[0], classes[-1]
        lines.append(f"per class robust: worst {worst[0]} {100 * worst[1]['robust_acc']:.1f}%, "
                     f"best {best[0]} {100 * best[1]['robust_acc']:.1f}% ({len(classes)} classes)")
    for c in summary.get("checks", []):
        lines.append(f"[{'ok' if c['passed'] else 'WARNING'}] {c['name']}: {c['detail']}")
    return "\n".join(lines)


HEADLINE = ("run", "recipe", "dataset", "suite", "norm", "eps", "points", "clean_acc", "robust_acc", "after",
            "train_seconds", "stopped")


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The one-line JSON of ``metarobust train``/``eval`` for a standard run."""
    out = {k: summary[k] for k in HEADLINE if k in summary}
    out["checks_failed"] = [c["name"] for c in summary.get("checks", []) if not c["passed"]]
    return out
