"""MAML (Finn et al., ICML 2017) and ANIL (Raghu et al., ICLR 2020): the inner loop as a pure function.

``adapt`` takes SGD steps on the support loss starting from ``params`` and returns the fast
weights. With ``first_order=False`` the inner gradients stay in the autograd graph, so the
meta-gradient flows through them (second order); with ``first_order=True`` they are detached
(FOMAML). The gradient is computed with ``torch.func.grad``, so the same code runs one task at
a time (a per-task loop) and over a batch of tasks under ``torch.func.vmap``.

ANIL ("Almost No Inner Loop") adapts only the head in the inner loop: ``adapted`` names the
parameters that take inner steps; the others are closed over, so they still receive the
meta-gradient (through the query loss and, second order, through the head's inner steps).

The inner loss of a step may depend on the current fast weights (``step_loss``): robust
recipes attack the support set against them at every step (ADML's adversarial trajectory,
R-MAML's robust term in the inner loop). The adversarial support is crafted against detached
weights, so it is a constant of the meta-gradient, as in the AQ and R-MAML code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metarobust.errors import ConfigError
from metarobust.meta.functional import FunctionalForward, Params, functional_forward

InnerLoss = Callable[[Params], torch.Tensor]
StepLoss = Callable[[int, Params], InnerLoss]
"""``step_loss(step, fast) -> loss``: the support loss of inner step ``step`` as a function of
the weights being differentiated, built from the current fast weights ``fast``."""

ADAPT_MODES = ("all", "head")


@dataclass(frozen=True)
class MAML:
    """The MAML learner (ANIL when ``adapted`` names only the head).

    Args:
        forward: ``forward(params, x) -> logits`` (:func:`functional_forward`), or the
            ``nn.Module`` itself (wrapped with :func:`functional_forward`). A model with torch
            BatchNorm layers adapts in eval mode (frozen running statistics) or after
            :func:`~metarobust.meta.batch_norm.convert_batch_norm`; in train mode its forward
            raises a :class:`ConfigError` saying so.
        inner_lr: SGD step size of the inner loop (alpha).
        inner_steps: SGD steps on the support set.
        first_order: drop the second-order terms (FOMAML).
        adapted: names of the parameters adapted in the inner loop; ``None``: all of them
            (MAML); the head's names: ANIL (:func:`head_names`).

    Example:
        >>> maml = MAML(model, inner_lr=0.4, inner_steps=1)    # or MAML(functional_forward(model), ...)
        >>> fast = maml.adapt(params_of(model), support_x, support_y)
        >>> loss = F.cross_entropy(maml.forward(fast, query_x), query_y)
        >>> anil = MAML(functional_forward(model), 0.4, 1, adapted=head_names(model))
    """

    forward: FunctionalForward
    inner_lr: float
    inner_steps: int
    first_order: bool = False
    adapted: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.forward, nn.Module):
            object.__setattr__(self, "forward", functional_forward(self.forward))

    def adapt(self, params: Params, x: torch.Tensor, y: torch.Tensor,
              steps: int | None = None, first_order: bool | None = None,
              step_loss: StepLoss | None = None) -> Params:
        """Fast weights after ``steps`` SGD steps on ``CE(forward(params, x), y)``.

        Shapes: ``x [N*K, C, H, W]``, ``y [N*K]`` (one task; vmap adds the task dimension).
        ``step_loss`` replaces the clean support cross-entropy (see :data:`StepLoss`).
        """
        steps = self.inner_steps if steps is None else steps
        first_order = self.first_order if first_order is None else first_order
        step_loss = step_loss or cross_entropy_step(self.forward, x, y)
        for step in range(steps):
            loss = step_loss(step, params)
            if self.adapted is None:
                grads = torch.func.grad(loss)(params)
            else:
                fixed = {k: v for k, v in params.items() if k not in self.adapted}
                moving = {k: v for k, v in params.items() if k in self.adapted}
                grads = torch.func.grad(lambda m, fixed=fixed, loss=loss: loss({**fixed, **m}))(moving)
            params = {
                k: p - self.inner_lr * (grads[k].detach() if first_order else grads[k]) if k in grads else p
                for k, p in params.items()
            }
        return params


def head_names(model: nn.Module, head: str = "head") -> frozenset[str]:
    """Names of the trainable parameters of ``model.<head>`` (ANIL's inner-loop parameters)."""
    if not isinstance(getattr(model, head, None), nn.Module):
        raise ConfigError(
            f"meta.adapt=head needs a model with a `{head}` submodule (its classifier); "
            f"{type(model).__name__} has none; use meta.adapt=all"
        )
    names = frozenset(f"{head}.{n}" for n, p in getattr(model, head).named_parameters() if p.requires_grad)
    if not names:
        raise ConfigError(f"model.{head} has no trainable parameters; use meta.adapt=all")
    return names


def adapted_names(model: nn.Module, adapt: str) -> frozenset[str] | None:
    """``meta.adapt`` -> the ``adapted`` argument of :class:`MAML` (``None`` for ``all``)."""
    if adapt not in ADAPT_MODES:
        raise ConfigError(f"meta.adapt={adapt!r}; expected 'all' (MAML) or 'head' (ANIL)")
    return None if adapt == "all" else head_names(model)


def cross_entropy_step(forward: FunctionalForward, x: torch.Tensor, y: torch.Tensor) -> StepLoss:
    """The plain MAML inner loss as a :data:`StepLoss` (clean support cross-entropy)."""
    return lambda step, fast: (lambda p: F.cross_entropy(forward(p, x), y))


__all__ = ["ADAPT_MODES", "MAML", "InnerLoss", "StepLoss", "adapted_names", "cross_entropy_step", "head_names"]
