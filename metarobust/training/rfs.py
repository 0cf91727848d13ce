"""RFS (Tian et al., "Rethinking Few-Shot Image Classification: a Good Embedding Is All You
Need?", ECCV 2020; META.md 5): the non-meta reference of the robust few-shot study.

1. **Pre-training** on the union of all meta-training classes as one plain many-way classifier
   (107 classes on glyphs, 964 on full Omniglot, 64 on miniImageNet): the standard
   single-task engine (:mod:`metarobust.training.standard`) with SGD 0.05, momentum 0.9, weight
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
(RFS-distill). Batch norm: ``model.norm=running`` (standard BN, eval mode at test) in the
shipped configs, as RFS's code; ``batch`` (the MAML convention) also runs.

Example:
    >>> cfg = load_config("configs/meta/glyphs_rfs.yaml", ["at.epochs=2"])
    >>> summary = train_and_evaluate_rfs(cfg)
    >>> summary["clean_acc"], summary["robust_acc"]
"""

from __future__ import annotations

import time
from typing import Any

from metarobust.config import ExperimentConfig
from metarobust.runs import RunDir
from metarobust.training.standard.base import register_standard
from metarobust.training.standard.natural import Natural
from metarobust.training.standard.pgd_at import PGDAT

KIND = "rfs"
"""``recipe_kind`` of the RFS recipes: trained by the standard engine, evaluated few-shot."""


@register_standard("rfs", "RFS (Tian et al. 2020): plain pre-training on all meta-train classes, then per "
                          "episode logistic regression on L2-normalised features")
class RFS(Natural):
    """RFS-simple: natural pre-training, then the per-episode logistic-regression probe."""

    kind = KIND
    fewshot_probe = True


@register_standard("rfs_adversarial", "RFS with PGD-AT pre-training (adversarially trained embedding), "
                                      "logistic regression per episode; attacked through features + head")
class RFSAdversarial(PGDAT):
    """RFS whose embedding is pre-trained with PGD-AT (``train_attack``), probe as :class:`RFS`."""

    kind = KIND
    fewshot_probe = True


def train_and_evaluate_rfs(cfg: ExperimentConfig, resume: bool = False, progress: bool = True,
                           stores=None) -> dict[str, Any]:
    """Pre-train ``cfg`` (an RFS recipe) on every class of the train split in its run folder,
    then score it on the frozen test episodes; writes ``eval.json`` and ``report.md``.
    ``stores``: pre-loaded :class:`~metarobust.training.engine.Stores` (else from ``cfg.data``)."""
    # Imported here: the engine imports the recipes registry, which imports this module.
    from metarobust.experiment import evaluate
    from metarobust.training.engine import load_stores, resolve_device
    from metarobust.training.standard.trainer import StandardData, StandardTrainer, split_train

    start = time.perf_counter()
    stores = stores or load_stores(cfg, resolve_device(cfg.device))  # every data check before any work
    train, holdout = split_train(stores.train, cfg.at.holdout, cfg.at.train_size, cfg.seed)
    run = RunDir(cfg, resume=resume)
    try:
        trainer = StandardTrainer(cfg, run, resume=resume, data=StandardData(train, holdout, None),
                                  progress=progress)
        model = trainer.fit().eval()
        train_seconds = time.perf_counter() - start
        result = evaluate(cfg, model, stores, run, progress=progress)
        summary = {"run": str(run.path), "recipe": cfg.recipe, "train_seconds": round(train_seconds, 1),
                   "pretrain_classes": train.num_classes, **result.as_dict()}
        run.write_report(render_rfs_report(cfg, summary))
        return summary
    finally:
        run.close()


def render_rfs_report(cfg: ExperimentConfig, summary: dict[str, Any]) -> str:
    from metarobust.experiment import fewshot_metric_rows

    at, m, a = cfg.at, cfg.meta, cfg.attack
    pretrain = "clean images" if cfg.recipe == "rfs" else (
        f"PGD-AT ({cfg.train_attack.name}-{cfg.train_attack.steps}, eps {cfg.train_attack.eps:.4f})")
    return "\n".join([
        f"# {cfg.name}: {cfg.recipe} on {cfg.data.dataset}",
        "",
        f"- pre-training: {summary['pretrain_classes']}-way classifier on {pretrain}; SGD lr {at.lr}, "
        f"momentum {at.momentum}, weight decay {at.weight_decay}, batch {at.batch_size}, {at.epochs} epochs "
        f"({at.schedule}, milestones {list(at.milestones)})",
        f"- evaluation: {m.ways}-way {m.test_shots}-shot, {m.queries} queries; logistic regression (C = 1) on "
        f"L2-normalised {cfg.model.name} features per episode",
        f"- evaluation attack: {a.name}-{a.steps} eps {a.eps:.4f} step {a.step_size:.4f}, through features "
        f"and the fitted head",
        "",
        *fewshot_metric_rows(summary),
        "",
    ])


__all__ = ["KIND", "RFS", "RFSAdversarial", "render_rfs_report", "train_and_evaluate_rfs"]
