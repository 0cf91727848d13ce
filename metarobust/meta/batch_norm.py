"""BatchNorm in a user's model, made fit for the functional inner loop.

torch's ``nn.BatchNorm2d`` in train mode updates its running statistics in place, which
``torch.func.grad`` and ``vmap`` (MAML's inner loop) refuse with a raw functorch error. Two fixes:

- :func:`convert_batch_norm`: replace every ``nn.BatchNorm2d`` by
  :class:`~metarobust.models.layers.TaskBatchNorm2d`, batch statistics at training and test time
  alike (MAML's transductive convention, what ``model.batch_norm=batch`` builds for Conv-4 and
  ResNet-12), keeping the affine weights;
- ``model.eval()``: BatchNorm then uses its frozen running statistics.

:func:`running_batch_norms` finds the layers in the way; :func:`~metarobust.meta.functional.functional_forward`
raises :class:`~metarobust.errors.ConfigError` naming them and both fixes when one is met inside a
``torch.func`` transform.

Example:
    >>> model = convert_batch_norm(nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), ...))
    >>> maml = MAML(functional_forward(model), inner_lr=0.01, inner_steps=5)
"""

from __future__ import annotations

import torch
from torch import nn

from metarobust.errors import ConfigError
from metarobust.models.layers import TaskBatchNorm2d


def running_batch_norms(model: nn.Module, training_only: bool = True) -> list[str]:
    """Names of ``model``'s torch BatchNorm layers that track running statistics (those in train
    mode only, by default: the ones a ``torch.func`` transform cannot run)."""
    return [name or type(model).__name__ for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and (m.training or not training_only)]


def batch_norm_error(layers: list[str]) -> ConfigError:
    """The error for BatchNorm layers ``layers`` met in train mode inside MAML's inner loop."""
    shown = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
    return ConfigError(
        f"the model has torch BatchNorm layers in train mode ({shown}): they update their running "
        f"statistics in place, which the functional inner loop (torch.func.grad / vmap) cannot do. "
        f"Convert them to MAML's batch-statistics BatchNorm with "
        f"model = metarobust.meta.convert_batch_norm(model), or call model.eval() to adapt with "
        f"frozen running statistics")


def convert_batch_norm(model: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` of ``model`` (in place; returned too) by
    :class:`~metarobust.models.layers.TaskBatchNorm2d`: normalised by the statistics of the batch
    at hand in train and eval mode alike, so it runs under ``torch.func`` and MAML adapts it.

    The affine weight and bias are copied (a layer without them gets frozen ones and zeros, so it
    still has nothing to learn) and ``eps`` is kept; running statistics are dropped. In train mode
    the converted layer computes what the original computes (same batch statistics, biased
    variance). A model with ``BatchNorm1d``/``BatchNorm3d`` gets a :class:`ConfigError`
    naming them (task batch norm is 2-D here), and so does a model that is itself a BatchNorm.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
        >>> model = convert_batch_norm(model)
        >>> type(model[1]).__name__
        'TaskBatchNorm2d'
    """
    others = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.BatchNorm2d)]
    if others or isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise ConfigError(f"convert_batch_norm replaces nn.BatchNorm2d layers inside a model; "
                          f"{', '.join(others) or type(model).__name__} cannot be converted: use "
                          f"model.eval() (frozen running statistics) or rebuild the model with "
                          f"metarobust.models.layers.TaskBatchNorm2d")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, _task_batch_norm(child))
    return model


def _task_batch_norm(bn: nn.BatchNorm2d) -> TaskBatchNorm2d:
    task = TaskBatchNorm2d(bn.num_features, eps=bn.eps)
    reference = bn.weight if bn.weight is not None else bn.running_mean
    if reference is not None:
        task = task.to(device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        if bn.affine:
            task.weight.copy_(bn.weight)
            task.bias.copy_(bn.bias)
            task.weight.requires_grad_(bn.weight.requires_grad)
            task.bias.requires_grad_(bn.bias.requires_grad)
        else:
            task.weight.requires_grad_(False)
            task.bias.requires_grad_(False)
    return task.train(bn.training)


__all__ = ["batch_norm_error", "convert_batch_norm", "running_batch_norms"]
