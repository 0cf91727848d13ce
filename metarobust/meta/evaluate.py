"""Few-shot evaluation: fine-tune on each frozen episode's support set, then score the query
set clean and under attack; mean and 95% confidence interval over episodes.

The protocol of R-MAML and AQ: ``meta.test_inner_steps`` clean SGD steps on the support set
(first order: no meta-gradient is needed; only the head with ``meta.adapt=head`` / ANIL), then
accuracy on the query set, clean and under the evaluation attack (PGD-10 with random start by
default) run against the adapted weights with the model in eval mode. RFS recipes (``rfs``,
``rfs_adversarial``) fit a logistic regression on the support features instead
(:class:`~metarobust.meta.logistic.LogisticProbe`) and the attack goes through the features and
the fitted head. Episodes come from a manifest, so every method sees the same ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from metarobust.attacks import build_attack
from metarobust.config import ExperimentConfig
from metarobust.data.manifest import Manifest, manifest_batches
from metarobust.data.store import ImageStore
from metarobust.meta.execution import resolve_execution, run_tasks
from metarobust.meta.functional import bind, detached, params_of
from metarobust.training.objectives import accuracy

Z_95 = 1.959964


@dataclass
class FewShotResult:
    """Accuracies in [0, 1]; ``*_ci95`` is the half-width of the 95% interval (1.96 sigma/sqrt(n))."""

    clean_acc: float
    clean_ci95: float
    robust_acc: float
    robust_ci95: float
    episodes: int
    eps: float
    attack: str

    def as_dict(self) -> dict:
        return asdict(self)


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    if values.numel() < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), Z_95 * float(values.std(unbiased=True)) / math.sqrt(values.numel())


def evaluation_learner(cfg: ExperimentConfig, model: nn.Module, ways: int | None = None):
    """The learner that fine-tunes ``model`` on a test episode's support set: a
    :class:`~metarobust.meta.logistic.LogisticProbe` for RFS recipes (``ways`` classes, default
    ``meta.ways``), else MAML/ANIL with ``meta.test_inner_steps`` first-order steps. Both have
    ``adapt(params, support_x, support_y) -> fast`` and ``forward(fast, x) -> logits``."""
    from metarobust.training.recipes import RECIPES

    return RECIPES.get(cfg.recipe, "recipe")(cfg).evaluation_learner(model, cfg.meta.ways if ways is None else ways)


def evaluate_fewshot(model: nn.Module, store: ImageStore, manifest: Manifest, cfg: ExperimentConfig,
                     progress: bool = False) -> tuple[FewShotResult, torch.Tensor]:
    """Clean and robust accuracy of ``model`` on ``manifest``'s episodes drawn from ``store``.

    Returns the summary and the per-episode accuracies ``float [E, 2]`` (clean, robust).
    """
    device = store.device
    was_training = model.training
    model.eval()
    learner = evaluation_learner(cfg, model, manifest.ways)
    forward = learner.forward
    attack = build_attack(cfg.attack)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    execution = resolve_execution(cfg.meta.execution, device)

    def task(params, sx, sy, qx, qy, noise):
        fast = detached(learner.adapt(params, sx, sy))
        x_adv = attack(bind(forward, fast), qx, qy, noise=noise)
        return accuracy(forward(fast, qx), qy), accuracy(forward(fast, x_adv), qy)

    params = detached(params_of(model))
    per_episode = []
    batches = manifest_batches(store, manifest, cfg.eval.batch_size)
    total = math.ceil(len(manifest) / cfg.eval.batch_size)
    with torch.no_grad():  # torch.func.grad still differentiates inside; nothing else records
        for batch in tqdm(batches, total=total, disable=not progress, desc="eval", dynamic_ncols=True):
            noise = attack.init_noise(batch.query_x, generator)
            clean, robust = run_tasks(task, params, batch, noise, execution)
            per_episode.append(torch.stack([clean, robust], dim=1))
    model.train(was_training)
    scores = torch.cat(per_episode).cpu()
    clean_mean, clean_ci = mean_ci95(scores[:, 0])
    robust_mean, robust_ci = mean_ci95(scores[:, 1])
    name = f"{cfg.attack.name}-{cfg.attack.steps}"
    return FewShotResult(clean_mean, clean_ci, robust_mean, robust_ci, len(scores), cfg.attack.eps, name), scores


def adapted_episodes(model: nn.Module, store: ImageStore, manifest: Manifest, cfg: ExperimentConfig):
    """Each frozen episode of ``manifest`` with the model fine-tuned on its support set, lazily.

    Yields ``(forward, episode, query_index)``: ``forward(x) -> logits`` at the weights the
    recipe's evaluation learner (:func:`evaluation_learner`) fitted on the episode's support set,
    the :class:`~metarobust.data.episode.Episode`, and the store indices of its query images.
    The model is put in eval mode. Shared by the robustness harness and the ID analysis, so both
    see exactly what evaluation scores.
    """
    model.eval()
    learner = evaluation_learner(cfg, model, manifest.ways)
    forward = learner.forward
    params = detached(params_of(model))
    for batch in manifest_batches(store, manifest, cfg.eval.batch_size):
        for t in range(batch.num_tasks):
            episode = batch.task(t)
            fast = detached(learner.adapt(params, episode.support_x, episode.support_y))
            yield bind(forward, fast), episode, batch.query_index[t]


def fewshot_units(model: nn.Module, store: ImageStore, manifest: Manifest, cfg: ExperimentConfig):
    """Harness units for a few-shot learner: one per frozen episode, ``forward`` at the weights
    fine-tuned (``meta.test_inner_steps`` clean steps) on that episode's support set, points =
    its query set, classes = the store's class ids (for per-class accuracies)."""
    from metarobust.attacks.harness import Unit
    from metarobust.models.layers import TaskBatchNorm2d

    coupled = any(isinstance(m, TaskBatchNorm2d) for m in model.modules())
    for forward, episode, _ in adapted_episodes(model, store, manifest, cfg):
        yield Unit(forward, episode.query_x, episode.query_y, episode.classes[episode.query_y], coupled)
