"""The ``metarobust id`` figure: intrinsic dimension per layer, clean vs adversarial."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from metarobust.analysis.report import IDReport
from metarobust.plots import save_figure

_STYLE = {"clean": ("#4C72B0", "-", "o"), "adversarial": ("#C44E52", "--", "s")}
_NAMES = {"twonn": "TwoNN", "mle": "MLE (MacKay-Ghahramani)", "pca": "PCA (90% variance)"}


def plot_id_per_layer(report: IDReport, path: str | Path, title: str) -> Path:
    """One panel per estimator: the dimension (mean +- std over sub-samples) against the layer,
    a solid line for clean and a dashed one for adversarial features."""
    layers = list(report.layers)
    estimators = list(next(iter(report.layers.values())).estimates["clean"])
    fig, axes = plt.subplots(1, len(estimators), figsize=(1.2 + 3.4 * len(estimators), 3.6), squeeze=False)
    for ax, est in zip(axes[0], estimators):
        for cond, (color, line, marker) in _STYLE.items():
            if cond not in report.layers[layers[0]].estimates:
                continue
            means = [report.layers[lay].estimates[cond][est]["mean"] for lay in layers]
            stds = [report.layers[lay].estimates[cond][est]["std"] for lay in layers]
            stds = [0.0 if s != s else s for s in stds]  # nan (no sub-samples) -> no bar
            ax.errorbar(range(len(layers)), means, yerr=stds, color=color, linestyle=line, marker=marker,
                        capsize=3, label=cond)
        ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize=8)
        ax.set_title(_NAMES.get(est, est), fontsize=9)
        ax.set_ylabel("intrinsic dimension")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
