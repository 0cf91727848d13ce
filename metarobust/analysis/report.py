"""Intrinsic dimension of clean and adversarial features per layer, from feature units.

The measurement behind ITS-MAML's claim that robust regularisation lowers the intrinsic
dimension of clean features (Duan et al., arXiv 2211.15180; META.md section 1). The paper's
protocol is not public, so this one is a reconstruction [?], following Ansuini et al. (NeurIPS
2019): pool ``points`` distinct inputs, take each layer's flattened activations, estimate the
dimension on ``bootstrap`` random sub-samples of ``fraction`` of the points and report mean and
standard deviation. The adversarial inputs are made by the configured evaluation attack against
the same forward function (for a few-shot learner: the fine-tuned fast weights), on the whole
unit at once as evaluation does (batch-statistics normalisation couples the points of a batch).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from metarobust.analysis.estimators import build_estimators
from metarobust.analysis.features import check_layers, extract_features
from metarobust.analysis.points import PointCloud
from metarobust.analysis.subsample import dimension_with_error
from metarobust.analysis.units import FeatureUnit
from metarobust.config import AttackConfig, IDConfig
from metarobust.errors import DataError

CONDITIONS = ("clean", "adversarial")


@dataclass
class LayerID:
    """One layer's result. ``estimates[condition][estimator]`` holds ``mean`` and ``std`` over
    the sub-samples and ``all`` (the estimate on every point); ``duplicates[condition]`` counts
    feature vectors dropped as exact copies (e.g. all-zero ReLU outputs)."""

    features: int
    points: int
    duplicates: dict[str, int]
    estimates: dict[str, dict[str, dict[str, float]]]


@dataclass
class IDReport:
    """Per-layer intrinsic dimensions; ``as_dict()`` is the ``id.json`` payload."""

    layers: dict[str, LayerID]
    points: int
    bootstrap: int
    fraction: float
    attack: dict
    meta: dict = field(default_factory=dict)

    def estimates(self) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
        """``{layer: {"clean"|"adversarial": {estimator: (mean, std)}}}``."""
        return {layer: {cond: {est: (v["mean"], v["std"]) for est, v in per.items()}
                        for cond, per in r.estimates.items()}
                for layer, r in self.layers.items()}

    def as_dict(self) -> dict:
        """JSON-ready: an undefined std (no sub-samples) is ``None``, not ``NaN``."""
        layers = {k: asdict(v) for k, v in self.layers.items()}
        for layer in layers.values():
            for per in layer["estimates"].values():
                for value in per.values():
                    value["std"] = None if math.isnan(value["std"]) else value["std"]
        return {**self.meta, "points": self.points, "bootstrap": self.bootstrap, "fraction": self.fraction,
                "attack": self.attack, "layers": layers}


def collect_features(units: Iterable[FeatureUnit], model: nn.Module, layers: list[str] | None,
                     attack_cfg: AttackConfig | None, points: int, seed: int = 0,
                     progress: Callable[[Iterable], Iterable] | None = None
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """Features of the first ``points`` distinct images the units reach, clean and adversarial.

    Args:
        units: :class:`FeatureUnit` s (consumed lazily; iteration stops once enough points).
        model: the module whose layers are hooked (the units' forwards run it).
        layers: layer names (``None``: each block and ``penultimate``).
        attack_cfg: the attack making the adversarial inputs (``None``: clean only).
        points: how many distinct images to pool.
        seed: seeds the attack's random start.

    Returns: ``{"clean": {layer: float32 [n, d]}, "adversarial": {...}}`` with the same ``n``
    (``<= points``; fewer if the units run out, with a warning) and the same images in both.
    """
    from metarobust.attacks import build_attack

    if layers is not None:
        check_layers(model, layers)  # a wrong name fails before any episode is adapted
    attack = build_attack(attack_cfg) if attack_cfg is not None else None
    conditions = CONDITIONS if attack is not None else CONDITIONS[:1]
    chunks: dict[str, dict[str, list[torch.Tensor]]] = {c: {} for c in conditions}
    seen: set[int] = set()
    total = 0
    generator = None
    for unit in (progress(units) if progress else units):
        if unit.ids is None:
            keep = torch.arange(len(unit.y), device=unit.x.device)
        else:
            new = []
            for i, image in enumerate(unit.ids.tolist()):
                if image not in seen:
                    seen.add(image)
                    new.append(i)
            keep = torch.tensor(new, dtype=torch.long, device=unit.x.device)
        keep = keep[: points - total]
        if keep.numel() == 0:
            continue
        inputs = {"clean": unit.x}
        if attack is not None:
            if generator is None:
                generator = torch.Generator(device=unit.x.device).manual_seed(seed)
            noise = attack.init_noise(unit.x, generator)
            with torch.no_grad():  # the attack differentiates internally
                inputs["adversarial"] = attack(unit.forward, unit.x, unit.y, noise=noise)
        for cond, x in inputs.items():
            # The whole unit goes through at once (its batch statistics are the scored ones).
            for layer, f in extract_features(model, x, layers, forward=unit.forward).items():
                chunks[cond].setdefault(layer, []).append(f[keep])
        total += keep.numel()
        if total >= points:
            break
    if total == 0:
        raise DataError("the analysis got no points: the units (episodes / test images) are empty")
    if total < points:
        warnings.warn(f"intrinsic dimension on {total} distinct images, fewer than analysis.points="
                      f"{points}: the episodes hold no more; compare runs at the same count", stacklevel=2)
    return {c: {layer: torch.cat(v) for layer, v in per.items()} for c, per in chunks.items()}


def intrinsic_dimension_of_units(units: Iterable[FeatureUnit], model: nn.Module, analysis: IDConfig,
                                 attack_cfg: AttackConfig | None, seed: int = 0,
                                 progress: Callable[[Iterable], Iterable] | None = None) -> IDReport:
    """Run the analysis configured by ``analysis`` (an ``IDConfig``) over ``units``.

    Every estimator of ``analysis.estimators`` is applied to each layer's clean and adversarial
    features; error bars from ``analysis.bootstrap`` sub-samples of ``analysis.fraction`` of the
    points (seeded by ``seed``). One neighbour search per layer and condition serves all
    estimators and sub-samples.
    """
    estimators = build_estimators(analysis)
    layers = list(analysis.layers) or None
    feats = collect_features(units, model, layers, attack_cfg, analysis.points, seed, progress)
    results: dict[str, LayerID] = {}
    n = next(iter(feats["clean"].values())).shape[0]
    # Neighbour lists long enough for every estimator on every sub-sample: one search each.
    needed = max(e.neighbours_needed() for e in estimators.values())
    lists = math.ceil(needed / analysis.fraction) + 8 if needed else 0
    for layer in feats["clean"]:
        estimates: dict[str, dict[str, dict[str, float]]] = {}
        duplicates = {}
        for cond, per_layer in feats.items():
            cloud = PointCloud(per_layer[layer], neighbours=lists)
            duplicates[cond] = cloud.n_duplicates
            estimates[cond] = {}
            for name, est in estimators.items():
                mean, std = dimension_with_error(est, cloud, analysis.bootstrap, analysis.fraction, seed)
                full = float(est.measure(cloud)["dimension_"]) if analysis.bootstrap else mean
                estimates[cond][name] = {"mean": mean, "std": std, "all": full}
        results[layer] = LayerID(feats["clean"][layer].shape[1], n, duplicates, estimates)
    attack = asdict(attack_cfg) if attack_cfg is not None else {}
    return IDReport(results, n, analysis.bootstrap, analysis.fraction, attack)
