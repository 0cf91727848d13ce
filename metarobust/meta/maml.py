"""MAML (Finn et al., ICML 2017): the inner loop, first or second order, as a pure function.

``adapt`` takes SGD steps on the support loss starting from ``params`` and returns the fast
weights. With ``first_order=False`` the inner gradients stay in the autograd graph, so the
meta-gradient flows through them (second order); with ``first_order=True`` they are detached
(FOMAML). The gradient is computed with ``torch.func.grad``, so the same code runs one task at
a time (a per-task loop) and over a batch of tasks under ``torch.func.vmap``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metarobust.meta.functional import FunctionalForward, Params


@dataclass(frozen=True)
class MAML:
    """The MAML learner.

    Args:
        forward: ``forward(params, x) -> logits`` (:func:`functional_forward`).
        inner_lr: SGD step size of the inner loop (alpha).
        inner_steps: SGD steps on the support set.
        first_order: drop the second-order terms (FOMAML).

    Example:
        >>> maml = MAML(functional_forward(model), inner_lr=0.4, inner_steps=1)
        >>> fast = maml.adapt(params_of(model), support_x, support_y)
        >>> loss = F.cross_entropy(maml.forward(fast, query_x), query_y)
    """

    forward: FunctionalForward
    inner_lr: float
    inner_steps: int
    first_order: bool = False

    def adapt(self, params: Params, x: torch.Tensor, y: torch.Tensor,
              steps: int | None = None, first_order: bool | None = None) -> Params:
        """Fast weights after ``steps`` SGD steps on ``CE(forward(params, x), y)``.

        Shapes: ``x [N*K, C, H, W]``, ``y [N*K]`` (one task; vmap adds the task dimension).
        """
        steps = self.inner_steps if steps is None else steps
        first_order = self.first_order if first_order is None else first_order

        def support_loss(p: Params) -> torch.Tensor:
            return F.cross_entropy(self.forward(p, x), y)

        gradient = torch.func.grad(support_loss)
        for _ in range(steps):
            grads = gradient(params)
            params = {
                k: p - self.inner_lr * (grads[k].detach() if first_order else grads[k])
                for k, p in params.items()
            }
        return params
