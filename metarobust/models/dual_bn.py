"""Dual BatchNorm: a main and an auxiliary BN per layer, routed per forward pass (AdvProp).

Xie et al., *Adversarial Examples Improve Image Recognition* (AdvProp, CVPR 2020): adversarial
examples come from another distribution than clean images, so they get their own BatchNorm.
Every BN layer becomes a pair, **main** and **auxiliary**, each with its own affine parameters
and running statistics; convolution and linear weights stay shared. Three routes
(``shared/methods/ADVERSARIAL_TRAINING.md`` section 4.5):

- ``main``: clean images, and always at test time (the default; the aux BNs are discarded for
  deployment by :func:`strip_aux_bn`);
- ``aux``: adversarial images (AdvProp generates them on the aux-routed network);
- ``mix``: a concatenated ``[x_clean; x_adv]`` batch, the first ``split`` images through the main
  BNs and the rest through the auxiliary ones (AdvProp's training step).

The route lives only inside the :func:`bn_route` context, which restores the previous one on
exit, so robustness is never measured through the aux BNs by accident. MAT-style routing of
peers' adversarial examples uses the same wrapper.

Example:
    >>> model = convert_dual_bn(build_model(ModelConfig(name="resnet18"), 3, 10, 32))
    >>> with bn_route(model, "aux"):
    ...     x_adv = attack(model, x, y)          # attacked through the auxiliary BNs
    >>> with bn_route(model, "mix"):
    ...     logits = model(torch.cat([x, x_adv]))  # clean half: main BNs; adversarial half: aux
    >>> model.eval(); model(x_test)                # main BNs
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from metarobust.models.layers import TaskBatchNorm2d

ROUTES = ("main", "aux", "mix")
BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, TaskBatchNorm2d)
"""Layers :func:`convert_dual_bn` doubles: every torch BatchNorm (1d/2d/3d, SyncBatchNorm) and
the project's :class:`~metarobust.models.layers.TaskBatchNorm2d`."""


class DualBatchNorm(nn.Module):
    """A main and an auxiliary copy of one BatchNorm layer; :attr:`route` picks which one runs.

    Args:
        bn: the layer to double; it becomes :attr:`main` and a deep copy of it :attr:`aux`
            (same affine parameters and running statistics to start with).

    Shapes: as the wrapped layer (``[B, C, H, W] -> [B, C, H, W]`` for 2-d BN).
    """

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.main = bn
        self.aux = copy.deepcopy(bn)
        self.route = "main"
        self.split: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route == "main":
            return self.main(x)
        if self.route == "aux":
            return self.aux(x)
        n = self.split if self.split is not None else x.shape[0] // 2
        if self.split is None and x.shape[0] % 2:
            raise ValueError(f"bn_route 'mix' got an odd batch of {x.shape[0]} images; concatenate "
                             f"clean and adversarial halves of equal size, or pass split=<clean count>")
        return torch.cat([self.main(x[:n]), self.aux(x[n:])])

    def extra_repr(self) -> str:
        return f"route={self.route!r}"


def convert_dual_bn(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm of ``model`` (in place) by a :class:`DualBatchNorm`; return it.

    Convert after loading a checkpoint to start both BNs from its statistics (Hou et al.'s
    init-from-checkpoint with an auxiliary BN). Parameter names gain ``.main`` / ``.aux``
    (``layer1.0.bn1.weight`` -> ``layer1.0.bn1.main.weight``); build the optimizer afterwards.
    """
    for name, child in model.named_children():
        if isinstance(child, DualBatchNorm):
            continue
        if isinstance(child, BATCH_NORMS):
            setattr(model, name, DualBatchNorm(child))
        else:
            convert_dual_bn(child)
    return model


def strip_aux_bn(model: nn.Module) -> nn.Module:
    """Replace every :class:`DualBatchNorm` by its main BN (in place): the deployed model."""
    for name, child in model.named_children():
        if isinstance(child, DualBatchNorm):
            setattr(model, name, child.main)
        else:
            strip_aux_bn(child)
    return model


def dual_bn_layers(model: nn.Module) -> list[DualBatchNorm]:
    """Every :class:`DualBatchNorm` of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, DualBatchNorm)]


@contextmanager
def bn_route(model: nn.Module, route: str, split: int | None = None) -> Iterator[nn.Module]:
    """Route every dual BN of ``model`` to ``route`` inside the ``with`` block.

    Args:
        model: a model passed through :func:`convert_dual_bn`.
        route: ``main``, ``aux`` or ``mix``.
        split: ``mix`` only: how many leading images go through the main BNs (default: half).

    Raises:
        ValueError: unknown route, or a model without dual BNs (routing it would silently do
            nothing).
    """
    if route not in ROUTES:
        raise ValueError(f"bn_route: route={route!r} is invalid; expected one of {list(ROUTES)}")
    layers = dual_bn_layers(model)
    if not layers:
        raise ValueError("bn_route: the model has no dual BatchNorm layers; wrap it with "
                         "convert_dual_bn(model) first")
    previous = [(layer.route, layer.split) for layer in layers]
    for layer in layers:
        layer.route, layer.split = route, split
    try:
        yield model
    finally:
        for layer, (r, s) in zip(layers, previous):
            layer.route, layer.split = r, s
