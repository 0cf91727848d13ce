"""MI-FGSM: momentum iterative FGSM (Dong et al., 'Boosting Adversarial Attacks with Momentum', CVPR 2018).

The transfer attack whose perturbations MCG's generator is pre-trained on (META.md 3.3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from metarobust.attacks import threat


def mi_fgsm(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
            norm: str = "linf", eps: float = 8 / 255, steps: int = 10, step_size: float | None = None,
            decay: float = 1.0) -> torch.Tensor:
    r"""MI-FGSM [https://arxiv.org/abs/1710.06081], untargeted, cross-entropy loss.

    Distance Measure : Linf (the paper: ``sign(g)`` steps) or L2 (``g / ||g||_2`` steps).

    Each step accumulates the L1-normalised input gradient into a momentum
    ``g <- decay * g + grad / ||grad||_1`` (the paper's Eq. 6), moves ``step_size`` along the
    norm's steepest direction of ``g``, and projects onto the eps-ball and the box [0, 1].

    Arguments:
        forward: ``x -> logits [B, N]`` (a white-box surrogate; eval mode).
        x: ``[B, C, H, W]`` in [0, 1]; y: labels ``int64 [B]``.
        norm (str): ``"linf"`` or ``"l2"``. (Default: ``"linf"``)
        eps (float): the radius. (Default: 8/255)
        steps (int): iterations. (Default: 10)
        step_size (float or None): ``None``: ``eps / steps``, as the paper. (Default: None)
        decay (float): the momentum ``mu``. (Default: 1.0)

    Returns ``x_adv [B, C, H, W]``, detached, inside the ball and the box.

    Example::
        >>> x_adv = mi_fgsm(surrogate, x, y, "linf", 8 / 255)
    """
    norm = threat.norm_name(norm)
    if norm not in ("linf", "l2"):
        raise ValueError(f"mi_fgsm norm={norm!r}; it supports 'linf' and 'l2'")
    step = eps / steps if step_size is None else step_size
    x = x.detach()
    delta = torch.zeros_like(x)
    momentum = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(forward(x + delta), y, reduction="sum")
            grad, = torch.autograd.grad(loss, delta)
        l1 = grad.flatten(1).abs().sum(1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        momentum = decay * momentum + grad / l1
        delta = threat.project(delta.detach() + step * threat.step_direction(momentum, norm), x, norm, eps)
    return (x + delta).detach()


__all__ = ["mi_fgsm"]
