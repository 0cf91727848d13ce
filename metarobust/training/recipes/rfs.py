"""RFS (Tian et al., "Rethinking Few-Shot Image Classification: a Good Embedding Is All You
Need?", ECCV 2020; META.md 5): the non-meta reference of the robust few-shot study.

1. **Pre-training** on the union of all meta-training classes as one plain many-way classifier
   (107 classes on glyphs, 964 on full Omniglot, 64 on miniImageNet): the standard
   one engine (:class:`~metarobust.training.engine.Trainer`, as a plain recipe) with SGD 0.05, momentum 0.9, weight
   decay 5e-4, batch 64, 100 epochs, lr x0.1 at epochs 60 and 80 (the ``at`` section of
   ``configs/meta/*_rfs.yaml``). ``rfs`` trains on clean images (``natural``); ``rfs_adversarial``
   trains with PGD-AT (Madry et al.; ``train_attack``: PGD-10, step 2/255, eps 8/255), the
   adversarially trained embedding that AQ's paper compares against ("AT transfer").
2. **Evaluation** per frozen test episode (the same manifests as every meta-learner): the
   backbone is frozen, the support set's penultimate features are L2-normalised and a
   multinomial logistic regression (C = 1) is fitted on them
   (:class:`~metarobust.meta.logistic.LogisticProbe`, Newton's method in torch, equal to
   scikit-learn's fit); the query set is scored clean and under ``attack`` through the features
   *and* the fitted head.

Left out (documented in ``docs/robust_meta_learning.md``): RFS's 5x augmented support copies,
its data augmentation during pre-training on miniImageNet (``at.augment`` applies the
engine's crop+flip to CIFAR-sized colour images only) and the self-distillation stage
(RFS-distill). EpisodeBatch norm: ``model.batch_norm=running`` (standard BN, eval mode at test) in the
shipped configs, as RFS's code; ``batch`` (the MAML convention) also runs.

Example:
    >>> cfg = load_config("configs/meta/glyphs_rfs.yaml", ["at.epochs=2"])
    >>> summary = train_and_evaluate(cfg)
    >>> summary["clean_acc"], summary["robust_acc"]
"""

from __future__ import annotations

from torch import nn

from metarobust.meta.logistic import LogisticProbe, feature_extractor
from metarobust.training.recipes.base import register_recipe
from metarobust.training.recipes.natural import Natural
from metarobust.training.recipes.pgd_at import PGDAT


class FewShotProbe:
    """Evaluated few-shot with RFS's per-episode logistic regression on frozen features."""

    evaluation = "fewshot"

    def evaluation_learner(self, model: nn.Module, ways: int) -> LogisticProbe:
        return LogisticProbe(feature_extractor(model), ways)


@register_recipe("rfs", "RFS (Tian et al. 2020): plain pre-training on all meta-train classes, then per "
                        "episode logistic regression on L2-normalised features")
class RFS(FewShotProbe, Natural):
    """RFS-simple: natural pre-training, then the per-episode logistic-regression probe."""


@register_recipe("rfs_adversarial", "RFS with PGD-AT pre-training (adversarially trained embedding), "
                                    "logistic regression per episode; attacked through features + head")
class RFSAdversarial(FewShotProbe, PGDAT):
    """RFS whose embedding is pre-trained with PGD-AT (``train_attack``), probe as :class:`RFS`."""


__all__ = ["RFS", "RFSAdversarial"]
