"""PANet's prototype head (Wang et al., ICCV 2019): masked average pooling, scaled cosine
segmentation and the prototype-alignment loss, as pure tensor functions.

Shapes: ``T`` episodes, ``K`` support and ``Q`` query images each, ``C`` feature channels on an
``h x w`` map, masks at the image size ``H x W``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COSINE_SCALE = 20.0
"""PANet's (and PNODE's) temperature: logits = 20 cos(feature, prototype)."""


def masked_average_pooling(features: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``float [B, C]``: the mean of ``features [B, C, h, w]`` (bilinearly upsampled to the mask's
    size) over the pixels where ``mask [B, H, W]`` (0/1 or soft) is on, PANet's
    ``sum(f m) / (sum(m) + 1e-5)``.

    Example:
        >>> masked_average_pooling(torch.ones(1, 3, 2, 2), torch.ones(1, 4, 4))  # [[~1, ~1, ~1]]
    """
    up = F.interpolate(features, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    m = mask.unsqueeze(1).to(up.dtype)
    return (up * m).sum(dim=(2, 3)) / (m.sum(dim=(2, 3)) + eps)


def prototypes(support_features: torch.Tensor, support_mask: torch.Tensor) -> torch.Tensor:
    """``float [T, 2, C]``: background and foreground prototypes of each episode, each the masked
    average of its ``K`` support features ``[T, K, C, h, w]`` under ``1 - m`` and ``m``
    (``support_mask [T, K, H, W]``), averaged over the shots."""
    t, k = support_mask.shape[:2]
    f = support_features.flatten(0, 1)
    m = support_mask.flatten(0, 1).float()
    fg = masked_average_pooling(f, m).view(t, k, -1).mean(dim=1)
    bg = masked_average_pooling(f, 1 - m).view(t, k, -1).mean(dim=1)
    return torch.stack([bg, fg], dim=1)


def cosine_logits(features: torch.Tensor, protos: torch.Tensor, scale: float = COSINE_SCALE) -> torch.Tensor:
    """``[T, Q, P, h, w]``: ``scale * cos(feature, prototype)`` at every location of
    ``features [T, Q, C, h, w]`` for each of the ``P`` prototypes ``protos [T, P, C]``."""
    f = F.normalize(features, dim=2, eps=1e-8)
    p = F.normalize(protos, dim=-1, eps=1e-8)
    return scale * torch.einsum("tqchw,tpc->tqphw", f, p)


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[T, Q, P, h, w]`` -> ``[T, Q, P, H, W]``, bilinearly (PANet)."""
    t, q = logits.shape[:2]
    out = F.interpolate(logits.flatten(0, 1), size=size, mode="bilinear", align_corners=False)
    return out.view(t, q, *out.shape[1:])


def alignment_loss(query_features: torch.Tensor, query_logits: torch.Tensor, support_features: torch.Tensor,
                   support_mask: torch.Tensor, scale: float = COSINE_SCALE) -> torch.Tensor:
    """PANet's prototype-alignment regulariser (PAR): prototypes from the query features under
    the query's own predicted mask (``query_logits [T, Q, 2, H, W]``, argmax, no gradient through
    the mask) segment each support image; the loss is the CE against the support masks, averaged
    over shots. ``query_features [T, Q, C, h, w]``, ``support_features [T, K, C, h, w]``."""
    t, q = query_logits.shape[:2]
    pred = query_logits.argmax(dim=2).float()                              # [T, Q, H, W]
    f = query_features.flatten(0, 1)
    fg = masked_average_pooling(f, pred.flatten(0, 1)).view(t, q, -1).mean(dim=1)
    bg = masked_average_pooling(f, 1 - pred.flatten(0, 1)).view(t, q, -1).mean(dim=1)
    logits = cosine_logits(support_features, torch.stack([bg, fg], dim=1), scale)
    logits = upsample_logits(logits, support_mask.shape[-2:])
    return F.cross_entropy(logits.flatten(0, 1), support_mask.flatten(0, 1))


__all__ = ["COSINE_SCALE", "alignment_loss", "cosine_logits", "masked_average_pooling", "prototypes",
           "upsample_logits"]
