"""The reference AutoAttack (``pyautoattack``, the code of Croce & Hein) behind our calling convention.

For users who want the reference's number next to ours (``eval.suite=autoattack_reference``): the
reference's standard version runs on a group of points, and its adversarial points go through the
harness's cascade like any of our attacks. ``pyautoattack`` is an optional dependency
(``pip install pyautoattack``).

The reference slices out the points still robust before each attack and restart, so it only
suits models that score each input on its own: it refuses to run under ``torch.func.vmap``, and
the harness refuses it for coupled groups (transductive batch norm).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from metarobust.attacks.pgd import inside_func_transform
from metarobust.attacks.registry import ATTACKS
from metarobust.config import AttackConfig
from metarobust.errors import ConfigError

Forward = Callable[[torch.Tensor], torch.Tensor]
REFERENCE_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}


def import_reference():
    """The ``pyautoattack`` package, or an error that says how to install it."""
    try:
        import pyautoattack
    except ImportError as error:
        raise ImportError("eval.suite=autoattack_reference (attack autoattack_reference) runs the reference "
                          "AutoAttack code, an optional dependency: pip install pyautoattack "
                          "(tested with pyautoattack==0.2.0)") from error
    return pyautoattack


class _Module(nn.Module):
    """A forward function as the ``nn.Module`` the reference expects."""

    def __init__(self, forward: Forward) -> None:
        super().__init__()
        self.fn = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@dataclass(frozen=True)
class AutoAttackReference:
    r"""The reference AutoAttack, ``pyautoattack.AutoAttack(version='standard')``: APGD-CE,
    APGD-T, FAB-T and Square with the reference's settings per norm, each on the points still
    robust (Croce & Hein, ICML 2020) [https://github.com/fra31/auto-attack].

    Distance Measure : Linf, L2, L1

    Arguments:
        norm (str): ``'linf'``, ``'l2'`` or ``'l1'``.
        eps (float): radius of the ball in [0, 1] pixel units.

    Target classes of APGD-T and FAB-T are capped at ``N - 1`` for ``N`` classes (the reference
    would index past its classes and fail), and APGD-T is left out below 4 classes (its targeted
    DLR loss needs the 4 largest logits), as our ``autoattack`` suite does.

    Shape (call): ``attack(forward, x, y, noise=noise) -> x_adv``; ``noise`` from
    :meth:`init_noise` holds the reference's seed (drawn from the evaluation's generator), and
    the global RNG the reference reseeds is restored afterwards.

    Examples::
        >>> attack = AutoAttackReference("linf", 8 / 255)
        >>> x_adv = attack(model, x, y, noise=attack.init_noise(x, generator))
    """

    norm: str
    eps: float

    def __post_init__(self) -> None:
        if self.norm not in REFERENCE_NORMS:
            raise ConfigError(f"attack.norm={self.norm!r}; the reference AutoAttack supports {', '.join(REFERENCE_NORMS)}")
        if self.eps < 0:
            raise ConfigError(f"attack.eps={self.eps} must be >= 0")

    def init_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Seeds, one per example (``x.shape[:-3]``); the call seeds the reference with the first."""
        return torch.randint(0, 2 ** 31 - 1, tuple(x.shape[:-3]), generator=generator, device=x.device)

    def __call__(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, loss: None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        if loss is not None:
            raise ValueError("the reference AutoAttack takes no loss")
        if inside_func_transform():
            raise RuntimeError("the reference AutoAttack slices its batch and cannot run under torch.func.vmap; "
                               "set meta.execution=loop")
        reference = import_reference()
        x = x.detach()
        seed = int(noise.flatten()[0]) if noise is not None and noise.numel() else 0
        model = _Module(forward)
        with torch.no_grad():
            num_classes = forward(x).shape[-1]
        devices = [x.device] if x.device.type == "cuda" else []
        logger = logging.getLogger("auto-attack")
        level = logger.level
        logger.setLevel(max(level, logging.WARNING))  # its per-attack log is debug chatter here
        try:
            with torch.random.fork_rng(devices=devices):
                aa = reference.AutoAttack(model, norm=REFERENCE_NORMS[self.norm], eps=self.eps, seed=seed,
                                          version="standard", device=x.device)
                aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, num_classes - 1)
                aa.fab.n_target_classes = min(aa.fab.n_target_classes, num_classes - 1)
                if num_classes < 4:
                    aa.attacks_to_run = [a for a in aa.attacks_to_run if a != "apgd-t"]
                x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=len(x))
        finally:
            logger.setLevel(level)
        return x_adv.to(x.dtype)


@ATTACKS.register("autoattack_reference", "the reference AutoAttack (pyautoattack, standard version: APGD-CE, "
                                          "APGD-T, FAB-T, Square) in attack.norm at attack.eps; optional dependency")
def _autoattack_reference(cfg: AttackConfig) -> AutoAttackReference:
    return AutoAttackReference(cfg.norm, cfg.eps)


__all__ = ["AutoAttackReference", "import_reference"]
