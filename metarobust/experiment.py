"""Train-then-evaluate, as ``metarobust train`` / ``eval`` / ``quickstart`` run it."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from metarobust import distributed
from metarobust.analysis.estimators import ESTIMATORS
from metarobust.attacks import ATTACKS
from metarobust.config import ExperimentConfig, check_output_path, check_value, parse_config, select_metric
from metarobust.config import config_from_dict as parse_dict
from metarobust.data.augment import AUGMENTATIONS
from metarobust.data.datasets import DATASETS, image_size_of
from metarobust.data.manifest import (
    Manifest,
    check_head,
    default_manifest_path,
    freeze_episodes,
    load_manifest,
    save_manifest,
)
from metarobust.data.store import ImageStore
from metarobust.errors import ConfigError, MetarobustError
from metarobust.evaluation import EvalResult, evaluate_run
from metarobust.evaluation import render_report as render_evaluation
from metarobust.evaluation.report import render_later_evaluations
from metarobust.meta.maml import MAML
from metarobust.models import MIN_IMAGE_SIZES, MODELS, build_model
from metarobust.models.options import NORMALIZE_CHOICES
from metarobust.runs import EVAL_DIR, RunDir, RunFolder, load_checkpoint, model_checkpoint, provenance
from metarobust.training.data import TrainingData, load_training_data, resolve_device
from metarobust.training.engine import Trainer
from metarobust.training.optim import describe as describe_optim
from metarobust.training.optim import resolve_optim
from metarobust.training.recipes import RECIPES, Recipe, build_recipe, check_recipe


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides (e.g.
    ``meta.train_shots=5``), composed from every section (:mod:`metarobust.config` and the recipes'
    own) and validated against every registry: the config a command runs, checked before any work.

    Example:
        >>> cfg = load_config("configs/meta/omniglot_rmaml.yaml", ["meta.train_shots=5"])
    """
    cfg = parse_config(path, overrides)
    validate(cfg)
    check_device(cfg.device)  # the machine's checks: what this command will run on and write to
    check_output_path("out_dir", cfg.out_dir, "folder")
    return cfg


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    """A validated :class:`ExperimentConfig` from a nested dict (e.g. one saved in a checkpoint),
    then ``key=value`` overrides, checked as :func:`load_config` checks a file's."""
    cfg = parse_dict(values, overrides)
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    """The checks that need a registry: the names of the recipe, model, dataset, attacks,
    augmentation, input normalisation and estimators, the model's minimum image size, and the
    recipe's checks (:func:`~metarobust.training.recipes.check_recipe`: the engine options it must
    support, then its own :meth:`~metarobust.training.recipes.Recipe.config_check`); every
    section's field checks ran when the config was parsed."""
    recipe = RECIPES.get(cfg.recipe, "recipe")
    MODELS.get(cfg.model.name, "model.name")
    DATASETS.get(cfg.data.dataset, "data.dataset")
    for section in ("train_attack", "attack"):
        ATTACKS.get(getattr(cfg, section).name, f"{section}.name")
    check_value(cfg.model.normalize in NORMALIZE_CHOICES, "model.normalize", cfg.model.normalize,
                f"one of {list(NORMALIZE_CHOICES)}")
    minimum = MIN_IMAGE_SIZES.get(cfg.model.name, 1)
    size = image_size_of(cfg.data)  # null: the dataset's standard size (28, 32, 84...)
    check_value(size >= minimum, "data.image_size", size, f"at least {minimum} for model {cfg.model.name!r}")
    check_value(cfg.at.augment in ("auto", "none", *AUGMENTATIONS.names()), "at.augment", cfg.at.augment,
                f"auto, none or one of {AUGMENTATIONS.names()}")
    for name in cfg.analysis.estimators:
        ESTIMATORS.get(name, "analysis.estimators")
    resolve_optim(cfg.optim, recipe.default_optim(cfg), recipe.epochs(cfg))
    check_recipe(recipe, cfg)


def check_device(device: str) -> None:
    """Refuse a device this machine does not have (``cuda`` without a visible GPU, ``cuda:3`` with
    two, ``mps`` off Apple silicon) before any work, naming the fix."""
    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        check_value(count > 0, "device", device, "cpu or auto: torch sees no CUDA GPU on this machine "
                    "(torch.cuda.is_available() is False); pass device=cpu, or device=auto to use a GPU when "
                    "there is one")
        check_value(not index or int(index) < count, "device", device,
                    f"cuda:0 .. cuda:{count - 1} (this machine has {count} GPU{'s' if count > 1 else ''}), "
                    f"cuda, or auto")
    elif kind == "mps":
        check_value(torch.backends.mps.is_available(), "device", device,
                    "cpu or auto: torch sees no Apple MPS device on this machine; pass device=cpu")


def resolve_manifest(cfg: ExperimentConfig, store: ImageStore, run: RunDir | None = None,
                     model: torch.nn.Module | None = None, recipe: Recipe | None = None) -> Manifest:
    """The frozen test episodes for ``cfg``: ``eval.manifest`` if given, else the default file
    under ``episodes/``; if that is absent, freeze them (seed 0) into the run folder, with a
    warning, so the numbers can still be reproduced. Given the ``model`` and ``recipe`` that will
    score them, episodes with more ways than the model's head scores (a MAML learner's classifier)
    are refused before any work."""
    m = cfg.meta
    if cfg.eval.manifest:
        manifest = load_manifest(cfg.eval.manifest)
    else:
        path = default_manifest_path(cfg.data.dataset, m.ways, m.test_shots, m.queries,
                                     cfg.eval.episodes, cfg.data.rotations)
        if path.is_file():
            manifest = load_manifest(path)
        else:
            manifest = freeze_episodes(store, m.ways, m.test_shots, m.queries, cfg.eval.episodes,
                                       seed=0, dataset=cfg.data.dataset)
            where = "in memory"
            if run is not None:
                where = str(save_manifest(manifest, run.path / "episodes.json"))
            warnings.warn(f"no frozen episodes at {path}; froze {len(manifest)} with seed 0 ({where}). "
                          f"To compare runs on the same episodes, freeze them once with `metarobust episodes freeze "
                          f"{cfg.data.dataset}` (or pass eval.manifest=PATH)", stacklevel=2)
    if (manifest.ways, manifest.shots, manifest.queries) != (m.ways, m.test_shots, m.queries):
        warnings.warn(f"manifest episodes are {manifest.ways}-way {manifest.shots}-shot "
                      f"{manifest.queries}-query; the config's meta.* episode shape is ignored", stacklevel=2)
    if model is not None and recipe is not None:
        head = getattr(model, "head", None)
        if isinstance(recipe.evaluation_learner(model, manifest.ways), MAML) and isinstance(head, torch.nn.Linear):
            check_head(manifest, head.out_features, "the model's head (model.head)")
    return manifest


def describe_manifest(cfg: ExperimentConfig, manifest: Manifest) -> dict[str, Any]:
    """What identifies the frozen episodes an evaluation used (recorded in its JSON): where they
    came from, their shape, seed and a digest of the episodes themselves."""
    m = cfg.meta
    path = cfg.eval.manifest or default_manifest_path(cfg.data.dataset, m.ways, m.test_shots, m.queries,
                                                      cfg.eval.episodes, cfg.data.rotations)
    digest = hashlib.sha256(json.dumps(manifest.episodes, sort_keys=True).encode()).hexdigest()[:16]
    return {"path": str(path) if Path(path).is_file() else None, "dataset": manifest.dataset,
            "split": manifest.split, "ways": manifest.ways, "shots": manifest.shots, "queries": manifest.queries,
            "seed": manifest.seed, "episodes": len(manifest), "sha256": digest}


def evaluate(cfg: ExperimentConfig, model: torch.nn.Module, recipe: Recipe, test: ImageStore,
             run: RunFolder | None = None, progress: bool = True, step: int | None = None,
             extra: dict[str, Any] | None = None, output: str = "eval.json") -> EvalResult:
    """Score ``model`` with :func:`~metarobust.evaluation.evaluate_run`, the one evaluation that
    the end of training and ``metarobust eval`` share: on the frozen test episodes
    (:func:`resolve_manifest`) adapted by the recipe's evaluation learner for a few-shot recipe, on
    the test images for a plain classifier. Writes ``output`` (``eval.json``) into ``run``, with
    the episodes it used (:func:`describe_manifest`)."""
    if recipe.evaluation == "classifier":
        return evaluate_run(cfg, model, test, run=run, step=step, progress=progress, extra=extra, output=output)
    manifest = resolve_manifest(cfg, test, run, model=model, recipe=recipe)
    learner = recipe.evaluation_learner(model, manifest.ways)
    extra = {"manifest": describe_manifest(cfg, manifest), **(extra or {})}
    if recipe.episodic:  # R-MAML's and AQ's reference codes are first order in effect: say which was trained
        extra = {"meta_order": "first" if cfg.meta.first_order else "second", **(extra or {})}
    return evaluate_run(cfg, model, test, manifest=manifest, learner=learner, run=run, step=step, progress=progress,
                        extra=extra, output=output)


def eval_name(overrides: list[str] | None = None, name: str | None = None) -> str:
    """The name of a later evaluation's ``eval/<name>.json``: ``name`` if given, else its overrides
    (sorted, joined by commas; ``default`` for none), as a file name."""
    if name is not None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=,+-]{0,119}", name):
            raise ConfigError(f"--name {name!r} is invalid; expected a file name of letters, digits and ._=,+- "
                              f"(at most 120 characters), e.g. --name pgd20")
        return name
    if not overrides:
        return "default"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(sorted(overrides)))[:120]


def run_folder_of(path: str | Path) -> RunFolder | None:
    """The run folder of a run path or of its ``checkpoints/last.pt`` or ``best.pt`` (``None`` for
    a loose ``.pt``)."""
    path = Path(path)
    if path.is_dir():
        return RunFolder(path)
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return RunFolder(path.parent.parent)
    return None


def evaluate_checkpoint(path: str | Path, overrides: list[str] | None = None, name: str | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """``metarobust eval``: score a trained run (or checkpoint) with its config plus ``overrides``.
    A run folder is scored at its model's checkpoint: ``best.pt`` when it selected its best epoch
    (``at.select=best``), else ``last.pt``; give ``RUN/checkpoints/last.pt`` to score the last.
    In a run folder, writes ``eval/<name>.json`` (:func:`eval_name`; with the overrides, the
    attack and eval settings, the episodes and provenance) beside the training's ``eval.json`` and
    rewrites ``report.md`` to show them all; the run's ``config.yaml``, checkpoint and lock are
    never touched. The checkpoint's config is data (:func:`checkpoint_config`): nothing is
    downloaded unless ``overrides`` say ``data.download=true``.

    Example:
        >>> summary = evaluate_checkpoint("runs/omniglot_rmaml", ["attack.steps=20"])  # eval/attack.steps=20.json
    """
    overrides = list(overrides or [])
    output = f"{EVAL_DIR}/{eval_name(overrides, name)}.json"  # a bad --name fails before any work
    cfg, model, state = model_from_checkpoint(path, overrides)
    folder = run_folder_of(path)
    if folder is not None:  # what the evaluation writes, checked before it runs
        target = folder.path / output
        for written in (target, target.parent / f"{target.stem}_robustness_vs_eps.png", folder.path / "report.md"):
            check_output_path("RUN", written)
    recipe = build_recipe(cfg)
    data = load_training_data(cfg, recipe, resolve_device(cfg.device))
    extra = {"overrides": overrides, "attack": asdict(cfg.attack), "eval": asdict(cfg.eval), "provenance": provenance()}
    try:
        result = evaluate(cfg, model, recipe, data.test, folder, progress=progress, step=int(state["step"]),
                          extra=extra, output=output)
    finally:  # eval.strict=true raises after writing the result: the report shows it too
        if folder is not None and (folder.path / output).is_file():
            trained = config_from_dict(checkpoint_config(state))
            write_run_report(folder, trained, RECIPES.get(trained.recipe, "recipe"))
    result.run = str(path)
    return result.as_dict()


def write_run_report(folder: RunFolder, cfg: ExperimentConfig, recipe: Recipe | type[Recipe]) -> None:
    """``report.md`` from the run's files: the evaluation at the end of training (``eval.json``,
    rendered with how ``cfg`` trained) and every later ``eval/<name>.json``."""
    path = folder.path / "eval.json"
    metrics = folder.metrics()
    last = metrics[-1] if metrics else {}
    if path.is_file():
        summary = json.loads(path.read_text())
        text = render_evaluation(cfg, summary, training_lines(cfg, recipe, summary), last)
    else:
        text = (f"# {cfg.name}: {cfg.recipe} on {cfg.data.dataset}\n\nNo evaluation at the end of training yet "
                f"(training has not finished; last metrics {last}).\n")
    folder.write_report(text + render_later_evaluations(folder.evaluations()))


def train_and_evaluate(cfg: ExperimentConfig, resume: bool = False, progress: bool = True,
                       data: TrainingData | None = None) -> dict[str, Any] | None:
    """Train ``cfg`` in its run folder (one process or a ``torchrun`` group), evaluate the deployed
    model, write ``eval.json`` and ``report.md``; returns the summary.

    Every recipe takes this one path. Few-shot recipes (meta-learning, RFS) are scored on the
    frozen test episodes, plain classifiers on the test split through the robustness harness.
    Under ``torchrun`` every rank trains; rank 0 alone writes files, evaluates and returns the
    summary (other ranks return ``None``). ``data``: pre-loaded images (else from ``cfg.data``).

    Example:
        >>> summary = train_and_evaluate(load_config("configs/quickstart.yaml"))
        >>> summary["clean_acc"], summary["robust_acc"]
    """
    info = distributed.init_from_env(cfg.device)
    run = None
    try:
        start = time.perf_counter()
        recipe = build_recipe(cfg)  # the recipe's own checks (a teacher, a starting checkpoint) first
        if recipe.evaluation not in ("classifier", "fewshot"):
            command = {"generator": "metarobust blackbox-train", "segmentation": "metarobust seg train"}
            raise ConfigError(f"recipe {cfg.recipe!r} is not a classifier; train it with "
                              f"{command.get(recipe.evaluation, 'its own command')} CONFIG")
        data = data or load_training_data(cfg, recipe, info.device)  # every data check before any work
        run = _open_run(cfg, resume, info)
        trainer = Trainer(cfg, run, resume=resume, data=data, progress=progress and info.is_main, dist=info,
                          recipe=recipe)
        trainer.fit()
        model = trainer.selected_model().eval()  # at.select=best: the best epoch on the held-out images
        if not info.is_main:
            return None
        extra = {"train_seconds": round(time.perf_counter() - start, 1), "optimizer": describe_optim(trainer.optim),
                 "stopped": trainer.stopped, **selection_summary(cfg, trainer.best)}
        if recipe.evaluation == "fewshot" and not recipe.episodic:
            extra["pretrain_classes"] = data.train.num_classes
        result = evaluate(cfg, model, recipe, data.test, run, progress=progress, step=trainer.selected_step,
                          extra=extra)
        result.run = str(run.path)
        write_run_report(run, cfg, recipe)
        return result.as_dict()
    finally:
        if run is not None:
            run.close()
        distributed.cleanup(info)


def selection_summary(cfg: ExperimentConfig, best: dict[str, float] | None) -> dict[str, Any]:
    """What ``eval.json`` records of the deployed epoch: ``select`` (``at.select``) and, with
    ``best``, ``best_epoch`` (from 1), ``select_on`` (``robust``: PGD-10, or ``clean``),
    ``best_holdout_acc`` (that accuracy on the held-out images) and ``holdout`` (their number)."""
    if RECIPES.get(cfg.recipe, "recipe").episodic:
        return {}
    if cfg.at.select != "best" or best is None:
        return {"select": cfg.at.select}
    return {"select": "best", "best_epoch": int(best["epoch"]), "select_on": select_metric(cfg.recipe, cfg.at.select_on),
            "best_holdout_acc": best["holdout_acc"], "holdout": cfg.at.holdout}


def _open_run(cfg: ExperimentConfig, resume: bool, info: distributed.DistInfo) -> RunDir | None:
    """Rank 0's :class:`RunDir` (the only rank that owns the folder); under ``torchrun`` every rank
    learns whether it could be opened, so a refusal (locked, changed config) stops them all
    instead of leaving the others waiting in the first collective."""
    run, error = None, None
    if info.is_main:
        try:
            run = RunDir(cfg, resume=resume, device=info.device)
        except MetarobustError as exc:
            error = exc
    failed = distributed.all_sum(torch.tensor(float(error is not None), device=info.device), info)
    if error is not None:
        raise error
    if bool(failed > 0):
        raise ConfigError(f"rank 0 could not open the run folder {Path(cfg.out_dir) / cfg.name} (its message says why)")
    return run


def model_from_checkpoint(path: str | Path, overrides: list[str] | None = None,
                          device: str | None = None) -> tuple[ExperimentConfig, torch.nn.Module, dict]:
    """Rebuild the config (with ``overrides`` applied, checked as ``metarobust train`` checks its
    own) and the trained (deployed) model of a run, on ``cfg.device`` in eval mode, whatever the
    model. A file that is not a checkpoint of ``metarobust train`` (a bare ``state_dict``, a
    tensor, another pickle, a truncated file) is a :class:`ConfigError` saying what is expected.

    Example:
        >>> cfg, model, state = model_from_checkpoint("runs/quickstart/r_maml", ["attack.steps=20"])
    """
    state = read_run_checkpoint(path)
    cfg = config_from_dict(checkpoint_config(state), [*(overrides or []), *([f"device={device}"] if device else [])])
    check_device(cfg.device)  # a run trained on a GPU, scored here: device=cpu names the fix
    try:
        model = model_from_state(cfg, state)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg, model, state


CHECKPOINT_ENTRIES = ("config", "model", "step")
"""What a checkpoint of ``metarobust train`` holds at least (``Trainer.state_dict``)."""


def read_run_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint of the run at ``path`` (a run folder: its model's checkpoint,
    :func:`~metarobust.runs.model_checkpoint`; or a ``.pt`` file), refused with a
    :class:`ConfigError` unless it is one ``metarobust train`` wrote."""
    given = Path(path)
    file = model_checkpoint(given) if given.is_dir() else given
    expected = ("expected a run folder (runs/<name>) or its checkpoints/last.pt, as `metarobust train` writes "
                f"them: a dict with {list(CHECKPOINT_ENTRIES)} entries (model: the weights, config: the run's "
                f"resolved config)")
    if not file.is_file():
        return load_checkpoint(path)  # its message: no checkpoint there
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            state = load_checkpoint(file)
    except ConfigError as exc:
        unpickling = "UnpicklingError" in str(exc)
        why = ("it holds Python objects other than tensors and plain containers, which are not loaded "
               "(unpickling them could run arbitrary code)" if unpickling else
               f"it cannot be read: truncated, or not a torch file ({_first_sentence(str(exc).split('(', 1)[-1])})")
        raise ConfigError(f"{file} is not a metarobust checkpoint: {why}; {expected}") from None
    if not isinstance(state, dict):
        what = (f"a tensor of shape {list(state.shape)}" if isinstance(state, torch.Tensor)
                else f"a {type(state).__name__}")
        raise ConfigError(f"{file} is not a metarobust checkpoint: it holds {what}; {expected}")
    missing = [key for key in CHECKPOINT_ENTRIES if key not in state]
    if missing:
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            what = f"a bare state_dict ({len(state)} tensor{'s' * (len(state) > 1)}, e.g. {next(iter(state))!r})"
        else:
            what = f"a dict with the entries {sorted(map(str, state))[:8]}, without {missing}"
        raise ConfigError(f"{file} is not a metarobust checkpoint: it holds {what}; {expected}. To score "
                          f"weights trained elsewhere, load them into `build_model(...)` yourself")
    weights = state["model"]
    if not isinstance(state["config"], dict) or not isinstance(weights, dict) or not all(
            isinstance(v, torch.Tensor) for v in weights.values()):
        raise ConfigError(f"{file} is not a metarobust checkpoint: its 'config' must be a dict and its 'model' "
                          f"a dict of tensors; {expected}")
    return state


def _first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(")")[:160]


def checkpoint_config(state: dict[str, Any]) -> dict[str, Any]:
    """The config saved in a checkpoint, as data rather than instructions: ``data.download`` off
    and ``at.init`` (a path on the machine that trained it, read only when training starts) dropped.
    A command line override (``data.download=true``) turns download back on; the checkpoint's
    ``out_dir`` and ``name`` are never used to create folders (``metarobust eval``/``id`` write
    beside the checkpoint)."""
    values = copy.deepcopy(state["config"])
    values.setdefault("data", {})["download"] = False
    values.setdefault("at", {})["init"] = None
    return values


def model_from_state(cfg: ExperimentConfig, state: dict[str, Any]) -> torch.nn.Module:
    """The deployed model of a checkpoint's ``state``, on ``cfg.device``, in eval mode."""
    try:
        shape = state.get("data") or _shape_from_weights(cfg, state["model"])
    except (StopIteration, KeyError):
        raise ConfigError("the checkpoint records no model shape ('data') and its weights have no conv layer "
                          "and 'head.weight' to read it from; it was not written by `metarobust train`") from None
    model = build_model(cfg.model, shape["in_channels"], shape["num_classes"], shape["image_size"], cfg.data.dataset)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # another architecture: a model.* override, or an edited checkpoint
        detail = " ".join(str(exc).split())[:300]
        m = cfg.model
        raise ConfigError(f"the checkpoint's weights do not fit the model its config builds (model.name={m.name}, "
                          f"model.hidden={m.hidden}, model.batch_norm={m.batch_norm}); drop the model.* "
                          f"overrides that change the architecture ({detail})") from None
    return model.to(resolve_device(cfg.device)).eval()


def _shape_from_weights(cfg: ExperimentConfig, weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """The model shape of a checkpoint written before 0.2 (meta runs stored no ``data`` entry)."""
    first = next(v for k, v in weights.items() if k.endswith("weight") and v.dim() == 4)
    return {"in_channels": first.shape[1], "num_classes": weights["head.weight"].shape[0],
            "image_size": image_size_of(cfg.data)}


def training_lines(cfg: ExperimentConfig, recipe: Recipe, summary: dict[str, Any]) -> list[str]:
    """How the run was trained, as the Markdown list items that head its ``report.md``."""
    m, ta, at = cfg.meta, cfg.train_attack, cfg.at
    attack = f"- training attack: {ta.name}-{ta.steps} {ta.norm} eps {ta.eps:.4f} step {ta.step_size:.4f}"
    if recipe.episodic:
        return [f"- episodes: {m.ways}-way, {m.train_shots} shots at training, {m.test_shots} at test, "
                f"{m.queries} queries per class",
                f"- MAML: inner lr {m.inner_lr}, {m.inner_steps} inner steps (test {m.test_inner_steps}), "
                f"{'first' if m.first_order else 'second'} order, meta-batch {m.meta_batch_size}, "
                f"{summary['optimizer']}, {cfg.train.iterations} iterations", attack]
    lines = [f"- model: {cfg.model.name}; {at.epochs} epochs, batch {at.batch_size}, {summary['optimizer']}, "
             f"amp {at.amp}", attack]
    awp = getattr(cfg, "awp", None)
    if awp is not None and awp.gamma > 0:
        lines.append(f"- AWP (Wu et al. 2020): gamma {awp.gamma:g}, from epoch {awp.warmup + 1}")
    if summary.get("best_epoch") is not None:
        lines.append(f"- deployed epoch: {summary['best_epoch']} of {at.epochs}, the best "
                     f"{'PGD-10 robust' if summary.get('select_on', 'robust') == 'robust' else 'clean'} accuracy on "
                     f"{summary['holdout']} held-out training images ({100 * summary['best_holdout_acc']:.2f} %; "
                     f"at.select=best)")
    if recipe.evaluation == "fewshot":  # RFS: plain pre-training, then the probe per episode
        lines.append(f"- few-shot evaluation: {summary.get('pretrain_classes')}-way pre-training, then "
                     f"{m.ways}-way {m.test_shots}-shot episodes, logistic regression (C = 1) on L2-normalised "
                     f"features, attacked through features and head")
    return lines
