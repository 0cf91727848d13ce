"""Models as pure functions of a parameter dict (the ``torch.func`` way).

``forward(params, x)`` runs the module with ``params`` substituted for its own parameters, so
adapted "fast weights" are just another dict, and a task's computation can be vectorised over
tasks with ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from metarobust.attacks.pgd import inside_func_transform
from metarobust.meta.batch_norm import batch_norm_error, running_batch_norms

Params = dict[str, torch.Tensor]
FunctionalForward = Callable[[Params, torch.Tensor], torch.Tensor]


def params_of(model: nn.Module) -> Params:
    """The model's trainable parameters by name (the live tensors, not copies)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def functional_forward(model: nn.Module) -> FunctionalForward:
    """``forward(params, x) -> logits``; buffers (e.g. input normalisation) come from ``model``.

    A torch BatchNorm layer in train mode cannot run inside a ``torch.func`` transform (MAML's
    inner loop): it updates its running statistics in place. Called inside one, the forward then
    raises :class:`~metarobust.errors.ConfigError` naming the layers and the fixes
    (:func:`~metarobust.meta.batch_norm.convert_batch_norm`, or ``model.eval()``) instead of
    functorch's error; a model without such layers pays nothing for the check.
    """
    tracked = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

    def forward(params: Params, x: torch.Tensor) -> torch.Tensor:
        if tracked and any(m.training for m in tracked) and inside_func_transform():
            raise batch_norm_error(running_batch_norms(model))
        return functional_call(model, params, (x,), strict=False)

    return forward


def detached(params: Params) -> Params:
    """The same values cut from the autograd graph (attacks need no meta-gradient)."""
    return {k: v.detach() for k, v in params.items()}


def bind(forward: FunctionalForward, params: Params) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> forward(params, x)``: the form an attack takes."""
    return lambda x: forward(params, x)


def adapt_episode(model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, learner) -> Params:
    """The weights ``learner`` (``adapt(params, x, y) -> fast`` and ``forward(fast, x)``: MAML, a
    logistic probe) fits on one support set (``[N*K, C, H, W]``, ``[N*K]``), all of them (adapted
    or not) by name and detached: what evaluation's per-task forward runs at
    (``learner.forward(weights, x)``). The model is put in eval mode. Used by evaluation and by
    MCG's few-shot surrogates (adapted per episode as evaluation adapts a target). Every
    parameter takes part, frozen ones too (``requires_grad=False``, as a trainer's frozen role
    holds them): the learner differentiates with ``torch.func``, which needs no flag.

    Example:
        >>> w = adapt_episode(model, episode.support_x, episode.support_y, recipe.evaluation_learner(model, 5))
        >>> logits = learner.forward(w, episode.query_x)            # [N*Q, N]
    """
    model.eval()
    params = detached(dict(model.named_parameters()))
    with torch.no_grad():  # torch.func.grad still differentiates inside
        fast = learner.adapt(params, support_x, support_y)
    return {**params, **{k: v.detach() for k, v in fast.items()}}


__all__ = ["FunctionalForward", "Params", "adapt_episode", "bind", "detached", "functional_forward", "params_of"]
