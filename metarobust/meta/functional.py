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


__all__ = ["FunctionalForward", "Params", "bind", "detached", "functional_forward", "params_of"]
