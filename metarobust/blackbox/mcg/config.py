"""MCG's settings, with the paper's (released code's) values as defaults (META.md 3.2-3.5).

Tags in the comments follow META.md: [C] read from the released code, [?] not verified (our
reconstruction), [ours] a choice of ours where the reference is silent or buggy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from metarobust.errors import ConfigError

BOUNDS = ("tanh", "clamp")
SURROGATE_LOSSES = ("prob_mse", "kl")


@dataclass(frozen=True)
class GeneratorConfig:
    """The conditional generator ``p(delta | x)`` (META.md 3.2).

    - shape: ``(C, H, W)`` of the images (and of ``delta``).
    - norm, eps: the threat model the generator's output is bounded to (``"linf"`` or ``"l2"``);
      the same bounding is used in pre-training, meta-training and at attack time [ours: the
      released code rescales by the max-abs value when meta-training but clamps the raw output
      at attack time, META.md 3.6].
    - bound: ``"tanh"`` (default [ours]): the flow's output ``u`` is squashed smoothly,
      L-inf ``eps * tanh(u)``, L2 ``eps * tanh(|u|) u / |u|``, so fine-tuning gets gradients at
      every coordinate; ``"clamp"``: the paper's attack-time convention, L-inf
      ``eps * clamp(u, -1, 1)``, L2 the projection onto the ball (saturated coordinates get no
      gradient). Either way the point is then clamped to the box [0, 1].
    - levels, steps, hidden, x_hidden_channels, x_hidden_size: c-Glow's ``L``, ``K``, coupling
      width and conditioning widths (paper: 3, 8, 256, 64, 128) [C].
    - subspace: ``None`` (CIFAR: the flow models ``delta`` itself) or the side ``s`` of the
      low-frequency DCT block the flow models, ``delta`` being its zero-padded inverse DCT
      (ImageNet: 32) [C].
    - squash_margin: ``tanh`` targets are clipped to ``1 - margin`` of the bound before
      ``atanh`` when a perturbation is encoded (a transfer perturbation sits exactly at
      ``+-eps``) [ours].
    """

    shape: tuple[int, int, int] = (3, 32, 32)
    norm: str = "linf"
    eps: float = 8 / 255
    bound: str = "tanh"
    levels: int = 3
    steps: int = 8
    hidden: int = 256
    x_hidden_channels: int = 64
    x_hidden_size: int = 128
    subspace: int | None = None
    squash_margin: float = 1e-3

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l2"):
            raise ConfigError(f"mcg generator norm={self.norm!r}; choose 'linf' or 'l2'")
        if self.bound not in BOUNDS:
            raise ConfigError(f"mcg generator bound={self.bound!r}; choose one of {list(BOUNDS)}")
        if self.eps <= 0:
            raise ConfigError(f"mcg generator eps={self.eps} must be > 0")
        if self.subspace is not None and not 0 < self.subspace <= min(self.shape[1:]):
            raise ConfigError(f"mcg generator subspace={self.subspace}; expected 1..{min(self.shape[1:])} "
                              f"(the image is {self.shape[1:]}) or null")
        if any(side % 2 ** self.levels for side in self.flow_shape[1:]):
            raise ConfigError(f"mcg generator: the flow's shape {self.flow_shape} (image {self.shape}, "
                              f"subspace {self.subspace}) needs sides divisible by 2**levels = {2 ** self.levels}")

    @property
    def flow_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of what the flow models: the image's, or the DCT block's ``(C, s, s)``."""
        c, h, w = self.shape
        return (c, h, w) if self.subspace is None else (c, self.subspace, self.subspace)


@dataclass(frozen=True)
class MCGConfig:
    """How MCG trains its generator and proposes a first query (META.md 3.3-3.5).

    Stage 1, maximum-likelihood pre-training on transfer perturbations [C]:
    ``transfer_steps`` MI-FGSM iterations (momentum ``transfer_decay``) on the surrogate, kept
    only where the surrogate is correct with confidence in ``confidence`` (``(low, high]``);
    Adam ``pretrain_lr``, batch ``pretrain_batch``, ``pretrain_epochs``, gradient-norm clip
    ``pretrain_clip``; ``pretrain_noise`` Gaussian noise added to the encoded targets in the
    flow's space, which keeps the likelihood bounded where MI-FGSM's outputs pile up on the
    corners [ours].

    Stage 2, Reptile meta-training on the surrogates' margin loss [C]: ``inner_steps`` Adam
    steps (``inner_lr``, a fresh optimiser per task) on ``max(z_y - max_{j!=y} z_j, -kappa)``,
    then ``theta <- theta + beta (theta_task - theta)`` done on the weights (the released code's
    is a no-op, META.md 3.6) with ``beta = outer_lr`` or, with ``outer_lr_scaled``, the released
    ``outer_lr * 2 / (meta_batch * inner_steps)``; ``meta_epochs`` over batches of
    ``meta_batch``; ``one_surrogate_per_task`` draws one surrogate per task instead of
    averaging the loss over all of them [ours].

    Attack time, per benign image (META.md 3.4; the switches of 3.5, whose defaults are [?]):

    - finetune_clean: refresh the surrogate first on images whose target answers are known
      (``surrogate_steps`` steps of ``surrogate_loss``, scaled by ``surrogate_loss_scale``,
      gradient clip ``surrogate_clip``, Adam ``surrogate_lr`` [?], batches of ``surrogate_batch``).
      ``surrogate_loss``: ``"prob_mse"`` (the released code: MSE between surrogate and target
      probabilities of the true class) or ``"kl"`` (KL from the target's scores to the
      surrogate's, the paper's figure calls it L^CE).
    - finetune_perturbation: add the lifelong term on past attacks' images with weight
      ``lambda`` starting at ``lifelong_lambda`` and, after ``lifelong_warmup`` updates, moving
      as ``lambda <- m lambda + (1 - m) s_loss / d_loss`` (``m = lifelong_momentum``); used once
      the history holds more than ``surrogate_batch`` past attacks.
    - finetune_glow: ``glow_steps`` Adam steps (``glow_lr``) of the generator on the surrogate's
      margin loss with the latent fixed, then ``phi <- phi_0 + glow_interpolation (phi' - phi_0)``.
    - finetune_latent: ``latent_steps`` Adam steps (``latent_lr``) on the latent, stopping once
      the loss is below ``latent_stop``.
    - finetune_reload: restore the generator's weights after each image (else the fine-tuned
      weights carry over to the next one).
    - test_fasr: stop after the first query: the runner runs the proposal alone (one row
      ``mcg``, one query per point) instead of seeding the attacks.
    - per_example: each image is its own task, fine-tuned on alone (the paper); ``False``
      fine-tunes one copy on the whole batch (cheaper).
    - temperature: of the latent drawn before encoding [ours: 1].
    - square_p_init, square_schedule_offset: Square seeded by the proposal starts its squares at
      ``p_init = 0.3`` with ``p``'s schedule shifted by 500 iterations (the released code's
      hand-over, META.md 3.4 step 5); ``null`` keeps the attack's own value (the plain run's).
    """

    # stage 1
    transfer_steps: int = 30
    transfer_decay: float = 1.0
    confidence: tuple[float, float] = (0.5, 1.0)
    pretrain_lr: float = 1e-3
    pretrain_batch: int = 16
    pretrain_epochs: int = 40
    pretrain_clip: float = 10.0
    pretrain_noise: float = 0.05
    # stage 2
    meta_epochs: int = 5
    meta_batch: int = 16
    inner_steps: int = 5
    inner_lr: float = 4e-4
    outer_lr: float = 0.01
    outer_lr_scaled: bool = True
    kappa: float = 5.0
    one_surrogate_per_task: bool = False
    # attack time
    finetune_clean: bool = True
    finetune_perturbation: bool = True
    finetune_glow: bool = True
    finetune_latent: bool = False
    finetune_reload: bool = True
    test_fasr: bool = False
    per_example: bool = True
    glow_steps: int = 2
    glow_lr: float = 1e-3
    glow_interpolation: float = 0.2
    latent_steps: int = 10
    latent_lr: float = 0.01
    latent_stop: float = -1.0
    surrogate_loss: str = "prob_mse"
    surrogate_steps: int = 1
    surrogate_lr: float = 1e-3
    surrogate_loss_scale: float = 0.05
    surrogate_clip: float = 0.1
    surrogate_batch: int = 20
    lifelong_lambda: float = 3.0
    lifelong_warmup: int = 50
    lifelong_momentum: float = 0.9
    temperature: float = 1.0
    square_p_init: float | None = 0.3
    square_schedule_offset: int | None = 500

    def __post_init__(self) -> None:
        if self.surrogate_loss not in SURROGATE_LOSSES:
            raise ConfigError(f"mcg surrogate_loss={self.surrogate_loss!r}; choose one of {list(SURROGATE_LOSSES)}")
        for name in ("transfer_steps", "pretrain_batch", "meta_batch", "surrogate_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mcg {name}={getattr(self, name)} must be >= 1")
        for name in ("pretrain_epochs", "meta_epochs", "inner_steps", "glow_steps", "latent_steps",
                     "surrogate_steps", "square_schedule_offset"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"mcg {name}={getattr(self, name)} must be >= 0")
        if self.square_p_init is not None and not 0 < self.square_p_init <= 1:
            raise ConfigError(f"mcg square_p_init={self.square_p_init} must lie in (0, 1] (or null)")

    @property
    def outer_step(self) -> float:
        """Reptile's interpolation weight ``beta``."""
        if self.outer_lr_scaled:
            return self.outer_lr * 2 / (self.meta_batch * max(self.inner_steps, 1))
        return self.outer_lr


def known_fields(kind: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` (a config file's section) checked to hold only fields of the dataclass ``kind``
    (an unknown one names the accepted ones); lists become tuples where ``kind`` holds tuples
    (``confidence``, ``shape``)."""
    known = {f.name: f for f in fields(kind)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; {kind.__name__} takes {list(known)}")
    return {k: tuple(v) if isinstance(v, list) and "tuple" in str(known[k].type) else v for k, v in values.items()}


__all__ = ["BOUNDS", "SURROGATE_LOSSES", "GeneratorConfig", "MCGConfig", "known_fields"]
