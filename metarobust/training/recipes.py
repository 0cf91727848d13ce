"""Recipes: named bundles of learner + objective + attack with the papers' defaults.

A meta recipe builds the *task function* that :mod:`metarobust.meta.execution` runs per task
(in the per-task loop or under ``vmap``): adapt on the support set (MAML/ANIL inner loop, clean
or attacked), then score the query with an objective (:mod:`metarobust.training.objectives`).
``metarobust list recipes`` shows them; ``docs/robust_meta_learning.md`` documents each one.

| recipe | inner loop | meta-objective |
|---|---|---|
| ``maml`` | clean | clean query CE |
| ``anil`` | clean, head only | clean query CE |
| ``adversarial_querying`` | clean | CE of the query attacked through the fast weights |
| ``adml`` | clean and adversarial (two trajectories) | 1/2 [CE(adv-adapted, clean q) + CE(clean-adapted, adv q)] |
| ``r_maml`` | clean (``robust.placement=out``) or CE + R (``in``) | clean CE + weight x R |
| ``trades_maml`` | clean | clean CE + weight x KL over support and query |
| ``its_maml`` | clean, ``train_shots > test_shots`` | as ``r_maml`` |

``rfs`` and ``rfs_adversarial`` (:mod:`metarobust.training.rfs`) are pre-trained by the standard
engine and evaluated with a per-episode logistic regression; standard adversarial-training
recipes (:mod:`metarobust.training.standard`) share this registry.

A recipe declares the random-start noise it needs (:func:`noise_keys`), drawn per meta-batch by
:func:`draw_noise` outside any ``vmap`` from the engine's seeded generator, so both executions
see identical perturbations: ``query`` ``[T, N*Q, ...]``, ``support`` ``[T, N*K, ...]``, and
``support_steps`` ``[T, S, N*K, ...]`` (one random start per inner step, ``S = meta.inner_steps``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from metarobust.config import ExperimentConfig
from metarobust.data.episode import EpisodeBatch
from metarobust.errors import ConfigError
from metarobust.meta.execution import Noise, TaskFn
from metarobust.meta.functional import functional_forward
from metarobust.meta.maml import MAML, adapted_names
from metarobust.registry import Registry
from metarobust.training import objectives

RECIPES = Registry("recipe")
RecipeBuilder = Callable[[ExperimentConfig, MAML, Callable], TaskFn]
NoiseKeys = Callable[[ExperimentConfig], tuple[str, ...]]


def meta_recipe(name: str, description: str, noise: NoiseKeys | tuple[str, ...] = (),
                adapt: str | None = None, check: Callable[[ExperimentConfig], None] | None = None):
    """Register a meta recipe builder ``(cfg, learner, attack) -> task_fn``.

    Args:
        noise: the random-start noise its tasks take (keys above), or ``cfg -> keys``.
        adapt: forces ``meta.adapt`` (``"head"`` for ANIL); ``None``: the config's value.
        check: ``cfg -> None`` raising :class:`ConfigError` on settings the recipe cannot run
            (called by config validation, before any work).

    Example:
        >>> @meta_recipe("my_aq", "AQ variant", noise=("query",))
        ... def my_aq(cfg, maml, attack):
        ...     def task(params, sx, sy, qx, qy, noise):
        ...         fast = maml.adapt(params, sx, sy)
        ...         return objectives.adversarial_ce(maml.forward, fast, qx, qy, attack, noise["query"])
        ...     return task
    """
    def decorator(builder: RecipeBuilder) -> RecipeBuilder:
        builder.kind = "meta"
        builder.meta_noise = noise if callable(noise) else (lambda cfg, keys=tuple(noise): keys)
        builder.meta_adapt = adapt
        builder.config_check = check
        return RECIPES.register(name, description)(builder)

    return decorator


def _noise(noise: Noise, key: str) -> torch.Tensor | None:
    """One kind of noise from a task's noise (a bare tensor is query noise)."""
    if noise is None or isinstance(noise, torch.Tensor):
        return noise if key == "query" else None
    return noise.get(key)


@meta_recipe("maml", "MAML (Finn et al. 2017): clean inner loop, clean query CE; no robustness")
def maml_recipe(cfg: ExperimentConfig, maml: MAML, attack) -> TaskFn:
    def task(params, sx, sy, qx, qy, noise):
        fast = maml.adapt(params, sx, sy)
        return objectives.clean_ce(maml.forward, fast, qx, qy)

    return task


@meta_recipe("anil", "ANIL (Raghu et al. 2020): MAML adapting only the head in the inner loop "
                     "(meta.adapt=head), clean query CE", adapt="head")
def anil_recipe(cfg: ExperimentConfig, maml: MAML, attack) -> TaskFn:
    return maml_recipe(cfg, maml, attack)


@meta_recipe("adversarial_querying",
             "AQ (Goldblum et al. 2020): clean inner loop, CE on the query attacked through the fast weights",
             noise=("query",))
def adversarial_querying_recipe(cfg: ExperimentConfig, maml: MAML, attack) -> TaskFn:
    def task(params, sx, sy, qx, qy, noise):
        fast = maml.adapt(params, sx, sy)
        return objectives.adversarial_ce(maml.forward, fast, qx, qy, attack, _noise(noise, "query"))

    return task


@meta_recipe("adml", "ADML (Yin et al. 2018): adapt on clean and on adversarial support, score each on the "
                     "opposite query (clean-adapted on attacked query, adversarially adapted on clean)",
             noise=("query", "support_steps"))
def adml_recipe(cfg: ExperimentConfig, maml: MAML, attack) -> TaskFn:
    def task(params, sx, sy, qx, qy, noise):
        clean_fast = maml.adapt(params, sx, sy)
        attacked = objectives.adversarial_step_loss(maml.forward, sx, sy, attack, _noise(noise, "support_steps"))
        adv_fast = maml.adapt(params, sx, sy, step_loss=attacked)
        return objectives.adml_cross(maml.forward, clean_fast, adv_fast, qx, qy, attack, _noise(noise, "query"))

    return task


def _robust_noise(cfg: ExperimentConfig) -> tuple[str, ...]:
    return ("query", "support_steps") if cfg.robust.placement == "in" else ("query",)


def _r_maml_task(cfg: ExperimentConfig, maml: MAML, attack) -> TaskFn:
    form, weight, placement = cfg.robust.form, cfg.robust.weight, cfg.robust.placement
    inner_weight = weight if cfg.robust.inner_weight is None else cfg.robust.inner_weight

    def task(params, sx, sy, qx, qy, noise):
        step_loss = None
        if placement == "in":
            step_loss = objectives.robust_step_loss(maml.forward, sx, sy, attack, _noise(noise, "support_steps"),
                                                    form, inner_weight)
        fast = maml.adapt(params, sx, sy, step_loss=step_loss)
        return objectives.robust_regularised(maml.forward, fast, qx, qy, attack, _noise(noise, "query"),
                                             form, weight)

    return task


@meta_recipe("r_maml", "R-MAML (Wang et al. 2021): clean CE + robust.weight x (TRADES-KL or adversarial CE); "
                       "robust.placement=out: meta-update only (R-MAML_out), in: inner loop too (R-MAML_both)",
             noise=_robust_noise)
def r_maml_recipe(cfg: ExperimentConfig, maml: MAML, attack) -> TaskFn:
    return _r_maml_task(cfg, maml, attack)


@meta_recipe("trades_maml", "TRADES-MAML (R-MAML's TRADES baseline): clean query CE + robust.weight x "
                            "KL(p_clean || p_adv) over support and query at the adapted weights",
             noise=("query", "support"))
def trades_maml_recipe(cfg: ExperimentConfig, maml: MAML, attack) -> TaskFn:
    weight = cfg.robust.weight

    def task(params, sx, sy, qx, qy, noise):
        fast = maml.adapt(params, sx, sy)
        both = _noise(noise, "support"), _noise(noise, "query")
        both_noise = None if both[1] is None else torch.cat(both)
        return objectives.trades_support_query(maml.forward, fast, sx, sy, qx, qy, attack, both_noise, weight)

    return task


def _check_its(cfg: ExperimentConfig) -> None:
    m = cfg.meta
    if m.train_shots <= m.test_shots:
        raise ConfigError(
            f"recipe=its_maml trains with more shots than it tests, but meta.train_shots={m.train_shots} "
            f"<= meta.test_shots={m.test_shots}; raise meta.train_shots (e.g. {m.test_shots + 4}) "
            f"or use recipe=r_maml for equal shots")


@meta_recipe("its_maml", "ITS-MAML (Duan et al. 2022, reconstructed): R-MAML_out meta-trained with more shots "
                         "than tested (meta.train_shots > meta.test_shots) and fewer inner steps",
             noise=_robust_noise, check=_check_its)
def its_maml_recipe(cfg: ExperimentConfig, maml: MAML, attack) -> TaskFn:
    _check_its(cfg)
    return _r_maml_task(cfg, maml, attack)


def build_task_fn(cfg: ExperimentConfig, maml: MAML, attack) -> TaskFn:
    return RECIPES.get(cfg.recipe, "recipe")(cfg, maml, attack)


def noise_keys(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The kinds of random-start noise ``cfg.recipe``'s tasks take (empty: no attack)."""
    noise = getattr(RECIPES.get(cfg.recipe, "recipe"), "meta_noise", None)
    return tuple(noise(cfg)) if noise is not None else ()


def draw_noise(cfg: ExperimentConfig, batch: EpisodeBatch, attack, generator: torch.Generator) -> Noise:
    """The meta-batch's random-start noise for ``cfg.recipe`` (``None`` if it needs none), drawn
    from ``generator`` in a fixed order (query first) with the task dimension first."""
    keys = noise_keys(cfg)
    if not keys:
        return None
    drawn = {}
    for key in keys:
        if key == "query":
            x = batch.query_x
        elif key == "support":
            x = batch.support_x
        else:  # support_steps: one random start per inner step
            sx = batch.support_x
            x = sx.unsqueeze(1).expand(sx.shape[0], cfg.meta.inner_steps, *sx.shape[1:])
        noise = attack.init_noise(x, generator)
        if noise is not None:
            drawn[key] = noise
    return drawn or None


def build_learner(cfg: ExperimentConfig, model: nn.Module, steps: int | None = None,
                  first_order: bool | None = None) -> MAML:
    """The learner ``cfg`` trains (or, with ``steps=meta.test_inner_steps``, evaluates) with:
    MAML over ``model``'s parameters, adapting all of them or only the head (``meta.adapt``;
    forced to ``head`` by ``anil``)."""
    m = cfg.meta
    adapt = getattr(RECIPES.get(cfg.recipe, "recipe"), "meta_adapt", None) or m.adapt
    return MAML(functional_forward(model), m.inner_lr, m.inner_steps if steps is None else steps,
                m.first_order if first_order is None else first_order, adapted_names(model, adapt))


def recipe_kind(recipe: str) -> str:
    """``"meta"`` (episodic meta-learning, :class:`~metarobust.training.engine.Trainer`),
    ``"standard"`` (plain mini-batches, :mod:`metarobust.training.standard`) or ``"rfs"``
    (standard pre-training, few-shot evaluation: :mod:`metarobust.training.rfs`)."""
    return getattr(RECIPES.get(recipe, "recipe"), "kind", "meta")


__all__ = ["RECIPES", "build_learner", "build_task_fn", "draw_noise", "meta_recipe", "noise_keys", "recipe_kind"]

# Standard-AT recipes register themselves into RECIPES (imported last: they import RECIPES).
import metarobust.training.standard  # noqa: E402,F401
import metarobust.training.rfs  # noqa: E402,F401  (rfs, rfs_adversarial: standard pre-training, few-shot eval)

