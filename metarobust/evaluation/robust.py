"""One call for your own model: clean and robust accuracy through the harness's cascade.

:func:`robust_accuracy` takes any ``nn.Module`` classifier and tensors, builds the plain-classifier
units of :mod:`metarobust.evaluation.classifier` and runs the harness
(:func:`~metarobust.evaluation.harness.evaluate_units`) on them: the same suites (by name, so a
suite that gains an attack gains it here too), the same survivor cascade and the same seeded noise
as ``metarobust eval``.

Example:
    >>> import metarobust
    >>> result = metarobust.robust_accuracy(model, x_test, y_test, eps=8 / 255, norm="Linf", suite="autoattack")
    >>> result.clean_acc, result.robust_acc, result.after
    (0.94, 0.52, {'linf/apgd-ce': 0.54, 'linf/apgd-t': 0.52})
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from metarobust.attacks import ATTACKS
from metarobust.attacks.threat import check_call, norm_name
from metarobust.config import (
    EVAL_SUITES,
    AttackConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    check_fields,
)
from metarobust.errors import ConfigError, DataError
from metarobust.evaluation.classifier import EVAL_BATCH, classifier_unit
from metarobust.evaluation.harness import evaluate_units
from metarobust.evaluation.result import EvalResult

DEFAULT_STEPS = {"fgsm": 1, "fgsm_rs": 1, "apgd": 100, "apgd_t": 100}
"""Steps of a single-attack suite when ``steps`` is not given (any other attack: 10, PGD-10)."""


@dataclass
class RobustAccuracy:
    """What :func:`robust_accuracy` returns (accuracies in [0, 1]).

    Attributes:
        clean_acc: accuracy on the clean inputs.
        robust_acc: the cascade's worst case: correct clean and after every attack of the suite.
        after: ``{attack label: accuracy}`` after each attack of the cascade, in order
            (``"linf/apgd-ce"``, ``"linf/apgd-t"``...; one entry for a single attack).
        x_adv: ``[N, ...]`` like ``x`` (float in [0, 1]), when asked for: each point's input from
            the attack that first broke it; the clean input where no attack did (AutoAttack's
            convention). ``None`` otherwise.
        result: the harness's full :class:`~metarobust.evaluation.result.EvalResult` (95 %
            intervals, per-class accuracies), the schema of ``eval.json``.
    """

    clean_acc: float
    robust_acc: float
    after: dict[str, float]
    x_adv: torch.Tensor | None
    result: EvalResult


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
                    suite: str = "autoattack", steps: int | None = None, step_size: float | None = None,
                    restarts: int = 1, union: dict[str, float] | None = None, seed: int = 0,
                    batch_size: int = EVAL_BATCH, return_adversarial: bool = False) -> RobustAccuracy:
    """Clean and robust accuracy of ``model`` on ``(x, y)`` under ``suite``, in one call.

    The model is attacked in eval mode (and put back in its mode after), ``batch_size`` points at a
    time on the model's device; ``x`` may stay on the CPU. Every attack of the suite runs on the
    points still robust (the harness's cascade), with its random starts drawn from ``seed``: the
    same call gives the same numbers.

    Args:
        model: a classifier ``x [B, ...] -> logits [B, K]`` that takes images in [0, 1]; put any
            normalisation (mean/std) inside it, e.g. ``nn.Sequential(Normalize(mean, std), net)``
            (:class:`~metarobust.models.layers.Normalize`).
        x: ``[N, C, H, W]`` float images in [0, 1], or uint8 0..255 (divided by 255).
        y: ``int64 [N]`` labels in ``0..K-1``.
        eps: the radius, in [0, 1] pixel units (L-inf 8/255; L2 0.5; L1 12).
        norm: ``"linf"``, ``"l2"`` or ``"l1"`` (case-insensitive).
        suite: a suite of the harness (``eval.suite``): ``"autoattack"`` (AutoAttack's standard
            version: APGD-CE, APGD-T, FAB-T and Square, each on the survivors), ``"apgd_ce_t"``
            (its APGD-CE + APGD-T subset, cheaper), ``"autoattack_reference"`` (the reference
            code, ``pip install pyautoattack``); or one attack by its registry name
            (``metarobust list attacks``: ``"pgd"``, ``"apgd"``, ``"fgsm"``, ``"square"``...).
        steps: a single attack's steps; ``None``: 10 (PGD-10), 100 for APGD, 1 for FGSM.
        step_size: PGD's step; ``None``: Madry et al.'s ``2.5 eps / steps``.
        restarts: random restarts of a single attack.
        union: more threat models, ``{norm: eps}``: a point is robust only if it survives the
            suite in each of them too.
        seed: seeds the attacks' random starts.
        batch_size: points per harness unit (one forward/backward batch).
        return_adversarial: also return the adversarial inputs (``x_adv``, on ``x``'s device).

    Returns: a :class:`RobustAccuracy`.

    Raises:
        DataError: ``x`` outside [0, 1] or NaN, ``y`` not labels of ``x``.
        ConfigError: an unknown suite or norm, a negative eps.

    Example:
        >>> r = robust_accuracy(model, x, y, eps=8 / 255, suite="pgd", steps=20, return_adversarial=True)
        >>> r.robust_acc, r.x_adv.shape
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model is a {type(model).__name__}; robust_accuracy takes an nn.Module (for a "
                          f"function of fast weights, call an attack directly: attack(forward, x, y, seed=0))")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DataError("x and y must be tensors: x [N, C, H, W] images in [0, 1], y int64 [N] labels")
    if y.dim() != 1 or torch.is_floating_point(y) or len(y) != len(x) or len(y) == 0:
        raise DataError(f"y has shape {tuple(y.shape)} and dtype {y.dtype}; expected integer labels, one per "
                        f"image of x (shape [{len(x)}])")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}; expected an integer >= 1")
    if x.dtype != torch.uint8:
        check_call(x, eps=eps)  # before any work: images in [0, 1], finite; eps >= 0
    elif not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ConfigError(f"eps={eps!r}; expected a radius >= 0 in [0, 1] pixel units")
    cfg = _config(norm, float(eps), suite, steps, step_size, restarts, union or {}, seed)

    device = next((p.device for p in model.parameters()), x.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            num_classes = model(_floats(x[:1].to(device))).shape[-1]
        low, high = (int(v) for v in torch.stack([y.min(), y.max()]).tolist())
        if low < 0 or high >= num_classes:
            raise DataError(f"y has labels in [{low}, {high}]; the model has {num_classes} outputs, so labels "
                            f"must lie in 0..{num_classes - 1}")
        units = []

        def chunks():
            for start in range(0, len(y), batch_size):
                xb = _floats(x[start:start + batch_size].to(device))
                unit = classifier_unit(model, xb, y[start:start + batch_size].to(device))
                if return_adversarial:
                    unit = replace(unit, adversarial=xb[None].clone())
                    units.append(unit)
                yield unit

        result = evaluate_units(chunks(), cfg, num_classes, [str(c) for c in range(num_classes)])
    finally:
        model.train(was_training)
    x_adv = torch.cat([u.adversarial[0] for u in units]).to(x.device) if return_adversarial else None
    return RobustAccuracy(result.clean_acc, result.robust_acc, dict(result.after), x_adv, result)


def _floats(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255) if x.dtype == torch.uint8 else x


def _config(norm: str, eps: float, suite: str, steps: int | None, step_size: float | None, restarts: int,
            union: dict[str, float], seed: int) -> ExperimentConfig:
    """The experiment config the harness reads: the ``attack`` and ``eval`` sections of the call."""
    norm = norm_name(norm)
    union = {norm_name(n, f"union[{n!r}]"): float(e) for n, e in union.items()}
    if suite in ATTACKS:  # one attack: the harness's "single" suite runs the attack section
        name, suite_name = suite, "single"
    else:
        name, suite_name = "pgd", suite
    steps = DEFAULT_STEPS.get(name, 10) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r}; expected an integer >= 1")
    if step_size is None:  # Madry et al.'s; FGSM steps by eps whatever this says
        step_size = 2.5 * eps / steps
    attack = AttackConfig(name=name, norm=norm, eps=eps, steps=steps, step_size=step_size, restarts=restarts)
    cfg = ExperimentConfig(recipe="", seed=seed, data=DataConfig(dataset=""), attack=attack,
                           eval=EvalConfig(suite=suite_name, union=union, checks=False))
    try:
        check_fields(cfg)
    except ConfigError as err:
        if "eval.suite" in str(err):
            raise ConfigError(f"suite={suite!r}; expected a suite ({', '.join(EVAL_SUITES[1:])}) or an attack name "
                              f"({', '.join(ATTACKS.names())})"
                              ) from err
        raise ConfigError(f"{err} (robust_accuracy's arguments: norm, eps, steps, step_size, restarts, union)"
                          ) from err
    return cfg


__all__ = ["RobustAccuracy", "robust_accuracy"]
