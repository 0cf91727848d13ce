"""Dice overlap and its per-volume summary (the few-shot organ segmentation papers' score)."""

from __future__ import annotations

import math
import warnings

import torch

Z_95 = 1.959963984540054


def dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``2 |P n G| / (|P| + |G|)`` over all dimensions after the first: ``pred`` and ``target``
    ``[B, ...]`` binary; ``float [B]``. Both empty counts as a perfect 1.

    Example:
        >>> dice(torch.tensor([[1, 1, 0, 0]]), torch.tensor([[1, 0, 0, 0]]))  # tensor([0.6667])
    """
    p = pred.flatten(1).bool()
    g = target.flatten(1).bool()
    inter = (p & g).sum(dim=1).double()
    total = p.sum(dim=1).double() + g.sum(dim=1).double()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)).float()


def volume_dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    """The 3-D Dice of one volume's stacked slice predictions ``[Z, H, W]``."""
    return float(dice(pred.unsqueeze(0), target.unsqueeze(0))[0])


def volume_hd95(pred: torch.Tensor, target: torch.Tensor) -> float | None:
    """The 95th-percentile symmetric Hausdorff distance between the surfaces of one volume's
    predicted and true masks ``[Z, H, W]``, in voxels (the staged slices carry no spacing), from
    MONAI's :func:`monai.metrics.compute_hausdorff_distance`; ``nan`` when either mask is empty
    (undefined), ``None`` when MONAI is not installed (``pip install metarobust[seg]``)."""
    try:
        from monai.metrics import compute_hausdorff_distance
    except ImportError:
        return None
    with warnings.catch_warnings():  # MONAI's deprecation notes about its own internals
        warnings.simplefilter("ignore")
        value = compute_hausdorff_distance(pred.bool()[None, None].cpu(), target.bool()[None, None].cpu(),
                                           percentile=95)
    value = float(value.flatten()[0])
    return value if math.isfinite(value) else float("nan")


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width ``1.96 s / sqrt(n)`` of its 95 % interval over volumes (``nan``
    for one volume)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, Z_95 * math.sqrt(var / n)


__all__ = ["dice", "mean_ci95", "volume_dice", "volume_hd95"]
