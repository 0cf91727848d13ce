"""Projected gradient descent under L-inf (Madry et al., ICLR 2018), as a pure function.

An attack takes a *forward function*, not a module, so the same code attacks a plain model,
the fast weights of an adapted learner (``lambda x: functional_call(model, fast, x)``), and a
task inside ``torch.func.vmap``. Randomness (the random start) is drawn by the caller with
:meth:`LinfPGD.init_noise` outside any ``vmap``, from a ``torch.Generator``, and passed in
as ``noise``; that keeps vmapped and looped executions bit-identical and runs reproducible.

Inputs live in [0, 1]; the model normalises internally. The gradient is taken with
``torch.func.grad`` so the step loop has no host synchronisation and works under ``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from metarobust.attacks.losses import cross_entropy_sum
from metarobust.attacks.registry import ATTACKS
from metarobust.config import AttackConfig

Forward = Callable[[torch.Tensor], torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LinfPGD:
    """L-inf PGD with optional uniform random start; ``steps=1, step_size=1.25*eps`` is FGSM-RS.

    Args:
        eps: radius of the L-inf ball in [0, 1] pixel units (8/255 = 0.0314).
        step_size: size of each signed-gradient step.
        steps: number of steps.
        random_start: start from a uniform point of the ball instead of the clean input.

    Call: ``attack(forward, x, y, loss=cross_entropy_sum, noise=None) -> x_adv``, with
    ``x [B, C, H, W]`` in [0, 1], ``y`` the loss target (labels ``[B]`` or clean probabilities
    ``[B, N]``), ``noise`` from :meth:`init_noise` (required when ``random_start``).

    Example:
        >>> attack = LinfPGD(eps=8/255, step_size=2/255, steps=10)
        >>> noise = attack.init_noise(x, generator)
        >>> x_adv = attack(model, x, y, noise=noise)
    """

    eps: float
    step_size: float
    steps: int
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.eps < 0:
            raise ValueError(f"eps={self.eps} must be >= 0 (an L-inf radius in [0, 1] units)")
        if self.step_size < 0 or self.steps < 1:
            raise ValueError(f"step_size={self.step_size} must be >= 0 and steps={self.steps} >= 1")

    def init_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Uniform noise in ``[-eps, eps]`` shaped like ``x``, or ``None`` without random start."""
        if not self.random_start:
            return None
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2 * u - 1) * self.eps

    def __call__(
        self,
        forward: Forward,
        x: torch.Tensor,
        y: torch.Tensor,
        loss: Loss = cross_entropy_sum,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x.detach()
        if self.random_start:
            if noise is None:
                raise ValueError("random_start=True needs noise=attack.init_noise(x, generator)")
            delta = (x + noise).clamp(0, 1) - x
        else:
            delta = torch.zeros_like(x)

        def objective(d: torch.Tensor) -> torch.Tensor:
            return loss(forward(x + d), y)

        gradient = torch.func.grad(objective)
        for _ in range(self.steps):
            delta = delta + self.step_size * gradient(delta).sign()
            # Project onto the eps-ball, then onto the image box [0, 1].
            delta = delta.clamp(-self.eps, self.eps)
            delta = ((x + delta).clamp(0, 1) - x).detach()
        return x + delta


@ATTACKS.register("pgd", "L-inf PGD (Madry et al. 2018), random start; steps=1 + step 1.25 eps is FGSM-RS")
def _pgd(cfg: AttackConfig) -> LinfPGD:
    return LinfPGD(cfg.eps, cfg.step_size, cfg.steps, cfg.random_start)


@ATTACKS.register("fgsm", "FGSM (Goodfellow et al. 2015): one signed step of size eps, no random start")
def _fgsm(cfg: AttackConfig) -> LinfPGD:
    return LinfPGD(cfg.eps, cfg.eps, 1, random_start=False)
