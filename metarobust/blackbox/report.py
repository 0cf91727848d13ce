"""Query statistics of a black-box attack, the terminal table and the success-vs-queries plot.

Every rate is over the *attacked* examples (those the target classifies correctly when clean),
never over the successes only, and a success is one the oracle confirms on a fresh query of the
final point (:meth:`~metarobust.blackbox.oracle.Oracle.verify`): misclassified, or in targeted
mode (``summary["targeted"]``, stated in the table) classified as the point's target. The median is over the query
counts of the successful examples (MCG's released code took it over the success flags, META.md
3.6). FASR, the first-attack success rate, is the share of attacked examples fooled by the first
query they were charged for; ``fasr_of_successes`` is the same count over the successes, the
quantity MCG's code printed under that name. With MCG (``mcg+<attack>`` rows) FASR is the
share of attacked examples its one proposal query fooled, and :func:`mcg_comparison` sets each
seeded attack against the plain one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def query_curve(queries: torch.Tensor, success: torch.Tensor, budget: int, points: int = 50) -> list[list[float]]:
    """``[[q, success rate within q queries], ...]`` on ``points`` budgets from 1 to ``budget``
    (the rate over all attacked examples)."""
    grid = sorted({max(1, round(budget * (i + 1) / points)) for i in range(points)} | {1})
    total = max(len(queries), 1)
    return [[q, float(((queries <= q) & success).sum()) / total] for q in grid]


def summarise(queries: torch.Tensor, claimed: torch.Tensor, verified: torch.Tensor, budget: int,
              bins: int = 10) -> dict[str, Any]:
    """The statistics of one attack over ``A`` attacked examples.

    Arguments:
        queries: ``int64 [A]`` images sent per example (:attr:`Outcome.queries`).
        claimed: ``bool [A]`` the attack's own verdicts.
        verified: ``bool [A]`` the oracle's verdicts on a fresh query of the final points.
        budget: the query budget per example.
    """
    queries, claimed, verified = queries.cpu(), claimed.cpu(), verified.cpu()
    success = claimed & verified
    attacked = len(queries)
    won = queries[success].double()
    edges = torch.linspace(0, budget, bins + 1)
    counts = torch.histc(won.float(), bins=bins, min=0, max=budget).long().tolist() if len(won) else [0] * bins
    first = int((success & (queries == 1)).sum())
    return {
        "attacked": attacked,
        "success_rate": float(success.sum()) / max(attacked, 1),
        "successes": int(success.sum()),
        "mean_queries": float(won.mean()) if len(won) else None,
        "median_queries": float(won.median()) if len(won) else None,
        "fasr": first / max(attacked, 1),
        "fasr_of_successes": first / len(won) if len(won) else None,
        "claimed_not_verified": int((claimed & ~verified).sum()),
        "mean_queries_all": float(queries.double().mean()) if attacked else None,
        "histogram": {"edges": [round(float(e), 2) for e in edges], "counts": counts},
        "curve": query_curve(queries, success, budget),
    }


def mcg_comparison(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per attack run both plain and as ``mcg+<attack>``: the two success rates, MCG's FASR,
    and ``query_ratio`` = MCG's mean queries over the successes / the plain attack's (below 1:
    MCG needs fewer) and ``query_ratio_all`` the same over every attacked point (failures count
    the queries they spent, up to the budget), so a ratio cannot look good by losing the hard
    points."""
    out = {}
    for name, plain in summary["attacks"].items():
        seeded = summary["attacks"].get(f"mcg+{name}")
        if name.startswith("mcg+") or seeded is None:
            continue

        def ratio(key: str) -> float | None:
            a, b = seeded[key], plain[key]
            return None if a is None or not b else a / b

        out[name] = {"success_rate": plain["success_rate"], "mcg_success_rate": seeded["success_rate"],
                     "mean_queries": plain["mean_queries"], "mcg_mean_queries": seeded["mean_queries"],
                     "median_queries": plain["median_queries"], "mcg_median_queries": seeded["median_queries"],
                     "fasr": plain["fasr"], "mcg_fasr": seeded["fasr"],
                     "query_ratio": ratio("mean_queries"), "query_ratio_all": ratio("mean_queries_all")}
    return out


def blackbox_table(summary: dict[str, Any]) -> str:
    """Terminal table: one row per attack (``mcg+<attack>``: seeded by MCG's proposal)."""
    head = (f"{'attack':<16} {'success':>8} {'mean q':>8} {'median q':>9} {'FASR':>6} "
            f"{'attacked':>8} {'unverified':>10}")
    lines = [head]
    for name, r in summary["attacks"].items():
        def num(v):
            return f"{v:.1f}" if v is not None else "-"
        lines.append(f"{name:<16} {100 * r['success_rate']:>7.1f}% {num(r['mean_queries']):>8} "
                     f"{num(r['median_queries']):>9} {100 * r['fasr']:>5.1f}% {r['attacked']:>8} "
                     f"{r['claimed_not_verified']:>10}")
    mode = "targeted (a random other class per point)" if summary.get("targeted") else "untargeted"
    lines.append(f"{mode}, {summary['norm']} eps {summary['eps']:.4g}, budget {summary['budget']} queries per example, "
                 f"oracle output {summary['output']}, quantisation {summary['levels'] or 'none'}; "
                 f"clean accuracy {100 * summary['clean_acc']:.1f}% of {summary['points']} points; "
                 f"rates over the attacked (clean-correct) points, queries over the successes")
    if "mcg" in summary:
        lines.append("mcg+<attack>: MCG's generator spends each example's first query (FASR: the share it fools), "
                     "the attack starts from its proposal; counts include that query")
    return "\n".join(lines)


def blackbox_headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The final JSON line: per attack the success rate and mean/median queries, rounded."""
    out: dict[str, Any] = {"target": summary.get("target"), "norm": summary["norm"], "eps": round(summary["eps"], 5),
                           "budget": summary["budget"], "targeted": bool(summary.get("targeted")),
                           "clean_acc": round(summary["clean_acc"], 4)}
    for name, r in summary["attacks"].items():
        out[name] = {"success_rate": round(r["success_rate"], 4),
                     "mean_queries": None if r["mean_queries"] is None else round(r["mean_queries"], 1),
                     "median_queries": r["median_queries"], "fasr": round(r["fasr"], 4)}
    for name, c in summary.get("mcg", {}).get("comparison", {}).items():
        out[f"mcg+{name}"]["query_ratio"] = None if c["query_ratio"] is None else round(c["query_ratio"], 3)
    return out


def plot_success_vs_queries(summary: dict[str, Any], path: str | Path, title: str) -> Path:
    """Success rate (%) of each attack against the queries spent per example; an attack seeded
    by MCG (``mcg+<attack>``) is dashed in its plain attack's colour."""
    from metarobust.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    colours: dict[str, Any] = {}
    for name, r in summary["attacks"].items():
        qs, rates = zip(*r["curve"]) if r["curve"] else ((), ())
        base = name.removeprefix("mcg+")
        style = {"linestyle": "--", "color": colours[base]} if name != base and base in colours else {}
        (line,) = ax.plot(qs, [100 * v for v in rates], label=name, linewidth=1.5, **style)
        colours.setdefault(base, line.get_color())
    ax.set_xlabel("queries per example")
    ax.set_ylabel("success rate (% of attacked)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, summary["budget"])
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


__all__ = ["blackbox_headline", "blackbox_table", "mcg_comparison", "plot_success_vs_queries", "query_curve", "summarise"]
