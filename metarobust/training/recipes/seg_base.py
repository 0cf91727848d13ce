"""What the few-shot segmentation recipes share: the ``seg`` config section and
:class:`SegRecipe`, the recipe family that trains a prototype segmenter on 1-way K-shot episodes
with masks (``docs/segmentation.md``).

A segmentation recipe is a recipe of the one trainer: its sampler draws
:class:`~metarobust.data.seg_episodes.SegEpisodeBatch`\\ es on the device (setting 2: the test
organ never a training foreground), :meth:`SegRecipe.build_model` builds the segmenter (encoder,
optional ODE block, PANet head) from the ``seg`` section, and a subclass writes :meth:`loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from metarobust.config import ExperimentConfig, ModelConfig, OptimConfig, check_value, config_section
from metarobust.data.seg_episodes import SegEpisodeBatch, SegEpisodeSampler, training_organs
from metarobust.data.seg_volumes import CHAOS_ORGANS, Volumes
from metarobust.errors import ConfigError
from metarobust.segmentation.attacks import SEG_ATTACKS, TARGETS
from metarobust.segmentation.network import FewShotSegmenter, build_segmenter, pixel_ce
from metarobust.segmentation.ode import SOLVERS
from metarobust.training.recipes.base import Recipe, Stats

SEG_DATASETS = ("chaos_t2", "nifti", "synthetic_organs")
SEG_MODELS = ("seg_light", "seg_vgg16")


@config_section("seg")
@dataclass
class SegConfig:
    """Few-shot organ segmentation (defaults: PNODE's paper settings, ``META.md`` 4)."""

    dataset: str = "synthetic_organs"
    """``chaos_t2`` (the staged slice tar/folder), ``nifti`` (images/ + labels/), or the embedded
    ``synthetic_organs``."""
    root: str | None = None
    """The tar or folder of ``chaos_t2`` / ``nifti``."""
    modality: str = "ct"
    """``nifti`` intensity normalisation: ``ct`` ((HU + 1024) / 4096) or ``mri`` (percentile clip)."""
    organ: str = "liver"
    """The test organ (held out of training: setting 2)."""
    shots: int = 1
    """K support volumes (1 or 3 in the papers), at training and test."""
    tasks: int = 5
    """Episodes per training batch (the reference: 5)."""
    image_size: int = 256
    augment: bool = True
    """Joint rot90 + flips per training episode."""
    reverse: bool = True
    """Reverse every volume's slice order with p = 0.5 at training."""
    synthetic_volumes: int = 12
    ode_layers: int = 3
    ode_time: float = 4.0
    ode_solver: str = "dopri5"
    ode_tol: float = 1e-3
    """dopri5 rtol = atol."""
    ode_steps: int = 4
    """Fixed-step solvers (rk4, euler): steps over [0, ode_time]."""
    pretrained: str | None = None
    """A torchvision vgg16 state dict (.pth) for ``seg_vgg16`` (none can be downloaded here)."""
    align_weight: float = 1.0
    """PANet's prototype-alignment loss weight."""
    noise: str = "multiplicative"
    """R-PNODE's Gaussian views: ``multiplicative`` (x + x eps) or ``additive`` (x + eps)."""
    noise_std: float = 0.1
    cluster_weight: float = 1.0
    """R-PNODE's cluster loss weight (META.md 4.3)."""
    consistency_weight: float = 1.0
    """R-PNODE's consistency loss weight (a reconstruction: META.md 4.3)."""
    at_eps: float = 0.04
    """AT-PANet's FGSM radius."""
    attacks: list[str] = field(default_factory=lambda: ["fgsm", "pgd"])
    """Evaluation attacks (``fgsm pgd bim smia cw dag apgd_ce square ensemble``)."""
    eps: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.035])
    attack_targets: list[str] = field(default_factory=lambda: ["query"])
    clip: bool = True
    """Clip adversarial images to [0, 1]; false: the reference's unclipped attacks."""
    apgd_steps: int = 100
    """APGD-CE's iterations (``apgd_ce`` and in the ``ensemble``; AutoAttack's 100)."""
    square_queries: int = 1000
    """Square's queries per episode (``square`` and in the ``ensemble``)."""
    attack_solver: str | None = None
    """Attack PNODE through another solver (``rk4``: no step-size controller); scored with the
    trained solver. ``null``: the trained one."""
    eval_batch: int = 16
    """Query slices per evaluation forward."""
    overlays: int = 3
    """Query slices drawn in the overlay PNG per test volume set."""

    def check(self) -> None:
        check_value(self.dataset in SEG_DATASETS, "seg.dataset", self.dataset, f"one of {list(SEG_DATASETS)}")
        check_value(self.modality in ("ct", "mri"), "seg.modality", self.modality, "ct or mri")
        check_value(self.shots >= 1, "seg.shots", self.shots, "an integer >= 1")
        check_value(self.tasks >= 1, "seg.tasks", self.tasks, "an integer >= 1")
        check_value(self.image_size >= 16, "seg.image_size", self.image_size, "an integer >= 16")
        check_value(self.ode_solver in SOLVERS, "seg.ode_solver", self.ode_solver, f"one of {list(SOLVERS)}")
        check_value(self.attack_solver in (None, *SOLVERS), "seg.attack_solver", self.attack_solver,
                    f"null or one of {list(SOLVERS)}")
        check_value(self.ode_time > 0, "seg.ode_time", self.ode_time, "a time > 0")
        check_value(self.noise in ("multiplicative", "additive"), "seg.noise", self.noise,
                    "multiplicative or additive")
        for name in ("align_weight", "noise_std", "cluster_weight", "consistency_weight", "at_eps"):
            check_value(getattr(self, name) >= 0, f"seg.{name}", getattr(self, name), "a number >= 0")
        for name in ("apgd_steps", "square_queries"):
            check_value(getattr(self, name) >= 1, f"seg.{name}", getattr(self, name), "an integer >= 1")
        for a in self.attacks:
            check_value(a in SEG_ATTACKS, "seg.attacks", a, f"names from {list(SEG_ATTACKS)}")
        for t in self.attack_targets:
            check_value(t in TARGETS, "seg.attack_targets", t, f"names from {list(TARGETS)}")
        for e in self.eps:
            check_value(e >= 0, "seg.eps", e, "radii >= 0")


class SegRecipe(Recipe):
    """Base of the segmentation recipes: episodes with masks, a :class:`FewShotSegmenter`, SGD
    (PNODE: lr 1e-3, momentum 0.9, weight decay 5e-4, x0.1 at 10k and 20k of 50k iterations)."""

    episodic: ClassVar[bool] = True
    evaluation: ClassVar[str] = "segmentation"
    attack_bn: ClassVar[str] = "train"  # the segmenters have no BatchNorm
    ode: ClassVar[bool] = False
    """Whether the segmenter has PNODE's ODE block."""

    @classmethod
    def config_check(cls, cfg: ExperimentConfig) -> None:
        check_value(cfg.model.name in SEG_MODELS, "model.name", cfg.model.name,
                    f"one of {list(SEG_MODELS)} for the segmentation recipe {cls.name!r}")
        if cfg.at.amp != "none" or cfg.at.compile == "on":
            raise ConfigError(f"at.amp={cfg.at.amp} / at.compile={cfg.at.compile}: the segmentation recipes run "
                              f"in float32 without compile (torchdiffeq's solvers); set at.amp=none and "
                              f"at.compile=auto or off (auto keeps them eager)")
        training_organs(CHAOS_ORGANS, cfg.seg.organ)  # a known organ name

    def build_model(self, arch: ModelConfig, in_channels: int, outputs: int, image_size: int,
                    dataset: str | None = None) -> nn.Module:
        s = self.cfg.seg
        return build_segmenter(arch.name, arch.hidden, self.ode, s.ode_layers, s.ode_time, s.ode_solver, s.ode_tol,
                               s.ode_steps, s.pretrained)

    def head_size(self, train: Volumes) -> int:
        return 2

    def sampler(self, train: Volumes, rank: int, world_size: int) -> SegEpisodeSampler:
        s = self.cfg.seg
        if world_size > 1:
            raise ConfigError("the segmentation recipes run in one process (no torchrun yet)")
        return SegEpisodeSampler(train, training_organs(train.organs, s.organ), s.shots, s.tasks, seed=self.cfg.seed,
                                 augment=s.augment, reverse=s.reverse)

    def schedule(self, train: Volumes, world_size: int) -> tuple[int, int]:
        return self.cfg.train.iterations, 1

    @classmethod
    def epochs(cls, cfg: ExperimentConfig) -> int:
        return cfg.train.iterations

    @classmethod
    def default_optim(cls, cfg: ExperimentConfig | None = None) -> OptimConfig:
        return OptimConfig(name="sgd", lr=1e-3, momentum=0.9, weight_decay=5e-4, schedule="piecewise",
                           milestones=[10000.0, 20000.0])

    def segment(self, model: FewShotSegmenter, batch: SegEpisodeBatch, support_x=None, query_x=None):
        """The episode outputs (:meth:`FewShotSegmenter.episode`), with replaced inputs if given."""
        sx = batch.support_x if support_x is None else support_x
        qx = batch.query_x if query_x is None else query_x
        return model.episode(sx, batch.support_mask, qx)

    @staticmethod
    def stats(out: dict[str, torch.Tensor], batch: SegEpisodeBatch, model: FewShotSegmenter) -> Stats:
        from metarobust.segmentation.attacks import episode_dice

        with torch.no_grad():
            d = episode_dice(out["logits"], batch.query_mask).mean()
        return {"dice": d, "nfe": torch.tensor(float(model.nfe))}

    def ce(self, out: dict[str, torch.Tensor], batch: SegEpisodeBatch) -> torch.Tensor:
        return pixel_ce(out["logits"], batch.query_mask)


__all__ = ["SEG_DATASETS", "SEG_MODELS", "SegConfig", "SegRecipe"]
