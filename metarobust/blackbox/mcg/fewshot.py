"""MCG's surrogates for few-shot targets: our own meta-learner runs, adapted per episode [ours].

A few-shot target is a meta-learner fine-tuned on an episode's support set, scoring that
episode's ``N`` labels; a plain classifier scoring global classes cannot stand in for it. The
threat model (docs/blackbox.md, "MCG on few-shot targets"): the attacker knows the episode's
support set (the target was fine-tuned on it) and holds surrogate *meta-learner* runs of the
same dataset and ``ways`` (another seed or width of a recipe, ``metarobust train``). Per
episode, each surrogate learner is fine-tuned on that support set with its own evaluation
learner (:meth:`~metarobust.training.recipes.Recipe.evaluation_learner`, as evaluation does),
and the adapted surrogate scores the episode's labels: a white-box stand-in for the target on
that episode's query set. META.md section 3 does not cover few-shot targets.

    >>> runs = surrogate_learners(["runs/maml_seed1"], device="cpu", where="blackbox.mcg.surrogates")
    >>> check_fewshot_surrogates(runs, "omniglot", 5, "blackbox.mcg.surrogates")
    >>> surrogates = adapt_surrogates(runs, episode.support_x, episode.support_y)  # [AdaptedSurrogate]
    >>> surrogates[0](episode.query_x).shape                                        # [N*Q, N]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metarobust.errors import ConfigError

Weights = dict[str, torch.Tensor]


class AdaptedSurrogate(nn.Module):
    """A learner at the weights it fitted on one episode, as a module whose parameters are
    those weights (copies), so :class:`~metarobust.blackbox.mcg.SurrogateRefresh` steps them in
    place. The run's model (the learner's forward reads its buffers, e.g. the input
    normalisation) is not a submodule: its own parameters are never touched.

    Arguments:
        forward: ``forward(weights, x) -> logits`` (the learner's, e.g. ``MAML.forward``).
        weights: the adapted weights by name (:func:`~metarobust.meta.functional.adapt_episode`).

    Call: ``surrogate(x [B, C, H, W]) -> logits [B, N]`` (``forward`` at the module's parameters).
    The RFS probe's forward runs the backbone at the model's own weights, so for it only the
    fitted head (``weight``, ``bias``) receives gradients.
    """

    def __init__(self, forward: Callable[[Weights, torch.Tensor], torch.Tensor], weights: Weights) -> None:
        super().__init__()
        self.names = list(weights)
        self.weights = nn.ParameterList([nn.Parameter(w.detach().clone()) for w in weights.values()])
        self._forward = forward  # a plain attribute: the model behind it is not registered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(dict(zip(self.names, self.weights, strict=True)), x)


@dataclass
class SurrogateLearner:
    """A surrogate run as a few-shot learner: ``path``, its config ``cfg``, trained ``model``
    (eval mode) and its evaluation ``learner`` (``adapt``/``forward``), or ``learner=None`` for a
    plain classifier (``kind == "classifier"``)."""

    path: str
    cfg: Any
    model: nn.Module
    learner: Any
    kind: str


def surrogate_learners(paths: Sequence[str], overrides: Sequence[str] | None = None, device: str | None = None,
                       ways: int | None = None) -> list[SurrogateLearner]:
    """The runs at ``paths`` (``metarobust train`` run folders or checkpoints), each with its
    recipe's kind (``"classifier"`` or ``"fewshot"``) and, for a few-shot recipe, its evaluation
    learner for ``ways``-way episodes (default: the run's ``meta.ways``)."""
    from metarobust.experiment import model_from_checkpoint
    from metarobust.training.recipes import build_recipe

    out = []
    for path in paths:
        cfg, model, _ = model_from_checkpoint(path, list(overrides or []), device)
        recipe = build_recipe(cfg)
        learner = None
        if recipe.evaluation == "fewshot":
            learner = recipe.evaluation_learner(model, ways or cfg.meta.ways)
        out.append(SurrogateLearner(str(path), cfg, model.eval(), learner, recipe.evaluation))
    return out


def check_fewshot_surrogates(runs: Sequence[SurrogateLearner], dataset: str, ways: int, where: str) -> None:
    """Refuse, naming ``where`` (the config field), the value and the fix, any run that is not a
    meta-learner of ``dataset`` trained for ``ways``-way episodes."""
    for run in runs:
        if run.kind != "fewshot":
            raise ConfigError(f"{where}: {run.path!r} is a plain classifier (recipe {run.cfg.recipe!r}) scoring "
                              f"global classes; a few-shot target scores its episode's {ways} labels, so name "
                              f"meta-learner runs (metarobust train with a few-shot recipe, e.g. maml) of {dataset!r} "
                              f"with meta.ways={ways}")
        if run.cfg.data.dataset != dataset:
            raise ConfigError(f"{where}: {run.path!r} was trained on {run.cfg.data.dataset!r}, the target's episodes "
                              f"come from {dataset!r}; name surrogate runs of {dataset!r}")
        if run.cfg.meta.ways != ways:
            raise ConfigError(f"{where}: {run.path!r} is a {run.cfg.meta.ways}-way learner (meta.ways), the "
                              f"episodes are {ways}-way; name surrogate runs trained with meta.ways={ways}")


def adapt_surrogates(runs: Sequence[SurrogateLearner], support_x: torch.Tensor,
                     support_y: torch.Tensor) -> list[AdaptedSurrogate]:
    """Each run's learner fine-tuned on the support set ``support_x [N*K, C, H, W]``,
    ``support_y [N*K]`` (as evaluation fine-tunes the target), as fresh
    :class:`AdaptedSurrogate` modules in eval mode."""
    from metarobust.meta.functional import adapt_episode

    return [AdaptedSurrogate(run.learner.forward, adapt_episode(run.model, support_x, support_y, run.learner)).eval()
            for run in runs]


__all__ = ["AdaptedSurrogate", "SurrogateLearner", "adapt_surrogates", "check_fewshot_surrogates", "surrogate_learners"]
