"""Round-off bounds for tests that compare two computations of the same float result (vmap against
a per-task loop, a batch against its parts): tolerances that follow from the arithmetic, so that
they hold on any CPU (other BLAS/oneDNN kernels, AVX2 or AVX-512 reduction orders), instead of
being read off one machine's output."""

from __future__ import annotations

import copy

import torch
from torch import nn

U64 = torch.finfo(torch.float64).eps / 2
"""float64 unit round-off, 2^-53: one correctly rounded operation errs by at most this, relatively."""


def float64_copy(model: nn.Module) -> nn.Module:
    """``model`` in float64 (a copy: module-scoped fixtures stay float32)."""
    return copy.deepcopy(model).double()


def vmap_attack_atol(norm: str, steps: int, radius: float, terms: int) -> float:
    """Largest gap between a float64 attack run under ``vmap`` over tasks and the same attack in a
    loop over the tasks.

    The two compute the same operations; only the reduction order inside their matrix products
    (one batched kernel call against one per task) differs, by round-off. That changes a
    discrete decision (a gradient sign, a loss comparison, an argmax) only at a near-tie: in
    float32, ~1e-7 relative, it happens (a near-zero gradient coordinate flipped one pixel of
    3,840 by a full step); in float64 a coordinate would have to sit within ~1e-14 of a tie.
    With the same decisions, an L-inf step is ``+-step`` per pixel then clipping: elementwise,
    correctly rounded operations, so both agree to the bit (0). L2 and L1 starts and steps also
    divide by norms and L1 projects by sums: each start or step carries the round-off of its
    reductions, at most ``terms * u`` (``terms``: the values they sum, all together) of a
    perturbation no larger than ``radius`` per pixel, which the (non-expansive) projections pass
    on unamplified: ``(steps + 1) * terms * u * radius`` after the start and ``steps`` steps.
    A genuine difference between the two (another start, restart, step size or target) moves
    pixels by a step, ~1e-2 or more.
    """
    if norm == "linf":
        return 0.0
    return (steps + 1) * terms * U64 * radius


def summed_terms(model: nn.Module) -> int:
    """``sum_l (K_l + 4)`` over the convolutions and linear layers of ``model``: ``K_l`` products
    summed per output, plus a few elementwise operations (bias, normalisation, activation,
    residual). A forward pass computed by other kernels (another memory format, batch size or
    CPU) may differ by about ``summed_terms(model) * u`` times the scale of its activations
    (taken as its outputs'): each layer's sums err by at most ``K_l u`` of their terms, and to
    first order these add."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            total += m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] + 4
        elif isinstance(m, nn.Linear):
            total += m.in_features + 4
    return total
