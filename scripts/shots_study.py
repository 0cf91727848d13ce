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
resumes). Run folders are working files; the study's committed summary (``--results``) can stand in
for them: ``--reuse-results docs/results/shots_study_omniglot.json`` takes the rows of learners
that have no finished run folder from that file, after checking that it was made with the same
study settings, base config and test episodes. So a second seed can be added to a committed study
without retraining the first::

    python scripts/shots_study.py configs/meta/shots_study_omniglot.yaml data.root=../shared/data/omniglot \\
        --reuse-results docs/results/shots_study_omniglot.json --results docs/results/shots_study_omniglot.json

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
import math
import platform
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
    """The training seed of the grid, and the seed of the frozen test episodes."""
    replicate_seeds: list[int] = field(default_factory=list)
    """Further training seeds (same test episodes), run at ``replicate_shots``: seed-to-seed spread."""
    replicate_shots: list[int] = field(default_factory=list)
    """The training shots the replicate seeds run at (empty: every ``train_shots``)."""
    overrides: dict[str, list[str]] = field(default_factory=dict)
    """Per-recipe ``key=value`` overrides, e.g. ``{r_maml: [robust.form=trades, robust.weight=5.0]}``."""
    test_queries: int | None = None
    """Query images per class of the frozen test episodes (``None``: ``meta.queries``, which then
    only sets the training episodes' queries)."""
    cascade_episodes: int = 0
    """The first N frozen episodes are also scored under AutoAttack's APGD-CE + APGD-T cascade
    (``eval.suite=apgd_ce_t``), written to each run's ``eval/apgd_ce_t.json``; 0: none."""
    margin: float = 0.02
    """"Little or no" robustness cost: a loss the 95 % interval keeps above ``-margin``."""


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
    if getattr(args, "replicate_seeds", None) is not None:
        study.replicate_seeds = parse_list(args.replicate_seeds, int)
    for key in ("iterations", "episodes", "points", "bootstrap", "test_shots", "seed", "cascade_episodes"):
        if getattr(args, key, None) is not None:
            setattr(study, key, getattr(args, key))
    if args.name:
        study.name = args.name
    return study, raw


REUSE_KEYS = ("recipes", "train_shots", "inner_steps", "test_shots", "iterations", "episodes", "test_queries",
              "cascade_episodes", "points", "layers", "bootstrap", "seed", "overrides")
"""The study settings a reused results file must share with the study being run (the replicate
seeds may differ: adding one is what reuse is for)."""


def file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def reusable_rows(path: Path, study: Study, base: dict, manifest_sha: str) -> dict[str, dict]:
    """``{learner name: row}`` of a summary written by ``--results``, after checking that it
    answers the same study: the settings of :data:`REUSE_KEYS`, the base config every run shares,
    and (when the file records it) the same frozen test episodes."""
    from metarobust.errors import ConfigError

    try:
        previous = json.loads(path.read_text())
        rows, theirs = previous["rows"], previous["study"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--reuse-results {path}: not a shots-study summary written by --results ({exc})") from exc
    ours = study.__dict__
    differ = [k for k in REUSE_KEYS if theirs.get(k, ours[k]) != ours[k]]
    if previous.get("base") != json.loads(json.dumps(base)):  # as the file holds it (tuples read back as lists)
        differ.append("base (model, meta, attack)")
    if previous.get("manifest_sha256", manifest_sha) != manifest_sha:
        differ.append("the frozen test episodes (manifest_sha256)")
    if differ:
        raise ConfigError(f"--reuse-results {path}: made with other settings than this study ({', '.join(differ)}); "
                          "rerun those learners, or drop --reuse-results")
    if "manifest_sha256" not in previous:
        print(f"note: {path} records no test-episode hash; its episodes are the ones frozen again here from "
              f"study.seed={study.seed} (freezing is deterministic)", flush=True)
    return {r["name"]: r for r in rows}


def check_study(study: Study, base_cfg, stores) -> None:
    """Every grid point must be drawable from the data (a clear error before any training)."""
    from metarobust.errors import ConfigError
    from metarobust.training.recipes import RECIPES

    for recipe in study.recipes:
        RECIPES.get(recipe, "study.recipes")
        if not RECIPES.get(recipe).episodic:
            raise ConfigError(f"study.recipes: {recipe!r} is not a meta-learning recipe (the study varies "
                              f"meta.train_shots and meta.inner_steps); use e.g. its_maml, r_maml, maml")
    stray = sorted(set(study.overrides) - set(study.recipes))
    if stray:
        raise ConfigError(f"study.overrides: {stray} are not among study.recipes={study.recipes}; "
                          f"key each override list by a recipe of the study")
    if not study.train_shots or min(study.train_shots) < 1:
        raise ConfigError(f"study.train_shots={study.train_shots}; give shot counts >= 1, e.g. [1, 2, 3, 5]")
    if not set(study.replicate_shots) <= set(study.train_shots):
        raise ConfigError(f"study.replicate_shots={study.replicate_shots} must be among study.train_shots="
                          f"{study.train_shots}")
    if study.seed in study.replicate_seeds:
        raise ConfigError(f"study.replicate_seeds={study.replicate_seeds} repeats study.seed={study.seed}; "
                          f"give other seeds, e.g. [{study.seed + 1}]")
    if not study.inner_steps or min(study.inner_steps) < 0:
        raise ConfigError(f"study.inner_steps={study.inner_steps}; give step counts >= 0, e.g. [1, 3, 5]")
    for key in ("iterations", "episodes", "points"):
        if getattr(study, key) < 1:
            raise ConfigError(f"study.{key}={getattr(study, key)} must be >= 1")
    if not 0 <= study.cascade_episodes <= study.episodes:
        raise ConfigError(f"study.cascade_episodes={study.cascade_episodes} must be in [0, study.episodes="
                          f"{study.episodes}]")
    if study.test_queries is not None and study.test_queries < 1:
        raise ConfigError(f"study.test_queries={study.test_queries} must be >= 1 (or null: meta.queries)")
    counts = stores.train.counts()
    need = max(study.train_shots) + base_cfg.meta.queries
    if int((counts >= need).sum()) < base_cfg.meta.ways:
        raise ConfigError(f"study.train_shots={study.train_shots}: {max(study.train_shots)} shots + "
                          f"{base_cfg.meta.queries} queries = {need} images per class, but the train split "
                          f"has only {int(counts.min())} per class; lower the largest shot count or meta.queries")


@dataclass(frozen=True)
class Point:
    """One learner of the study: a recipe at a training-shot count, inner-step count and seed."""

    recipe: str
    shots: int
    steps: int
    seed: int

    def name(self, study: Study) -> str:
        tail = "" if self.seed == study.seed else f"_seed{self.seed}"
        return f"{self.recipe}_k{self.shots}_s{self.steps}{tail}"


def grid(study: Study) -> list[Point]:
    """The main grid at ``study.seed``, then the replicate seeds at ``replicate_shots``."""
    points = [Point(r, k, s, study.seed) for r in study.recipes for k in study.train_shots for s in study.inner_steps]
    shots = study.replicate_shots or study.train_shots
    points += [Point(r, k, s, seed) for seed in study.replicate_seeds for r in study.recipes for k in shots
               for s in study.inner_steps]
    return points


def run_config(study: Study, base: dict, recipe: str, shots: int, steps: int, out: Path,
               manifest: Path, overrides: list[str], seed: int | None = None):
    """The config of one grid point. ``its_maml`` at ``train_shots == test_shots`` is R-MAML_out
    (the same objective; its recipe refuses equal shots), so it runs as ``r_maml`` (with the
    study's ``its_maml`` overrides). Precedence: base file < ``study.overrides[recipe]`` <
    command-line ``key=value`` < the grid's own keys."""
    from omegaconf import OmegaConf

    from metarobust.experiment import load_config

    point = Point(recipe, shots, steps, study.seed if seed is None else seed)
    run_recipe = "r_maml" if recipe == "its_maml" and shots <= study.test_shots else recipe
    grid_keys = [f"recipe={run_recipe}", f"name={point.name(study)}", f"out_dir={out / 'runs'}",
                 f"seed={point.seed}", f"meta.train_shots={shots}", f"meta.test_shots={study.test_shots}",
                 f"meta.inner_steps={steps}", f"train.iterations={study.iterations}",
                 f"eval.episodes={study.episodes}", f"eval.manifest={manifest}", f"analysis.points={study.points}",
                 f"analysis.bootstrap={study.bootstrap}", f"analysis.layers=[{','.join(study.layers)}]"]
    path = out / "base.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(base)))
    return load_config(path, [*study.overrides.get(recipe, []), *overrides, *grid_keys])


def train_or_reuse(cfg, stores, progress: bool) -> tuple[dict, bool]:
    """Train and evaluate ``cfg`` in its run folder, or reuse a finished run (``eval.json``), or
    resume an interrupted one (a checkpoint without ``eval.json``)."""
    from metarobust.experiment import train_and_evaluate

    folder = Path(cfg.out_dir) / cfg.name
    if (folder / "eval.json").is_file():
        return json.loads((folder / "eval.json").read_text()), True
    resume = (folder / "checkpoints" / "last.pt").is_file()
    return train_and_evaluate(cfg, resume=resume, progress=progress, data=stores), False


def cascade(cfg, subset: Path, progress: bool) -> dict | None:
    """AutoAttack's APGD-CE + APGD-T cascade on the episodes of ``subset`` (the first
    ``study.cascade_episodes``), kept in the run's ``eval/apgd_ce_t.json`` and reused from it."""
    from metarobust.experiment import evaluate_checkpoint

    folder = Path(cfg.out_dir) / cfg.name
    path = folder / "eval" / "apgd_ce_t.json"
    if path.is_file():
        return json.loads(path.read_text())
    return evaluate_checkpoint(folder, ["eval.suite=apgd_ce_t", f"eval.manifest={subset}", "eval.checks=false"],
                               name="apgd_ce_t", progress=progress)


def intrinsic_dimension(cfg, stores, manifest_obj) -> dict:
    """``{layer: {"clean"|"adversarial": {estimator: [mean, std]}}}`` of the run's learner, kept in
    the run's ``id.json`` and reused from it, or ``{}`` when ``metarobust.analysis`` is absent."""
    try:
        from metarobust.analysis import fewshot_intrinsic_dimension
    except ImportError:  # the analysis package is optional for the accuracy part of the study
        return {}
    from metarobust.experiment import model_from_checkpoint
    from metarobust.runs import atomic_write_text

    folder = Path(cfg.out_dir) / cfg.name
    cached = folder / "id.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    _, model, _ = model_from_checkpoint(folder)
    estimates = fewshot_intrinsic_dimension(cfg, model, stores.test, manifest_obj)
    out = {layer: {cond: {est: [round(m, 4), round(s, 4)] for est, (m, s) in per.items()}
                   for cond, per in conds.items()} for layer, conds in estimates.items()}
    atomic_write_text(cached, json.dumps(out, indent=1) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# The claims: each a difference between two learners of the same seed with a 95 % interval.


def difference(a: dict, b: dict, value, half) -> tuple[float, float]:
    """``value(a) - value(b)`` and the 95 % half-width of the difference, from the two learners'
    own half-widths added in quadrature: conservative for accuracies (both are scored on the same
    episodes, whose positive correlation would narrow a paired interval)."""
    return value(a) - value(b), math.sqrt(half(a) ** 2 + half(b) ** 2)


def verdict(diffs: list[tuple[float, float]], threshold: float = 0.0) -> str:
    """``yes`` when every seed's interval lies above ``threshold``, ``no`` when every seed's lies
    below it (for a threshold of 0: the opposite effect is significant), else ``not significant``
    (an interval straddles it, or the seeds disagree)."""
    if diffs and all(d - h > threshold for d, h in diffs):
        return "yes"
    if diffs and all(d + h < threshold for d, h in diffs):
        return "no"
    return "not significant"


def id_value(layer: str, estimator: str, cond: str = "clean"):
    return (lambda r: r["id"][layer][cond][estimator][0],
            lambda r: 1.96 * r["id"][layer][cond][estimator][1])  # sub-sample std -> 95 % half-width


def acc_value(kind: str):
    return lambda r: r[f"{kind}_acc"], lambda r: r[f"{kind}_ci95"]


def claims(rows: list[dict], study: Study, layer: str, estimator: str) -> dict:
    """The sanity bar and ITS-MAML's four claims, each answered from every seed that has both ends.

    The robust learner of claims 1, 2 and 4 is ``its_maml`` when the study has it (else the first
    recipe that is not ``maml``); claim 3 compares every robust recipe with ``maml`` at the lowest
    training-shot count. ``K_lo``/``K_hi``: the smallest and largest training-shot counts."""
    index = {(r["recipe"], r["train_shots"], r["inner_steps"], r["seed"]): r for r in rows}
    steps = study.inner_steps[0]
    lo, hi = min(study.train_shots), max(study.train_shots)
    seeds = [study.seed, *study.replicate_seeds]
    robust = [r for r in study.recipes if r != "maml"]
    learner = "its_maml" if "its_maml" in robust else (robust[0] if robust else None)
    has_id = all(layer in r["id"] for r in rows)

    def pairs(a_key, b_key):
        """``(seed, row_a, row_b)`` for every seed that has both learners."""
        for seed in seeds:
            a, b = index.get((*a_key, steps, seed)), index.get((*b_key, steps, seed))
            if a is not None and b is not None:
                yield seed, a, b

    def contrast(question, a_key, b_key, value, half, threshold=0.0, unit=100.0):
        per_seed = [(seed, *difference(a, b, value, half)) for seed, a, b in pairs(a_key, b_key)]
        return {"question": question, "compare": f"{a_key[0]} K={a_key[1]} - {b_key[0]} K={b_key[1]}",
                "threshold": threshold * unit,
                "per_seed": [{"seed": s, "difference": round(unit * d, 3), "ci95": round(unit * h, 3)}
                             for s, d, h in per_seed],
                "verdict": verdict([(d, h) for _, d, h in per_seed], threshold) if per_seed else "not measured"}

    out: dict[str, Any] = {"robust_learner": learner, "K_lo": lo, "K_hi": hi, "seeds": seeds,
                           "units": "accuracy differences in points (%), ID differences in dimensions"}
    sanity = []
    chance = 1.0 / rows[0]["ways"] if rows else 0.0
    for recipe in robust:
        for k in study.train_shots:
            c = contrast(f"{recipe} more robust than maml at K={k} (PGD)", (recipe, k), ("maml", k), *acc_value("robust"))
            sanity.append(c)
    for r in rows:
        if r["clean_acc"] - r["clean_ci95"] <= chance:
            sanity.append({"question": f"{r['name']} better than chance clean", "verdict": "no",
                           "per_seed": [{"seed": r["seed"], "clean": round(100 * r["clean_acc"], 2)}]})
    out["sanity"] = sanity
    out["sanity_holds"] = all(c["verdict"] == "yes" for c in sanity)
    if learner is None:
        return out
    out["claims"] = {
        "more_shots_raise_clean_accuracy": contrast(
            f"training shots {lo} -> {hi} raise {learner}'s clean accuracy", (learner, hi), (learner, lo),
            *acc_value("clean")),
        "more_shots_cost_little_robustness": contrast(
            f"training shots {lo} -> {hi} cost {learner} less than {100 * study.margin:.0f} points of robust "
            f"accuracy (yes: the interval stays above -{100 * study.margin:.0f}; no: it lies below)",
            (learner, hi), (learner, lo), *acc_value("robust"), threshold=-study.margin),
    }
    if has_id:
        out["claims"]["robust_regularisation_lowers_clean_id"] = contrast(
            f"robust regularisation lowers the clean-feature ID ({estimator}, {layer}) at K={lo}",
            ("maml", lo), (learner, lo), *id_value(layer, estimator), unit=1.0)
        out["claims"]["more_shots_raise_clean_id"] = contrast(
            f"training shots {lo} -> {hi} raise {learner}'s clean-feature ID ({estimator}, {layer})",
            (learner, hi), (learner, lo), *id_value(layer, estimator), unit=1.0)
        for recipe in robust:
            if recipe != learner:
                out["claims"][f"{recipe}_lowers_clean_id"] = contrast(
                    f"{recipe}'s robust regularisation lowers the clean-feature ID at K={lo}",
                    ("maml", lo), (recipe, lo), *id_value(layer, estimator), unit=1.0)
    return out


def pct(value: float | None, half: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} ± {100 * half:.2f}"


def markdown_table(rows: list[dict], layer: str, estimator: str) -> str:
    lines = [f"| recipe | train shots | inner steps | seed | clean acc (%) | robust acc, PGD (%) | robust acc, "
             f"APGD-CE+T (%) | ID clean ({estimator}) | ID adv ({estimator}) | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ids = r["id"].get(layer, {})
        cell = {c: (f"{ids[c][estimator][0]:.2f} ± {ids[c][estimator][1]:.2f}" if c in ids else "n/a")
                for c in ("clean", "adversarial")}
        lines.append(f"| {r['recipe']} | {r['train_shots']} | {r['inner_steps']} | {r['seed']} | "
                     f"{pct(r['clean_acc'], r['clean_ci95'])} | {pct(r['robust_acc'], r['robust_ci95'])} | "
                     f"{pct(r.get('cascade_acc'), r.get('cascade_ci95'))} | {cell['clean']} | "
                     f"{cell['adversarial']} | {r['train_seconds']} |")
    return "\n".join(lines)


def claims_markdown(answers: dict) -> str:
    lines = ["| question | per seed: difference ± 95 % | verdict |", "|---|---|---|"]
    for c in [*answers.get("sanity", []), *answers.get("claims", {}).values()]:
        seeds = "; ".join(f"seed {x['seed']}: " + (f"{x['difference']:+.2f} ± {x['ci95']:.2f}" if "difference" in x
                                                   else f"clean {x['clean']:.2f}") for x in c["per_seed"])
        lines.append(f"| {c['question']} | {seeds or 'n/a'} | **{c['verdict']}** |")
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
    parser.add_argument("--cascade-episodes", dest="cascade_episodes", type=int, default=None,
                        help="first N episodes also under APGD-CE + APGD-T (0: none)")
    parser.add_argument("--points", type=int, default=None, help="distinct query images for the ID")
    parser.add_argument("--bootstrap", type=int, default=None, help="ID sub-samples for error bars")
    parser.add_argument("--layers", default=None, help="comma-separated layers for the ID (default penultimate)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--replicate-seeds", dest="replicate_seeds", default=None,
                        help="comma-separated further training seeds (empty string: none)")
    parser.add_argument("--only", default=None, help="comma-separated learner names (e.g. maml_k1_s1): run only "
                        "these now (another process may run the rest in the same --out); tables need all")
    parser.add_argument("--results", default=None, help="also write the study's summary JSON here, e.g. "
                        "docs/results/shots_study_omniglot.json")
    parser.add_argument("--reuse-results", dest="reuse_results", default=None,
                        help="a summary written by --results (same study settings and test episodes): learners "
                        "without a finished run folder take their rows from it instead of being trained")
    parser.add_argument("--resume", action="store_true", help="accepted for symmetry: a study always reuses "
                        "finished learners and resumes an interrupted one in --out")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_intermixed_args(argv)  # key=value arguments may follow the flags

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from metarobust.data.manifest import Manifest, freeze_episodes, load_manifest, save_manifest
    from metarobust.errors import ConfigError, MetarobustError
    from metarobust.training.data import load_training_data, resolve_device
    from metarobust.training.recipes import build_recipe

    start = time.perf_counter()
    try:
        study, base = load_study(Path(args.study), args)
        out = Path(args.out or ROOT / "runs" / study.name)
        out.mkdir(parents=True, exist_ok=True)
        # The shared test episodes: frozen once for the whole study, every learner scored on them.
        manifest_path = out / "episodes.json"
        first = run_config(study, base, study.recipes[0], study.test_shots, study.inner_steps[0], out,
                           manifest_path, args.overrides)
        stores = load_training_data(first, build_recipe(first), resolve_device(first.device))
        check_study(study, first, stores)
        points = grid(study)
        names = {p.name(study) for p in points}
        only = set(parse_list(args.only, str)) if args.only else names
        if not only <= names:
            raise ConfigError(f"--only: {sorted(only - names)} are not learners of this study; its learners: "
                              f"{sorted(names)}")
        m = first.meta
        if not manifest_path.is_file():
            save_manifest(freeze_episodes(stores.test, m.ways, study.test_shots, study.test_queries or m.queries,
                                          study.episodes, seed=study.seed, dataset=first.data.dataset), manifest_path)
        manifest = load_manifest(manifest_path)
        manifest_sha = file_sha256(manifest_path)
        base_summary = {"model": f"{first.model.name}-{first.model.hidden}", "meta": dict(first.meta.__dict__),
                        "attack": dict(first.attack.__dict__),
                        "cascade": "apgd_ce_t" if study.cascade_episodes else None}
        previous = (reusable_rows(Path(args.reuse_results), study, base_summary, manifest_sha)
                    if args.reuse_results else {})
        subset = out / "episodes_cascade.json"
        if study.cascade_episodes and not subset.is_file():
            head = manifest.episodes[:study.cascade_episodes]
            save_manifest(Manifest(manifest.dataset, manifest.split, manifest.ways, manifest.shots,
                                   manifest.queries, manifest.seed, head), subset)
        rows = []
        for i, point in enumerate(points, 1):
            cfg = run_config(study, base, point.recipe, point.shots, point.steps, out, manifest_path,
                             args.overrides, seed=point.seed)
            if cfg.name not in only:
                continue
            if cfg.name in previous and not (Path(cfg.out_dir) / cfg.name / "eval.json").is_file():
                rows.append({**previous[cfg.name], "reused": "results file"})
                print(f"== [{i}/{len(points)}] {cfg.name}: from {args.reuse_results}", flush=True)
                continue
            print(f"== [{i}/{len(points)}] {cfg.name}: {cfg.recipe}, {point.shots} training shots, {point.steps} "
                  f"inner steps, seed {point.seed}, {study.iterations} meta-updates ==", flush=True)
            torch.manual_seed(cfg.seed)
            summary, reused = train_or_reuse(cfg, stores, progress=not args.quiet)
            strong = cascade(cfg, subset, progress=not args.quiet) if study.cascade_episodes else None
            ids = intrinsic_dimension(cfg, stores, manifest)
            row = {"name": cfg.name, "recipe": point.recipe, "run_recipe": cfg.recipe, "train_shots": point.shots,
                   "inner_steps": point.steps, "seed": point.seed, "test_shots": study.test_shots,
                   "ways": manifest.ways, "clean_acc": summary["clean_acc"], "clean_ci95": summary["clean_ci95"],
                   "robust_acc": summary["robust_acc"], "robust_ci95": summary["robust_ci95"],
                   "episodes": summary["episodes"],
                   "checks_failed": summary.get("checks_failed", []),
                   "cascade_acc": strong and strong["robust_acc"], "cascade_ci95": strong and strong["robust_ci95"],
                   "cascade_clean_acc": strong and strong["clean_acc"],
                   "cascade_episodes": strong and strong["episodes"],
                   "train_seconds": summary.get("train_seconds"), "reused": reused, "id": ids,
                   "run": str(Path(cfg.out_dir) / cfg.name)}
            rows.append(row)
            print(f"   clean {100 * row['clean_acc']:.2f} %  robust {100 * row['robust_acc']:.2f} %  "
                  f"cascade {pct(row['cascade_acc'], row['cascade_ci95'])}  ID {json.dumps(ids)}", flush=True)
    except MetarobustError as exc:
        print(f"shots_study: error: {exc}", file=sys.stderr)
        return 2
    if only != names:
        print(f"ran {sorted(only)}; run the study without --only to write the tables and plots", flush=True)
        return 0

    layer, estimator = study.layers[0], "twonn"
    title = (f"{first.data.dataset}, {manifest.ways}-way {study.test_shots}-shot test, "
             f"{study.iterations} meta-updates, {first.attack.name}-{first.attack.steps} eps {first.attack.eps:.4f}")
    answers = claims(rows, study, layer, estimator)
    table, verdicts = markdown_table(rows, layer, estimator), claims_markdown(answers)
    primary = [r for r in rows if r["seed"] == study.seed]
    plots = plot_all(primary, out, title, layer, estimator)
    payload = {"study": study.__dict__, "base": base_summary, "manifest_sha256": manifest_sha,
               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
               "seconds": round(time.perf_counter() - start, 1), "rows": rows, "answers": answers}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(payload, indent=2) + "\n")
    (out / "results.md").write_text(f"# Shots study: {study.name}\n\n{title}\n\n{table}\n\nID: {estimator} on "
                                    f"`{layer}` features of {study.points} distinct query images, mean ± std over "
                                    f"{study.bootstrap} sub-samples.\n\n## The claims\n\n{verdicts}\n")
    print(table)
    print(verdicts)
    print("plots: " + ", ".join(str(p) for p in plots.values()))
    headline = {"study": study.name, "dataset": first.data.dataset, "test_shots": study.test_shots,
                "iterations": study.iterations, "episodes": study.episodes, "points": study.points,
                "seconds": payload["seconds"], "out": str(out), "sanity_holds": answers["sanity_holds"],
                **{f"claim_{k}": c["verdict"] for k, c in answers.get("claims", {}).items()},
                "runs": {r["name"]: {
                    "clean_acc": round(r["clean_acc"], 4), "robust_acc": round(r["robust_acc"], 4),
                    **({"cascade_acc": round(r["cascade_acc"], 4)} if r["cascade_acc"] is not None else {}),
                    **({f"id_clean_{estimator}": r["id"][layer]["clean"][estimator][0],
                        f"id_adv_{estimator}": r["id"][layer]["adversarial"][estimator][0]}
                       if layer in r["id"] else {})} for r in rows}}
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
