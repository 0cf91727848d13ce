"""PNODE's neural-ODE block (Pandey et al., MICCAI 2022; ``shared/methods/META.md`` 4.2).

Features ``z(0)`` (the encoder's map) evolve under ``dz/dt = f(t, z)`` from ``t = 0`` to
``t = time`` (4 in the paper), with ``f = GroupNorm -> layers x [ReLU -> 3x3 conv on the
concatenation (z, a constant-t channel) -> GroupNorm]``. The default solver is torchdiffeq's
adaptive ``dopri5`` at ``rtol = atol = 1e-3``, back-propagated *through* the solver (not the
adjoint), as the reference; ``rk4`` (and ``euler``) with a fixed number of steps is the option for
tests, CPU runs and attacks that must not meet a step-size controller. :attr:`ODEBlock.nfe` is
the number of evaluations of ``f`` in the last forward pass (an adaptive solver's cost and its
sensitivity to the input: report it).
"""

from __future__ import annotations

import torch
from torch import nn

SOLVERS = ("dopri5", "rk4", "euler")


def _groups(channels: int) -> int:
    g = min(32, channels)
    while channels % g:
        g -= 1
    return g


class ODEFunc(nn.Module):
    """``f(t, z)`` on a ``[B, C, h, w]`` map; counts its evaluations in :attr:`nfe`."""

    def __init__(self, channels: int, layers: int = 3) -> None:
        super().__init__()
        self.norm_in = nn.GroupNorm(_groups(channels), channels)
        # registered as modules (the reference kept them in a plain list: META.md 4.3 pitfalls)
        self.convs = nn.ModuleList(nn.Conv2d(channels + 1, channels, 3, padding=1) for _ in range(layers))
        self.norms = nn.ModuleList(nn.GroupNorm(_groups(channels), channels) for _ in range(layers))
        self.nfe = 0

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        h = self.norm_in(z)
        tt = torch.ones_like(z[:, :1]) * t.to(z.dtype)
        for conv, norm in zip(self.convs, self.norms):
            h = norm(conv(torch.cat([torch.relu(h), tt], dim=1)))
        return h


class ODEBlock(nn.Module):
    """``z(0) -> z(time)`` by torchdiffeq's ``odeint``.

    Arguments:
        channels (int): feature channels ``C`` (512 for the VGG encoder).
        layers (int): conv layers of ``f`` (``ode_layers=3``).
        time (float): integration time (``ode_time=4``).
        method (str): ``dopri5`` (adaptive, the reference), ``rk4`` or ``euler`` (fixed steps).
        rtol, atol (float): dopri5 tolerances (1e-3).
        steps (int): fixed-step solvers: steps over ``[0, time]``.

    Shape: ``[B, C, h, w] -> [B, C, h, w]``.

    Example:
        >>> block = ODEBlock(64, method="rk4", steps=4)
        >>> z = block(torch.randn(2, 64, 8, 8)); block.nfe  # 16 (4 steps x 4 stages)
    """

    def __init__(self, channels: int, layers: int = 3, time: float = 4.0, method: str = "dopri5",
                 rtol: float = 1e-3, atol: float = 1e-3, steps: int = 4) -> None:
        super().__init__()
        if method not in SOLVERS:
            raise ValueError(f"seg.ode_solver={method!r}; choose one of {list(SOLVERS)}")
        if time <= 0 or steps < 1:
            raise ValueError(f"seg.ode_time={time} must be > 0 and seg.ode_steps={steps} >= 1")
        self.func = ODEFunc(channels, layers)
        self.time, self.method, self.rtol, self.atol, self.steps = time, method, rtol, atol, steps
        self.nfe = 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        from torchdiffeq import odeint

        self.func.nfe = 0
        span = torch.tensor([0.0, self.time], device=z.device, dtype=z.dtype)
        if self.method == "dopri5":
            out = odeint(self.func, z, span, rtol=self.rtol, atol=self.atol, method="dopri5")
        else:
            out = odeint(self.func, z, span, method=self.method, options={"step_size": self.time / self.steps})
        self.nfe = self.func.nfe
        return out[-1]


__all__ = ["ODEBlock", "ODEFunc", "SOLVERS"]
