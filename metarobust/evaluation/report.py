"""The one rendering of an evaluation (the ``eval.json`` dict of
:class:`~metarobust.evaluation.result.EvalResult`): ``report.md``, the console table and the
one-line JSON headline, for meta-learners, RFS and plain classifiers alike. What differs per
kind of run (how it was trained) comes in as header lines from the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from metarobust.config import ExperimentConfig
from metarobust.evaluation.harness import SUITE_NAMES

HEADLINE = ("run", "recipe", "dataset", "suite", "norm", "eps", "step", "episodes", "points", "clean_acc",
            "clean_ci95", "robust_acc", "robust_ci95", "after", "train_seconds", "stopped", "best_epoch")
"""Keys of the JSON headline, in order (those a summary has and that are not ``None``)."""


def robust_name(summary: dict[str, Any]) -> str:
    """What the robust number is, after what was run: the one attack (``"PGD-10"``), else the
    suite and the attacks it is the worst case of (``"AutoAttack standard: worst case of
    linf/apgd-ce, linf/apgd-t, linf/fab-t, linf/square"``; ``"worst case of linf/pgd-10,
    l2/pgd-10"`` for one attack in a union of threat models)."""
    attacks, name = list(summary["after"]), summary.get("suite", "single")
    suite = None if name == "single" else SUITE_NAMES.get(name)
    if len(attacks) == 1:
        return suite if name == "autoattack_reference" else attacks[0].split("/", 1)[-1].upper()
    worst = f"worst case of {', '.join(attacks)}"
    return f"{suite}: {worst}" if suite else worst


def sweep_caption(summary: dict[str, Any], cfg: ExperimentConfig) -> str:
    """What the eps sweep ran: the ``attack`` section alone on the first ``check_points`` points,
    so its value at the headline eps differs from the table's robust accuracy."""
    a = cfg.attack
    return (f"{a.name.upper()}-{a.steps} ({a.norm}) alone on the first {summary['check_points']} points; the table's "
            f"robust accuracy is {robust_name(summary)} on all {summary['points']} points")


def interval_note(summary: dict[str, Any]) -> str:
    """How the ± of ``summary`` was computed."""
    if summary["interval"] == "episodes":
        return f"95 % interval over {summary['episodes']} episodes (mean ± 1.96 s/√E)"
    return f"95 % binomial interval over {summary['points']} points (± 1.96 √(p(1-p)/n))"


def _pct(acc: float, ci: float) -> str:
    return f"{100 * acc:.2f} ± {100 * ci:.2f} %"


def render_report(cfg: ExperimentConfig, summary: dict[str, Any], header: Sequence[str] = (),
                  last_metrics: dict[str, Any] | None = None) -> str:
    """The run's ``report.md``: title, the caller's ``header`` lines (how the model was trained,
    as Markdown list items), the evaluation, the metric table, the checks and the eps sweep.

    Example:
        >>> text = render_report(cfg, result.as_dict(), ["- model: conv4, 200 meta-updates"])
    """
    a = cfg.attack
    scored = (f"{summary['episodes']} test episodes ({summary['points']} query points)"
              if summary.get("episodes") is not None else f"{summary['points']} test images")
    attacks = ", ".join(summary["after"])
    start = "random start" if a.random_start else "no random start"
    evaluation = (f"- evaluation: {scored}; suite {summary['suite']}: {attacks} (each on the points still robust), "
                  f"{a.norm} eps {a.eps:.4f}, step {a.step_size:.4f}, {start}; {interval_note(summary)}")
    rows = [f"| clean accuracy | {_pct(summary['clean_acc'], summary['clean_ci95'])} |"]
    if len(summary["after"]) > 1:
        rows += [f"| after {name} | {_pct(acc, summary['after_ci95'][name])} |"
                 for name, acc in summary["after"].items()]
    rows.append(f"| robust accuracy ({robust_name(summary)}) | "
                f"{_pct(summary['robust_acc'], summary['robust_ci95'])} |")
    rows.append(f"| {'test episodes' if summary.get('episodes') is not None else 'test images'} | "
                f"{summary['episodes'] if summary.get('episodes') is not None else summary['points']} |")
    if "train_seconds" in summary:
        rows.append(f"| training time | {summary['train_seconds']} s |")
    if last_metrics is not None:
        rows.append(f"| last training metrics | {last_metrics} |")
    lines = [
        f"# {cfg.name}: {cfg.recipe} on {cfg.data.dataset}",
        "",
        *header,
        evaluation,
        "",
        "| metric | value |",
        "|---|---|",
        *rows,
        "",
    ]
    if summary.get("checks"):
        failed = [c for c in summary["checks"] if not c["passed"]]
        lines.append(f"Gradient-masking checks on {summary['check_points']} points: "
                     + (f"{len(failed)} FAILED" if failed else "all passed"))
        lines += [f"- [{'ok' if c['passed'] else 'FAILED'}] {c['name']}: {c['detail']}" for c in summary["checks"]]
        lines.append("")
    if summary.get("eps_sweep"):
        lines += [f"Robust accuracy vs eps ({sweep_caption(summary, cfg)}): " + ", ".join(f"{s['eps']:.3g}: {100 * s['robust_acc']:.1f} %"
                                                        for s in summary["eps_sweep"]), ""]
    if summary.get("stopped"):
        lines += [f"Training stopped early: {summary['stopped']}", ""]
    return "\n".join(lines)


def render_later_evaluations(evaluations: dict[str, dict[str, Any]]) -> str:
    """The report's section on later evaluations (``metarobust eval``'s ``eval/<name>.json``, by
    name): what each changed, its threat model and suite, what it scored, clean and robust accuracy
    with their intervals. Empty when there are none.

    Example:
        >>> text = render_later_evaluations({"attack.steps=20": json.loads(path.read_text())})
    """
    if not evaluations:
        return ""
    lines = ["", "## Later evaluations (`metarobust eval`, `eval/<name>.json`)", "",
             "| name | overrides | robust = | threat model | scored on | step | clean accuracy | robust accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, s in evaluations.items():
        overrides = " ".join(f"`{o}`" for o in s.get("overrides", [])) or "none"
        scored = f"{s['episodes']} episodes" if s.get("episodes") is not None else f"{s['points']} points"
        lines.append(f"| {name} | {overrides} | {robust_name(s)} (suite {s['suite']}) | {s['norm']} eps {s['eps']:.4g} "
                     f"| {scored} | {s.get('step')} | {_pct(s['clean_acc'], s['clean_ci95'])} "
                     f"| {_pct(s['robust_acc'], s['robust_ci95'])} |")
        notes.append(f"- {name}: {interval_note(s)}")
    return "\n".join([*lines, "", *notes, ""])


def console_table(results: dict[str, dict[str, Any]]) -> str:
    """A terminal table of one or more evaluations (``{method: eval.json dict}``): clean
    accuracy, the accuracy after each attack when a suite has several, the robust accuracy, what
    was scored; then per method the worst and best class and the checks.

    Example:
        >>> print(console_table({"r_maml": r_maml.as_dict(), "maml": maml.as_dict()}))
    """
    attacks = list(dict.fromkeys(k for r in results.values() if len(r["after"]) > 1 for k in r["after"]))
    columns = ["clean acc (%)", *[f"after {k} (%)" for k in attacks], "robust acc (%)"]
    width = max(16, *(len(c) for c in columns))
    name_width = max(22, *(len(n) for n in results))
    lines = [f"{'method':<{name_width}} " + " ".join(f"{c:>{width}}" for c in columns) + "   scored on"]

    def cell(acc: float | None, ci: float | None) -> str:
        return f"{'-':>{width}}" if acc is None else f"{f'{100 * acc:.2f} ± {100 * ci:<5.2f}':>{width}}"

    for name, r in results.items():
        cells = [cell(r["clean_acc"], r["clean_ci95"]),
                 *[cell(r["after"].get(k), r["after_ci95"].get(k)) for k in attacks],
                 cell(r["robust_acc"], r["robust_ci95"])]
        scored = f"{r['episodes']} episodes" if r.get("episodes") is not None else f"{r['points']} points"
        lines.append(f"{name:<{name_width}} " + " ".join(cells) + f"   {scored}")
    first = next(iter(results.values()))
    lines.append(f"robust = {robust_name(first)} ({first['norm']} eps {first['eps']:.4g}); "
                 f"± = {interval_note(first)}")
    for name, r in results.items():
        prefix = f"{name}: " if len(results) > 1 else ""
        classes = sorted(r.get("per_class", {}).items(), key=lambda kv: kv[1]["robust_acc"])
        if classes:
            (worst, w), (best, b) = classes[0], classes[-1]
            lines.append(f"{prefix}per class robust: worst {worst} {100 * w['robust_acc']:.1f}%, "
                         f"best {best} {100 * b['robust_acc']:.1f}% ({len(classes)} classes)")
        for c in r.get("checks", []):
            lines.append(f"{prefix}[{'ok' if c['passed'] else 'WARNING'}] {c['name']}: {c['detail']}")
    return "\n".join(lines)


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The one-line JSON of ``metarobust train``/``eval``: run, threat model, clean and robust
    accuracy with their intervals, the accuracy after each attack, the failed checks."""
    out = {k: summary[k] for k in HEADLINE if summary.get(k) is not None}
    out["checks_failed"] = [c["name"] for c in summary.get("checks", []) if not c["passed"]]
    return out
