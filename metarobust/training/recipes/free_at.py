"""Free adversarial training (Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor &
Goldstein, "Adversarial Training for Free!", NeurIPS 2019, arXiv 1904.12843; TF code
``ashafahi/free_adv_train``, PyTorch port in ``locuslab/fast_adversarial``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from metarobust.attacks import threat
from metarobust.data.episode import EpisodeBatch
from metarobust.training.objectives import accuracy
from metarobust.training.recipes.base import Models, Recipe, Stats, StepContext, register_recipe


@register_recipe("free_at", "Free AT (Shafahi et al. 2019): each batch replayed m=8 times, one backward "
                              "updates weights and a persistent perturbation")
class FreeAT(Recipe):
    """Replay every mini-batch ``m = at.replays`` times; each replay does one forward/backward on
    ``x + delta`` and uses it twice: an SGD step on the weights and
    ``delta <- clip_eps(delta + step * sign(grad_x CE))`` then the image box, with
    ``step = train_attack.step_size`` (= eps in the paper). ``delta`` starts at 0 and persists
    across mini-batches (checkpointed).

    The learning-rate schedule counts replays (the engine steps it per optimizer step) and
    ``at.epochs`` counts passes over the data, so set it to the natural-training epochs divided
    by m (the PyTorch port: 10 epochs x 8 replays, cyclic lr to 0.04, PreAct-ResNet-18).
    BatchNorm stays in train mode throughout (one forward serves the attack and the update).

    Deviation: the input ``x + delta`` is clipped to [0, 1] before the forward; the reference
    code clips ``delta`` against the *previous* batch's images, so its first replay of a new batch
    can leave the image box.

    Example:
        >>> cfg = load_config("configs/at/cifar10_free_at.yaml", ["at.replays=4"])
        >>> model = Trainer(cfg).fit()
    """

    attack_bn = "train"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.delta: torch.Tensor | None = None
        self._input: torch.Tensor | None = None

    @property
    def replays(self) -> int:
        return self.at.replays

    def loss(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        if self.delta is None or self.delta.shape != batch.x.shape:
            self.delta = torch.zeros_like(batch.x)
        self._input = (batch.x + self.delta).clamp(0, 1).requires_grad_(True)
        logits = models["model"](self._input)
        return F.cross_entropy(logits, batch.y), {"adv_acc": accuracy(logits, batch.y)}

    def after_backward(self, models: Models, batch: EpisodeBatch, ctx: StepContext) -> None:
        a = self.cfg.train_attack
        # The gradient may be scaled (fp16 GradScaler), even overflow: only its direction is
        # used, and a non-finite entry must not poison the persistent perturbation.
        grad = torch.nan_to_num(self._input.grad, nan=0.0)
        moved = self.delta + a.step_size * threat.step_direction(grad, a.norm)
        self.delta = threat.project(moved, batch.x, a.norm, a.eps).detach()
        self._input = None

    def state_dict(self) -> dict[str, Any]:
        return {} if self.delta is None else {"delta": self.delta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delta = state.get("delta")
