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

Params = dict[str, torch.Tensor]
FunctionalForward = Callable[[Params, torch.Tensor], torch.Tensor]


def params_of(model: nn.Module) -> Params:
    """The model's trainable parameters by name (the live tensors, not copies)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def functional_forward(model: nn.Module) -> FunctionalForward:
    """``forward(params, x) -> logits``; buffers (e.g. input normalisation) come from ``model``."""

    def forward(params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (x,), strict=False)

    return forward


def detached(params: Params) -> Params:
    """The same values cut from the autograd graph (attacks need no meta-gradient)."""
    return {k: v.detach() for k, v in params.items()}


def bind(forward: FunctionalForward, params: Params) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> forward(params, x)``: the form an attack takes."""
    return lambda x: forward(params, x)
