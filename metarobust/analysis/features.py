"""Features of any named layer, taken with forward hooks.

Works on a plain ``nn.Module`` and on MAML fast weights alike: pass ``forward`` that runs the
module with other parameters (``bind(functional_forward(model), fast)``,
:mod:`metarobust.meta.functional`). ``torch.func.functional_call`` calls the module's own
submodules, so hooks registered on them fire with the fast weights in place.

Layer names are those of ``model.named_modules()`` (``"encoder.0"`` is Conv-4's first block),
plus ``"penultimate"``: the input of the classification head (the flattened features the
classifier sees).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from metarobust.errors import ConfigError

PENULTIMATE = "penultimate"
_ENCODER_ATTRS = ("encoder", "backbone", "blocks", "layers")


def head_module(model: nn.Module) -> tuple[str, nn.Module]:
    """``(name, module)`` of the classification head: ``model.head`` if there is one, else the
    last ``nn.Linear`` in ``named_modules()`` order."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        return "head", head
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no 'head' and no nn.Linear, so it has no "
                          f"'penultimate' layer; name the layers explicitly (analysis.layers)")
    return linears[-1]


def block_names(model: nn.Module) -> list[str]:
    """The blocks of the model's encoder: the children of ``model.encoder`` (or ``backbone``,
    ``blocks``, ``layers``) when it is a ``Sequential``/``ModuleList``; else the stages of a
    ResNet (children named ``layer<i>``, ``block<i>``, ``stage<i>``); else the model's children
    with parameters other than the head."""
    for attr in _ENCODER_ATTRS:
        container = getattr(model, attr, None)
        if isinstance(container, (nn.Sequential, nn.ModuleList)):
            return [f"{attr}.{name}" for name, _ in container.named_children()]
    head_name = head_module(model)[0] if any(isinstance(m, nn.Linear) for m in model.modules()) else None
    children = [name for name, child in model.named_children()
                if name != head_name and any(True for _ in child.parameters())]
    # ResNet-style models: the stages (layer1..4, block1..3), not the stem or the final norm
    stages = [name for name in children if re.fullmatch(r"(layer|block|stage)\d+", name)]
    return stages or children


def default_layers(model: nn.Module) -> list[str]:
    """Each encoder block, then ``"penultimate"``. :func:`extract_features` drops a block whose
    output is exactly the penultimate features (Conv-4's last block), so no layer is counted twice."""
    return [*block_names(model), PENULTIMATE]


def check_layers(model: nn.Module, layers: Sequence[str], field: str = "analysis.layers") -> list[str]:
    """Raise :class:`ConfigError` for a name that is not a module of ``model`` (nor ``penultimate``)."""
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    if not layers:
        raise ConfigError(f"{field}=[] names no layer; give module names such as {names[:4]} or "
                          f"'{PENULTIMATE}'")
    for layer in layers:
        if layer == PENULTIMATE:
            head_module(model)
        elif layer not in modules or layer == "":
            close = difflib.get_close_matches(layer, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{field}: {type(model).__name__} has no layer {layer!r}; {hint}give "
                              f"names from model.named_modules() or '{PENULTIMATE}', e.g. "
                              f"{default_layers(model)}")
    return list(layers)


def extract_features(model: nn.Module, x: torch.Tensor, layers: Sequence[str] | None = None,
                     forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Flattened activations of ``layers`` for inputs ``x``, in eval mode, without gradients.

    Args:
        model: the module whose submodules are hooked.
        x: inputs ``[n, C, H, W]`` (whatever ``forward`` takes), on the model's device.
        layers: names from ``model.named_modules()`` or ``"penultimate"`` (the head's input);
            ``None``: :func:`default_layers` (each block and the penultimate features).
        forward: runs the model on a batch, e.g. ``bind(functional_forward(model), fast_weights)``
            after MAML adaptation; default ``model`` itself.
        batch_size: inputs per forward pass; ``None``: all at once. With batch-statistics
            normalisation (MAML's :class:`~metarobust.models.layers.TaskBatchNorm2d`) the
            features depend on the batch, so keep the batch the model is scored on (the whole
            query set of an episode).

    Returns: ``{layer: float32 [n, features]}`` on ``x``'s device, in the order of ``layers``.

    Example:
        >>> model = Conv4(1, 5, 28)
        >>> feats = extract_features(model, torch.rand(75, 1, 28, 28))
        >>> {k: v.shape for k, v in feats.items()}
        {'encoder.0': torch.Size([75, 12544]), 'encoder.1': torch.Size([75, 3136]),
         'encoder.2': torch.Size([75, 576]), 'penultimate': torch.Size([75, 64])}
    """
    automatic = layers is None
    layers = check_layers(model, default_layers(model) if automatic else layers)
    forward = model if forward is None else forward
    modules = dict(model.named_modules())
    store: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = []

    def keep(layer: str, value) -> None:
        value = value[0] if isinstance(value, (tuple, list)) else value
        store[layer].append(value.detach().flatten(1).float())

    for layer in layers:
        if layer == PENULTIMATE:
            handles.append(head_module(model)[1].register_forward_pre_hook(
                lambda _m, args, layer=layer: keep(layer, args[0])))
        else:
            handles.append(modules[layer].register_forward_hook(
                lambda _m, _args, out, layer=layer: keep(layer, out)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            step = x.shape[0] if batch_size is None else batch_size
            for start in range(0, x.shape[0], max(step, 1)):
                forward(x[start : start + step])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    features = {layer: torch.cat(chunks) for layer, chunks in store.items()}
    if automatic and PENULTIMATE in features:
        features = {k: v for k, v in features.items()
                    if k == PENULTIMATE or not (v.shape == features[PENULTIMATE].shape
                                                and torch.equal(v, features[PENULTIMATE]))}
    return features
