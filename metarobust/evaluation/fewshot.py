"""Few-shot units: fine-tune on each frozen episode's support set, score its query set.

The protocol of R-MAML and AQ: ``meta.test_inner_steps`` clean SGD steps on the support set
(first order: no meta-gradient is needed; only the head with ``meta.adapt=head`` / ANIL), then
accuracy on the query set, clean and under the evaluation attacks, run against the adapted
weights with the model in eval mode. RFS recipes fit a logistic regression on the support
features instead (:class:`~metarobust.meta.logistic.LogisticProbe`) and the attacks go through
the features and the fitted head. Episodes come from a manifest, so every method sees the same
ones; ``eval.batch_size`` of them are adapted together (per-task loop or ``vmap``,
``meta.execution``) and scored as one harness unit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import nn

from metarobust.config import ExperimentConfig
from metarobust.data.episode import Episode, EpisodeBatch
from metarobust.data.manifest import Manifest, manifest_batches
from metarobust.data.store import ImageStore
from metarobust.evaluation.harness import Unit, batch_coupled
from metarobust.meta.execution import resolve_execution, run_tasks
from metarobust.meta.functional import Params, bind, detached, params_of


class Learner(Protocol):
    """What fits a test episode: ``adapt(params, support_x, support_y) -> fast`` and
    ``forward(fast, x) -> logits`` (:class:`~metarobust.meta.maml.MAML`, a logistic probe...)."""

    def adapt(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> Params: ...

    def forward(self, fast: Params, x: torch.Tensor) -> torch.Tensor: ...


def adapted_batches(model: nn.Module, store: ImageStore, manifest: Manifest, cfg: ExperimentConfig,
                    learner: Learner) -> Iterator[tuple[EpisodeBatch, Params, Params]]:
    """The episodes of ``manifest`` in batches of ``eval.batch_size``, each fine-tuned, lazily.

    Yields ``(batch, shared, fast)``: the :class:`~metarobust.data.episode.EpisodeBatch`
    (``T`` episodes), the parameters adaptation left as they were, and the ones it fitted,
    stacked over the episodes (``[T, ...]``; ANIL: the head only, the probe: its head). Task
    ``t``'s model is ``learner.forward({**shared, **fast[t]}, x)``. The model is put in eval mode.
    """
    model.eval()
    params = detached(params_of(model))
    execution = resolve_execution(cfg.meta.execution, store.device)

    def fit(params, support_x, support_y, query_x, query_y, noise):
        fast = learner.adapt(params, support_x, support_y)
        return ({k: v.detach() for k, v in fast.items() if v is not params.get(k)},)

    for batch in manifest_batches(store, manifest, cfg.eval.batch_size):
        with torch.no_grad():  # torch.func.grad still differentiates inside; not around the yield
            (fast,) = run_tasks(fit, params, batch, None, execution)
        yield batch, {k: v for k, v in params.items() if k not in fast}, fast


def adapted_episodes(model: nn.Module, store: ImageStore, manifest: Manifest, cfg: ExperimentConfig,
                     learner: Learner) -> Iterator[tuple[Callable[[torch.Tensor], torch.Tensor], Episode, torch.Tensor]]:
    """Each frozen episode of ``manifest`` with the model fine-tuned on its support set, lazily
    (a batch of ``eval.batch_size`` episodes at a time).

    Yields ``(forward, episode, query_index)``: ``forward(x) -> logits`` at the weights
    ``learner`` (the recipe's :meth:`~metarobust.training.recipes.Recipe.evaluation_learner`)
    fitted on the episode's support set, the
    :class:`~metarobust.data.episode.Episode`, and the store indices of its query images.
    The model is put in eval mode. Shared by the harness's units (:func:`fewshot_units`) and the
    ID analysis, so both see exactly what evaluation scores.
    """
    for batch, shared, fast in adapted_batches(model, store, manifest, cfg, learner):
        for t in range(batch.num_tasks):
            weights = {**shared, **{k: v[t] for k, v in fast.items()}}
            yield bind(learner.forward, weights), batch.task(t), batch.query_index[t]


def fewshot_units(model: nn.Module, store: ImageStore, manifest: Manifest, cfg: ExperimentConfig,
                  learner: Learner) -> Iterator[Unit]:
    """Harness units for a few-shot learner: one per batch of ``eval.batch_size`` frozen
    episodes; group ``t`` is episode ``t``'s query set ``[N*Q, C, H, W]`` at the weights
    ``learner`` (the recipe's evaluation learner) fitted on its support set; classes = the
    store's class ids (for per-class accuracies). Coupled when the model normalises by batch
    statistics (:class:`~metarobust.models.layers.TaskBatchNorm2d`); groups run as
    ``meta.execution`` says.

    Example:
        >>> units = fewshot_units(model, stores.test, manifest, cfg, recipe.evaluation_learner(model, manifest.ways))
        >>> result = evaluate_units(units, cfg, manifest.ways, stores.test.class_names, interval="episodes")
    """
    model.eval()
    coupled = batch_coupled(model)
    execution = resolve_execution(cfg.meta.execution, store.device)
    for batch, shared, fast in adapted_batches(model, store, manifest, cfg, learner):
        classes = torch.gather(batch.classes, 1, batch.query_y)
        yield Unit(learner.forward, batch.query_x, batch.query_y, classes, fast, shared, coupled, execution)
