"""R-PNODE (Pandey et al., IEEE TMI 2023): PNODE trained on Gaussian views of the episode with a
cluster loss and a consistency loss. The losses are a **reconstruction** (``META.md`` 4.3: the
released code is inconsistent and the paper's definitions were not available):

- views: one Gaussian copy of the support and query images, ``x + x eps`` (``seg.noise``
  multiplicative) or ``x + eps``, ``eps ~ N(0, seg.noise_std^2)``, clipped to [0, 1], with the clean
  episode kept (``keep_clean``); CE on the query predictions of both;
- cluster loss: ``(1 - cos)`` between the perturbed and clean feature maps, along channels at every
  location, averaged, for the support and for the query (after the ODE block);
- consistency loss: ``1 - cos(MAP(F(x_q), m_q), p_fg)``, the ground-truth-masked query foreground
  pulled onto the support foreground prototype;
- total: ``CE + seg.cluster_weight L_cluster + seg.consistency_weight L_consistency`` (1 and 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metarobust.segmentation.prototypes import masked_average_pooling
from metarobust.training.recipes.base import register_recipe
from metarobust.training.recipes.seg_base import SegRecipe


def gaussian_view(x: torch.Tensor, kind: str, std: float, generator: torch.Generator) -> torch.Tensor:
    """``x + x eps`` (multiplicative) or ``x + eps`` (additive), ``eps ~ N(0, std^2)``, in [0, 1]."""
    eps = torch.randn(x.shape, generator=generator, device=x.device) * std
    return (x + x * eps if kind == "multiplicative" else x + eps).clamp(0, 1)


def feature_cosine_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - mean cos(a, b)`` along channels (dim 2) of ``[T, N, C, h, w]`` maps."""
    return 1 - F.cosine_similarity(a, b, dim=2, eps=1e-8).mean()


@register_recipe("seg_r_pnode", "R-PNODE (Pandey et al. 2023): PNODE + cluster and consistency losses "
                                "(reconstruction)")
class SegRPNODE(SegRecipe):
    ode = True

    def loss(self, models, batch, ctx):
        model, s = models["model"], self.cfg.seg
        clean = self.segment(model, batch)
        noisy_s = gaussian_view(batch.support_x, s.noise, s.noise_std, ctx.generator)
        noisy_q = gaussian_view(batch.query_x, s.noise, s.noise_std, ctx.generator)
        noisy = self.segment(model, batch, noisy_s, noisy_q)
        ce = (self.ce(clean, batch) + self.ce(noisy, batch)) / 2
        cluster = (feature_cosine_gap(noisy["support_features"], clean["support_features"])
                   + feature_cosine_gap(noisy["query_features"], clean["query_features"]))
        fq = clean["query_features"]
        t, q = fq.shape[:2]
        query_fg = masked_average_pooling(fq.flatten(0, 1), batch.query_mask.flatten(0, 1).float()).view(t, q, -1)
        proto_fg = clean["prototypes"][:, 1:2]
        consistency = 1 - F.cosine_similarity(query_fg, proto_fg, dim=-1, eps=1e-8).mean()
        loss = ce + s.cluster_weight * cluster + s.consistency_weight * consistency
        stats = self.stats(clean, batch, model)
        stats.update(cluster=cluster.detach(), consistency=consistency.detach())
        return loss, stats
