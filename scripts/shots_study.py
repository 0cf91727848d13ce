"""The shots study of ITS-MAML ("Rethinking the Number of Shots in Robust MAML", Duan et al.,
arXiv 2211.15180; META.md section 1), runnable by one command.

For a dataset and a robust recipe (plus a non-robust baseline), meta-train at several
training-shot counts (``meta.train_shots``) and inner-step counts (``meta.inner_steps``) with a
fixed test-shot count; score every learner on the same frozen test episodes, clean and under
the evaluation attack; estimate the intrinsic dimension (TwoNN, MLE, PCA; ``metarobust.analysis``)
of its clean and adversarial query features after fine-tuning; then draw

- ``tradeoff.png``: clean vs robust accuracy, one point per learner (the accuracy-robustness
  trade-off; ITS-MAML's claim: more training shots move the robust learner up in clean accuracy
  without moving it left in robustness);
- ``id_vs_shots.png``: intrinsic dimension of clean and adversarial features against the training
  shots (the claim: robust regularisation lowers the clean features' ID; more shots raise it);
- ``accuracy_vs_shots.png``: clean and robust accuracy against the training shots;

and write ``results.json`` / ``results.md`` (a table); the last line printed is one JSON line.
Every learner's run folder (checkpoint, metrics, eval.json) is kept under ``<out>/runs/``; a
killed study continues where it stopped (finished runs are reused, a run with a checkpoint
resumes).

The study file (``configs/meta/shots_study_*.yaml``) is an experiment config (the base settings
every run shares) plus a ``study:`` section with the grid and the scale; command-line flags
override the ``study:`` values and ``key=value`` arguments override the base settings::

    python scripts/shots_study.py configs/meta/shots_study_omniglot.yaml data.root=../shared/data/omniglot
    python scripts/shots_study.py configs/meta/shots_study_glyphs.yaml --iterations 20 --episodes 10 \\
        --train-shots 1,3 --inner-steps 1 --points 200 --out runs/shots_tiny

The intrinsic-dimension protocol (penultimate features, a fixed number of distinct query images
per learner, sub-sample error bars) is a reconstruction [?]: the paper's is not public.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Study:
    """The ``study:`` section of a shots-study file."""

    name: str = "shots_study"
    recipes: list[str] = field(default_factory=lambda: ["its_maml", "maml"])
    """The robust recipe and its non-robust baseline (each run over the whole grid)."""
    train_shots: list[int] = field(default_factory=lambda: [1, 3, 5])
    inner_steps: list[int] = field(default_factory=lambda: [1, 5])
    """Inner SGD steps at meta-training (test-time fine-tuning keeps ``meta.test_inner_steps``)."""
    test_shots: int = 1
    iterations: int = 300
    """Meta-updates per learner."""
    episodes: int = 200
    """Frozen test episodes per learner (the same episodes for every learner)."""
    points: int = 800
    """Distinct query images pooled for the intrinsic dimension (identical for every learner)."""
    layers: list[str] = field(default_factory=lambda: ["penultimate"])
    bootstrap: int = 10
    seed: int = 0


def parse_list(text: str, kind=int) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def load_study(path: Path, args: argparse.Namespace) -> tuple[Study, dict[str, Any]]:
    """The ``study:`` section (with the command-line flags applied) and the base config dict."""
    from omegaconf import OmegaConf

    from metarobust.errors import ConfigError
    from metarobust.resources import config_path

    raw = OmegaConf.to_container(OmegaConf.load(config_path(path)))  # a file or a shipped name
    values = raw.pop("study", None) or {}
    known = Study.__dataclass_fields__
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown study keys {unknown}; valid keys: {sorted(known)}")
    study = Study(**values)
    for flag, key, kind in (("recipes", "recipes", str), ("train_shots", "train_shots", int),
                            ("inner_steps", "inner_steps", int), ("layers", "layers", str)):
        if getattr(args, flag) is not None:
            setattr(study, key, parse_list(getattr(args, flag), kind))
    for key in ("iterations", "episodes", "points", "bootstrap", "test_shots", "seed"):
        if getattr(args, key) is not None:
            setattr(study, key, getattr(args, key))
    if args.name:
        study.name = args.name
    return study, raw


def check_study(study: Study, base_cfg, stores) -> None:
    """Every grid point must be drawable from the data (a clear error before any training)."""
    from metarobust.errors import ConfigError
    from metarobust.training.recipes import RECIPES

    for recipe in study.recipes:
        RECIPES.get(recipe, "study.recipes")
        if not RECIPES.get(recipe).episodic:
            raise ConfigError(f"study.recipes: {recipe!r} is not a meta-learning recipe (the study varies "
                              f"meta.train_shots and meta.inner_steps); use e.g. its_maml, r_maml, maml")
    if not study.train_shots or min(study.train_shots) < 1:
        raise ConfigError(f"study.train_shots={study.train_shots}; give shot counts >= 1, e.g. [1, 2, 3, 5]")
    if not study.inner_steps or min(study.inner_steps) < 0:
        raise ConfigError(f"study.inner_steps={study.inner_steps}; give step counts >= 0, e.g. [1, 3, 5]")
    for key in ("iterations", "episodes", "points"):
        if getattr(study, key) < 1:
            raise ConfigError(f"study.{key}={getattr(study, key)} must be >= 1")
    counts = stores.train.counts()
    need = max(study.train_shots) + base_cfg.meta.queries
    if int((counts >= need).sum()) < base_cfg.meta.ways:
        raise ConfigError(f"study.train_shots={study.train_shots}: {max(study.train_shots)} shots + "
                          f"{base_cfg.meta.queries} queries = {need} images per class, but the train split "
                          f"has only {int(counts.min())} per class; lower the largest shot count or meta.queries")


def run_config(study: Study, base: dict, recipe: str, shots: int, steps: int, out: Path,
               manifest: Path, overrides: list[str]):
    """The config of one grid point. ``its_maml`` at ``train_shots == test_shots`` is R-MAML_out
    (the same objective; its recipe refuses equal shots), so it runs as ``r_maml``."""
    from omegaconf import OmegaConf

    from metarobust.experiment import load_config

    run_recipe = "r_maml" if recipe == "its_maml" and shots <= study.test_shots else recipe
    name = f"{recipe}_k{shots}_s{steps}"
    grid = [f"recipe={run_recipe}", f"name={name}", f"out_dir={out / 'runs'}", f"seed={study.seed}",
            f"meta.train_shots={shots}", f"meta.test_shots={study.test_shots}", f"meta.inner_steps={steps}",
            f"train.iterations={study.iterations}", f"eval.episodes={study.episodes}",
            f"eval.manifest={manifest}", f"analysis.points={study.points}",
            f"analysis.bootstrap={study.bootstrap}", f"analysis.layers=[{','.join(study.layers)}]"]
    path = out / "base.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(base)))
    return load_config(path, [*overrides, *grid])


def train_or_reuse(cfg, stores, progress: bool) -> tuple[dict, bool]:
    """Train and evaluate ``cfg`` in its run folder, or reuse a finished run (``eval.json``), or
    resume an interrupted one (a checkpoint without ``eval.json``)."""
    from metarobust.experiment import train_and_evaluate

    folder = Path(cfg.out_dir) / cfg.name
    if (folder / "eval.json").is_file():
        return json.loads((folder / "eval.json").read_text()), True
    resume = (folder / "checkpoints" / "last.pt").is_file()
    return train_and_evaluate(cfg, resume=resume, progress=progress, data=stores), False


def intrinsic_dimension(cfg, stores, manifest_obj) -> dict:
    """``{layer: {"clean"|"adversarial": {estimator: [mean, std]}}}`` of the run's learner, or
    ``{}`` when ``metarobust.analysis`` is absent (the hook the study calls)."""
    try:
        from metarobust.analysis import fewshot_intrinsic_dimension
    except ImportError:  # the analysis package is optional for the accuracy part of the study
        return {}
    from metarobust.experiment import model_from_checkpoint

    _, model, _ = model_from_checkpoint(Path(cfg.out_dir) / cfg.name)
    estimates = fewshot_intrinsic_dimension(cfg, model, stores.test, manifest_obj)
    return {layer: {cond: {est: [round(m, 4), round(s, 4)] for est, (m, s) in per.items()}
                    for cond, per in conds.items()} for layer, conds in estimates.items()}


def markdown_table(rows: list[dict], layer: str, estimator: str) -> str:
    lines = [f"| recipe | train shots | inner steps | clean acc (%) | robust acc (%) | ID clean ({estimator}) "
             f"| ID adv ({estimator}) | train s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ids = r["id"].get(layer, {})
        cell = {c: (f"{ids[c][estimator][0]:.2f} ± {ids[c][estimator][1]:.2f}" if c in ids else "n/a")
                for c in ("clean", "adversarial")}
        lines.append(f"| {r['recipe']} | {r['train_shots']} | {r['inner_steps']} | "
                     f"{100 * r['clean_acc']:.2f} ± {100 * r['clean_ci95']:.2f} | "
                     f"{100 * r['robust_acc']:.2f} ± {100 * r['robust_ci95']:.2f} | {cell['clean']} | "
                     f"{cell['adversarial']} | {r['train_seconds']} |")
    return "\n".join(lines)


def plot_all(rows: list[dict], out: Path, title: str, layer: str, estimator: str) -> dict[str, Path]:
    import matplotlib.pyplot as plt

    from metarobust.plots import save_figure  # first: it selects the headless backend

    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    steps_all = sorted({r["inner_steps"] for r in rows})
    shots_all = sorted({r["train_shots"] for r in rows})
    colors = dict(zip(recipes, ["#C44E52", "#4C72B0", "#55A868", "#8172B2", "#CCB974", "#64B5CD"]))
    markers = dict(zip(steps_all, ["o", "s", "^", "D", "v", "P"]))
    paths = {}

    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    for r in rows:
        ax.errorbar(100 * r["robust_acc"], 100 * r["clean_acc"], xerr=100 * r["robust_ci95"],
                    yerr=100 * r["clean_ci95"], fmt=markers[r["inner_steps"]], color=colors[r["recipe"]],
                    capsize=2, markersize=6, alpha=0.9)
        ax.annotate(f"K={r['train_shots']}", (100 * r["robust_acc"], 100 * r["clean_acc"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    for recipe in recipes:
        ax.plot([], [], "o", color=colors[recipe], label=recipe)
    for steps in steps_all:
        ax.plot([], [], markers[steps], color="gray", label=f"{steps} inner steps")
    ax.set_xlabel("robust accuracy (%)")
    ax.set_ylabel("clean accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{title}\naccuracy-robustness trade-off (K = training shots)", fontsize=9)
    paths["tradeoff"] = save_figure(fig, out / "tradeoff.png")

    def against_shots(ax, value, error, keep) -> None:
        """One line per (recipe, inner steps): ``value(row)`` +- ``error(row)`` vs training shots."""
        for recipe in recipes:
            for steps in steps_all:
                series = sorted((r for r in rows if r["recipe"] == recipe and r["inner_steps"] == steps
                                 and keep(r)), key=lambda r: r["train_shots"])
                if series:
                    ax.errorbar([r["train_shots"] for r in series], [value(r) for r in series],
                                yerr=[error(r) for r in series], marker=markers[steps], color=colors[recipe],
                                capsize=2, label=f"{recipe}, {steps} steps")

    def panels(name: str, suptitle: str, specs: list[tuple], sharey: bool) -> None:
        """Two side-by-side panels against training shots; ``specs``: (value, error, keep, ylabel, title)."""
        fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8), sharex=True, sharey=sharey)
        for ax, (value, error, keep, ylabel, panel_title) in zip(axes, specs):
            against_shots(ax, value, error, keep)
            ax.set_xlabel("training shots")
            ax.set_xticks(shots_all)
            ax.set_ylabel(ylabel)
            ax.set_title(panel_title, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{title}: {suptitle}", fontsize=9)
        paths[name] = save_figure(fig, out / f"{name}.png")

    def everything(r):
        return True

    panels("accuracy_vs_shots", "accuracy vs training shots", [
        (lambda r, k=key: 100 * r[f"{k}_acc"], lambda r, k=key: 100 * r[f"{k}_ci95"], everything,
         f"{key} accuracy (%)", f"{key} query accuracy") for key in ("clean", "robust")], sharey=False)
    if any(r["id"] for r in rows):
        panels("id_vs_shots", "intrinsic dimension vs training shots", [
            (lambda r, c=cond: r["id"][layer][c][estimator][0], lambda r, c=cond: r["id"][layer][c][estimator][1],
             lambda r: layer in r["id"], f"intrinsic dimension ({estimator}, {layer})", f"{cond} query features")
            for cond in ("clean", "adversarial")], sharey=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="a study file, e.g. configs/meta/shots_study_omniglot.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value for every run, e.g. data.root=../shared/data/omniglot")
    parser.add_argument("--out", default=None, help="study folder (default: runs/<study name>)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--recipes", default=None, help="comma-separated, e.g. its_maml,maml")
    parser.add_argument("--train-shots", dest="train_shots", default=None, help="comma-separated, e.g. 1,2,3,5")
    parser.add_argument("--inner-steps", dest="inner_steps", default=None, help="comma-separated, e.g. 1,3,5")
    parser.add_argument("--test-shots", dest="test_shots", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None, help="meta-updates per learner")
    parser.add_argument("--episodes", type=int, default=None, help="frozen test episodes per learner")
    parser.add_argument("--points", type=int, default=None, help="distinct query images for the ID")
    parser.add_argument("--bootstrap", type=int, default=None, help="ID sub-samples for error bars")
    parser.add_argument("--layers", default=None, help="comma-separated layers for the ID (default penultimate)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_intermixed_args(argv)  # key=value arguments may follow the flags

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from metarobust.data.manifest import freeze_episodes, load_manifest, save_manifest
    from metarobust.errors import MetarobustError
    from metarobust.training.data import load_training_data, resolve_device
    from metarobust.training.recipes import build_recipe

    start = time.perf_counter()
    try:
        study, base = load_study(Path(args.study), args)
        out = Path(args.out or ROOT / "runs" / study.name)
        out.mkdir(parents=True, exist_ok=True)
        # The shared test episodes: frozen once for the whole study, every learner scored on them.
        first = run_config(study, base, study.recipes[0], study.test_shots, study.inner_steps[0], out,
                           out / "episodes.json", args.overrides)
        stores = load_training_data(first, build_recipe(first), resolve_device(first.device))
        check_study(study, first, stores)
        manifest_path = out / "episodes.json"
        if not manifest_path.is_file():
            m = first.meta
            save_manifest(freeze_episodes(stores.test, m.ways, study.test_shots, m.queries, study.episodes,
                                          seed=study.seed, dataset=first.data.dataset), manifest_path)
        manifest = load_manifest(manifest_path)
        rows = []
        grid = [(r, k, s) for r in study.recipes for k in study.train_shots for s in study.inner_steps]
        for i, (recipe, shots, steps) in enumerate(grid, 1):
            cfg = run_config(study, base, recipe, shots, steps, out, manifest_path, args.overrides)
            print(f"== [{i}/{len(grid)}] {cfg.name}: {cfg.recipe}, {shots} training shots, {steps} inner steps, "
                  f"{study.iterations} meta-updates ==", flush=True)
            torch.manual_seed(cfg.seed)
            summary, reused = train_or_reuse(cfg, stores, progress=not args.quiet)
            ids = intrinsic_dimension(cfg, stores, manifest)
            row = {"recipe": recipe, "run_recipe": cfg.recipe, "train_shots": shots, "inner_steps": steps,
                   "test_shots": study.test_shots, "clean_acc": summary["clean_acc"],
                   "clean_ci95": summary["clean_ci95"], "robust_acc": summary["robust_acc"],
                   "robust_ci95": summary["robust_ci95"], "episodes": summary["episodes"],
                   "train_seconds": summary.get("train_seconds"), "reused": reused, "id": ids,
                   "run": str(Path(cfg.out_dir) / cfg.name)}
            rows.append(row)
            print(f"   clean {100 * row['clean_acc']:.2f} %  robust {100 * row['robust_acc']:.2f} %  "
                  f"ID {json.dumps(ids)}", flush=True)
            (out / "results.json").write_text(json.dumps({"study": study.__dict__, "rows": rows}, indent=2) + "\n")
    except MetarobustError as exc:
        print(f"shots_study: error: {exc}", file=sys.stderr)
        return 2

    layer = study.layers[0]
    estimator = "twonn"
    title = (f"{first.data.dataset}, {first.meta.ways}-way {study.test_shots}-shot test, "
             f"{study.iterations} meta-updates, {first.attack.name}-{first.attack.steps} eps {first.attack.eps:.4f}")
    table = markdown_table(rows, layer, estimator)
    plots = plot_all(rows, out, title, layer, estimator)
    (out / "results.md").write_text(f"# Shots study: {study.name}\n\n{title}\n\n{table}\n\nID: {estimator} on "
                                    f"`{layer}` features of {study.points} distinct query images, mean ± std over "
                                    f"{study.bootstrap} sub-samples.\n")
    print(table)
    print("plots: " + ", ".join(str(p) for p in plots.values()))
    headline = {"study": study.name, "dataset": first.data.dataset, "test_shots": study.test_shots,
                "iterations": study.iterations, "episodes": study.episodes, "points": study.points,
                "seconds": round(time.perf_counter() - start, 1), "out": str(out),
                "runs": {f"{r['recipe']}_k{r['train_shots']}_s{r['inner_steps']}": {
                    "clean_acc": round(r["clean_acc"], 4), "robust_acc": round(r["robust_acc"], 4),
                    **({f"id_clean_{estimator}": r["id"][layer]["clean"][estimator][0],
                        f"id_adv_{estimator}": r["id"][layer]["adversarial"][estimator][0]}
                       if layer in r["id"] else {})} for r in rows}}
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
