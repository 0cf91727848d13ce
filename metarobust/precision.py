"""Half precision at the boundary of a loss: autocast (``at.amp``) runs models in float16 or
bfloat16, and every loss, gradient accumulation and statistic is taken in float32."""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def full_precision(value: torch.Tensor) -> torch.Tensor:
    """A half-precision (autocast) tensor as float32; float32 and float64 unchanged.

    Example:
        >>> F.cross_entropy(full_precision(logits), y)
    """
    return value.float() if value.dtype in LOW_PRECISION else value


__all__ = ["LOW_PRECISION", "full_precision"]
