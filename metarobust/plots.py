"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG (120 dpi), close it; return the path."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_clean_vs_robust(results: dict[str, dict], path: str | Path, title: str,
                         chance: float | None = None, robust_label: str = "robust (PGD)",
                         ylabel: str = "accuracy on held-out classes (%)") -> Path:
    """Grouped bars of clean and robust accuracy (%) per method, with 95% intervals and an
    optional dashed chance line (``chance`` in [0, 1]).

    ``results[name]`` holds ``clean_acc``, ``clean_ci95``, ``robust_acc``, ``robust_ci95`` in [0, 1].
    """
    names = list(results)
    fig, ax = plt.subplots(figsize=(2.4 + 1.6 * len(names), 3.8))
    width = 0.38
    for offset, (key, label, color) in enumerate([("clean", "clean", "#4C72B0"),
                                                   ("robust", robust_label, "#C44E52")]):
        xs = [i + (offset - 0.5) * width for i in range(len(names))]
        values = [100 * results[n][f"{key}_acc"] for n in names]
        errors = [100 * results[n][f"{key}_ci95"] for n in names]
        bars = ax.bar(xs, values, width, yerr=errors, capsize=3, label=label, color=color)
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
    if chance is not None:
        ax.axhline(100 * chance, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    return save_figure(fig, path)


def plot_robustness_curve(sweep: list[dict[str, float]], path: str | Path, title: str, caption: str = "") -> Path:
    """Robust accuracy (%) against epsilon, from the harness's eps sweep; ``caption`` (under the
    plot) says what the sweep ran on (:func:`metarobust.evaluation.report.sweep_caption`)."""
    fig, ax = plt.subplots(figsize=(4.8, 3.8 if caption else 3.4))
    ax.plot([s["eps"] for s in sweep], [100 * s["robust_acc"] for s in sweep], marker="o")
    # The caption goes under the axis label, where the layout leaves room for it.
    ax.set_xlabel("epsilon" + (f"\n{textwrap.fill(caption, 70)}" if caption else ""), fontsize=8 if caption else None)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
